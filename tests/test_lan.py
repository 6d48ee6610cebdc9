"""The client reaching a LAN for swarm:/ipfs:/https sources (client/lan.py): a desktop
namespace whose NIC is down and unaddressed, as in the ramdisk, on a cable to a LAN
namespace with a real DHCP server (busybox udhcpd) and a Bee node (the fake)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netlab import BOOTLINK, Lab

from bootlink.client import lan
from bootlink.common.config import parse_config
from bootlink.common.errors import ConfigError

FAKES = Path(__file__).parent / "fakes"


def test_parse_lease_takes_only_our_lines_and_sane_values():
    got = lan.parse_lease("BOOTLINK-LEASE|eth0|10.1.2.3|255.255.255.0|10.1.2.1 10.1.2.2|9.9.9.9\n")
    assert got == lan.Lease("eth0", "10.1.2.3", 24, ["10.1.2.1", "10.1.2.2"], ["9.9.9.9"])
    assert got.describe() == "10.1.2.3/24 on eth0 via 10.1.2.1"
    assert lan.parse_lease("BOOTLINK-LEASE|eth0|10.1.2.3|255.255.255.0||\n").routers == []
    for bad in (
        "udhcpc: sending discover",
        "BOOTLINK-LEASE|eth0|10.1.2.999|255.255.255.0||",  # not an address
        "BOOTLINK-LEASE|eth0|10.1.2.3|255.0.255.0||",  # not a netmask
        "BOOTLINK-LEASE|eth0|0.0.0.0|255.255.255.0||",
        "BOOTLINK-LEASE|eth0|10.1.2.3|255.255.255.0|; rm -rf /|",
        "BOOTLINK-LEASE||10.1.2.3|255.255.255.0||",
    ):
        assert lan.parse_lease(bad) is None, bad


def test_which_sources_need_the_lan():
    assert not lan.needs_lan(["link"])
    assert not lan.needs_lan(["link", "iso:/media/stick/debian.iso"])
    for spec in ("swarm:ab" + "0" * 62, "ipfs:bafy", "https://x/m.json#sha256=00", "HTTP://x"):
        assert lan.needs_lan(["link", spec]), spec
    assert lan.needs_lan(["iso:https://example.org/d.iso#sha256=00"])


def test_client_lan_is_checked():
    assert parse_config("client: {lan: dhcp}").client.lan == "dhcp"
    assert parse_config("").client.lan == "auto"
    with pytest.raises(ConfigError, match=r"'client.lan' must be auto, dhcp or none; got 'yes'"):
        parse_config("client: {lan: 'yes'}")


# ---------------------------------------------------------------- namespaces


@pytest.fixture
def lab():
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("busybox") is None:
        pytest.skip("needs root, iproute2 and busybox (udhcpc/udhcpd)")
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


def _lan_with_dhcp(lab: Lab, tmp_path: Path, desk_if: str = "eth0"):
    """desk (NIC down, no address) -- cable -- lan (10.77.0.1/24, udhcpd, Bee :1633)."""
    desk, srv = lab.host("desk"), lab.host("lan")
    lab.cable(desk, desk_if, srv, "lan0")
    srv.run(["ip", "addr", "add", "10.77.0.1/24", "dev", "lan0"], check=True)
    conf = tmp_path / "udhcpd.conf"
    conf.write_text(
        "start 10.77.0.100\nend 10.77.0.150\ninterface lan0\n"
        f"lease_file {tmp_path / 'leases'}\npidfile {tmp_path / 'udhcpd.pid'}\n"
        "option subnet 255.255.255.0\noption router 10.77.0.1\noption dns 10.77.0.53\n"
    )
    (tmp_path / "leases").touch()
    lab.start(srv, ["busybox", "udhcpd", "-f", str(conf)], tmp_path / "udhcpd.log")
    bee = srv.popen(
        [sys.executable, str(FAKES / "bee.py"), "--listen", "10.77.0.1", "--port", "1633"],
        stdout=subprocess.PIPE,
        text=True,
    )
    lab.procs.append(bee)
    assert bee.stdout.readline().startswith("READY")
    return desk, srv


def test_client_takes_a_dhcp_lease_and_boots_from_a_bee_node_on_the_lan(lab, tmp_path):
    """The whole way a desktop without its laptop goes: `bootlink client --dry-run
    --json` in a namespace with nothing configured finds the LAN by DHCP, fetches the
    signed image from the Bee node there and verifies it."""
    desk, srv = _lan_with_dhcp(lab, tmp_path)
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(os.urandom(200_000))
    initrd.write_bytes(os.urandom(700_000))
    key = tmp_path / "sign.key"
    out = srv.run([*BOOTLINK, "sign-key", "--key", str(key)], check=True)
    pub = out.stdout.split()[0]
    pubcfg = tmp_path / "publish.yaml"
    pubcfg.write_text(
        f"server:\n  boot: {{kernel: {kernel}, initrd: {initrd}, cmdline: 'quiet'}}\n"
        "client:\n  bee_api: http://10.77.0.1:1633\n"
    )
    out = srv.run(
        [*BOOTLINK, "publish", "--config", str(pubcfg), "--to", "swarm", "--sign-key",
         str(key), "--label", "LAN image", "--quiet"],
        check=True,
    )  # fmt: skip
    spec = out.stdout.split()[0]
    assert spec.startswith("swarm:")

    cfg = tmp_path / "desk.yaml"
    cfg.write_text(
        f"client:\n  sources: ['{spec}']\n  bee_api: http://10.77.0.1:1633\n"
        f"  trusted_keys: ['{pub}']\n  download_dir: {tmp_path / 'dl'}\n  menu_timeout: 0\n"
    )
    t = time.monotonic()
    got = desk.run([*BOOTLINK, "client", "--config", str(cfg), "--dry-run", "--json"])
    assert got.returncode == 0, got.stderr
    plan = json.loads(got.stdout)
    assert plan["source"] == "swarm" and plan["label"] == "LAN image"
    assert time.monotonic() - t < 20
    addr = desk.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], check=True).stdout
    assert "inet 10.77.0.1" in addr  # 10.77.0.100..150
    route = desk.run(["ip", "route", "show", "default"], check=True).stdout
    assert "via 10.77.0.1 dev eth0" in route
    assert "lan: 10.77.0.1" in got.stderr  # the log says what it took


def test_lan_none_leaves_the_nic_alone_and_the_error_names_the_url(lab, tmp_path):
    desk, _srv = _lan_with_dhcp(lab, tmp_path)
    cfg = tmp_path / "desk.yaml"
    cfg.write_text(
        "client:\n  sources: ['swarm:" + "ab" * 32 + "']\n  bee_api: http://10.77.0.1:1633\n"
        f"  lan: none\n  download_dir: {tmp_path / 'dl'}\n"
    )
    got = desk.run([*BOOTLINK, "client", "--config", str(cfg), "--dry-run", "--json"])
    assert got.returncode != 0
    last = got.stderr.strip().splitlines()[-1]
    assert "10.77.0.1:1633" in last and "check the URL and network" in last
    # (a connection that fails may work later, a cable plugged in: tried 3 times, 5 s apart)
    assert "trying again in 5 s (attempt 3 of 3)" in got.stderr
    addr = desk.run(["ip", "-o", "link", "show", "dev", "eth0"], check=True).stdout
    assert "state DOWN" in addr


def test_no_dhcp_server_gives_up_in_time(lab, tmp_path):
    """A dead cable or a LAN without DHCP: no lease, the other NICs' requests ended."""
    desk = lab.host("desk")
    lab.cable(desk, "eth0", None)
    lab.cable(desk, "eth1", lab.host("quiet"), "q0")
    code = "from bootlink.client import lan; print(lan.first_lease(['eth0', 'eth1'], 2.0))"
    t = time.monotonic()
    got = desk.run([sys.executable, "-c", code], check=True)
    assert got.stdout.strip() == "None"
    assert time.monotonic() - t < 6
    assert subprocess.run(["ip", "netns", "pids", desk.ns], capture_output=True).stdout == b""


def test_auto_leaves_a_configured_system_alone_dhcp_does_not(lab, tmp_path):
    """A host someone configured (an address, even without a default route) keeps its
    network under `auto`; `dhcp` takes a lease all the same."""
    desk, _srv = _lan_with_dhcp(lab, tmp_path)
    desk.run(["ip", "addr", "add", "10.99.0.2/24", "dev", "eth0"], check=True)
    code = "import sys; from bootlink.client import lan; print(lan.ensure_lan(sys.argv[1]))"
    got = desk.run([sys.executable, "-c", code, "auto"], check=True)
    assert got.stdout.strip() == "None"
    assert "10.77.0." not in desk.run(["ip", "-4", "-o", "addr"], check=True).stdout
    got = desk.run([sys.executable, "-c", code, "dhcp"], check=True)
    assert "Lease(nic='eth0', address='10.77.0." in got.stdout
    assert "inet 10.77.0.1" in desk.run(["ip", "-4", "-o", "addr"], check=True).stdout
