"""The fake nodes' scatter-gather send: every byte of every part, in order, also when
the socket takes only part of a batch (small send buffer, slow reader) and across the
IOV_MAX batch limit."""

import socket
import threading

from fakes import _send
from hypothesis import given, settings
from hypothesis import strategies as st


def received_after_sending(parts: list) -> bytes:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # short sends, often
    got = bytearray()

    def reader() -> None:
        while block := b.recv(1000):
            got.extend(block)

    t = threading.Thread(target=reader)
    t.start()
    try:
        _send.send_parts(a, parts)
    finally:
        a.close()
        t.join(10)
        b.close()
    return bytes(got)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=9000), max_size=40))
def test_every_byte_arrives_in_order(parts):
    views = [memoryview(p) if i % 2 else p for i, p in enumerate(parts)]
    assert received_after_sending(views) == b"".join(parts)


def test_more_parts_than_one_sendmsg_takes():
    parts = [bytes([i % 251]) * 7 for i in range(_send.IOV_MAX * 2 + 5)]
    assert received_after_sending(parts) == b"".join(parts)
