"""Verified Swarm / IPFS fetch vs a plain HTTP download of the same bytes, same server.

Starts the fake Bee and IPFS nodes (tests/fakes) as separate processes on 127.0.0.1,
uploads one random file to each through the real upload APIs, then downloads it:
- plain:  GET /bytes/{ref} (Bee) or GET /ipfs/{cid} (deserialised), no verification;
- swarm stream: intermediate chunks via /chunks + data via /bytes, every chunk hashed;
- swarm chunks: every chunk via /chunks/{addr}, 128 in flight on 16 pipelined connections;
- ipfs car: one CAR stream, every block checked; ipfs raw: one request per block.
Prints medians of --runs runs and the ratio to the plain runs interleaved with them
(target >= 0.5), and for the Swarm stream the ceiling this machine puts on that ratio:
node and client share its CPUs, so a verified download takes at least (the plain
download's CPU time + the BMT hashing's CPU time) / CPUs, measured in the same run.
With --link-rate (e.g. 1gbit, 10gbit) the nodes sit in a network namespace behind a
veth shaped to that rate (tbf on their side), as a node on the LAN would, and the client
runs in a second namespace: the same comparison over a real link. Files are written to a
tmpfs (--dir, default /dev/shm), as the ramdisk downloads into tmpfs /run/bootlink,
and every download, plain too, ends with the fsync the verified fetch does before its
rename (on a disk that fsync alone costs ~25 ms per 64 MiB here).

    .venv/bin/python bench/bench_fetch.py [--size-mib 64] [--runs 3] [--link-rate 1gbit]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import psutil
from netlab import Host, Lab

from bootlink.client.sources import ipfs as ipfs_src
from bootlink.client.sources import swarm as swarm_src
from bootlink.client.sources._http import HttpClient
from bootlink.common import net, swarm

FAKES = Path(__file__).resolve().parent.parent / "tests" / "fakes"


NODE_IP, CLIENT_IP = "10.231.0.1", "10.231.0.2"  # on the bench's own veth only


def start(script: str, host: Host | None) -> tuple[subprocess.Popen, str]:
    """A fake node on loopback, or on the node side of the shaped link (`host`)."""
    ip = NODE_IP if host else "127.0.0.1"
    cmd = [sys.executable, str(FAKES / script), "--listen", ip, "--port", "0"]
    p = subprocess.Popen(
        ["ip", "netns", "exec", host.ns, *cmd] if host else cmd, stdout=subprocess.PIPE, text=True
    )
    line = p.stdout.readline()
    if not line.startswith("READY"):
        p.kill()
        raise SystemExit(f"{script} did not start")
    return p, f"http://{ip}:{line.split()[1]}"


@contextlib.contextmanager
def shaped_link(rate: str | None) -> Iterator[Host | None]:
    """With a rate: yield the node's namespace, linked by a veth whose node side sends at
    `rate` (tbf), with this thread (and the threads it starts) in the client's namespace.
    Without: yield None and stay on loopback."""
    if not rate:
        yield None
        return
    lab = Lab(tag=f"b{os.getpid()}")
    try:
        node, desk = lab.host("node"), lab.host("desk")
        lab.cable(node, "eth0", desk, "eth0")
        node.run(["ip", "link", "set", "eth0", "up"], check=True)
        node.run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0"], check=True)
        desk.run(["ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0"], check=True)
        # burst: a few GSO packets' worth, so tbf is not the limit below the rate
        tbf = ["tbf", "rate", rate, "burst", "1mb", "latency", "50ms"]
        shaped = node.run(["tc", "qdisc", "add", "dev", "eth0", "root", *tbf])
        if shaped.returncode:
            raise SystemExit(f"--link-rate {rate}: {shaped.stderr.strip()}")
        with net.in_netns(desk.ns):
            yield node
    finally:
        lab.close()


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


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system, every thread, ended ones too) of this process and `pids`."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def metered(fn, pids: list[int], spent: list[float]):
    """`fn`, appending the CPU seconds each call costs this process and `pids` to `spent`."""

    def run() -> None:
        before = cpu_seconds(pids)
        fn()
        spent.append(cpu_seconds(pids) - before)

    return run


def bmt_cpu_seconds(data: bytes, runs: int = 3) -> float:
    """CPU seconds one thread takes to compute the data chunks' BMT addresses (the hashing
    a verified Swarm stream adds to a plain download; the tree above them is ~1% more)."""
    buf, best = bytearray(data), float("inf")
    out = bytearray(32 * -(-len(buf) // swarm.CHUNK_SIZE))
    for _ in range(runs):
        start = time.thread_time()
        swarm.leaf_addresses_into(buf, 0, len(buf), out, 0)
        best = min(best, time.thread_time() - start)
    return best


def ratio_ceiling(plain_wall: float, plain_cpu: float, extra_cpu: float, cpus: int) -> float:
    """The best verified/plain ratio `cpus` shared by node and client allow: the verified
    download needs the plain one's CPU time plus `extra_cpu`, at best spread over all
    CPUs, and is never faster than the plain one."""
    return plain_wall / max(plain_wall, (plain_cpu + extra_cpu) / cpus)


def describe_ceiling(
    plain_wall: float, plain_cpu: float, bmt_cpu: float, wall: float, cpu: float
) -> str:
    """The Swarm stream's ceiling on this machine, how it follows from what was measured,
    and what the verified download measured itself."""
    cpus = os.cpu_count() or 1
    best = ratio_ceiling(plain_wall, plain_cpu, bmt_cpu, cpus)
    return (
        f"ceiling for swarm verified (stream) here: {best:.2f} x plain. The plain download "
        f"costs {plain_cpu * 1e3:.0f} ms of CPU (node + client) in {plain_wall * 1e3:.0f} ms; "
        f"hashing the chunks adds {bmt_cpu * 1e3:.0f} ms ({swarm.backend()}, one core); "
        f"the same {cpus} CPUs run both ends, so verified takes at least "
        f"({plain_cpu * 1e3:.0f} + {bmt_cpu * 1e3:.0f}) / {cpus} ms. Measured: "
        f"{cpu * 1e3:.0f} ms of CPU in {wall * 1e3:.0f} ms"
    )


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
        "--link-rate",
        metavar="RATE",
        help="nodes behind a veth shaped to RATE (tc units: 1gbit, 2500mbit, 10gbit)",
    )
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
    with (
        tempfile.TemporaryDirectory(prefix="bootlink-bench-", dir=args.dir) as tmp,
        shaped_link(args.link_rate) as node,
    ):
        tmpd = Path(tmp)
        src = tmpd / "image.bin"
        src.write_bytes(os.urandom(size))
        out = tmpd / "out.bin"
        try:
            bee_p, bee = start("bee.py", node)
            ipfs_p, gw = start("ipfs_gateway.py", node)
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
            plain_cpu: list[float] = []
            swarm_plain = metered(
                lambda: plain(bee, f"/bytes/{ref.hex()}", out), [bee_p.pid], plain_cpu
            )
            ceiling_line = ""
            for mode in ("stream", "chunks") if args.only != "ipfs" else ():
                runs = args.runs if mode == "stream" else 1
                verified_cpu: list[float] = []
                base, t = paired(
                    swarm_plain,
                    metered(
                        lambda m=mode: swarm_src.fetch(ref, bee, out, mode=m, progress=False),
                        [bee_p.pid],
                        verified_cpu,
                    ),
                    runs,
                    check,
                )
                if mode == "stream":
                    rows.append(("swarm plain GET /bytes", base, base))
                    ceiling_line = describe_ceiling(
                        base,
                        statistics.median(plain_cpu),
                        bmt_cpu_seconds(data),
                        t,
                        statistics.median(verified_cpu),
                    )
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
        f"BMT backend: {swarm.backend()}; {os.cpu_count()} CPUs; files in {args.dir or '/tmp'}; "
        + (f"nodes behind a veth at {args.link_rate}" if args.link_rate else "loopback")
    )
    print(f"{'download':38s} {'MB/s':>8s} {'x plain':>8s}")
    for name, t, base in rows:
        print(f"{name:38s} {size / t / 1e6:8.1f} {base / t:8.2f}")
    if ceiling_line:
        print(ceiling_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
