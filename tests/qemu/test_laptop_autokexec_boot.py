"""The laptop side for real: a Debian laptop OS set up by `setup-server-os` boots in QEMU,
its autokexec service sees the link NIC and kexecs into the bootlink ramdisk, which then
serves the laptop's own disk, kernel and initrd to a desktop.

The laptop: a systemd Debian root (tests/osroots.py, "laptop") with bootlink installed
the way a user installs it (pip, no dependencies: Debian's python3 libraries are there),
`bootlink setup-server-os --root` run on it, then written to an ext4 disk image that the
VM boots from (root=UUID=, as a real install). Nothing is recorded or stubbed: udev and
systemd start the unit, autokexec loads and executes the kexec itself. The desktop is
- `bootlink client --dry-run --json` in the namespace on the other end of the link NIC,
  then libnbd through the plan's nbd_uri: the export must be the VM's disk; or
- a second VM booting the ramdisk as client on the same link (a bridge in the
  namespace): it kexecs the laptop's kernel, whose dracut initrd (hooked by
  setup-server-os) mounts the laptop's disk over NBD, and the laptop's systemd comes up
  on the desktop.

Slow (minutes): marked `qemu`. Needs root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import osroots

from bootlink.cli import main
from bootlink.common.config import config_from_dict
from bootlink.common.keys import generate_key_file
from bootlink.ramdisk import e2e, qemu

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, namespaces, taps)"),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))
LINK = qemu.Nic("bltap0", qemu.mac_for(7))  # the laptop's link NIC (autokexec.macs)
DESKTOP = qemu.Nic("bltap1", qemu.mac_for(8))
DISK_MIB = 2048
READ_BACK = 64 << 10  # bytes of the export compared with the disk image
FAIL_RE = r"Kernel panic|bootlink-milestone: bootlink \S+ failed|rescue shell|[Ee]mergency mode"
NBD_READ = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
sys.stdout.write(h.pread(int(sys.argv[2]), 0).hex())
"""
# A unit in the laptop OS that says on the console which device its root is on: /dev/vda
# on the laptop, /dev/nbd0 when the desktop runs it over the link.
MARKER_UNIT = """[Unit]
Description=bootlink test: where is my root
After=local-fs.target
[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'echo "bootlink-laptop-marker root=$$(findmnt -no SOURCE /) host=$$(uname -n)"'
[Install]
WantedBy=multi-user.target
"""


@dataclasses.dataclass(frozen=True)
class Laptop:
    disk: Path  # pristine: copy it before booting
    key: Path
    vmlinuz: Path
    initrd: Path
    fs_uuid: str
    ramdisk: e2e.Artifacts  # the ramdisk it kexecs into (and a desktop boots as client)

    def cmdline(self) -> str:
        return f"root=UUID={self.fs_uuid} rw console=ttyS0 loglevel=5 panic=-1"

    def boot_copy(self, dest: Path) -> Path:
        subprocess.run(["cp", "--sparse=always", str(self.disk), str(dest)], check=True)
        return dest


def install_bootlink(root: Path) -> None:
    """bootlink into the root's /usr/local, as `pip install --no-deps` would put it."""
    # the root's own python3.X (the host's Debian python builds the C helpers: same release)
    [pyver] = [p.name for p in (root / "usr/lib").glob("python3.*") if p.name[8:].isdigit()]
    site = root / "usr/local/lib" / pyver / "dist-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(REPO)],
        check=True,
    )  # fmt: skip
    shutil.rmtree(site / "bin", ignore_errors=True)


