"""What goes on the client USB stick, and the image that carries it.

ESP contents:
  EFI/BOOT/BOOTX64.EFI      UKI: systemd's stub + kernel + ramdisk + config layer + cmdline
  syslinux/syslinux.cfg     legacy BIOS: syslinux loads the same kernel and layers
  syslinux/ldlinux.{sys,c32}  (written by `syslinux --install`)
  bootlink/vmlinuz, bootlink/ramdisk.zst, bootlink/config.zst
  bootlink/stick.json       what is on the stick (versions, hashes, cmdline; no secret)

The ramdisk comes from `bootlink ramdisk build` (reproducible, no config); the config
layer is made here from the client's config and key, so that the key can be wrapped
with a passphrase (usb/keywrap.py) first.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bootlink import __version__
from bootlink.common.bootimage import sha256_file
from bootlink.common.config import Config
from bootlink.common.errors import BootlinkError
from bootlink.common.keys import load_key_file
from bootlink.common.output_file import check_space, write_failed
from bootlink.ramdisk import build as rbuild

from . import image, keywrap, uki

# Screen last: /dev/console (where the client's menu and the passphrase prompt appear) is
# the last console=; the serial port still gets the kernel's messages.
DEFAULT_CONSOLES = "console=ttyS0,115200 console=tty0"
BUILD_HINT = "bootlink ramdisk build --output {dir}"


@dataclass(frozen=True)
class Ramdisk:
    dir: Path
    vmlinuz: Path
    ramdisk: Path
    manifest: dict


@dataclass(frozen=True)
class StickOptions:
    config: Config
    ramdisk_dir: Path
    passphrase: str | None = None
    append: str = ""  # more kernel arguments (console=ttyS0 to move the console to serial)
    epoch: int = rbuild.DEFAULT_EPOCH
    disk_bytes: int | None = None
    bios: bool = True
    keywrap_params: keywrap.Params = keywrap.Params()  # noqa: RUF009 (frozen)


def load_ramdisk(directory: Path) -> Ramdisk:
    """The built ramdisk, checked against its manifest (a half-written build is refused)."""
    directory = Path(directory)
    hint = BUILD_HINT.format(dir=directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise BootlinkError(f"no ramdisk in {directory} (no manifest.json): build it with '{hint}'")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise BootlinkError(f"{manifest_path} is damaged: rebuild with '{hint}'") from None
    out = {}
    for name in ("vmlinuz", "ramdisk.cpio.zst"):
        path = directory / name
        if name not in files or not path.exists():
            raise BootlinkError(f"{path} is missing: rebuild the ramdisk with '{hint}'")
        if path.stat().st_size != files[name]["size"] or sha256_file(path) != files[name]["sha256"]:
            raise BootlinkError(f"{path} does not match its manifest: rebuild with '{hint}'")
        out[name] = path
    return Ramdisk(directory, out["vmlinuz"], out["ramdisk.cpio.zst"], manifest)


def estimate_disk_bytes(rd: Ramdisk) -> int:
    """The image size for this ramdisk, before building (the UKI repeats kernel + ramdisk)."""
    content = 2 * (rd.vmlinuz.stat().st_size + rd.ramdisk.stat().st_size) + image.MIB
    return image.min_disk_bytes(image.esp_size_for(content, 12))


def kernel_cmdline(append: str = "", iso_memory: str = "") -> str:
    """The stick kernel's command line; `iso_memory` (client.iso_memory) adds memmap=."""
    if "\n" in append or "\r" in append:
        raise BootlinkError("--append must be one line of kernel arguments")
    # memmap=SIZE!START: that RAM becomes the ramdisk's /dev/pmem0, where kexec.prepare
    # stages a distro ISO for the next kernel (config.py has validated the value).
    memmap = f"memmap={iso_memory.strip().upper()}" if iso_memory.strip() else ""
    parts = ("bootlink.role=client", DEFAULT_CONSOLES, memmap, append.strip())
    return " ".join(x for x in parts if x)


def syslinux_cfg(cmdline: str) -> str:
    # SERIAL must come first; it mirrors syslinux's own messages to COM1 as well.
    return (
        "SERIAL 0 115200\n"
        "# bootlink client stick, legacy BIOS (UEFI boots EFI/BOOT/BOOTX64.EFI)\n"
        "DEFAULT bootlink\nPROMPT 0\nTIMEOUT 0\n"
        "LABEL bootlink\n"
        "  LINUX /bootlink/vmlinuz\n"
        "  INITRD /bootlink/ramdisk.zst,/bootlink/config.zst\n"
        f"  APPEND {cmdline}\n"
    )


