"""Load and execute a BootImage with kexec — the one hand-off every source ends in.

kexec_file_load(2) first: the kernel itself reads the files (and, under Secure Boot
lockdown, checks the kernel's signature); it needs no kexec-tools. kexec_load(2) via
kexec-tools is the fallback for kernels or images the file syscall refuses. Before
loading, the exact file descriptors handed to the kernel are hashed again and compared
with the verified digests, so nothing is executed that was not verified.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from .bootimage import BootImage
from .errors import BootlinkError

log = logging.getLogger("bootlink.kexec")

SYS_KEXEC_FILE_LOAD = 320  # x86_64
KEXEC_FILE_NO_INITRAMFS = 0x4
LINUX_REBOOT_CMD_KEXEC = 0x45584543
LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2 = 0xFEE1DEAD, 672274793

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class LoadResult:
    method: str  # "kexec_file_load" or "kexec-tools"


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _verify(fd: int, expected: str, what: str) -> None:
    if not expected:
        raise BootlinkError(f"{what} has no verified digest: refusing to execute it")
    if _hash_fd(fd) != expected:
        raise BootlinkError(f"{what} changed after it was verified: refusing to execute it")


def load(image: BootImage) -> LoadResult:
    """Load `image` as the kernel to run on the next kexec (nothing is executed yet)."""
    kfd = os.open(image.kernel, os.O_RDONLY)
    ifd = os.open(image.initrd, os.O_RDONLY) if image.initrd else -1
    try:
        _verify(kfd, image.kernel_sha256, "kernel")
        if ifd >= 0:
            _verify(ifd, image.initrd_sha256, "initrd")
        err = _kexec_file_load(kfd, ifd, image.cmdline)
        if err == 0:
            return LoadResult("kexec_file_load")
        log.info("kexec_file_load failed (%s); trying kexec-tools", os.strerror(err))
        _kexec_tools_load(kfd, ifd, image.cmdline)
        return LoadResult("kexec-tools")
    finally:
        os.close(kfd)
        if ifd >= 0:
            os.close(ifd)


def _kexec_file_load(kfd: int, ifd: int, cmdline: str) -> int:
    arg = cmdline.encode() + b"\0"
    flags = 0 if ifd >= 0 else KEXEC_FILE_NO_INITRAMFS
    rc = _libc.syscall(
        SYS_KEXEC_FILE_LOAD,
        ctypes.c_int(kfd),
        ctypes.c_int(ifd),
        ctypes.c_ulong(len(arg)),
        ctypes.c_char_p(arg),
        ctypes.c_ulong(flags),
    )
    return 0 if rc == 0 else ctypes.get_errno()


def _kexec_tools_load(kfd: int, ifd: int, cmdline: str) -> None:
    if shutil.which("kexec") is None:
        raise BootlinkError(
            "this kernel refused kexec_file_load and kexec-tools is not installed: boot a "
            "kernel built with CONFIG_KEXEC_FILE, or install kexec-tools"
        )
    # Hand kexec the very descriptors we hashed (via /proc/self/fd), not the paths.
    cmd = ["kexec", "-l", f"/proc/self/fd/{kfd}", f"--command-line={cmdline}"]
    fds = [kfd]
    if ifd >= 0:
        cmd.insert(3, f"--initrd=/proc/self/fd/{ifd}")
        fds.append(ifd)
    proc = subprocess.run(cmd, pass_fds=fds, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BootlinkError(
            f"kexec could not load the kernel ({last}): this kernel may lack kexec support "
            "(CONFIG_KEXEC) or Secure Boot lockdown forbids unsigned kernels"
        )


def execute() -> None:
    """Jump into the loaded kernel. Returns only on failure."""
    os.sync()
    rc = _libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_KEXEC))
    err = ctypes.get_errno() if rc != 0 else errno.EIO
    raise BootlinkError(f"kexec into the new kernel failed: {os.strerror(err)}")


def load_and_execute(image: BootImage) -> None:
    result = load(image)
    log.info("loaded %s with %s; executing", image.describe(), result.method)
    execute()
