"""A local stand-in for a Bee node's HTTP API (port 1633), for tests and the benchmark.

No real Bee can be installed here, so this speaks the parts of Bee's API bootlink uses,
the way Bee does:
- POST /bytes: raw bytes in, 201 {"reference": hex} out, Swarm-Tag header; needs the
  Swarm-Postage-Batch-Id header; Swarm-Redundancy-Level must be absent or 0 (this node,
  unlike Bee >= 2.8.1, cannot erasure-code, and says so);
- GET /bytes/{ref}: the joined file; GET /chunks/{addr}: u64le span || payload
  (Content-Type binary/octet-stream); POST /chunks; GET /stamps; GET /health;
- errors as Bee's JSON {"code": N, "message": "..."}.
Chunks are computed with bootlink.common.swarm, i.e. the BMT code under test; the
vectors in test_swarm.py pin that code to bee's own.

Faults for tests: `corrupt` (chunk addresses served with one payload byte flipped),
`missing` (addresses answered 404), `lie_reference` (POST /bytes returns a wrong ref).

Run standalone (e.g. inside a network namespace): python bee.py --listen ADDR --port N;
it prints "READY <port>" once listening.

As the `bee` binary itself (client.bee_node): `bee.py start --config FILE` reads Bee's
YAML options the way `bee start` does (unknown options refused, ultra-light settings
checked, keys written to data-dir), serves the API on `api-addr`, answers GET
/readiness and /peers as Bee does (not ready / no peers for $BOOTLINK_FAKE_BEE_WARMUP
seconds), and retrieves the chunks it lacks from "the Swarm network": the fake node at
$BOOTLINK_FAKE_SWARM (its /chunks), as an ultra-light node retrieves from its peers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bootlink.common import swarm

try:  # tests import the fakes as a package; bench and namespace tests run them as scripts
    from fakes._send import IOV_MAX, send_parts
except ImportError:
    from _send import IOV_MAX, send_parts

BATCH_ID = "f1" * 32  # the one postage batch this node owns


class BeeState:
    def __init__(self) -> None:
        self.chunks: dict[bytes, tuple[int, bytes]] = {}
        self.corrupt: set[bytes] = set()
        self.missing: set[bytes] = set()
        self.lie_reference = False
        self.requests = 0
        self.lock = threading.Lock()
        self._tag = 0
        self.network: str | None = None  # a node to retrieve missing chunks from
        self.warm_at = 0.0  # time.monotonic() before which it is not ready and has no peers

    def store_bytes(self, data: bytes) -> bytes:
        def sink(addr: bytes, span: int, payload: bytes) -> None:
            self.chunks[addr] = (span, payload)

        return swarm.reference_of_bytes(data, sink)

    def next_tag(self) -> int:
        with self.lock:
            self._tag += 1
            return self._tag

    def chunk(self, addr: bytes) -> tuple[int, bytes] | None:
        if addr not in self.chunks and self.network and addr not in self.missing:
            self._retrieve(addr)
        if addr in self.missing or addr not in self.chunks:
            return None
        span, payload = self.chunks[addr]
        if addr in self.corrupt and payload:
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        return span, payload

    def _retrieve(self, addr: bytes) -> None:
        """From "the network", checked as Bee checks retrieved content-addressed chunks."""
        try:
            with urllib.request.urlopen(f"{self.network}/chunks/{addr.hex()}", timeout=10) as r:
                span, payload = swarm.unpack_chunk(r.read())
        except (OSError, ValueError):
            return  # not retrievable (now): a 404 for the client, as Bee answers
        if swarm.chunk_address(span, payload) == addr:
            self.chunks[addr] = (span, payload)

    @property
    def warm(self) -> bool:
        return time.monotonic() >= self.warm_at

    def iter_file(self, ref: bytes):
        """Depth-first join of a stored file (what GET /bytes streams)."""
        got = self.chunk(ref)
        if got is None:
            raise KeyError(ref)
        span, payload = got
        if span <= swarm.CHUNK_SIZE:
            yield payload
            return
        for i in range(0, len(payload), swarm.REF_SIZE):
            yield from self.iter_file(payload[i : i + swarm.REF_SIZE])


class BeeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bee-fake"
    state: BeeState  # set on the subclass by make_server

    def setup(self) -> None:
        super().setup()
        # Go servers (Bee, kubo) disable Nagle; without this, header and body go out as
        # two segments and each small response waits for a delayed ACK (~40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # quiet: tests read stderr of the client only
        pass

    # ------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, extra: dict | None = None) -> None:
        body = json.dumps(obj).encode() + b"\n"
        self._send(status, body, "application/json; charset=utf-8", extra)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"code": status, "message": message})

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

    def _lookup(self, text: str):
        """(address, chunk) for a reference in a path, or None after Bee's error reply."""
        addr = self._addr(text)
        if addr is None:
            self._error(400, "invalid path params")
            return None
        got = self.state.chunk(addr)
        if got is None:
            self._error(404, "Not Found")
            return None
        return addr, got

    def _addr(self, text: str) -> bytes | None:
        try:
            addr = bytes.fromhex(text)
        except ValueError:
            return None
        return addr if len(addr) == 32 else None

    def _stamp_ok(self) -> bool:
        batch = self.headers.get("Swarm-Postage-Batch-Id")
        if not batch or len(batch) != 64:
            self._json(
                400,
                {
                    "code": 400,
                    "message": "invalid header params",
                    "reasons": [{"field": "swarm-postage-batch-id", "error": "want required:"}],
                },
            )
            return False
        if batch.lower() != BATCH_ID:
            self._error(404, "batch with id not found")
            return False
        return True

    # ------------------------------------------------------------ routes
    def do_GET(self) -> None:
        self.state.requests += 1
        path = self.path.split("?", 1)[0]
        version = {"version": "2.6.0-fake", "apiVersion": "7.3.0"}
        if path == "/health":
            self._json(200, {"status": "ok", **version})
        elif path == "/readiness":
            warm = self.state.warm
            self._json(200 if warm else 400, {"status": "ready" if warm else "notReady", **version})
        elif path == "/peers":
            peers = [{"address": f"{i:064x}", "fullNode": True} for i in range(1, 9)]
            self._json(200, {"peers": peers if self.state.warm else []})
        elif path == "/stamps":
            self._json(200, {"stamps": [_stamp()]})
        elif path.startswith("/chunks/"):
            found = self._lookup(path[len("/chunks/") :])
            if found:
                self._send(200, swarm.pack_chunk(*found[1]), "binary/octet-stream")
        elif path.startswith("/bytes/"):
            found = self._lookup(path[len("/bytes/") :])
            if found:
                self._stream_file(found[0], found[1][0])
        else:
            self._error(404, "Not Found")

    do_HEAD = do_GET

    def _stream_file(self, ref: bytes, span: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(span))
        self.send_header("Decompressed-Content-Length", str(span))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if self.command == "HEAD":
            return
        # The chunks' payloads go out as they are, IOV_MAX at a time (see _send.py).
        parts: list[bytes] = []
        try:
            for part in self.state.iter_file(ref):
                parts.append(part)
                if len(parts) == IOV_MAX:
                    send_parts(self.connection, parts)
                    parts = []
            send_parts(self.connection, parts)
        except KeyError:
            self.close_connection = True  # a missing chunk mid-stream: cut it, as Bee does

    def do_POST(self) -> None:
        self.state.requests += 1
        path = self.path.split("?", 1)[0]
        if path not in ("/bytes", "/chunks"):
            self._body()
            self._error(404, "Not Found")
            return
        data = self._body()
        if not self._stamp_ok():
            return
        level = self.headers.get("Swarm-Redundancy-Level")
        if path == "/bytes" and level not in (None, "0"):
            self._error(
                400, f"redundancy level {level} not supported by this test node (set it to 0)"
            )
            return
        if path == "/chunks":
            try:
                span, payload = swarm.unpack_chunk(data)
            except ValueError:
                self._error(400, "invalid chunk data")
                return
            ref = swarm.chunk_address(span, payload)
            self.state.chunks[ref] = (span, payload)
        else:
            ref = self.state.store_bytes(data)
        if self.state.lie_reference:
            ref = bytes([ref[0] ^ 1]) + ref[1:]
        tag = self.state.next_tag()
        self._json(
            201,
            {"reference": ref.hex()},
            {"Swarm-Tag": str(tag), "Access-Control-Expose-Headers": "Swarm-Tag"},
        )


