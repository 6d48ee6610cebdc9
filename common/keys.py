"""The shared key: generation, safe loading, and per-purpose sub-keys (HKDF-SHA256).

One 32-byte secret is shared by laptop and desktop. It is never used directly: each
purpose gets its own sub-key so that a message sealed for one purpose can never be
accepted as another (a discovery answer is not a boot manifest, and so on).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import KeyFileError

KEY_SIZE = 32


class Purpose(enum.Enum):
    DISCOVERY = b"bootlink/v1/discovery"
    TRANSFER = b"bootlink/v1/transfer"
    TRIGGER = b"bootlink/v1/trigger"
    NBD = b"bootlink/v1/nbd"
    KEY_ID = b"bootlink/v1/key-id"


@dataclass(frozen=True)
class SharedKey:
    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_SIZE:
            raise KeyFileError(f"a bootlink key is {KEY_SIZE} bytes, got {len(self.secret)}")

    def subkey(self, purpose: Purpose, context: bytes = b"") -> bytes:
        """A 32-byte key for one purpose (and optionally one session, via `context`)."""
        return HKDF(
            algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=purpose.value + context
        ).derive(self.secret)

    def key_id(self) -> str:
        """A short public fingerprint (safe to log) telling two keys apart."""
        return self.subkey(Purpose.KEY_ID)[:6].hex()

    def __repr__(self) -> str:  # never let the secret reach a log by accident
        return f"SharedKey(id={self.key_id()})"


def generate_key_file(path: Path, *, force: bool = False) -> SharedKey:
    """Write 32 random bytes to `path`, mode 0600, refusing to overwrite unless `force`."""
    path = check_new_private_path(path, force=force)
    secret = os.urandom(KEY_SIZE)
    write_private_file(path, secret)
    return SharedKey(secret)


def check_new_private_path(path: Path, *, force: bool) -> Path:
    """Where a new secret may go: a file name in an existing directory, and nothing there
    yet (or, with `force`, a regular file: never a device, directory or symlink, which
    the rename would replace or the secret would land behind)."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise KeyFileError(f"'{path}' names no file: give a file path such as /etc/bootlink/key")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise KeyFileError(f"cannot check {path}: {exc.strerror}; choose another path") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path} exists and is not a regular file: choose another path")
    if st is not None and not force:
        raise KeyFileError(f"{path} already exists: keep it, or pass --force to replace it")
    if not path.parent.is_dir():
        raise KeyFileError(f"{path.parent} does not exist: create the directory first")
    return path


def write_private_file(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600: never readable by others, not even for
    an instant, and never left half-written. The bytes go to a fresh file that only
    this call can have created (mkstemp: O_EXCL, random name, 0600), so a planted file
    or symlink cannot catch them, then replace `path` (a regular file or nothing)."""
    from .output_file import write_failed  # (output_file imports nothing of ours)

    path = Path(path)
    elsewhere = "write it to a {kind} filesystem (another path)"
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_failed(path, exc, elsewhere) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
            raise KeyFileError(f"{path} exists and is not a regular file: choose another path")
        os.replace(tmp, path)
    except OSError as exc:
        raise write_failed(path, exc, elsewhere) from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def load_key_file(path: Path) -> SharedKey:
    """Load the shared key, refusing files that others could read or that are malformed."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO named as the key must be refused below, not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} not found: create one with 'bootlink keygen --key {path}'"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and path.is_symlink():  # O_NOFOLLOW: links can be swapped
            raise KeyFileError(
                f"key file {path} is a symbolic link: name the file it points to instead"
            ) from None
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(
                f"key file {path} is not a regular file: name the file 'bootlink keygen' wrote"
            )
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} is readable by group/others (mode {st.st_mode & 0o777:o}): "
                f"run 'chmod 600 {path}'"
            )
        data = os.read(fd, 4097)  # a raw key is 32 bytes; a passphrase-wrapped one 88
    finally:
        os.close(fd)
    if len(data) != KEY_SIZE:
        from bootlink.usb import keywrap  # a stick's key: `bootlink usb create --passphrase`

        if keywrap.is_wrapped(data):
            return SharedKey(keywrap.unlock(data, path))
        held = f"{len(data)} bytes" if len(data) <= 4096 else "more than 4096 bytes"
        raise KeyFileError(
            f"key file {path} holds {held}, not {KEY_SIZE}: "
            f"regenerate it with 'bootlink keygen --key {path} --force' on one side and copy it"
        )
    return SharedKey(data)
