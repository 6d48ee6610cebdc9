"""Swarm source: fetch a file chunk by chunk from a Bee node and verify every chunk.

The Bee node is not trusted. Each chunk is requested as `GET /chunks/{address}` (128 in
flight, pipelined on 16 keep-alive connections: _pipeline.py), and its address is
recomputed from the span and payload received (BMT/keccak256, `common/swarm.py`). A
chunk that does not hash to the address we asked for is refused, naming the chunk and
the node. The tree's shape is checked too (each child's span is implied by its
parent's), so a node cannot truncate or pad the file. Data chunks are written at their
offsets as they arrive.

Two modes, both verifying every chunk against its address:
- `chunks`: every chunk, data chunks included, via `/chunks/{addr}`;
- `stream` (default): the data as one `GET /bytes/{ref}` stream, cut into its 4 KiB
  chunks, each hashed (in parallel, the C helper runs without the GIL); the
  intermediate chunks are rebuilt from those addresses up to the root, which must be
  the reference asked for. One request instead of one per 4 KiB. If it is not, the
  intermediate chunks are fetched via `/chunks/{addr}` (each verified) to name the bad
  chunk.

Publishing (`upload_file`) uses `POST /bytes` with `Swarm-Redundancy-Level: 0` so the
reference is the plain BMT root we computed offline, and checks that it is.
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bootlink.common import swarm
from bootlink.common.errors import BootlinkError, Interrupted, ProtocolError
from bootlink.common.log import Progress
from bootlink.common.output_file import OutputFile

from . import _pipeline
from ._http import HttpClient, HttpError, TooLarge, error_text

log = logging.getLogger("bootlink.sources.swarm")

DEFAULT_WORKERS = 128  # chunk requests in flight, pipelined over _pipeline.CONNECTIONS
STREAM_BLOCK = 1 << 20  # bytes received and written per buffer in stream mode
MODES = ("stream", "chunks")


class SwarmChunkError(ProtocolError):
    """A Bee node sent a chunk that is not the one asked for (or none)."""


class SwarmStreamBroken(SwarmChunkError, Interrupted):
    """The node's answer broke off or never came (a cable pulled, the node gone)."""


@dataclass(frozen=True)
class SwarmFetch:
    reference: bytes
    size: int
    chunks: int
    bee: str

    @property
    def verified_by(self) -> str:
        return f"swarm BMT: all {self.chunks} chunks hash to their addresses"


