"""The CAR receiver's edges: sections split across receive buffers and HTTP reads, blocks
out of DAG order, gateways that send a block once (dups=n), truncation mid-section, and
lies in blocks the walk reads before their hash is checked."""

from __future__ import annotations

import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bootlink.client.sources import ipfs as ipfs_src
from bootlink.common import ipfs

TINY = ipfs.Layout("tiny", 1000, 4, True, 1)  # many small blocks, a deep tree
TINY_V0 = ipfs.Layout("tiny-v0", 1000, 3, False, 0)


def _dag(data: bytes, layout: ipfs.Layout) -> tuple[ipfs.CID, list[tuple[ipfs.CID, bytes]]]:
    """Root and blocks in depth-first order with duplicates (as order=dfs, dups=y)."""
    blocks: dict[bytes, bytes] = {}
    imp = ipfs.Importer(layout, lambda c, b: blocks.__setitem__(c.multihash, b))
    imp.update(data)
    root = imp.finish()

    def walk(cid):
        yield cid, blocks[cid.multihash]
        if cid.codec == ipfs.DAG_PB:
            for link in ipfs.PBNode.decode(blocks[cid.multihash]).links:
                yield from walk(link.cid)

    return root, list(walk(root))


class _Car:
    """One canned CAR answer: body, content type, chunked (in `piece`-byte chunks) or not."""

    def __init__(self, body: bytes, dups: str = "y", chunked: bool = True, piece: int = 777):
        self.body, self.chunked, self.piece = body, chunked, piece
        self.ctype = f"application/vnd.ipld.car; version=1; order=dfs; dups={dups}"


@pytest.fixture
def car_server():
    answer: dict[str, _Car] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            car = answer["car"]
            self.send_response(200)
            self.send_header("Content-Type", car.ctype)
            if car.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(len(car.body)))
            self.end_headers()
            try:
                for i in range(0, len(car.body), car.piece):
                    part = car.body[i : i + car.piece]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if car.chunked else part)
                if car.chunked:
                    self.wfile.write(b"0\r\n\r\n")
            except ConnectionError:
                pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield answer, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def small_buffers(monkeypatch):
    """Buffers barely over one block: nearly every section straddles two of them."""
    monkeypatch.setattr(ipfs_src, "CAR_BUFFER", 1300)
    monkeypatch.setattr(ipfs_src, "CAR_BATCH", 700)
    monkeypatch.setattr(ipfs_src, "CAR_BUFFERS", 3)
    monkeypatch.setattr(ipfs_src, "LOOKAHEAD", 5)  # less than a CID: prefixes split too
    monkeypatch.setattr(ipfs_src, "_SPARE", [])  # not the 3 MiB spares of other tests


def _fetch(url, root, tmp_path):
    return ipfs_src.fetch(root, url, tmp_path / "o", progress=False)


@pytest.mark.parametrize("layout", [TINY, TINY_V0], ids=lambda lay: lay.name)
@pytest.mark.parametrize("chunked,piece", [(True, 1), (True, 777), (False, 4096)])
def test_sections_split_across_buffers_and_reads(
    car_server, small_buffers, tmp_path, layout, chunked, piece
):
    answer, url = car_server
    data = os.urandom(37_123)
    root, blocks = _dag(data, layout)
    answer["car"] = _Car(ipfs.encode_car([root], blocks), chunked=chunked, piece=piece)
    got = _fetch(url, root, tmp_path)
    assert (tmp_path / "o").read_bytes() == data and got.blocks == len(blocks)


def test_blocks_out_of_dag_order_are_kept_until_wanted(car_server, small_buffers, tmp_path):
    answer, url = car_server
    data = os.urandom(20_000)
    root, blocks = _dag(data, TINY)
    shuffled = blocks[:]
    random.Random(6).shuffle(shuffled)
    answer["car"] = _Car(ipfs.encode_car([root], shuffled))
    _fetch(url, root, tmp_path)
    assert (tmp_path / "o").read_bytes() == data


@pytest.mark.parametrize("dups", ["y", "n"])
def test_repeated_blocks_with_and_without_duplicates(car_server, small_buffers, tmp_path, dups):
    """A disk image has many identical (zero) chunks: one CID used many times. A dups=n
    gateway sends it once; dups=y sends it every time, and none of it piles up."""
    answer, url = car_server
    data = bytes(30_000) + os.urandom(1500) + bytes(9000)
    root, blocks = _dag(data, TINY)
    if dups == "n":
        seen: set[bytes] = set()
        blocks = [b for b in blocks if not (b[0].multihash in seen or seen.add(b[0].multihash))]
    answer["car"] = _Car(ipfs.encode_car([root], blocks), dups=dups)
    _fetch(url, root, tmp_path)
    assert (tmp_path / "o").read_bytes() == data


