"""kexec.prepare: a root squashfs or an ISO appended to the initrd, an ISO staged in pmem.

The kernel side (that Linux unpacks the appended cpio, that the next kernel sees the
staged ISO on /dev/pmem0) is proven in tests/qemu/test_kexec_extras_boot.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from bootlink.common import kexec
from bootlink.common.bootimage import BootImage, Provenance
from bootlink.common.errors import BootlinkError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image(tmp_path: Path, initrd: bytes | None, **extra: str) -> BootImage:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    ipath = None
    if initrd is not None:
        ipath = tmp_path / "initrd.img"
        ipath.write_bytes(initrd)
    return BootImage(
        label="t",
        kernel=kernel,
        initrd=ipath,
        cmdline="quiet",
        provenance=Provenance("swarm", "ref", "test"),
        kernel_sha256=_sha(b"kernel"),
        initrd_sha256=_sha(initrd) if initrd is not None else "",
        extra=dict(extra),
    )


@pytest.mark.parametrize("initrd", [b"\x1f\x8b" + os.urandom(1001), None])
def test_rootfs_appended_as_cpio_after_the_initrd(tmp_path, initrd):
    rootfs = os.urandom(70001)
    (tmp_path / "root.squashfs").write_bytes(rootfs)
    img = _image(
        tmp_path, initrd, rootfs=str(tmp_path / "root.squashfs"), rootfs_sha256=_sha(rootfs)
    )
    out = kexec.prepare(img, tmp_path)
    data = out.initrd.read_bytes()
    assert out.initrd_sha256 == _sha(data)
    assert out.cmdline == f"quiet bootlink.rootfs={kexec.ROOTFS_PATH}"
    assert "rootfs" not in out.extra and kexec.prepare(out, tmp_path) == out  # attached once
    start = len(initrd or b"")
    assert data[:start] == (initrd or b"")
    _unpack_appended(data, start, tmp_path / "x")
    assert (tmp_path / "x" / kexec.ROOTFS_PATH.lstrip("/")).read_bytes() == rootfs


def test_rootfs_changed_after_verification_refused(tmp_path):
    (tmp_path / "root.squashfs").write_bytes(b"evil")
    img = _image(
        tmp_path, b"i", rootfs=str(tmp_path / "root.squashfs"), rootfs_sha256=_sha(b"good")
    )
    with pytest.raises(BootlinkError, match=r"root squashfs .* changed after it was verified"):
        kexec.prepare(img, tmp_path)


def test_initrd_changed_before_rootfs_attached_refused(tmp_path):
    (tmp_path / "root.squashfs").write_bytes(b"r")
    img = _image(
        tmp_path, b"initrd", rootfs=str(tmp_path / "root.squashfs"), rootfs_sha256=_sha(b"r")
    )
    img.initrd.write_bytes(b"swapped")
    with pytest.raises(BootlinkError, match=r"initrd .* changed after it was verified"):
        kexec.prepare(img, tmp_path)


def _fake_pmem(tmp_path: Path, start: int, size: int) -> tuple[Path, Path]:
    """A sysfs with /sys/block/pmem0 (range start/size) and a file standing in for the device."""
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    blk = sys_root / "block" / "pmem0"
    (blk / "device").mkdir(parents=True)
    (blk / "device" / "resource").write_text(f"{start:#x}\n")
    (blk / "size").write_text(f"{size // 512}\n")
    dev_root.mkdir()
    (dev_root / "pmem0").write_bytes(b"\xee" * size)
    return sys_root, dev_root


def _iso_image(tmp_path: Path, iso: bytes, digest: str | None = None) -> BootImage:
    (tmp_path / "d.iso").write_bytes(iso)
    return dataclasses.replace(
        _image(tmp_path, b"i"),
        cmdline="memmap=1M!4096M boot=live components",
        extra={
            "iso": str(tmp_path / "d.iso"),
            "iso_sha256": digest or _sha(iso),
            "memmap": "memmap=1M!4096M",
        },
    )


def test_iso_copied_to_pmem_and_next_kernel_given_the_same_range(tmp_path):
    sys_root, dev_root = _fake_pmem(tmp_path, 0x1_0000_0000 + (8 << 20), 8 << 20)
    iso = os.urandom(3 << 20)
    out = kexec.stage_iso_in_pmem(_iso_image(tmp_path, iso), sys_root, dev_root)
    assert (dev_root / "pmem0").read_bytes()[: len(iso)] == iso
    assert out.cmdline == "memmap=8M!4104M boot=live components"
    assert out.extra["pmem_device"] == str(dev_root / "pmem0")
    assert "memmap" not in out.extra  # staged once


def test_iso_needs_a_pmem_device_big_enough(tmp_path):
    sys_root, dev_root = _fake_pmem(tmp_path, 1 << 32, 1 << 20)
    with pytest.raises(BootlinkError, match=r"no /dev/pmem device of 3 MiB .* memmap=1G!4G"):
        kexec.stage_iso_in_pmem(_iso_image(tmp_path, bytes(3 << 20)), sys_root, dev_root)
    with pytest.raises(BootlinkError, match="no /dev/pmem device"):
        kexec.stage_iso_in_pmem(_iso_image(tmp_path, b"x"), tmp_path / "nosys", dev_root)


def test_iso_changed_after_verification_refused(tmp_path):
    sys_root, dev_root = _fake_pmem(tmp_path, 1 << 32, 1 << 20)
    img = _iso_image(tmp_path, b"tampered", digest=_sha(b"original"))
    with pytest.raises(BootlinkError, match=r"ISO .* changed after it was verified"):
        kexec.stage_iso_in_pmem(img, sys_root, dev_root)


def _unpack_appended(data: bytes, after: int, dest: Path) -> None:
    """GNU cpio reads the archive appended after byte `after` exactly as the kernel will."""
    cpio_at = data.index(b"070701", after)
    assert cpio_at % 4 == 0 and not data[after:cpio_at].strip(b"\0")  # kernel's alignment
    dest.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=data[cpio_at:], cwd=dest, check=True)


def test_iso_appended_to_the_initrd_where_its_cmdline_says(tmp_path):
    initrd, iso = b"\x1f\x8b" + os.urandom(999), os.urandom(300001)
    (tmp_path / "d.iso").write_bytes(iso)
    inner = "/bootlink/image.iso"
    img = dataclasses.replace(
        _image(tmp_path, initrd),
        cmdline=f"boot=live components fromiso={inner}",
        extra={
            "iso": str(tmp_path / "d.iso"),
            "iso_sha256": _sha(iso),
            "initrd_iso": inner,
            "initrd_hook": "/scripts/live-premount/x",
            "initrd_hook_script": "#!/bin/sh\nmodprobe loop\n",
        },
    )
    out = kexec.prepare(img, tmp_path)
    data = out.initrd.read_bytes()
    assert out.initrd_sha256 == _sha(data) and data[: len(initrd)] == initrd
    assert out.cmdline == img.cmdline  # the path was on it already
    assert out.extra["iso_in_initrd"] == inner and "initrd_iso" not in out.extra
    assert kexec.prepare(out, tmp_path) == out  # attached once
    _unpack_appended(data, len(initrd), tmp_path / "x")
    assert (tmp_path / "x" / inner.lstrip("/")).read_bytes() == iso
    hook = tmp_path / "x" / "scripts/live-premount/x"
    assert hook.read_text() == "#!/bin/sh\nmodprobe loop\n"
    assert (tmp_path / "d.iso").exists()  # the user's own file: kept
    # bootlink's download of it: let go once it is in the initrd (RAM in the ramdisk)
    img = dataclasses.replace(img, extra={**img.extra, "iso_disposable": "1"})
    (tmp_path / "y").mkdir()
    again = kexec.prepare(img, tmp_path / "y")
    assert not (tmp_path / "d.iso").exists() and again.initrd_sha256 == out.initrd_sha256


def test_iso_for_the_initrd_changed_after_verification_refused(tmp_path):
    (tmp_path / "d.iso").write_bytes(b"tampered")
    img = dataclasses.replace(
        _image(tmp_path, b"i"),
        extra={"iso": str(tmp_path / "d.iso"), "iso_sha256": _sha(b"x"), "initrd_iso": "/b/i.iso"},
    )
    with pytest.raises(BootlinkError, match=r"ISO .*d.iso changed after it was verified"):
        kexec.prepare(img, tmp_path)
    assert not list(tmp_path.glob("initrd+*"))  # nothing half-written left


def test_prepare_leaves_plain_images_alone(tmp_path):
    img = _image(tmp_path, b"i")
    assert kexec.prepare(img, tmp_path) is img
