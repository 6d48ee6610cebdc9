"""A shared key protected by a passphrase, so that a lost USB stick alone unlocks nothing.

`bootlink usb create --passphrase` puts this on the stick instead of the raw key; the
client ramdisk asks for the passphrase on its console (common/keys.py calls `unlock`
when the key file is not a raw 32-byte key). Format, version 1 (88 bytes):

    magic "BLWK" | version 1 | log2(N) | r | p        8 bytes  } header: EAX associated
    salt                                            16 bytes  } data, so changed scrypt
    nonce                                           16 bytes  } parameters are refused
    AES-256-EAX(key=scrypt(passphrase, salt, N, r, p), nonce, header)(secret)  32 bytes
    tag                                             16 bytes

Salt and nonce default to values derived from the secret (HKDF), not random ones: the
same key and passphrase then give the same bytes, so a stick image stays reproducible.
That costs nothing here: the salt is unique per key (32 random bytes), an attacker needs
the secret to predict it, and one wrapping key (one passphrase) only ever seals one
plaintext under one nonce.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from bootlink.common import eax
from bootlink.common.errors import KeyFileError
from bootlink.common.keys import SharedKey

MAGIC = b"BLWK"
VERSION = 1
SECRET_SIZE = 32
SALT_SIZE = NONCE_SIZE = 16
HEADER = struct.Struct(">4sBBBB16s16s")  # magic, version, log2n, r, p, salt, nonce
WRAPPED_SIZE = HEADER.size + SECRET_SIZE + eax.TAG_SIZE  # 88

# 2**17 * r=8 -> 128 MiB and ~0.4 s on a desktop core per try (several seconds under
# QEMU's software emulation). Limits keep a crafted file from exhausting the ramdisk.
DEFAULT_LOG2N, DEFAULT_R, DEFAULT_P = 17, 8, 1
MAX_LOG2N, MAX_R, MAX_P = 20, 16, 4
MAX_TRIES = 5


@dataclass(frozen=True)
class Params:
    log2n: int = DEFAULT_LOG2N
    r: int = DEFAULT_R
    p: int = DEFAULT_P

    def check(self) -> None:
        if not (10 <= self.log2n <= MAX_LOG2N and 1 <= self.r <= MAX_R and 1 <= self.p <= MAX_P):
            raise KeyFileError(
                f"scrypt parameters N=2^{self.log2n} r={self.r} p={self.p} are out of range "
                f"(2^10..2^{MAX_LOG2N}, r<={MAX_R}, p<={MAX_P}): rewrap the key with "
                "'bootlink usb create --passphrase'"
            )


def _derived(secret: bytes, label: bytes, size: int) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=size, salt=None, info=b"bootlink/v1/keywrap/" + label
    ).derive(secret)


def _wrapping_key(passphrase: str, salt: bytes, params: Params) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=2**params.log2n, r=params.r, p=params.p)
    return kdf.derive(passphrase.encode("utf-8"))


def wrap(
    secret: bytes,
    passphrase: str,
    params: Params = Params(),  # frozen: a safe default
    salt: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The wrapped-key file's bytes for `secret` under `passphrase`."""
    if len(secret) != SECRET_SIZE:
        raise KeyFileError(f"a bootlink key is {SECRET_SIZE} bytes, got {len(secret)}")
    if not passphrase:
        raise KeyFileError("empty passphrase: choose one, or leave out --passphrase")
    params.check()
    salt = salt if salt is not None else _derived(secret, b"salt", SALT_SIZE)
    nonce = nonce if nonce is not None else _derived(secret, b"nonce", NONCE_SIZE)
    header = HEADER.pack(MAGIC, VERSION, params.log2n, params.r, params.p, salt, nonce)
    key = _wrapping_key(passphrase, salt, params)
    return header + eax.seal(key, nonce, secret, header)


