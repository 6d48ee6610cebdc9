"""IPFS source: fetch a UnixFS file from a trustless gateway and verify every block.

The gateway is not trusted (IPFS trustless-gateway spec). Two ways to ask it:
- `car` (default): one `GET /ipfs/{cid}?format=car` streaming the whole DAG. Blocks are
  read one section at a time, each checked against its own CID, then matched against the
  CIDs the verified DAG asks for next. The CAR header's roots are ignored (the spec says
  clients must); a CAR that ends before the DAG is complete is refused as truncated.
- `raw`: `GET /ipfs/{cid}?format=raw` per block, a bounded window in flight.
Blocks are capped at 2 MiB. The UnixFS structure is checked as the file is assembled:
every child's size must be the one its parent's `blocksizes` promises and the sizes must
add up to `filesize`, so a gateway cannot truncate, pad or reorder the file.

Publishing (`add_file`) posts to kubo's `/api/v0/add` with the layout's parameters and
checks that kubo's CID equals the one computed offline.
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import mmap
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bootlink.common import ipfs, sha256_lanes
from bootlink.common.errors import BootlinkError, Interrupted, ProtocolError
from bootlink.common.ipfs import CID
from bootlink.common.log import Progress
from bootlink.common.output_file import OutputFile

from ._http import HttpClient, HttpError, TooLarge, error_text

log = logging.getLogger("bootlink.sources.ipfs")

CAR_ACCEPT = "application/vnd.ipld.car; version=1; order=dfs; dups=y"
RAW_ACCEPT = "application/vnd.ipld.raw"
MODES = ("car", "raw")


# A gateway that could not fetch the content in time (kubo's Gateway.RetrievalTimeout,
# 30 s: boxo answers 504) or is overloaded says nothing about the content: worth another
# try, unlike a 404 or a wrong block.
GATEWAY_GAVE_UP = (502, 503, 504)
GAVE_UP_FIX = "the gateway could not retrieve it in time; retry, or try another --gateway"


class IpfsBlockError(ProtocolError):
    """A gateway sent a block that is not the one asked for, or a broken DAG/CAR."""


class IpfsStreamBroken(IpfsBlockError, Interrupted):
    """The gateway's answer broke off or never came (a cable pulled, the node gone)."""


@dataclass(frozen=True)
class IpfsFetch:
    cid: CID
    size: int
    blocks: int
    gateway: str
    mode: str

    @property
    def verified_by(self) -> str:
        return f"ipfs: all {self.blocks} blocks match their CIDs ({self.mode})"


# A buffer goes to a hasher once it holds CAR_BATCH bytes of sections, or more when the
# blocks are big: as many blocks as sha256_lanes hashes side by side (16 of kubo's
# 256 KiB fill 4 MiB; of 1 MiB blocks, 16 MiB), within MAX_BATCH.
CAR_BATCH = 4 << 20
MAX_BATCH = 16 << 20
CAR_BUFFER = MAX_BATCH + (2 << 20)  # one receive buffer: a batch and one more section
CAR_BUFFERS = 6  # receiving, hashing+writing (2), waiting: reused, never more
CAR_WORKERS = 2  # threads checking and writing buffers
LOOKAHEAD = 64  # bytes read past a section, enough for the next one's prefix and CID


