"""HTTP service for the sealed boot payload: POST /v1/boot (see common/wire.py).

One request = one redeemed challenge = one fresh session key. The response is the
manifest sealed under that key (frame 0), then the payload frames the server sealed once
under the payload key the manifest carries, sent from memory with sendfile(2).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bootlink.common import wire
from bootlink.common.errors import BootlinkError, ProtocolError

from .discovery import ChallengeBook
from .payload import Offer

log = logging.getLogger("bootlink.server.http")

BOOT_PATH = "/v1/boot"
REASON_MAX = 180  # characters of a 503 reason (clients read 200 bytes of it)


@dataclass
class BootService:
    """Everything the handler needs; plain data plus narrow callables (testable alone)."""

    k_xfer: bytes
    challenges: ChallengeBook
    offer: Callable[[], Offer]  # the manifest and sealed payload as of now
    link_ifindexes: Callable[[], set[int]]
    on_authenticated: Callable[[str, int], None]  # (client address, ifindex)

    def head(self, challenge: bytes, request_nonce: bytes, offer: Offer) -> bytes:
        """Frame 0: the manifest, sealed under this request's session key."""
        k_sess = wire.session_key(self.k_xfer, challenge, request_nonce)
        return wire.seal_frame(k_sess, 0, 0, offer.manifest.to_bytes())

    def frames(self, challenge: bytes, request_nonce: bytes, offer: Offer):
        """The whole response body, frame 0 then the payload frames (for tests and tools
        that want bytes; the handler sends the payload with sendfile)."""
        yield self.head(challenge, request_nonce, offer)
        yield os.pread(offer.payload.frames.fileno(), offer.payload.length, 0)


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
        try:
            body = self.rfile.read(length)
        except OSError as exc:  # reset, or silent for `timeout` seconds: the cable is gone
            return self._dropped(f"request abandoned ({exc.strerror or exc})")
        if len(body) < length:
            return self._dropped(f"disconnected mid-request ({len(body)} of {length} bytes)")
        try:
            challenge, nonce = wire.decode_boot_request(self.service.k_xfer, body)
            self.service.challenges.redeem(challenge)
        except ProtocolError as exc:
            log.warning("refused boot request from %s: %s", host, exc)
            return self._refuse(403, "not authenticated")
        log.info("client %s%%%d authenticated; sending boot payload", host, scope)
        try:
            self.service.on_authenticated(host, scope)
            offer = self.service.offer()
        except BootlinkError as exc:
            log.error("cannot serve %s: %s", host, exc)
            # the client proved the key: tell it why (the message names paths and the fix,
            # never key material), so that it does not suspect the key
            return self._refuse(503, f"server not ready: {_one_line(str(exc))}")
        head = self.service.head(challenge, nonce, offer)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(head) + offer.payload.length))
            self.end_headers()
            self.wfile.write(head)
            self.connection.sendfile(offer.payload.frames, 0, offer.payload.length)
        except OSError as exc:  # cable pulled, client gone: it will ask again
            log.warning("transfer to %s aborted: %s", host, exc.strerror or exc)
            self.close_connection = True
        else:
            log.info("boot payload sent to %s (%d bytes)", host, offer.manifest.payload_size)

    def _refuse(self, code: int, text: str) -> None:
        data = text.encode() + b"\n"
        try:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError as exc:  # the peer is gone: nobody to tell
            self._dropped(f"gone before the {code} answer ({exc.strerror or exc})")

    def _dropped(self, what: str) -> None:
        """A peer that went away (cable pulled, client killed): one line, no answer."""
        log.warning("client %s %s", self.client_address[0], what)
        self.close_connection = True


def _one_line(text: str, limit: int = REASON_MAX) -> str:
    """`text` as one short line, fit for the refusal's body."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        """A connection that breaks is one log line; anything else is a bug: traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.warning("connection from %s dropped: %s", client_address[0], exc.strerror or exc)
            return
        super().handle_error(request, client_address)


def make_http_server(service: BootService, port: int) -> ThreadingHTTPServer:
    handler = type("BootHandler", (_Handler,), {"service": service})
    try:
        return _Server(("::", port), handler)
    except OSError as exc:
        raise BootlinkError(
            f"cannot listen for HTTP on port {port} ({exc.strerror}): change link.http_port"
        ) from None
