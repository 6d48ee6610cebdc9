"""Server and client as separate hosts (network namespaces) over veth: the real thing.

A client with four NICs — one to the real server, one to an impostor with another key,
one to a replayer of recorded answers, one dead — must choose the real server, verify
the payload, reach the NBD export and leave no namespace behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from netlab import BOOTLINK, Lab, wait_for_log
from smallfs import mounted_tmpfs

from bootlink.common import wire
from bootlink.common.keys import Purpose, generate_key_file

pytestmark = pytest.mark.netns

if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)


@pytest.fixture
def lab():
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


def write_config(path: Path, key: Path, workdir: Path, interfaces: list[str], **server) -> Path:
    disk = server.get("disk", workdir / "disk.img")
    path.write_text(
        textwrap.dedent(f"""\
        key: {key}
        link: {{interfaces: {json.dumps(interfaces)}}}
        server:
          disk: {disk}
          read_only: {json.dumps(server.get("read_only", False))}
          boot:
            kernel: {workdir / "kernel"}
            initrd: {workdir / "initrd"}
            cmdline: "root=/dev/nbd0p1 ro quiet"
        client:
          timeout: {server.get("timeout", 10)}
          download_dir: {workdir / "download"}
        """)
    )
    return path


def start_server(lab, host, tmp_path: Path, payload: Path, nics=("link0",)):
    """`bootlink server` on `host` serving `payload`'s files on `nics`, once it serves."""
    cfg = write_config(tmp_path / "s.yaml", tmp_path / "key", payload, list(nics))
    srv = lab.start(host, [*BOOTLINK, "server", "--config", str(cfg)], tmp_path / "srv.log")
    wait_for_log(tmp_path / "srv.log", "serving", srv)
    return srv


@pytest.fixture
def payload(tmp_path):
    (tmp_path / "kernel").write_bytes(os.urandom(3 << 20) + b"kernel-end")
    (tmp_path / "initrd").write_bytes(os.urandom(5 << 20) + b"initrd-end")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.write(b"BOOTLINK-TEST-DISK" + os.urandom(1 << 20))
        f.truncate(32 << 20)
    return tmp_path


REPLAYER = textwrap.dedent("""\
    import socket, sys
    recorded = bytes.fromhex(sys.argv[2])
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::", int(sys.argv[1])))
    print("replayer ready", flush=True)
    n = 0
    while True:
        data, addr = s.recvfrom(2048)
        n += 1
        # alternate: the recording verbatim, and with the prober's nonce spliced in
        if n % 2:
            s.sendto(recorded, addr)
        else:
            s.sendto(recorded[:5] + data[5:21] + recorded[21:], addr)
    """)


