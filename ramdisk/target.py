"""The laptop side of the end-to-end test: a tiny disk to export and the target initrd.

- `build_target_disk`: a GPT disk image whose first partition holds an ext4 root with
  static busybox and an /sbin/init that prints a marker (with the root device it sees)
  and powers off. No loop devices, no mounting: `mkfs.ext4 -d`, `sfdisk` on a file,
  `dd conv=notrunc`.
- `build_target_initrd`: the target kernel's initrd made by Debian's real
  initramfs-tools (`mkinitramfs`) inside a throwaway mmdebstrap root that has
  initramfs-tools, nbd-client, udev and bootlink's hook installed. That proves the hook.

Both are cached under cache/target/ keyed by their inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from bootlink.common.errors import BootlinkError

from .kernel import Kernel, tool

HOOKS_DIR = Path(__file__).resolve().parent.parent / "server" / "hooks" / "initramfs-tools"
BUSYBOX = Path("/bin/busybox")
MARKER_PREFIX = "bootlink-target-marker:"
INITRD_PACKAGES = ("initramfs-tools", "nbd-client", "iproute2", "busybox", "udev", "kmod", "zstd")
DISK_MIB = 48
PART_START_MIB = 1

TARGET_INIT = """#!/bin/busybox sh
# The target root's init: prove where / came from, then power off.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
root=$(/bin/busybox awk '$2 == "/" {print $1, $3}' /proc/mounts | /bin/busybox tail -n 1)
up=$(/bin/busybox cut -d' ' -f1 /proc/uptime)
# the reconnecting NBD client must have survived switch_root (-persist, -systemd-mark)
# (busybox ps shows "{nbd-client} @bd-client ...": -systemd-mark rewrote argv[0])
nbdc=$(/bin/busybox ps -o args | /bin/busybox grep -c '[@n]bd-client .*/dev/nbd')
echo "{prefix} {token} root=$root nbd_clients=$nbdc uptime=$up"
/bin/busybox sync
/bin/busybox poweroff -f
"""


@dataclass(frozen=True)
class TargetDisk:
    image: Path  # the whole disk (GPT, partition 1 = ext4 root)
    fs_uuid: str  # for root=UUID=...
    token: str  # unique per image: the marker line carries it

    @property
    def marker(self) -> str:
        return f"{MARKER_PREFIX} {self.token}"


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    cmd = [tool(cmd[0]), *cmd[1:]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    except FileNotFoundError:
        raise BootlinkError(f"{what}: {cmd[0]} not found: install it with apt-get") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        raise BootlinkError(f"{what} failed: {' | '.join(tail) or 'no output'}")
    return proc


def build_target_disk(cache: Path) -> TargetDisk:
    if not BUSYBOX.is_file():
        raise BootlinkError(f"{BUSYBOX} missing: apt-get install busybox-static")
    key = hashlib.sha256(
        TARGET_INIT.encode() + BUSYBOX.read_bytes() + f"{DISK_MIB}".encode()
    ).hexdigest()[:16]
    base = Path(cache) / "target" / f"disk-{key}"
    meta = base / "disk.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        return TargetDisk(base / "disk.img", m["fs_uuid"], m["token"])
    if base.exists():
        shutil.rmtree(base)
    tree = base / "tree"
    for d in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "etc", "root"):
        (tree / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, tree / "bin" / "busybox")
    os.symlink("busybox", tree / "bin" / "sh")
    token = uuid.uuid4().hex[:16]
    fs_uuid = str(uuid.uuid4())
    init = tree / "sbin" / "init"
    init.write_text(TARGET_INIT.replace("{prefix}", MARKER_PREFIX).replace("{token}", token))
    init.chmod(0o755)
    (tree / "etc" / "fstab").write_text("")
    fs = base / "root.ext4"
    fs_mib = DISK_MIB - PART_START_MIB - 1  # GPT keeps a backup header at the end
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "bootlink-test", "-U", fs_uuid, "-d", str(tree),
         "-E", "root_owner=0:0", str(fs), f"{fs_mib}M"],
        "mkfs.ext4 -d",
    )  # fmt: skip
    img = base / "disk.img"
    with open(img, "wb") as f:
        f.truncate(DISK_MIB << 20)
    _run(
        ["sfdisk", "--quiet", str(img)],
        "sfdisk",
        input=f"label: gpt\nstart={PART_START_MIB}MiB, size={fs_mib}MiB, type=linux, name=root\n",
    )
    _run(
        ["dd", f"if={fs}", f"of={img}", "bs=1M", f"seek={PART_START_MIB}", "conv=notrunc",
         "status=none"],
        "dd",
    )  # fmt: skip
    fs.unlink()
    shutil.rmtree(tree)
    meta.write_text(json.dumps({"fs_uuid": fs_uuid, "token": token}) + "\n")
    return TargetDisk(img, fs_uuid, token)


def hook_files() -> dict[str, Path]:
    """bootlink's initramfs-tools files, relative to /etc/initramfs-tools."""
    files = {str(p.relative_to(HOOKS_DIR)): p for p in sorted(HOOKS_DIR.rglob("*")) if p.is_file()}
    if "hooks/bootlink" not in files:
        raise BootlinkError(f"bootlink's initramfs-tools hook missing under {HOOKS_DIR}")
    return files


def build_target_initrd(cache: Path, kernel: Kernel, sources: tuple[Path, ...]) -> Path:
    """mkinitramfs (Debian's initramfs-tools) with bootlink's hook, for `kernel`."""
    files = hook_files()
    h = hashlib.sha256(f"{kernel.package}={kernel.version};{INITRD_PACKAGES}".encode())
    for rel, path in files.items():
        h.update(rel.encode() + b"\0" + path.read_bytes())
    for s in sources:
        h.update(s.read_bytes())
    base = Path(cache) / "target" / f"initrd-{h.hexdigest()[:16]}"
    out = base / f"initrd.img-{kernel.release}"
    if out.exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    rel_modules = f"usr/lib/modules/{kernel.release}"
    hooks = [
        # The kernel's modules and config, unpacked from the same .deb the test boots
        # (installing linux-image would run its own update-initramfs first).
        f'--customize-hook=mkdir -p "$1/{rel_modules}" "$1/boot"',
        f'--customize-hook=cp -a "{kernel.modules_dir}/." "$1/{rel_modules}/"',
        f'--customize-hook=cp "{kernel.config}" "$1/boot/"',
    ]
    for rel, path in files.items():
        dest = f"/etc/initramfs-tools/{rel}"
        hooks += [
            f'--customize-hook=mkdir -p "$1{os.path.dirname(dest)}"',
            f'--customize-hook=install -m 0755 "{path}" "$1{dest}"',
        ]
    hooks += [
        f'--customize-hook=chroot "$1" mkinitramfs -o /boot/initrd.img-{kernel.release} '
        f"{kernel.release}",
        f'--customize-hook=cp "$1/boot/initrd.img-{kernel.release}" "{out}.tmp"',
    ]
    cmd = [
        "mmdebstrap", "--mode=root", "--variant=minbase",
        "--include=" + ",".join(INITRD_PACKAGES),
        '--aptopt=APT::Install-Recommends "false"',
        *hooks, "bookworm", "/dev/null", *[str(s) for s in sources],
    ]  # fmt: skip
    log = base / "mmdebstrap.log"
    with open(log, "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise BootlinkError(f"target initrd build failed: {' | '.join(tail)} (log: {log})")
    os.replace(f"{out}.tmp", out)
    return out
