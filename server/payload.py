"""What the server hands out: the boot files (hashed once, re-hashed if they change) and
the facts about the exported disk that let a client prove it reaches the right one."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from bootlink.common.bootimage import sha256_file
from bootlink.common.config import Config
from bootlink.common.errors import BootlinkError
from bootlink.common.wire import BootManifest, FileEntry, NbdInfo

SECTOR = 512


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


class BootFiles:
    """The kernel and initrd to serve, with SHA-256 cached per (size, mtime, inode)."""

    def __init__(self, kernel: Path, initrd: Path) -> None:
        self.paths = {"kernel": Path(kernel), "initrd": Path(initrd)}
        self._cache: dict[str, tuple[Stamp, str]] = {}
        self._lock = threading.Lock()
        for name in self.paths:
            self.entry(name)  # fail at start-up, not when the desktop asks

    def entry(self, name: str) -> FileEntry:
        path = self.paths[name]
        try:
            st = path.stat()
        except OSError as exc:
            raise BootlinkError(
                f"boot {name} {path} unreadable ({exc.strerror}): fix server.boot.{name}"
            ) from None
        stamp = Stamp.of(st)
        with self._lock:
            cached = self._cache.get(name)
            if cached is None or cached[0] != stamp:
                cached = (stamp, sha256_file(path))
                self._cache[name] = cached
        return FileEntry(name, stamp.size, cached[1])

    def hashed_stamp(self, name: str) -> Stamp | None:
        """The identity the file had when its SHA-256 was last computed."""
        with self._lock:
            cached = self._cache.get(name)
        return cached[0] if cached else None


def disk_facts(disk: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 of the first sector) of a block device or image file."""
    try:
        fd = os.open(disk, os.O_RDONLY)
    except OSError as exc:
        raise BootlinkError(
            f"disk {disk} cannot be opened ({exc.strerror}): fix server.disk in the config"
        ) from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        first = os.pread(fd, SECTOR, 0)
    finally:
        os.close(fd)
    if size == 0:
        raise BootlinkError(f"disk {disk} is empty: server.disk must name the laptop's disk")
    return size, hashlib.sha256(first).hexdigest()


def build_manifest(cfg: Config, files: BootFiles, disk: Path, server_name: str) -> BootManifest:
    size, first = disk_facts(disk)
    return BootManifest(
        files=[files.entry("kernel"), files.entry("initrd")],
        cmdline=cfg.server.boot.cmdline,
        nbd=NbdInfo(
            port=cfg.link.nbd_port,
            export=cfg.server.export_name,
            size=size,
            read_only=cfg.server.read_only,
            first_sector_sha256=first,
        ),
        server_name=server_name,
    )
