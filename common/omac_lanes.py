"""CBC-MAC chains of up to 8 messages at once, through the small C helper `_omac.c`.

EAX's OMAC is a CBC chain, one AES call after another: through OpenSSL one core does
~1.5 GB/s, a sixth of what AES-CTR does. Interleaving the chains of several frames lets
AES-NI work on all of them at once (~9 GB/s here). Only the chaining is native; eax.py
does OMAC's first and last blocks with OpenSSL, and the tests check the result against
cryptography's CMAC. Without the helper (no compiler at install time, or no AES-NI)
`chain` returns None and eax.py uses OpenSSL's CBC.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence

from .native import load_helper

LANES = 8  # MAX_LANES in _omac.c: eight AESENCs in flight hide the instruction's latency
BLOCK = 16


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("BOOTLINK_OMAC_OPENSSL"):  # lets the tests and benchmarks compare
        return None
    lib = load_helper(
        "_omac",
        {
            "omac_available": ([], ctypes.c_int),
            "omac_cbc_lanes": (
                [ctypes.c_char_p, ctypes.c_int] + [ctypes.c_void_p] * 3,
                ctypes.c_int,
            ),
        },
    )
    return lib if lib is not None and lib.omac_available() == 1 else None


def available() -> bool:
    return _library() is not None


def chain(key: bytes, start: bytes, bodies: Sequence[memoryview]) -> list[bytes] | None:
    """The CBC-MAC state after each body (a whole number of 16-byte blocks, writable
    buffers such as views of a bytearray), every chain starting from `start`, under the
    AES-128 `key`. None when the helper cannot do it (no library, another key size, a
    read-only buffer): the caller then chains with OpenSSL."""
    lib = _library()
    if lib is None or len(key) != 16 or any(m.readonly for m in bodies):
        return None
    out: list[bytes] = []
    for first in range(0, len(bodies), LANES):
        group = bodies[first : first + LANES]
        n = len(group)
        # from_buffer shares the memory (no copy) and keeps it alive for the call
        arrays = [(ctypes.c_char * len(m)).from_buffer(m) for m in group]
        pointers = (ctypes.c_void_p * n)(*map(ctypes.addressof, arrays))
        blocks = (ctypes.c_size_t * n)(*(len(m) // BLOCK for m in group))
        state = ctypes.create_string_buffer(start * n, BLOCK * n)
        if lib.omac_cbc_lanes(key, n, pointers, blocks, state) != 0:
            return None
        raw = state.raw
        out.extend(raw[BLOCK * j : BLOCK * (j + 1)] for j in range(n))
        del arrays  # release the exports before the caller may resize its buffers
    return out
