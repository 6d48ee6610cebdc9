"""Load and execute a BootImage with kexec — the one hand-off every source ends in.

kexec_file_load(2) first: the kernel itself reads the files (and, under Secure Boot
lockdown, checks the kernel's signature); it needs no kexec-tools. kexec_load(2) via
kexec-tools is the fallback for kernels or images the file syscall refuses. Before
loading, the exact file descriptors handed to the kernel are hashed again and compared
with the verified digests, so nothing is executed that was not verified.

`prepare` first puts what else the image needs where the next kernel finds it:
- an optional root squashfs (a signed manifest's `rootfs`) is appended to the initrd as
  one more newc cpio archive, which the kernel unpacks into the initramfs next to the
  image's own files: the image's initrd finds it at ROOTFS_PATH, named on the command
  line as `bootlink.rootfs=` (the image's publisher makes its initrd mount it);
- a distro ISO whose initrd can loop-mount a file (Debian live: live-boot's fromiso=)
  is appended to the initrd the same way, at the path its command line names;
- a distro ISO booted in pmem mode is copied to this kernel's /dev/pmemN, the RAM that
  `memmap=SIZE!START` on *this* kernel's command line took out of System RAM (webboot's
  way): no kexec segment is ever placed there, and the next kernel, given the same
  memmap=, sees the very bytes as its /dev/pmem0. The ramdisk must therefore be booted
  with a memmap= big enough for the ISO; there is no other way to hand a kernel RAM
  contents it keeps (kexec segments all land in memory the new kernel reuses).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .bootimage import BootImage
from .errors import BootlinkError
from .output_file import OutputFile

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
        if int(image.extra.get("pmem_offset", 1 << 32)) < 1 << 32 and image.extra.get(
            "pmem_device"
        ):
            # kexec-tools places segments by the firmware memory map, where the memmap=
            # range is still RAM; it puts bzImage and initrd below 4 GiB only.
            raise BootlinkError(
                f"this kernel refused kexec_file_load ({os.strerror(err)}) and kexec-tools "
                "could overwrite the ISO in pmem below 4 GiB: boot the ramdisk with a "
                "memmap= START of 4G or more"
            )
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


ROOTFS_PATH = "/bootlink/rootfs.squashfs"  # where the next kernel's initramfs has it
_NEWC_MAX = 0xFFFFFFFF  # newc's file size field is 8 hex digits


def prepare(image: BootImage, workdir: Path | None = None) -> BootImage:
    """The image as it must be loaded: rootfs appended, ISO in the initrd or staged in
    pmem (if any)."""
    workdir = workdir or Path(image.kernel).parent
    if image.extra.get("rootfs"):
        image = attach_rootfs(image, workdir)
    if image.extra.get("initrd_iso"):
        image = attach_iso(image, workdir)
    if image.extra.get("memmap"):
        image = stage_iso_in_pmem(image)
    return image


def _copy_hashed(src: Path, dst, expected: str, what: str, out_hash=None) -> int:
    """Copy src into the open binary file dst; check src's SHA-256 as it streams by."""
    h = hashlib.sha256()
    n = 0
    with open(src, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            if out_hash is not None:
                out_hash.update(block)
            dst.write(block)
            n += len(block)
    if not expected or h.hexdigest() != expected:
        raise BootlinkError(f"{what} {src} changed after it was verified: refusing to boot it")
    return n


def _newc_header(name: str, mode: int, size: int, ino: int) -> bytes:
    fields = (ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
    return head + b"\0" * (-len(head) % 4)


@dataclass(frozen=True)
class InitrdFile:
    """One file for the next kernel's initramfs: verified bytes from `src` (hashed again
    as they are copied, against `sha256`), or `data` that bootlink itself wrote."""

    path: str  # absolute, in the initramfs
    what: str  # for messages: "ISO", "root squashfs"
    src: Path | None = None
    sha256: str = ""
    data: bytes = b""
    mode: int = 0o444

    @property
    def size(self) -> int:
        return self.src.stat().st_size if self.src is not None else len(self.data)


def append_to_initrd(image: BootImage, workdir: Path, files: list[InitrdFile]) -> BootImage:
    """A new initrd = the image's initrd + one cpio archive holding `files` (and their
    directories).

    Linux unpacks every cpio archive concatenated in the initrd (compressed or not, each
    starting 4-byte aligned; zero padding between them is skipped), so the image's own
    initrd is untouched and finds the files in its initramfs. Every input is hashed
    again as it is copied; the result's digest is what load() checks.
    """
    for file in files:
        if file.size > _NEWC_MAX:
            raise BootlinkError(
                f"{file.what} {file.src} is {file.size} bytes, over the 4 GiB an initrd cpio "
                f"entry can hold: use a smaller {file.what}"
            )
    first = next((f.src for f in files if f.src is not None), None)
    out = Path(workdir) / f"initrd+{first.name if first else 'files'}"
    digest = hashlib.sha256()

    def put(f, data: bytes) -> None:
        digest.update(data)
        f.write(data)

    initrd_size = Path(image.initrd).stat().st_size if image.initrd is not None else 0
    with OutputFile(out, size=initrd_size + sum(f.size for f in files), durable=False) as f:
        n = 0
        if image.initrd is not None:
            n = _copy_hashed(Path(image.initrd), f, image.initrd_sha256, "initrd", digest)
        put(f, b"\0" * (-n % 4))
        ino = 0
        dirs: list[str] = []
        for file in files:
            parts = file.path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.append(d)
                    ino += 1
                    put(f, _newc_header(d, 0o040755, 0, ino))
            ino += 1
            put(f, _newc_header("/".join(parts), 0o100000 | file.mode, file.size, ino))
            if file.src is not None:
                _copy_hashed(file.src, f, file.sha256, file.what, digest)
            else:
                put(f, file.data)
            put(f, b"\0" * (-file.size % 4))
        put(f, _newc_header("TRAILER!!!", 0, 0, 0))
        put(f, b"\0" * (-f.tell() % 512))
        f.commit()
    return dataclasses.replace(image, initrd=out, initrd_sha256=digest.hexdigest())


def attach_rootfs(image: BootImage, workdir: Path) -> BootImage:
    """The image's root squashfs appended to its initrd at ROOTFS_PATH, named on the
    command line as bootlink.rootfs= (the image's initrd mounts it)."""
    rootfs = InitrdFile(
        ROOTFS_PATH,
        "root squashfs",
        src=Path(image.extra["rootfs"]),
        sha256=image.extra.get("rootfs_sha256", ""),
    )
    image = append_to_initrd(image, workdir, [rootfs])
    extra = {**image.extra, "rootfs_path": ROOTFS_PATH}
    del extra["rootfs"]  # attached: prepare() must not attach it twice
    cmdline = f"{image.cmdline} bootlink.rootfs={ROOTFS_PATH}".strip()
    return dataclasses.replace(image, cmdline=cmdline, extra=extra)


def attach_iso(image: BootImage, workdir: Path) -> BootImage:
    """A distro ISO booted from RAM by way of the initramfs: appended to the initrd at the
    path its command line already names (extra["initrd_iso"], e.g. live-boot's
    fromiso=), where the distro's initrd loop-mounts it; with it, the script the
    source gave for the distro's initramfs (extra["initrd_hook"] = path,
    ["initrd_hook_script"] = text), if any. No pmem, no memmap=: the distro's initrd
    needs no driver it lacks (Debian's has no nd_pmem). A downloaded ISO
    (extra["iso_disposable"]) is removed once appended: in the ramdisk's tmpfs it would
    hold the ISO's size in RAM a second time, next to the kexec segment."""
    iso = Path(image.extra["iso"])
    inner = image.extra["initrd_iso"]
    files = [InitrdFile(inner, "ISO", src=iso, sha256=image.extra.get("iso_sha256", ""))]
    if image.extra.get("initrd_hook"):
        script = image.extra.get("initrd_hook_script", "").encode()
        files.append(InitrdFile(image.extra["initrd_hook"], "hook", data=script, mode=0o644))
    image = append_to_initrd(image, workdir, files)
    if image.extra.get("iso_disposable"):  # our download, now in the initrd: free its RAM
        iso.unlink(missing_ok=True)
    extra = {k: v for k, v in image.extra.items() if k != "initrd_iso"}
    extra["iso_in_initrd"] = inner  # attached: prepare() must not attach it twice
    log.info("ISO %s appended to the initrd at %s", iso.name, inner)
    return dataclasses.replace(image, extra=extra)


@dataclass(frozen=True)
class PmemDevice:
    device: Path  # /dev/pmemN
    start: int  # physical address
    size: int  # bytes

    @property
    def memmap(self) -> str:
        return f"memmap={_mem_size(self.size)}!{_mem_size(self.start)}"


def _mem_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def legacy_pmem_devices(sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")) -> list:
    """This kernel's pmem block devices with the physical range behind each."""
    found = []
    for blk in sorted((sys_root / "block").glob("pmem*")):
        try:
            start = int((blk / "device" / "resource").read_text().strip(), 0)
            size = int((blk / "size").read_text().strip()) * 512
        except (OSError, ValueError):
            continue  # not a namespace with a physical range (e.g. BTT): not usable
        found.append(PmemDevice(dev_root / blk.name, start, size))
    return found


def stage_iso_in_pmem(
    image: BootImage, sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")
) -> BootImage:
    """Copy the image's ISO into this kernel's pmem; point the next kernel at the same RAM."""
    iso = Path(image.extra["iso"])
    size = iso.stat().st_size
    devices = [d for d in legacy_pmem_devices(sys_root, dev_root) if d.size >= size]
    if not devices:
        raise BootlinkError(
            f"{iso.name} must be in RAM at boot (pmem mode), but this kernel has no "
            f"/dev/pmem device of {size >> 20} MiB or more: boot the bootlink ramdisk "
            f"with memmap={_mem_size(-(-size // (1 << 30)) << 30)}!4G (and nd_e820, "
            "nd_pmem), or keep the ISO on a disk partition"
        )
    pmem = devices[0]
    with open(pmem.device, "r+b", buffering=0) as f:
        _copy_hashed(iso, f, image.extra.get("iso_sha256", ""), "ISO")
        os.fsync(f.fileno())
        f.seek(0)
        back = hashlib.sha256()
        left = size
        while left and (block := f.read(min(1 << 20, left))):
            back.update(block)
            left -= len(block)
    if back.hexdigest() != image.extra.get("iso_sha256"):
        raise BootlinkError(
            f"{pmem.device} did not keep the ISO (read back differs): the memmap= range "
            "is not real RAM on this machine; pick another START"
        )
    cmdline = re.sub(r"(?<!\S)memmap=\S+", pmem.memmap, image.cmdline, count=1)
    if pmem.memmap not in cmdline.split():
        cmdline = f"{pmem.memmap} {cmdline}"
    # "memmap" goes: staged, so prepare() must not copy it again
    extra = {k: v for k, v in image.extra.items() if k != "memmap"}
    extra |= {"pmem_device": str(pmem.device), "pmem_memmap": pmem.memmap}
    extra["pmem_offset"] = str(pmem.start)
    log.info("ISO %s copied to %s (%s)", iso.name, pmem.device, pmem.memmap)
    return dataclasses.replace(image, cmdline=cmdline, extra=extra)


def load_and_execute(image: BootImage) -> None:
    image = prepare(image)
    result = load(image)
    log.info("loaded %s with %s; executing", image.describe(), result.method)
    execute()
