"""Swarm BMT chunk addresses and file references against bee's own test vectors."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootlink.common import swarm
from bootlink.common.errors import BootlinkError

CS = swarm.CHUNK_SIZE

# bee pkg/file/testing/vector.go: data = byte i -> i % 255 (go-mockbytes, modulus 255),
# lengths from the (partly commented-out) fileLengths list, expected fileExpectHashHex.
BEE_VECTORS = [
    (31, "ece86edb20669cc60d142789d464d57bdf5e33cb789d443f608cbd81cfa5697d"),
    (32, "0be77f0bb7abc9cd0abed640ee29849a3072ccfd1020019fe03658c38f087e02"),
    (33, "3463b46d4f9d5bfcbf9a23224d635e51896c1daef7d225b86679db17c5fd868e"),
    (63, "95510c2ff18276ed94be2160aed4e69c9116573b6f69faaeed1b426fea6a3db8"),
    (64, "490072cc55b8ad381335ff882ac51303cc069cbcb8d8d3f7aa152d9c617829fe"),
    (65, "541552bae05e9a63a6cb561f69edf36ffe073e441667dbf7a0e9a3864bb744ea"),
    (CS, "c10090961e7682a10890c334d759a28426647141213abda93b096b892824d2ef"),
    (CS + 31, "91699c83ed93a1f87e326a29ccd8cc775323f9e7260035a5f014c975c5f3cd28"),
    (CS + 32, "73759673a52c1f1707cbb61337645f4fcbd209cdc53d7e2cedaaa9f44df61285"),
    (CS + 63, "db1313a727ffc184ae52a70012fbbf7235f551b9f2d2da04bf476abe42a3cb42"),
    (CS + 64, "ade7af36ac0c7297dc1c11fd7b46981b629c6077bce75300f85b02a6153f161b"),
    (CS * 2, "29a5fb121ce96194ba8b7b823a1f9c6af87e1791f824940a53b5a7efe3f790d9"),
    (CS * 2 + 32, "61416726988f77b874435bdd89a419edc3861111884fd60e8adf54e2f299efd6"),
    (CS * 128, "3047d841077898c26bbe6be652a2ec590a5d9bd7cd45d290ea42511b48753c09"),
    (CS * 128 + 31, "e5c76afa931e33ac94bce2e754b1bb6407d07f738f67856783d93934ca8fc576"),
    (CS * 128 + 32, "485a526fc74c8a344c43a4545a5987d17af9ab401c0ef1ef63aefcc5c2c086df"),
    (CS * 128 + 64, "624b2abb7aefc0978f891b2a56b665513480e5dc195b4a66cd8def074a6d2e94"),
    (CS * 129, "b8e1804e37a064d28d161ab5f256cc482b1423d5cd0a6b30fde7b0f51ece9199"),
    (CS * 130, "59de730bf6c67a941f3b2ffa2f920acfaa1713695ad5deea12b4a121e5f23fa1"),
    (CS * 128 * 128, "522194562123473dcfd7a457b18ee7dee8b7db70ed3cfa2b73f348a992fdfd3b"),
    (CS * 128 * 128 + 32, "ed0cc44c93b14fef2d91ab3a3674eeb6352a42ac2f0bbe524711824aae1e7bcc"),
]

_PATTERN = bytes(i % 255 for i in range(255)) * (CS * 128 * 128 // 255 + 2)


def mock_bytes(n: int) -> bytes:
    return _PATTERN[:n]


@pytest.mark.parametrize(("length", "expected"), BEE_VECTORS, ids=[str(n) for n, _ in BEE_VECTORS])
def test_bee_file_vectors(length, expected):
    if length > CS * 200 and not swarm.backend().startswith("c"):
        pytest.skip("64 MiB vectors need the C BMT helper (pure Python takes minutes)")
    assert swarm.reference_of_bytes(mock_bytes(length)).hex() == expected


@pytest.fixture(params=swarm.C_IMPLS)
def c_impl(request):
    """Each SIMD variant of the C helper in turn (skipped where the CPU lacks it)."""
    if request.param not in swarm.c_impls():
        pytest.skip(f"no C helper or this CPU cannot run {request.param}")
    swarm.use_c_impl(request.param)
    try:
        yield request.param
    finally:
        swarm.use_c_impl(None)


@pytest.mark.parametrize("length", [CS * 128 * 128 + 32, CS * 130, CS * 8 + 1, CS * 5, 100])
def test_every_c_variant_matches_bee_vectors(c_impl, length):
    expected = dict(BEE_VECTORS).get(length)
    data = mock_bytes(length)
    ref = swarm.reference_of_bytes(data)
    if expected is not None:
        assert ref.hex() == expected
    else:  # lengths without a bee vector: every variant must agree with pycryptodome
        if swarm._KECCAK is None:
            pytest.skip("pycryptodome not installed")
        ends = range(0, length, CS)
        slow = b"".join(
            swarm.chunk_address_py(len(data[i : i + CS]), data[i : i + CS]) for i in ends
        )
        assert swarm.leaf_addresses(data) == slow


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=19 * CS + 1), junk=st.binary(min_size=1, max_size=CS))
def test_leaf_addresses_batched_equal_one_by_one(data, junk):
    # Batches of 8 and 4 chunks side by side, short tails, padded slots: each address
    # must be the chunk's own, whatever else shares its vector.
    data = data + junk
    one_by_one = b"".join(
        swarm.chunk_address(len(data[i : i + CS]), data[i : i + CS])
        for i in range(0, len(data), CS)
    )
    for name in swarm.c_impls():
        swarm.use_c_impl(name)
        try:
            assert swarm.leaf_addresses(data) == one_by_one, name
        finally:
            swarm.use_c_impl(None)


@pytest.mark.parametrize(
    "n_chunks", [1, 2, 127, 128, 129, 130, 128 * 2 + 1, 128 * 128, 128 * 128 + 1, 128 * 129 + 1]
)
@pytest.mark.parametrize("short", [0, 1, CS - 1])
def test_reference_from_leaves_equals_splitter(n_chunks, short):
    data = os.urandom(n_chunks * CS - short)
    assert swarm.reference_from_leaves(swarm.leaf_addresses(data), len(data)) == (
        swarm.reference_of_bytes(data)
    )


ODD_SIZES = [1, CS - 1, CS, CS + 1, 8 * CS - 1, 8 * CS + 1, 128 * CS + 1, 131 * CS - 5]


def _one_by_one_py(payloads: bytes, chunk_span: int, total: int) -> bytes:
    """chunk_addresses spelled out with the pycryptodome BMT, chunk by chunk."""
    if swarm._KECCAK is None:
        pytest.skip("pycryptodome not installed")
    return b"".join(
        swarm.chunk_address_py(min(chunk_span, total - i * chunk_span), payloads[off : off + CS])
        for i, off in enumerate(range(0, len(payloads), CS))
    )


@pytest.mark.parametrize("size", ODD_SIZES)
def test_chunk_addresses_of_data_chunks_match_python(c_impl, size):
    data = os.urandom(size)
    expected = _one_by_one_py(data, CS, size)
    assert swarm.chunk_addresses(data, CS, size) == expected
    assert swarm.leaf_addresses(data) == expected


@pytest.mark.parametrize("children", [1, 2, 127, 128, 129, 8 * 128, 9 * 128 + 1])
@pytest.mark.parametrize("level", [1, 2])
def test_chunk_addresses_of_intermediate_chunks_match_python(c_impl, children, level):
    # A level of intermediate chunks: payloads of up to 128 child addresses, each full
    # chunk spanning 128**level data chunks, the last one what is left of the file.
    payloads = os.urandom(32 * children)
    chunk_span = CS * swarm.BRANCHES**level
    n = -(-children // swarm.BRANCHES)
    for total in ((n - 1) * chunk_span + 1, n * chunk_span - 7, n * chunk_span):
        expected = _one_by_one_py(payloads, chunk_span, total)
        assert swarm.chunk_addresses(payloads, chunk_span, total) == expected


def test_chunk_addresses_refuse_spans_that_do_not_fit():
    with pytest.raises(ValueError):
        swarm.chunk_addresses(bytes(2 * CS), CS, CS)  # 2 chunks cannot span 1 chunk's bytes
    with pytest.raises(ValueError):
        swarm.chunk_addresses(bytes(CS), CS, CS + 1)


@pytest.mark.parametrize("n_chunks", [2, 129, 128 * 2 + 1, 128 * 128 + 1])
def test_reference_from_leaves_sinks_the_splitters_intermediate_chunks(n_chunks):
    data = os.urandom(n_chunks * CS - 3)
    from_splitter: list[tuple[bytes, int, bytes]] = []
    swarm.reference_of_bytes(data, lambda a, s, p: from_splitter.append((a, s, p)))
    rebuilt: list[tuple[bytes, int, bytes]] = []
    swarm.reference_from_leaves(
        swarm.leaf_addresses(data), len(data), lambda a, s, p: rebuilt.append((a, s, p))
    )
    intermediates = [c for c in from_splitter if c[1] > CS]
    assert sorted(rebuilt) == sorted(intermediates)


@pytest.mark.parametrize("length", [1, CS, CS + 1, (1 << 20) - 1, 1 << 20])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_stream_shares_cover_the_block_in_whole_chunks(length, parts):
    from bootlink.client.sources.swarm import _shares

    shares = _shares(length, parts)
    assert len(shares) <= parts
    assert [off for off, _ in shares] == [sum(n for _, n in shares[:i]) for i in range(len(shares))]
    assert sum(n for _, n in shares) == length
    assert all(n % CS == 0 for _, n in shares[:-1])


def test_reference_from_leaves_refuses_wrong_count():
    with pytest.raises(ValueError):
        swarm.reference_from_leaves(bytes(64), CS)  # 2 addresses, but 1 chunk of data


def test_hello_swarm():
    ref = swarm.reference_of_bytes(b"Hello, Swarm!")
    assert ref.hex() == "680bb26ce329867d9063251135dea6f02b58d0ef3d4eb9076c3d5fc03fe54cf6"


def test_keccak_is_not_sha3():
    # keccak256("") from the Keccak team / Ethereum; sha3_256("") is a7ffc6f8...
    assert swarm.keccak256(b"").hex() == (
        "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    )
    assert swarm.keccak256(b"abc" * 100) == _pycryptodome_keccak(b"abc" * 100)


def _pycryptodome_keccak(data: bytes) -> bytes:
    keccak = swarm._load_pycryptodome_keccak()
    if keccak is None:
        pytest.skip("pycryptodome not installed")
    return keccak.new(digest_bits=256, data=data).digest()


@settings(max_examples=40, deadline=None)
@given(payload=st.binary(max_size=CS), span=st.integers(min_value=0, max_value=2**64 - 1))
def test_c_and_python_chunk_addresses_agree(payload, span):
    if swarm._KECCAK is None:
        pytest.skip("pycryptodome not installed")
    assert swarm.chunk_address(span, payload) == swarm.chunk_address_py(span, payload)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3 * CS + 100), cuts=st.lists(st.integers(0, 4 * CS), max_size=6))
def test_streaming_equals_one_shot(data, cuts):
    tb = swarm.TreeBuilder()
    prev = 0
    for c in sorted(min(c, len(data)) for c in cuts):
        tb.update(data[prev:c])
        prev = c
    tb.update(data[prev:])
    assert tb.finish() == swarm.reference_of_bytes(data)


@pytest.mark.parametrize("n_chunks", [1, 2, 127, 128, 129, 130, 128 * 2 + 1])
def test_tree_shape_matches_joiner_layout(n_chunks):
    """Every intermediate chunk the splitter makes is what the joiner expects."""
    data = os.urandom(n_chunks * CS - 7)
    chunks = {}
    root = swarm.reference_of_bytes(data, lambda a, s, p: chunks.__setitem__(a, (s, p)))

    def join(addr, expected_span):
        span, payload = chunks[addr]
        assert swarm.chunk_address(span, payload) == addr
        assert span == expected_span
        if span <= CS:
            return payload
        parts = []
        for i, (_off, sub) in enumerate(swarm.children_layout(span, len(payload))):
            parts.append(join(payload[32 * i : 32 * i + 32], sub))
        return b"".join(parts)

    assert join(root, len(data)) == data


def test_children_layout_refuses_wrong_shape():
    with pytest.raises(ValueError):
        list(swarm.children_layout(CS * 3, 32 * 2))


def test_chunk_wire_form():
    span, payload = swarm.unpack_chunk(swarm.pack_chunk(5, b"hello"))
    assert (span, payload) == (5, b"hello")
    with pytest.raises(ValueError):
        swarm.unpack_chunk(b"short")


@pytest.mark.parametrize("bad", ["", "xyz", "00" * 31, "0x" + "ab" * 33])
def test_parse_reference_refuses_bad_text(bad):
    with pytest.raises(BootlinkError):
        swarm.parse_reference(bad)


def test_parse_reference_encrypted_named():
    with pytest.raises(BootlinkError, match="encrypted"):
        swarm.parse_reference("ab" * 64)