def _hash_and_write(
    buf: mmap.mmap,
    sections: list[tuple[CID, int, int]],
    writes: list[tuple[bytes | memoryview, int, int]],
    out: OutputFile,
) -> int | None:
    """Check each section's block against its CID and write the file data taken from it;
    the index of the first bad block. Runs on a worker thread: the SHA-256 blocks of the
    batch are hashed side by side (sha256_lanes, without the GIL), and pwrite drops the
    GIL too; the memoryview slices copy nothing. Data written before a bad block is
    found only ever lands in the .part file, which is then deleted."""
    view = memoryview(buf)
    sha2 = [i for i, (cid, _, _) in enumerate(sections) if cid.mh_code == ipfs.SHA2_256]
    hashed = dict(
        zip(sha2, sha256_lanes.digests(buf, [sections[i][1:] for i in sha2]), strict=True)
    )
    w = 0
    for i, (cid, start, end) in enumerate(sections):
        digest = hashed.get(i)
        if digest is not None:
            if digest != cid.digest:
                return i
        elif not cid.verify(bytes(view[start:end])):
            return i
        while w < len(writes) and writes[w][2] <= i:
            out.pwrite(writes[w][0], writes[w][1])
            w += 1
    for data, offset, _ in writes[w:]:  # blocks kept from earlier buffers
        out.pwrite(data, offset)
    return None


