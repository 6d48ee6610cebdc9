"""End-to-end in QEMU (software emulation): the real ramdisk, real kexec, real NBD root.

client: a laptop-side `bootlink server` in a namespace on one of the guest's three NICs
(the other two are dead cables); the guest boots the ramdisk as client, finds the server,
downloads, kexecs the Debian kernel whose initramfs-tools initrd (with bootlink's hook)
mounts the exported root over NBD; the root's init prints a marker that carries a token
unique to the disk image and the root device it sees.
server: the guest boots the ramdisk as server; `bootlink client --dry-run --json` in the
namespace finds it, downloads the boot files and checks the NBD export.

Slow (minutes): marked `qemu`; CI runs it as its own step. Needs root.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootlink.ramdisk import e2e

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, taps, mmdebstrap)"),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> e2e.Artifacts:
    return e2e.prepare(CACHE, tmp_path_factory.mktemp("ramdisk"))


def _explain(res: e2e.Result) -> str:
    return f"{res.detail}\nmilestones: {res.milestones}\nconsole log: {res.console_log}"


@pytest.mark.parametrize("root_arg", [None, "root=/dev/nbd0p1"], ids=["uuid", "nbd-path"])
def test_client_boots_laptop_root_over_nbd(artifacts, tmp_path, root_arg):
    # root=/dev/nbd0p1 also wakes Debian's own (IPv4, DHCP) nbd script: the hook must make
    # it step aside, or the boot would stall in DHCP.
    res = e2e.run_client_scenario(artifacts, tmp_path, root_arg=root_arg)
    assert res.ok, _explain(res)
    assert artifacts.disk.marker in res.marker
    # The root the target's init sees is the NBD partition, not anything else.
    assert "root=/dev/nbd0p1 ext4" in res.marker, res.marker
    # and the reconnecting nbd-client (-persist) survived switch_root into the target
    assert "nbd_clients=1" in res.marker, res.marker
    ms = res.milestones
    assert ms["kernel"] < ms["/init"] < ms["python up"] < ms["target marker"], ms
    print("client milestones:", ms)


def test_server_role_reached_from_a_host_client(artifacts, tmp_path):
    res = e2e.run_server_scenario(artifacts, tmp_path)
    assert res.ok, _explain(res)
    plan = res.plan
    assert plan["interface"] == f"bltap{e2e.LIVE_NIC}"
    assert plan["server"].startswith("fe80:"), plan
    assert plan["nbd_uri"].startswith("nbd://"), plan
    assert f"root=UUID={artifacts.disk.fs_uuid}" in plan["cmdline"]
    assert "bootlink.nbd_host=fe80:" in plan["cmdline"]
    print("server milestones:", res.milestones)