def test_client_picks_the_real_server_among_impostor_replayer_and_dead(lab, payload, tmp_path):
    key = generate_key_file(tmp_path / "key")
    other = generate_key_file(tmp_path / "other-key")
    desk = lab.host("desk")
    real, impostor, replayer = lab.host("real"), lab.host("impostor"), lab.host("replay")
    # The real server's cable is the last NIC so winning is not an accident of ordering.
    lab.cable(desk, "a-impostor", impostor, "link0")
    lab.cable(desk, "b-replay", replayer, "link0")
    lab.cable(desk, "c-dead", None)
    lab.cable(desk, "d-real", real, "link0")

    srv_cfg = write_config(tmp_path / "server.yaml", tmp_path / "key", payload, ["link0"])
    imp_cfg = write_config(tmp_path / "imp.yaml", tmp_path / "other-key", payload, ["link0"])
    imp = lab.start(impostor, [*BOOTLINK, "server", "--config", str(imp_cfg)], tmp_path / "i.log")
    recorded = wire.encode_answer(
        key.subkey(Purpose.DISCOVERY),
        wire.new_nonce(),
        wire.ServerOffer(7472, 10809, os.urandom(16), "recorded"),
    )
    rep = lab.start(
        replayer, [sys.executable, "-c", REPLAYER, "7471", recorded.hex()], tmp_path / "r.log"
    )
    wait_for_log(tmp_path / "i.log", "serving", imp)
    wait_for_log(tmp_path / "r.log", "replayer ready", rep)
    assert other.key_id() != key.key_id()
    cli_cfg = write_config(tmp_path / "client.yaml", tmp_path / "key", payload, [], timeout=2)
    client = [*BOOTLINK, "-v", "client", "--config", str(cli_cfg), "--dry-run", "--json"]

    # Before the real server runs, the impostor and the replayer are heard — and refused.
    out = run_client(desk, client)
    assert out.returncode == 2 and out.stdout == ""
    assert "not sealed with our key" in out.stderr
    assert "nonce we never sent" in out.stderr or "another probe's nonce" in out.stderr
    last = out.stderr.strip().splitlines()[-1]  # the impostor holds another key: named
    assert "on a-impostor answered with another key" in last  # the replayer may be too
    assert last.endswith(": copy the same key file to both machines (their logs show its key id)")

    srv = lab.start(real, [*BOOTLINK, "server", "--config", str(srv_cfg)], tmp_path / "srv.log")
    wait_for_log(tmp_path / "srv.log", "serving", srv)
    out = run_client(desk, client)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["interface"] == "d-real"
    assert plan["kernel_sha256"] == hashlib.sha256((payload / "kernel").read_bytes()).hexdigest()
    assert plan["initrd_sha256"] == hashlib.sha256((payload / "initrd").read_bytes()).hexdigest()
    real_ll = real.link_local("link0")
    assert plan["server"] == f"{real_ll}%d-real"
    assert plan["cmdline"].startswith("root=/dev/nbd0p1 ro quiet ")
    assert f"bootlink.nbd_host={real_ll}" in plan["cmdline"]
    assert plan["nbd_uri"] == f"nbd://[{real_ll}%25d-real]:10809/bootlink"
    assert (payload / "download" / "kernel").read_bytes() == (payload / "kernel").read_bytes()

    # Every NIC is back in the desktop's namespace and no probe namespace is left.
    links = desk.run(["ip", "-o", "link"]).stdout
    for nic in ("a-impostor", "b-replay", "c-dead", "d-real"):
        assert nic in links
    assert probe_namespaces(out.pid) == []

    # The export serves the disk's exact bytes through libnbd's URI, from the desktop.
    read = desk.run([sys.executable, "-c", NBD_READ, plan["nbd_uri"]], text=False)
    assert read.returncode == 0, read.stderr
    assert read.stdout == (payload / "disk.img").read_bytes()


NBD_READ = textwrap.dedent("""\
    import sys, nbd
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    size = h.get_size()
    out = sys.stdout.buffer
    for off in range(0, size, 1 << 20):
        out.write(h.pread(min(1 << 20, size - off), off))
    """)


def probe_namespaces(pid: int | None = None) -> list[str]:
    """Probe namespaces of the client with this pid (any client if None)."""
    prefix = f"blprobe-{pid}-" if pid else "blprobe-"
    return sorted(p.name for p in Path("/run/netns").glob(prefix + "*"))


def run_client(host, args: list[str]) -> subprocess.CompletedProcess:
    """Run a client to completion, keeping its pid (probe namespace names carry it)."""
    proc = host.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result.pid = proc.pid
    return result


def test_third_host_on_the_link_cannot_read_the_export(lab, payload, tmp_path):
    """Server, desktop and a snooper share one L2 segment (a bridge in the server)."""
    generate_key_file(tmp_path / "key")
    server, desk, snoop = lab.host("srv"), lab.host("desk"), lab.host("snoop")
    server.run(["ip", "link", "add", "br0", "type", "bridge"], check=True)
    lab.cable(server, "p-desk", desk, "eth0")
    lab.cable(server, "p-snoop", snoop, "eth0")
    for port in ("p-desk", "p-snoop"):
        server.run(["ip", "link", "set", port, "master", "br0", "up"], check=True)
    srv = start_server(lab, server, tmp_path, payload, ["br0"])
    ccfg = write_config(tmp_path / "client.yaml", tmp_path / "key", payload, [])
    out = desk.run([*BOOTLINK, "client", "--config", str(ccfg), "--dry-run", "--json"])
    assert out.returncode == 0, out.stderr
    uri = json.loads(out.stdout)["nbd_uri"]
    # the desktop authenticated and can read; the snooper, same segment, cannot
    assert desk.run([sys.executable, "-c", NBD_READ, uri], text=False).returncode == 0
    # same URI: the snooper's NIC is also called eth0 and sees the server's address
    denied = snoop.run([sys.executable, "-c", NBD_READ, uri])
    assert denied.returncode != 0
    log = wait_for_log(tmp_path / "srv.log", "refused: it has not authenticated", srv)
    assert snoop.link_local("eth0") in log


def test_wrong_key_finds_no_server_and_cleans_up(lab, payload, tmp_path):
    generate_key_file(tmp_path / "key")
    generate_key_file(tmp_path / "other-key")
    server, desk = lab.host("srv"), lab.host("desk")
    lab.cable(server, "link0", desk, "eth0")
    lab.cable(desk, "eth1", None)
    start_server(lab, server, tmp_path, payload)
    ccfg = write_config(tmp_path / "c.yaml", tmp_path / "other-key", payload, [], timeout=2)
    out = run_client(desk, [*BOOTLINK, "client", "--config", str(ccfg), "--dry-run", "--json"])
    assert out.returncode == 2
    assert out.stdout == ""
    (line,) = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    # the server did answer: the line says so, who (its link-local address), and the fix
    assert "no bootlink server answered" not in line and "check the cable" not in line
    assert "fe80::" in line and "on eth0 answered with another key: copy the same key" in line
    assert not (payload / "download" / "kernel").exists()
    assert "eth0" in desk.run(["ip", "-o", "link"]).stdout
    assert probe_namespaces(out.pid) == []


def test_nic_vanishing_mid_probe_is_survived(lab, payload, tmp_path):
    generate_key_file(tmp_path / "key")
    desk = lab.host("desk")
    lab.cable(desk, "eth0", None)  # dead: keeps its probe waiting
    lab.cable(desk, "eth1", None)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "key", payload, [], timeout=3)
    proc = desk.popen(
        [*BOOTLINK, "-v", "client", "--config", str(cfg), "--dry-run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lab.procs.append(proc)
    # delete eth0 while its probe namespace holds it
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not probe_namespaces(proc.pid):
        time.sleep(0.02)
    probe_ns = probe_namespaces(proc.pid)
    assert probe_ns, "client never moved a NIC into a probe namespace"
    for ns in probe_ns:
        subprocess.run(["ip", "-n", ns, "link", "del", "eth0"], capture_output=True)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 2, err
    assert "no bootlink server answered" in err
    assert "Traceback" not in err
    links = desk.run(["ip", "-o", "link"]).stdout
    assert "eth1" in links and "eth0:" not in links
    assert probe_namespaces(proc.pid) == []


def test_download_dir_too_small_is_one_line_and_leaves_nothing(lab, payload, tmp_path):
    """The desktop's download directory (a tmpfs in the ramdisk) cannot hold the laptop's
    8 MiB payload: the client says so before downloading, frees its NICs, stops."""
    generate_key_file(tmp_path / "key")
    server, desk = lab.host("srv"), lab.host("desk")
    lab.cable(server, "link0", desk, "eth0")
    start_server(lab, server, tmp_path, payload)
    with mounted_tmpfs(payload / "download", "6m") as small:
        ccfg = write_config(tmp_path / "c.yaml", tmp_path / "key", payload, [])
        out = run_client(desk, [*BOOTLINK, "client", "--config", str(ccfg), "--dry-run"])
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        (line,) = [ln for ln in out.stderr.splitlines() if "error:" in ln]
        assert line.startswith(
            f"bootlink client: error: {small} has 6.0 MiB free but the laptop's boot payload "
            "takes 8.0 MiB: free space there or download to a larger filesystem"
        )
        assert os.listdir(small) == []
    assert "eth0" in desk.run(["ip", "-o", "link"]).stdout
    assert probe_namespaces(out.pid) == []


def test_transfer_cut_mid_stream_is_retried(lab, tmp_path):
    """The laptop side dies mid-download (cable yanked, server restarted): the client
    throws the partial payload away, finds the server again and completes."""
    generate_key_file(tmp_path / "key")
    work = Path("/dev/shm") / f"bootlink-test-{os.getpid()}"
    work.mkdir()
    try:
        (work / "kernel").write_bytes(os.urandom(1 << 20))
        with open(work / "initrd", "wb") as f:
            for _ in range(400):
                f.write(os.urandom(1 << 20))
        with open(work / "disk.img", "wb") as f:
            f.truncate(8 << 20)
        server, desk = lab.host("srv"), lab.host("desk")
        lab.cable(server, "link0", desk, "eth0")
        cfg = write_config(tmp_path / "s.yaml", tmp_path / "key", work, ["link0"], timeout=60)
        ccfg = write_config(tmp_path / "c.yaml", tmp_path / "key", work, [], timeout=60)
        srv = lab.start(server, [*BOOTLINK, "server", "--config", str(cfg)], tmp_path / "1.log")
        wait_for_log(tmp_path / "1.log", "serving", srv)
        client = desk.popen(
            [*BOOTLINK, "-v", "client", "--config", str(ccfg), "--dry-run", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lab.procs.append(client)
        part = work / "download" / "initrd.part"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (part.exists() and part.stat().st_size):
            time.sleep(0.005)
        assert part.exists(), "the download never started"
        srv.kill()  # the stream is cut mid-file
        srv.wait()
        srv2 = lab.start(server, [*BOOTLINK, "server", "--config", str(cfg)], tmp_path / "2.log")
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
        assert "attempt 1:" in err and "truncated" in err
        plan = json.loads(out)
        digest = hashlib.sha256((work / "initrd").read_bytes()).hexdigest()
        assert plan["initrd_sha256"] == digest
        assert hashlib.sha256((work / "download" / "initrd").read_bytes()).hexdigest() == digest
        assert not part.exists()
        assert srv2.poll() is None
    finally:
        shutil.rmtree(work, ignore_errors=True)


HOLD_NBD = textwrap.dedent("""\
    import sys, time, nbd
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    print("connected", flush=True)
    time.sleep(60)
    """)


def test_sigterm_stops_server_and_its_nbdkit(lab, payload, tmp_path):
    generate_key_file(tmp_path / "key")
    server, desk = lab.host("srv"), lab.host("desk")
    lab.cable(server, "link0", desk, "eth0")
    ccfg = write_config(tmp_path / "c.yaml", tmp_path / "key", payload, [])
    srv = start_server(lab, server, tmp_path, payload)
    out = desk.run([*BOOTLINK, "client", "--config", str(ccfg), "--dry-run", "--json"])
    assert out.returncode == 0, out.stderr
    holder = lab.start(
        desk, [sys.executable, "-c", HOLD_NBD, json.loads(out.stdout)["nbd_uri"]], tmp_path / "h"
    )
    wait_for_log(tmp_path / "h", "connected", holder)

    def nbdkits() -> list[str]:
        found = []
        for pid in server.run(["ip", "netns", "pids", server.ns]).stdout.split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "nbdkit":
                    found.append(pid)
            except FileNotFoundError:  # a process that just exited (e.g. `ip` itself)
                pass
        return found

    assert nbdkits(), "no nbdkit serves the open connection"
    srv.terminate()
    assert srv.wait(timeout=10) == 0
    assert nbdkits() == []
    assert "server stopped" in (tmp_path / "srv.log").read_text()


def test_nics_left_by_a_killed_client_are_reclaimed(lab, payload, tmp_path):
    """A client killed mid-probe (SIGKILL, power) leaves its namespace holding a NIC:
    the next client brings the NIC back and removes the namespace."""
    generate_key_file(tmp_path / "key")
    server, desk = lab.host("srv"), lab.host("desk")
    lab.cable(server, "link0", desk, "eth0")
    start_server(lab, server, tmp_path, payload)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"blprobe-{dead.pid}-1"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    lab.hosts.append(type(desk)(stale))  # removed by the lab even if the client fails
    desk.run(["ip", "link", "set", "eth0", "netns", stale], check=True)
    ccfg = write_config(tmp_path / "c.yaml", tmp_path / "key", payload, [])
    out = run_client(desk, [*BOOTLINK, "client", "--config", str(ccfg), "--dry-run", "--json"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["interface"] == "eth0"
    assert not Path("/run/netns", stale).exists()


def test_replugged_laptop_nic_gets_its_nbd_export_back(lab, payload, tmp_path):
    """The laptop's USB adapter is pulled and plugged back in (new ifindex, same MAC): the
    desktop's NBD client can reconnect without authenticating again."""
    generate_key_file(tmp_path / "key")
    server, desk = lab.host("srv"), lab.host("desk")
    lab.cable(server, "link0", desk, "eth0")
    macs = {
        "srv": server.run(["cat", "/sys/class/net/link0/address"]).stdout.strip(),
        "desk": desk.run(["cat", "/sys/class/net/eth0/address"]).stdout.strip(),
    }
    ccfg = write_config(tmp_path / "c.yaml", tmp_path / "key", payload, [])
    srv = start_server(lab, server, tmp_path, payload)
    out = run_client(desk, [*BOOTLINK, "client", "--config", str(ccfg), "--dry-run", "--json"])
    assert out.returncode == 0, out.stderr
    uri = json.loads(out.stdout)["nbd_uri"]

    server.run(["ip", "link", "del", "link0"], check=True)  # unplugged: both ends vanish
    wait_for_log(tmp_path / "srv.log", "link link0 gone", srv)
    lab.cable(server, "link0", desk, "eth0")  # plugged back: new ifindexes
    server.run(["ip", "link", "set", "link0", "address", macs["srv"]], check=True)
    desk.run(["ip", "link", "set", "eth0", "address", macs["desk"]], check=True)
    desk.run(["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"], check=True)
    desk.run(["ip", "link", "set", "eth0", "up"], check=True)
    wait_for_log(tmp_path / "srv.log", "NBD export reopened", srv)
    desk.link_local("eth0")
    read = desk.run([sys.executable, "-c", NBD_READ, uri], text=False)
    assert read.returncode == 0, read.stderr
    assert read.stdout == (payload / "disk.img").read_bytes()


# (delay after "probing", signals sent SIGNAL_GAP apart): timeout(1) signals the child
# and then its process group, so two SIGTERMs are common; SIGINT is Ctrl-C (pressed
# twice by the impatient). A second signal that lands in the cleanup of the first is
# what used to lose NICs; sent back to back, the two usually merge into one.
INTERRUPTS = [
    (0.0, ("SIGTERM", "SIGTERM")),
    (0.05, ("SIGTERM",)),
    (0.1, ("SIGTERM", "SIGTERM")),
    (0.2, ("SIGINT", "SIGINT")),
    (0.35, ("SIGTERM", "SIGTERM")),
    (0.5, ("SIGTERM",)),
    (0.75, ("SIGTERM", "SIGTERM")),
    (1.0, ("SIGINT",)),
    (1.5, ("SIGTERM", "SIGTERM")),
]
SIGNAL_GAP = 0.03


def test_interrupt_at_any_moment_of_the_probe_loses_no_nic(lab, payload, tmp_path):
    """SIGTERM/SIGINT (once or twice) anywhere in the probe: before the NICs move, while
    they sit in probe namespaces (one with carrier and nobody answering, one dead and
    held back by MoveOrder), while they come home. Each time both NICs are back in the
    desktop's namespace with both veth ends alive, no probe namespace is left, and the
    client ends with the one-line "interrupted"."""
    generate_key_file(tmp_path / "key")
    desk, other = lab.host("desk"), lab.host("other")
    lab.cable(desk, "eth0", other, "peer0")  # carrier, but no server answers
    lab.cable(desk, "eth1", None)  # dead cable: its turn comes after MoveOrder.HOLD
    void = lab.hosts[-1]
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "key", payload, [], timeout=5)
    for delay, signals in INTERRUPTS:
        log = tmp_path / f"client-{delay}.log"
        with open(log, "wb") as err:
            proc = desk.popen(
                [*BOOTLINK, "client", "--config", str(cfg), "--dry-run"],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        lab.procs.append(proc)
        wait_for_log(log, "probing eth0, eth1", proc)
        time.sleep(delay)
        for i, name in enumerate(signals):
            time.sleep(SIGNAL_GAP if i else 0)
            proc.send_signal(getattr(signal, name))
        proc.wait(timeout=15)
        what = f"{'+'.join(signals)} {delay} s into the probe"
        text = log.read_text()
        assert "Traceback" not in text, f"{what}:\n{text}"
        assert text.splitlines()[-1].endswith("bootlink: interrupted"), f"{what}:\n{text}"
        assert proc.returncode == 130, f"{what}:\n{text}"
        for host, nic in ((desk, "eth0"), (desk, "eth1"), (other, "peer0"), (void, "peer")):
            shown = host.run(["ip", "link", "show", nic])
            assert shown.returncode == 0, f"{what}: {nic} gone from {host.ns}\n{text}"
        assert probe_namespaces(proc.pid) == [], what
