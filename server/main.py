"""`bootlink server`: bring the link up, answer discovery, serve the boot payload, export
the disk. Runs until SIGTERM/SIGINT, then stops everything it started (nbdkit included).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path

from pyroute2 import IPRoute

from bootlink.common import net, wire
from bootlink.common.config import Config
from bootlink.common.errors import BootlinkError
from bootlink.common.keys import Purpose, load_key_file

from .discovery import ChallengeBook, DiscoveryResponder
from .http_service import BootService, make_http_server
from .nbd_export import NbdExport, check_exportable, listen_socket
from .payload import BootFiles, build_offer
from .power import start_power_watch

log = logging.getLogger("bootlink.server")

RESCAN_INTERVAL = 1.0  # seconds between looks for hot-plugged or re-plugged link NICs


class LinkSet:
    """The NICs we serve on, kept up as adapters are plugged, pulled and re-plugged."""

    def __init__(self, ipr: IPRoute, names: list[str], mtu: int) -> None:
        self.ipr, self.names, self.mtu = ipr, names, mtu
        self._lock = threading.Lock()
        self.nics: dict[int, net.Nic] = {}

    def refresh(self) -> None:
        try:
            found = net.list_nics(self.ipr)
        except BootlinkError:
            return
        wanted = [n for n in found if not self.names or n.name in self.names]
        with self._lock:
            current = {n.index: n for n in wanted}
            for nic in wanted:
                if not nic.up:
                    try:
                        net.bring_up(self.ipr, nic, self.mtu)
                        log.info("link %s (%s) up", nic.name, nic.mac)
                    except BootlinkError as exc:
                        log.warning("%s", exc)
            for index in set(self.nics) - set(current):
                log.info("link %s gone", self.nics[index].name)
            self.nics = current

    def ifindexes(self) -> set[int]:
        with self._lock:
            return set(self.nics)

    def current(self) -> list[net.Nic]:
        with self._lock:
            return list(self.nics.values())

    def by_index(self, index: int) -> net.Nic | None:
        with self._lock:
            return self.nics.get(index)


class Server:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        if not cfg.server.disk:
            raise BootlinkError(f"{cfg.source}: server.disk is empty: name the disk to export")
        self.disk = Path(cfg.server.disk)
        # before anything else: a wrong disk is refused at start-up, not at the first request
        self.disk_size = check_exportable(self.disk, cfg.server.read_only)
        key = load_key_file(cfg.key_path)
        log.info("key id %s", key.key_id())
        boot = cfg.server.boot
        self.files = BootFiles(Path(boot.kernel), Path(boot.initrd))
        # a ramdisk has no hostname ("(none)"): name the server by what it serves
        host = socket.gethostname()
        self.name = host if host and host != "(none)" else f"bootlink {self.disk.name}"
        self.ipr = IPRoute()
        if cfg.link.interfaces:
            net.list_nics(self.ipr, cfg.link.interfaces)  # fail now if one is missing
        self.links = LinkSet(self.ipr, cfg.link.interfaces, cfg.link.mtu)
        self.exports: dict[int, NbdExport] = {}
        self._admitted: dict[str, set[str]] = {}  # NIC MAC -> client addresses that proved the key
        self._exports_lock = threading.Lock()
        challenges = ChallengeBook()
        self.discovery = DiscoveryResponder(
            key.subkey(Purpose.DISCOVERY),
            cfg.link.discovery_port,
            lambda ch: wire.ServerOffer(cfg.link.http_port, cfg.link.nbd_port, ch, self.name),
            challenges,
            self.links.ifindexes,
        )
        self.service = BootService(
            k_xfer=key.subkey(Purpose.TRANSFER),
            challenges=challenges,
            offer=lambda: build_offer(cfg, self.files, self.disk, self.name),
            link_ifindexes=self.links.ifindexes,
            on_authenticated=self._admit,
        )
        self.http = make_http_server(self.service, cfg.link.http_port)
        self._stop = threading.Event()

    def _admit(self, client_addr: str, ifindex: int) -> None:
        """A client proved the key: open the NBD export on its link, to it alone."""
        nic = self.links.by_index(ifindex)
        if nic is None:
            raise BootlinkError(f"link #{ifindex} vanished")
        with self._exports_lock:
            # remembered by the NIC's MAC: a USB adapter that is re-plugged comes back with
            # a new ifindex but the same MAC, hence the same link-local addresses
            self._admitted.setdefault(nic.mac, set()).add(client_addr.split("%", 1)[0])
            export = self._export_for(nic)
            if export is None:
                raise BootlinkError(f"{nic.name} has no link-local address yet")
            export.allow(client_addr)

    def _export_for(self, nic: net.Nic) -> NbdExport | None:
        """The NBD export on `nic`, opened if need be (caller holds _exports_lock)."""
        export = self.exports.get(nic.index)
        if export is None:
            local = net.link_local_address(self.ipr, nic.index)
            if local is None:
                return None
            listener = listen_socket(local, self.cfg.link.nbd_port, nic.index)
            export = NbdExport(
                self.disk, self.cfg.server.export_name, self.cfg.server.read_only, listener
            )
            self.exports[nic.index] = export
        return export

    def _sync_exports(self) -> None:
        """Close exports of vanished NICs; reopen them for admitted clients when a NIC
        comes back (the desktop's `nbd-client -persist` is reconnecting meanwhile)."""
        live = {n.index: n for n in self.links.current()}
        with self._exports_lock:
            for index in [i for i in self.exports if i not in live]:
                self.exports.pop(index).close()
            for nic in live.values():
                admitted = self._admitted.get(nic.mac)
                if admitted and nic.index not in self.exports:
                    try:
                        export = self._export_for(nic)
                    except BootlinkError as exc:
                        log.warning("cannot reopen the NBD export on %s: %s", nic.name, exc)
                        continue
                    if export is not None:
                        log.info("%s is back: NBD export reopened", nic.name)
                        for addr in admitted:
                            export.allow(addr)

    def run(self) -> None:
        self.links.refresh()
        self.discovery.start()
        http_thread = threading.Thread(target=self.http.serve_forever, name="http", daemon=True)
        http_thread.start()
        start_power_watch(self._stop)  # battery warnings, lid ignored (no-op without battery)
        nics = ", ".join(n.name for n in self.links.nics.values()) or "none yet"
        log.info(
            "serving %s (%s, %.1f MiB) on %s: discovery udp/%d, http tcp/%d, nbd tcp/%d",
            self.disk,
            "read-only" if self.cfg.server.read_only else "read-write",
            self.disk_size / 2**20,
            nics,
            self.cfg.link.discovery_port,
            self.cfg.link.http_port,
            self.cfg.link.nbd_port,
        )
        while not self._stop.wait(RESCAN_INTERVAL):
            self.links.refresh()
            self._sync_exports()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.discovery.close()
        self.http.shutdown()
        self.http.server_close()
        with self._exports_lock:
            for export in self.exports.values():
                export.close()
            self.exports.clear()
        self.ipr.close()
        log.info("server stopped")


def run_server(cfg: Config) -> int:
    server = Server(cfg)

    def on_signal(signum, _frame):
        log.info("got %s, stopping", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.run()
    finally:
        server.close()
    return 0
