"""Is the disk we are asked to export in use on this machine?

Exporting a filesystem that this kernel has mounted read-write lets two kernels write
one filesystem: certain corruption. We look at the device, its partitions and anything
stacked on top (device-mapper, md) and compare against /proc/self/mountinfo; an image
file counts as mounted if a loop device backed by it is.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

SYS_BLOCK = Path("/sys/class/block")


@dataclass(frozen=True)
class Mount:
    devnum: int
    mountpoint: str
    read_write: bool


def read_mounts(mountinfo: str | None = None) -> list[Mount]:
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    mounts = []
    for line in mountinfo.splitlines():
        parts = line.split()
        if len(parts) < 7 or ":" not in parts[2]:
            continue
        major, minor = (int(x) for x in parts[2].split(":"))
        opts = parts[5].split(",")
        # super options come after the " - " separator: "ro" there means ro for everyone
        sep = parts.index("-") if "-" in parts else len(parts)
        super_opts = parts[sep + 3].split(",") if len(parts) > sep + 3 else []
        rw = "rw" in opts and "ro" not in super_opts
        mounts.append(Mount(os.makedev(major, minor), parts[4], rw))
    return mounts


def related_devnums(devnum: int) -> set[int]:
    """The device, its partitions and everything stacked on them (holders), as dev_t."""
    seen: set[int] = set()
    todo = [devnum]
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        sysdir = Path(f"/sys/dev/block/{os.major(d)}:{os.minor(d)}")
        if not sysdir.exists():
            continue
        sysdir = sysdir.resolve()
        children = [p for p in sysdir.iterdir() if (p / "partition").exists()]
        holders = list((sysdir / "holders").iterdir()) if (sysdir / "holders").is_dir() else []
        for child in children + holders:
            dev = child / "dev"
            if not dev.exists():
                dev = SYS_BLOCK / child.name / "dev"
            if dev.exists():
                major, minor = (int(x) for x in dev.read_text().split(":"))
                todo.append(os.makedev(major, minor))
    return seen


def loop_devices_backed_by(path: Path) -> set[int]:
    found = set()
    target = str(path.resolve())
    for loop in SYS_BLOCK.glob("loop*/loop/backing_file"):
        try:
            if loop.read_text().strip() == target:
                major, minor = (int(x) for x in (loop.parent.parent / "dev").read_text().split(":"))
                found.add(os.makedev(major, minor))
        except OSError:
            continue
    return found


def mounts_of(disk: Path, mounts: list[Mount] | None = None) -> list[Mount]:
    """Mounts that live on `disk` (block device or image file)."""
    st = os.stat(disk)
    roots = {st.st_rdev} if stat.S_ISBLK(st.st_mode) else loop_devices_backed_by(disk)
    devs: set[int] = set()
    for r in roots:
        devs |= related_devnums(r)
    return [m for m in (mounts if mounts is not None else read_mounts()) if m.devnum in devs]
