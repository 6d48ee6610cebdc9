"""Pipelined GETs (client/sources/_pipeline.py) against a raw HTTP/1.1 server that answers
requests in order, the way Go's net/http does, and misbehaves on demand: closes after a
few answers (with and without saying so), answers chunked or after a 100 Continue,
sends too much, or nothing at all."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from bootlink.client.sources import _pipeline
from bootlink.client.sources._http import BaseUrl, HttpError


class RawServer:
    """One thread per connection; answers each request line with `respond(path, n)`,
    n = requests answered on this connection before; None from it closes at once."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = BaseUrl.parse(f"http://127.0.0.1:{self.sock.getsockname()[1]}")
        self.connections = 0
        self.requests = 0
        self.stop = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        fp = conn.makefile("rb")
        n = 0
        try:
            while True:
                line = fp.readline()
                if not line:
                    return
                while fp.readline() not in (b"\r\n", b""):
                    pass
                self.requests += 1
                answer = self.respond(line.split()[1].decode(), n)
                n += 1
                if answer is None:
                    return
                conn.sendall(answer)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.acceptor.join()
        self.sock.close()


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@pytest.fixture
def serve():
    servers = []

    def make(respond) -> RawServer:
        servers.append(RawServer(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def fetch_tree(url: BaseUrl, **kw) -> dict[str, bytes]:
    """/n/<k> for k < 300; every /n/<k> with k < 30 asks for /n/<10k+1>..<10k+9> too."""
    got: dict[str, bytes] = {}
    lock = threading.Lock()

    def handle(item: int, status: int, body: bytes) -> list[int]:
        assert status == 200
        with lock:
            assert f"/n/{item}" not in got, "handled twice"
            got[f"/n/{item}"] = body
        return [10 * item + i for i in range(1, 10)] if item < 30 else []

    n = _pipeline.get_all(url, [0], lambda k: f"/n/{k}", handle, limit=1000, **kw)
    assert n == len(got)
    return got


def expected() -> set[str]:
    want, todo = set(), [0]
    while todo:
        k = todo.pop()
        want.add(f"/n/{k}")
        if k < 30:
            todo += [10 * k + i for i in range(1, 10)]
    return want


def test_dynamic_work_all_fetched_with_requests_written_ahead(serve):
    srv = serve(lambda path, n: ok(path.encode()))
    got = fetch_tree(srv.url, connections=2, depth=16)
    assert set(got) == expected()
    assert all(body == path.encode() for path, body in got.items())
    # keep-alive: at most one connection per thread (under load one thread may drain
    # all the work before the other has asked for any, so possibly just one)
    assert 1 <= srv.connections <= 2


@pytest.mark.parametrize("say_so", [True, False])
def test_server_closing_after_a_few_answers_gets_the_rest_again(serve, say_so):
    """Like a server with a limit on requests per connection: with `Connection: close`
    on the last answer, or just closing (requests in flight unanswered)."""

    def respond(path: str, n: int):
        if n == 5:
            return ok(path.encode(), "Connection: close\r\n") if say_so else None
        return ok(path.encode())

    srv = serve(respond)
    got = fetch_tree(srv.url, connections=2, depth=8)
    assert set(got) == expected()
    assert srv.connections > 10


def test_chunked_bodies_and_100_continue(serve):
    def respond(path: str, n: int):
        body = path.encode()
        head = b"HTTP/1.1 100 Continue\r\n\r\n" if n % 2 else b""
        return head + (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x;ext=1\r\n%s\r\n" % (2, body[:2])
            + b"%x\r\n%s\r\n0\r\nTrailer: x\r\n\r\n" % (len(body) - 2, body[2:])
        )

    srv = serve(respond)
    got = fetch_tree(srv.url, connections=1, depth=4)
    assert all(body == path.encode() for path, body in got.items())


def test_oversized_answer_is_one_line_naming_the_limit(serve):
    srv = serve(lambda path, n: ok(b"x" * 2000))
    with pytest.raises(HttpError, match=r"/n/0: answer of 2000 bytes exceeds the 1000-byte"):
        fetch_tree(srv.url)


def test_handler_error_stops_everything_and_is_raised(serve):
    srv = serve(lambda path, n: ok(b"bad" if path == "/n/17" else b"fine"))

    def handle(item, status, body):
        if body == b"bad":
            raise ValueError(f"item {item} is bad")
        return [10 * item + i for i in range(1, 10)] if item < 30 else []

    with pytest.raises(ValueError, match="item 17 is bad"):
        _pipeline.get_all(srv.url, [0], lambda k: f"/n/{k}", handle, limit=100)
    assert srv.requests < 300


def test_server_that_always_closes_is_an_error_not_a_loop(serve):
    srv = serve(lambda path, n: None)
    with pytest.raises(HttpError, match="closed by the server 3 times"):
        fetch_tree(srv.url, connections=1)
    assert srv.connections == 3


def test_silent_server_times_out_with_one_line(serve):
    srv = serve(lambda path, n: time.sleep(5) or None)
    t = time.monotonic()
    with pytest.raises(HttpError, match=r"no answer within 0.3 s"):
        fetch_tree(srv.url, timeout=0.3)
    assert time.monotonic() - t < 3


def test_nothing_listening_is_one_line():
    sock = socket.create_server(("127.0.0.1", 0))
    url = BaseUrl.parse(f"http://127.0.0.1:{sock.getsockname()[1]}")
    sock.close()
    with pytest.raises(HttpError, match=r"cannot reach .*check the URL"):
        fetch_tree(url)
