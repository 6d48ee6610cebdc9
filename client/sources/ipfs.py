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
import io
import json
import logging
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bootlink.common import ipfs
from bootlink.common.errors import BootlinkError, ProtocolError
from bootlink.common.ipfs import CID
from bootlink.common.log import Progress

from ._http import HttpClient, HttpError, TooLarge, error_text

log = logging.getLogger("bootlink.sources.ipfs")

CAR_ACCEPT = "application/vnd.ipld.car; version=1; order=dfs; dups=y"
RAW_ACCEPT = "application/vnd.ipld.raw"
MODES = ("car", "raw")


class IpfsBlockError(ProtocolError):
    """A gateway sent a block that is not the one asked for, or a broken DAG/CAR."""


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


class _CarBlocks:
    """Verified blocks out of one CAR stream, in the order the DAG walk asks for them."""

    def __init__(self, http: HttpClient, root: CID, max_buffer: int = 256 << 20) -> None:
        self.http, self.root, self.max_buffer = http, root, max_buffer
        self.url = http.url(f"/ipfs/{root}?format=car")
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ipfs-hash")
        try:
            resp = http.request(
                "GET",
                f"/ipfs/{root}?format=car&dag-scope=all&car-version=1&car-order=dfs&car-dups=y",
                headers={"Accept": CAR_ACCEPT},
            )
        except HttpError as exc:
            self.close()
            raise BootlinkError(f"ipfs gateway: {exc}") from None
        if resp.status != 200:
            body = resp.read(4096)
            self.close()
            raise IpfsBlockError(
                f"ipfs {root} from {http.base}: HTTP {resp.status} {error_text(body)}; "
                "is the CID pinned/reachable there? try another --gateway"
            )
        ctype = resp.getheader("Content-Type", "")
        if not ctype.startswith("application/vnd.ipld.car"):
            self.close()
            raise IpfsBlockError(
                f"{http.base} answered {ctype or 'no content type'} instead of a CAR: it is "
                "not a trustless gateway; use another --gateway or --mode raw"
            )
        self.resp = resp
        try:
            # Section headers are read a few bytes at a time: buffer them, not the socket.
            self.reader = ipfs.CarReader(io.BufferedReader(resp, buffer_size=1 << 20))
        except (ValueError, http.client.HTTPException, OSError) as exc:
            self._fail(f"broken CAR header ({exc})")
        self.received = 0
        self.buffer: dict[bytes, bytes] = {}
        self.buffered = 0
        # Reading and hashing overlap: a pump thread parses sections and hands each to a
        # hashing pool (hashlib drops the GIL); get() takes the results in stream order.
        self._queue: queue.Queue = queue.Queue(maxsize=32)
        self._pump_thread = threading.Thread(target=self._pump, name="ipfs-car", daemon=True)
        self._pump_thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self) -> None:
        try:
            for got, block in self.reader:
                fut = self._pool.submit(_checked, got, block)
                if not self._put(fut):
                    return
            self._put(None)
        except BaseException as exc:  # handed to get(), which turns it into one line
            self._put(exc)

    def _fail(self, what: str):
        self.close()
        raise IpfsBlockError(
            f"CAR for ipfs {self.root} from {self.http.base}: {what}; "
            "retry or try another --gateway"
        )

    def hint(self, cids) -> None:
        pass  # the stream brings blocks in its own (depth-first) order

    def get(self, cid: CID) -> bytes:
        key = cid.multihash
        if key in self.buffer:
            block = self.buffer.pop(key)
            self.buffered -= len(block)
            return block
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.put(None)  # stays at end of stream for later calls
                self._fail(
                    f"the stream ended before block {cid} ({self.received} blocks received): "
                    "truncated response"
                )
            if isinstance(item, ipfs.CarTruncated):
                self._fail(f"truncated response ({item})")
            if isinstance(item, ValueError | http.client.HTTPException | OSError):
                self._fail(f"broken stream after {self.received} blocks ({item})")
            if isinstance(item, BaseException):
                raise item
            got, block, ok = item.result()
            self.received += 1
            if not ok:
                self.close()
                raise IpfsBlockError(
                    f"ipfs block {got} from {self.http.base} does not match its CID: the "
                    "gateway is lying or corrupt; try another --gateway"
                )
            if got.multihash == key:
                return block
            # A block the walk has not reached yet (order=unk gateways): keep it, bounded.
            self.buffer[got.multihash] = block
            self.buffered += len(block)
            if self.buffered > self.max_buffer:
                self._fail(
                    f"over {self.max_buffer >> 20} MiB of blocks arrived out of DAG order "
                    "(or unrelated)"
                )

    def close(self) -> None:
        # Leftover bytes after the DAG is complete: ignore them, drop the connection
        # (which also ends a pump thread blocked on the socket).
        self._stop.set()
        self.http.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _checked(cid: CID, block: bytes) -> tuple[CID, bytes, bool]:
    return cid, block, cid.verify(block)


