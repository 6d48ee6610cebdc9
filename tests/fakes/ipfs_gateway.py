"""A local stand-in for an IPFS node: trustless gateway (:8080) + kubo's /api/v0/add (:5001).

No kubo can be installed here, so this speaks what bootlink uses, the way kubo does:
- GET /ipfs/{cid}?format=raw (or Accept: application/vnd.ipld.raw): one block,
  Content-Type application/vnd.ipld.raw, Content-Disposition attachment "{cid}.bin";
- GET /ipfs/{cid}?format=car (or Accept: application/vnd.ipld.car): a CAR v1 stream of the
  whole DAG in depth-first order with duplicates, chunked transfer encoding,
  Content-Type "application/vnd.ipld.car; version=1; order=dfs; dups=y";
- GET /ipfs/{cid} without either: the file itself (a trusted, deserialised response:
  the "plain HTTP" baseline of the benchmark);
- POST /api/v0/add?cid-version=&raw-leaves=&chunker=size-N: multipart upload, answers
  NDJSON {"Name", "Hash", "Size"} lines with X-Chunked-Output: 1, as kubo does.
The DAGs are built by bootlink.common.ipfs, which test_ipfs.py pins to kubo's CIDs.

Faults for tests: `corrupt` (block multihashes served with one byte flipped),
`truncate_after` (CAR ends cleanly after N blocks), `wrong_roots` (CAR header lists a
bogus root: clients must ignore it), `lie_cid` (add answers a wrong Hash).
Run standalone: python ipfs_gateway.py --listen ADDR --port N (prints "READY <port>").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bootlink.common import ipfs

try:  # tests import the fakes as a package; bench and namespace tests run them as scripts
    from fakes._send import send_parts
except ImportError:
    from _send import send_parts


class IpfsState:
    def __init__(self) -> None:
        self.blocks: dict[bytes, bytes] = {}  # multihash -> block (kubo keys by multihash)
        self.codecs: dict[bytes, int] = {}
        self.corrupt: set[bytes] = set()
        self.truncate_after: int | None = None
        self.wrong_roots = False
        self.lie_cid = False
        self.requests = 0

    def put(self, cid: ipfs.CID, block: bytes) -> None:
        self.blocks[cid.multihash] = block
        self.codecs[cid.multihash] = cid.codec

    def add_bytes(self, data: bytes, layout: ipfs.Layout) -> tuple[ipfs.CID, int]:
        imp = ipfs.Importer(layout, self.put)
        imp.update(data)
        root = imp.finish()
        return root, imp.root_tsize

    def get(self, cid: ipfs.CID) -> bytes | None:
        block = self.blocks.get(cid.multihash)
        if block is not None and cid.multihash in self.corrupt:
            block = bytes([block[0] ^ 0xFF]) + block[1:] if block else b"\xff"
        return block

    def walk(self, cid: ipfs.CID):
        """(cid, block) depth-first, duplicates included (CAR order=dfs, dups=y)."""
        block = self.get(cid)
        if block is None:
            return
        yield cid, block
        if cid.codec == ipfs.DAG_PB:
            for link in ipfs.decode_file_node(self.blocks[cid.multihash]).links:
                yield from self.walk(link)

    def file_bytes(self, cid: ipfs.CID):
        for c, block in self.walk(cid):
            if c.codec == ipfs.RAW:
                yield block
            else:  # a view into the stored block, as kubo does not copy either
                data = ipfs.decode_file_node(block).data
                if data:
                    yield data


class GatewayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kubo-fake"
    state: IpfsState

    def setup(self) -> None:
        super().setup()
        # Go servers (Bee, kubo) disable Nagle; without this, header and body go out as
        # two segments and each small response waits for a delayed ACK (~40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        pass

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text_error(self, status: int, msg: str) -> None:
        self._send(status, msg.encode() + b"\n", "text/plain; charset=utf-8")

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    # ------------------------------------------------------------ gateway
    def do_GET(self) -> None:
        self.state.requests += 1
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if not url.path.startswith("/ipfs/"):
            self._text_error(404, "404 page not found")
            return
        cid_text = url.path[len("/ipfs/") :].strip("/")
        try:
            cid = ipfs.CID.parse(cid_text)
        except ValueError as exc:
            self._text_error(400, f'invalid path "/ipfs/{cid_text}": {exc}')
            return
        fmt = (query.get("format") or [""])[0]
        accept = self.headers.get("Accept", "")
        if not fmt:
            if "application/vnd.ipld.raw" in accept:
                fmt = "raw"
            elif "application/vnd.ipld.car" in accept:
                fmt = "car"
        if cid.multihash not in self.state.blocks:
            self._text_error(404, f"ipfs resolve -r /ipfs/{cid_text}: block was not found locally")
            return
        common = {
            "X-Ipfs-Path": f"/ipfs/{cid_text}",
            "X-Ipfs-Roots": cid_text,
            "Cache-Control": "public, max-age=29030400, immutable",
            "X-Content-Type-Options": "nosniff",
        }
        if fmt == "raw":
            block = self.state.get(cid)
            self._send(
                200,
                block,
                "application/vnd.ipld.raw",
                {
                    **common,
                    "Etag": f'"{cid_text}.raw"',
                    "Content-Disposition": f'attachment; filename="{cid_text}.bin"',
                },
            )
        elif fmt == "car":
            self._car(cid, cid_text, common)
        elif fmt:
            self._text_error(400, f"unsupported format {fmt!r}")
        else:
            self._file(cid, common)

    do_HEAD = do_GET

    def _car(self, cid: ipfs.CID, cid_text: str, common: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.ipld.car; version=1; order=dfs; dups=y")
        self.send_header("Content-Disposition", f'attachment; filename="{cid_text}.car"')
        self.send_header("Etag", f'W/"{cid_text}.car.dfs.y"')
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in common.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        root = ipfs.CID.for_block(b"bogus root", ipfs.RAW, 1) if self.state.wrong_roots else cid
        self._chunk(ipfs.encode_car_header([root]))
        for n, (c, block) in enumerate(self.state.walk(cid)):
            if self.state.truncate_after is not None and n >= self.state.truncate_after:
                break
            raw = c.to_bytes()
            prefix = ipfs.encode_varint(len(raw) + len(block)) + raw
            # One HTTP chunk per section, the block sent from where it is stored (kubo
            # does not copy blocks in Python either; joining them cost 2.5x the CPU of
            # serving the file, which made the benchmark measure this fake).
            send_parts(
                self.connection, [b"%x\r\n" % (len(prefix) + len(block)), prefix, block, b"\r\n"]
            )
        self.wfile.write(b"0\r\n\r\n")

    def _file(self, cid: ipfs.CID, common: dict) -> None:
        size = _file_size(self.state, cid)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.send_header("Etag", f'"{cid}"')
        for k, v in common.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        # The parts go out as they are stored, a few per sendmsg, like the CAR sections:
        # joining them in Python first would slow this plain download, the baseline the
        # benchmark holds verified fetches against.
        parts: list[bytes] = []
        for part in self.state.file_bytes(cid):
            parts.append(part)
            if len(parts) == 16:
                send_parts(self.connection, parts)
                parts.clear()
        send_parts(self.connection, parts)

    # ------------------------------------------------------------ kubo RPC
    def do_POST(self) -> None:
        self.state.requests += 1
        url = urllib.parse.urlsplit(self.path)
        body = self._body()
        if url.path != "/api/v0/add":
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            layout = _layout_from_query(q)
            name, data = _multipart_file(self.headers.get("Content-Type", ""), body)
        except ValueError as exc:
            self._send(
                400,
                json.dumps({"Message": str(exc), "Code": 0, "Type": "error"}).encode() + b"\n",
                "application/json",
            )
            return
        root, tsize = self.state.add_bytes(data, layout)
        shown = str(root)
        if self.state.lie_cid:
            shown = str(ipfs.CID.for_block(data + b"!", root.codec, root.version))
        line = json.dumps({"Name": name, "Hash": shown, "Size": str(tsize)}) + "\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Chunked-Output", "1")
        self.send_header("Trailer", "X-Stream-Error")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header(
            "Access-Control-Allow-Headers", "X-Stream-Output, X-Chunked-Output, X-Content-Length"
        )
        self.send_header(
            "Access-Control-Expose-Headers", "X-Stream-Output, X-Chunked-Output, X-Content-Length"
        )
        self.end_headers()
        self._chunk(line.encode())
        self.wfile.write(b"0\r\n\r\n")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))


def _file_size(state: IpfsState, cid: ipfs.CID) -> int:
    block = state.blocks[cid.multihash]
    if cid.codec == ipfs.RAW:
        return len(block)
    node = ipfs.PBNode.decode(block)
    unixfs = ipfs.UnixFSData.decode(node.data or b"")
    return unixfs.filesize if unixfs.filesize is not None else len(unixfs.data)


def _layout_from_query(q: dict[str, str]) -> ipfs.Layout:
    version = int(q.get("cid-version", "0"))
    raw = q.get("raw-leaves", "true" if version == 1 else "false") == "true"
    chunker = q.get("chunker", "size-262144")
    if not chunker.startswith("size-"):
        raise ValueError(f"chunker {chunker!r} not supported by this test node")
    size = int(chunker[5:])
    if not 0 < size <= ipfs.MAX_BLOCK - 1024:
        raise ValueError("chunker size too large: max 2MiB")
    if q.get("trickle", "false") == "true":
        raise ValueError("trickle layout not supported by this test node")
    if version == 0 and raw:
        version = 1  # as kubo: raw leaves imply CIDv1
    links = int(q.get("max-file-links", "174"))
    return ipfs.Layout("query", size, links, raw, version)


def _multipart_file(ctype: str, body: bytes) -> tuple[str, bytes]:
    if not ctype.startswith("multipart/form-data"):
        raise ValueError("file argument 'path' is required")
    params = dict(p.strip().split("=", 1) for p in ctype.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"').encode()
    if not boundary:
        raise ValueError("multipart boundary missing")
    start = body.find(b"--" + boundary)
    head_end = body.find(b"\r\n\r\n", start)
    if start < 0 or head_end < 0:
        raise ValueError("malformed multipart body")
    head = body[start:head_end].decode("utf-8", "replace")
    name = ""
    for line in head.split("\r\n"):
        if line.lower().startswith("content-disposition"):
            for part in line.split(";"):
                part = part.strip()
                if part.startswith("filename="):
                    name = urllib.parse.unquote(part[9:].strip('"'))
    end = body.find(b"\r\n--" + boundary, head_end + 4)
    if end < 0:
        raise ValueError("multipart body not terminated")
    return name, body[head_end + 4 : end]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        # Clients dropping keep-alive connections (or a verifier hanging up on a lying
        # node) are normal here; anything else is a bug in the fake and is printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(host: str = "127.0.0.1", port: int = 0, state: IpfsState | None = None):
    handler = type("Handler", (GatewayHandler,), {"state": state or IpfsState()})
    cls = _Server6 if ":" in host else _Server
    return cls((host, port), handler)


@contextlib.contextmanager
def serving(state: IpfsState | None = None, host: str = "127.0.0.1", port: int = 0):
    """(state, base URL) of a fake node serving in a thread until the block ends."""
    state = state or IpfsState()
    srv = make_server(host, port, state)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    h, p = srv.server_address[:2]
    try:
        yield state, f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}"
    finally:
        srv.shutdown()
        srv.server_close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args(argv)
    srv = make_server(args.listen, args.port)
    print(f"READY {srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
