"""`setup-server-os` makes initrds that really mount root over NBD, for both generators.

One Debian root with initramfs-tools, one with dracut (cached mmdebstrap roots, see
tests/osroots.py); setup-server-os hooks each and regenerates its initrd in a chroot.
That initrd then boots in QEMU:
- alone: the Debian kernel with the command line bootlink's client gives it, the disk
  exported by nbdkit on the link-local address of the guest's second NIC (the first is a
  dead cable: the hook must pick the NIC by MAC);
- in the whole chain: the bootlink ramdisk as client finds a `bootlink server`, downloads
  and kexecs the kernel with that initrd (the e2e client scenario).
Either way the root's init prints a marker naming the root device it sees.

Slow (minutes each): marked `qemu`. Needs root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import osroots

from bootlink.cli import main
from bootlink.common.keys import generate_key_file
from bootlink.ramdisk import e2e, qemu, target
from bootlink.ramdisk.kernel import fetch_kernel

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, namespaces, taps)"),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))
SERVER_LL = "fe80::b1:1"
FLAVOURS = ["dracut", "initramfs-tools"]


@pytest.fixture(scope="module", params=FLAVOURS)
def hooked_initrd(request, tmp_path_factory) -> Path:
    """The initrd setup-server-os regenerated in a fresh copy of the flavour's root."""
    flavour = request.param
    work = tmp_path_factory.mktemp(f"os-{flavour}")
    pristine, kernel = osroots.os_root(flavour, CACHE)
    root = osroots.copy_root(pristine, work / "root")
    try:
        generate_key_file(work / "key")
        cfg = work / "laptop.yaml"
        cfg.write_text(f"key: {work / 'key'}\nserver: {{disk: /dev/sda}}\n")
        initrd = root / "boot" / f"initrd.img-{kernel.release}"
        before = initrd.read_bytes()
        assert main(["setup-server-os", "--config", str(cfg), "--root", str(root), "--yes"]) == 0
        assert initrd.read_bytes() != before, "setup-server-os did not regenerate the initrd"
        out = work / f"initrd-{flavour}.img"
        shutil.copyfile(initrd, out)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def nbdkit(ns: qemu.Namespace, disk: Path, log: Path):
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                *ns.exec_prefix,
                "nbdkit",
                "--foreground",
                "--verbose",
                "--port",
                "10809",
                "file",
                str(disk),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # nbdkit may ignore TERM with a client attached
        proc.wait(5)


def as_os_tree(img: Path, work: Path) -> None:
    """Give the test root an /etc/os-release, as every real root has: a systemd initrd
    (dracut's) switches only into a tree that has one. debugfs edits the ext4 in place."""
    part = work / "root.ext4"
    mib = target.DISK_MIB - target.PART_START_MIB - 1
    at = target.PART_START_MIB
    subprocess.run(
        ["dd", f"if={img}", f"of={part}", "bs=1M", f"skip={at}", f"count={mib}", "status=none"],
        check=True,
    )
    release = work / "os-release"
    release.write_text('NAME="bootlink test root"\nID=bootlink-test\n')
    proc = subprocess.run(
        ["debugfs", "-w", "-R", f"write {release} /etc/os-release", str(part)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "rror" not in proc.stderr, proc.stderr
    subprocess.run(
        ["dd", f"if={part}", f"of={img}", "bs=1M", f"seek={at}", "conv=notrunc", "status=none"],
        check=True,
    )
    part.unlink()


def test_initrd_alone_mounts_root_over_nbd(hooked_initrd, tmp_path):
    kernel = fetch_kernel(CACHE)
    disk_info = target.build_target_disk(CACHE)
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(disk_info.image), str(disk)], check=True)
    as_os_tree(disk, tmp_path)
    nics = [qemu.Nic("bltapdead", qemu.mac_for(0x31)), qemu.Nic("bltaplive", qemu.mac_for(0x32))]
    cmdline = (
        f"root=UUID={disk_info.fs_uuid} init=/sbin/init {e2e.TARGET_CMDLINE} "
        f"bootlink.nbd_host={SERVER_LL} "
        f"bootlink.nbd_port=10809 bootlink.nbd_export=bootlink bootlink.if_mac={nics[1].mac}"
    )
    console = tmp_path / "console.log"
    with qemu.namespace() as ns:
        for nic in nics:
            ns.add_tap(nic.tap)
        subprocess.run(
            [
                *ns.exec_prefix,
                "ip",
                "-6",
                "addr",
                "add",
                f"{SERVER_LL}/64",
                "dev",
                "bltaplive",
                "nodad",
            ],
            check=True,
        )
        with nbdkit(ns, disk, tmp_path / "nbdkit.log"):
            vm = qemu.VM(kernel.vmlinuz, hooked_initrd, cmdline, nics, ns, log_path=console)
            with vm:
                line = vm.wait_for(
                    disk_info.marker,
                    240,
                    fail=r"Kernel panic|[Ee]mergency|rescue|Gave up waiting|\(initramfs\)",
                )
    assert "root=/dev/nbd0p1 ext4" in line.text, line.text
    print(f"{hooked_initrd.name}: root marker after {line.t:.1f} s")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> e2e.Artifacts:
    return e2e.prepare(CACHE, tmp_path_factory.mktemp("ramdisk"))


