"""The ramdisk's /init in QEMU: the selftest role proves the image is complete (every
runtime import, `bootlink --help`), and a failing role ends in a rescue shell, not a
kernel panic. Slow: marked `qemu`. Needs root (namespace and taps)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from bootlink.ramdisk import build, e2e, qemu

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, taps, mmdebstrap)"),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))


@pytest.fixture(scope="module")
def ramdisk(tmp_path_factory) -> build.BuildResult:
    return build.build(build.BuildOptions(output=tmp_path_factory.mktemp("rd"), cache=CACHE))


def _boot(rd: build.BuildResult, append: str, tmp_path: Path, stdin: bool = False) -> qemu.VM:
    ns = qemu.Namespace().create()
    try:
        nics = [qemu.Nic(ns.add_tap("bltap0"), qemu.mac_for(1))]
    except Exception:
        ns.close()
        raise
    vm = qemu.VM(rd.vmlinuz, rd.ramdisk, f"{e2e.GUEST_CMDLINE} {append}", nics, ns,
                 log_path=tmp_path / "console.log", stdin_pipe=stdin)  # fmt: skip
    return vm


def test_selftest_role_imports_everything_and_powers_off(ramdisk, tmp_path):
    vm = _boot(ramdisk, "bootlink.role=selftest bootlink.poweroff=1", tmp_path)
    try:
        with vm:
            vm.wait_for("bootlink-milestone: bootlink --help ran", 120, fail=e2e.FAIL_RE)
            assert vm.wait_exit(60) == 0  # poweroff, not a panic (-no-reboot would exit too)
            ms = vm.console.milestones()
    finally:
        vm.ns.close()
    assert ms["kernel"] < ms["/init"] < ms["modules loaded"] < ms["python up"] < ms["imports ok"]
    text = "\n".join(ln.text for ln in vm.console.lines)
    assert "Kernel panic" not in text and "Traceback" not in text
    assert re.search(r"tls trust store: [1-9]\d+ CAs; dhcp client: \S*udhcpc", text)
    print("selftest milestones:", ms)


def test_failing_role_drops_to_a_rescue_shell_not_a_panic(ramdisk, tmp_path):
    # No config layer: the client role cannot start and must say why.
    vm = _boot(ramdisk, "bootlink.role=client", tmp_path, stdin=True)
    try:
        with vm:
            vm.wait_for(r"bootlink: config: no config: embed one", 120)
            vm.wait_for(r"dropping to a rescue shell", 30)
            time.sleep(3)
            assert vm.proc is not None and vm.proc.poll() is None, "QEMU exited: panic?"
            text = "\n".join(ln.text for ln in vm.console.lines)
            assert "Kernel panic" not in text
            # The shell has commands (busybox applets stand in for the pruned programs).
            vm.send("uname -r; ls /usr/sbin/modprobe && echo rescue-$((6 * 7))\n")
            vm.wait_for(r"^\d+\.\d+\.\d+-\d+-amd64$", 30)
            vm.wait_for(r"^rescue-42$", 30)
    finally:
        vm.ns.close()