def is_wrapped(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


class WrongPassphrase(KeyFileError):
    """The tag did not verify: wrong passphrase, or the file was altered."""


def unwrap(data: bytes, passphrase: str) -> bytes:
    """The secret inside a wrapped-key file; WrongPassphrase if it does not open."""
    if not is_wrapped(data) or len(data) < HEADER.size:
        raise KeyFileError("not a passphrase-protected bootlink key (no BLWK header)")
    _magic, version, log2n, r, p, salt, nonce = HEADER.unpack_from(data)
    if version != VERSION:
        raise KeyFileError(
            f"wrapped key format version {version} is not known to this bootlink "
            f"(knows {VERSION}): update bootlink or rebuild the stick"
        )
    if len(data) != WRAPPED_SIZE:
        raise KeyFileError(
            f"wrapped key holds {len(data)} bytes, not {WRAPPED_SIZE}: the file is damaged; "
            "rebuild the stick"
        )
    params = Params(log2n, r, p)
    params.check()
    key = _wrapping_key(passphrase, salt, params)
    try:
        return eax.open_(key, nonce, data[HEADER.size :], data[: HEADER.size])
    except eax.InvalidTag:
        raise WrongPassphrase("wrong passphrase (or the key file was altered)") from None


# One prompt per boot: every later load of the same file reuses the secret.
_unlocked: dict[bytes, bytes] = {}


def unlock(
    data: bytes,
    path: Path | str,
    ask: Callable[[str], str | None] | None = None,
    tries: int = MAX_TRIES,
    err=None,
) -> bytes:
    """Ask for the passphrase until it opens the key (at most `tries` times).

    A wrong passphrase gives one line and a new prompt; `ask` returns None at end of
    input (Ctrl-D), which gives up at once."""
    if data in _unlocked:
        return _unlocked[data]
    err = err if err is not None else sys.stderr
    ask = ask if ask is not None else ask_console
    for attempt in range(1, tries + 1):
        passphrase = ask(f"bootlink: the key {path} is protected by a passphrase\npassphrase: ")
        if passphrase is None:
            raise KeyFileError(f"no passphrase given for {path}: the key stays locked")
        try:
            secret = unwrap(data, passphrase)
        except WrongPassphrase:
            left = tries - attempt
            print(f"bootlink: wrong passphrase ({left} tries left)", file=err, flush=True)
            continue
        _unlocked[data] = secret
        key_id = SharedKey(secret).key_id()  # public fingerprint: shows it is the right key
        print(f"bootlink: key unlocked (key id {key_id})", file=err, flush=True)
        return secret
    raise KeyFileError(
        f"{tries} wrong passphrases for {path} (or the key file was altered): reboot to try "
        "again, or rewrite the stick with 'bootlink usb create'"
    )


def ask_console(prompt: str, fd: int | None = None, err=None) -> str | None:
    """Read one line from the terminal on `fd` (stdin) with echo off; None at EOF.

    Not getpass: the ramdisk's PID 1 has no controlling terminal, so /dev/tty does not
    open; its stdin is /dev/console (the last console= on the kernel command line)."""
    fd = sys.stdin.fileno() if fd is None else fd
    err = err if err is not None else sys.stderr
    if not os.isatty(fd):
        raise KeyFileError(
            "the key is passphrase-protected and stdin is not a terminal: "
            "run bootlink on a console to type the passphrase"
        )
    old = termios.tcgetattr(fd)
    new = list(old)
    new[3] &= ~termios.ECHO  # lflags: no echo, keep ICANON (line editing, Enter ends)
    with contextlib.ExitStack() as stack:
        # Echo off before the prompt shows, and no input flush (unlike getpass): whatever
        # is typed once the prompt is visible is kept and never echoed.
        termios.tcsetattr(fd, termios.TCSADRAIN, new)
        stack.callback(termios.tcsetattr, fd, termios.TCSADRAIN, old)
        err.write(prompt)
        err.flush()
        line = _read_line(fd)
    err.write("\n")
    err.flush()
    return line


def _read_line(fd: int) -> str | None:
    buf = bytearray()
    while True:
        chunk = os.read(fd, 1)
        if not chunk:  # EOF (Ctrl-D on an empty line)
            return buf.decode("utf-8", errors="replace") if buf else None
        if chunk in (b"\n", b"\r"):
            return buf.decode("utf-8", errors="replace")
        buf += chunk
