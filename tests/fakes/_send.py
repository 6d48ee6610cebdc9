"""Scatter-gather sending for the fake nodes: stored blocks go out as they are.

Joining them into one buffer in Python first, or wrapping each in a memoryview and
popping them off a list, costs the fake node more CPU than the client spends receiving,
on the same two cores: the benchmarks would measure the fake. A real Bee or kubo sends
from its store without Python in the way.
"""

from __future__ import annotations

import socket

IOV_MAX = 1024  # Linux's limit on buffers per sendmsg


def send_parts(sock: socket.socket, parts: list) -> None:
    """sendall for a list of buffers (bytes or byte memoryviews), IOV_MAX per call."""
    i = 0
    rest = None  # what is left of parts[i] after a short send
    while i < len(parts):
        batch = parts[i : i + IOV_MAX]
        if rest is not None:
            batch[0] = rest
        sent = sock.sendmsg(batch)
        rest = None
        for buf in batch:
            if sent < len(buf):
                rest = memoryview(buf)[sent:]
                break
            sent -= len(buf)
            i += 1
