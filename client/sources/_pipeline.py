"""Many small GETs over a few connections, each with requests written ahead (pipelining).

A Swarm file of 64 MiB is 16,400 chunks, each its own `GET /chunks/{addr}` of 4 KiB.
One blocking request per thread spends the time on round trips and on the GIL handing
32 threads back and forth (~250 us of client CPU per chunk). HTTP/1.1 lets a client
write requests before the earlier responses have come back, and the server answers
them in order (RFC 9112 9.3.2; Go's net/http, which Bee uses, does). So each of a few
connections keeps `depth` requests in flight from one thread, and the server always has
the next request at hand.

Work is dynamic: handling one response (an intermediate chunk) may add more paths (its
children). `get_all` returns when every path, added ones included, has been handled.
A connection the server closes (Connection: close, a reset) is reopened and the
requests still in flight on it are sent again (GETs are idempotent); an error from the
handler stops every connection at once and is raised.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ._http import USER_AGENT, BaseUrl, ConnectionLost, HttpError

T = TypeVar("T")

# A Go server (Bee) reads a connection's next request only once it has answered the
# last, so the connections are how many chunks a real node retrieves at once: a chunk it
# must fetch from the network takes tens of ms (measured against a node answering in
# 20 ms: 2 connections 0.4 MB/s, 16: 2.7 MB/s). Against the Python fake node, which has
# every chunk at hand and one GIL for all its threads, 16 give half of 2's 100 MB/s.
# The default stream mode uses neither.
CONNECTIONS = 16  # each with its own thread
DEPTH = 8  # requests written ahead of their responses, per connection
RETRIES = 3  # times one request is re-sent after its connection closed under it


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    will_close: bool  # the server closes the connection after this response


MAX_LINE = 8192
MAX_HEADERS = 100


def read_response(fp, limit: int, url: str) -> Response:
    """One response off a buffered reader: status line, headers, body of at most
    `limit` bytes (Content-Length or chunked; without either, up to the close).
    http.client cannot read pipelined responses (each HTTPResponse closes the reader),
    and its header parsing (the email package) costs more than hashing the chunk."""
    while True:
        line = fp.readline(MAX_LINE)
        if not line:
            raise ConnectionResetError("closed before a response")
        version, _, rest = line.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not rest[:3].isdigit():
            raise HttpError(f"{url}: not an HTTP/1.x answer: {line[:60]!r}")
        status = int(rest[:3])
        headers: dict[bytes, bytes] = {}
        for _ in range(MAX_HEADERS):
            h = fp.readline(MAX_LINE)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.partition(b":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise HttpError(f"{url}: more than {MAX_HEADERS} header lines")
        if status >= 200:
            break  # 1xx (100 Continue, 103 Early Hints): the real answer follows
    conn = headers.get(b"connection", b"").lower()
    will_close = conn == b"close" or (version == b"HTTP/1.0" and conn != b"keep-alive")
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        return Response(status, _read_chunked(fp, limit, url), will_close)
    length = headers.get(b"content-length")
    if length is None:
        body = fp.read(limit + 1)  # delimited by the close (RFC 9112 6.3)
        if len(body) > limit:
            raise HttpError(f"{url}: answer exceeds the {limit}-byte limit")
        return Response(status, body, True)
    if not length.isdigit() or int(length) > limit:
        raise HttpError(
            f"{url}: answer of {length[:20].decode(errors='replace')} bytes "
            f"exceeds the {limit}-byte limit"
        )
    body = fp.read(int(length))
    if len(body) < int(length):
        raise ConnectionLost(f"{url}: connection closed after {len(body)} of {int(length)} bytes")
    return Response(status, body, will_close)


def _read_chunked(fp, limit: int, url: str) -> bytes:
    out = bytearray()
    while True:
        size_line = fp.readline(MAX_LINE)
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise HttpError(f"{url}: broken chunked encoding ({size_line[:40]!r})") from None
        if size == 0:
            while fp.readline(MAX_LINE) not in (b"\r\n", b"\n", b""):
                pass  # trailer fields
            return bytes(out)
        if len(out) + size > limit:
            raise HttpError(f"{url}: answer exceeds the {limit}-byte limit")
        piece = fp.read(size + 2)
        if len(piece) < size + 2:
            raise ConnectionLost(f"{url}: connection closed inside a chunk")
        out += piece[:size]


class _Work(Generic[T]):
    """The shared queue: items not yet sent, and how many are still unfinished."""

    def __init__(self, items: Iterable[T], on_fail: Callable[[], None]) -> None:
        self.on_fail = on_fail
        self.todo: collections.deque[tuple[T, int]] = collections.deque((i, 0) for i in items)
        self.unfinished = len(self.todo)
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.handled = 0

    def take(self, wait: bool) -> tuple[T, int] | None:
        """The next item (and how often it was sent before); None when there is none
        now (wait=False), or none will ever come (all done, or an error)."""
        with self.cond:
            while True:
                if self.error is not None:
                    return None
                if self.todo:
                    return self.todo.popleft()
                if not wait or self.unfinished == 0:
                    return None
                self.cond.wait()

    def done(self, more: list[T]) -> None:
        with self.cond:
            self.todo.extend((i, 0) for i in more)
            self.unfinished += len(more) - 1
            self.handled += 1
            if more or self.unfinished == 0:
                self.cond.notify_all()

    def again(self, items: Iterable[tuple[T, int]]) -> None:
        """Items sent on a connection that closed before answering: first in line."""
        with self.cond:
            self.todo.extendleft(reversed(list(items)))
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            first = self.error is None
            if first:
                self.error = exc
            self.cond.notify_all()
        if first:
            self.on_fail()  # wake the threads blocked reading their own connections


class _Connection:
    def __init__(self, base: BaseUrl, timeout: float) -> None:
        self.base, self.timeout = base, timeout
        self.sock: socket.socket | None = None
        self.fp = None

    def open(self) -> None:
        try:
            sock = socket.create_connection((self.base.host, self.base.port), self.timeout)
            if self.base.scheme == "https":
                ctx = ssl.create_default_context()
                sock = ctx.wrap_socket(sock, server_hostname=self.base.host)
        except TimeoutError:
            raise ConnectionLost(
                f"cannot reach {self.base}: no answer within {self.timeout:g} s; "
                "is the node up and reachable?"
            ) from None
        except OSError as exc:
            raise ConnectionLost(
                f"cannot reach {self.base}: {exc.strerror or exc}; check the URL and network"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.fp = sock, sock.makefile("rb", buffering=1 << 16)

    def shutdown(self) -> None:
        """Make a read blocked on this connection (another thread's) return at once."""
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.sock is not None:
            self.shutdown()
            self.fp.close()
            self.sock.close()
        self.sock = self.fp = None


def get_all(
    base: BaseUrl,
    items: Iterable[T],
    path: Callable[[T], str],
    handle: Callable[[T, int, bytes], list[T]],
    *,
    limit: int,
    timeout: float = 30.0,
    connections: int = CONNECTIONS,
    depth: int = DEPTH,
) -> int:
    """GET path(item) for every item, and for every item handle() returns, pipelined.

    handle(item, status, body) runs on the connection's thread as each response
    arrives (in order per connection), bodies capped at `limit` bytes; what it raises
    stops everything and is raised here. Returns the number of responses handled."""
    conns = [_Connection(base, timeout) for _ in range(max(1, connections))]
    work: _Work[T] = _Work(items, lambda: [c.shutdown() for c in conns])
    threads = [
        threading.Thread(
            target=_run, args=(c, work, path, handle, limit, depth), name=f"pipe-{i}", daemon=True
        )
        for i, c in enumerate(conns)
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException as exc:  # KeyboardInterrupt: stop the others too
        work.fail(exc)
        raise
    if work.error is not None:
        raise work.error
    return work.handled


def _run(conn: _Connection, work: _Work, path, handle, limit: int, depth: int) -> None:
    inflight: collections.deque[tuple[object, int]] = collections.deque()
    try:
        while True:
            batch = []
            # Top up once half the window is answered: one send for many requests.
            while len(inflight) < depth and (len(inflight) <= depth // 2 or batch):
                got = work.take(wait=not inflight)
                if got is None:
                    break
                inflight.append(got)
                batch.append(_request(conn.base, path(got[0])))
            if not inflight:
                return  # nothing left for anyone (or another connection failed)
            if conn.sock is None:
                conn.open()  # (inflight was emptied when the last one closed: all in batch)
            try:
                if batch:
                    conn.sock.sendall(b"".join(batch))
                item = inflight[0][0]
                resp = read_response(conn.fp, limit, f"{conn.base}{path(item)}")
            except ConnectionError:
                if work.error is not None:
                    return  # shut down because another connection failed
                # Closed under us (idle timeout, a limit on requests per connection):
                # everything in flight goes again, on a fresh connection.
                conn.close()
                if any(sent + 1 >= RETRIES for _, sent in inflight):
                    raise ConnectionLost(
                        f"{conn.base}: connection closed by the server {RETRIES} times in a "
                        "row; is it overloaded?"
                    ) from None
                work.again((i, sent + 1) for i, sent in inflight)
                inflight.clear()
                continue
            except TimeoutError:
                raise ConnectionLost(
                    f"{conn.base}: no answer within {conn.timeout:g} s; "
                    "is the node up and reachable?"
                ) from None
            inflight.popleft()
            if resp.will_close:
                conn.close()  # answered, then closing: the rest goes again
                work.again(inflight)
                inflight.clear()
            work.done(handle(item, resp.status, resp.body))
    except BaseException as exc:
        work.fail(exc)
    finally:
        conn.close()


def _request(base: BaseUrl, path: str) -> bytes:
    host = f"[{base.host}]" if ":" in base.host else base.host
    default = 443 if base.scheme == "https" else 80
    if base.port != default:
        host = f"{host}:{base.port}"
    return (
        f"GET {base.path}{path} HTTP/1.1\r\nHost: {host}\r\n"
        f"User-Agent: {USER_AGENT}\r\nAccept: */*\r\n\r\n"
    ).encode()
