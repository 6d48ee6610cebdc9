"""SHA-256 of many blocks at once, through the small C helper `_sha256mb.c`.

A verified IPFS download checks every block against its CID, nearly always a SHA-256.
OpenSSL hashes one message at a time (~1.7 GB/s per core with SHA-NI here); a CAR batch
holds 16 or so blocks, and with AVX-512 the helper runs 16 of them side by side in the
vector lanes (~3.4 GB/s per core). Without the helper (no compiler at install time, no
AVX-512, or BOOTLINK_SHA256_HASHLIB set) `digests` uses hashlib: same results, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from collections.abc import Sequence

from .native import load_helper

# Fewer messages than this in a call: hashlib is faster than half-empty vector lanes.
MIN_LANES = 8


@functools.cache
def _library() -> tuple[ctypes.CDLL, int] | None:
    if os.environ.get("BOOTLINK_SHA256_HASHLIB"):  # lets the tests and benchmarks compare
        return None
    lib = load_helper(
        "_sha256mb",
        {
            "sha256_lanes_width": ([], ctypes.c_int),
            "sha256_lanes": ([ctypes.c_int] + [ctypes.c_void_p] * 3, ctypes.c_int),
        },
    )
    if lib is None:
        return None
    width = lib.sha256_lanes_width()
    return (lib, width) if width >= MIN_LANES else None


def width() -> int:
    """Messages hashed side by side here; 0 when hashlib does the work."""
    found = _library()
    return found[1] if found else 0


def digests(buf, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """SHA-256 of buf[start:end] for each (start, end) in spans, in that order.

    `buf` is a bytes-like object the caller keeps alive and unchanged for the call
    (writable ones, such as an mmap or bytearray, are shared with the helper, not
    copied). Spans of similar length share a call, so that no lane idles for long."""
    found = _library()
    out: list[bytes] = [b""] * len(spans)
    if found is None or len(spans) < MIN_LANES:
        view = memoryview(buf)
        for i, (start, end) in enumerate(spans):
            out[i] = hashlib.sha256(view[start:end]).digest()
        return out
    lib, lanes = found
    view = memoryview(buf)
    if any(not 0 <= start <= end <= view.nbytes for start, end in spans):
        raise ValueError("a span lies outside the buffer")  # C would read past its end
    base, shared = _address_of(buf)
    order = sorted(range(len(spans)), key=lambda i: spans[i][1] - spans[i][0])
    for first in range(0, len(order), lanes):
        group = order[first : first + lanes]
        if len(group) < MIN_LANES:
            for i in group:
                out[i] = hashlib.sha256(view[spans[i][0] : spans[i][1]]).digest()
            continue
        n = len(group)
        pointers = (ctypes.c_void_p * n)(*(base + spans[i][0] for i in group))
        lengths = (ctypes.c_size_t * n)(*(spans[i][1] - spans[i][0] for i in group))
        raw = ctypes.create_string_buffer(32 * n)
        if lib.sha256_lanes(n, pointers, lengths, raw) != 0:
            raise RuntimeError("sha256_lanes refused its arguments")  # a bug, not bad input
        result = raw.raw
        for k, i in enumerate(group):
            out[i] = result[32 * k : 32 * k + 32]
    del shared  # release the buffer export before the caller may close or resize it
    return out


def _address_of(buf) -> tuple[int, object]:
    """The address of buf's first byte, and what keeps it valid: for a writable buffer
    a ctypes array sharing its memory (an export: the buffer cannot be resized or closed
    while it lives), for bytes the bytes themselves."""
    if isinstance(buf, bytes):
        return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value or 0, buf
    view = memoryview(buf)
    if view.readonly or not view.contiguous:
        raise ValueError("digests() needs bytes or a writable contiguous buffer")
    shared = (ctypes.c_char * view.nbytes).from_buffer(view)
    return ctypes.addressof(shared), shared
