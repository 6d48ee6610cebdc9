"""Verified Swarm / IPFS fetch vs a plain HTTP download of the same bytes, same server.

Starts the fake Bee and IPFS nodes (tests/fakes) as separate processes on 127.0.0.1,
uploads one random file to each through the real upload APIs, then downloads it:
- plain:  GET /bytes/{ref} (Bee) or GET /ipfs/{cid} (deserialised), no verification;
- swarm stream: intermediate chunks via /chunks + data via /bytes, every chunk hashed;
- swarm chunks: every chunk via /chunks/{addr}, 128 in flight, pipelined on 2 connections;
- ipfs car: one CAR stream, every block checked; ipfs raw: one request per block.
Prints medians of --runs runs and the ratio to the plain runs interleaved with them
(target >= 0.5). Files are written
to a tmpfs (--dir, default /dev/shm), as the ramdisk downloads into tmpfs /run/bootlink,
and every download, plain too, ends with the fsync the verified fetch does before its
rename (on a disk that fsync alone costs ~25 ms per 64 MiB here).

    .venv/bin/python bench/bench_fetch.py [--size-mib 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bootlink.client.sources import ipfs as ipfs_src
from bootlink.client.sources import swarm as swarm_src
from bootlink.client.sources._http import HttpClient
from bootlink.common import swarm

FAKES = Path(__file__).resolve().parent.parent / "tests" / "fakes"


def start(script: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(
        [sys.executable, str(FAKES / script), "--listen", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline()
    if not line.startswith("READY"):
        p.kill()
        raise SystemExit(f"{script} did not start")
    return p, f"http://127.0.0.1:{line.split()[1]}"


def plain(url: str, path: str, out: Path) -> None:
    http = HttpClient(url)
    resp = http.request("GET", path)
    assert resp.status == 200, resp.status
    with open(out, "wb") as f:
        while block := resp.read1(1 << 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())  # as the verified fetches do before renaming into place
    http.close()


def paired(base_fn, fn, runs: int, check) -> tuple[float, float]:
    """Median seconds of base_fn and fn, run interleaved (ABBA...) so that both see the
    same machine: on 2 shared cores the load changes between runs."""
    base_t, fn_t = [], []
    for i in range(runs):
        for which in (base_fn, fn) if i % 2 == 0 else (fn, base_fn):
            t = time.perf_counter()
            which()
            (base_t if which is base_fn else fn_t).append(time.perf_counter() - t)
            check()  # the bytes are right (untimed)
    return statistics.median(base_t), statistics.median(fn_t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=("swarm", "ipfs"), help="measure just one of them")
    ap.add_argument(
        "--layouts",
        default="kubo-v0,kubo-v1,v1-2025",
        help="IPFS layouts to measure, comma-separated (default: all three)",
    )
    ap.add_argument(
        "--ipfs-modes", default="car,raw", help="IPFS fetch modes, comma-separated (car,raw)"
    )
    shm = Path("/dev/shm")
    ap.add_argument(
        "--dir",
        type=Path,
        default=shm if shm.is_dir() else None,
        help="where the files go (default: /dev/shm, a tmpfs like the ramdisk's)",
    )
    args = ap.parse_args()
    size = args.size_mib << 20
    procs = []
    with tempfile.TemporaryDirectory(prefix="bootlink-bench-", dir=args.dir) as tmp:
        tmpd = Path(tmp)
        src = tmpd / "image.bin"
        src.write_bytes(os.urandom(size))
        out = tmpd / "out.bin"
        try:
            bee_p, bee = start("bee.py")
            ipfs_p, gw = start("ipfs_gateway.py")
            procs += [bee_p, ipfs_p]
            batch = swarm_src.find_batch(bee)
            ref = swarm_src.upload_file(src, bee, batch, progress=False)
            cids = {
                lay: ipfs_src.add_file(src, gw, lay, progress=False)
                for lay in args.layouts.split(",")
                if args.only != "swarm"
            }
            data = src.read_bytes()

            def check() -> None:
                assert out.read_bytes() == data

            rows = []
            swarm_plain = lambda: plain(bee, f"/bytes/{ref.hex()}", out)  # noqa: E731
            for mode in ("stream", "chunks") if args.only != "ipfs" else ():
                runs = args.runs if mode == "stream" else 1
                base, t = paired(
                    swarm_plain,
                    lambda m=mode: swarm_src.fetch(ref, bee, out, mode=m, progress=False),
                    runs,
                    check,
                )
                if mode == "stream":
                    rows.append(("swarm plain GET /bytes", base, base))
                rows.append((f"swarm verified ({mode})", t, base))
            for lay, cid in cids.items():
                ipfs_plain = lambda c=cid: plain(gw, f"/ipfs/{c}", out)  # noqa: E731
                for i, mode in enumerate(args.ipfs_modes.split(",")):
                    base_i, t = paired(
                        ipfs_plain,
                        lambda c=cid, m=mode: ipfs_src.fetch(c, gw, out, mode=m, progress=False),
                        args.runs,
                        check,
                    )
                    if i == 0:
                        rows.append((f"ipfs plain GET /ipfs ({lay})", base_i, base_i))
                    rows.append((f"ipfs verified {mode} ({lay})", t, base_i))
        finally:
            for p in procs:
                p.terminate()
                p.wait()
    print(
        f"{args.size_mib} MiB, median of {args.runs} runs (chunks mode: 1 run); "
        f"BMT backend: {swarm.backend()}; {os.cpu_count()} CPUs; files in {args.dir or '/tmp'}"
    )
    print(f"{'download':38s} {'MB/s':>8s} {'x plain':>8s}")
    for name, t, base in rows:
        print(f"{name:38s} {size / t / 1e6:8.1f} {base / t:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
