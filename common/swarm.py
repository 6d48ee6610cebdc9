"""Swarm content addressing: BMT chunk addresses and file references, offline.

A Swarm file is cut into 4096-byte data chunks. A chunk's address is
`keccak256(u64le(span) || bmt_root(payload zero-padded to 4096))`, where the BMT is a
binary Merkle tree of keccak256 over the 128 32-byte segments. Intermediate chunks hold
up to 128 child addresses and their span is the number of file bytes below them. When a
level ends with a single child, that child is carried up unwrapped (bee's hashtrie), so
a one-chunk file's reference is its data chunk's address.

keccak256 is the original Keccak padding (0x01), which is *not* `hashlib.sha3_256`. A
small C library (`_bmt.c`, built by setup.py when a compiler is there) computes chunk
addresses 25-150x faster than pycryptodome (SIMD, several chunks side by side, the
variant picked for the CPU at load time) and runs without the GIL; without it we fall
back to pycryptodome (Debian's python3-pycryptodome is `Cryptodome`, PyPI's is `Crypto`).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BootlinkError
from .native import load_helper

CHUNK_SIZE = 4096
SEGMENT_SIZE = 32
REF_SIZE = 32
BRANCHES = CHUNK_SIZE // REF_SIZE  # 128 children per intermediate chunk
SPAN_SIZE = 8

# (address, span, payload) for every chunk a file produces, leaves and intermediates.
ChunkSink = Callable[[bytes, int, bytes], None]


def _load_pycryptodome_keccak():
    try:
        from Cryptodome.Hash import keccak  # Debian: python3-pycryptodome
    except ImportError:
        try:
            from Crypto.Hash import keccak  # PyPI: pycryptodome
        except ImportError:
            return None
    return keccak


def _load_c_library() -> ctypes.CDLL | None:
    if os.environ.get("BOOTLINK_SWARM_PURE_PYTHON"):
        return None
    # c_void_p: bytes (leaf_addresses) and ctypes arrays over bytearrays (_into) alike
    c = ctypes
    return load_helper(
        "_bmt",
        {
            "bmt_chunk_address": ([c.c_uint64, c.c_char_p, c.c_size_t, c.c_char_p], c.c_int),
            "bmt_keccak256": ([c.c_char_p, c.c_size_t, c.c_char_p], None),
            "bmt_leaf_addresses": ([c.c_void_p, c.c_size_t, c.c_void_p], None),
            "bmt_chunk_addresses": (
                [c.c_void_p, c.c_size_t, c.c_uint64, c.c_uint64, c.c_void_p],
                None,
            ),
            "bmt_set_impl": ([c.c_int], c.c_int),
            "bmt_impl_name": ([], c.c_char_p),
        },
    )


_LIB = _load_c_library()
_KECCAK = _load_pycryptodome_keccak()


# The C library's SIMD variants, in the order of bmt_set_impl's numbers (0 = best here).
C_IMPLS = ("portable", "avx2", "avx512")


def backend() -> str:
    """Which keccak implementation is in use (for logs and the benchmark)."""
    if _LIB is not None:
        return "c/" + _LIB.bmt_impl_name().decode()
    return "pycryptodome" if _KECCAK is not None else "none"


def c_impls() -> list[str]:
    """The C library's variants this CPU can run (for the tests); [] without the library."""
    if _LIB is None:
        return []
    current = _LIB.bmt_impl_name().decode()
    ok = [name for i, name in enumerate(C_IMPLS, 1) if _LIB.bmt_set_impl(i) == i]
    _LIB.bmt_set_impl(C_IMPLS.index(current) + 1)
    return ok


def use_c_impl(name: str | None) -> None:
    """Switch the C library to variant `name` (None: the best one); not while hashing."""
    if _LIB is None:
        raise BootlinkError("the C BMT helper is not built; reinstall bootlink with gcc present")
    which = 0 if name is None else C_IMPLS.index(name) + 1
    if _LIB.bmt_set_impl(which) < 0:
        raise BootlinkError(f"this CPU cannot run the {name} BMT variant")


