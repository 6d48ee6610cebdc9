"""client.bee_node: the desktop starts a Bee node of its own for swarm: sources.

No real Bee can run here, so the `bee` binary is the fake node run as `bee start --config
FILE` (tests/fakes/bee.py): it reads Bee's options as bee does (refusing unknown ones and
anything but an ultra-light node), answers /readiness and /peers as Bee does, and
retrieves what it lacks from "the Swarm network", another fake node holding a published
image. The client must start it, wait for peers, boot-verify the image through it, and
leave no process or data behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from fakes import bee as fake_bee
from netlab import BOOTLINK

from bootlink.cli import main as bootlink_main
from bootlink.client import bee_node
from bootlink.common.bootimage import sha256_file

FAKE_BEE = Path(__file__).parent / "fakes" / "bee.py"


@pytest.fixture
def swarm_network():
    """The Swarm network, as far as a node's retrieval goes: one fake node holding chunks."""
    with fake_bee.serving() as node:
        yield node


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


def test_client_boots_a_swarm_image_through_its_own_bee_node(swarm_network, tmp_path, capsys):
    state, network = swarm_network
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(os.urandom(300_000))
    initrd.write_bytes(os.urandom(900_000))
    key = tmp_path / "sign.key"
    assert bootlink_main(["sign-key", "--key", str(key)]) == 0
    pub = capsys.readouterr().out.split()[0]
    args = ["publish", "--to", "swarm", "--api", network, "--sign-key", str(key)]
    args += ["--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", "quiet", "--quiet"]
    assert bootlink_main(args) == 0
    spec = capsys.readouterr().out.strip()
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
    env = {**os.environ, "BOOTLINK_FAKE_SWARM": network, "BOOTLINK_FAKE_BEE_WARMUP": "1.5"}
    before = state.requests
    run = subprocess.run(
        [*BOOTLINK, "client", "--config", str(cfg), "--dry-run", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["source"] == "swarm" and plan["kernel_sha256"] == sha256_file(kernel)
    assert plan["initrd_sha256"] == sha256_file(initrd)
    assert "Bee node ready with 8 peers" in run.stderr
    assert state.requests > before  # the chunks came from the network, through the node
    assert bee_processes(binary) == []  # stopped once the image was downloaded
    assert not (work / "bee").exists()  # its throwaway identity (and password) removed
    assert "password" not in run.stderr


def test_fetch_cli_uses_the_configured_node_too(swarm_network, tmp_path, monkeypatch, capsys):
    state, network = swarm_network
    data = os.urandom(200_000)
    ref = state.store_bytes(data)
    binary = bee_binary(tmp_path)
    cfg = tmp_path / "c.yaml"
    client = {"bee_node": str(binary), "bee_api": "http://127.0.0.1:9"}
    cfg.write_text(yaml.safe_dump({"client": client}))
    monkeypatch.setenv("BOOTLINK_FAKE_SWARM", network)
    monkeypatch.setenv("BOOTLINK_FAKE_BEE_WARMUP", "0.5")
    out = tmp_path / "out.bin"
    args = ["fetch", f"swarm:{ref.hex()}", "--config", str(cfg), "--output", str(out), "--quiet"]
    assert bootlink_main(args) == 0, capsys.readouterr().err
    assert out.read_bytes() == data
    assert bee_processes(binary) == []


def test_bee_node_that_exits_is_one_line_naming_its_last_words(tmp_path):
    binary = bee_binary(tmp_path, "#!/bin/sh\necho 'Error: data-dir is not writable' >&2\nexit 3\n")
    with pytest.raises(bee_node.BeeNodeError) as ei, bee_node.running(str(binary), tmp_path):
        pass
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(
        "the Bee node exited with status 3 while starting (Error: data-dir is not writable)"
    )
    assert "client.bee_api" in msg and not (tmp_path / "bee").exists()


def test_bee_node_without_peers_gives_up_in_time_and_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTLINK_FAKE_BEE_WARMUP", "1000")  # never ready
    binary = bee_binary(tmp_path)
    with pytest.raises(bee_node.BeeNodeError) as ei, bee_node.running(str(binary), tmp_path, 3):
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
