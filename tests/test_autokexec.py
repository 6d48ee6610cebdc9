"""autokexec: the laptop's normal OS becomes the bootlink server on a real trigger only.

Network tests run `bootlink autokexec --record FILE` in network namespaces (the kexec is
the one step recorded instead of executed: this host must keep running) and check what
it would have booted: the ramdisk kernel, the server command line, and an initrd layer
holding the config, the key and the laptop's own boot files.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from netlab import BOOTLINK, Lab, wait_for_log

from bootlink.common import net, wire
from bootlink.common.config import parse_config
from bootlink.common.errors import ConfigError
from bootlink.common.keys import Purpose, generate_key_file, load_key_file
from bootlink.server import autokexec as ak

LAPTOP_MAC = "02:b1:00:00:00:01"
EXTRA = "console=ttyS0 loglevel=4"


# --- pure parts --------------------------------------------------------------------------


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, content) of a newc archive (independent of the writer under test)."""
    out, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[pos : pos + size])
        pos += size
        pos += -pos % 4


def test_cpio_layer_is_what_cpio_reads(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20 | 3))
    path = tmp_path / "layer.cpio"
    with open(path, "wb") as f:
        ak.write_cpio(
            f, [("etc", 0o755, None), ("etc/a", 0o600, b"x" * 5), ("etc/big", 0o644, big)]
        )
    with open(path, "rb") as f:
        listing = subprocess.run(
            ["cpio", "-itv", "--quiet"], stdin=f, capture_output=True, text=True
        )
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert [ln.split()[-1] for ln in lines] == ["etc", "etc/a", "etc/big"]
    assert lines[1].startswith("-rw-------") and lines[0].startswith("drwxr-xr-x")
    entries = read_newc(path.read_bytes())
    assert entries["etc/big"][1] == big.read_bytes()


