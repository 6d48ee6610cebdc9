"""What the server hands out: the boot files, sealed once (and again if they change), and
the facts about the exported disk that let a client prove it reaches the right one."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from bootlink.common import omac_lanes, wire
from bootlink.common.config import Config
from bootlink.common.errors import BootlinkError
from bootlink.common.pipeline import batched, ordered_map
from bootlink.common.wire import BootManifest, FileEntry, NbdInfo

log = logging.getLogger("bootlink.server.payload")

SECTOR = 512
NAMES = ("kernel", "initrd")  # the order in which the stream carries them
SEAL_ATTEMPTS = 3


@dataclass(frozen=True)
class Stamp:
    """A file's identity: if any of these differ, the file may have changed."""

    size: int
    mtime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass(frozen=True)
class SealedPayload:
    """The kernel and initrd sealed as the response's frames 1.., ready to be sent as is.

    The frames live in a memfd (RAM, like the tmpfs a ramdisk server reads its files
    from): a second copy of the payload buys sending it with sendfile(2) instead of
    spending a core on AES for every request.
    """

    files: list[FileEntry]  # size and SHA-256 of exactly the bytes that were sealed
    stamps: dict[str, Stamp]  # the files' identities when they were sealed
    chunk_size: int
    frames: BinaryIO
    length: int
    key: bytes = field(repr=False)


def seal_payload(paths: dict[str, Path], chunk_size: int = 1 << 20) -> SealedPayload:
    """Read, hash and seal the files in one pass; retried if a file changes meanwhile."""
    for _ in range(SEAL_ATTEMPTS):
        sealed = _seal_once(paths, chunk_size)
        if sealed is not None:
            return sealed
    raise BootlinkError(
        f"the boot files kept changing while being sealed ({', '.join(map(str, paths.values()))}):"
        " stop whatever rewrites them (a kernel update?) and restart the server"
    )


def _seal_once(paths: dict[str, Path], chunk_size: int) -> SealedPayload | None:
    key = os.urandom(16)
    fd = os.memfd_create("bootlink-payload", os.MFD_CLOEXEC)
    out = os.fdopen(fd, "w+b")
    files: list[FileEntry] = []
    stamps: dict[str, Stamp] = {}
    changed = False

    def chunks():
        nonlocal changed
        counter = 1
        for name in NAMES:
            f = _open(name, paths[name])
            with f:
                before = Stamp.of(os.fstat(f.fileno()))
                h, size = hashlib.sha256(), 0
                while chunk := f.read(chunk_size):
                    h.update(chunk)
                    size += len(chunk)
                    yield counter, 0, chunk
                    counter += 1
                after = Stamp.of(os.fstat(f.fileno()))
            changed |= size != before.size or before != after
            files.append(FileEntry(name, size, h.hexdigest()))
            stamps[name] = before
        yield counter, wire.FLAG_LAST, b""

    started = time.monotonic()
    try:
        # sealed a batch at a time: the batch's MAC chains run side by side (omac_lanes)
        batches = batched(chunks(), omac_lanes.LANES)
        for frames in ordered_map(lambda batch: wire.seal_frames(key, batch), batches):
            out.writelines(frames)
        out.flush()
    except OSError as exc:
        out.close()
        raise BootlinkError(
            f"cannot keep the sealed boot files in memory ({exc.strerror}): free some RAM"
        ) from None
    except BaseException:
        out.close()
        raise
    if changed:
        out.close()
        return None
    length = out.tell()
    log.info(
        "sealed kernel and initrd once for sending (%.1f MiB in %.1f s)",
        sum(f.size for f in files) / 2**20,
        time.monotonic() - started,
    )
    return SealedPayload(files, stamps, chunk_size, out, length, key)