class BeeClient:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.http = HttpClient(url, timeout, what="Bee API URL")
        self.url = str(self.http.base)

    def chunk(self, addr: bytes) -> tuple[int, bytes]:
        """Fetch one chunk and prove it is the chunk at `addr`; (span, payload)."""
        status, body = self.http.get_bounded(
            f"/chunks/{addr.hex()}", swarm.SPAN_SIZE + swarm.CHUNK_SIZE
        )
        return verified_chunk(addr, status, body, self.url)

    def each_chunk(
        self,
        items: list[tuple],
        handle: Callable[[tuple, int, bytes], list[tuple]],
        in_flight: int = DEFAULT_WORKERS,
    ) -> int:
        """GET /chunks/{item[0]} for every item, and every item handle() returns, with
        `in_flight` requests pipelined over a few connections (_pipeline.py).
        handle(item, span, payload) gets each chunk once it is proven to be the chunk
        at its address; the number of chunks handled."""
        connections = max(1, min(_pipeline.CONNECTIONS, in_flight))
        return _pipeline.get_all(
            self.http.base,
            items,
            lambda item: f"/chunks/{item[0].hex()}",
            lambda item, status, body: handle(
                item, *verified_chunk(item[0], status, body, self.url)
            ),
            limit=swarm.SPAN_SIZE + swarm.CHUNK_SIZE,
            timeout=self.http.timeout,
            connections=connections,
            depth=max(1, in_flight // connections),
        )

    def close(self) -> None:
        self.http.close()


def verified_chunk(addr: bytes, status: int, body: bytes, url: str) -> tuple[int, bytes]:
    """(span, payload) of the answer to GET /chunks/{addr}, proven to be that chunk."""
    if status == 404:
        raise SwarmChunkError(
            f"swarm chunk {addr.hex()} not found on {url}: the node cannot "
            "retrieve it (not uploaded, or not synced yet); try later or another --bee"
        )
    if status != 200:
        raise SwarmChunkError(
            f"swarm chunk {addr.hex()} from {url}: HTTP {status} "
            f"{error_text(body)}; try another --bee"
        )
    try:
        span, payload = swarm.unpack_chunk(body)
    except ValueError as exc:
        raise SwarmChunkError(
            f"swarm chunk {addr.hex()} from {url} is malformed ({exc}): "
            "the node is lying or corrupt; try another --bee"
        ) from None
    if swarm.chunk_address(span, payload) != addr:
        raise SwarmChunkError(
            f"swarm chunk {addr.hex()} from {url} does not hash to its address: "
            "the node is lying or corrupt; try another --bee"
        )
    return span, payload


def _redundancy_level(span: int) -> int:
    """The erasure-coding level Bee encodes in the top byte of an intermediate chunk's
    span (pkg/file/redundancy/span.go: level | 0x80), or 0. The chunk hashes as it
    is; the tree under it would also hold parity references."""
    top = span >> 56
    return top & 0x7F if top > 0x80 else 0


def fetch(
    reference: bytes,
    bee_url: str,
    output: Path,
    *,
    workers: int = DEFAULT_WORKERS,
    timeout: float = 30.0,
    progress: bool = True,
    max_size: int = 1 << 36,
    label: str | None = None,
    mode: str = "stream",
) -> SwarmFetch:
    """Download the file at `reference` into `output`, verifying every chunk.

    `output` is written via a temporary name and renamed only when complete and verified.
    """
    if mode not in MODES:
        raise BootlinkError(f"swarm fetch mode must be one of {', '.join(MODES)}, not {mode!r}")
    bee = BeeClient(bee_url, timeout)
    root_span, root_payload = bee.chunk(reference)
    level = _redundancy_level(root_span)
    if level:
        raise SwarmChunkError(
            f"swarm:{reference.hex()} was uploaded with erasure coding (redundancy level "
            f"{level}, Bee's default for uploads without Swarm-Redundancy-Level): bootlink "
            "reads files uploaded without it; publish with 'bootlink publish --to swarm' or "
            "Swarm-Redundancy-Level: 0"
        )
    if root_span > max_size:
        raise TooLarge(
            f"swarm:{reference.hex()} claims {root_span} bytes, over the {max_size}-byte "
            "limit for a boot file; is this the right reference?"
        )
    prog = Progress(label or f"swarm {reference.hex()[:12]}", root_span) if progress else None
    count = 1
    with OutputFile(output, size=root_span) as out:
        out.truncate(root_span)
        if root_span <= swarm.CHUNK_SIZE:
            _write_leaf(out, reference, 0, root_span, root_payload, bee.url)
            if prog:
                prog.advance(root_span)
        elif mode == "stream":
            count = _fetch_stream(bee, out, reference, root_span, root_payload, workers, prog)
        else:
            count = _fetch_tree(bee, out, reference, root_span, root_payload, workers, prog)
        out.commit()
    if prog:
        prog.finish()
    return SwarmFetch(reference, root_span, count, bee.url)


def _write_leaf(
    out: OutputFile, addr: bytes, offset: int, span: int, payload: bytes, url: str
) -> None:
    if len(payload) != span:
        raise SwarmChunkError(
            f"swarm chunk {addr.hex()} from {url} is a data chunk of span {span} with "
            f"{len(payload)} bytes: the tree is malformed; the reference is not a plain file"
        )
    out.pwrite(payload, offset)


def _fetch_tree(
    bee: BeeClient,
    out: OutputFile,
    root: bytes,
    span: int,
    payload: bytes,
    workers: int,
    prog: Progress | None,
) -> int:
    """Every chunk via /chunks/{addr}, pipelined on a few connections (_pipeline.py):
    each response is verified as it arrives; a data chunk is written at its offset,
    an intermediate chunk's children are requested next."""
    lock = threading.Lock()

    def handle(item: tuple[bytes, int, int], got_span: int, got: bytes) -> list[tuple]:
        addr, offset, expected = item
        if got_span != expected:
            raise SwarmChunkError(
                f"swarm chunk {addr.hex()} from {bee.url} spans {got_span} bytes where its "
                f"parent says {expected}: the tree is malformed"
            )
        if got_span <= swarm.CHUNK_SIZE:
            _write_leaf(out, addr, offset, got_span, got, bee.url)
            if prog:
                with lock:
                    prog.advance(got_span)
            return []
        return _children(addr, got_span, got, offset, bee.url)

    return 1 + bee.each_chunk(_children(root, span, payload, 0, bee.url), handle, workers)


def _leaf_addresses(
    bee: BeeClient, root: bytes, span: int, payload: bytes, workers: int
) -> tuple[list[tuple[bytes, int, int]], int]:
    """Verified (address, offset, span) of every data chunk, in file order.

    Walks the intermediate chunks level by level, fetching each level pipelined.
    """
    level = [(root, 0, span, payload)]
    leaves: list[tuple[bytes, int, int]] = []
    count = 1
    while level:
        wanted: list[tuple[bytes, int, int]] = []
        for addr, base, sp, pl in level:
            for child in _children(addr, sp, pl, base, bee.url):
                (leaves if child[2] <= swarm.CHUNK_SIZE else wanted).append(child)
        fetched: dict[bytes, tuple[int, bytes]] = {}
        count += bee.each_chunk(wanted, functools.partial(_keep, fetched), workers)
        level = []
        for addr, base, sub in wanted:
            got_span, got = fetched[addr]
            if got_span != sub:
                raise SwarmChunkError(
                    f"swarm chunk {addr.hex()} from {bee.url} spans {got_span} bytes where "
                    f"its parent says {sub}: the tree is malformed"
                )
            level.append((addr, base, sub, got))
    leaves.sort(key=lambda leaf: leaf[1])
    return leaves, count


def _children(
    addr: bytes, span: int, payload: bytes, base: int, url: str
) -> list[tuple[bytes, int, int]]:
    """(address, file offset, span) of each child of the intermediate chunk at `addr`,
    whose data starts at file offset `base`."""
    try:
        layout = list(swarm.children_layout(span, len(payload)))
    except ValueError as exc:
        raise SwarmChunkError(
            f"swarm chunk {addr.hex()} from {url} is not a valid intermediate chunk "
            f"({exc}); the reference is not a plain file"
        ) from None
    return [(payload[32 * i : 32 * i + 32], base + off, sub) for i, (off, sub) in enumerate(layout)]


def _keep(into: dict, item: tuple, span: int, payload: bytes) -> list:
    """each_chunk handler that keeps every (span, payload) by address, asks for no more."""
    into[item[0]] = (span, payload)
    return []


def _fetch_stream(
    bee: BeeClient,
    out: OutputFile,
    root: bytes,
    span: int,
    payload: bytes,
    workers: int,
    prog: Progress | None,
) -> int:
    """Data via /bytes, every data chunk hashed; the tree rebuilt from them must give `root`.

    The data chunks' addresses are computed from the stream as it arrives (the expensive
    part); the intermediate chunks are then computed from those, exactly as the
    publisher's splitter made them, up to the root. Equal to the reference asked for =
    every chunk, data and intermediate, is the one the reference commits to (keccak256's
    collision resistance, as for any Merkle tree). Only when it differs is the tree
    fetched, to name the chunk that is wrong. Nothing is renamed into place before.
    """
    n_leaves = -(-span // swarm.CHUNK_SIZE)
    url = bee.http.url(f"/bytes/{root.hex()}")
    computed = bytearray(32 * n_leaves)
    # The root chunk came on this thread's keep-alive connection: the stream reuses it
    # (no second connect, no second server thread), and it stays usable if read to the end.
    try:
        resp = bee.http.request("GET", f"/bytes/{root.hex()}")
    except HttpError as exc:
        cls = SwarmStreamBroken if isinstance(exc, Interrupted) else SwarmChunkError
        raise cls(f"{exc}; try another --bee or --swarm-mode chunks") from None
    if resp.status != 200:
        body = resp.read(4096)
        bee.http.close()
        raise SwarmChunkError(
            f"{url}: HTTP {resp.status} {error_text(body)}; try another --bee "
            "or --swarm-mode chunks"
        )
    try:
        _receive_and_hash(resp, out, span, computed, url, prog)
    except BaseException:
        bee.http.close()  # whatever is left unread on the connection is not reused
        raise
    intermediates = 0

    def counted(_addr: bytes, _span: int, _payload: bytes) -> None:
        nonlocal intermediates
        intermediates += 1

    if swarm.reference_from_leaves(computed, span, counted) == root:
        return n_leaves + intermediates
    _name_bad_leaf(bee, root, span, payload, workers, computed, url)
    raise SwarmChunkError(  # unreachable unless keccak256 collides
        f"swarm:{root.hex()} from {url} does not hash to its reference; try another --bee"
    )


def _receive_and_hash(
    resp: http.client.HTTPResponse,
    out: OutputFile,
    span: int,
    computed: bytearray,
    url: str,
    prog: Progress | None,
) -> None:
    """Receive the stream into a few reused buffers; hashers hash and write them out.

    All of it is CPU-bound on the cores the node and the kernel use too, so each byte is
    copied once from the socket and once into the file, nothing else, and this thread
    only receives (with more to do it would fall behind: the scheduler gives it no more
    than the hashers). Each block is cut into one share per hasher, so both cores work
    on the last block too; a share is hashed (the C helper, without the GIL, straight
    into `computed`) and then written. Writes take turns on a lock: two pwrites into one
    tmpfs file at once spin on its inode lock instead of sleeping. A buffer is reused
    once all its shares are done.
    """
    hashers = max(2, os.cpu_count() or 2)
    buffers = _BUFFERS.take(hashers + 1)
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for buf in buffers:
        free.put(buf)
    write_lock = threading.Lock()

    def digest(buf: bytearray, off: int, length: int, start: int) -> None:
        swarm.leaf_addresses_into(buf, off, length, computed, 32 * (start // swarm.CHUNK_SIZE))
        with write_lock:
            out.pwrite(memoryview(buf)[off : off + length], start)

    with ThreadPoolExecutor(max_workers=hashers, thread_name_prefix="bmt") as pool:
        pending: deque[Future] = deque()
        for start in range(0, span, STREAM_BLOCK):
            want = min(STREAM_BLOCK, span - start)
            buf = free.get()
            got = _read_into(resp, memoryview(buf)[:want], url, start)
            if got != want:
                raise SwarmStreamBroken(
                    f"{url}: stream ended at byte {start + got} of {span}: "
                    "truncated; retry or try another --bee"
                )
            jobs = [
                pool.submit(digest, buf, off, n, start + off) for off, n in _shares(want, hashers)
            ]
            _recycle_when_done(jobs, buf, free)
            pending.extend(jobs)
            if prog:
                prog.advance(want)
            while pending and pending[0].done():
                pending.popleft().result()  # surface a failed write early
        for job in pending:
            job.result()
    _BUFFERS.give_back(buffers)  # only now: no job reads them any more


class _BufferPool:
    """Receive buffers kept from one stream fetch to the next (a boot fetches kernel,
    initrd and more in a row): a fresh 1 MiB buffer costs 256 page faults and a memset
    before the first byte can be received, serially, ~0.4 ms each."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._idle: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> list[bytearray]:
        with self._lock:
            got, self._idle = self._idle[:n], self._idle[n:]
        return got + [bytearray(STREAM_BLOCK) for _ in range(n - len(got))]

    def give_back(self, bufs: list[bytearray]) -> None:
        with self._lock:
            self._idle.extend(bufs[: self._keep - len(self._idle)])


_BUFFERS = _BufferPool(keep=4)


def _shares(length: int, parts: int) -> list[tuple[int, int]]:
    """(offset, bytes) of up to `parts` runs of whole chunks that make up `length` bytes."""
    per = -(-length // swarm.CHUNK_SIZE // parts) * swarm.CHUNK_SIZE
    return [(off, min(per, length - off)) for off in range(0, length, per)]


def _recycle_when_done(jobs: list[Future], buf: bytearray, free: queue.SimpleQueue) -> None:
    """Put `buf` back on the free list once every job reading it has finished (or failed,
    or the receiver would wait for it forever)."""
    left = len(jobs)
    lock = threading.Lock()

    def done(_job: Future) -> None:
        nonlocal left
        with lock:
            left -= 1
            last = left == 0
        if last:
            free.put(buf)

    for job in jobs:
        job.add_done_callback(done)


def _name_bad_leaf(
    bee: BeeClient,
    root: bytes,
    span: int,
    payload: bytes,
    workers: int,
    computed: bytearray,
    url: str,
) -> None:
    """The stream did not hash to the reference: find and name the chunk that is wrong.

    Fetches the verified tree (every intermediate chunk checked against its address, so
    a lying intermediate is named right there) and compares its leaf addresses with the
    ones computed from the stream.
    """
    n_leaves = len(computed) // 32
    leaves, _count = _leaf_addresses(bee, root, span, payload, workers)
    expected = bytearray()
    for i, (addr, off, sub) in enumerate(leaves):
        if off != i * swarm.CHUNK_SIZE or sub != min(swarm.CHUNK_SIZE, span - off):
            raise SwarmChunkError(
                f"swarm chunk {addr.hex()} from {bee.url} sits at byte {off} with span {sub}: "
                "the tree is malformed"
            )
        expected += addr
    if len(leaves) != n_leaves:
        raise SwarmChunkError(f"swarm tree of {root.hex()} from {bee.url} is malformed")
    if expected != computed:
        i = next(
            i
            for i in range(n_leaves)
            if expected[32 * i : 32 * i + 32] != computed[32 * i : 32 * i + 32]
        )
        off = i * swarm.CHUNK_SIZE
        end = min(off + swarm.CHUNK_SIZE, span) - 1
        raise SwarmChunkError(
            f"swarm chunk {expected[32 * i : 32 * i + 32].hex()} (file bytes {off}-{end}) "
            f"from {url} does not hash to its address: the node is lying or corrupt; "
            "try another --bee"
        )


def _read_into(resp, view: memoryview, url: str, start: int) -> int:
    """Fill `view` from the response (fewer bytes only at the end of the stream)."""
    got = 0
    while got < len(view):
        try:
            n = resp.readinto(view[got:])
        except (OSError, http.client.HTTPException) as exc:
            raise SwarmStreamBroken(f"{url}: stream broke at byte {start + got}: {exc}") from None
        if not n:
            break
        got += n
    return got


# ---------------------------------------------------------------- publishing


def find_batch(bee_url: str, timeout: float = 30.0) -> str:
    """The first usable postage batch of the node (GET /stamps)."""
    import json

    http = HttpClient(bee_url, timeout, what="Bee API URL")
    status, body = http.get_bounded("/stamps", 1 << 20)
    if status != 200:
        raise BootlinkError(
            f"{http.base}/stamps: HTTP {status} {error_text(body)}; pass --batch BATCH_ID"
        )
    try:
        stamps = json.loads(body).get("stamps") or []
    except (ValueError, AttributeError):
        stamps = []
    for s in stamps:
        if isinstance(s, dict) and s.get("usable") and isinstance(s.get("batchID"), str):
            return s["batchID"]
    raise BootlinkError(
        f"Bee node {http.base} has no usable postage batch: buy one "
        "(POST /stamps/{amount}/{depth}) or pass --batch BATCH_ID"
    )


def upload_file(
    path: Path,
    bee_url: str,
    batch: str,
    *,
    timeout: float = 120.0,
    progress: bool = True,
) -> bytes:
    """POST /bytes and check Bee's reference against the one computed offline."""
    import json

    prog = Progress(f"reference {path.name}", path.stat().st_size) if progress else None
    expected = swarm.reference_of_file(path, progress=prog)
    http = HttpClient(bee_url, timeout, what="Bee API URL")
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            resp = http.request(
                "POST",
                "/bytes",
                body=f,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(size),
                    "Swarm-Postage-Batch-Id": batch,
                    # Bee >= 2.8.1 erasure-codes by default, which changes the reference.
                    "Swarm-Redundancy-Level": "0",
                    "Swarm-Pin": "true",
                },
            )
        except HttpError as exc:
            raise BootlinkError(f"upload of {path} to {http.base} failed: {exc}") from None
        body = resp.read()
    http.close()
    if resp.status not in (200, 201):
        raise BootlinkError(
            f"Bee {http.base} refused {path.name}: HTTP {resp.status} {error_text(body)}"
        )
    try:
        got = json.loads(body)["reference"]
    except (ValueError, KeyError, TypeError):
        raise BootlinkError(f"Bee {http.base} answered no reference for {path.name}") from None
    if got.lower() != expected.hex():
        raise BootlinkError(
            f"Bee {http.base} returned reference {got} for {path.name}, but its content "
            f"hashes to {expected.hex()}: the node altered it (encryption or erasure coding "
            "on?); check the node's settings"
        )
    if prog:
        prog.finish()
    return expected