def _stamp() -> dict:
    return {
        "batchID": BATCH_ID,
        "utilization": 0,
        "usable": True,
        "label": "bootlink-test",
        "depth": 20,
        "amount": "100000000",
        "bucketDepth": 16,
        "blockNumber": 1,
        "immutableFlag": False,
        "exists": True,
        "batchTTL": 86400,
    }


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


def make_server(host: str = "127.0.0.1", port: int = 0, state: BeeState | None = None):
    """A ready-to-serve fake Bee; call serve_forever() (e.g. in a thread)."""
    handler = type("Handler", (BeeHandler,), {"state": state or BeeState()})
    cls = _Server6 if ":" in host else _Server
    return cls((host, port), handler)


@contextlib.contextmanager
def serving(state: BeeState | None = None, host: str = "127.0.0.1", port: int = 0):
    """(state, base URL) of a fake node serving in a thread until the block ends."""
    state = state or BeeState()
    srv = make_server(host, port, state)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    h, p = srv.server_address[:2]
    try:
        yield state, f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}"
    finally:
        srv.shutdown()
        srv.server_close()


# `bee start` options (Bee 2.x, cmd/bee/cmd/cmd.go): bee refuses any other
KNOWN_OPTIONS = {
    "data-dir", "cache-capacity", "db-open-files-limit", "db-block-cache-capacity",
    "db-write-buffer-size", "db-disable-seeks-compaction", "password", "password-file",
    "api-addr", "p2p-addr", "nat-addr", "p2p-ws-enable", "bootnode", "network-id",
    "welcome-message", "cors-allowed-origins", "tracing-enable", "tracing-endpoint",
    "tracing-host", "tracing-port", "tracing-service-name", "verbosity",
    "payment-threshold", "payment-tolerance-percent", "payment-early-percent",
    "resolver-options", "bootnode-mode", "swap-factory-address", "swap-initial-deposit",
    "swap-enable", "chequebook-enable", "full-node", "postage-stamp-address",
    "postage-stamp-start-block", "price-oracle-address", "redistribution-address",
    "staking-address", "block-time", "block-sync-interval", "warmup-time", "mainnet",
    "cache-retrieval", "resync", "static-nodes", "allow-private-cidrs", "sleep-after",
    "storage-incentives-enable", "statestore-cache-capacity", "target-neighborhood",
    "neighborhood-suggester", "blockchain-rpc-endpoint", "use-simd-hashing",
}  # fmt: skip