@pytest.fixture(scope="module")
def laptop(tmp_path_factory) -> Laptop:
    """A set-up laptop OS as a disk image, with the ramdisk it kexecs into."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs e2fsprogs")
    work = tmp_path_factory.mktemp("laptop")
    ramdisk_dir = work / "ramdisk"
    art = e2e.prepare(CACHE, ramdisk_dir)
    pristine, kernel = osroots.os_root("laptop", CACHE)
    root = osroots.copy_root(pristine, work / "root")
    fs_uuid = str(uuid.uuid4())
    try:
        install_bootlink(root)
        key = work / "key"
        generate_key_file(key)
        cfg = work / "laptop.yaml"
        cfg.write_text(
            f"key: {key}\nserver: {{disk: /dev/vda}}\nautokexec: {{macs: ['{LINK.mac}']}}\n"
        )
        assert main(
            ["setup-server-os", "--config", str(cfg), "--root", str(root),
             "--ramdisk", str(ramdisk_dir), "--yes"]
        ) == 0  # fmt: skip
        (root / "etc/fstab").write_text(f"UUID={fs_uuid} / ext4 rw,errors=remount-ro 0 1\n")
        (root / "etc/hostname").write_text("laptop\n")
        # the journal on the serial console too, so the test (and its log) sees autokexec
        conf = root / "etc/systemd/journald.conf.d"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "console.conf").write_text("[Journal]\nForwardToConsole=yes\n")
        units = root / "etc/systemd/system"
        (units / "bootlink-test-marker.service").write_text(MARKER_UNIT)
        wants = units / "multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "bootlink-test-marker.service").symlink_to("../bootlink-test-marker.service")
        vmlinuz, initrd = work / "vmlinuz", work / "initrd.img"
        shutil.copyfile(root / "boot" / f"vmlinuz-{kernel.release}", vmlinuz)
        shutil.copyfile(root / "boot" / f"initrd.img-{kernel.release}", initrd)
        disk = work / "laptop.img"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "laptop", "-U", fs_uuid, "-d", str(root),
             str(disk), f"{DISK_MIB}M"],
            check=True,
        )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return Laptop(disk, key, vmlinuz, initrd, fs_uuid, art)


def laptop_vm(laptop: Laptop, disk: Path, ns: qemu.Namespace, console: Path) -> qemu.VM:
    return qemu.VM(
        laptop.vmlinuz, laptop.initrd, laptop.cmdline(), [LINK], ns, memory_mib=1536,
        log_path=console, extra=["-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"],
    )  # fmt: skip


def test_laptop_os_autokexecs_into_the_server_and_serves_its_disk(laptop, tmp_path):
    disk = laptop.boot_copy(tmp_path / "laptop.img")
    client_cfg = tmp_path / "desktop.yaml"
    client_cfg.write_text(
        f"key: {laptop.key}\nlink: {{interfaces: [{LINK.tap}]}}\nclient: {{timeout: 120}}\n"
    )
    with qemu.namespace() as ns:
        ns.add_tap(LINK.tap)
        with laptop_vm(laptop, disk, ns, tmp_path / "laptop-console.log") as vm:
            vm.wait_for("bootlink-laptop-marker root=/dev/vda host=laptop", 400, fail=FAIL_RE)
            vm.wait_for(r"bootlink\.autokexec: kexec into", 200, fail=FAIL_RE)
            vm.wait_for(r"bootlink-milestone: bootlink server", 300, fail=FAIL_RE)
            proc = subprocess.run(
                [*ns.exec_prefix, *e2e._bootlink_cmd(), "client", "--config", str(client_cfg),
                 "--dry-run", "--json"],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:] + "\n" + vm.console.tail(40)
            plan = json.loads(proc.stdout)
            read = subprocess.run(
                [*ns.exec_prefix, sys.executable, "-c", NBD_READ, plan["nbd_uri"],
                 str(READ_BACK)],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert read.returncode == 0, read.stderr[-2000:]
    # The desktop would boot the laptop's own kernel and initrd, from the laptop's disk.
    assert plan["kernel_sha256"] == hashlib.sha256(laptop.vmlinuz.read_bytes()).hexdigest()
    assert plan["initrd_sha256"] == hashlib.sha256(laptop.initrd.read_bytes()).hexdigest()
    assert f"root=UUID={laptop.fs_uuid}" in plan["cmdline"], plan["cmdline"]
    with open(disk, "rb") as f:
        assert bytes.fromhex(read.stdout) == f.read(READ_BACK)
    print("laptop milestones:", vm.console.milestones())


def test_desktop_vm_runs_the_laptops_os_over_the_link(laptop, tmp_path):
    """Two VMs on one link: the laptop autokexecs into the server; the desktop boots the
    ramdisk as client, finds it, kexecs the laptop's kernel, and the laptop's own systemd
    runs on the desktop with its root on /dev/nbd0."""
    disk = laptop.boot_copy(tmp_path / "laptop.img")
    art = laptop.ramdisk
    guest_cfg = config_from_dict(
        {"key": str(laptop.key), "client": {"timeout": 180, "menu_timeout": 0}}, source="desktop"
    )
    desktop_initrd = e2e.make_initrd(art, guest_cfg, tmp_path / "desktop-initrd.img", {})
    with qemu.namespace() as ns:
        for nic in (LINK, DESKTOP):  # the cable: both taps on one bridge
            ns.add_tap(nic.tap)
        bridge = [*ns.exec_prefix, "ip", "link"]
        subprocess.run([*bridge, "add", "blbr0", "type", "bridge"], check=True)
        for dev in (LINK.tap, DESKTOP.tap):
            subprocess.run([*bridge, "set", dev, "master", "blbr0"], check=True)
        subprocess.run([*bridge, "set", "blbr0", "up"], check=True)
        with laptop_vm(laptop, disk, ns, tmp_path / "laptop-console.log") as lvm:
            lvm.wait_for(r"bootlink-milestone: bootlink server", 600, fail=FAIL_RE)
            desktop = qemu.VM(
                art.vmlinuz, desktop_initrd, f"{e2e.GUEST_CMDLINE} bootlink.role=client",
                [DESKTOP], ns, memory_mib=1536, log_path=tmp_path / "desktop-console.log",
            )  # fmt: skip
            with desktop:
                line = desktop.wait_for(
                    r"bootlink-laptop-marker root=\S+ host=laptop", 600, fail=FAIL_RE
                )
    assert "root=/dev/nbd0 " in line.text, line.text
    print("desktop milestones:", desktop.console.milestones(), f"marker at {line.t:.1f} s")