def test_whole_chain_boots_the_hooked_initrd(artifacts, hooked_initrd, tmp_path, monkeypatch):
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(artifacts.disk.image), str(disk)], check=True)
    as_os_tree(disk, tmp_path)
    # The served command line, as a laptop's would be: its init named (systemd's initrd
    # execs it after switch-root; the test root has no systemd to re-execute).
    monkeypatch.setattr(e2e, "TARGET_CMDLINE", f"init=/sbin/init {e2e.TARGET_CMDLINE}")
    art = dataclasses.replace(
        artifacts,
        target_initrd=hooked_initrd,
        disk=dataclasses.replace(artifacts.disk, image=disk),
    )
    res = e2e.run_client_scenario(art, tmp_path / "boot")
    assert res.ok, f"{res.detail}\nmilestones: {res.milestones}\nconsole: {res.console_log}"
    assert artifacts.disk.marker in res.marker
    assert "root=/dev/nbd0p1 ext4" in res.marker, res.marker
    print(f"{hooked_initrd.name} milestones:", res.milestones)


ROOTFS_INIT = """#!/bin/busybox sh
# The image's root: show what / is and that it can be written, then power off.
/bin/busybox mount -t proc proc /proc
root=$(/bin/busybox awk '$2 == "/" {print $1, $3}' /proc/mounts | /bin/busybox tail -n 1)
echo written >/probe && w=$(/bin/busybox cat /probe)
echo "bootlink-rootfs-test {token} root=$root write=$w"
/bin/busybox poweroff -f
"""


def test_initrd_boots_an_image_root_squashfs(hooked_initrd, tmp_path):
    """A published image with a root squashfs: kexec.attach_rootfs appends it to the
    hooked initrd (as the client does before kexec) and the initrd makes it the root,
    read-only squashfs under a writable tmpfs overlay."""
    from bootlink.common import kexec
    from bootlink.common.bootimage import BootImage, Provenance, sha256_file

    if shutil.which("mksquashfs") is None:
        pytest.skip("needs squashfs-tools")
    kernel = fetch_kernel(CACHE)
    tree = tmp_path / "tree"
    for d in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "etc", "usr/lib"):
        (tree / d).mkdir(parents=True)
    shutil.copy2(target.BUSYBOX, tree / "bin" / "busybox")
    os.symlink("busybox", tree / "bin" / "sh")
    token = os.urandom(8).hex()
    (tree / "sbin" / "init").write_text(ROOTFS_INIT.replace("{token}", token))
    (tree / "sbin" / "init").chmod(0o755)
    # a systemd initrd (dracut's) switches only into a tree that names its OS
    (tree / "etc" / "os-release").write_text('NAME="bootlink rootfs test"\nID=bootlink-test\n')
    squash = tmp_path / "rootfs.squashfs"
    subprocess.run(
        ["mksquashfs", str(tree), str(squash), "-quiet", "-noappend", "-all-root"], check=True
    )
    image = BootImage(
        label="rootfs-image",
        kernel=kernel.vmlinuz,
        initrd=hooked_initrd,
        cmdline=e2e.TARGET_CMDLINE,
        provenance=Provenance("test", "qemu", "test"),
        initrd_sha256=sha256_file(hooked_initrd),
        extra={"rootfs": str(squash), "rootfs_sha256": sha256_file(squash)},
    )
    image = kexec.attach_rootfs(image, tmp_path)
    console = tmp_path / "console.log"
    with qemu.namespace() as ns:
        vm = qemu.VM(kernel.vmlinuz, image.initrd, image.cmdline, [], ns, log_path=console)
        with vm:
            line = vm.wait_for(
                f"bootlink-rootfs-test {token}",
                240,
                fail=r"Kernel panic|[Ee]mergency|rescue|Gave up waiting|\(initramfs\)",
            )
    assert "root=bootlink-root overlay" in line.text, line.text
    assert "write=written" in line.text, line.text
    print(f"{hooked_initrd.name}: rootfs marker after {line.t:.1f} s")