def _need_keccak():
    if _KECCAK is None:
        raise BootlinkError(
            "Swarm needs keccak256: install Debian's python3-pycryptodome "
            "or 'pip install pycryptodome' (or build bootlink's _bmt C helper)"
        )
    return _KECCAK


def keccak256(data: bytes) -> bytes:
    if _LIB is not None:
        out = ctypes.create_string_buffer(32)
        _LIB.bmt_keccak256(data, len(data), out)
        return out.raw
    return _need_keccak().new(digest_bits=256, data=data).digest()


def bmt_root_py(payload: bytes) -> bytes:
    """BMT root of one chunk payload, in Python (reference for the C version)."""
    keccak = _need_keccak()
    data = payload.ljust(CHUNK_SIZE, b"\0")
    level = [
        keccak.new(digest_bits=256, data=data[i : i + 2 * SEGMENT_SIZE]).digest()
        for i in range(0, CHUNK_SIZE, 2 * SEGMENT_SIZE)
    ]
    while len(level) > 1:
        level = [
            keccak.new(digest_bits=256, data=level[i] + level[i + 1]).digest()
            for i in range(0, len(level), 2)
        ]
    return level[0]


def chunk_address_py(span: int, payload: bytes) -> bytes:
    return keccak256(span.to_bytes(SPAN_SIZE, "little") + bmt_root_py(payload))


def chunk_address(span: int, payload: bytes) -> bytes:
    """The address of a content-addressed chunk (span = file bytes below it)."""
    if len(payload) > CHUNK_SIZE:
        raise ValueError(f"a Swarm chunk payload is at most {CHUNK_SIZE} bytes, got {len(payload)}")
    if _LIB is not None:
        out = ctypes.create_string_buffer(32)
        _LIB.bmt_chunk_address(span, payload, len(payload), out)
        return out.raw
    return chunk_address_py(span, payload)


