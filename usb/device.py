"""Writing the stick image to a real device, without ever writing to the wrong one.

Refused: anything not a whole-disk block device; the disk the running system lives on
(by the device numbers of /, and by the source device of every mount, which also catches
btrfs and other file systems whose mount reports an anonymous device number); any
device with a mounted file system, active swap, or device-mapper/md stacked on it;
write-protected devices; devices with other than 512-byte logical sectors (the GPT and
FAT are laid out for 512). Then the device is shown (model, size, partitions) and the
user must type "yes" (or pass --yes). The write opens the device O_EXCL (the kernel
refuses it while anything holds it), reports progress, fsyncs, drops the device's cache
and reads everything back to compare the SHA-256.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bootlink.common.errors import BootlinkError
from bootlink.common.log import Progress
from bootlink.server.mounts import read_mounts, related_devnums

SYS_DEV_BLOCK = Path("/sys/dev/block")
BLKFLSBUF = 0x1261  # flush and drop the buffer cache: the read-back then hits the device
BLKRRPART = 0x125F  # re-read the partition table
CHUNK = 4 << 20


@dataclass
class Device:
    path: Path
    devnum: int
    name: str  # sysfs name, e.g. sdb
    size: int  # bytes
    logical_block: int = 512
    model: str = ""
    removable: bool = False
    read_only: bool = False
    transport: str = ""
    partitions: list[str] = field(default_factory=list)  # human-readable lines

    def describe(self) -> str:
        what = ", ".join(
            x for x in (self.transport.upper(), "removable" if self.removable else "") if x
        )
        lines = [
            f"{self.path}: {self.model or 'unknown model'}"
            + (f" ({what})" if what else "")
            + f", {self.size / 1e9:.1f} GB ({self.size / 2**30:.1f} GiB)"
        ]
        if self.partitions:
            lines.append("current partitions (all will be lost):")
            lines += [f"  {p}" for p in self.partitions]
        else:
            lines.append("no partitions found")
        return "\n".join(lines)


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def inspect(path: Path | str) -> Device:
    """The block device at `path` (a whole disk), with what the user should see."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BootlinkError(
            f"device {path} not found: plug the stick in and find its name with 'lsblk'"
        ) from None
    if not stat.S_ISBLK(st.st_mode):
        raise BootlinkError(
            f"{path} is not a block device: to write an image file use --image {path}"
        )
    sysdir = SYS_DEV_BLOCK / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if not sysdir.exists():
        raise BootlinkError(f"{path}: no sysfs entry {sysdir}; is /sys mounted?")
    sysdir = sysdir.resolve()
    if (sysdir / "partition").exists():
        raise BootlinkError(
            f"{path} is a partition of /dev/{sysdir.parent.name}: give the whole disk, "
            f"--device /dev/{sysdir.parent.name}"
        )
    model = " ".join(
        x for x in (_read(sysdir / "device" / "vendor"), _read(sysdir / "device" / "model")) if x
    )
    dev = Device(
        path=path,
        devnum=st.st_rdev,
        name=sysdir.name,
        size=int(_read(sysdir / "size", "0")) * 512,  # sysfs counts 512-byte units always
        logical_block=int(_read(sysdir / "queue" / "logical_block_size", "512")),
        model=model,
        removable=_read(sysdir / "removable") == "1",
        read_only=_read(sysdir / "ro") == "1",
        transport=_transport(path),
    )
    dev.partitions = _partitions(path, sysdir)
    return dev


def _transport(path: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["lsblk", "-dno", "TRAN", str(path)], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()
    return ""


def _partitions(path: Path, sysdir: Path) -> list[str]:
    """One line per partition: the kernel's view (lsblk, else sysfs), or, when the kernel
    has not read the table (a loop device without partscan), the table itself (sfdisk)."""
    rows: list[str] | None = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["lsblk", "-rno", "NAME,SIZE,FSTYPE,LABEL,MOUNTPOINT", str(path)],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        cells = [r.split(" ") for r in out.stdout.splitlines()[1:]]  # first row: the disk
        rows = [" ".join(_unescape(c) for c in row if c) for row in cells if row and row[0]]
    if rows is None:
        parts = sorted(p for p in sysdir.iterdir() if (p / "partition").exists())
        rows = [f"{p.name} {int(_read(p / 'size', '0')) * 512 / 2**30:.1f}G" for p in parts]
    if not rows:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["sfdisk", "-d", str(path)], capture_output=True, text=True, timeout=10
            )
            rows = [ln.strip() for ln in out.stdout.splitlines() if "start=" in ln]
    return rows


def _unescape(s: str) -> str:
    # lsblk -r writes spaces and other unsafe bytes as \x20
    return s.encode().decode("unicode_escape", errors="replace")


