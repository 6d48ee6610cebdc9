"""Small HTTP client for the sources: persistent per-thread connections, bounded bodies.

Swarm and IPFS fetches make thousands of small requests with many in flight; opening a
TCP connection per request would dominate. Each worker thread keeps one keep-alive
connection per base URL. Bodies are read with a hard cap so a hostile node cannot make
us buffer more than one chunk/block. Errors become one-line BootlinkErrors naming the URL.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass

from bootlink.common.errors import BootlinkError, Interrupted

USER_AGENT = "bootlink/0.1"


class HttpError(BootlinkError):
    """A request failed: no connection, an HTTP error status, or an oversized body."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConnectionLost(HttpError, Interrupted):
    """No connection, no answer in time, or the answer broke off."""


class TooLarge(BootlinkError):
    """The content is bigger than the caller allows (e.g. a 'manifest' that is a kernel)."""


@dataclass(frozen=True)
class BaseUrl:
    scheme: str
    host: str  # without brackets
    port: int
    path: str  # prefix without trailing slash

    @classmethod
    def parse(cls, url: str, what: str = "URL") -> BaseUrl:
        u = urllib.parse.urlsplit(url.strip())
        if u.scheme not in ("http", "https") or not u.hostname:
            raise BootlinkError(f"{what} '{url}' must look like http://host:port")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            raise BootlinkError(f"{what} '{url}' has an invalid port") from None
        return cls(u.scheme, u.hostname, port, u.path.rstrip("/"))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


class HttpClient:
    """Thread-safe: every thread gets its own keep-alive connection."""

    def __init__(self, base: str | BaseUrl, timeout: float = 30.0, what: str = "URL") -> None:
        self.base = base if isinstance(base, BaseUrl) else BaseUrl.parse(base, what)
        self.timeout = timeout
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.base.scheme == "https":
                conn = http.client.HTTPSConnection(
                    self.base.host,
                    self.base.port,
                    timeout=self.timeout,
                    context=ssl.create_default_context(),
                    blocksize=1 << 16,
                )
            else:
                conn = http.client.HTTPConnection(
                    self.base.host, self.base.port, timeout=self.timeout, blocksize=1 << 16
                )
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def abort(self) -> None:
        """close(), after shutting the socket down: a thread blocked reading a response
        on this thread's connection wakes up at once instead of at its timeout."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):  # already gone
                conn.sock.shutdown(socket.SHUT_RDWR)
        self.close()

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def request(
        self,
        method: str,
        path: str,
        body=None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        """Send a request; return the response with its body unread.

        A keep-alive connection the server closed meanwhile is retried once on a fresh
        one (only for requests without a streamed body, which can be resent).
        """
        hdrs = {"User-Agent": USER_AGENT, **(headers or {})}
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request(method, self.base.path + path, body=body, headers=hdrs)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2 or (body is not None and not isinstance(body, bytes)):
                    raise ConnectionLost(
                        f"{self.url(path)}: connection closed by the server; is it overloaded?"
                    ) from None
            except TimeoutError:
                self.close()
                raise ConnectionLost(
                    f"{self.url(path)}: no answer within {self.timeout:g} s; "
                    "is the node up and reachable?"
                ) from None
            except OSError as exc:
                self.close()
                raise ConnectionLost(
                    f"cannot reach {self.base}: {exc.strerror or exc}; check the URL and network"
                ) from None
        raise AssertionError("unreachable")

    def get_bounded(
        self, path: str, limit: int, headers: dict[str, str] | None = None, *, exact=False
    ) -> tuple[int, bytes]:
        """GET a body of at most `limit` bytes; (status, body). Oversize is an error.

        exact: a body of announced length is received straight into a bytearray of that
        size (http.client's read(n) receives into `limit` bytes, then copies them out)."""
        resp = self.request("GET", path, headers=headers)
        try:
            if exact and resp.status == 200:
                body = read_exact(resp, limit, self.url(path))
            else:
                body = read_capped(resp, limit, self.url(path))
        except BaseException:
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp.status, body


def read_capped(resp: http.client.HTTPResponse, limit: int, url: str) -> bytes:
    length = resp.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HttpError(f"{url}: answer of {length} bytes exceeds the {limit}-byte limit")
    try:
        body = resp.read(limit + 1)
        if len(body) > limit:
            raise HttpError(f"{url}: answer exceeds the {limit}-byte limit")
        if length is not None:
            # Drain what the server announced so the connection can be reused.
            resp.read()
    except http.client.IncompleteRead as exc:
        raise ConnectionLost(f"{url}: connection closed after {len(exc.partial)} bytes") from None
    except TimeoutError:
        raise ConnectionLost(f"{url}: stalled while sending the body") from None
    return body


def read_exact(resp: http.client.HTTPResponse, limit: int, url: str) -> bytes:
    """The body as a bytearray received in place when its length is announced."""
    length = resp.getheader("Content-Length")
    if resp.chunked or length is None or not length.isdigit():
        return read_capped(resp, limit, url)
    if int(length) > limit:
        raise HttpError(f"{url}: answer of {length} bytes exceeds the {limit}-byte limit")
    body = bytearray(int(length))
    view, got = memoryview(body), 0
    try:
        while got < len(body):
            n = resp.readinto(view[got:])
            if not n:
                raise ConnectionLost(f"{url}: connection closed after {got} bytes")
            got += n
    except TimeoutError:
        raise ConnectionLost(f"{url}: stalled while sending the body") from None
    return body  # type: ignore[return-value]


def error_text(body: bytes) -> str:
    """The 'message' of a JSON error body (Bee, kubo), else the start of the text."""
    import json

    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            msg = doc.get("message") or doc.get("Message")
            if isinstance(msg, str):
                return msg[:200]
    except ValueError:
        pass
    text = body[:200].decode("utf-8", "replace").strip()
    if text.startswith("<"):  # a proxy's or CDN's HTML error page says nothing useful
        return "(an HTML error page)"
    return text.replace("\n", " ")