def leaf_addresses(data: bytes) -> bytes:
    """Concatenated addresses of the data chunks `data` splits into (file order)."""
    n = -(-len(data) // CHUNK_SIZE)
    if _LIB is not None:
        out = ctypes.create_string_buffer(32 * n)
        _LIB.bmt_leaf_addresses(ctypes.c_char_p(data), len(data), out)
        return out.raw
    return b"".join(
        chunk_address(len(data[i : i + CHUNK_SIZE]), data[i : i + CHUNK_SIZE])
        for i in range(0, len(data), CHUNK_SIZE)
    )


def leaf_addresses_into(data, start: int, length: int, out: bytearray, out_offset: int) -> None:
    """leaf_addresses of data[start:start+length], written into out[out_offset:], no copies.

    `data` is any writable buffer (bytearray, mmap). For the streaming verifier: the C
    helper hashes straight from where the bytes were received into the result array,
    without the GIL, so worker threads do the whole job.
    """
    n = -(-length // CHUNK_SIZE)
    if len(data) < start + length or len(out) < out_offset + 32 * n:
        raise ValueError("leaf_addresses_into: buffer too small")
    if _LIB is None:
        out[out_offset : out_offset + 32 * n] = leaf_addresses(bytes(data[start : start + length]))
        return
    if n == 0:
        return
    src = (ctypes.c_char * length).from_buffer(data, start)
    dst = (ctypes.c_char * (32 * n)).from_buffer(out, out_offset)
    _LIB.bmt_leaf_addresses(src, length, dst)
    del src, dst  # release the buffer exports now (an mmap cannot close while exported)


def parse_reference(text: str) -> bytes:
    """A 64-hex-digit Swarm reference (optionally 0x-prefixed) as 32 bytes."""
    t = text.strip().lower().removeprefix("0x")
    if len(t) == 128:
        raise BootlinkError(
            f"swarm reference {text[:16]}... is 64 bytes (encrypted upload): bootlink "
            "verifies only unencrypted references; publish without Swarm-Encrypt"
        )
    try:
        ref = bytes.fromhex(t)
    except ValueError:
        ref = b""
    if len(ref) != REF_SIZE:
        raise BootlinkError(
            f"'{text}' is not a Swarm reference: expected 64 hex digits "
            "(as printed by 'bootlink ref swarm FILE')"
        )
    return ref


@dataclass
class TreeBuilder:
    """Streaming Swarm file splitter: feed bytes, get the root reference.

    Every chunk produced (data and intermediate) goes to `sink`, so the same code
    computes offline references, feeds a test Bee node, and checks uploads.
    """

    sink: ChunkSink | None = None
    _buf: bytearray = field(default_factory=bytearray)
    _levels: list[list[tuple[bytes, int]]] = field(default_factory=lambda: [[]])
    _total: int = 0

    def update(self, data: bytes) -> None:
        # A full chunk is emitted only once more data follows it: the last chunk stays
        # buffered for finish() (an empty file, too, becomes one chunk there).
        self._total += len(data)
        view = memoryview(data)
        pos = 0
        if self._buf:
            pos = min(CHUNK_SIZE - len(self._buf), len(view))
            self._buf += view[:pos]
            if pos == len(view):
                return
            self._leaf(bytes(self._buf))
            self._buf.clear()
        rest = len(view) - pos
        end = pos + (rest - 1) // CHUNK_SIZE * CHUNK_SIZE
        for off in range(pos, end, CHUNK_SIZE):
            self._leaf(bytes(view[off : off + CHUNK_SIZE]))
        self._buf += view[end:]

    def _leaf(self, payload: bytes) -> None:
        addr = chunk_address(len(payload), payload)
        if self.sink:
            self.sink(addr, len(payload), payload)
        self._push(0, addr, len(payload))

    def _push(self, level: int, addr: bytes, span: int) -> None:
        while len(self._levels) <= level:
            self._levels.append([])
        self._levels[level].append((addr, span))
        if len(self._levels[level]) == BRANCHES:
            self._wrap(level)

    def _wrap(self, level: int) -> None:
        children = self._levels[level]
        self._levels[level] = []
        payload = b"".join(a for a, _ in children)
        span = sum(s for _, s in children)
        addr = chunk_address(span, payload)
        if self.sink:
            self.sink(addr, span, payload)
        self._push(level + 1, addr, span)

    def finish(self) -> bytes:
        """Flush the last chunk and the partial levels; return the root reference."""
        if self._buf or self._total == 0:
            self._leaf(bytes(self._buf))
            self._buf.clear()
        level = 0
        while True:
            higher = any(self._levels[i] for i in range(level + 1, len(self._levels)))
            entries = self._levels[level]
            if not higher and len(entries) == 1:
                return entries[0][0]
            if len(entries) == 1:
                # A lone trailing child is carried up unwrapped, as bee's hashtrie does.
                self._levels[level] = []
                self._push(level + 1, *entries[0])
            elif entries:
                self._wrap(level)
            level += 1

    @property
    def size(self) -> int:
        return self._total


def reference_of_bytes(data: bytes, sink: ChunkSink | None = None) -> bytes:
    tb = TreeBuilder(sink)
    tb.update(data)
    return tb.finish()


def reference_of_file(path: Path, sink: ChunkSink | None = None, progress=None) -> bytes:
    tb = TreeBuilder(sink)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            tb.update(block)
            if progress is not None:
                progress.advance(len(block))
    return tb.finish()


def chunk_addresses(payloads: bytes, chunk_span: int, total: int) -> bytes:
    """Concatenated addresses of the chunks whose payloads are cut from `payloads`.

    `payloads` is cut into 4096-byte payloads (the last may be shorter); chunk i spans
    min(chunk_span, total - i * chunk_span) file bytes. Data chunks: chunk_span 4096,
    total = len(payloads) (that is leaf_addresses). A level of intermediate chunks:
    their child addresses back to back, chunk_span = the bytes under a full one.
    """
    n = -(-len(payloads) // CHUNK_SIZE)
    if n and not (n - 1) * chunk_span < total <= n * chunk_span:
        raise ValueError(f"{n} chunks of span {chunk_span} do not fit {total} bytes")
    if _LIB is not None:
        out = ctypes.create_string_buffer(32 * n)
        _LIB.bmt_chunk_addresses(ctypes.c_char_p(payloads), len(payloads), chunk_span, total, out)
        return out.raw
    return b"".join(
        chunk_address(min(chunk_span, total - i * chunk_span), payloads[off : off + CHUNK_SIZE])
        for i, off in enumerate(range(0, len(payloads), CHUNK_SIZE))
    )


def reference_from_leaves(
    addrs: bytes | bytearray, size: int, sink: ChunkSink | None = None
) -> bytes:
    """The file reference, given the addresses of its data chunks (as leaf_addresses gives).

    Builds the intermediate chunks from them exactly as TreeBuilder does (groups of 128;
    a lone trailing child carried up unwrapped), but level by level on byte slices: a
    group of 128 consecutive addresses *is* its parent chunk's payload, so a whole level
    is hashed in one chunk_addresses call. Intermediate chunks go to `sink`.
    """
    n = len(addrs) // REF_SIZE
    if n == 0 or len(addrs) != n * REF_SIZE or not (n - 1) * CHUNK_SIZE < size <= n * CHUNK_SIZE:
        raise ValueError(f"{n} chunk addresses do not fit a {size}-byte file")
    level = bytes(addrs)
    child_span = CHUNK_SIZE  # file bytes under each child but the last
    while n > 1:
        span = child_span * BRANCHES
        groups = -(-n // BRANCHES)
        lone = groups > 1 and n % BRANCHES == 1  # carried up as it is, not wrapped
        wrapped = level[: REF_SIZE * (n - lone)]
        up = chunk_addresses(wrapped, span, min(size, (groups - lone) * span))
        if sink:
            for g in range(groups - lone):
                addr = up[REF_SIZE * g : REF_SIZE * (g + 1)]
                sink(
                    addr, min(span, size - g * span), wrapped[CHUNK_SIZE * g : CHUNK_SIZE * (g + 1)]
                )
        level = up + level[REF_SIZE * (n - lone) :]
        n, child_span = groups, span
    return level


def subtree_size(span: int) -> int:
    """Bytes covered by each full child of an intermediate chunk spanning `span` bytes."""
    size = CHUNK_SIZE
    while size * BRANCHES < span:
        size *= BRANCHES
    return size


def children_layout(span: int, payload_len: int) -> Iterator[tuple[int, int]]:
    """(offset, span) of each child of an intermediate chunk, checking the shape.

    Raises ValueError when the payload cannot be the child list of such a chunk, so a
    malformed tree is refused before any child is requested.
    """
    sub = subtree_size(span)
    count = -(-span // sub)
    if payload_len != count * REF_SIZE:
        raise ValueError(
            f"intermediate chunk spanning {span} bytes must list {count} references, "
            f"has {payload_len / REF_SIZE:g}"
        )
    for i in range(count):
        yield i * sub, min(sub, span - i * sub)


def unpack_chunk(data: bytes) -> tuple[int, bytes]:
    """Split the Bee API's chunk wire form (u64le span || payload)."""
    if len(data) < SPAN_SIZE or len(data) > SPAN_SIZE + CHUNK_SIZE:
        raise ValueError(f"a chunk is 8..4104 bytes on the wire, got {len(data)}")
    return int.from_bytes(data[:SPAN_SIZE], "little"), data[SPAN_SIZE:]


def pack_chunk(span: int, payload: bytes) -> bytes:
    return span.to_bytes(SPAN_SIZE, "little") + payload