class _CarBlocks:
    """Blocks out of one CAR stream, in the order the DAG walk asks for them.

    The calling thread receives the stream into a few reused buffers, whole sections per
    buffer (a section that would not fit starts the next one), parses section headers in
    place and hands the walk views into the buffer: nothing is copied (except blocks the
    walk does not want yet). The walk decides where each block's file data goes; a filled
    buffer then goes to a worker that checks every block in it against its CID and only
    then writes its file data (pwrite, from the buffer). So the walk may look at a block
    before its hash is checked: a lie in it can at worst misdirect the walk, and every
    error path settles the pending checks first, so a block that fails its CID is what
    gets named. Nothing is renamed into place before every check has passed (finish()).
    """

    wants_hints = False
    stable_blocks = False

    def __init__(self, http: HttpClient, root: CID, out: OutputFile, max_buffer: int = 256 << 20):
        self.http, self.root, self.out, self.max_buffer = http, root, out, max_buffer
        self._pool = ThreadPoolExecutor(max_workers=CAR_WORKERS, thread_name_prefix="ipfs-hash")
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._allocated = 0
        self._owned: list[mmap.mmap] = []
        self._jobs: collections.deque[tuple[Future, list]] = collections.deque()
        self.received = 0
        self.stash: dict[bytes, bytes] = {}  # blocks that came before the walk wanted them
        self.stashed = 0
        # Blocks already handed out, for a gateway that sends each block once (dups=n)
        # although the DAG uses it twice; with dups=y (asked for) nothing is kept.
        self.cache: collections.OrderedDict[bytes, bytes] | None = None
        self.cache_bytes = 0
        self._sections: list[tuple[CID, int, int]] = []  # parsed, in the current buffer
        self._writes: list[tuple[bytes | memoryview, int, int]] = []  # (data, offset, section)
        self._idx = 0  # sections handed out so far
        self._ended = False
        self._batch = CAR_BATCH  # grows with the blocks seen (see CAR_BATCH)
        self._lanes = sha256_lanes.width()
        try:
            resp = http.request(
                "GET",
                f"/ipfs/{root}?format=car&dag-scope=all&car-version=1&car-order=dfs&car-dups=y",
                headers={"Accept": CAR_ACCEPT},
            )
        except HttpError as exc:
            self.close()
            cls = IpfsStreamBroken if isinstance(exc, Interrupted) else BootlinkError
            raise cls(f"ipfs gateway: {exc}") from None
        if resp.status != 200:
            body = resp.read(4096)
            self.close()
            what = f"ipfs {root} from {http.base}: HTTP {resp.status} {error_text(body)}"
            if resp.status in GATEWAY_GAVE_UP:
                raise IpfsStreamBroken(f"{what}; {GAVE_UP_FIX}")
            raise IpfsBlockError(f"{what}; is the CID pinned there? try another --gateway")
        ctype = resp.getheader("Content-Type", "")
        if not ctype.startswith("application/vnd.ipld.car"):
            self.close()
            raise IpfsBlockError(
                f"{http.base} answered {ctype or 'no content type'} instead of a CAR: it is "
                "not a trustless gateway; use another --gateway or --mode raw"
            )
        params = {p.strip().lower().replace(" ", "") for p in ctype.split(";")[1:]}
        if "dups=y" not in params:
            self.cache = collections.OrderedDict()
        self.resp = resp
        self.buf = self._buffer()
        self.view = memoryview(self.buf)
        try:
            self.pos, self.filled = self._header()
        except (ValueError, http.client.HTTPException, OSError) as exc:
            self._fail(f"broken CAR header ({exc})")

    # ------------------------------------------------------------ receiving

    def _buffer(self) -> mmap.mmap:
        """A free receive buffer: up to CAR_BUFFERS, taken from the process-wide spares
        (a second fetch, e.g. the initrd after the kernel, faults in no new pages)."""
        try:
            return self._free.get(block=False)
        except queue.Empty:
            pass
        if self._allocated < CAR_BUFFERS:
            self._allocated += 1
            self._owned.append(_spare_buffer())
            return self._owned[-1]
        self._settle(1)  # all in the workers' hands: wait for the oldest
        return self._free.get()

    def _fill(self, upto: int) -> int:
        """Read until the buffer holds `upto` bytes or the stream ends; bytes read."""
        upto = min(upto, CAR_BUFFER)
        start = self.filled
        while self.filled < upto:
            n = self.resp.readinto(self.view[self.filled : upto])
            if not n:
                break
            self.filled += n
        return self.filled - start

    def _header(self) -> tuple[int, int]:
        self.filled = 0
        self._fill(10)
        length, pos = ipfs.decode_varint(self.view[: self.filled])
        if length > 64 * 1024:
            raise ipfs.IpfsFormatError(f"CAR header of {length} bytes is implausibly large")
        self._fill(pos + length + LOOKAHEAD)
        if self.filled < pos + length:
            raise ipfs.CarTruncated("CAR stream ended inside its header")
        ipfs.decode_car_header(bytes(self.view[pos : pos + length]))  # roots ignored
        return pos + length, self.filled

    def _grow_batch(self, section: int) -> None:
        """Batches of as many sections this size as there are hashing lanes: the
        buffer is handed on once the last of them is in."""
        fits = min(MAX_BATCH, CAR_BUFFER - section)
        self._batch = max(self._batch, min(fits, (self._lanes - 1) * section + 1))

    def _submit(self) -> None:
        """The current buffer's sections (all walked by now) go to a worker."""
        if self._sections or self._writes:
            job = self._pool.submit(
                _hash_and_write, self.buf, self._sections, self._writes, self.out
            )
            job.add_done_callback(lambda _f, buf=self.buf: self._free.put(buf))
            self._jobs.append((job, self._sections))
        else:
            self._free.put(self.buf)
        self._sections, self._writes, self._idx = [], [], 0
        while self._jobs and self._jobs[0][0].done():
            self._settle(1)  # a lying gateway is named as soon as it is caught

    def _settle(self, n: int | None = None) -> None:
        """Wait for the oldest `n` (default: all) checks; name the first bad block."""
        while self._jobs and (n is None or n > 0):
            job, sections = self._jobs.popleft()
            try:
                bad = job.result()
            except BaseException:
                self.close()  # e.g. WriteFailed: the disk is full
                raise
            if bad is not None:
                self.close()
                raise IpfsBlockError(
                    f"ipfs block {sections[bad][0]} from {self.http.base} does not match its "
                    "CID: the gateway is lying or corrupt; try another --gateway"
                )
            if n is not None:
                n -= 1

    def check(self) -> None:
        """Check every block received so far (before reporting another error)."""
        try:
            if self._sections:
                bad = _hash_and_write(self.buf, self._sections, [], self.out)
                if bad is not None:
                    self._jobs.append((_done(bad), self._sections))
            self._settle()
        except IpfsBlockError:
            raise
        except BaseException:
            return  # the caller's own error is the one to report

    def _more(self, cid: CID) -> None:
        """Parse more sections into self._sections (all before handed out)."""
        while True:
            if self._ended:
                self.check()
                self._fail(
                    f"the stream ended before block {cid} ({self.received} blocks received): "
                    "truncated response",
                    IpfsStreamBroken,
                )
            view, pos = self.view, self.pos
            span = None
            while True:
                span = ipfs.car_section_span(view, pos, self.filled)
                if span is None or span[1] > self.filled:
                    break
                got, start = CID.decode(view[: span[1]], span[0])
                self._sections.append((got, start, span[1]))
                if self._lanes and span[1] - pos > self._batch // self._lanes:
                    self._grow_batch(span[1] - pos)
                pos = span[1]
            self.pos = pos
            if self._idx < len(self._sections):
                return
            need = span[1] if span is not None else pos + LOOKAHEAD
            if need > CAR_BUFFER or (self._sections and pos >= self._batch):
                # Hand this buffer on and go on in a fresh one, starting with the few
                # bytes of the next section already here (its prefix and CID).
                new = self._buffer()
                rest = self.filled - pos
                new[:rest] = view[pos : self.filled]
                self._submit()
                self.buf, self.view, self.pos, self.filled = new, memoryview(new), 0, rest
                continue
            # Read up to a batch's worth at once (few calls for small blocks), and a
            # little past the section wanted, to learn the next one's length.
            if not self._fill(max(need, self._batch) + LOOKAHEAD):  # end of stream
                self._ended = True
                if pos != self.filled:
                    self.check()
                    short = f"{need - self.filled} bytes short" if span else "in a length prefix"
                    self._fail(
                        f"truncated response (CAR stream ended {short} inside a section)",
                        IpfsStreamBroken,
                    )

    # ------------------------------------------------------------ the walk's side

    def _fail(self, what: str, cls: type[IpfsBlockError] = IpfsBlockError):
        self.close()
        raise cls(
            f"CAR for ipfs {self.root} from {self.http.base}: {what}; "
            "retry or try another --gateway"
        )

    def _kept(self, key: bytes) -> bytes | None:
        block = self.stash.pop(key, None)
        if block is not None:
            self.stashed -= len(block)
            return block
        if self.cache is not None and key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        return None

    def hint(self, cids) -> None:
        pass  # the stream brings blocks in its own (depth-first) order

    def get(self, cid: CID) -> bytes | memoryview:
        """Block `cid`, its check pending: a view valid until the next get() call."""
        key = cid.multihash
        while True:
            if self._idx >= len(self._sections):
                kept = self._kept(key)
                if kept is not None:
                    return kept
                try:
                    self._more(cid)
                except (http.client.HTTPException, OSError) as exc:  # the connection
                    self.check()
                    self._fail(
                        f"broken stream after {self.received} blocks ({exc})", IpfsStreamBroken
                    )
                except ValueError as exc:  # the bytes (a CID or length that cannot be)
                    self.check()
                    self._fail(f"broken stream after {self.received} blocks ({exc})")
            got, start, end = self._sections[self._idx]
            if got.multihash == key:
                self._idx += 1
                self.received += 1
                block = self.view[start:end]
                if self.cache is not None:
                    self._remember(key, bytes(block))
                return block
            kept = self._kept(key)
            if kept is not None:
                return kept  # this section is for a later request
            # A block the walk has not reached yet (order=unk gateways): keep a copy
            # (checked with the rest of its buffer).
            self._idx += 1
            self.received += 1
            self.stash[got.multihash] = bytes(self.view[start:end])
            self.stashed += end - start
            if self.stashed > self.max_buffer:
                self.check()
                self._fail(
                    f"over {self.max_buffer >> 20} MiB of blocks arrived out of DAG order "
                    "(or unrelated)"
                )

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """File data of a block just handed out, written once its buffer is checked."""
        self._writes.append((data, offset, self._idx - 1))

    def _remember(self, key: bytes, block: bytes) -> None:
        assert self.cache is not None
        self.cache[key] = block
        self.cache_bytes += len(block)
        while self.cache_bytes > 32 << 20:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= len(old)

    def finish(self) -> None:
        """The walk is complete: check and write what is pending."""
        self._submit()
        self._settle()

    def close(self) -> None:
        # Leftover bytes after the DAG is complete: ignore them, drop the connection.
        # Wait for the workers: none may write to the file after it is closed.
        self.http.abort()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with _SPARE_LOCK:
            _SPARE.extend(self._owned)  # every worker is done with them
        self._owned = []