def config_layer(opts: StickOptions, dest: Path, work: Path) -> dict:
    """The config layer (config.yaml + key, raw or wrapped); returns facts for stick.json."""
    key = load_key_file(opts.config.key_path)
    embed: dict[str, Path] = {}
    if opts.passphrase is not None:
        wrapped = work / "key.wrapped"
        fd = os.open(wrapped, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(keywrap.wrap(key.secret, opts.passphrase, opts.keywrap_params))
        # config_layer writes the raw key first; this entry replaces its content (the
        # file keeps mode 0600). tests/test_usb.py checks the layer's key file.
        embed["/etc/bootlink/key"] = wrapped
    rbuild.config_layer(opts.config, dest, opts.epoch, embed)
    if opts.passphrase is not None:
        os.unlink(embed["/etc/bootlink/key"])
    return {"key_id": key.key_id(), "passphrase": opts.passphrase is not None}


def build_stick(opts: StickOptions, dest: Path) -> image.BuiltImage:
    """Write the stick's disk image to `dest` (a file; device.py copies it to a stick)."""
    dest = Path(dest)
    image.check_writable(dest)
    rd = load_ramdisk(opts.ramdisk_dir)
    cmdline = kernel_cmdline(opts.append, opts.config.client.iso_memory)
    elsewhere = "write the image to a {kind} filesystem (--image)"
    # At its peak the scratch holds the UKI's parts, the UKI, the ESP and the disk image
    # (sparse): each input about three times over.
    inputs = rd.vmlinuz.stat().st_size + rd.ramdisk.stat().st_size
    check_space(dest.parent, 3 * inputs + (8 << 20), "building the stick image", elsewhere)
    try:
        return _build_stick(opts, rd, cmdline, dest)
    except OSError as exc:  # a full or read-only filesystem, mid-way: the scratch is gone
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
            raise  # not about where the image goes (e.g. a ramdisk file unreadable)
        raise write_failed(dest, exc, elsewhere) from None


def _build_stick(opts: StickOptions, rd, cmdline: str, dest: Path) -> image.BuiltImage:
    # A private (0700) scratch folder next to the output: key material passes through it.
    with tempfile.TemporaryDirectory(prefix=".bootlink-stick-", dir=dest.parent) as tmp:
        work = Path(tmp)
        layer = work / "config.zst"
        key_facts = config_layer(opts, layer, work)
        efi = work / "BOOTX64.EFI"
        kernel = rd.manifest.get("kernel", {})
        uki.build_uki(
            rd.vmlinuz, [rd.ramdisk, layer], cmdline, efi,
            uki.os_release(f"{__version__} {kernel.get('release', '')}".strip()),
        )  # fmt: skip
        cfg = work / "syslinux.cfg"
        cfg.write_text(syslinux_cfg(cmdline))
        files = [
            image.EspFile("EFI/BOOT/BOOTX64.EFI", efi),
            image.EspFile("bootlink/vmlinuz", rd.vmlinuz),
            image.EspFile("bootlink/ramdisk.zst", rd.ramdisk),
            image.EspFile("bootlink/config.zst", layer),
        ]
        if opts.bios:
            files.append(image.EspFile("syslinux/syslinux.cfg", cfg))
        info = {
            "format": 1,
            "bootlink": __version__,
            "cmdline": cmdline,
            "kernel": {k: kernel.get(k) for k in ("package", "version", "release")},
            "key": key_facts,
            "boot": ["uefi", "bios"] if opts.bios else ["uefi"],
            "source_date_epoch": opts.epoch,
            "uki_stub_sha256": sha256_file(uki.find_stub()),
            # config.zst holds the key: its hash is left out (the UKI's is no secret either
            # way, but there is no reason to publish a function of the key twice)
            "files": {f.dest: sha256_file(f.source) for f in files if f.source != layer},
        }
        stick_json = work / "stick.json"
        stick_json.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        files.append(image.EspFile("bootlink/stick.json", stick_json))
        spec = image.ImageSpec(
            files=files,
            bios=opts.bios,
            epoch=opts.epoch,
            disk_bytes=opts.disk_bytes,
            extra_seed=cmdline.encode(),
        )
        return image.build_image(spec, dest)
