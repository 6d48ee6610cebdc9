"""Fetch the sealed boot payload from a found server into files, verifying as it arrives.

Every frame is authenticated (AES-EAX) before a byte of it is written, and memory stays
bounded: frames are received into a small pool of reused buffers and decrypted in place.
Bytes go to `<name>.part` files that are renamed only once the whole stream has
authenticated, in order, to its last frame, so a half-received or forged kernel never
looks complete. The files' SHA-256 (from the sealed manifest) is checked again on the
very file descriptors handed to kexec (common/kexec.py), so it is not recomputed here.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bootlink.common import eax, omac_lanes, wire
from bootlink.common.errors import BootlinkError, ProtocolError
from bootlink.common.log import Progress
from bootlink.common.output_file import OutputFile, check_space, make_dir
from bootlink.common.pipeline import ordered_map

log = logging.getLogger("bootlink.client.transfer")
T = TypeVar("T")

WINDOW_BYTES = 16 << 20  # received ahead of the frame being written
BATCH = omac_lanes.LANES  # frames opened together


@dataclass(frozen=True)
class Received:
    manifest: wire.BootManifest
    paths: dict[str, Path]  # "kernel" / "initrd" -> verified file


def fetch_boot_payload(
    host: str,
    port: int,
    k_xfer: bytes,
    challenge: bytes,
    dest: Path,
    timeout: float = 30.0,
    progress: bool = True,
) -> Received:
    """POST the sealed request to http://[host]:port/v1/boot and receive the payload."""
    nonce = wire.new_nonce()
    body = wire.encode_boot_request(k_xfer, challenge, nonce)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        try:
            conn.request("POST", "/v1/boot", body, {"Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
        except OSError as exc:
            raise BootlinkError(
                f"cannot reach the server's boot service at [{host}]:{port} "
                f"({exc.strerror or exc}): check the cable and retry"
            ) from None
        if resp.status != 200:
            reason = resp.read(200).decode(errors="replace").strip()
            hint = (
                "the laptop cannot serve for the reason it gives; fix that there and retry"
                if resp.status == 503
                else "the keys differ or the request was stale; retry, and check both machines "
                "use the same key"
            )
            raise ProtocolError(f"server refused the boot request ({resp.status} {reason}): {hint}")
        return _receive(resp, wire.session_key(k_xfer, challenge, nonce), dest, progress)
    finally:
        conn.close()


class _Body:
    """The HTTP body as a `readinto` stream where a broken connection reads as its end."""

    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self._resp = resp

    def readinto(self, buf) -> int:
        try:
            return self._resp.readinto(buf)
        except (http.client.IncompleteRead, OSError, ValueError):  # ValueError: closed
            return 0

    def close(self) -> None:
        """Unblock a reader thread at once (used when we give up on the stream)."""
        with contextlib.suppress(OSError):
            self._resp.close()


class _Buffers:
    """A free list of frame-sized buffers: frames in flight never exceed the pipeline's
    window, so the list stays a few megabytes however large the payload."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        try:
            return self._free.pop()  # list.pop/append are atomic: no lock needed
        except IndexError:
            return bytearray(self.size)

    def give(self, buf: bytearray) -> None:
        self._free.append(buf)


def _receive(resp, k_sess: bytes, dest: Path, progress: bool) -> Received:
    stream = _Body(resp)
    reader = wire.FrameReader(stream, max_length=wire.MAX_JSON)
    first, last = reader.next(k_sess)
    manifest = wire.BootManifest.from_bytes(first)
    names = [f.name for f in manifest.files]
    if sorted(names) != ["initrd", "kernel"] or last:
        raise ProtocolError("manifest must list exactly a kernel and an initrd")
    make_dir(dest)
    check_space(dest, manifest.payload_size, "the laptop's boot payload")
    bar = Progress("download", manifest.payload_size) if progress else None
    files: list[OutputFile] = []
    # no frame may be larger than the manifest's chunk: buffers of that size always fit
    reader.max_length = manifest.chunk_size + eax.TAG_SIZE
    buffers = _Buffers(reader.max_length)
    key = manifest.payload_key
    # Frames are opened in batches on worker threads (a batch's MAC chains run side by
    # side: see common/omac_lanes.py), consumed here in order. A deep window (16 MiB)
    # keeps the socket drained while a write or a MAC is slow to be scheduled: with 4
    # frames in flight the link idled a third of the time.
    frames = _flatten(
        ordered_map(
            lambda batch: zip(wire.open_frames(key, batch), batch, strict=True),
            reader.raw_batches(BATCH, buffers.take),
            window=max(2, WINDOW_BYTES // (manifest.chunk_size * BATCH)),
        )
    )
    try:
        pending, raw = memoryview(b""), None  # slices of a memoryview copy nothing
        for entry in manifest.files:
            # not fsynced: the ramdisk's download_dir is a tmpfs, and kexec hashes it again
            out = OutputFile(dest / entry.name, durable=False)
            files.append(out)
            while out.tell() < entry.size:
                if not pending:
                    if raw is not None:
                        buffers.give(raw.sealed.obj)
                    pending, raw = next(frames)
                    if raw.last:
                        raise ProtocolError(f"stream ended inside {entry.name}")
                take = pending[: entry.size - out.tell()]
                pending = pending[len(take) :]
                out.write(take)
                if bar:
                    bar.advance(len(take))
            out.close()
        tail, raw = next(frames, (b"", None))
        if pending or tail or raw is None or not raw.last:
            raise ProtocolError("stream carries more data than the manifest announced")
        if bar:
            bar.finish()
        return Received(manifest, {out.path.name: out.commit() for out in files})
    finally:
        stream.close()  # on failure the feeder thread may sit in a read: unblock it first
        frames.close()
        for out in files:
            out.discard()  # (nothing once committed)


def _flatten(batches: Iterator[Iterable[T]]) -> Iterator[T]:
    """Items of the batches in order; closing it closes `batches` (stops the workers)."""
    try:
        for batch in batches:
            yield from batch
    finally:
        batches.close()
