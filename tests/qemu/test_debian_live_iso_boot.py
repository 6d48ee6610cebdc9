"""A real Debian live ISO, booted by the client from RAM, as a user's `iso:` source would be.

The ISO is what live-build makes, from Debian's own packages: the Debian kernel, an
initramfs-tools initrd with live-boot (MODULES=most), and a squashfs of a systemd Debian
under /live. The client (the real ramdisk in QEMU) has it only in RAM (in its config
layer, as a download would be in its tmpfs): no disk, no memmap=. It must verify it,
take kernel and initrd out, append the ISO to the initrd (kexec.prepare) and kexec;
Debian's live-boot must then loop-mount the ISO from its initramfs (fromiso=), mount
the squashfs and boot systemd, whose unit reports on the serial port.

Slow: marked `qemu` (~3 min, most of it the live system's systemd under emulation).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bootlink.client.sources import iso
from bootlink.common.config import config_from_dict
from bootlink.common.keys import generate_key_file
from bootlink.ramdisk import build, e2e, qemu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import osroots

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, taps, mmdebstrap)"),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))
# Not in the live system: the kernel is on the ISO already, and the live system needs no
# modules to report that it is up (its initrd has the ones live-boot needs).
SQUASH_EXCLUDE = ["boot", "usr/lib/modules", "var/cache/apt", "var/lib/apt/lists"]


@pytest.fixture(scope="module")
def ramdisk(tmp_path_factory) -> build.BuildResult:
    return build.build(build.BuildOptions(output=tmp_path_factory.mktemp("rd"), cache=CACHE))


@pytest.fixture(scope="module")
def live_iso(tmp_path_factory) -> Path:
    for tool in ("mksquashfs", "xorriso"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    root, k = osroots.os_root("debian-live", CACHE)
    work = tmp_path_factory.mktemp("live")
    squash = work / "filesystem.squashfs"
    subprocess.run(
        ["mksquashfs", str(root), str(squash), "-noappend", "-quiet", "-comp", "xz",
         "-e", *SQUASH_EXCLUDE],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    out = work / "debian-live.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-R", "-J", "-V", "d-live 12 test", "-o", str(out),
         "-graft-points",
         f"/live/vmlinuz={root}/boot/vmlinuz-{k.release}",
         f"/live/initrd.img={root}/boot/initrd.img-{k.release}",
         f"/live/filesystem.squashfs={squash}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def test_client_boots_a_debian_live_iso_from_ram(ramdisk, live_iso, tmp_path):
    assert iso.inspect(live_iso).distro == "debian-live"
    digest = hashlib.sha256(live_iso.read_bytes()).hexdigest()
    generate_key_file(tmp_path / "key")
    cfg = config_from_dict(
        {
            "key": str(tmp_path / "key"),
            "client": {
                "sources": [f"iso:/etc/bootlink/debian-live.iso#sha256={digest}"],
                "menu_timeout": 0,
                "timeout": 60,
            },
        },
        source="test",
    )
    layer = tmp_path / "config.cpio.zst"
    build.config_layer(cfg, layer, build.DEFAULT_EPOCH, {"/etc/bootlink/debian-live.iso": live_iso})
    initrd = tmp_path / "initrd.img"
    build._concat([ramdisk.ramdisk, layer], initrd, 0o600)
    # the ISO is in RAM up to four times at once: the ramdisk's initramfs, the appended
    # initrd in its tmpfs, the kexec segment, then the next kernel's initramfs
    iso_mib = live_iso.stat().st_size >> 20
    with qemu.namespace() as ns:
        nics = [qemu.Nic(ns.add_tap("bltap0"), qemu.mac_for(1))]
        vm = qemu.VM(
            ramdisk.vmlinuz, initrd, f"{e2e.GUEST_CMDLINE} bootlink.role=client",
            nics, ns, memory_mib=1024 + 4 * iso_mib, log_path=tmp_path / "console.log",
        )  # fmt: skip
        with vm:
            up = vm.wait_for(r"^LIVE-UP ", 600, fail=e2e.FAIL_RE).text
            ms = vm.console.milestones()
            vm.wait_exit(120)
    print("milestones:", ms, "ISO MiB:", iso_mib)
    medium, *cmdline = up.split()[1:]
    # live-boot loop-mounted the ISO file the client appended to the initrd
    assert medium.startswith("/dev/loop"), up
    assert f"fromiso={iso.INITRD_ISO_PATH}" in cmdline and "boot=live" in cmdline
    assert not [a for a in cmdline if a.startswith("memmap=")]