@pytest.mark.parametrize("chunked", [True, False])
def test_car_ending_inside_a_section_is_truncation(car_server, small_buffers, tmp_path, chunked):
    answer, url = car_server
    root, blocks = _dag(os.urandom(9000), TINY)
    car = ipfs.encode_car([root], blocks)
    answer["car"] = _Car(car[: len(car) - 300], chunked=chunked)
    with pytest.raises(ipfs_src.IpfsBlockError, match="truncated") as ei:
        _fetch(url, root, tmp_path)
    assert f"CAR for ipfs {root}" in str(ei.value) and "\n" not in str(ei.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.part").exists()


def test_lie_in_a_node_the_walk_reads_early_is_named(car_server, small_buffers, tmp_path):
    """The walk reads a node before its hash is checked; a lie that makes its structure
    wrong must still be reported as the block failing its CID."""
    answer, url = car_server
    root, blocks = _dag(os.urandom(9000), TINY)
    node = ipfs.PBNode.decode(blocks[0][1])
    unixfs = ipfs.UnixFSData.decode(node.data)
    forged = ipfs.UnixFSData(unixfs.type, b"", unixfs.filesize + 1, unixfs.blocksizes)
    blocks[0] = (root, ipfs.PBNode(node.links, forged.encode()).encode())
    answer["car"] = _Car(ipfs.encode_car([root], blocks))
    with pytest.raises(ipfs_src.IpfsBlockError) as ei:
        _fetch(url, root, tmp_path)
    assert f"ipfs block {root} from {url}" in str(ei.value)
    assert "does not match its CID" in str(ei.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.part").exists()


@pytest.mark.parametrize("which", [1, -1])
def test_bad_leaf_named_in_any_batch(car_server, small_buffers, tmp_path, which):
    """A bad block in the first buffer or in the last one (checked only at the end)."""
    answer, url = car_server
    root, blocks = _dag(os.urandom(9000), TINY)
    cid, block = blocks[which]
    blocks[which] = (cid, bytes([block[0] ^ 1]) + block[1:])
    answer["car"] = _Car(ipfs.encode_car([root], blocks))
    with pytest.raises(ipfs_src.IpfsBlockError, match=f"ipfs block {cid} .*does not match"):
        _fetch(url, root, tmp_path)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.part").exists()


def test_bytes_after_the_dag_are_ignored(car_server, small_buffers, tmp_path):
    answer, url = car_server
    data = os.urandom(5000)
    root, blocks = _dag(data, TINY)
    extra = ipfs.CID.for_block(b"unrelated", ipfs.RAW, 1)
    answer["car"] = _Car(ipfs.encode_car([root], [*blocks, (extra, b"unrelated")]) + b"\x80")
    _fetch(url, root, tmp_path)
    assert (tmp_path / "o").read_bytes() == data


def test_section_span_parses_only_complete_prefixes():
    view = memoryview(ipfs.encode_varint(300) + b"x" * 10)
    assert ipfs.car_section_span(view, 0, 1) is None  # prefix split
    assert ipfs.car_section_span(view, 0, 2) == (2, 302)  # section may extend past end
    with pytest.raises(ipfs.IpfsFormatError, match="block cap"):
        ipfs.car_section_span(memoryview(ipfs.encode_varint(3 << 20)), 0, 4)
    with pytest.raises(ipfs.IpfsFormatError, match="empty"):
        ipfs.car_section_span(memoryview(b"\0"), 0, 1)


@pytest.mark.parametrize("which", [3, 20, -2])
def test_bad_block_named_in_a_batch_hashed_in_lanes(car_server, monkeypatch, tmp_path, which):
    """Batches of ~20 blocks: their SHA-256s are computed side by side (sha256_lanes)
    and the bad one, in whichever lane, is still the one named."""
    monkeypatch.setattr(ipfs_src, "CAR_BUFFER", 40000)
    monkeypatch.setattr(ipfs_src, "CAR_BATCH", 20000)
    monkeypatch.setattr(ipfs_src, "_SPARE", [])
    answer, url = car_server
    data = os.urandom(60000)
    root, blocks = _dag(data, TINY)
    answer["car"] = _Car(ipfs.encode_car([root], blocks))
    _fetch(url, root, tmp_path)
    assert (tmp_path / "o").read_bytes() == data
    cid, block = blocks[which]
    blocks[which] = (cid, block[:-1] + bytes([block[-1] ^ 1]))
    answer["car"] = _Car(ipfs.encode_car([root], blocks))
    (tmp_path / "o").unlink()
    with pytest.raises(ipfs_src.IpfsBlockError, match=f"ipfs block {cid} .*does not match"):
        _fetch(url, root, tmp_path)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.part").exists()
