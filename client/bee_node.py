"""A Bee node inside the ramdisk, for a desktop whose LAN has none (`client.bee_node`).

The default for `swarm:` sources is a Bee node (or gateway) on the LAN, `client.bee_api`.
When `client.bee_node` names a Bee binary (`bootlink ramdisk build --bee FILE` puts one at
/usr/local/bin/bee), the client starts it before the first `swarm:` source as an
ultra-light node: downloads only, no blockchain, no SWAP, no postage, a throwaway
identity in a data directory under client.download_dir (RAM in the ramdisk), its API on
127.0.0.1 only. The node has to find Swarm peers over the internet, so the client waits
until it is ready and has peers, points the swarm sources at it, and stops it (and
removes its data) once the images are downloaded. Every chunk it hands over is still
verified against its address: the node is trusted for nothing but availability.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from pyroute2 import IPRoute

from bootlink.common import net, process
from bootlink.common.config import Config
from bootlink.common.errors import BootlinkError
from bootlink.common.output_file import make_dir

log = logging.getLogger("bootlink.bee")

READY_TIMEOUT = 120.0  # seconds for the node to start and find peers (it dials bootnodes)
MIN_PEERS = 2  # retrieval asks the peers closest to each chunk: one is not enough
POLL = 0.5
CACHE_CHUNKS = 1024  # the node's chunk cache: 4 MiB (Bee's default: 1,000,000 = 4 GB)


class BeeNodeError(BootlinkError):
    """The Bee node in the ramdisk could not be started or found no peers."""


def node_options(data_dir: Path, api_port: int, password: str) -> dict:
    """Bee's configuration for a download-only ultra-light node (Bee 2.x option names;
    Bee refuses unknown ones, so only those are set)."""
    return {
        "api-addr": f"127.0.0.1:{api_port}",  # the API controls the node: never on the LAN
        "data-dir": str(data_dir),
        "password": password,  # the throwaway identity's key file password
        "mainnet": True,
        "full-node": False,
        "swap-enable": False,  # ultra-light: both off and no blockchain endpoint
        "blockchain-rpc-endpoint": "",
        "storage-incentives-enable": False,
        "cache-retrieval": False,  # no caching of chunks relayed for other peers
        # Bee caches what its API downloads (unless asked per request with Swarm-Cache:
        # false, which older 2.x ignore), up to a million chunks: 4 GB more in the
        # ramdisk's RAM for a 4 GB image. A small cache keeps the node's memory flat.
        "cache-capacity": CACHE_CHUNKS,
        "verbosity": "warn",
    }


@contextlib.contextmanager
def running(binary: str, workdir: Path, timeout: float = READY_TIMEOUT) -> Iterator[str]:
    """Start the Bee binary, yield its API URL once it has peers, stop it afterwards."""
    path = Path(binary)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise BeeNodeError(
            f"client.bee_node {binary} is not an executable file: build the ramdisk with "
            "'bootlink ramdisk build --bee FILE' or set client.bee_node to \"\" (use "
            "client.bee_api on the LAN)"
        )
    with IPRoute() as ipr:
        if not net.has_default_route(ipr):  # then it could only wait for peers in vain
            raise BeeNodeError(
                "no route to the internet here (no default route), where a Bee node finds "
                "its Swarm peers: connect the desktop to a network with DHCP (client.lan: "
                "auto or dhcp) or use a Bee node on the LAN (client.bee_api)"
            )
    net.loopback_up()
    data_dir = make_dir(workdir / "bee")
    data_dir.chmod(0o700)
    port = _free_port()
    conf = data_dir / "bee.yaml"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the password
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(node_options(data_dir / "data", port, secrets.token_hex(16)), f)
    log_path = data_dir / "bee.log"
    log.info("starting the Bee node %s (ultra-light, API on 127.0.0.1:%d)", binary, port)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [str(path), "start", "--config", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stopped as a group, and not by a Ctrl-C meant for us
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_peers(proc, url, log_path, timeout)
        yield url
    finally:
        code = process.stop(proc, grace=10, group=True)
        log.info("Bee node stopped (exit status %s)", code)
        shutil.rmtree(data_dir, ignore_errors=True)  # a throwaway identity, in RAM


@contextlib.contextmanager
def using_node(cfg: Config, workdir: Path) -> Iterator[Config]:
    """`cfg` with client.bee_api pointing at the node client.bee_node names, while it runs."""
    with running(cfg.client.bee_node, workdir) as url:
        yield dataclasses.replace(cfg, client=dataclasses.replace(cfg.client, bee_api=url))


def _wait_for_peers(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    t0 = time.monotonic()
    deadline, next_note = t0 + timeout, t0 + 10
    ready, peers = False, 0
    while True:
        if proc.poll() is not None:
            raise BeeNodeError(
                f"the Bee node exited with status {proc.returncode} while starting "
                f"({_last_line(log_path)}): check client.bee_node and the desktop's internet "
                "access, or use a Bee node on the LAN (client.bee_api)"
            )
        ready = ready or _get(url, "/readiness")[0] == 200
        if ready:
            status, body = _get(url, "/peers")
            peers = len(body.get("peers") or []) if status == 200 else 0
            if peers >= MIN_PEERS:
                log.info("Bee node ready with %d peers after %.1f s", peers, time.monotonic() - t0)
                return
        now = time.monotonic()
        if now >= deadline:
            what = f"found {peers} Swarm peer(s)" if ready else "did not become ready"
            raise BeeNodeError(
                f"the Bee node {what} in {timeout:g} s: the desktop needs internet access "
                "(DNS, outbound TCP to port 1634), or use a Bee node on the LAN (client.bee_api)"
            )
        if now >= next_note:
            next_note = now + 10
            log.info("Bee node: %s", f"{peers} peer(s) so far" if ready else "starting")
        time.sleep(POLL)


def _get(url: str, path: str) -> tuple[int | None, dict]:
    """(status, JSON body) of a GET to the local node; (None, {}) while it is not up."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read(1 << 20)
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        return resp.status, body if isinstance(body, dict) else {}
    except (OSError, http.client.HTTPException):
        return None, {}
    finally:
        conn.close()


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now (Bee's own 1633 may be taken by something else)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(path: Path) -> str:
    try:
        lines = path.read_bytes()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1].strip()[:200] if lines else "no output"
