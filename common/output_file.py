"""The file a download (or a built initrd) is written into, and every way writing it fails.

Bytes go to `<name>.part`; `commit()` renames it into place only once it is complete
(and verified by the caller), and leaving the `with` block any other way removes it, so
a failed download never leaves a file that looks finished. Every OS error on the way
(a full tmpfs in the ramdisk, a read-only or missing directory, a failing disk) becomes
one `WriteFailed` line naming the file and the fix, from whichever thread hit it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BootlinkError


class WriteFailed(BootlinkError):
    """A file could not be written: no space, no permission, no directory, I/O error."""


# How a write that did not fit or found a read-only filesystem is fixed, for downloads;
# other writers (key files, publish --to dir) pass their own.
DOWNLOAD_ELSEWHERE = (
    "download to a {kind} filesystem (client.download_dir or --output; the ramdisk's is RAM)"
)


def check_space(directory: Path, need: int, what: str, elsewhere: str = DOWNLOAD_ELSEWHERE) -> None:
    """Refuse up front what cannot fit, instead of failing after most of a download."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise WriteFailed(
            f"{directory} has {_mib(free)} free but {what} takes {_mib(need)}: free space "
            f"there or {elsewhere.format(kind='larger')}"
        )


def write_failed(path: Path, exc: OSError, elsewhere: str = DOWNLOAD_ELSEWHERE) -> WriteFailed:
    """The one-line error for an OSError met while creating or writing `path`;
    `elsewhere` says how to write it to another filesystem ({kind}: larger, writable)."""
    where = path.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            st = os.statvfs(where)
            left = f" ({_mib(st.f_bavail * st.f_frsize)} left)"
        except OSError:
            left = ""
        return WriteFailed(
            f"{where} is full{left}: {path.name} could not be written; free space there or "
            f"{elsewhere.format(kind='larger')}"
        )
    fixes = {
        errno.ENOENT: (
            f"{where} refuses new files: pick another directory"
            if where.is_dir()
            else f"{where} does not exist: create it or name an existing directory"
        ),
        errno.ENOTDIR: f"{where} is not a directory: name a directory",
        errno.EACCES: f"no permission to write in {where}: run as root or pick another place",
        errno.EPERM: f"no permission to write in {where}: run as root or pick another place",
        errno.EROFS: f"{where} is read-only: {elsewhere.format(kind='writable')}",
        errno.EFBIG: "the file is too large for that filesystem: use another filesystem",
        errno.EIO: "the disk reports I/O errors: use another disk",
    }
    fix = fixes.get(exc.errno, f"check {where}")
    return WriteFailed(f"cannot write {path}: {exc.strerror or exc}; {fix}")


def make_dir(path: Path) -> Path:
    """mkdir -p, failing with the same one-line errors as the files written into it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failed(path, exc) from None
    return path


@contextlib.contextmanager
def removed_on_failure(
    directory: Path, ours: Callable[[str], bool] = lambda _name: True
) -> Iterator[None]:
    """What appears in `directory` while the body runs, and `ours` claims, is removed if
    the body fails (an error, Ctrl-C): a failed download leaves no empty or half-filled
    folders behind. What was there before is never touched, nor what others put there
    meanwhile (`ours`: in a shared folder such as /tmp); a directory the body created
    goes whole."""
    directory = Path(directory)
    before = set(os.listdir(directory)) if directory.is_dir() else None
    try:
        yield
    except BaseException:
        if before is None:
            shutil.rmtree(directory, ignore_errors=True)
        elif directory.is_dir():
            for name in filter(ours, set(os.listdir(directory)) - before):
                path = directory / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
        raise


def _mib(n: int) -> str:
    if n < 1 << 20:  # "0.0 MiB free but it takes 0.0 MiB" says nothing
        return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"
    return f"{n / (1 << 20):.1f} MiB"


class OutputFile:
    """`path` written as `path.part`: positioned or sequential writes, then commit().

    pwrite() may be called from several threads at once (different offsets); write() is
    sequential and single-threaded, for callers that stream (and for APIs that want a
    file object: it also has tell()).
    """

    def __init__(self, path: Path, *, size: int | None = None, durable: bool = True) -> None:
        """`size`, when known, is checked against the free space first; `durable` fsyncs
        before the rename (a file left on a real disk; near free on tmpfs)."""
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.durable = durable
        self._offset = 0
        self._committed = False
        try:  # (truncating first: a .part left by a killed run does not count as used)
            self.fd: int | None = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise write_failed(self.part, exc) from None
        if size is not None:
            try:
                self.expect(size)
            except BaseException:
                self.discard()
                raise

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()  # after commit(): nothing left to do

    def expect(self, size: int) -> None:
        """The file will hold `size` bytes: refuse now if they cannot fit."""
        try:
            check_space(self.path.parent, size, self.path.name)
        except OSError as exc:
            raise write_failed(self.part, exc) from None

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of `data` at `offset`."""
        view = memoryview(data)
        try:
            while view:  # a regular file takes it all at once, barring errors
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise write_failed(self.part, exc) from None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append `data` after what write() wrote before; returns its length."""
        self.pwrite(data, self._offset)
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self._offset

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise write_failed(self.part, exc) from None

    def close(self) -> None:
        """Flush (if durable) and close, without renaming yet (see commit)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if self.durable:
                os.fsync(fd)
        except OSError as exc:
            raise write_failed(self.part, exc) from None
        finally:
            os.close(fd)

    def commit(self) -> Path:
        """Close and rename into place: the file is complete and its bytes are right."""
        self.close()
        try:
            os.replace(self.part, self.path)
        except OSError as exc:
            raise write_failed(self.path, exc) from None
        self._committed = True
        return self.path

    def discard(self) -> None:
        """Close and remove the partial file (nothing, once committed)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if not self._committed:
            self.part.unlink(missing_ok=True)