def test_triggers_are_validated_with_the_fix_named():
    t = ak.triggers_of(
        parse_config("autokexec: {macs: ['AA-BB-CC-DD-EE-0F'], usb_ids: ['0BDA:8153']}")
    )
    assert t.macs == {"aa:bb:cc:dd:ee:0f"} and t.usb_ids == {"0bda:8153"} and t.remote
    for text, needle in [
        ("autokexec: {macs: [aa:bb]}", "aa:bb:cc:dd:ee:ff"),
        ("autokexec: {usb_ids: ['0bda8153']}", "as lsusb shows it"),
        ("autokexec: {confirm_timeout: 0}", "must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            ak.triggers_of(parse_config(text, source="c.yaml"))


def test_desktop_is_recognized_from_cmdline_or_nbd_root():
    assert ak.desktop_reason("root=UUID=x ro bootlink.nbd_host=fe80::1 quiet", "") is not None
    assert ak.desktop_reason("console=ttyS0 bootlink.role=server", "") is not None
    nbd_root = "22 1 43:1 / / rw,relatime shared:1 - ext4 /dev/nbd0p1 rw\n"
    assert "nbd0p1" in ak.desktop_reason("root=UUID=x", nbd_root)
    sda_root = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    assert ak.desktop_reason("root=UUID=x ro quiet", sda_root) is None


def test_served_cmdline_defaults_to_the_running_one():
    cfg = parse_config("server: {boot: {cmdline: ''}}")
    running = "BOOT_IMAGE=/vmlinuz-6.1 root=UUID=abc ro quiet initrd=x bootlink.foo=1"
    assert ak.served_cmdline(cfg, running) == "root=UUID=abc ro quiet"
    cfg = parse_config("server: {boot: {cmdline: 'root=/dev/nbd0p2 rw'}}")
    assert ak.served_cmdline(cfg, running) == "root=/dev/nbd0p2 rw"


def test_usb_id_read_from_sysfs(tmp_path):
    usbdev = tmp_path / "devices" / "pci0000:00" / "0000:00:14.0" / "usb2" / "2-1"
    iface = usbdev / "2-1:1.0"
    iface.mkdir(parents=True)
    (usbdev / "idVendor").write_text("0bda\n")
    (usbdev / "idProduct").write_text("8153\n")
    netdir = tmp_path / "class" / "net" / "enx1"
    netdir.mkdir(parents=True)
    (netdir / "device").symlink_to(iface)
    pci = tmp_path / "devices" / "pci0000:00" / "0000:00:1f.6"
    pci.mkdir(parents=True)
    (tmp_path / "class" / "net" / "eno1").mkdir()
    (tmp_path / "class" / "net" / "eno1" / "device").symlink_to(pci)
    assert ak.usb_id_of("enx1", tmp_path) == "0bda:8153"
    assert ak.usb_id_of("eno1", tmp_path) is None
    assert ak.usb_id_of("missing", tmp_path) is None


def test_missing_ramdisk_refused_at_start_with_the_fix(files):
    cfg = parse_config(files.config_text().replace(str(files.rk), "/nonexistent/vmlinuz"))
    key = generate_key_file(files.dir / "k2")
    with pytest.raises(ConfigError, match="setup-server-os --ramdisk"):
        ak.plan_server(cfg, key, "root=x")


def test_the_ramdisk_keeps_the_laptops_console(files):
    """A laptop booted with console=ttyS0 sees the ramdisk server there too, after its own
    extra_cmdline (its own console= last, so it wins)."""
    cfg = parse_config(files.config_text(extra_cmdline="console=tty1"))
    plan = ak.plan_server(
        cfg, load_key_file(files.key), "root=x console=tty0 console=ttyS0,115200 quiet"
    )
    assert plan.cmdline == (
        "bootlink.role=server bootlink.config=/etc/bootlink/config.yaml "
        "console=tty0 console=ttyS0,115200 console=tty1"
    )


def test_on_the_desktop_it_arms_nothing(files, tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "cmdline").write_text("root=UUID=1 ro bootlink.nbd_host=fe80::2 bootlink.nbd_port=1\n")
    (proc / "self" / "mountinfo").write_text("")
    calls = []
    daemon = ak.Autokexec(parse_config(files.config_text()), executor=calls.append, proc=proc)
    t0 = time.monotonic()
    assert daemon.run() == 0
    assert calls == [] and time.monotonic() - t0 < 2


# --- namespaces ------------------------------------------------------------------------------


class LaptopFiles:
    """What an installed laptop has: key, ramdisk, its own kernel+initrd, a disk."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.key = d / "key"
        generate_key_file(self.key)
        self.rk, self.ri = d / "ramdisk-vmlinuz", d / "ramdisk.img"
        self.rk.write_bytes(os.urandom(200_001))
        self.ri.write_bytes(os.urandom(300_003))  # odd size: the layer must be re-aligned
        self.bk, self.bi = d / "laptop-vmlinuz", d / "laptop-initrd.img"
        self.bk.write_bytes(os.urandom(1 << 20) + b"laptop-kernel")
        self.bi.write_bytes(os.urandom(2 << 20) + b"laptop-initrd")
        self.disk = d / "disk.img"
        with open(self.disk, "wb") as f:
            f.write(b"LAPTOP-DISK" + os.urandom(4096))
            f.truncate(16 << 20)

    def config_text(self, interfaces: tuple[str, ...] = (), **ak_keys) -> str:
        autokexec = {
            "ramdisk_kernel": str(self.rk),
            "ramdisk_initrd": str(self.ri),
            "extra_cmdline": EXTRA,
            "remote_trigger": False,
            **ak_keys,
        }
        return yaml.safe_dump(
            {
                "key": str(self.key),
                "link": {"interfaces": list(interfaces)},
                "server": {
                    "disk": str(self.disk),
                    "boot": {
                        "kernel": str(self.bk),
                        "initrd": str(self.bi),
                        "cmdline": "root=UUID=1234 ro quiet",
                    },
                },
                "client": {"timeout": 25, "download_dir": str(self.dir / "download")},
                "autokexec": autokexec,
            }
        )

    def write_config(self, name: str, interfaces: tuple[str, ...] = (), **ak_keys) -> Path:
        path = self.dir / name
        path.write_text(self.config_text(interfaces, **ak_keys))
        return path

    def layer(self, record: dict) -> dict[str, tuple[int, bytes]]:
        """The files the recorded initrd adds on top of the installed ramdisk."""
        copy = Path(record["initrd_copy"])
        assert copy.stat().st_mode & 0o777 == 0o600  # it holds the key (config layer)
        data = copy.read_bytes()
        ramdisk = self.ri.read_bytes()
        assert data.startswith(ramdisk)
        start = len(ramdisk) + (-len(ramdisk) % 4)
        assert data[len(ramdisk) : start] == b"\0" * (start - len(ramdisk))
        assert hashlib.sha256(data).hexdigest() == record["initrd_sha256"]
        return read_newc(data[start:])


@pytest.fixture
def files(tmp_path) -> LaptopFiles:
    return LaptopFiles(tmp_path)


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


def wait_for_file(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None and not path.exists():
            raise AssertionError(f"autokexec exited {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"no kexec recorded in {timeout} s:\n{log.read_text()}")


def check_record(rec: dict, files: LaptopFiles, reason: str) -> dict[str, tuple[int, bytes]]:
    consoles = ak.console_words(Path("/proc/cmdline").read_text())  # this machine's own
    assert rec["cmdline"] == " ".join(
        ["bootlink.role=server bootlink.config=/etc/bootlink/config.yaml", *consoles, EXTRA]
    )
    assert rec["kernel"] == str(files.rk)
    assert rec["kernel_sha256"] == hashlib.sha256(files.rk.read_bytes()).hexdigest()
    assert reason in rec["reason"], rec["reason"]
    layer = files.layer(rec)
    mode, key = layer["etc/bootlink/key"]
    assert key == files.key.read_bytes() and mode & 0o777 == 0o600
    assert layer["etc/bootlink/boot/vmlinuz"][1] == files.bk.read_bytes()
    assert layer["etc/bootlink/boot/initrd.img"][1] == files.bi.read_bytes()
    served = yaml.safe_load(layer["etc/bootlink/config.yaml"][1])
    assert served["server"]["disk"] == str(files.disk)
    assert served["key"] == "/etc/bootlink/key"
    assert served["server"]["boot"] == {
        "kernel": "/etc/bootlink/boot/vmlinuz",
        "initrd": "/etc/bootlink/boot/initrd.img",
        "cmdline": "root=UUID=1234 ro quiet",
    }
    assert "autokexec" not in served
    return layer


def test_link_nic_appearing_by_mac_triggers_the_kexec(lab, files, tmp_path):
    laptop = lab.host("laptop")
    cfg = files.write_config("mac.yaml", macs=[LAPTOP_MAC.upper()])
    log, rec = tmp_path / "ak.log", tmp_path / "rec.json"
    proc = lab.start(
        laptop, [*BOOTLINK, "-v", "autokexec", "--config", str(cfg), "--record", str(rec)], log
    )
    wait_for_log(log, "armed", proc)
    # Another NIC first: it must not count. Then the link NIC is plugged in.
    laptop.run(
        ["ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1"], check=True
    )
    time.sleep(0.3)
    assert not rec.exists(), log.read_text()
    laptop.run(
        ["ip", "link", "add", "link0", "address", LAPTOP_MAC, "type", "veth", "peer", "name", "x"],
        check=True,
    )
    record = wait_for_file(rec, proc, log)
    check_record(record, files, f"link0 ({LAPTOP_MAC}) appeared")
    assert proc.wait(5) == 0

    # Started (by the udev rule) while the NIC is already there: that counts too.
    rec.unlink()
    proc = lab.start(
        laptop, [*BOOTLINK, "autokexec", "--config", str(cfg), "--record", str(rec)], log
    )
    check_record(wait_for_file(rec, proc, log), files, "link0")


CLIENT_CONFIG = """\
key: {key}
link: {{interfaces: []}}
client: {{timeout: 25, download_dir: {dl}}}
"""


def test_desktop_client_triggers_then_boots_from_the_server_that_comes_up(lab, files, tmp_path):
    """The realistic flow: the desktop's `bootlink client` probes, the laptop's autokexec
    answers with an offer, the client triggers, the (recorded) kexec happens; we then run
    the server exactly as the ramdisk would, from the config layer autokexec built, and the
    same client run finds it and gets the laptop's own kernel and initrd."""
    laptop, desk = lab.host("laptop"), lab.host("desk")
    lab.cable(laptop, "link0", desk, "d0")  # link0 left down: autokexec brings it up
    cfg = files.write_config("remote.yaml", remote_trigger=True, interfaces=["link0"])
    log, rec = tmp_path / "ak.log", tmp_path / "rec.json"
    proc = lab.start(
        laptop, [*BOOTLINK, "-v", "autokexec", "--config", str(cfg), "--record", str(rec)], log
    )
    wait_for_log(log, "armed", proc)
    client_cfg = tmp_path / "client.yaml"
    client_cfg.write_text(CLIENT_CONFIG.format(key=files.key, dl=tmp_path / "dl"))
    client_log = tmp_path / "client.log"
    client = desk.popen(
        [*BOOTLINK, "-v", "client", "--config", str(client_cfg), "--dry-run", "--json"],
        stdout=subprocess.PIPE,
        stderr=open(client_log, "wb"),  # noqa: SIM115
    )
    try:
        _trigger_then_serve(lab, laptop, files, proc, client, rec, log, client_log, tmp_path)
    finally:
        if client.poll() is None:  # SIGINT: the client then returns its probed NICs
            client.send_signal(signal.SIGINT)
            client.wait(10)


def _trigger_then_serve(lab, laptop, files, proc, client, rec, log, client_log, tmp_path):
    record = wait_for_file(rec, proc, log, timeout=15)
    layer = check_record(record, files, "authenticated trigger from fe80:")
    assert proc.wait(5) == 0

    # The ramdisk's server, from what the layer holds (paths moved under a scratch /etc).
    etc = tmp_path / "ramdisk-etc"
    for name, (mode, data) in layer.items():
        if mode & 0o170000 != 0o100000:
            continue  # directories
        p = etc / name.removeprefix("etc/bootlink/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode & 0o777)
    text = layer["etc/bootlink/config.yaml"][1].decode().replace("/etc/bootlink/", f"{etc}/")
    (etc / "config.yaml").write_text(text)
    srv_log = tmp_path / "server.log"
    lab.start(laptop, [*BOOTLINK, "server", "--config", str(etc / "config.yaml")], srv_log)

    out, _ = client.communicate(timeout=40)
    assert client.returncode == 0, client_log.read_text()
    plan = json.loads(out)
    assert plan["kernel_sha256"] == hashlib.sha256(files.bk.read_bytes()).hexdigest()
    assert plan["initrd_sha256"] == hashlib.sha256(files.bi.read_bytes()).hexdigest()
    assert "root=UUID=1234" in plan["cmdline"] and "bootlink.nbd_host=fe80:" in plan["cmdline"]
    assert "to start the bootlink server" in client_log.read_text()


class Desk:
    """A hand-driven desktop in its namespace: probes, and sends what the test says."""

    def __init__(self, ns: str, ifname: str, k_trig: bytes, port: int = 7471) -> None:
        self.k_trig, self.port = k_trig, port
        with net.in_netns(ns):
            self.ifindex = socket.if_nametoindex(ifname)
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.sock.bind(("::", 0, 0, self.ifindex))
        self.sock.settimeout(0.3)

    def offer(self, timeout: float = 10.0) -> tuple[bytes, tuple]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nonce = wire.new_nonce()
            self.sock.sendto(wire.encode_probe(nonce), ("ff02::1", self.port, 0, self.ifindex))
            try:
                data, src = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            return wire.decode_trigger_offer(self.k_trig, nonce, data).challenge, src
        raise AssertionError("no trigger offer")

    def close(self) -> None:
        self.sock.close()


def test_replayed_and_wrongly_keyed_triggers_do_nothing(lab, files, tmp_path):
    laptop, desk = lab.host("laptop"), lab.host("desk")
    lab.cable(desk, "d0", laptop, "link0")
    desk.run(["sysctl", "-qw", "net.ipv6.conf.d0.accept_dad=0"], check=True)
    desk.run(["ip", "link", "set", "d0", "up"], check=True)
    k_trig = load_key_file(files.key).subkey(Purpose.TRIGGER)
    wrong = generate_key_file(tmp_path / "wrong-key").subkey(Purpose.TRIGGER)

    # The console: a pseudo-terminal we answer "n" on.
    master, slave = os.openpty()
    cfg = files.write_config("confirm.yaml", remote_trigger=True, confirm=True, confirm_timeout=20)
    log, rec = tmp_path / "ak.log", tmp_path / "rec.json"
    cmd = [*BOOTLINK, "-v", "autokexec", "--config", str(cfg), "--record", str(rec)]
    proc = lab.start(laptop, [*cmd, "--console", os.ttyname(slave)], log)
    wait_for_log(log, "armed", proc)
    d = Desk(desk.ns, "d0", k_trig)
    try:
        challenge, laptop_addr = d.offer()
        d.sock.sendto(wire.encode_trigger(wrong, challenge), laptop_addr)
        wait_for_log(log, "trigger not sealed with our key", proc)
        valid = wire.encode_trigger(k_trig, challenge)  # the same challenge is still unspent
        d.sock.sendto(valid, laptop_addr)
        prompt = b""
        while b"[Y/n]" not in prompt:
            assert select.select([master], [], [], 10)[0], prompt
            prompt += os.read(master, 1024)
        assert b"Restart this laptop as the bootlink server" in prompt
        os.write(master, b"n\n")
        wait_for_log(log, "declined at the console", proc)
        d.sock.sendto(valid, laptop_addr)  # the replay
        wait_for_log(log, "already used (replay?)", proc)
        assert not rec.exists()
        proc.terminate()
        assert proc.wait(5) == 0

        # Later, a fresh autokexec (the laptop rebooted): the recording is still worthless.
        cfg2 = files.write_config("plain.yaml", remote_trigger=True)
        cmd = [*BOOTLINK, "-v", "autokexec", "--config", str(cfg2), "--record", str(rec)]
        proc = lab.start(laptop, cmd, tmp_path / "ak2.log")
        wait_for_log(tmp_path / "ak2.log", "armed", proc)
        d.sock.sendto(valid, laptop_addr)
        wait_for_log(tmp_path / "ak2.log", "already used (replay?)", proc)
        time.sleep(0.5)
        assert not rec.exists()
        # ...while a fresh exchange with the right key does trigger (it was listening).
        challenge, laptop_addr = d.offer()
        d.sock.sendto(wire.encode_trigger(k_trig, challenge), laptop_addr)
        check_record(wait_for_file(rec, proc, tmp_path / "ak2.log"), files, "trigger from fe80:")
    finally:
        d.close()
        os.close(master)
        os.close(slave)


def test_units_pass_systemd_analyze_verify(tmp_path):
    if subprocess.run(["which", "systemd-analyze"], capture_output=True).returncode != 0:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    from bootlink.server import setup_os

    shipped = setup_os.data_dir() / "bootlink-autokexec.service"
    rendered = tmp_path / "bootlink-autokexec.service"
    rendered.write_bytes(setup_os.render_unit(setup_os.Target(Path("/"))))
    assert sys.executable.encode() in rendered.read_bytes()
    for unit in (shipped, rendered):
        proc = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
        )
        assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    broken = tmp_path / "bootlink-broken.service"
    broken.write_text(rendered.read_text().replace("ExecStart=", "ExecStart=/nonexistent/x "))
    proc = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True)
    assert proc.returncode != 0  # the check can fail


@pytest.mark.parametrize(("typed", "expected"), [(b"\n", True), (b"y\r", True), (b"no\n", False)])
def test_console_question_answers(typed, expected):
    master, slave = os.openpty()
    try:
        confirm = ak.ConsoleConfirmer(os.ttyname(slave))
        result = []
        t = threading.Thread(target=lambda: result.append(confirm("Go?", 10)))
        t.start()
        prompt = b""
        while b"[Y/n]" not in prompt:
            assert select.select([master], [], [], 5)[0]
            prompt += os.read(master, 1024)
        os.write(master, typed)
        t.join(5)
        assert result == [expected]
    finally:
        os.close(master)
        os.close(slave)


def test_console_silence_means_yes_after_the_timeout():
    master, slave = os.openpty()
    try:
        t0 = time.monotonic()
        assert ak.ConsoleConfirmer(os.ttyname(slave))("Go?", 0.5) is True
        assert 0.4 < time.monotonic() - t0 < 3
        assert ak.ConsoleConfirmer("/nonexistent/tty")("Go?", 5) is True  # nobody to ask
    finally:
        os.close(master)
        os.close(slave)
