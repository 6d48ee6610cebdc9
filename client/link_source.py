"""The laptop link as a boot source: probe, fetch the sealed payload, check NBD, and yield
a BootImage whose command line points the laptop's initrd at its disk over NBD."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from bootlink.common import net
from bootlink.common.bootimage import BootImage, Provenance
from bootlink.common.cmdline import NbdRoot, target_cmdline
from bootlink.common.config import Config
from bootlink.common.errors import BootlinkError, ProtocolError
from bootlink.common.keys import Purpose, SharedKey, load_key_file
from bootlink.common.nbd_check import NbdTarget, check_export

from .probe import Found, Probe, ProbeParams, reclaim_stale_probes

log = logging.getLogger("bootlink.client.link")

ATTEMPTS = 3  # a transfer cut mid-way (cable pulled and re-plugged) is retried from a probe


@dataclass(frozen=True)
class LinkBoot:
    image: BootImage
    found: Found
    nbd: NbdTarget


def boot_from_link(cfg: Config, progress: bool = True) -> LinkBoot:
    key = load_key_file(cfg.key_path)
    deadline = time.monotonic() + cfg.client.timeout
    last_error: BootlinkError | None = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with _probe(cfg, key, deadline) as probe:
                found = probe.run()
                ifname = _reconfigure_winner(found, cfg, deadline)
                host = net.scoped(found.server_addr, ifname)
                # Imported once a server answered, not before the probe: http.client and
                # the stream reader cost ~0.1 s of a boot under emulation.
                from .transfer import fetch_boot_payload

                received = fetch_boot_payload(
                    host,
                    found.offer.http_port,
                    key.subkey(Purpose.TRANSFER),
                    found.offer.challenge,
                    Path(cfg.client.download_dir),
                    progress=progress,
                )
        except ProtocolError as exc:
            last_error = exc
            log.warning("attempt %d: %s", attempt, exc)
            if time.monotonic() >= deadline:
                break
            continue
        m = received.manifest
        target = NbdTarget(host, m.nbd.port, m.nbd.export)
        check_export(target, m.nbd.size, m.nbd.first_sector_sha256)
        log.info("NBD export %s reachable: %d bytes, first sector verified", target.uri, m.nbd.size)
        root = NbdRoot(found.server_addr, m.nbd.port, m.nbd.export, found.nic.mac, m.nbd.read_only)
        sha = {f.name: f.sha256 for f in m.files}
        image = BootImage(
            label=f"laptop {m.server_name or found.server_addr} via {ifname}",
            kernel=received.paths["kernel"],
            initrd=received.paths["initrd"],
            cmdline=target_cmdline(m.cmdline, root, cfg.client.cmdline_append),
            provenance=Provenance("link", host, f"AES-EAX sealed stream, key id {key.key_id()}"),
            kernel_sha256=sha["kernel"],
            initrd_sha256=sha["initrd"],
            extra={"interface": ifname, "nbd_uri": target.uri, "server_name": m.server_name},
        )
        return LinkBoot(image, found, target)
    raise last_error or BootlinkError("boot transfer failed")


def _probe(cfg: Config, key: SharedKey, deadline: float) -> Probe:
    reclaim_stale_probes()
    with IPRoute() as ipr:
        nics = net.list_nics(ipr, cfg.link.interfaces)
    log.info("probing %s in parallel", ", ".join(n.name for n in nics) or "no NICs")
    params = ProbeParams(
        key.subkey(Purpose.DISCOVERY),
        cfg.link.discovery_port,
        cfg.link.mtu,
        deadline,
        k_trig=key.subkey(Purpose.TRIGGER),
    )
    return Probe(nics, params)


def _reconfigure_winner(found: Found, cfg: Config, deadline: float) -> str:
    """Bring the winning NIC up again in our own namespace (the move back reset it)."""
    with IPRoute() as ipr:
        nic = next((n for n in net.list_nics(ipr) if n.mac == found.nic.mac), None)
        if nic is None:
            raise net.LinkError(f"{found.nic.name} vanished after the server was found")
        net.bring_up(ipr, nic, cfg.link.mtu)
        addr = net.wait_link_ready(ipr, nic, max(deadline, time.monotonic() + 5))
        if addr is None:
            raise net.LinkError(f"{nic.name} lost its carrier: check the cable")
    return nic.name
