"""Reproducible packing: clamp mtimes, sorted newc cpio, zstd; and the SHA-256 of results.

Same tree + same SOURCE_DATE_EPOCH -> byte-identical archive: every mtime is clamped,
the file list is sorted bytewise (LC_ALL=C), GNU cpio renumbers inodes
(--reproducible), owners are forced to root, and zstd gets fixed parameters.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bootlink.common.errors import BootlinkError


def clamp_mtimes(root: Path, epoch: int) -> int:
    """Set every mtime/atime under `root` (symlinks themselves included) to `epoch`."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isdir(p):
                os.utime(p, (epoch, epoch), follow_symlinks=False)
                count += 1
    # Directories last: touching their entries above does not change their mtime, but
    # walk order must not matter, so do them in a second pass.
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.utime(p, (epoch, epoch))
                count += 1
    os.utime(root, (epoch, epoch))
    return count


def sorted_paths(root: Path) -> list[bytes]:
    """Every path under root as b"./a/b", sorted bytewise (the order LC_ALL=C sort gives)."""
    out: list[bytes] = [b"."]
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        rel = os.path.relpath(dirpath, broot)
        prefix = b"." if rel == b"." else b"./" + rel
        for name in dirnames + filenames:
            out.append(prefix + b"/" + name)
    out.sort()
    return out


def pack_cpio(root: Path, output: Path, epoch: int) -> int:
    """Write `root` as a newc cpio archive (uncompressed) to `output`; returns its size."""
    clamp_mtimes(root, epoch)
    listing = b"\0".join(sorted_paths(root)) + b"\0"
    env = dict(os.environ, LC_ALL="C", SOURCE_DATE_EPOCH=str(epoch))
    with open(output, "wb") as out:
        try:
            proc = subprocess.run(
                ["cpio", "--null", "--create", "--format=newc", "--reproducible",
                 "--owner=0:0", "--quiet"],
                input=listing, stdout=out, stderr=subprocess.PIPE, cwd=root, env=env, check=False,
            )  # fmt: skip
        except FileNotFoundError:
            raise BootlinkError("cpio not found: apt-get install cpio") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise BootlinkError(f"cpio failed on {root}: {msg[0]}")
    return output.stat().st_size


def zstd_compress(src: Path, dst: Path, level: int = 19, threads: int = 2) -> int:
    """zstd with fixed parameters (the output does not depend on the machine)."""
    cmd = ["zstd", "-q", "-f", f"-{level}", f"-T{threads}", "--no-progress", "--check"]
    if level > 19:
        cmd.insert(1, "--ultra")
    try:
        proc = subprocess.run(
            [*cmd, str(src), "-o", str(dst)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise BootlinkError("zstd not found: apt-get install zstd") from None
    if proc.returncode != 0:
        raise BootlinkError(f"zstd failed on {src}: {proc.stderr.strip()}")
    return dst.stat().st_size
