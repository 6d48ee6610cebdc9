"""A bootable disk image in a plain file: GPT, one FAT32 EFI system partition, BIOS boot code.

No loop devices and no mounting (works unprivileged and in CI):
  - the ESP is made in a file with `mkfs.vfat -C --invariant` and filled with mtools
    (`mmd`, `mcopy`; mtools honours SOURCE_DATE_EPOCH for every timestamp it writes);
  - legacy BIOS: `syslinux --install` (the mtools-based installer) puts its boot sector
    and ldlinux.sys into that FAT file, and syslinux's gptmbr.bin becomes the protective
    MBR's boot code: it finds the GPT partition marked LegacyBIOSBootable and chains to it;
  - the GPT is written with `sfdisk` on the (sparse) image file, the ESP copied in at 1 MiB.
GUIDs and the FAT volume id are derived from the content, so the same inputs give the
same bytes. An image meant for a device of N bytes is laid out for N bytes (backup GPT at
the end) but only its written extents need copying.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bootlink.common.errors import BootlinkError

SECTOR = 512
MIB = 1 << 20
ESP_START = MIB  # LBA 2048: aligned for every flash erase block size that matters
GPT_BACKUP = 33 * SECTOR  # backup partition entries (32 sectors) + backup header
TAIL = MIB  # room left at the end for the backup GPT
MIN_ESP = 48 * MIB  # FAT32 needs >= 65525 clusters: 33 MiB with 512-byte clusters
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_LABEL = "BOOTLINK"
GPTMBR_PATHS = (Path("/usr/lib/SYSLINUX/gptmbr.bin"), Path("/usr/lib/syslinux/mbr/gptmbr.bin"))
BOOT_CODE_SIZE = 440  # the MBR's boot code area; the disk signature and table follow


@dataclass(frozen=True)
class EspFile:
    dest: str  # path inside the ESP, "/"-separated, no leading slash
    source: Path


@dataclass(frozen=True)
class Layout:
    disk_bytes: int
    esp_bytes: int
    esp_start: int = ESP_START

    @property
    def esp_end(self) -> int:
        return self.esp_start + self.esp_bytes

    def extents(self) -> list[tuple[int, int]]:
        """(offset, length) of every byte range that carries data: the rest is unused."""
        head = (0, self.esp_end)
        tail = (self.disk_bytes - GPT_BACKUP, GPT_BACKUP)
        return [head, tail] if tail[0] > self.esp_end else [(0, self.disk_bytes)]


@dataclass(frozen=True)
class ImageSpec:
    files: list[EspFile]
    bios: bool = True  # syslinux + gptmbr.bin
    syslinux_dir: str = "syslinux"
    epoch: int = 0
    disk_bytes: int | None = None  # None: just big enough
    extra_seed: bytes = b""  # more inputs that should change the GUIDs (the cmdline, ...)
    esp_label: str = ESP_LABEL


@dataclass
class BuiltImage:
    path: Path
    layout: Layout
    disk_guid: str
    esp_guid: str
    volume_id: str
    seconds: dict[str, float] = field(default_factory=dict)


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def esp_size_for(content_bytes: int, n_files: int) -> int:
    """An ESP that holds the content with room for FAT tables, directories, slack."""
    need = content_bytes + n_files * 8192 + content_bytes // 20 + 8 * MIB
    return max(MIN_ESP, _round_up(need, MIB))


def min_disk_bytes(esp_bytes: int) -> int:
    return ESP_START + esp_bytes + TAIL


def plan_layout(files: list[EspFile], disk_bytes: int | None) -> Layout:
    content = sum(f.source.stat().st_size for f in files)
    esp = esp_size_for(content, len(files) + 4)
    need = min_disk_bytes(esp)
    if disk_bytes is None:
        return Layout(need, esp)
    if disk_bytes < need:
        raise BootlinkError(
            f"{disk_bytes / MIB:.0f} MiB is too small: the stick needs {need / MIB:.0f} MiB "
            f"(kernel, ramdisk and UKI); use a bigger one"
        )
    return Layout(disk_bytes // SECTOR * SECTOR, esp)


def content_seed(spec: ImageSpec, layout: Layout) -> bytes:
    """A digest of everything the image holds: GUIDs and the volume id come from it."""
    h = hashlib.sha256(b"bootlink/usb/image/v1\0")
    h.update(f"{layout.disk_bytes} {layout.esp_bytes} {spec.bios} {spec.epoch}\0".encode())
    h.update(spec.extra_seed + b"\0")
    for f in sorted(spec.files, key=lambda f: f.dest):
        h.update(f.dest.encode() + b"\0")
        with open(f.source, "rb") as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.digest()


def derived_guid(seed: bytes, what: str) -> str:
    digest = hashlib.sha256(seed + what.encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4)).upper()


def _run(cmd: list[str], what: str, env: dict | None = None, package: str = "") -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError:
        raise BootlinkError(f"{cmd[0]} not found: apt-get install {package or cmd[0]}") from None
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["?"]
        raise BootlinkError(f"{what} failed ({cmd[0]} exited {proc.returncode}): {msg[0]}")
    return proc.stdout


def _mtools_env(epoch: int) -> dict[str, str]:
    # SKIP_CHECK: our FAT is fine, but mtools would refuse a geometry it finds odd.
    return dict(os.environ, MTOOLS_SKIP_CHECK="1", SOURCE_DATE_EPOCH=str(epoch), LC_ALL="C")


def _parents(dest: str) -> Iterator[str]:
    parts = dest.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])


def make_esp(spec: ImageSpec, layout: Layout, volume_id: str, path: Path) -> None:
    """The FAT32 file system in `path`: directories, files, and (for BIOS) syslinux."""
    env = _mtools_env(spec.epoch)
    _run(
        ["mkfs.vfat", "-C", "-F", "32", "--invariant", "-i", volume_id, "-n", spec.esp_label,
         "-S", str(SECTOR), "-h", str(layout.esp_start // SECTOR),
         str(path), str(layout.esp_bytes // 1024)],
        "mkfs.vfat of the EFI system partition", env, "dosfstools",
    )  # fmt: skip
    dirs = sorted({d for f in spec.files for d in _parents(f.dest)} | (
        {spec.syslinux_dir} if spec.bios else set()
    ))  # fmt: skip
    if dirs:  # sorted: every parent comes before its children
        _run(["mmd", "-i", str(path), *(f"::/{d}" for d in dirs)], "mmd", env, "mtools")
    for f in sorted(spec.files, key=lambda f: f.dest):
        _run(["mcopy", "-i", str(path), str(f.source), f"::/{f.dest}"], "mcopy", env, "mtools")
    if spec.bios:
        _run(
            ["syslinux", "--directory", f"/{spec.syslinux_dir}", "--install", str(path)],
            "syslinux --install (legacy BIOS boot sector)", env, "syslinux syslinux-common",
        )  # fmt: skip


def gpt_script(layout: Layout, disk_guid: str, esp_guid: str, bios: bool) -> str:
    attrs = ', attrs="LegacyBIOSBootable"' if bios else ""
    return (
        "label: gpt\n"
        f"label-id: {disk_guid}\n"
        "unit: sectors\n"
        f"sector-size: {SECTOR}\n"
        f"first-lba: {layout.esp_start // SECTOR}\n"
        "\n"
        f"start={layout.esp_start // SECTOR}, size={layout.esp_bytes // SECTOR}, "
        f'type={ESP_TYPE}, uuid={esp_guid}, name="bootlink"{attrs}\n'
    )


def find_gptmbr() -> Path:
    for p in GPTMBR_PATHS:
        if p.exists():
            return p
    raise BootlinkError("syslinux's gptmbr.bin not found: apt-get install syslinux-common")


def check_writable(dest: Path) -> None:
    """Fail before any work if `dest` cannot be created (names the fix)."""
    parent = dest.parent if str(dest.parent) else Path(".")
    if dest.is_dir():
        raise BootlinkError(f"image path {dest} is a directory: give a file name")
    if dest.exists() and not dest.is_file():
        raise BootlinkError(
            f"image path {dest} exists and is not a regular file: to write a stick use --device"
        )
    if not parent.is_dir():
        raise BootlinkError(f"image path {dest}: directory {parent} does not exist; create it")
    if not os.access(parent, os.W_OK | os.X_OK) or (dest.exists() and not os.access(dest, os.W_OK)):
        raise BootlinkError(
            f"image path {dest} is not writable: pick another path or fix permissions"
        )


def build_image(spec: ImageSpec, dest: Path) -> BuiltImage:
    """Write the disk image to `dest` (atomically: a temp file renamed at the end)."""
    dest = Path(dest)
    check_writable(dest)
    layout = plan_layout(spec.files, spec.disk_bytes)
    seed = content_seed(spec, layout)
    disk_guid, esp_guid = derived_guid(seed, "disk"), derived_guid(seed, "esp")
    volume_id = seed[:4].hex().upper()
    gptmbr = find_gptmbr() if spec.bios else None
    with tempfile.TemporaryDirectory(prefix=".bootlink-usb-", dir=dest.parent) as tmp:
        esp = Path(tmp) / "esp.img"
        make_esp(spec, layout, volume_id, esp)
        if esp.stat().st_size != layout.esp_bytes:
            raise BootlinkError(f"mkfs.vfat made {esp.stat().st_size} B, not {layout.esp_bytes}")
        disk = Path(tmp) / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(layout.disk_bytes)  # sparse: an 8 GiB layout costs nothing
        script = gpt_script(layout, disk_guid, esp_guid, spec.bios)
        try:
            proc = subprocess.run(
                ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)],
                input=script, capture_output=True, text=True, check=False,
            )  # fmt: skip
        except FileNotFoundError:
            raise BootlinkError("sfdisk not found: apt-get install fdisk") from None
        if proc.returncode != 0:
            raise BootlinkError(f"sfdisk (GPT) failed: {proc.stderr.strip()[-300:]}")
        with open(disk, "r+b") as f:
            if gptmbr is not None:
                f.write(gptmbr.read_bytes()[:BOOT_CODE_SIZE])
            copy_sparse(esp, f, layout.esp_start)
        os.chmod(disk, 0o600)  # the config layer holds the key (possibly wrapped)
        os.replace(disk, dest)
    return BuiltImage(dest, layout, disk_guid, esp_guid, volume_id)


def copy_sparse(src: Path, out, offset: int, chunk: int = MIB) -> None:
    """Copy `src` into the open file `out` at `offset`, leaving zero chunks as holes."""
    zero = bytes(chunk)
    with open(src, "rb") as f:
        pos = offset
        while block := f.read(chunk):
            if block != zero[: len(block)]:
                out.seek(pos)
                out.write(block)
            pos += len(block)