def _mount_sources(mountinfo: str | None = None) -> list[tuple[str, str]]:
    """(mount point, source) for every mount whose source is a /dev node."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    out = []
    for line in mountinfo.splitlines():
        parts = line.split()
        if "-" in parts:
            sep = parts.index("-")
            if len(parts) > sep + 2 and parts[sep + 2].startswith("/dev/"):
                out.append((parts[4], parts[sep + 2]))
    return out


def _swap_devices() -> list[str]:
    lines = _read(Path("/proc/swaps")).splitlines()[1:]
    return [ln.split()[0] for ln in lines if ln.split()]


def _devnum_of(node: str) -> int | None:
    try:
        st = os.stat(node)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def refuse_unsafe(dev: Device, mountinfo: str | None = None) -> None:
    """BootlinkError (one line, naming the reason) unless `dev` is safe to overwrite."""
    related = related_devnums(dev.devnum)
    root_dev = os.stat("/").st_dev
    sources = _mount_sources(mountinfo)
    root_sources = {_devnum_of(src) for mp, src in sources if mp == "/"}
    if root_dev in related or (root_sources - {None}) & related:
        raise BootlinkError(
            f"{dev.path} holds the running system's root file system: refusing to overwrite it"
        )
    for m in read_mounts(mountinfo):
        if m.devnum in related:
            raise BootlinkError(
                f"{dev.path} is mounted on {m.mountpoint}: unmount it first (umount {m.mountpoint})"
            )
    for mp, src in sources:
        if _devnum_of(src) in related:
            raise BootlinkError(f"{dev.path} is mounted on {mp}: unmount it first (umount {mp})")
    for swap in _swap_devices():
        if _devnum_of(swap) in related:
            raise BootlinkError(f"{dev.path} is in use as swap ({swap}): run 'swapoff {swap}'")
    stacked = sorted(
        p.name for d in related for p in _holders(d)
    )  # device-mapper, md, ... on top of it
    if stacked:
        raise BootlinkError(
            f"{dev.path} is in use by {', '.join(stacked)} (LVM, RAID or encryption): "
            "deactivate that first"
        )
    if dev.read_only:
        raise BootlinkError(f"{dev.path} is write-protected: slide the stick's lock switch")
    if dev.logical_block != 512:
        raise BootlinkError(
            f"{dev.path} has {dev.logical_block}-byte sectors: the stick image is made for "
            "512-byte sectors; use another stick"
        )


def _holders(devnum: int) -> list[Path]:
    d = SYS_DEV_BLOCK / f"{os.major(devnum)}:{os.minor(devnum)}" / "holders"
    return sorted(d.iterdir()) if d.is_dir() else []


def confirm(dev: Device, yes: bool, ask: Callable[[str], str] | None = None, out=None) -> None:
    """Show the device; unless `yes`, the user must type "yes"."""
    out = out if out is not None else sys.stderr
    print(dev.describe(), file=out, flush=True)
    if yes:
        return
    if ask is None:
        if not sys.stdin.isatty():
            raise BootlinkError("no terminal to confirm on: pass --yes to write without asking")
        ask = input
    answer = ask(f"Erase everything on {dev.path} and write the bootlink stick? Type yes: ")
    if answer.strip().lower() != "yes":
        raise BootlinkError(f"not confirmed: nothing was written to {dev.path}")


def _extents_hash(fd: int, extents: list[tuple[int, int]], progress: Progress | None) -> str:
    h = hashlib.sha256()
    for offset, length in extents:
        done = 0
        while done < length:
            n = min(CHUNK, length - done)
            block = os.pread(fd, n, offset + done)
            if len(block) != n:
                raise BootlinkError(f"short read at byte {offset + done}: the device shrank?")
            h.update(block)
            done += n
            if progress:
                progress.advance(n)
    return h.hexdigest()


def write_image(
    image: Path, target: Path, extents: list[tuple[int, int]], progress: bool = True
) -> str:
    """Copy `extents` of `image` to `target`, fsync, read back; the verified SHA-256.

    `target` is opened O_EXCL: for a block device the kernel refuses while it is mounted
    or otherwise held. A regular file works too (tests)."""
    total = sum(n for _, n in extents)
    try:
        out = os.open(target, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except PermissionError:
        raise BootlinkError(f"no permission to write {target}: run it with sudo") from None
    except OSError as exc:
        raise BootlinkError(
            f"cannot open {target} exclusively: {exc.strerror}; is it mounted or in use?"
        ) from None
    h = hashlib.sha256()
    try:
        with open(image, "rb") as src:
            bar = Progress(f"writing {target}", total) if progress else None
            for offset, length in extents:
                done = 0
                while done < length:
                    n = min(CHUNK, length - done)
                    block = os.pread(src.fileno(), n, offset + done)
                    if len(block) != n:
                        raise BootlinkError(f"{image} is shorter than its layout: rebuild it")
                    h.update(block)
                    _pwrite_all(out, block, offset + done, target)
                    done += n
                    if bar:
                        bar.advance(n)
            if bar:
                bar.finish()
        os.fsync(out)
        with contextlib.suppress(OSError):
            fcntl.ioctl(out, BLKFLSBUF)  # only block devices know it
    finally:
        os.close(out)
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        bar = Progress(f"verifying {target}", total) if progress else None
        got = _extents_hash(fd, extents, bar)
        if bar:
            bar.finish()
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, BLKRRPART)  # let the kernel see the new partitions now
    finally:
        os.close(fd)
    want = h.hexdigest()
    if got != want:
        raise BootlinkError(
            f"verification failed: {target} reads back different bytes (sha256 {got[:16]}..., "
            f"wrote {want[:16]}...): the stick may be faulty; try another"
        )
    return want


def _pwrite_all(fd: int, block: bytes, offset: int, target: Path) -> None:
    view = memoryview(block)
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:
            raise BootlinkError(
                f"writing {target} failed at byte {offset}: {exc.strerror}; "
                "the stick may be faulty or was pulled"
            ) from None
        view, offset = view[n:], offset + n
