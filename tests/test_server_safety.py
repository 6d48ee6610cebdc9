"""The server never exports a disk this machine has mounted, and stops what it starts."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from bootlink.common.errors import BootlinkError
from bootlink.server.mounts import read_mounts
from bootlink.server.nbd_export import check_exportable

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:1 / / rw,relatime - ext4 /dev/vda1 rw
30 27 254:2 / /boot ro,relatime - ext4 /dev/vda2 ro
31 27 254:3 / /srv rw,relatime - ext4 /dev/vda3 ro,errors=remount-ro
"""


def test_mountinfo_parsing():
    mounts = {m.mountpoint: m for m in read_mounts(MOUNTINFO)}
    assert mounts["/"].devnum == os.makedev(254, 1) and mounts["/"].read_write
    assert not mounts["/boot"].read_write
    assert not mounts["/srv"].read_write  # superblock ro wins over a rw mount flag


def _root_disk() -> Path | None:
    """The whole disk holding this machine's root filesystem, if it is a real block device."""
    dev = os.stat("/").st_dev
    sysdir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sysdir.exists():
        return None
    sysdir = sysdir.resolve()
    disk = sysdir.parent if (sysdir / "partition").exists() else sysdir
    node = Path("/dev") / disk.name
    return node if node.exists() and stat.S_ISBLK(node.stat().st_mode) else None


def test_refuses_the_disk_this_system_runs_on():
    disk = _root_disk()
    if disk is None:
        pytest.skip("root filesystem is not on a block device here")
    with pytest.raises(BootlinkError, match="mounted read-write") as ei:
        check_exportable(disk, read_only=False)
    assert "\n" not in str(ei.value)
    with pytest.raises(BootlinkError, match="mounted read-write"):
        check_exportable(disk, read_only=True)  # read-only export of a rw mount is no better


def test_missing_disk_names_the_fix(tmp_path):
    with pytest.raises(BootlinkError, match=r"fix server\.disk"):
        check_exportable(tmp_path / "nope", read_only=False)


def test_unmounted_image_file_is_fine(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 4096)
    check_exportable(img, read_only=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices")
def test_refuses_an_image_file_mounted_through_a_loop_device(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    if subprocess.run(["mkfs.ext4", "-q", str(img)], capture_output=True).returncode:
        pytest.skip("mkfs.ext4 unavailable")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True).returncode:
        pytest.skip("loop mounts unavailable here")
    try:
        with pytest.raises(BootlinkError, match="mounted read-write"):
            check_exportable(img, read_only=False)
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
