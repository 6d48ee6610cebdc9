"""What kexec.prepare sets up, proven on real kernels in QEMU (Debian's, the ramdisk's).

One chain of two boots. Kernel A is booted with memmap=16M!512M, so 16 MiB of its RAM
become /dev/pmem0 (nd_e820 + nd_pmem). It copies a test ISO there, as
kexec.stage_iso_in_pmem does, and kexecs (kexec_file_load, as bootlink) kernel B with
the command line and initrd that kexec.prepare made on the host: the same memmap= (from
the range A reported in sysfs, parsed by kexec.legacy_pmem_devices' rules) and B's own
initrd with a root squashfs appended by kexec.attach_rootfs. B must find the ISO's bytes
on its /dev/pmem0 and the rootfs at bootlink.rootfs= in its initramfs.

Slow: marked `qemu`. Needs root (a network namespace for QEMU, as the other QEMU tests).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bootlink.common import kexec
from bootlink.common.bootimage import BootImage, Provenance
from bootlink.ramdisk import kernel as rkernel
from bootlink.ramdisk import qemu

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)"),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))
PMEM_START, PMEM_SIZE = 512 << 20, 16 << 20
MODULES = ["libnvdimm", "nd_btt", "nd_pmem", "nd_e820"]  # dependency order

COMMON_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in {modules}; do insmod /m/$m.ko || echo "FAIL insmod $m"; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/pmem0 ] && break; sleep 1; done
"""

INIT_A = """
echo "A-PMEM $(cat /sys/block/pmem0/device/resource) $(cat /sys/block/pmem0/size)"
dd if=/test.iso of=/dev/pmem0 bs=1M conv=fsync 2>/dev/null || echo "FAIL dd"
kexec -s -l /vmlinuz --initrd=/initrd-b --command-line="$(cat /cmdline-b)" || echo "FAIL kexec"
kexec -e
echo "FAIL kexec -e returned"
"""

INIT_B = """
echo "B-ISO $(head -c {iso_size} /dev/pmem0 | sha256sum)"
for arg in $(cat /proc/cmdline); do
  case "$arg" in bootlink.rootfs=*) echo "B-ROOTFS $(sha256sum ${{arg#bootlink.rootfs=}})";; esac
done
poweroff -f
"""


def _copy_with_libs(binary: str, root: Path) -> None:
    """A dynamically linked host binary and the libraries ldd names, at the same paths."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    for path in [binary, *re.findall(r"(/\S+\.so[.\d]*)", out)]:
        dst = root / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst)


def _initramfs(root: Path, out: Path) -> Path:
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(out, "wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], input=files, cwd=root, stdout=f, check=True
        )
    return out


def _base_root(root: Path, k: rkernel.Kernel, init: str) -> None:
    for d in ("bin", "proc", "sys", "dev", "m", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for m in MODULES:
        shutil.copy2(next(k.modules_dir.rglob(f"{m}.ko")), root / "m" / f"{m}.ko")
    (root / "init").write_text(COMMON_INIT.format(modules=" ".join(MODULES)) + init)
    (root / "init").chmod(0o755)


def test_next_kernel_sees_pmem_iso_and_appended_rootfs(tmp_path):
    if not Path("/bin/busybox").is_file() or shutil.which("kexec") is None:
        pytest.skip("needs busybox-static and kexec-tools")
    k = rkernel.fetch_kernel(CACHE)
    iso = os.urandom(5 << 20) + b"bootlink-test-iso"
    rootfs = os.urandom(300_001)
    (tmp_path / "rootfs.squashfs").write_bytes(rootfs)

    # Kernel B's initrd and command line, made by the code under test.
    root_b = tmp_path / "b"
    _base_root(root_b, k, INIT_B.format(iso_size=len(iso)))
    initrd_b = _initramfs(root_b, tmp_path / "initrd-b.cpio")
    image = BootImage(
        label="b",
        kernel=k.vmlinuz,
        initrd=initrd_b,
        cmdline="console=ttyS0 panic=-1",
        provenance=Provenance("test", "qemu", "test"),
        initrd_sha256=hashlib.sha256(initrd_b.read_bytes()).hexdigest(),
        extra={
            "rootfs": str(tmp_path / "rootfs.squashfs"),
            "rootfs_sha256": hashlib.sha256(rootfs).hexdigest(),
        },
    )
    image = kexec.attach_rootfs(image, tmp_path)
    pmem = kexec.PmemDevice(Path("/dev/pmem0"), PMEM_START, PMEM_SIZE)
    cmdline_b = f"{pmem.memmap} {image.cmdline}"

    # Kernel A's initramfs: busybox, the pmem modules, kexec-tools, B's kernel and initrd.
    root_a = tmp_path / "a"
    _base_root(root_a, k, INIT_A)
    _copy_with_libs(shutil.which("kexec"), root_a)
    shutil.copy2(k.vmlinuz, root_a / "vmlinuz")
    shutil.copy2(image.initrd, root_a / "initrd-b")
    (root_a / "cmdline-b").write_text(cmdline_b)
    (root_a / "test.iso").write_bytes(iso)
    initrd_a = _initramfs(root_a, tmp_path / "initrd-a.cpio")

    ns = qemu.Namespace().create()
    vm = qemu.VM(
        k.vmlinuz,
        initrd_a,
        f"console=ttyS0 panic=-1 {pmem.memmap}",
        [],
        ns,
        memory_mib=768,
        log_path=tmp_path / "console.log",
    )
    try:
        with vm:
            line = vm.wait_for(r"A-PMEM ", 240, fail=r"FAIL|Kernel panic").text
            start, sectors = line.split("A-PMEM ", 1)[1].split()[:2]
            # What kexec.legacy_pmem_devices reads in sysfs is the range memmap= named.
            assert (int(start, 0), int(sectors) * 512) == (PMEM_START, PMEM_SIZE)
            got_iso = vm.wait_for(r"B-ISO ", 300, fail=r"FAIL|Kernel panic").text
            got_rootfs = vm.wait_for(r"B-ROOTFS ", 60, fail=r"FAIL|Kernel panic").text
            vm.wait_exit(60)
    finally:
        ns.close()
    assert hashlib.sha256(iso).hexdigest() in got_iso
    assert hashlib.sha256(rootfs).hexdigest() in got_rootfs
    assert kexec.ROOTFS_PATH in got_rootfs