class _RawBlocks:
    """Verified blocks fetched one by one (`?format=raw`), a window of them in flight."""

    def __init__(self, http: HttpClient, workers: int) -> None:
        self.http = http
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ipfs")
        self.futures: dict[bytes, Future] = {}
        self.window = workers * 2
        self.fetched = 0
        self._lock = threading.Lock()

    def _fetch(self, cid: CID) -> bytes:
        path = f"/ipfs/{cid}?format=raw"
        status, body = self.http.get_bounded(path, ipfs.MAX_BLOCK, {"Accept": RAW_ACCEPT})
        if status == 404:
            raise IpfsBlockError(
                f"ipfs block {cid} not found on {self.http.base}: not pinned or not "
                "retrievable there; try another --gateway"
            )
        if status != 200:
            raise IpfsBlockError(
                f"ipfs block {cid} from {self.http.base}: HTTP {status} {error_text(body)}"
            )
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
    source = _CarBlocks(http, root) if mode == "car" else _RawBlocks(http, workers)
    tmp = output.with_name(output.name + ".part")
    try:
        with open(tmp, "wb") as out:
            walker = _Walker(
                source, out, str(http.base), max_size, progress, label or f"ipfs {root.short()}"
            )
            size = walker.run(root)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    os.replace(tmp, output)
    return IpfsFetch(root, size, walker.blocks, str(http.base), mode)


class _Walker:
    """Depth-first UnixFS reassembly with structural checks."""

    def __init__(self, source, out, gateway: str, max_size: int, progress: bool, label: str):
        self.source, self.out, self.gateway = source, out, gateway
        self.max_size = max_size
        self.progress = progress
        self.label = label
        self.prog: Progress | None = None
        self.blocks = 0
        self.written = 0
        # Consumed blocks kept for DAGs that reuse a block (gateways may send it once).
        self.cache: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self.cache_bytes = 0

    def _bad(self, cid: CID, what: str):
        raise IpfsBlockError(
            f"ipfs block {cid} from {self.gateway} {what}: not a valid UnixFS file; "
            "check the CID (bootlink fetches files, not directories)"
        )

    def _block(self, cid: CID) -> bytes:
        if cid.mh_code == ipfs.IDENTITY:
            return cid.digest
        cached = self.cache.get(cid.multihash)
        if cached is not None:
            self.cache.move_to_end(cid.multihash)
            return cached
        block = self.source.get(cid)
        if len(block) > ipfs.MAX_BLOCK:
            raise IpfsBlockError(f"ipfs block {cid} from {self.gateway} is over 2 MiB: refused")
        self.blocks += 1
        self.cache[cid.multihash] = block
        self.cache_bytes += len(block)
        while self.cache_bytes > 32 << 20:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= len(old)
        return block

    def _write(self, data: bytes) -> None:
        self.written += len(data)
        if self.written > self.max_size:
            raise TooLarge(f"{self.label}: file exceeds the {self.max_size}-byte limit")
        self.out.write(data)
        if self.prog:
            self.prog.advance(len(data))

    def run(self, root: CID) -> int:
        stack: list[tuple[CID, int | None]] = [(root, None)]
        visits = 0
        while stack:
            cid, expected = stack.pop()
            visits += 1
            if visits > 10_000_000:
                self._bad(root, "has an absurd number of nodes")
            self.source.hint(c for c, _ in reversed(stack[-64:]))
            block = self._block(cid)
            children = self._visit(cid, block, expected)
            if self.prog is None and self.progress:
                total = expected if expected is not None else self._filesize_hint
                self.prog = Progress(self.label, total or 0)
            stack.extend(reversed(children))
        if self.prog:
            self.prog.finish()
        return self.written

    _filesize_hint = 0

    def _visit(self, cid: CID, block: bytes, expected: int | None) -> list[tuple[CID, int]]:
        if cid.codec == ipfs.RAW:
            if expected is not None and len(block) != expected:
                self._bad(cid, f"holds {len(block)} bytes where its parent says {expected}")
            self._write(block)
            return []
        if cid.codec != ipfs.DAG_PB:
            self._bad(cid, f"has codec 0x{cid.codec:x}")
        try:
            node = ipfs.PBNode.decode(block)
            unixfs = ipfs.UnixFSData.decode(node.data or b"")
        except ValueError as exc:
            self._bad(cid, f"is malformed ({exc})")
        if unixfs.type not in (ipfs.UNIXFS_FILE, ipfs.UNIXFS_RAW):
            self._bad(cid, f"is UnixFS type {unixfs.type}, not a file")
        total = len(unixfs.data) + sum(unixfs.blocksizes)
        if unixfs.filesize is not None and unixfs.filesize != total:
            self._bad(cid, f"says filesize {unixfs.filesize} but its parts add up to {total}")
        if expected is not None and total != expected:
            self._bad(cid, f"holds {total} bytes where its parent says {expected}")
        if len(unixfs.blocksizes) != len(node.links):
            self._bad(cid, f"has {len(node.links)} links but {len(unixfs.blocksizes)} blocksizes")
        if expected is None:
            if total > self.max_size:
                raise TooLarge(
                    f"ipfs {cid} is {total} bytes, over the {self.max_size}-byte limit for a "
                    "boot file; is this the right CID?"
                )
            self._filesize_hint = total
        if unixfs.data:
            self._write(unixfs.data)
        return [(link.cid, size) for link, size in zip(node.links, unixfs.blocksizes, strict=True)]


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
