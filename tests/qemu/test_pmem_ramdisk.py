"""The real bootlink ramdisk with memmap=SIZE!START (client.iso_memory): /dev/pmem0 appears
with the reserved range, and kexec.prepare stages an ISO there inside the guest, with the
ramdisk's own Python and modules. Without memmap= no nvdimm module is loaded.

What the next kernel then sees on its /dev/pmem0 is proven in test_kexec_extras_boot.py.
Slow: marked `qemu`. Needs root (a network namespace and a tap, as the other QEMU tests).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bootlink.common.config import config_from_dict, iso_memory_range
from bootlink.common.keys import generate_key_file
from bootlink.ramdisk import build, e2e, qemu
from bootlink.ramdisk import kernel as rkernel

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, taps, mmdebstrap)"),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))
ISO_MEMORY = "256M!4G"  # the smallest valid client.iso_memory at the lowest allowed START
ISO_BYTES = 5 << 20

# Run in the guest's rescue shell: what the client does with an iso: source in pmem mode.
STAGE = f"""
import hashlib, os
from pathlib import Path
from bootlink.common import kexec
from bootlink.common.bootimage import BootImage, Provenance
print("PMEM-DEVS", " ".join(f"{{d.device}}:{{d.start}}:{{d.size}}" for d in kexec.legacy_pmem_devices()))
data = os.urandom({ISO_BYTES}) + b"bootlink-iso"
Path("/run/t.iso").write_bytes(data)
digest = hashlib.sha256(data).hexdigest()
img = BootImage("iso", Path("/proc/version"), None, "memmap=6M!4G boot=live",
                Provenance("iso", "t.iso", "test"),
                extra={{"iso": "/run/t.iso", "iso_sha256": digest, "memmap": "memmap=6M!4G"}})
out = kexec.prepare(img)
print("STAGED", out.extra["pmem_device"], "|", out.cmdline)
with open(out.extra["pmem_device"], "rb") as f:
    print("READBACK", hashlib.sha256(f.read(len(data))).hexdigest() == digest)
"""  # noqa: E501


@pytest.fixture(scope="module")
def ramdisk(tmp_path_factory) -> build.BuildResult:
    return build.build(build.BuildOptions(output=tmp_path_factory.mktemp("rd"), cache=CACHE))


def _with_script(rd: build.BuildResult, tmp_path: Path) -> Path:
    """The ramdisk + a config layer (as on the stick) that also holds STAGE's script."""
    generate_key_file(tmp_path / "key")
    cfg = config_from_dict(
        {"key": str(tmp_path / "key"), "client": {"iso_memory": ISO_MEMORY}}, source="test"
    )
    (tmp_path / "stage.py").write_text(STAGE)
    layer = tmp_path / "config.cpio.zst"
    build.config_layer(
        cfg, layer, build.DEFAULT_EPOCH, {"/etc/bootlink/stage.py": tmp_path / "stage.py"}
    )
    initrd = tmp_path / "initrd.img"
    build._concat([rd.ramdisk, layer], initrd, 0o600)
    return initrd


def _shell_vm(initrd: Path, rd, append: str, memory: int, tmp_path: Path, ns) -> qemu.VM:
    nics = [qemu.Nic(ns.add_tap("bltap0"), qemu.mac_for(1))]
    return qemu.VM(
        rd.vmlinuz, initrd, f"{e2e.GUEST_CMDLINE} bootlink.shell=1 {append}".strip(),
        nics, ns, memory_mib=memory, log_path=tmp_path / "console.log", stdin_pipe=True,
    )  # fmt: skip


def test_memmap_gives_the_ramdisk_pmem0_and_the_iso_is_staged_there(ramdisk, tmp_path):
    size, start = iso_memory_range(ISO_MEMORY)
    memmap, memory = e2e.memmap_for(ISO_MEMORY, 1024)
    assert memmap == f"memmap={ISO_MEMORY}"
    initrd = _with_script(ramdisk, tmp_path)
    with qemu.namespace() as ns:
        vm = _shell_vm(initrd, ramdisk, memmap, memory, tmp_path, ns)
        with vm:
            vm.wait_for(r"dropping to a rescue shell", 180, fail=r"Kernel panic")
            ms = vm.console.milestones()
            vm.send("echo SYS $(cat /sys/block/pmem0/device/resource /sys/block/pmem0/size)\n")
            sys_line = vm.wait_for(r"^SYS ", 30).text
            vm.send("echo MODS $(cut -d' ' -f1 /proc/modules | grep -E '^(nd_|libnvdimm)')\n")
            mods = vm.wait_for(r"^MODS", 30).text
            vm.send("python3 /etc/bootlink/stage.py\n")
            devs = vm.wait_for(r"^PMEM-DEVS", 120, fail=r"Traceback|BootlinkError").text
            staged = vm.wait_for(r"^STAGED ", 120, fail=r"Traceback|BootlinkError").text
            back = vm.wait_for(r"^READBACK ", 60, fail=r"Traceback|BootlinkError").text
    print("milestones:", ms)
    # The kernel's own view: the range memmap= named, as one pmem device.
    res, sectors = sys_line.split()[1:3]
    assert (int(res, 0), int(sectors) * 512) == (start, size)
    assert {"nd_e820", "nd_pmem", "nd_btt", "libnvdimm"} <= set(mods.split()[1:])
    assert devs.split()[1:] == [f"/dev/pmem0:{start}:{size}"]
    # kexec.prepare copied the ISO there and gave the next kernel this device's range.
    assert staged == f"STAGED /dev/pmem0 | memmap={ISO_MEMORY} boot=live"
    assert back == "READBACK True"
    assert ms["/init"] < ms["modules loaded"]


