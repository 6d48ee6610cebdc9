"""Wire messages: round trips, binding, replay, tamper, truncation, reordering; fuzzed parsers."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootlink.common import wire
from bootlink.common.errors import BootlinkError, ProtocolError
from bootlink.server.discovery import ChallengeBook
from bootlink.server.http_service import BootService
from bootlink.server.payload import BootFiles, Offer

K1, K2 = os.urandom(32), os.urandom(32)
OFFER = wire.ServerOffer(7472, 10809, os.urandom(16), "laptop")


def test_answer_round_trip_and_binding():
    nonce = wire.new_nonce()
    answer = wire.encode_answer(K1, nonce, OFFER)
    assert wire.decode_answer(K1, nonce, answer) == OFFER
    with pytest.raises(ProtocolError, match="another probe's nonce"):
        wire.decode_answer(K1, wire.new_nonce(), answer)  # a replay to a later probe
    with pytest.raises(ProtocolError, match="not sealed with our key"):
        wire.decode_answer(K2, nonce, answer)  # an impostor with another key
    spliced = answer[:5] + (later := wire.new_nonce()) + answer[21:]
    with pytest.raises(ProtocolError, match="not sealed with our key"):
        wire.decode_answer(K1, later, spliced)  # nonce is in the authenticated header


def test_probe_round_trip():
    nonce = wire.new_nonce()
    assert wire.decode_probe(wire.encode_probe(nonce)) == nonce


def test_boot_request_round_trip_and_key():
    ch, nonce = os.urandom(16), wire.new_nonce()
    req = wire.encode_boot_request(K1, ch, nonce)
    assert wire.decode_boot_request(K1, req) == (ch, nonce)
    with pytest.raises(ProtocolError):
        wire.decode_boot_request(K2, req)


def test_challenges_are_single_use():
    book = ChallengeBook(ttl=60)
    ch = book.issue()
    book.redeem(ch)
    with pytest.raises(ProtocolError, match="already used"):
        book.redeem(ch)
    with pytest.raises(ProtocolError):
        book.redeem(os.urandom(16))


def test_challenges_expire():
    book = ChallengeBook(ttl=-1)
    ch = book.issue()
    with pytest.raises(ProtocolError, match="expired"):
        book.redeem(ch)


def _stream(tmp_path, kernel=b"K" * 2500, initrd=b"I" * 1000, chunk=1024):
    (tmp_path / "kernel").write_bytes(kernel)
    (tmp_path / "initrd").write_bytes(initrd)
    offer = _offer(tmp_path, chunk)
    service = _service(offer)
    ch, nonce = os.urandom(16), wire.new_nonce()
    frames = _split(b"".join(service.frames(ch, nonce, offer)))
    assert sum(map(len, frames)) == len(service.head(ch, nonce, offer)) + offer.payload.length
    return frames, wire.session_key(K1, ch, nonce), offer.manifest


def _offer(tmp_path, chunk=1024):
    files = BootFiles(tmp_path / "kernel", tmp_path / "initrd", chunk_size=chunk)
    nbd = wire.NbdInfo(10809, "bootlink", 1 << 20, False, "0" * 64)
    payload = files.current()
    manifest = wire.BootManifest(
        payload.files, "root=/dev/nbd0p1", nbd, chunk_size=chunk, payload_key=payload.key
    )
    return Offer(manifest, payload)


def _split(data: bytes) -> list[bytes]:
    """The response cut into its frames (length-prefixed)."""
    frames, i = [], 0
    while i < len(data):
        n = wire.FRAME_HEAD.unpack_from(data, i)[0] + wire.FRAME_HEAD.size
        frames.append(data[i : i + n])
        i += n
    return frames


def _receive(tmp_path, data: bytes, k_sess: bytes):
    from bootlink.client.transfer import _receive

    return _receive(io.BytesIO(data), k_sess, tmp_path / "dl", progress=False)


def test_stream_round_trip(tmp_path):
    frames, k, manifest = _stream(tmp_path)
    got = _receive(tmp_path, b"".join(frames), k)
    assert got.manifest == manifest
    assert got.paths["kernel"].read_bytes() == b"K" * 2500
    assert got.paths["initrd"].read_bytes() == b"I" * 1000


def test_stream_tamper_truncate_reorder_are_refused(tmp_path):
    frames, k, _ = _stream(tmp_path)
    whole = b"".join(frames)
    cases = {
        "tampered": whole[:200] + bytes([whole[200] ^ 1]) + whole[201:],
        "truncated": whole[:-30],
        "last frame dropped": b"".join(frames[:-1]),
        "reordered": b"".join([frames[0], frames[2], frames[1], *frames[3:]]),
        "frame replayed": b"".join([frames[0], frames[1], frames[1], *frames[2:]]),
        "foreign session": b"".join(_stream(tmp_path)[0]),
    }
    for what, data in cases.items():
        with pytest.raises(ProtocolError):
            _receive(tmp_path, data, k)
        leftovers = list((tmp_path / "dl").glob("*"))
        assert leftovers == [], f"{what} left {leftovers}"


def test_long_stream_is_opened_in_batches_and_a_forgery_deep_inside_is_named(tmp_path):
    """Enough frames for several batches of side-by-side MACs (and short frames at each
    file's end): every byte arrives, and a forged frame in a later batch is named."""
    kernel, initrd = os.urandom(20 * 1024 + 7), os.urandom(9 * 1024 - 3)
    frames, k, _ = _stream(tmp_path, kernel, initrd)
    got = _receive(tmp_path, b"".join(frames), k)
    assert got.paths["kernel"].read_bytes() == kernel
    assert got.paths["initrd"].read_bytes() == initrd
    for path in got.paths.values():
        path.unlink()
    bad = [bytearray(f) for f in frames]
    bad[13][40] ^= 1  # frame 13: the manifest is frame 0
    with pytest.raises(ProtocolError, match="frame 13 failed authentication"):
        _receive(tmp_path, b"".join(bad), k)
    assert list((tmp_path / "dl").glob("*")) == []


def test_batches_end_at_the_last_frame_and_keep_frames_read_before_a_cut(tmp_path):
    frames, _, _ = _stream(tmp_path, os.urandom(10 * 1024), b"x", chunk=1024)
    reader = wire.FrameReader(io.BytesIO(b"".join(frames)))
    sizes = [len(b) for b in reader.raw_batches(4)]
    assert sizes == [4, 4, 4, 1]  # manifest, 10 kernel frames, 1 initrd frame, the end
    cut = wire.FrameReader(io.BytesIO(b"".join(frames)[:-20]))
    batches = cut.raw_batches(8)
    assert len(next(batches)) == 8
    assert [f.counter for f in next(batches)] == [8, 9, 10, 11]  # read before the cut
    with pytest.raises(ProtocolError, match="truncated"):
        next(batches)


def _service(offer):
    return BootService(
        k_xfer=K1,
        challenges=ChallengeBook(),
        offer=lambda: offer,
        link_ifindexes=set,
        on_authenticated=lambda *_: None,
    )


def test_payload_is_resealed_under_a_new_key_when_a_file_changes(tmp_path):
    (tmp_path / "kernel").write_bytes(b"K" * 3000)
    (tmp_path / "initrd").write_bytes(b"I" * 10)
    files = BootFiles(tmp_path / "kernel", tmp_path / "initrd", chunk_size=1024)
    first = files.current()
    assert files.current() is first  # sealed once, sent many times
    (tmp_path / "kernel").write_bytes(b"k" * 3001)
    second = files.current()
    assert second.key != first.key
    assert second.files[0] == wire.FileEntry(
        "kernel", 3001, hashlib.sha256(b"k" * 3001).hexdigest()
    )
    # frames of the old payload spliced into a stream that announces the new one fail
    offer = Offer(_offer(tmp_path).manifest, first)
    ch, nonce = os.urandom(16), wire.new_nonce()
    data = b"".join(_service(offer).frames(ch, nonce, offer))
    head = _split(data)[0]
    new = _offer(tmp_path)
    mixed = _service(new).head(ch, nonce, new) + data[len(head) :]
    with pytest.raises(ProtocolError, match="failed authentication"):
        _receive(tmp_path, mixed, wire.session_key(K1, ch, nonce))


def test_manifest_never_shows_the_payload_key(tmp_path):
    _, _, manifest = _stream(tmp_path)
    assert manifest.payload_key.hex() not in repr(manifest)
    assert wire.BootManifest.from_bytes(manifest.to_bytes()) == manifest


def test_file_rewritten_in_place_is_sent_as_it_is_now(tmp_path):
    _stream(tmp_path)
    offer = _offer(tmp_path)
    (tmp_path / "initrd").write_bytes(b"X" * 1000)  # same size, other content
    fresh = _offer(tmp_path)
    assert fresh.payload.key != offer.payload.key
    ch, nonce = os.urandom(16), wire.new_nonce()
    got = _receive(
        tmp_path,
        b"".join(_service(fresh).frames(ch, nonce, fresh)),
        wire.session_key(K1, ch, nonce),
    )
    assert got.paths["initrd"].read_bytes() == b"X" * 1000
    assert got.manifest.files[1].sha256 == hashlib.sha256(b"X" * 1000).hexdigest()


# --- every parser only ever raises ProtocolError, whatever it is fed ----------------------


@given(st.binary(max_size=200))
def test_fuzz_probe(data):
    try:
        wire.decode_probe(data)
    except ProtocolError:
        pass


@given(st.binary(max_size=300))
def test_fuzz_answer(data):
    try:
        wire.decode_answer(K1, data[5:21] if len(data) > 21 else b"x" * 16, data)
    except ProtocolError:
        pass


@given(st.binary(max_size=300))
def test_fuzz_boot_request(data):
    try:
        wire.decode_boot_request(K1, data)
    except ProtocolError:
        pass


@given(st.binary(max_size=600))
def test_fuzz_manifest(data):
    try:
        wire.BootManifest.from_bytes(data)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=15,
)


