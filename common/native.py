"""Finding bootlink's optional C helpers (plain C shared objects loaded with ctypes).

Each helper is optional: setup.py builds it when a compiler is there, and its Python
module falls back to a library (OpenSSL, hashlib, pycryptodome) when it is not found.
"""

from __future__ import annotations

import ctypes
from pathlib import Path


def load_helper(stem: str) -> ctypes.CDLL | None:
    """The built helper `common/<stem>*.so`, or None. ctypes calls into it release the
    GIL, so worker threads run it in parallel."""
    for candidate in sorted(Path(__file__).resolve().parent.glob(f"{stem}*.so")):
        try:
            return ctypes.CDLL(str(candidate))
        except OSError:
            continue
    return None
