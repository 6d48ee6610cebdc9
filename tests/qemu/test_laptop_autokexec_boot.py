"""The laptop side for real: a Debian laptop OS set up by `setup-server-os` boots in QEMU,
its autokexec service sees the link NIC and kexecs into the bootlink ramdisk, which then
serves the laptop's own disk, kernel and initrd to a desktop.

The laptop: a systemd Debian root (tests/osroots.py, "laptop") with bootlink installed
the way a user installs it (pip, no dependencies: Debian's python3 libraries are there),
`bootlink setup-server-os --root` run on it, then written to an ext4 disk image that the
VM boots from. Nothing is recorded or stubbed: udev/systemd start the unit, autokexec
loads and executes the kexec itself. The desktop is `bootlink client --dry-run --json`
in the namespace on the other end of the link NIC, and then libnbd through the plan's
nbd_uri: the export must be the VM's disk.

Slow (minutes): marked `qemu`. Needs root.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import osroots

from bootlink.cli import main
from bootlink.common.keys import generate_key_file
from bootlink.ramdisk import e2e, qemu

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, namespaces, taps)"),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))
LINK = qemu.Nic("bltap0", qemu.mac_for(7))
DISK_MIB = 2048
READ_BACK = 64 << 10  # bytes of the export compared with the disk image
NBD_READ = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
sys.stdout.write(h.pread(int(sys.argv[2]), 0).hex())
"""


def install_bootlink(root: Path) -> None:
    """bootlink into the root's /usr/local, as `pip install --no-deps` would put it."""
    site = root / "usr/local/lib/python3.11/dist-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(REPO)],
        check=True,
    )  # fmt: skip
    shutil.rmtree(site / "bin", ignore_errors=True)


def laptop_disk(work: Path, ramdisk_dir: Path) -> tuple[Path, Path, Path, Path]:
    """(disk image, key, the root's kernel, its initrd): a set-up laptop OS, as a disk."""
    pristine, kernel = osroots.os_root("laptop", CACHE)
    root = osroots.copy_root(pristine, work / "root")
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
        # the laptop's own /etc/fstab: root on the virtio disk, read-write
        (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
        (root / "etc/hostname").write_text("laptop\n")
        # the journal on the serial console too, so the test (and its log) sees autokexec
        conf = root / "etc/systemd/journald.conf.d"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "console.conf").write_text("[Journal]\nForwardToConsole=yes\n")
        vmlinuz = work / "vmlinuz"
        initrd = work / "initrd.img"
        shutil.copyfile(root / "boot" / f"vmlinuz-{kernel.release}", vmlinuz)
        shutil.copyfile(root / "boot" / f"initrd.img-{kernel.release}", initrd)
        disk = work / "laptop.img"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "laptop", "-d", str(root), str(disk),
             f"{DISK_MIB}M"],
            check=True,
        )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return disk, key, vmlinuz, initrd


def test_laptop_os_autokexecs_into_the_server_and_serves_its_disk(tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs e2fsprogs")
    ramdisk_dir = tmp_path / "ramdisk"
    e2e.prepare(CACHE, ramdisk_dir)
    disk, key, vmlinuz, initrd = laptop_disk(tmp_path, ramdisk_dir)
    client_cfg = tmp_path / "desktop.yaml"
    client_cfg.write_text(
        f"key: {key}\nlink: {{interfaces: [{LINK.tap}]}}\nclient: {{timeout: 120}}\n"
    )
    console = tmp_path / "laptop-console.log"
    with qemu.namespace() as ns:
        ns.add_tap(LINK.tap)
        vm = qemu.VM(
            vmlinuz, initrd, "root=/dev/vda rw console=ttyS0 loglevel=5 panic=-1",
            [LINK], ns, memory_mib=1536, log_path=console,
            extra=["-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"],
        )  # fmt: skip
        with vm:
            fail = r"Kernel panic|bootlink-milestone: bootlink \S+ failed|rescue shell"
            vm.wait_for(r"bootlink\.autokexec: kexec into", 600, fail=fail)
            vm.wait_for(r"bootlink-milestone: bootlink server", 300, fail=fail)
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
    assert plan["kernel_sha256"] == hashlib.sha256(vmlinuz.read_bytes()).hexdigest()
    assert plan["initrd_sha256"] == hashlib.sha256(initrd.read_bytes()).hexdigest()
    assert "root=/dev/vda" in plan["cmdline"], plan["cmdline"]
    with open(disk, "rb") as f:
        assert bytes.fromhex(read.stdout) == f.read(READ_BACK)
    print("laptop milestones:", vm.console.milestones())
