"""Answer discovery probes on the link NICs, and hand out single-use challenges.

The answer is sealed and binds the prober's nonce, so it proves this server holds the
key to *this* prober only. It carries a fresh challenge that the client must return in
its boot request; the ChallengeBook makes each one usable once, for a short time.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from bootlink.common import wire
from bootlink.common.errors import BootlinkError, ProtocolError

log = logging.getLogger("bootlink.server.discovery")


class ChallengeBook:
    """Challenges issued to probers; each may be redeemed once, within `ttl` seconds."""

    def __init__(self, ttl: float = 60.0, limit: int = 4096) -> None:
        self.ttl, self.limit = ttl, limit
        self._issued: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def issue(self) -> bytes:
        challenge = os.urandom(wire.CHALLENGE_SIZE)
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if len(self._issued) >= self.limit:  # a flood of probes must not grow memory
                self._issued.pop(next(iter(self._issued)))
            self._issued[challenge] = now + self.ttl
        return challenge

    def redeem(self, challenge: bytes) -> None:
        with self._lock:
            self._expire(time.monotonic())
            if self._issued.pop(challenge, None) is None:
                raise ProtocolError("challenge unknown, expired or already used (replay?)")

    def _expire(self, now: float) -> None:
        for c in [c for c, t in self._issued.items() if t < now]:
            del self._issued[c]


class DatagramService:
    """A UDP listener on [::]:port with its own thread; subclasses implement `handle`.

    One odd datagram must never end the listener: errors are logged, the loop goes on.
    """

    thread_name = "udp"

    def __init__(self, port: int, purpose: str) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(("::", port))
        except OSError as exc:
            self.sock.close()
            raise BootlinkError(
                f"cannot listen on udp/{port} for {purpose} ({exc.strerror}): is another "
                "bootlink server or autokexec running? stop it, or change link.discovery_port"
            ) from None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(wire.MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            try:
                self.handle(data, addr)
            except Exception:
                log.exception("handling a datagram from %s failed", addr[0])

    def handle(self, data: bytes, addr: tuple) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        if self.thread.is_alive():
            self.thread.join(timeout=2)


class DiscoveryResponder(DatagramService):
    """Answers probes that arrive on a link NIC with a sealed offer bound to their nonce."""

    thread_name = "discovery"

    def __init__(
        self,
        k_disc: bytes,
        port: int,
        offer_for,  # callable(challenge) -> ServerOffer
        challenges: ChallengeBook,
        link_ifindexes,  # callable() -> set[int]: NICs we serve on (hot-plug aware)
    ) -> None:
        super().__init__(port, "discovery probes")
        self.k_disc, self.offer_for, self.challenges = k_disc, offer_for, challenges
        self.link_ifindexes = link_ifindexes

    def handle(self, data: bytes, addr: tuple) -> None:
        host, _port, _flow, scope = addr[:4]
        if scope not in self.link_ifindexes():
            log.debug("ignoring probe from %s on a non-link interface", host)
            return
        try:
            nonce = wire.decode_probe(data)
        except ProtocolError as exc:
            log.info("ignoring malformed probe from %s: %s", host, exc)
            return
        answer = wire.encode_answer(self.k_disc, nonce, self.offer_for(self.challenges.issue()))
        try:
            self.sock.sendto(answer, addr)
        except OSError as exc:  # the prober's NIC may have gone away meanwhile
            log.info("could not answer %s: %s", host, exc.strerror)
            return
        log.debug("answered probe from %s", host)