def bee_start(config: Path) -> int:
    """`bee start --config FILE`, as far as bootlink's use of it goes."""
    import yaml

    opts = yaml.safe_load(config.read_text()) or {}
    unknown = sorted(set(opts) - KNOWN_OPTIONS)
    if unknown:
        print(f"Error: unknown parameters: {', '.join(unknown)}", file=sys.stderr)
        return 1
    # Bee 2.x defaults: swap-enable false, full-node false; storage incentives only act
    # on a full node. Without a blockchain endpoint only an ultra-light node can run.
    if opts.get("swap-enable", False) and not opts.get("blockchain-rpc-endpoint"):
        print("Error: swap-enable requires a blockchain-rpc-endpoint", file=sys.stderr)
        return 1
    if opts.get("full-node", False) and not opts.get("blockchain-rpc-endpoint"):
        print("Error: a full node needs a blockchain-rpc-endpoint", file=sys.stderr)
        return 1
    if not opts.get("password") and not opts.get("password-file"):
        print("Error: password is required (password or password-file)", file=sys.stderr)
        return 1
    keys = Path(opts["data-dir"]) / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "swarm.key").write_text(json.dumps({"crypto": "fake, encrypted"}))
    host, _, port = opts.get("api-addr", ":1633").rpartition(":")
    state = BeeState()
    state.network = os.environ.get("BOOTLINK_FAKE_SWARM")
    state.warm_at = time.monotonic() + float(os.environ.get("BOOTLINK_FAKE_BEE_WARMUP", "1"))
    srv = make_server(host or "0.0.0.0", int(port), state)
    print(f'"level"="warning" "msg"="fake bee node listening on {host}:{port}"', flush=True)
    srv.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["start"]:
        sp = argparse.ArgumentParser(prog="bee start")
        sp.add_argument("--config", type=Path, required=True)
        return bee_start(sp.parse_args(argv[1:]).config)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1633)
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
