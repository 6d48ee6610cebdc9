"""Drop shared libraries nothing in the ramdisk links against any more.

Pruning nbdkit's unused plugins leaves their libraries (curl, ssh, torrent...) behind.
A library stays if it is reachable through DT_NEEDED from any ELF file that is not a
candidate itself (programs, Python extensions, kept plugins, glibc's and OpenSSL's
modules in sub-folders), or if it is loaded with dlopen() by name (KEEP_SONAMES).
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from bootlink.common.errors import BootlinkError

LIBDIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib")
# dlopen()ed by name, so no DT_NEEDED points at them.
KEEP_PREFIXES = (
    "libgcc_s.so", "libnss_", "ld-linux", "libc.so", "libthread_db",
    # glibc's compatibility stubs: tiny, and ctypes users may name them
    "libpthread.so", "libdl.so", "librt.so", "libutil.so", "libm.so", "libresolv.so",
)  # fmt: skip

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME = 0, 1, 5, 14


def needed(path: Path) -> list[str] | None:
    """DT_NEEDED sonames of a 64-bit little-endian ELF file; None if it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            phoff, phentsize, phnum = (
                struct.unpack_from("<Q", head, 32)[0],
                *struct.unpack_from("<HH", head, 54),
            )
            f.seek(phoff)
            phdrs = f.read(phentsize * phnum)
            loads, dyn = [], None
            for i in range(phnum):
                p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from(
                    "<IIQQQQQQ", phdrs, i * phentsize
                )
                if p_type == PT_LOAD:
                    loads.append((p_vaddr, p_offset, p_filesz))
                elif p_type == PT_DYNAMIC:
                    dyn = (p_offset, p_filesz)
            if dyn is None:
                return []
            f.seek(dyn[0])
            raw = f.read(dyn[1])
            entries = [struct.unpack_from("<qQ", raw, o) for o in range(0, len(raw) - 15, 16)]
            strtab = next((v for t, v in entries if t == DT_STRTAB), None)
            if strtab is None:
                return []
            off = next((o + strtab - va for va, o, sz in loads if va <= strtab < va + sz), None)
            if off is None:
                return []
            names = []
            for tag, val in entries:
                if tag == DT_NULL:
                    break
                if tag == DT_NEEDED:
                    f.seek(off + val)
                    names.append(f.read(256).split(b"\0", 1)[0].decode())
            return names
    except (OSError, struct.error):
        return None


def resolve_in(root: Path, rel: Path) -> Path:
    """`rel` (relative to `root`) with every symlink in it followed as if `root` were /:
    absolute targets point into `root`, never into the build host. Relative to `root`."""
    todo = list(rel.parts)
    done: list[str] = []
    for _ in range(256):  # symlink loops end here, unresolved
        if not todo:
            break
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        if part == os.sep:
            done = []
            continue
        p = root.joinpath(*done, part)
        if p.is_symlink():
            target = Path(os.readlink(p))
            todo = [*target.parts, *todo]  # an absolute target starts with os.sep
            continue
        done.append(part)
    return Path(*done, *todo)


def unused_libraries(root: Path) -> list[Path]:
    """Top-level shared libraries in LIBDIRS that no remaining ELF file needs.

    Every path is handled relative to `root` and symlinks are followed inside it: with
    Path.resolve() a relative `root` (`--cache cache`) turned the soname links' targets
    into absolute paths that matched none of the scanned ones, so the libraries those
    targets need (libbsd -> libmd, libnbd -> libxml2 -> ICU) were dropped."""
    root = Path(root)
    candidates: dict[str, list[Path]] = {}  # soname/file name -> paths (symlinks too)
    cand_files: set[Path] = set()
    for d in LIBDIRS:
        base = root / d
        if not base.is_dir():
            continue
        for p in base.iterdir():
            if ".so" in p.name and (p.is_file() or p.is_symlink()):
                if p.name.startswith(KEEP_PREFIXES):
                    continue
                rel = p.relative_to(root)
                candidates.setdefault(p.name, []).append(rel)
                cand_files.add(rel)
    deps: dict[Path, list[str]] = {}
    roots: list[str] = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            # Regular files only: opening a FIFO or a device node would block or worse.
            if not stat.S_ISREG(p.lstat().st_mode):
                continue
            n = needed(p)
            if n is None:
                continue
            rel = p.relative_to(root)
            if rel in cand_files:
                deps[rel] = n
            else:
                roots += n
    # Follow sonames through the candidates (a soname may be a symlink to the real file).
    real = {p: resolve_in(root, p) for p in cand_files}
    keep: set[Path] = set()
    todo = list(roots)
    while todo:
        soname = todo.pop()
        for p in candidates.get(soname, []):
            for q in (p, real[p]):
                if q not in keep:
                    keep.add(q)
                    todo += deps.get(q, [])
    return sorted(root / p for p in cand_files if p not in keep and real[p] not in keep)


def prune_unused_libraries(root: Path) -> int:
    freed = 0
    for p in unused_libraries(root):
        freed += p.lstat().st_size
        p.unlink()
    return freed


# Where the dynamic loader looks (ld.so.conf.d's multiarch paths, then its defaults).
SEARCH_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")


def missing_libraries(root: Path) -> dict[str, list[str]]:
    """Sonames some ELF file under `root` needs that the loader would not find there
    (file relative to root -> sonames): the check after pruning, so an image that
    cannot run `ip` or `import nbd` fails the build instead of the boot."""
    root = Path(root)
    missing: dict[str, list[str]] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if not stat.S_ISREG(p.lstat().st_mode):
                continue
            lost = [
                so
                for so in needed(p) or ()
                if not any((root / resolve_in(root, Path(d, so))).is_file() for d in SEARCH_DIRS)
            ]
            if lost:
                missing[str(p.relative_to(root))] = lost
    return missing


def check_nothing_lost(root: Path, before: dict[str, list[str]]) -> None:
    """Raise if pruning left an ELF file needing a library that was there before it
    (`before` = missing_libraries(root) on the unpruned tree: some Debian plugins need
    libraries only their Recommends bring, e.g. tc's q_atm.so and libatm)."""
    lost = {
        f: [so for so in sonames if so not in before.get(f, [])]
        for f, sonames in missing_libraries(root).items()
    }
    lost = {f: s for f, s in lost.items() if s}
    if lost:
        shown = "; ".join(f"/{f} needs {', '.join(s)}" for f, s in sorted(lost.items())[:4])
        raise BootlinkError(
            f"pruning removed libraries still needed: {shown}: fix ramdisk/elfdeps.py "
            "(or keep the library with KEEP_PREFIXES if it is dlopen()ed by name)"
        )
