"""Wire messages: round trips, binding, replay, tamper, truncation, reordering; fuzzed parsers."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootlink.common import wire
from bootlink.common.errors import BootlinkError, ProtocolError
from bootlink.server.discovery import ChallengeBook
from bootlink.server.http_service import BootService
from bootlink.server.payload import BootFiles

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
    import hashlib

    (tmp_path / "kernel").write_bytes(kernel)
    (tmp_path / "initrd").write_bytes(initrd)
    manifest = wire.BootManifest(
        files=[
            wire.FileEntry("kernel", len(kernel), hashlib.sha256(kernel).hexdigest()),
            wire.FileEntry("initrd", len(initrd), hashlib.sha256(initrd).hexdigest()),
        ],
        cmdline="root=/dev/nbd0p1",
        nbd=wire.NbdInfo(10809, "bootlink", 1 << 20, False, "0" * 64),
        chunk_size=chunk,
    )
    service = _service(tmp_path, manifest)
    ch, nonce = os.urandom(16), wire.new_nonce()
    frames = list(service.frames(ch, nonce, manifest))
    assert sum(map(len, frames)) == BootService.response_length(manifest)
    return frames, wire.session_key(K1, ch, nonce), manifest


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


def _service(tmp_path, manifest):
    files = BootFiles(tmp_path / "kernel", tmp_path / "initrd")
    return BootService(
        k_xfer=K1,
        challenges=ChallengeBook(),
        manifest=lambda: manifest,
        file_paths=files.paths,
        link_ifindexes=set,
        on_authenticated=lambda *_: None,
        hashed_stamp=files.hashed_stamp,
    )


def test_file_changing_while_sent_cuts_the_stream(tmp_path):
    _, _, manifest = _stream(tmp_path, kernel=b"K" * 40 * 1024)  # more than the read-ahead
    service = _service(tmp_path, manifest)
    frames = service.frames(os.urandom(16), wire.new_nonce(), manifest)
    next(frames), next(frames)  # manifest and the first kernel frame are out
    os.utime(tmp_path / "kernel", ns=(1, 1))  # rewritten in place while being sent
    with pytest.raises(BootlinkError, match="changed while being sent"):
        list(frames)


def test_file_changed_after_hashing_is_not_sent(tmp_path):
    _, _, manifest = _stream(tmp_path)
    service = _service(tmp_path, manifest)
    (tmp_path / "initrd").write_bytes(b"X" * 1000)  # same size, other content
    with pytest.raises(BootlinkError, match="changed while being sent"):
        list(service.frames(os.urandom(16), wire.new_nonce(), manifest))


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
    reader = wire.FrameReader(K1, io.BytesIO(data))
    try:
        while True:
            reader.next()
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