_SPARE: list[mmap.mmap] = []
_SPARE_LOCK = threading.Lock()


def _spare_buffer() -> mmap.mmap:
    """Anonymous memory, so only the pages a fetch touches get allocated (a bytearray
    would be zeroed, all 3 MiB, on every fetch)."""
    with _SPARE_LOCK:
        if _SPARE:
            return _SPARE.pop()
    return mmap.mmap(-1, CAR_BUFFER)


def _done(result) -> Future:
    fut: Future = Future()
    fut.set_result(result)
    return fut


class _RawBlocks:
    """Verified blocks fetched one by one (`?format=raw`), a window of them in flight."""

    wants_hints = True
    stable_blocks = True

    def __init__(self, http: HttpClient, workers: int, out: OutputFile) -> None:
        self.http, self.out = http, out
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ipfs")
        self.futures: dict[bytes, Future] = {}
        self.window = workers * 2
        self.fetched = 0
        self._lock = threading.Lock()

    def _fetch(self, cid: CID) -> bytes:
        path = f"/ipfs/{cid}?format=raw"
        status, body = self.http.get_bounded(
            path, ipfs.MAX_BLOCK, {"Accept": RAW_ACCEPT}, exact=True
        )
        if status == 404:
            raise IpfsBlockError(
                f"ipfs block {cid} not found on {self.http.base}: not pinned or not "
                "retrievable there; try another --gateway"
            )
        if status != 200:
            what = f"ipfs block {cid} from {self.http.base}: HTTP {status} {error_text(body)}"
            if status in GATEWAY_GAVE_UP:
                raise IpfsStreamBroken(f"{what}; {GAVE_UP_FIX}")
            raise IpfsBlockError(f"{what}; try another --gateway")
        if not cid.verify(body):
            raise IpfsBlockError(
                f"ipfs block {cid} from {self.http.base} does not match its CID: the gateway "
                "is lying or corrupt; try another --gateway"
            )
        with self._lock:
            self.fetched += 1
        return body

    def hint(self, cids) -> None:
        for cid in cids:
            if len(self.futures) >= self.window:
                return
            if cid.mh_code != ipfs.IDENTITY and cid.multihash not in self.futures:
                self.futures[cid.multihash] = self.pool.submit(self._fetch, cid)

    def get(self, cid: CID) -> bytes:
        fut = self.futures.pop(cid.multihash, None)
        if fut is None:
            return self._fetch(cid)
        return fut.result()

    @property
    def received(self) -> int:
        return self.fetched

    def write(self, data: bytes | memoryview, offset: int) -> None:
        self.out.pwrite(data, offset)

    def check(self) -> None:
        pass  # every block was checked before get() returned it

    def finish(self) -> None:
        pass

    def close(self) -> None:
        for fut in self.futures.values():
            fut.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


