"""`bootlink usb create`: the client's USB stick (UEFI and legacy BIOS), to a device or a file."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from bootlink.common.bootimage import sha256_file
from bootlink.common.errors import BootlinkError

log = logging.getLogger("bootlink.usb")
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
MIN_PASSPHRASE = 8


def register(sub: argparse._SubParsersAction) -> None:
    from bootlink.ramdisk.cli import DEFAULT_CACHE

    usb = sub.add_parser("usb", help="make the client's bootable USB stick")
    usub = usb.add_subparsers(dest="usb_command", metavar="ACTION", required=True)
    c = usub.add_parser(
        "create",
        help="write a stick (or image) that boots the client ramdisk on UEFI and legacy BIOS",
    )
    c.add_argument(
        "--config", type=Path, required=True, help="client config (YAML); its key goes on the stick"
    )
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", type=Path, help="whole-disk device to overwrite, e.g. /dev/sdb")
    where.add_argument("--image", type=Path, help="write a disk image file instead")
    c.add_argument("--size", help="image size (e.g. 512M, 8G; default: just big enough)")
    c.add_argument(
        "--ramdisk", type=Path, default=DEFAULT_CACHE / "out",
        help="output directory of 'bootlink ramdisk build' (default: %(default)s)",
    )  # fmt: skip
    c.add_argument(
        "--passphrase", action="store_true",
        help="protect the key with a passphrase asked at boot (read from stdin if not a terminal)",
    )  # fmt: skip
    c.add_argument(
        "--append", default="",
        help="more kernel arguments, e.g. 'console=ttyS0,115200' for a serial-only machine",
    )  # fmt: skip
    c.add_argument("--yes", action="store_true", help="write the device without asking")
    c.set_defaults(func=_create)


def parse_size(text: str) -> int:
    """'512M', '8G', '8GiB' (powers of 1024), '8GB' (powers of 1000), or bytes."""
    m = SIZE_RE.match(text)
    if not m:
        raise BootlinkError(f"--size {text!r}: write a size like 512M or 8G")
    number, unit, suffix = m.group(1), m.group(2).upper(), m.group(3).lower()
    base = 1000 if suffix == "b" and unit else 1024
    value = float(number) * base ** "_KMGT".index(unit or "_")
    return int(value)


def read_passphrase(stdin=None) -> str:
    stdin = stdin if stdin is not None else sys.stdin
    if stdin.isatty():
        first = getpass.getpass("Passphrase for the stick's key: ")
        if getpass.getpass("The same again: ") != first:
            raise BootlinkError("the two passphrases differ: nothing was written; try again")
    else:
        first = stdin.readline().rstrip("\r\n")
    if not first:
        raise BootlinkError("empty passphrase: type one, or leave out --passphrase")
    if len(first) < MIN_PASSPHRASE:
        log.warning("passphrase shorter than %d characters: easy to guess", MIN_PASSPHRASE)
    return first


def _create(args: argparse.Namespace) -> int:
    from bootlink.common.config import load_config
    from bootlink.ramdisk.build import source_date_epoch

    from . import device, image, stick

    if args.size and args.device:
        raise BootlinkError("--size is for --image only: a device is used whole")
    cfg = load_config(args.config)
    rd = stick.load_ramdisk(args.ramdisk)  # fail early, naming the build command
    dev = None
    if args.device:
        dev = device.inspect(args.device)
        device.refuse_unsafe(dev)
        if not os.access(dev.path, os.W_OK):
            raise BootlinkError(f"no permission to write {dev.path}: run it with sudo")
        need = stick.estimate_disk_bytes(rd)
        if dev.size < need:
            raise BootlinkError(
                f"device {dev.path} is too small: {dev.size / 2**20:.0f} MiB, the stick needs "
                f"{need / 2**20:.0f} MiB; use a bigger one"
            )
        device.confirm(dev, args.yes)  # before the passphrase: first decide on the device
    else:
        image.check_writable(args.image)
    passphrase = read_passphrase() if args.passphrase else None
    opts = stick.StickOptions(
        config=cfg,
        ramdisk_dir=args.ramdisk,
        passphrase=passphrase,
        append=args.append,
        epoch=source_date_epoch(),
        disk_bytes=dev.size if dev else (parse_size(args.size) if args.size else None),
    )
    if dev is None:
        built = stick.build_stick(opts, args.image)
        digest = sha256_file(built.path)
        _summary(built, opts, f"image {built.path}", digest)
        return 0
    with tempfile.TemporaryDirectory(prefix="bootlink-usb-") as tmp:
        try:
            built = stick.build_stick(opts, Path(tmp) / "stick.img")
        except BootlinkError as exc:
            raise BootlinkError(f"device {dev.path}: {exc}") from None
        digest = device.write_image(built.path, dev.path, built.layout.extents())
    _summary(built, opts, f"device {dev.path} (written and read back)", digest)
    return 0


def _summary(built, opts, where: str, digest: str) -> None:
    lay = built.layout
    key = "passphrase-protected (asked at boot)" if opts.passphrase else "stored as is"
    print(f"{where}: {lay.disk_bytes / 2**20:.0f} MiB, EFI system partition "
          f"{lay.esp_bytes / 2**20:.0f} MiB at 1 MiB (GPT {built.disk_guid})")  # fmt: skip
    print("boots: UEFI (EFI/BOOT/BOOTX64.EFI, unified kernel image), legacy BIOS (syslinux)")
    print(f"key: {key}")
    print(f"sha256: {digest}")
