"""Throwaway Debian roots for `setup-server-os --root` tests: the laptop's normal OS.

Two flavours, as a Debian laptop would have them: one whose initrd comes from
initramfs-tools, one from dracut (with systemd, as Debian's dracut systems have); and a
third, "laptop", that also has what bootlink itself runs on (python3 and its libraries,
kexec-tools), booted whole by the autokexec QEMU test. Each
gets the test kernel (from the ramdisk build's cache: no linux-image postinst runs) and
an initial initrd made by its own generator, so that "regenerate" means what it means on
a real install. Built with mmdebstrap once per inputs and cached under cache/osroots/.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from bootlink.ramdisk.build import host_apt_sources
from bootlink.ramdisk.kernel import Kernel, fetch_kernel

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "cache"
RECIPE = 2  # bump when the recipe below changes

COMMON = ("nbd-client", "iproute2", "kmod", "udev", "zstd", "busybox", "e2fsprogs")
FLAVOURS = {
    "initramfs-tools": ("initramfs-tools", "network-manager", *COMMON),
    "dracut": ("dracut", "systemd", "systemd-sysv", *COMMON),
    # A laptop that runs bootlink itself (autokexec): systemd, Debian's python3 with the
    # libraries bootlink needs, kexec-tools.
    "laptop": (
        "dracut",
        "systemd",
        "systemd-sysv",
        "python3",
        "python3-cryptography",
        "python3-yaml",
        "python3-pyroute2",
        "python3-psutil",
        "python3-libnbd",
        "kexec-tools",
        *COMMON,
    ),
    # A Debian live system as live-build makes it: live-boot in an initramfs-tools initrd
    # (MODULES=most), systemd; a unit that reports on the serial port once it is up.
    "debian-live": ("live-boot", "initramfs-tools", "systemd", "systemd-sysv", *COMMON),
}

LIVE_MARKER_UNIT = """[Unit]
Description=bootlink test: report that the live system is up
After=local-fs.target
[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'echo "LIVE-UP $(findmnt -no SOURCE /run/live/medium) $(cat /proc/cmdline)"'
ExecStart=/bin/systemctl poweroff --force --force
[Install]
WantedBy=multi-user.target
"""


def _flavour_hooks(flavour: str, base: Path) -> list[str]:
    if flavour != "debian-live":
        return []
    unit = "/etc/systemd/system/bootlink-live-marker.service"
    wants = "/etc/systemd/system/multi-user.target.wants"
    (base / "marker.service").write_text(LIVE_MARKER_UNIT)
    return [
        f"--customize-hook=upload {base / 'marker.service'} {unit}",
        f'--customize-hook=mkdir -p "$1{wants}" && ln -sf {unit} "$1{wants}/"',
    ]


def _initial_initrd(flavour: str, release: str) -> str:
    if flavour in ("initramfs-tools", "debian-live"):
        return f'chroot "$1" update-initramfs -c -k {release}'
    return f'chroot "$1" dracut --force --no-hostonly /boot/initrd.img-{release} {release}'


def os_root(flavour: str, cache: Path = CACHE) -> tuple[Path, Kernel]:
    """The cached pristine root for `flavour` (build it if needed). Never write into it."""
    kernel = fetch_kernel(cache)
    sources = host_apt_sources()
    h = hashlib.sha256(f"{RECIPE};{flavour};{FLAVOURS[flavour]};{kernel.package}".encode())
    if flavour == "debian-live":
        h.update(LIVE_MARKER_UNIT.encode())
    h.update(kernel.version.encode())
    for s in sources:
        h.update(s.read_bytes())
    base = cache / "osroots" / f"{flavour}-{h.hexdigest()[:12]}"
    root = base / "root"
    if (base / ".complete").exists():
        return root, kernel
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    rel = kernel.release
    hooks = [
        f'--customize-hook=mkdir -p "$1/usr/lib/modules/{rel}" "$1/boot"',
        f'--customize-hook=cp -a "{kernel.modules_dir}/." "$1/usr/lib/modules/{rel}/"',
        f'--customize-hook=cp "{kernel.config}" "$1/boot/"',
        f'--customize-hook=cp "{kernel.vmlinuz}" "$1/boot/"',
        f'--customize-hook=ln -sf vmlinuz-{rel} "$1/boot/vmlinuz"',
        f'--customize-hook=ln -sf initrd.img-{rel} "$1/boot/initrd.img"',
        *_flavour_hooks(flavour, base),
        f"--customize-hook={_initial_initrd(flavour, rel)}",
    ]
    cmd = [
        "mmdebstrap", "--mode=root", "--variant=minbase",
        "--include=" + ",".join(FLAVOURS[flavour]),
        '--aptopt=APT::Install-Recommends "false"',
        "--dpkgopt=path-exclude=/usr/share/{doc,man,locale,info}/*",
        *hooks, "bookworm", str(root), *[str(s) for s in sources],
    ]  # fmt: skip
    log = base / "mmdebstrap.log"
    with open(log, "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"building the {flavour} root failed: {tail} (log: {log})")
    (base / ".complete").write_text(flavour + "\n")
    return root, kernel


def copy_root(src: Path, dest: Path) -> Path:
    """A private copy of a pristine root (hard links would let the test write through)."""
    subprocess.run(["cp", "-a", "--reflink=auto", f"{src}/.", str(dest)], check=True)
    return dest


SKIP = ("proc", "sys", "dev", "run", "tmp")


def tree_map(root: Path, skip: tuple[str, ...] = SKIP) -> dict[str, str]:
    """Every path -> a fingerprint of its type, mode, owner, link target or content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.relpath(dirpath, root) == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            fp = f"{st.st_mode:o} {st.st_uid}:{st.st_gid}"
            if os.path.islink(p):
                fp += " -> " + os.readlink(p)
            elif os.path.isfile(p):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                fp += " " + h.hexdigest()
            out["/" + os.path.relpath(p, root)] = fp
    return out


def tree_digest(root: Path, skip: tuple[str, ...] = SKIP) -> str:
    """One hash over every path, type, mode, owner, link target and file content."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            h.update(f"{rel}\0{st.st_mode:o}\0{st.st_uid}:{st.st_gid}\0".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            h.update(b"\n")
    return h.hexdigest()


if __name__ == "__main__":  # build both roots ahead of the tests: python -m tests.osroots
    import sys

    for fl in sys.argv[1:] or list(FLAVOURS):
        print(fl, os_root(fl)[0], flush=True)
