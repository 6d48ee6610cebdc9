"""client.bee_node: the desktop starts a Bee node of its own for swarm: sources.

No real Bee can run here, so the `bee` binary is the fake node run as `bee start --config
FILE` (tests/fakes/bee.py): it reads Bee's options as bee does (refusing unknown ones and
anything but an ultra-light node), answers /readiness and /peers as Bee does, and
retrieves what it lacks from "the Swarm network": another fake node, in a namespace the
desktop's namespace reaches through its default route (a veth "uplink"). The client must
start the node, wait for peers, verify the image through it, and leave no process or
data behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from fakes import bee as fake_bee
from netlab import BOOTLINK, Lab, wait_for_log

from bootlink.client import bee_node
from bootlink.common import net
from bootlink.common.bootimage import sha256_file

pytestmark = pytest.mark.netns
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)

FAKE_BEE = Path(__file__).parent / "fakes" / "bee.py"
NETWORK = "http://10.88.0.1:1633"  # "the Swarm network", beyond the desktop's uplink


@pytest.fixture
def lab(tmp_path):
    """desk (10.88.0.2, default route via 10.88.0.1) -- cable -- net (the Swarm network)."""
    lab = Lab()
    try:
        desk, inet = lab.host("desk"), lab.host("net")
        lab.cable(desk, "eth0", inet, "eth0")
        inet.run(["ip", "addr", "add", "10.88.0.1/24", "dev", "eth0"], check=True)
        desk.run(["ip", "addr", "add", "10.88.0.2/24", "dev", "eth0"], check=True)
        desk.run(["ip", "link", "set", "eth0", "up"], check=True)
        desk.run(["ip", "route", "add", "default", "via", "10.88.0.1"], check=True)
        log = tmp_path / "network.log"
        cmd = [sys.executable, str(FAKE_BEE), "--listen", "10.88.0.1", "--port", "1633"]
        wait_for_log(log, "READY", lab.start(inet, cmd, log))
        yield lab, desk
    finally:
        lab.close()


def bee_binary(tmp_path: Path, body: str | None = None) -> Path:
    """An executable `bee`: the fake node, or a shell script `body`."""
    path = tmp_path / "bin" / "bee"
    path.parent.mkdir(exist_ok=True)
    path.write_text(body or f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_BEE}" "$@"\n')
    path.chmod(0o755)
    return path


def bee_processes(binary: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if str(binary) in cmd or (str(FAKE_BEE) in cmd and "start" in cmd):
            found.append(p)
    return found


def test_node_options_are_an_ultra_light_download_only_node(tmp_path):
    opts = bee_node.node_options(tmp_path / "data", 41633, "pw")
    assert opts["api-addr"] == "127.0.0.1:41633"  # never reachable from the LAN
    assert (opts["full-node"], opts["swap-enable"], opts["blockchain-rpc-endpoint"]) == (
        False,
        False,
        "",
    )
    assert set(opts) <= fake_bee.KNOWN_OPTIONS  # bee refuses unknown options
    # API downloads land in Bee's cache (4 GB by default): in the ramdisk that is RAM
    assert opts["cache-capacity"] * 4096 <= 16 << 20


def test_client_boots_a_swarm_image_through_its_own_bee_node(lab, tmp_path):
    _, desk = lab
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(os.urandom(300_000))
    initrd.write_bytes(os.urandom(900_000))
    key = tmp_path / "sign.key"
    pub = desk.run([*BOOTLINK, "sign-key", "--key", str(key)], check=True).stdout.split()[0]
    publish = [*BOOTLINK, "publish", "--to", "swarm", "--api", NETWORK, "--sign-key", str(key)]
    publish += ["--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", "quiet", "--quiet"]
    spec = desk.run(publish, check=True).stdout.strip()
    binary = bee_binary(tmp_path)
    work = tmp_path / "download"
    cfg = tmp_path / "client.yaml"
    client = {
        "sources": [spec],
        "bee_node": str(binary),
        "bee_api": "http://127.0.0.1:9",  # nothing there: the client must use its own node
        "lan": "none",
        "trusted_keys": [pub],
        "download_dir": str(work),
    }
    cfg.write_text(yaml.safe_dump({"key": str(tmp_path / "key"), "client": client}))
    env = {**os.environ, "BOOTLINK_FAKE_SWARM": NETWORK, "BOOTLINK_FAKE_BEE_WARMUP": "1.5"}
    run = desk.run([*BOOTLINK, "client", "--config", str(cfg), "--dry-run", "--json"], env=env)
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["source"] == "swarm" and plan["kernel_sha256"] == sha256_file(kernel)
    assert plan["initrd_sha256"] == sha256_file(initrd)
    assert "Bee node ready with 8 peers" in run.stderr
    assert bee_processes(binary) == []  # stopped once the image was downloaded
    assert not (work / "bee").exists()  # its throwaway identity (and password) removed
    assert "password" not in run.stderr
    # `bootlink fetch` with that config takes the same way (here: the manifest's bytes)
    out = tmp_path / "manifest.json"
    fetch = [*BOOTLINK, "fetch", spec, "--config", str(cfg), "--output", str(out), "--quiet"]
    run = desk.run(fetch, env=env)
    assert run.returncode == 0, run.stderr
    assert "manifest" in json.loads(out.read_bytes())
    assert bee_processes(binary) == []


def test_bee_node_that_exits_is_one_line_naming_its_last_words(lab, tmp_path):
    _, desk = lab
    binary = bee_binary(tmp_path, "#!/bin/sh\necho 'Error: data-dir is not writable' >&2\nexit 3\n")
    with (
        net.in_netns(desk.ns),
        pytest.raises(bee_node.BeeNodeError) as ei,
        bee_node.running(str(binary), tmp_path),
    ):
        pass
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(
        "the Bee node exited with status 3 while starting (Error: data-dir is not writable)"
    )
    assert "client.bee_api" in msg and not (tmp_path / "bee").exists()


def test_bee_node_without_peers_gives_up_in_time_and_is_stopped(lab, tmp_path, monkeypatch):
    _, desk = lab
    monkeypatch.setenv("BOOTLINK_FAKE_BEE_WARMUP", "1000")  # never ready
    binary = bee_binary(tmp_path)
    with (
        net.in_netns(desk.ns),
        pytest.raises(bee_node.BeeNodeError) as ei,
        bee_node.running(str(binary), tmp_path, 3),
    ):
        pass
    assert str(ei.value) == (
        "the Bee node did not become ready in 3 s: the desktop needs internet access (DNS, "
        "outbound TCP to port 1634), or use a Bee node on the LAN (client.bee_api)"
    )
    assert bee_processes(binary) == [] and not (tmp_path / "bee").exists()


def test_missing_bee_binary_names_the_build_option(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(bee_node.BeeNodeError, match="ramdisk build --bee FILE"):
        bee_node.running(missing, tmp_path).__enter__()


def test_no_route_off_the_lan_fails_at_once_without_starting_a_node(lab, tmp_path):
    """A desktop without a default route (no DHCP lease, client.lan: none, cable out):
    the node could only wait two minutes for peers; the client says so right away."""
    lab, _ = lab
    alone = lab.host("alone")  # lo only
    binary = bee_binary(tmp_path)
    t0 = time.monotonic()
    with (
        net.in_netns(alone.ns),
        pytest.raises(bee_node.BeeNodeError) as ei,
        bee_node.running(str(binary), tmp_path),
    ):
        pass
    assert time.monotonic() - t0 < 2
    assert str(ei.value).startswith("no route to the internet here (no default route)")
    assert bee_processes(binary) == [] and not (tmp_path / "bee").exists()
