"""A unified kernel image: systemd's EFI stub with kernel, initrd and command line inside.

UEFI firmware boots \\EFI\\BOOT\\BOOTX64.EFI from removable media; the stub then starts the
`.linux` section with the `.initrd` section and the `.cmdline` section. Built with objcopy
(binutils) from systemd-boot-efi's linuxx64.efi.stub, the way ukify does it: each new
section at a page-aligned address after the stub's own, `.linux` last so the kernel may
use the memory after it. objcopy stamps the PE header with the current time; we put the
stub's own timestamp back and recompute the checksum, so the same inputs give the same
bytes.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bootlink.common.errors import BootlinkError

STUB_PATHS = (
    Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub"),
    Path("/lib/systemd/boot/efi/linuxx64.efi.stub"),
)
PAGE = 4096


@dataclass(frozen=True)
class Section:
    name: str
    vma: int
    virtual_size: int
    raw_size: int
    raw_offset: int


@dataclass(frozen=True)
class PEInfo:
    timestamp_offset: int
    checksum_offset: int
    timestamp: int
    section_alignment: int
    sections: list[Section]

    def section(self, name: str) -> Section:
        for s in self.sections:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def end(self) -> int:
        return max(s.vma + max(s.virtual_size, s.raw_size) for s in self.sections)


def parse_pe(data: bytes) -> PEInfo:
    """The few PE/COFF header fields a UKI build needs (PE32+ only)."""
    if data[:2] != b"MZ" or len(data) < 0x40:
        raise BootlinkError("not a PE file (no MZ header)")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if data[pe : pe + 4] != b"PE\0\0":
        raise BootlinkError("not a PE file (no PE signature)")
    coff = pe + 4
    _machine, nsect, stamp, _, _, opt_size, _ = struct.unpack_from("<HHIIIHH", data, coff)
    opt = coff + 20
    if struct.unpack_from("<H", data, opt)[0] != 0x20B:
        raise BootlinkError("not a PE32+ (64-bit) image")
    align = struct.unpack_from("<I", data, opt + 32)[0]
    sections = []
    table = opt + opt_size
    for i in range(nsect):
        name, vsize, vma, rsize, roff = struct.unpack_from("<8sIIII", data, table + 40 * i)
        sections.append(Section(name.rstrip(b"\0").decode(), vma, vsize, rsize, roff))
    return PEInfo(coff + 4, opt + 64, stamp, align, sections)


def pe_checksum(data: bytes | bytearray, checksum_offset: int) -> int:
    """The PE optional header's CheckSum: 16-bit ones' complement sum + file length."""
    buf = bytearray(data)
    buf[checksum_offset : checksum_offset + 4] = b"\0\0\0\0"
    if len(buf) % 2:
        buf.append(0)
    total = sum(memoryview(buf).cast("H"))  # little-endian words on x86 (and in PE)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (total + len(data)) & 0xFFFFFFFF


def find_stub() -> Path:
    for p in STUB_PATHS:
        if p.exists():
            return p
    raise BootlinkError(
        "systemd's EFI stub linuxx64.efi.stub not found: apt-get install systemd-boot-efi"
    )


def os_release(version: str) -> str:
    return (
        'NAME="bootlink"\nID=bootlink\n'
        f'VERSION_ID="{version}"\nPRETTY_NAME="bootlink client ({version})"\n'
    )


def build_uki(
    kernel: Path,
    initrds: list[Path],
    cmdline: str,
    dest: Path,
    osrel: str,
    stub: Path | None = None,
) -> Path:
    """Write the UKI to `dest`; the initrds are concatenated into one `.initrd`."""
    stub = stub or find_stub()
    info = parse_pe(stub.read_bytes())
    with tempfile.TemporaryDirectory(prefix="uki-", dir=dest.parent) as tmp:
        t = Path(tmp)
        (t / "osrel").write_text(osrel)
        (t / "cmdline").write_text(cmdline)
        with open(t / "initrd", "wb") as out:
            for part in initrds:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        parts = [(".osrel", t / "osrel"), (".cmdline", t / "cmdline"),
                 (".initrd", t / "initrd"), (".linux", kernel)]  # fmt: skip
        args: list[str] = []
        vma = _align(info.end, max(PAGE, info.section_alignment))
        for name, path in parts:
            args += [
                "--add-section", f"{name}={path}",
                "--set-section-flags", f"{name}=data,readonly",
                "--change-section-vma", f"{name}={vma:#x}",
            ]  # fmt: skip
            vma = _align(vma + path.stat().st_size, PAGE)
        out_tmp = t / "uki.efi"
        try:
            proc = subprocess.run(
                ["objcopy", *args, str(stub), str(out_tmp)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
        except FileNotFoundError:
            raise BootlinkError("objcopy not found: apt-get install binutils") from None
        if proc.returncode != 0:
            raise BootlinkError(f"objcopy failed building the UKI: {proc.stderr.strip()[-300:]}")
        data = bytearray(out_tmp.read_bytes())
    fix_header(data, info.timestamp)
    dest.write_bytes(data)
    return dest


def fix_header(data: bytearray, timestamp: int) -> None:
    """Set the PE timestamp (objcopy writes the current time) and the matching checksum."""
    info = parse_pe(bytes(data[:PAGE]))
    struct.pack_into("<I", data, info.timestamp_offset, timestamp)
    struct.pack_into("<I", data, info.checksum_offset, pe_checksum(data, info.checksum_offset))


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a
