"""The client USB stick boots in QEMU (software emulation) as a USB mass-storage device on an
xHCI controller: with OVMF (UEFI: the firmware starts EFI/BOOT/BOOTX64.EFI, the unified
kernel image) and with SeaBIOS (legacy: gptmbr.bin -> syslinux -> kernel + two initrds).
Proof of boot: the ramdisk's milestone for the client role, then the client loading its
key and probing. With a passphrase-protected key the passphrase is typed on the serial
console: a wrong one is refused with one line and asked again, the right one unlocks.

The real ramdisk is built once (cached under BOOTLINK_CACHE, default ./cache). Slow:
marked `qemu`; CI runs it as its own step. Needs root (ramdisk build, namespaces).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootlink.common.bootimage import sha256_file
from bootlink.common.config import load_config
from bootlink.common.errors import BootlinkError
from bootlink.common.keys import generate_key_file
from bootlink.ramdisk import build as rbuild
from bootlink.ramdisk import qemu
from bootlink.usb import stick

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ramdisk build, namespaces)"),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# The serial port is the test's console: the stick's default puts /dev/console on the screen.
SERIAL = "console=ttyS0,115200"
BOOT_TIMEOUT = 900  # two emulated cores shared with other QEMU runs: be patient
CLIENT_RE = r"bootlink-milestone: bootlink client\b"
PROBING_RE = r"bootlink\.client\.link: probing"
FAIL_RE = r"Kernel panic|bootlink-milestone: bootlink client failed|rescue shell"
PROMPT_RE = r"bootlink: the key /etc/bootlink/key is protected by a passphrase"
PASSPHRASE = "stick lost, laptop safe"


@dataclass
class StickVM(qemu.VM):
    """A VM that boots from a disk image attached as a USB stick (no -kernel)."""

    image: Path | None = None
    firmware: str = "bios"  # "bios" (SeaBIOS, QEMU's default) or "uefi" (OVMF)
    vars_file: Path | None = None  # a writable copy of OVMF's variable store

    def command(self) -> list[str]:
        cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", qemu.CPU, "-nodefaults",
            "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-no-reboot", "-m", str(self.memory_mib), "-smp", str(self.cpus),
        ]  # fmt: skip
        if self.firmware == "uefi":
            cmd += [
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={self.vars_file}",
            ]  # fmt: skip
        return [
            *cmd,
            "-device", "qemu-xhci,id=xhci",
            # snapshot: the guest's writes go to a throw-away overlay, the image stays as built
            "-drive", f"if=none,id=stick,format=raw,file={self.image},snapshot=on",
            "-device", "usb-storage,bus=xhci.0,drive=stick,removable=on",
            *self.extra,
        ]  # fmt: skip


@dataclass
class Sticks:
    plain: Path
    protected: Path
    key_id: str


@pytest.fixture(scope="module")
def sticks(tmp_path_factory) -> Sticks:
    for need in (OVMF_CODE, OVMF_VARS):
        if not need.exists():
            pytest.skip(f"{need} missing: apt-get install ovmf")
    out = tmp_path_factory.mktemp("usb")
    rd = rbuild.build(rbuild.BuildOptions(output=out / "ramdisk", cache=CACHE))
    key = out / "key"
    shared = generate_key_file(key)
    cfg_path = out / "client.yaml"
    cfg_path.write_text(f"key: {key}\nclient:\n  timeout: 5\n")
    cfg = load_config(cfg_path)
    plain = stick.StickOptions(cfg, rd.output, append=SERIAL)
    stick.build_stick(plain, out / "plain.img")
    protected = stick.StickOptions(cfg, rd.output, append=SERIAL, passphrase=PASSPHRASE)
    stick.build_stick(protected, out / "protected.img")
    return Sticks(out / "plain.img", out / "protected.img", shared.key_id())


def test_rebuild_is_byte_identical(sticks, tmp_path):
    """The real kernel and ramdisk, built twice (with the passphrase): the same bytes."""
    cfg = load_config(sticks.plain.parent / "client.yaml")
    again = tmp_path / "again.img"
    opts = stick.StickOptions(cfg, sticks.plain.parent / "ramdisk", append=SERIAL,
                              passphrase=PASSPHRASE)  # fmt: skip
    stick.build_stick(opts, again)
    assert sha256_file(again) == sha256_file(sticks.protected)


def _boot(image: Path, firmware: str, work: Path, interactive: bool = False) -> StickVM:
    vars_file = None
    if firmware == "uefi":
        vars_file = work / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_file)
    return StickVM(
        kernel=image, initrd=image, append="", nics=[], ns=None,  # type: ignore[arg-type]
        image=image, firmware=firmware, vars_file=vars_file,
        log_path=work / f"console-{firmware}.log", stdin_pipe=interactive,
    )  # fmt: skip


def _wait_from(vm: StickVM, pattern: str, start: int, timeout: float) -> int:
    """Index of the first console line at or after `start` matching `pattern`."""
    assert vm.console is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = vm.console.find(pattern, start)
        if hit is not None:
            return hit[0]
        if vm.proc is not None and vm.proc.poll() is not None:
            break
        time.sleep(0.2)
    raise BootlinkError(f"no {pattern!r} after line {start}\n{vm.console.tail()}")


@pytest.mark.parametrize("firmware", ["uefi", "bios"])
def test_stick_boots_the_client(sticks, tmp_path, firmware):
    with qemu.namespace() as ns:  # no NICs, and nothing could reach out anyway
        vm = _boot(sticks.plain, firmware, tmp_path)
        vm.ns = ns
        with vm:
            if firmware == "uefi":
                # OVMF picked the USB stick, and Linux got its initrd from systemd's stub
                vm.wait_for(r"BdsDxe: starting Boot\d+ .*USB", BOOT_TIMEOUT, FAIL_RE)
                vm.wait_for(r"EFI stub: Loaded initrd", BOOT_TIMEOUT, FAIL_RE)
            else:
                vm.wait_for(r"SYSLINUX \d", BOOT_TIMEOUT, FAIL_RE)
                vm.wait_for(r"Loading /bootlink/config\.zst\.*ok", BOOT_TIMEOUT, FAIL_RE)
            line = vm.wait_for(r"Command line: ", BOOT_TIMEOUT, FAIL_RE)
            assert "bootlink.role=client" in line.text and SERIAL in line.text
            client = vm.wait_for(CLIENT_RE, BOOT_TIMEOUT, FAIL_RE)
            # the client read the stick's config and key (loaded before it probes)
            vm.wait_for(PROBING_RE, 300, r"Kernel panic|KeyFileError|key file")
            print(f"{firmware}: client started {client.t:.1f} s after QEMU started; "
                  f"milestones {vm.console.milestones()}")  # fmt: skip


def test_passphrase_asked_on_the_console(sticks, tmp_path):
    """UEFI stick with a wrapped key: wrong passphrase refused and asked again, right one
    unlocks, the client goes on; the passphrase never shows on the console."""
    with qemu.namespace() as ns:
        vm = _boot(sticks.protected, "uefi", tmp_path, interactive=True)
        vm.ns = ns
        with vm:
            vm.wait_for(CLIENT_RE, BOOT_TIMEOUT, FAIL_RE)
            first = _wait_from(vm, PROMPT_RE, 0, 300)
            vm.send("not the passphrase\r")
            wrong = _wait_from(vm, r"bootlink: wrong passphrase \(4 tries left\)", first, 300)
            second = _wait_from(vm, PROMPT_RE, wrong, 300)
            assert second > wrong
            vm.send(PASSPHRASE + "\r")
            unlocked = _wait_from(
                vm, rf"bootlink: key unlocked \(key id {sticks.key_id}\)", second, 300
            )
            _wait_from(vm, PROBING_RE, unlocked, 300)
            text = "\n".join(ln.text for ln in vm.console.lines)
            assert PASSPHRASE not in text and "not the passphrase" not in text, "echoed"
            assert not re.search(r"KeyFileError|Traceback", text)
