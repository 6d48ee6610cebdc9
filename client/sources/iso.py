"""Distro ISO source (webboot-style): take kernel + initrd out of a live ISO, boot them.

The ISO is opened with pycdlib (Debian: python3-pycdlib); no loop mount, no root needed.
We recognise the layouts of Debian live (live-boot), Ubuntu (casper), Arch (archiso) and
Fedora (dracut dmsquash-live / anaconda) and give the kernel the command line with which
that distro's initrd finds its ISO again after kexec:

- *file* mode: the ISO is a file on a disk partition (e.g. the bootlink USB stick):
  Debian `findiso=`, Ubuntu and Fedora `iso-scan/filename=`, Arch `img_dev=`+`img_loop=`;
- *initrd* mode (Debian live): the ISO only exists in RAM (downloaded into the
  ramdisk's tmpfs), and live-boot can loop-mount an ISO *file*: kexec.prepare appends
  it to the distro's initrd at INITRD_ISO_PATH (checked against ["iso_sha256"] as it
  is copied), with a live-boot hook that loads the loop driver, and the kernel gets
  `fromiso=` that path (plus `live-media=`, so that live-boot looks there even on a
  machine with no block device at all);
- *pmem* mode (the others, in RAM): the kernel gets `memmap=SIZE!OFFSET`, which turns
  that RAM range into /dev/pmem0, and the distro is pointed at /dev/pmem0. kexec.prepare
  copies the ISO (BootImage.extra["iso"], checked against ["iso_sha256"]) into the
  running kernel's own legacy pmem device and rewrites memmap= to that device's range,
  as webboot did: so the ramdisk itself must be booted with memmap=SIZE!START, and both
  kernels need pmem support
  (CONFIG_X86_PMEM_LEGACY + nd_pmem), in the distro's case in its initrd. Debian's
  kernel builds nd_pmem as a module and its live initrds (initramfs-tools, MODULES=most)
  leave drivers/nvdimm out: a Debian live ISO in pmem never found its medium.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bootlink.common.bootimage import BootImage, Provenance, sha256_file
from bootlink.common.errors import BootlinkError
from bootlink.common.output_file import OutputFile, make_dir

log = logging.getLogger("bootlink.sources.iso")

DEFAULT_PMEM_OFFSET = 4 << 30  # physical address of /dev/pmem0 in pmem mode
INITRD_ISO_PATH = "/bootlink/image.iso"  # initrd mode: live-boot wants a name ending .iso
# live-boot mounts a fromiso= *file* with plain mount(8), which needs the loop driver,
# and nothing in its initramfs loads it first (Debian's kernel has loop as a module):
# mount fails "Operation not permitted". live-premount is live-boot's hook directory
# for the step just before it looks for the medium; initramfs-tools runs a directory's
# scripts by sourcing its ORDER file (which mkinitramfs writes), so the hook is an ORDER
# file. Debian's live initrds have no live-premount (live-boot ships no such script),
# so nothing of theirs is replaced.
LIVE_BOOT_HOOK = "/scripts/live-premount/ORDER"
LIVE_BOOT_HOOK_SCRIPT = """# bootlink: the ISO (fromiso=) is a file here: load loop
modprobe -q loop || true
[ -e /conf/param.conf ] && . /conf/param.conf
"""


@dataclass(frozen=True)
class IsoInfo:
    distro: str  # debian-live | ubuntu | arch | fedora
    kernel: str  # path inside the ISO (Rock Ridge / Joliet / ISO9660 names as found)
    initrd: str
    volume_id: str
    live: bool  # Fedora: a live image (LiveOS/) rather than an installer

    @property
    def label(self) -> str:
        return f"{self.volume_id or self.distro} ({self.distro} ISO)"


@dataclass(frozen=True)
class IsoLocation:
    """Where the ISO file lives for the next kernel: a filesystem UUID and a path in it."""

    uuid: str
    path: str  # absolute within that filesystem, e.g. /isos/debian-live.iso


def _pycdlib():
    try:
        import pycdlib
    except ImportError:
        raise BootlinkError(
            "ISO sources need pycdlib: apt-get install python3-pycdlib (or pip install pycdlib)"
        ) from None
    return pycdlib


class _Iso:
    """An opened ISO with one name space (Rock Ridge > Joliet > plain ISO9660)."""

    def __init__(self, path: Path) -> None:
        pycdlib = _pycdlib()
        self.iso = pycdlib.PyCdlib()
        try:
            self.iso.open(str(path))
        except (pycdlib.pycdlibexception.PyCdlibException, OSError) as exc:
            raise BootlinkError(f"{path} is not a readable ISO 9660 image: {exc}") from None
        if self.iso.has_rock_ridge():
            self.kind, self.facade = "rr", self.iso.get_rock_ridge_facade()
        elif self.iso.has_joliet():
            self.kind, self.facade = "joliet", self.iso.get_joliet_facade()
        else:
            self.kind, self.facade = "iso9660", self.iso.get_iso9660_facade()
        self._exc = pycdlib.pycdlibexception.PyCdlibException

    def close(self) -> None:
        self.iso.close()

    def volume_id(self) -> str:
        raw = self.iso.pvd.volume_identifier
        return raw.decode("ascii", "replace").strip(" \0")

    def names(self, directory: str) -> dict[str, str]:
        """{lowercase plain name: path as stored} for the files in `directory`."""
        stored_dir = self.find(directory)
        if stored_dir is None:
            return {}
        try:
            children = list(self.facade.list_children(stored_dir))
        except self._exc:
            return {}
        out = {}
        for child in children:
            if child is None or child.is_dot() or child.is_dotdot():
                continue
            full = self._full_path(child)
            name = full.rsplit("/", 1)[-1]
            plain = name.split(";", 1)[0].rstrip(".").lower()
            out[plain] = full
        return out

    def _full_path(self, rec) -> str:
        if self.kind == "rr":
            return self.iso.full_path_from_dirrecord(rec, rockridge=True)
        if self.kind == "joliet":
            return self.iso.full_path_from_dirrecord(rec)
        return self.iso.full_path_from_dirrecord(rec)

    def find(self, path: str) -> str | None:
        """The stored path for a case-insensitive, version-less path, or None."""
        parts = [p for p in path.split("/") if p]
        current = "/"
        for i, part in enumerate(parts):
            try:
                children = list(self.facade.list_children(current))
            except self._exc:
                return None
            match = None
            for child in children:
                if child is None or child.is_dot() or child.is_dotdot():
                    continue
                full = self._full_path(child)
                name = full.rsplit("/", 1)[-1].split(";", 1)[0].rstrip(".")
                if name.lower() == part.lower() or (
                    self.kind == "iso9660" and name.lower() == part.lower().replace("-", "_")
                ):
                    match = full
                    if i < len(parts) - 1 and not child.is_dir():
                        match = None
                    break
            if match is None:
                return None
            current = match
        return current

    def extract(self, stored: str, dest: Path) -> None:
        with OutputFile(dest, durable=False) as out:
            self.facade.get_file_from_iso_fp(out, stored)  # it only calls write()
            out.commit()


def _first(names: dict[str, str], patterns: list[str]) -> str | None:
    for pat in patterns:
        rx = re.compile(pat)
        for plain in sorted(names):
            if rx.fullmatch(plain):
                return names[plain]
    return None


def inspect(path: Path) -> IsoInfo:
    """Which distro layout this ISO has, and where its kernel and initrd are."""
    iso = _Iso(path)
    try:
        vol = iso.volume_id()
        live = iso.names("/live")
        if live:
            k = _first(live, [r"vmlinuz", r"vmlinuz-.*"])
            i = _first(live, [r"initrd\.img", r"initrd\.img-.*", r"initrd.*"])
            if k and i:
                return IsoInfo("debian-live", k, i, vol, True)
        casper = iso.names("/casper")
        if casper:
            k = _first(casper, [r"vmlinuz", r"vmlinuz\.efi", r"vmlinuz.*"])
            i = _first(casper, [r"initrd", r"initrd\.lz", r"initrd\.gz", r"initrd.*"])
            if k and i:
                return IsoInfo("ubuntu", k, i, vol, True)
        arch = iso.names("/arch/boot/x86_64")
        if arch:
            k = _first(arch, [r"vmlinuz-linux", r"vmlinuz.*"])
            i = _first(arch, [r"initramfs-linux\.img", r"initramfs.*\.img"])
            if k and i:
                return IsoInfo("arch", k, i, vol, True)
        for d in ("/images/pxeboot", "/isolinux", "/boot/x86_64/loader"):
            names = iso.names(d)
            k = _first(names, [r"vmlinuz", r"linux", r"vmlinuz.*"])
            i = _first(names, [r"initrd\.img", r"initrd", r"initrd.*"])
            if k and i:
                is_live = iso.find("/LiveOS/squashfs.img") is not None
                return IsoInfo("fedora", k, i, vol, is_live)
    finally:
        iso.close()
    raise BootlinkError(
        f"{path}: no known live layout (Debian /live, Ubuntu /casper, Arch /arch/boot, "
        "Fedora /images/pxeboot): bootlink cannot tell how to boot this ISO"
    )


def _dracut_label(label: str) -> str:
    return label.replace(" ", "\\x20")


def cmdline_for(
    info: IsoInfo,
    location: IsoLocation | None,
    iso_size: int,
    pmem_offset: int = DEFAULT_PMEM_OFFSET,
) -> str:
    """The kernel command line with which the distro's initrd finds the ISO again."""
    if location is not None:
        p = location.path
        dev = f"/dev/disk/by-uuid/{location.uuid}"
        if info.distro == "debian-live":
            return f"boot=live components findiso={p}"
        if info.distro == "ubuntu":
            return f"boot=casper iso-scan/filename={p} ---"
        if info.distro == "arch":
            return f"img_dev={dev} img_loop={p} archisobasedir=arch archisolabel={info.volume_id}"
        if info.live:
            label = _dracut_label(info.volume_id)
            return f"iso-scan/filename={p} root=live:CDLABEL={label} rd.live.image"
        return f"iso-scan/filename={p} inst.stage2=hd:LABEL={_dracut_label(info.volume_id)}"
    if info.distro == "debian-live":
        return f"boot=live components fromiso={INITRD_ISO_PATH} live-media={INITRD_ISO_PATH}"
    mib = -(-iso_size // (1 << 20))
    memmap = f"memmap={mib}M!{pmem_offset >> 20}M"
    if info.distro == "ubuntu":
        return f"{memmap} boot=casper ---"
    if info.distro == "arch":
        return f"{memmap} archisodevice=/dev/pmem0 archisobasedir=arch"
    if info.live:
        return f"{memmap} root=live:/dev/pmem0 rd.live.image"
    return f"{memmap} inst.stage2=hd:/dev/pmem0"


def locate(path: Path) -> IsoLocation | None:
    """Filesystem UUID and in-filesystem path of a local file, if it is on a real disk."""
    path = path.resolve()
    best = None
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 10:
            continue
        mnt = fields[4].replace("\\040", " ")
        root = fields[3]
        majmin = fields[2]
        if root != "/":
            continue  # a bind mount of a subdirectory: path arithmetic would be wrong
        inside = (path.as_posix() + "/").startswith(mnt.rstrip("/") + "/")
        if inside and (best is None or len(mnt) > len(best[0])):
            best = (mnt, majmin)
    if best is None:
        return None
    mnt, majmin = best
    by_uuid = Path("/dev/disk/by-uuid")
    uuid = None
    if by_uuid.is_dir():
        for link in by_uuid.iterdir():
            try:
                st = os.stat(link)
            except OSError:
                continue
            if f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == majmin:
                uuid = link.name
                break
    if uuid is None:
        return None
    rel = "/" + path.relative_to(mnt).as_posix() if mnt != "/" else path.as_posix()
    return IsoLocation(uuid, rel)


def image_from_iso(
    iso_path: Path,
    workdir: Path,
    *,
    source: str,
    locator: str,
    verified_by: str,
    location: IsoLocation | None = None,
    pmem_offset: int = DEFAULT_PMEM_OFFSET,
    downloaded: bool = False,
) -> BootImage:
    """Extract kernel + initrd into `workdir` and describe how to boot them. A
    `downloaded` ISO is bootlink's own copy: once it is appended to the initrd, the copy
    is let go (in the ramdisk it is RAM, and the ISO would otherwise be held twice)."""
    info = inspect(iso_path)
    make_dir(workdir)
    kernel = workdir / "vmlinuz"
    initrd = workdir / "initrd.img"
    iso = _Iso(iso_path)
    try:
        iso.extract(info.kernel, kernel)
        iso.extract(info.initrd, initrd)
    finally:
        iso.close()
    size = iso_path.stat().st_size
    cmdline = cmdline_for(info, location, size, pmem_offset)
    extra = {"iso": str(iso_path), "iso_distro": info.distro, "iso_volume_id": info.volume_id}
    if location is None:
        if info.distro == "debian-live":
            extra["initrd_iso"] = INITRD_ISO_PATH
            if downloaded:
                extra["iso_disposable"] = "1"
            extra["initrd_hook"] = LIVE_BOOT_HOOK
            extra["initrd_hook_script"] = LIVE_BOOT_HOOK_SCRIPT
        else:
            extra["memmap"] = cmdline.split()[0]
            extra["pmem_offset"] = str(pmem_offset)
        # kexec.prepare copies the ISO into the initrd or pmem and checks it against this
        extra["iso_sha256"] = sha256_file(iso_path)
    else:
        extra["iso_uuid"] = location.uuid
    return BootImage(
        label=info.label,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        provenance=Provenance(source, locator, verified_by),
        kernel_sha256=sha256_file(kernel),
        initrd_sha256=sha256_file(initrd),
        extra=extra,
    )