def fetch(
    root: CID,
    gateway: str,
    output: Path,
    *,
    mode: str = "car",
    workers: int = 16,
    timeout: float = 30.0,
    progress: bool = True,
    max_size: int = 1 << 36,
    label: str | None = None,
) -> IpfsFetch:
    """Download the UnixFS file `root` into `output`, verifying every block."""
    if mode not in MODES:
        raise BootlinkError(f"ipfs fetch mode must be one of {', '.join(MODES)}, not {mode!r}")
    http = HttpClient(gateway, timeout, what="IPFS gateway URL")
    source = None
    with OutputFile(output) as out:
        try:
            if mode == "car":
                source = _CarBlocks(http, root, out)
            else:
                source = _RawBlocks(http, workers, out)
            walker = _Walker(
                source, str(http.base), max_size, progress, label or f"ipfs {root.short()}"
            )
            size = walker.run(root)
            source.finish()  # every block checked, all data written
        finally:
            if source is not None:
                source.close()  # before the file goes: no worker may still write to it
        out.commit()
    if walker.prog:
        walker.prog.finish()
    return IpfsFetch(root, size, walker.blocks, str(http.base), mode)


class _Walker:
    """Depth-first UnixFS reassembly with structural checks."""

    def __init__(self, source, gateway: str, max_size: int, progress: bool, label: str):
        self.source, self.gateway = source, gateway
        self.max_size = max_size
        self.progress = progress
        self.label = label
        self.prog: Progress | None = None
        self.blocks = 0
        self.written = 0
        # Consumed blocks kept for DAGs that reuse a block, when the source's blocks stay
        # valid (raw mode: one bytes object each; the CAR source keeps its own).
        self.cache: collections.OrderedDict[bytes, bytes] | None = (
            collections.OrderedDict() if source.stable_blocks else None
        )
        self.cache_bytes = 0

    def _bad(self, cid: CID, what: str):
        self.source.check()  # a block failing its CID is the error to name, if there is one
        raise IpfsBlockError(
            f"ipfs block {cid} from {self.gateway} {what}: not a valid UnixFS file; "
            "check the CID (bootlink fetches files, not directories)"
        )

    def _block(self, cid: CID) -> bytes | memoryview:
        """The verified block; a view into a receive buffer is valid until the next call."""
        if cid.mh_code == ipfs.IDENTITY:
            return cid.digest
        cache = self.cache
        if cache is not None:
            cached = cache.get(cid.multihash)
            if cached is not None:
                cache.move_to_end(cid.multihash)
                return cached
        block = self.source.get(cid)
        if len(block) > ipfs.MAX_BLOCK:
            raise IpfsBlockError(f"ipfs block {cid} from {self.gateway} is over 2 MiB: refused")
        self.blocks += 1
        if cache is not None:
            cache[cid.multihash] = block  # type: ignore[assignment]
            self.cache_bytes += len(block)
            while self.cache_bytes > 32 << 20:
                _, old = cache.popitem(last=False)
                self.cache_bytes -= len(old)
        return block

    def _write(self, data: bytes | memoryview) -> None:
        n = len(data)
        if self.written + n > self.max_size:
            self.source.check()
            raise TooLarge(f"{self.label}: file exceeds the {self.max_size}-byte limit")
        self.source.write(data, self.written)
        self.written += n
        if self.prog:
            self.prog.advance(n)

    def run(self, root: CID) -> int:
        stack: list[tuple[CID, int | None]] = [(root, None)]
        visits = 0
        hints = self.source.wants_hints
        while stack:
            cid, expected = stack.pop()
            visits += 1
            if visits > 10_000_000:
                self._bad(root, "has an absurd number of nodes")
            if hints:
                self.source.hint(c for c, _ in reversed(stack[-64:]))
            block = self._block(cid)
            children = self._visit(cid, block, expected)
            if self.prog is None and self.progress:
                total = expected if expected is not None else self._filesize_hint
                self.prog = Progress(self.label, total or 0)
            stack.extend(reversed(children))
        return self.written

    _filesize_hint = 0

    def _visit(
        self, cid: CID, block: bytes | memoryview, expected: int | None
    ) -> list[tuple[CID, int]]:
        if cid.codec == ipfs.RAW:
            if expected is not None and len(block) != expected:
                self._bad(cid, f"holds {len(block)} bytes where its parent says {expected}")
            self._write(block)
            return []
        if cid.codec != ipfs.DAG_PB:
            self._bad(cid, f"has codec 0x{cid.codec:x}")
        try:
            node = ipfs.decode_file_node(block)  # its data stays a view into the block
        except ValueError as exc:
            self._bad(cid, f"is malformed ({exc})")
        if node.type not in (ipfs.UNIXFS_FILE, ipfs.UNIXFS_RAW):
            self._bad(cid, f"is UnixFS type {node.type}, not a file")
        total = len(node.data) + sum(node.blocksizes)
        if node.filesize is not None and node.filesize != total:
            self._bad(cid, f"says filesize {node.filesize} but its parts add up to {total}")
        if expected is not None and total != expected:
            self._bad(cid, f"holds {total} bytes where its parent says {expected}")
        if len(node.blocksizes) != len(node.links):
            self._bad(cid, f"has {len(node.links)} links but {len(node.blocksizes)} blocksizes")
        if expected is None:
            if total > self.max_size:
                self.source.check()
                raise TooLarge(
                    f"ipfs {cid} is {total} bytes, over the {self.max_size}-byte limit for a "
                    "boot file; is this the right CID?"
                )
            self._filesize_hint = total
            self.source.out.expect(total)
        if node.data:
            self._write(node.data)
        return list(zip(node.links, node.blocksizes, strict=True))