def test_without_memmap_no_nvdimm_module_is_loaded(ramdisk, tmp_path):
    with qemu.namespace() as ns:
        vm = _shell_vm(ramdisk.ramdisk, ramdisk, "", 1024, tmp_path, ns)
        with vm:
            vm.wait_for(r"dropping to a rescue shell", 180, fail=r"Kernel panic")
            vm.send("echo MODS $(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ') END\n")
            mods = vm.wait_for(r"^MODS .* END$", 30).text.split()[1:-1]
    assert "virtio_net" in mods  # modules did load (the list is real)
    assert not [m for m in mods if m.startswith("nd_") or m == "libnvdimm"], mods


# The "distro" inside the ISO: the Debian kernel and a busybox initrd that, like a live
# system's, finds its ISO on /dev/pmem0 (it loads nd_e820 + nd_pmem itself). Laid out as
# Ubuntu's (casper), which the client boots in pmem mode (a Debian live ISO in RAM rides
# in its initrd instead: test_debian_live_iso_boot.py).
PMEM_MODULES = ["libnvdimm", "nd_btt", "nd_pmem", "nd_e820"]  # dependency order
ISO_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
# The client gives this kernel the distro's arguments only (no console=ttyS0), so its
# /dev/console is the VGA one: write to the serial port the harness reads directly.
exec >/dev/ttyS0 2>&1
for m in {modules}; do insmod /m/$m.ko || echo "FAIL insmod $m"; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/pmem0 ] && break; sleep 1; done
echo "ISO-KERNEL $(cat /proc/cmdline)"
echo "ISO-PMEM0 $(head -c 1048576 /dev/pmem0 | sha256sum | cut -c1-64)"
poweroff -f
"""


def _live_iso(k: rkernel.Kernel, tmp_path: Path) -> Path:
    """An Ubuntu-layout ISO (/casper/vmlinuz, /casper/initrd) built with pycdlib."""
    pycdlib = pytest.importorskip("pycdlib")
    root = tmp_path / "iso-initrd"
    for d in ("bin", "proc", "sys", "dev", "m"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for m in PMEM_MODULES:
        shutil.copy2(next(k.modules_dir.rglob(f"{m}.ko")), root / "m" / f"{m}.ko")
    (root / "init").write_text(ISO_INIT.format(modules=" ".join(PMEM_MODULES)))
    (root / "init").chmod(0o755)
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    initrd = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"], input=names, cwd=root,
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    out = pycdlib.PyCdlib()
    out.new(interchange_level=3, vol_ident="BOOTLINK_LIVE", rock_ridge="1.09")
    out.add_directory("/CASPER", rr_name="casper")
    kernel = k.vmlinuz.read_bytes()
    for name, data in (("vmlinuz", kernel), ("initrd", initrd)):
        iso_name = "/CASPER/" + name.upper().replace(".", "_") + ".;1"
        out.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name)
    path = tmp_path / "live.iso"
    out.write(str(path))
    out.close()
    return path


def test_client_boots_an_iso_source_from_pmem(ramdisk, tmp_path):
    """The client role, configured with one iso: source (a file in its config layer, so no
    network): it opens the ISO, kexec.prepare copies it to the ramdisk's /dev/pmem0, and the
    ISO's kernel, kexec'd with the same memmap=, reads the ISO back from its /dev/pmem0."""
    if not Path("/bin/busybox").is_file():
        pytest.skip("needs busybox-static")
    assert any(p["name"] == "python3-pycdlib" for p in ramdisk.manifest["packages"])
    k = rkernel.fetch_kernel(CACHE)
    iso_path = _live_iso(k, tmp_path)
    digest = hashlib.sha256(iso_path.read_bytes()).hexdigest()
    first_mib = hashlib.sha256(iso_path.read_bytes()[: 1 << 20]).hexdigest()
    generate_key_file(tmp_path / "key")
    cfg = config_from_dict(
        {
            "key": str(tmp_path / "key"),
            "client": {
                "sources": [f"iso:/etc/bootlink/live.iso#sha256={digest}"],
                "menu_timeout": 0,
                "timeout": 60,
                "iso_memory": ISO_MEMORY,
            },
        },
        source="test",
    )
    layer = tmp_path / "config.cpio.zst"
    build.config_layer(cfg, layer, build.DEFAULT_EPOCH, {"/etc/bootlink/live.iso": iso_path})
    initrd = tmp_path / "initrd.img"
    build._concat([ramdisk.ramdisk, layer], initrd, 0o600)
    memmap, memory = e2e.memmap_for(ISO_MEMORY, 1024)
    with qemu.namespace() as ns:
        nics = [qemu.Nic(ns.add_tap("bltap0"), qemu.mac_for(1))]
        vm = qemu.VM(
            ramdisk.vmlinuz, initrd, f"{e2e.GUEST_CMDLINE} bootlink.role=client {memmap}",
            nics, ns, memory_mib=memory, log_path=tmp_path / "console.log",
        )  # fmt: skip
        with vm:
            got = vm.wait_for(r"^ISO-PMEM0 ", 300, fail=e2e.FAIL_RE + r"|FAIL").text
            cmdline = vm.console.find(r"^ISO-KERNEL ")[1].text
            ms = vm.console.milestones()
            vm.wait_exit(60)
    print("milestones:", ms)
    assert got.split()[1] == first_mib  # the ISO's bytes, on the next kernel's pmem0
    # prepare() gave the ISO's kernel the ramdisk's own pmem range, and casper's args
    assert f"memmap={ISO_MEMORY}" in cmdline.split() and "boot=casper" in cmdline.split()
