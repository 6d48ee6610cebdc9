"""HTTP service for the sealed boot payload: POST /v1/boot (see common/wire.py).

One request = one redeemed challenge = one fresh session key. The response is the
sealed manifest followed by the kernel and initrd as sealed 1 MiB frames, read from disk
as they are sent so memory stays bounded whatever the initrd's size. If a file changes
size or content while it is being sent, the stream is cut before its final frame and
the client refuses it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bootlink.common import eax, wire
from bootlink.common.errors import BootlinkError, ProtocolError
from bootlink.common.pipeline import ordered_map

from .discovery import ChallengeBook
from .payload import Stamp

log = logging.getLogger("bootlink.server.http")

BOOT_PATH = "/v1/boot"


@dataclass
class BootService:
    """Everything the handler needs; plain data plus narrow callables (testable alone)."""

    k_xfer: bytes
    challenges: ChallengeBook
    manifest: Callable[[], wire.BootManifest]
    file_paths: dict[str, Path]
    link_ifindexes: Callable[[], set[int]]
    on_authenticated: Callable[[str, int], None]  # (client address, ifindex)
    hashed_stamp: Callable[[str], Stamp | None]  # file identity when its hash was taken

    def frames(self, challenge: bytes, request_nonce: bytes, manifest: wire.BootManifest):
        """Yield the sealed response frames; raises BootlinkError to cut the stream.

        Chunks are read (and re-hashed, to catch a file changing under us) here, and
        sealed a few at a time on worker threads (common/pipeline.py)."""
        k_sess = wire.session_key(self.k_xfer, challenge, request_nonce)
        yield wire.seal_frame(k_sess, 0, 0, manifest.to_bytes())
        yield from ordered_map(lambda item: wire.seal_frame(k_sess, *item), self._chunks(manifest))

    def _chunks(self, manifest: wire.BootManifest):
        """(counter, flags, plaintext) for every payload frame, then the empty last one.

        The manifest's SHA-256 was computed when the file last changed (payload.BootFiles);
        instead of hashing every byte again while sending, the file's identity (size,
        mtime, inode) must be the one it had when hashed, before and after sending: a file
        replaced or rewritten cuts the stream before its last frame, and the client's own
        hash check catches anything else.
        """
        counter = 1
        for entry in manifest.files:
            path = self.file_paths[entry.name]
            sent = 0
            with open(path, "rb") as f:
                before = Stamp.of(os.fstat(f.fileno()))
                while chunk := f.read(manifest.chunk_size):
                    sent += len(chunk)
                    if sent > entry.size:
                        break
                    yield counter, 0, chunk
                    counter += 1
                after = Stamp.of(os.fstat(f.fileno()))
            hashed = self.hashed_stamp(entry.name)
            if sent != entry.size or not before == after == hashed == Stamp.of(path.stat()):
                raise BootlinkError(f"{entry.name} changed while being sent; stream cut")
        yield counter, wire.FLAG_LAST, b""

    @staticmethod
    def response_length(manifest: wire.BootManifest) -> int:
        overhead = wire.FRAME_HEAD.size + eax.TAG_SIZE
        n = overhead + len(manifest.to_bytes())
        for entry in manifest.files:
            full, rest = divmod(entry.size, manifest.chunk_size)
            n += full * (overhead + manifest.chunk_size) + (overhead + rest if rest else 0)
        return n + overhead


class _Handler(BaseHTTPRequestHandler):
    server_version = "bootlink"
    sys_version = ""
    timeout = 30  # a stalled peer (cable pulled) frees its thread after this long
    service: BootService  # set on the subclass made by make_http_server

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.client_address[0], fmt % args)

    def do_GET(self) -> None:
        self._refuse(404, "nothing here; bootlink clients POST sealed requests")

    def do_POST(self) -> None:
        host, _port, _flow, scope = self.client_address[:4]
        if self.path != BOOT_PATH:
            return self._refuse(404, "unknown path")
        if scope not in self.service.link_ifindexes():
            return self._refuse(403, "not on a link interface")
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if not 0 < length <= wire.MAX_JSON:
            return self._refuse(400, "bad Content-Length")
        body = self.rfile.read(length)
        try:
            challenge, nonce = wire.decode_boot_request(self.service.k_xfer, body)
            self.service.challenges.redeem(challenge)
        except ProtocolError as exc:
            log.warning("refused boot request from %s: %s", host, exc)
            return self._refuse(403, "not authenticated")
        log.info("client %s%%%d authenticated; sending boot payload", host, scope)
        try:
            self.service.on_authenticated(host, scope)
            manifest = self.service.manifest()
        except BootlinkError as exc:
            log.error("cannot serve %s: %s", host, exc)
            return self._refuse(503, "server not ready")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(BootService.response_length(manifest)))
        self.end_headers()
        try:
            for frame in self.service.frames(challenge, nonce, manifest):
                self.wfile.write(frame)
        except BootlinkError as exc:
            log.error("%s", exc)
            self.close_connection = True
        except OSError as exc:  # cable pulled, client gone: it will ask again
            log.warning("transfer to %s aborted: %s", host, exc.strerror or exc)
            self.close_connection = True
        else:
            log.info("boot payload sent to %s (%d bytes)", host, manifest.payload_size)

    def _refuse(self, code: int, text: str) -> None:
        data = text.encode() + b"\n"
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True


def make_http_server(service: BootService, port: int) -> ThreadingHTTPServer:
    handler = type("BootHandler", (_Handler,), {"service": service})
    try:
        return _Server(("::", port), handler)
    except OSError as exc:
        raise BootlinkError(
            f"cannot listen for HTTP on port {port} ({exc.strerror}): change link.http_port"
        ) from None
