"""No laptop present, for real: the ramdisk client boots an image from a node on the LAN.

The guest boots the bootlink ramdisk as client with one `swarm:<ref>` or `ipfs:<cid>`
source and nothing else: its one NIC is a tap into a namespace that plays the LAN, with
a DHCP server (busybox udhcpd), a Bee node and an IPFS gateway (the fakes, speaking
their APIs) at 10.77.0.1. The client must bring the NIC up, take a lease (client.lan:
auto), fetch the signed manifest and the files it pins, verified chunk by chunk or block
by block, and kexec the image's kernel, whose tiny initrd prints a marker with its
command line. A third case has no Bee node on the LAN at all: the ramdisk carries a `bee`
binary (`ramdisk build --bee`; here the fake node run as `bee start`, retrieving from
the fake at 10.77.0.1 as from the Swarm network) and client.bee_node starts it.

Slow: marked `qemu`. Needs root (namespace, tap), busybox-static, kexec in the guest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bootlink.common.config import config_from_dict
from bootlink.common.keys import generate_key_file
from bootlink.ramdisk import build, e2e, qemu

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, taps)"),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))
FAKES = REPO / "tests" / "fakes"
BOOTLINK = [sys.executable, "-m", "bootlink"]
MARKER = "bootlink-lan-target-up"
# where `publish` uploads (the IPFS fake serves /api/v0/add beside its gateway)
API = {"swarm": "http://10.77.0.1:1633", "ipfs": "http://10.77.0.1:8080"}

TARGET_INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "{MARKER} $(/bin/busybox cat /proc/cmdline)"
/bin/busybox poweroff -f
"""


def _target_initrd(work: Path) -> Path:
    """An initramfs that only says it is up: the image booted from Swarm."""
    root = work / "target-root"
    for d in ("bin", "proc", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    (root / "init").write_text(TARGET_INIT)
    (root / "init").chmod(0o755)
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    out = work / "target-initrd.cpio"
    with open(out, "wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], input=files, cwd=root, stdout=f, check=True
        )
    return out


@pytest.fixture
def lan(tmp_path):
    """The LAN namespace: a tap for the guest at 10.77.0.1/24, udhcpd and a Bee node."""
    if not Path("/bin/busybox").is_file():
        pytest.skip("needs busybox-static (udhcpd, the target's init)")
    procs: list[subprocess.Popen] = []
    with qemu.namespace() as ns:
        tap = ns.add_tap("bltap0")
        subprocess.run(
            [*ns.exec_prefix, "ip", "addr", "add", "10.77.0.1/24", "dev", tap], check=True
        )
        conf = tmp_path / "udhcpd.conf"
        (tmp_path / "leases").touch()
        conf.write_text(
            f"start 10.77.0.100\nend 10.77.0.150\ninterface {tap}\n"
            f"lease_file {tmp_path / 'leases'}\npidfile {tmp_path / 'udhcpd.pid'}\n"
            "option subnet 255.255.255.0\noption router 10.77.0.1\n"
        )
        try:
            procs.append(
                subprocess.Popen(
                    [*ns.exec_prefix, "/bin/busybox", "udhcpd", "-f", str(conf)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            for script, port in (("bee.py", 1633), ("ipfs_gateway.py", 8080)):
                node = subprocess.Popen(
                    [*ns.exec_prefix, sys.executable, str(FAKES / script),
                     "--listen", "10.77.0.1", "--port", str(port)],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                procs.append(node)
                assert node.stdout.readline().startswith("READY"), script
            yield ns, tap
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=10)


BEE_LAUNCHER = """#!/bin/sh
# the fake node as the `bee` binary; "the Swarm network" is the LAN's fake at 10.77.0.1
export BOOTLINK_FAKE_SWARM=http://10.77.0.1:1633 BOOTLINK_FAKE_BEE_WARMUP=2
exec python3 /usr/local/lib/bee-fake/bee.py "$@"
"""


@pytest.mark.parametrize("case", ["swarm", "ipfs", "swarm-own-node"])
def test_desktop_without_laptop_boots_an_image_from_the_lan(lan, tmp_path, case):
    ns, tap = lan
    to = case.split("-")[0]
    own_node = case == "swarm-own-node"
    art = e2e.prepare(CACHE, tmp_path / "ramdisk")
    initrd = _target_initrd(tmp_path)
    sign_key = tmp_path / "sign.key"
    pub = subprocess.run(
        [*BOOTLINK, "sign-key", "--key", str(sign_key)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    pubcfg = tmp_path / "publish.yaml"
    pubcfg.write_text(
        f"server:\n  boot: {{kernel: {art.vmlinuz}, initrd: {initrd}, "
        "cmdline: 'console=ttyS0 panic=-1 lanmarker=1'}\n"
    )
    spec = subprocess.run(
        [*ns.exec_prefix, *BOOTLINK, "publish", "--config", str(pubcfg), "--to", to,
         "--api", API[to], "--sign-key", str(sign_key), "--label", f"{to} over the LAN",
         "--quiet"],
        capture_output=True, text=True, check=True,
    ).stdout.split()[0]  # fmt: skip
    assert spec.startswith(f"{to}:")

    key = tmp_path / "key"
    generate_key_file(key)  # the ramdisk carries one; no link source uses it here
    guest_cfg = config_from_dict(
        {
            "key": str(key),
            "client": {
                "sources": [spec],
                # with its own node, nothing on the LAN answers as a Bee API
                "bee_api": "http://10.77.0.1:9" if own_node else "http://10.77.0.1:1633",
                "bee_node": build.BEE_PATH if own_node else "",
                "ipfs_gateway": "http://10.77.0.1:8080",
                "trusted_keys": [pub],
                "menu_timeout": 0,
            },
        },
        source="guest",
    )
    embed = {}
    if own_node:
        embed = {f"/usr/local/lib/bee-fake/{f}": FAKES / f for f in ("bee.py", "_send.py")}
    guest_initrd = e2e.make_initrd(art, guest_cfg, tmp_path / "client-initrd.img", embed)
    if own_node:  # what `ramdisk build --bee FILE` adds to the ramdisk
        launcher = tmp_path / "bee"
        launcher.write_text(BEE_LAUNCHER)
        launcher.chmod(0o755)
        build.bee_layer(launcher, tmp_path / "bee.cpio.zst", build.DEFAULT_EPOCH)
        with open(guest_initrd, "ab") as f:
            f.write((tmp_path / "bee.cpio.zst").read_bytes())
    vm = qemu.VM(
        art.vmlinuz,
        guest_initrd,
        f"{e2e.GUEST_CMDLINE} bootlink.role=client",
        [qemu.Nic(tap, qemu.mac_for(1))],
        ns,
        memory_mib=1024,
        log_path=tmp_path / "console.log",
    )
    with vm:
        line = vm.wait_for(MARKER, 300, fail=e2e.FAIL_RE)
    log = (tmp_path / "console.log").read_text(errors="replace")
    assert "lanmarker=1" in line.text, line.text
    assert "lan: 10.77.0.1" in log, "the client's log names the lease it took"
    if own_node:
        assert "Bee node ready with 8 peers" in log, "the client started its own Bee node"
        assert "Bee node stopped" in log
    assert f"boot: {to} over the LAN [{to}: ed25519 signature by trusted key" in log
    print(f"{case}: target up at {line.t:.1f} s after power-on")