@given(
    st.dictionaries(
        st.sampled_from(
            ["version", "files", "cmdline", "nbd", "chunk_size", "server_name", "extra"]
        ),
        json_values,
    )
)
def test_fuzz_manifest_structure(obj):
    import json

    try:
        wire.BootManifest.from_bytes(json.dumps(obj).encode())
    except ProtocolError:
        pass


@settings(max_examples=50)
@given(st.binary(max_size=400))
def test_fuzz_frame_reader(data):
    reader = wire.FrameReader(io.BytesIO(data))
    try:
        while True:
            reader.next(K1)
    except ProtocolError:
        pass


def test_trigger_round_trip_binding_and_key():
    nonce, ch = wire.new_nonce(), os.urandom(16)
    offer = wire.encode_trigger_offer(K1, nonce, wire.TriggerOffer(ch, "laptop"))
    assert wire.decode_trigger_offer(K1, nonce, offer) == wire.TriggerOffer(ch, "laptop")
    with pytest.raises(ProtocolError):
        wire.decode_trigger_offer(K1, wire.new_nonce(), offer)
    with pytest.raises(ProtocolError):
        wire.decode_trigger_offer(K2, nonce, offer)
    trig = wire.encode_trigger(K1, ch)
    assert wire.decode_trigger(K1, trig) == ch
    with pytest.raises(ProtocolError):
        wire.decode_trigger(K2, trig)
    forged = trig[:5] + os.urandom(16) + trig[21:]  # another challenge, same seal
    with pytest.raises(ProtocolError):
        wire.decode_trigger(K1, forged)


@given(st.binary(max_size=300))
def test_fuzz_trigger_messages(data):
    try:
        wire.decode_trigger_offer(K1, data[5:21] if len(data) > 21 else b"x" * 16, data)
    except ProtocolError:
        pass
    try:
        wire.decode_trigger(K1, data)
    except ProtocolError:
        pass


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_full_download_disk_is_one_clear_error(tmp_path):
    import subprocess

    frames, k, _ = _stream(tmp_path, kernel=b"K" * 300_000, initrd=b"I" * 300_000)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        from bootlink.client.transfer import _receive

        with pytest.raises(BootlinkError, match="download_dir") as ei:
            _receive(io.BytesIO(b"".join(frames)), k, small / "dl", progress=False)
        assert "\n" not in str(ei.value)
        assert list((small / "dl").iterdir()) == []  # nothing half-written is left
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_batched_keeps_order_and_the_remainder():
    from bootlink.common.pipeline import batched

    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []
