"""`bootlink server` given bad inputs: a server.disk that is no disk is refused at start-up
with one line naming the fix; a disk that vanishes later is named to the client (not
blamed on the key); a peer that drops mid-request or sends absurdly nested JSON costs one
log line, never a traceback, and the server keeps serving.

Everything runs in network namespaces named blsrv-* over veths created here.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from netlab import BOOTLINK, Lab, wait_for_log
from smallfs import mounted_tmpfs
from test_link_netns import run_client, write_config

from bootlink.common import eax, wire
from bootlink.common.errors import BootlinkError, ProtocolError
from bootlink.common.keys import generate_key_file
from bootlink.server.http_service import REASON_MAX, _one_line
from bootlink.server.nbd_export import check_exportable

pytestmark = pytest.mark.netns

if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)

HINT = "name the laptop's disk (a block device such as /dev/nvme0n1) or a disk image file"
SRV_IF, DESK_IF = "blsrv-link0", "blsrv-eth0"


@pytest.fixture
def lab():
    lab = Lab(tag=f"srv-{os.getpid()}")  # namespaces blsrv-<pid>-<role>-<n>
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def payload(tmp_path):
    (tmp_path / "kernel").write_bytes(os.urandom(1 << 20))
    (tmp_path / "initrd").write_bytes(os.urandom(1 << 20))
    with open(tmp_path / "disk.img", "wb") as f:
        f.write(b"BOOTLINK-TEST-DISK")
        f.truncate(4 << 20)
    generate_key_file(tmp_path / "key")
    return tmp_path


def _bad_disk(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A server.disk of this kind, and what the error must say about it."""
    if kind == "directory":
        (tmp_path / "srv").mkdir()
        return tmp_path / "srv", "is a directory: " + HINT
    if kind == "empty file":
        (tmp_path / "empty.img").write_bytes(b"")
        return tmp_path / "empty.img", "is empty: " + HINT
    if kind == "char device":
        return Path("/dev/zero"), "is a character device, not a disk: " + HINT
    if kind == "fifo":  # opening one would block: it must be refused without opening it
        os.mkfifo(tmp_path / "fifo")
        return tmp_path / "fifo", "is a FIFO, not a disk: " + HINT
    assert kind == "missing"
    return tmp_path / "nope.img", "does not exist: fix server.disk in the config; " + HINT


@pytest.mark.parametrize("kind", ["directory", "empty file", "char device", "fifo", "missing"])
def test_bad_disk_is_refused_at_startup_in_one_line(lab, payload, tmp_path, kind):
    disk, expected = _bad_disk(kind, tmp_path)
    host = lab.host("srv")
    lab.cable(host, SRV_IF, lab.host("desk"), DESK_IF)
    cfg = write_config(tmp_path / "s.yaml", payload / "key", payload, [SRV_IF], disk=disk)
    out = host.run([*BOOTLINK, "server", "--config", str(cfg)], timeout=30)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [f"bootlink server: error: server.disk {disk} {expected}"]


def start_server(lab, tmp_path: Path, payload: Path):
    """A server on one cable to a desktop: (server process, desktop host, server address)."""
    server, desk = lab.host("srv"), lab.host("desk")
    lab.cable(server, SRV_IF, desk, DESK_IF)
    cfg = write_config(tmp_path / "s.yaml", payload / "key", payload, [SRV_IF])
    srv = lab.start(server, [*BOOTLINK, "server", "--config", str(cfg)], tmp_path / "srv.log")
    wait_for_log(tmp_path / "srv.log", "serving", srv)
    return srv, desk, f"{server.link_local(SRV_IF)}%{DESK_IF}"


def good_client(desk, payload: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    ccfg = write_config(tmp_path / "c.yaml", payload / "key", payload, [], timeout=5)
    return run_client(desk, [*BOOTLINK, "client", "--config", str(ccfg), "--dry-run", "--json"])


def test_disk_vanishing_later_is_named_to_the_client(lab, payload, tmp_path):
    srv, desk, _addr = start_server(lab, tmp_path, payload)
    (payload / "disk.img").unlink()
    out = good_client(desk, payload, tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert "Traceback" not in out.stderr
    (line,) = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    disk = payload / "disk.img"
    assert f"(503 server not ready: server.disk {disk} does not exist: fix server.disk" in line
    assert "keys differ" not in line and "same key" not in line
    assert "fix that there and retry" in line
    secret = (payload / "key").read_bytes()
    assert secret.hex() not in out.stderr and secret.hex() not in out.stdout
    log = (tmp_path / "srv.log").read_text()
    assert "Traceback" not in log and srv.poll() is None
    # the disk is back: the same server serves it
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    out = good_client(desk, payload, tmp_path)
    assert out.returncode == 0, out.stderr


# A peer that stops mid-request: announces 60 bytes, sends 30, then goes away — quietly
# (FIN) or abruptly (RST, as when the desktop's stack is reset).
DROPPER = textwrap.dedent("""\
    import socket, struct, sys, time
    addr = socket.getaddrinfo(sys.argv[1], 7472, socket.AF_INET6)[0][4]
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(addr)
    head = b"POST /v1/boot HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 60\\r\\n\\r\\n"
    s.sendall(head + b"B" * 30)
    time.sleep(1)
    if sys.argv[2] == "rst":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print("dropped", flush=True)
    """)


WHAT_THE_LOG_SAYS = {
    "fin": "disconnected mid-request (30 of 60 bytes)",
    "rst": "request abandoned (Connection reset by peer)",
}


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_peer_closing_mid_request_is_one_line(lab, payload, tmp_path, how):
    srv, desk, addr = start_server(lab, tmp_path, payload)
    drop = desk.run([*BOOTLINK[:1], "-c", DROPPER, addr, how], timeout=30)
    assert drop.returncode == 0 and "dropped" in drop.stdout, drop.stderr
    wait_for_log(tmp_path / "srv.log", WHAT_THE_LOG_SAYS[how], srv)
    out = good_client(desk, payload, tmp_path)  # the server still serves
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["interface"] == DESK_IF
    log = (tmp_path / "srv.log").read_text()
    assert "Traceback" not in log and "Exception occurred" not in log, log
    assert srv.poll() is None


# An authentic request (sealed under the key) whose JSON is nested 30,000 levels deep.
NESTED = textwrap.dedent("""\
    import http.client, os, sys
    from pathlib import Path
    from bootlink.common import eax, wire
    from bootlink.common.keys import Purpose, load_key_file
    k_xfer = load_key_file(Path(sys.argv[2])).subkey(Purpose.TRANSFER)
    nonce = os.urandom(16)
    header = wire.MAGIC + bytes([wire.T_BOOT_REQUEST])
    body = b"[" * 30000 + b"]" * 30000
    request = header + nonce + eax.seal(k_xfer, nonce, body, header)
    conn = http.client.HTTPConnection(sys.argv[1], 7472, timeout=10)
    conn.request("POST", "/v1/boot", request)
    resp = conn.getresponse()
    print(resp.status, resp.read().decode().strip(), flush=True)
    """)


def test_deeply_nested_sealed_json_is_refused_in_one_line(lab, payload, tmp_path):
    srv, desk, addr = start_server(lab, tmp_path, payload)
    sent = desk.run([*BOOTLINK[:1], "-c", NESTED, addr, str(payload / "key")], timeout=30)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "403 not authenticated"
    wait_for_log(tmp_path / "srv.log", "nested too deeply", srv)
    out = good_client(desk, payload, tmp_path)
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "srv.log").read_text()
    assert "Traceback" not in log and "RecursionError" not in log, log
    assert srv.poll() is None


def test_nested_json_decodes_to_protocol_error():
    k_xfer = os.urandom(32)
    nonce = wire.new_nonce()
    header = wire.MAGIC + bytes([wire.T_BOOT_REQUEST])
    body = b"[" * 30000 + b"]" * 30000
    request = header + nonce + eax.seal(k_xfer, nonce, body, header)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        wire.decode_boot_request(k_xfer, request)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        wire.BootManifest.from_bytes(b'{"a":' * 10000 + b"1" + b"}" * 10000)


def test_read_write_export_of_a_disk_on_a_read_only_filesystem_names_the_fix(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "1m") as ro:
        img = ro / "disk.img"
        img.write_bytes(b"\0" * 4096)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(BootlinkError) as ei:
            check_exportable(img, read_only=False)
        assert str(ei.value) == (
            f"server.disk {img} is not writable (read-only filesystem): "
            "set server.read_only: true, or fix its permissions"
        )
        assert check_exportable(img, read_only=True) == 4096


def test_one_line_reason_is_short_and_single_line():
    text = "disk /x\nvanished:\tfix it " + "y" * 500
    line = _one_line(text)
    assert "\n" not in line and "\t" not in line and len(line) <= REASON_MAX
    assert line.startswith("disk /x vanished: fix it yyy") and line.endswith("...")
