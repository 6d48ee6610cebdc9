"""AES-EAX built from `cryptography` against the EAX paper's published vectors."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootlink.common import eax

# Bellare, Rogaway, Wagner: "The EAX Mode of Operation", appendix test vectors (AES-128).
# (msg, key, nonce, header, ciphertext || tag)
PAPER_VECTORS = [
    (
        "",
        "233952DEE4D5ED5F9B9C6D6FF80FF478",
        "62EC67F9C3A4A407FCB2A8C49031A8B3",
        "6BFB914FD07EAE6B",
        "E037830E8389F27B025A2D6527E79D01",
    ),
    (
        "F7FB",
        "91945D3F4DCBEE0BF45EF52255F095A4",
        "BECAF043B0A23D843194BA972C66DEBD",
        "FA3BFD4806EB53FA",
        "19DD5C4C9331049D0BDAB0277408F67967E5",
    ),
    (
        "1A47CB4933",
        "01F74AD64077F2E704C0F60ADA3DD523",
        "70C3DB4F0D26368400A10ED05D2BFF5E",
        "234A3463C1264AC6",
        "D851D5BAE03A59F238A23E39199DC9266626C40F80",
    ),
    (
        "481C9E39B1",
        "D07CF6CBB7F313BDDE66B727AFD3C5E8",
        "8408DFFF3C1A2B1292DC199E46B7D617",
        "33CCE2EABFF5A79D",
        "632A9D131AD4C168A4225D8E1FF755939974A7BEDE",
    ),
    (
        "40D0C07DA5E4",
        "35B6D0580005BBC12B0587124557D2C2",
        "FDB6B06676EEDC5C61D74276E1F8E816",
        "AEB96EAEBE2970E9",
        "071DFE16C675CB0677E536F73AFE6A14B74EE49844DD",
    ),
    (
        "4DE3B35C3FC039245BD1FB7D",
        "BD8E6E11475E60B268784C38C62FEB22",
        "6EAC5C93072D8E8513F750935E46DA1B",
        "D4482D1CA78DCE0F",
        "835BB4F15D743E350E728414ABB8644FD6CCB86947C5E10590210A4F",
    ),
    (
        "8B0A79306C9CE7ED99DAE4F87F8DD61636",
        "7C77D6E813BED5AC98BAA417477A2E7D",
        "1A8C98DCD73D38393B2BF1569DEEFC19",
        "65D2017990D62528",
        "02083E3979DA014812F59F11D52630DA30137327D10649B0AA6E1C181DB617D7F2",
    ),
    (
        "1BDA122BCE8A8DBAF1877D962B8592DD2D56",
        "5FFF20CAFAB119CA2FC73549E20F5B0D",
        "DDE59B97D722156D4D9AFF2BC7559826",
        "54B9F04E6A09189A",
        "2EC47B2C4954A489AFC7BA4897EDCDAE8CC33B60450599BD02C96382902AEF7F832A",
    ),
    (
        "6CF36720872B8513F6EAB1A8A44438D5EF11",
        "A4A4782BCFFD3EC5E7EF6D8C34A56123",
        "B781FCF2F75FA5A8DE97A9CA48E522EC",
        "899A175897561D7E",
        "0DE18FD0FDD91E7AF19F1D8EE8733938B1E8E7F6D2231618102FDB7FE55FF1991700",
    ),
    (
        "CA40D7446E545FFAED3BD12A740A659FFBBB3CEAB7",
        "8395FCF1E95BEBD697BD010BC766AAC3",
        "22E7ADD93CFC6393C57EC0B3C17D6B44",
        "126735FCC320D25A",
        "CB8920F87A6C75CFF39627B56E3ED197C552D295A7CFC46AFC253B4652B1AF3795B124AB6E",
    ),
]


@pytest.mark.parametrize(("msg", "key", "nonce", "header", "expected"), PAPER_VECTORS)
def test_paper_vectors(msg, key, nonce, header, expected):
    k, n, h, m = (bytes.fromhex(x) for x in (key, nonce, header, msg))
    sealed = eax.seal(k, n, m, h)
    assert sealed.hex().upper() == expected
    assert eax.open_(k, n, sealed, h) == m
    buf = bytearray(sealed)
    assert eax.open_in_place(k, n, memoryview(buf), h) == m
    assert buf[: len(m)] == m  # decrypted where it lay


@pytest.mark.parametrize(("msg", "key", "nonce", "header", "expected"), PAPER_VECTORS)
def test_any_flipped_bit_is_refused(msg, key, nonce, header, expected):
    k, n, h = (bytes.fromhex(x) for x in (key, nonce, header))
    sealed = bytes.fromhex(expected)
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(eax.InvalidTag):
            eax.open_(k, n, bytes(bad), h)
    with pytest.raises(eax.InvalidTag):
        eax.open_(k, n, sealed, h + b"x")
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x80
        with pytest.raises(eax.InvalidTag):
            eax.open_in_place(k, n, memoryview(bad), h)
        assert bad[:i] + bad[i + 1 :] == sealed[:i] + sealed[i + 1 :]  # refused untouched


@given(
    key=st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    nonce=st.binary(min_size=1, max_size=40),
    header=st.binary(max_size=64),
    msg=st.binary(max_size=300),
    split=st.integers(min_value=0, max_value=300),
)
def test_matches_pycryptodome_and_streams(key, nonce, header, msg, split):
    Cryptodome = pytest.importorskip("Cryptodome.Cipher.AES")
    ref = Cryptodome.new(key, Cryptodome.MODE_EAX, nonce=nonce, mac_len=16)
    ref.update(header)
    c, tag = ref.encrypt_and_digest(msg)
    assert eax.seal(key, nonce, msg, header) == c + tag
    # streaming in two uneven pieces gives the same result as one shot
    enc = eax.Encryptor(key, nonce, header)
    assert enc.update(msg[:split]) + enc.update(msg[split:]) + enc.finalize() == c + tag
    dec = eax.Decryptor(key, nonce, header)
    out = dec.update(c[:split]) + dec.update(c[split:])
    dec.verify(tag)
    assert out == msg


@given(
    key=st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    tweak=st.integers(min_value=0, max_value=2),
    data=st.binary(min_size=1, max_size=200) | st.integers(1, 1 << 17).map(os.urandom),
)
def test_bulk_omac_equals_cmac(key, tweak, data):
    """The CBC route to OMAC (which lets threads MAC in parallel) is CMAC exactly, at every
    length: complete and padded last blocks, one block, many."""
    assert eax._omac_bulk(key, tweak, memoryview(data)) == eax._omac(key, tweak, data).finalize()


def test_wrong_key_size_is_refused():
    with pytest.raises(ValueError):
        eax.seal(os.urandom(15), b"n", b"m")


lengths = st.integers(0, 300) | st.integers(1, 1 << 15)


@given(
    key=st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    tweak=st.integers(min_value=0, max_value=2),
    sizes=st.lists(lengths.filter(bool), min_size=1, max_size=19),
)
def test_omac_of_many_messages_equals_cmac_of_each(key, tweak, sizes):
    """Several chains side by side (AES-NI lanes for AES-128, OpenSSL for the other key
    sizes), messages of different lengths, more than one group of lanes: each MAC is
    CMAC of its own message."""
    messages = [bytearray(os.urandom(n)) for n in sizes]
    got = eax._omac_bulk_many(key, tweak, [memoryview(m) for m in messages])
    assert got == [eax._omac(key, tweak, bytes(m)).finalize() for m in messages]


def test_native_lanes_are_used_where_they_were_built():
    """A build that compiled _omac.c on a CPU with AES-NI must use it: without it bulk
    EAX silently runs ~6x slower (the tests above would still pass)."""
    from pathlib import Path

    from bootlink.common import omac_lanes

    built = list(Path(omac_lanes.__file__).parent.glob("_omac*.so"))
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if not built or " aes" not in cpu or os.environ.get("BOOTLINK_OMAC_OPENSSL"):
        pytest.skip("no _omac build or no AES-NI here")
    assert omac_lanes.available()


@given(
    starts=st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=12),
    data=st.data(),
)
def test_lanes_chain_equals_openssl_cbc(starts, data):
    """omac_lanes.chain against OpenSSL's CBC: lanes of different lengths (zero blocks
    included) end at different times, and each keeps its own state."""
    from bootlink.common import omac_lanes

    if not omac_lanes.available():
        pytest.skip("no native lanes here")
    key = os.urandom(16)
    start = starts[0]
    bodies = [bytearray(os.urandom(16 * data.draw(st.integers(0, 70)))) for _ in starts]
    got = omac_lanes.chain(key, start, [memoryview(b) for b in bodies])
    assert got == [eax._cbc_chain(key, start, memoryview(b)) for b in bodies]
    # read-only buffers and other key sizes are left to OpenSSL
    assert omac_lanes.chain(key, start, [memoryview(bytes(16))]) is None
    assert omac_lanes.chain(os.urandom(32), start, [memoryview(bytearray(16))]) is None


def test_open_many_opens_the_good_and_leaves_the_forged_untouched():
    key = os.urandom(16)
    plain = [os.urandom(n) for n in (0, 1, 16, 4096, 70000, 1 << 20)]
    sealed = [bytearray(eax.seal(key, i.to_bytes(16, "big"), p, b"h")) for i, p in enumerate(plain)]
    sealed[3][100] ^= 1  # one forged body
    sealed[5][-1] ^= 1  # one forged tag
    before = [bytes(s) for s in sealed]
    out = eax.open_many_in_place(
        key,
        [eax.Sealed(i.to_bytes(16, "big"), memoryview(s), b"h") for i, s in enumerate(sealed)],
    )
    assert [o is None for o in out] == [False, False, False, True, False, True]
    for i in (0, 1, 2, 4):
        assert out[i] == plain[i]
    assert bytes(sealed[3]) == before[3] and bytes(sealed[5]) == before[5]
    with pytest.raises(eax.InvalidTag):
        eax.open_many_in_place(key, [eax.Sealed(b"n", memoryview(bytearray(15)))])


@given(
    key=st.sampled_from([16, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    messages=st.lists(
        st.tuples(st.binary(min_size=1, max_size=20), lengths.map(os.urandom), st.binary()),
        max_size=11,
    ),
)
def test_seal_many_equals_seal_of_each(key, messages):
    assert eax.seal_many(key, messages) == [eax.seal(key, n, m, h) for n, m, h in messages]