def _open(name: str, path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise BootlinkError(
            f"boot {name} {path} unreadable ({exc.strerror}): fix server.boot.{name}"
        ) from None


class BootFiles:
    """The kernel and initrd to serve, sealed once, and again whenever one changes."""

    def __init__(self, kernel: Path, initrd: Path, chunk_size: int = 1 << 20) -> None:
        self.paths = {"kernel": Path(kernel), "initrd": Path(initrd)}
        self.chunk_size = chunk_size
        self._sealed: SealedPayload | None = None
        self._lock = threading.Lock()
        self.current()  # fail at start-up, not when the desktop asks

    def current(self) -> SealedPayload:
        """The sealed payload for the files as they are now (re-sealed if they changed;
        a transfer still sending the old one keeps it alive until it is done)."""
        stamps = {name: self._stamp(name) for name in NAMES}
        with self._lock:
            if self._sealed is None or self._sealed.stamps != stamps:
                self._sealed = seal_payload(self.paths, self.chunk_size)
            return self._sealed

    def _stamp(self, name: str) -> Stamp:
        path = self.paths[name]
        try:
            return Stamp.of(path.stat())
        except OSError as exc:
            raise BootlinkError(
                f"boot {name} {path} unreadable ({exc.strerror}): fix server.boot.{name}"
            ) from None


@dataclass(frozen=True)
class Offer:
    """What one boot response sends: the manifest (frame 0) and the sealed payload."""

    manifest: BootManifest
    payload: SealedPayload


DISK_HINT = "name the laptop's disk (a block device such as /dev/nvme0n1) or a disk image file"
_NOT_A_DISK = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device, not a disk",
    stat.S_IFIFO: "a FIFO, not a disk",
    stat.S_IFSOCK: "a socket, not a disk",
}


def disk_kind(disk: Path) -> int:
    """The file type (stat.S_IFBLK or S_IFREG) of server.disk; anything else, or nothing,
    raises a one-line BootlinkError naming the fix. Opens nothing (a FIFO would block)."""
    try:
        st = os.stat(disk)
    except FileNotFoundError:
        raise BootlinkError(
            f"server.disk {disk} does not exist: fix server.disk in the config; {DISK_HINT}"
        ) from None
    except OSError as exc:
        raise BootlinkError(
            f"server.disk {disk} cannot be examined ({exc.strerror}): fix server.disk in the "
            f"config; {DISK_HINT}"
        ) from None
    kind = stat.S_IFMT(st.st_mode)
    if kind not in (stat.S_IFBLK, stat.S_IFREG):
        what = _NOT_A_DISK.get(kind, "not a disk")
        raise BootlinkError(f"server.disk {disk} is {what}: {DISK_HINT}")
    return kind


def disk_facts(disk: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 of the first sector) of a block device or image file.

    Checked when the server starts and again for every request (a disk can vanish while
    the server runs): anything that is not a readable, non-empty block device or regular
    file raises a one-line BootlinkError naming the problem and the fix.
    """
    kind = disk_kind(disk)
    try:
        fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM):
            fix = "check the disk (dmesg), or fix server.disk in the config"
        elif os.geteuid() != 0:
            fix = "run the server as root or fix its permissions"
        else:  # root denied: a container's device policy, or a security module
            fix = "run the server where the disk may be opened (not in a confined container)"
        why = f"server.disk {disk} cannot be opened ({exc.strerror})"
        raise BootlinkError(f"{why}: {fix}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        first = os.pread(fd, SECTOR, 0)
    except OSError as exc:
        raise BootlinkError(
            f"server.disk {disk} cannot be read ({exc.strerror}): check the disk (dmesg), "
            "or name another in server.disk"
        ) from None
    finally:
        os.close(fd)
    if size == 0:
        what = "a block device of 0 bytes (no medium?)" if kind == stat.S_IFBLK else "empty"
        raise BootlinkError(f"server.disk {disk} is {what}: {DISK_HINT}")
    return size, hashlib.sha256(first).hexdigest()


def build_offer(cfg: Config, files: BootFiles, disk: Path, server_name: str) -> Offer:
    size, first = disk_facts(disk)
    payload = files.current()
    manifest = BootManifest(
        files=payload.files,
        cmdline=cfg.server.boot.cmdline,
        nbd=NbdInfo(
            port=cfg.link.nbd_port,
            export=cfg.server.export_name,
            size=size,
            read_only=cfg.server.read_only,
            first_sector_sha256=first,
        ),
        server_name=server_name,
        chunk_size=payload.chunk_size,
        payload_key=payload.key,
    )
    return Offer(manifest, payload)