# ---------------------------------------------------------------- publishing


def add_file(
    path: Path,
    api_url: str,
    layout: str = ipfs.DEFAULT_LAYOUT,
    *,
    timeout: float = 120.0,
    progress: bool = True,
) -> CID:
    """POST the file to kubo's /api/v0/add in `layout`; check kubo's CID is ours."""
    lay = ipfs.LAYOUTS[layout]
    size = path.stat().st_size
    prog = Progress(f"CID {path.name}", size) if progress else None
    expected = ipfs.cid_of_file(path, layout, progress=prog)
    http = HttpClient(api_url, timeout, what="IPFS API URL")
    boundary = "bootlink" + os.urandom(12).hex()
    name = path.name.replace('"', "_")
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    params = "&".join(
        f"{k}={v}" for k, v in {**lay.add_params(), "pin": "true", "quieter": "true"}.items()
    )
    body = _MultipartBody(head, path, tail)
    try:
        resp = http.request(
            "POST",
            f"/api/v0/add?{params}",
            body=body,
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + size + len(tail)),
            },
        )
        text = resp.read()
    except (HttpError, http_client_errors()) as exc:
        raise BootlinkError(f"upload of {path} to {http.base} failed: {exc}") from None
    finally:
        body.close()
        http.close()
    if resp.status != 200:
        raise BootlinkError(
            f"IPFS API {http.base} refused {path.name}: HTTP {resp.status} {error_text(text)}"
        )
    got = None
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("Hash"), str):
            got = doc["Hash"]
    if got is None:
        raise BootlinkError(f"IPFS API {http.base} answered no Hash for {path.name}")
    try:
        same = CID.parse(got) == expected
    except ValueError:
        same = False
    if not same:
        raise BootlinkError(
            f"IPFS API {http.base} returned CID {got} for {path.name}, but the {layout} "
            f"layout gives {expected}: the node uses other import settings; check its config"
        )
    if prog:
        prog.finish()
    return expected


def http_client_errors():
    return http.client.HTTPException


class _MultipartBody:
    """File-like body: multipart head, the file streamed, tail (no full copy in memory)."""

    def __init__(self, head: bytes, path: Path, tail: bytes) -> None:
        self.parts = [head, None, tail]
        self.f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.i = 0

    def read(self, n: int = -1) -> bytes:
        while self.i < 3:
            part = self.parts[self.i]
            if part is None:
                data = self.f.read(n if n > 0 else -1)
                if data:
                    return data
                self.i += 1
                continue
            self.i += 1
            if part:
                return part
        return b""

    def close(self) -> None:
        self.f.close()
