"""Finding bootlink's optional C helpers (plain C shared objects loaded with ctypes).

Each helper is optional: setup.py builds it when a compiler is there, and its Python
module falls back to a library (OpenSSL, hashlib, pycryptodome) when it is not found.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

# name -> (argument types, result type) of each function a module calls
Signatures = dict[str, tuple[list, type | None]]


def load_helper(stem: str, functions: Signatures) -> ctypes.CDLL | None:
    """The built helper `common/<stem>*.so` with `functions` typed, or None: not built,
    or a stale build from an older bootlink that lacks one of them. ctypes calls into
    it release the GIL, so worker threads run it in parallel."""
    for candidate in sorted(Path(__file__).resolve().parent.glob(f"{stem}*.so")):
        try:
            lib = ctypes.CDLL(str(candidate))
        except OSError:
            continue
        if not all(hasattr(lib, name) for name in functions):
            continue
        for name, (argtypes, restype) in functions.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
        return lib
    return None
