"""Reach the LAN for the sources that live there: a Bee node, an IPFS gateway, the web.

The ramdisk boots with every NIC down and no address. The laptop link needs nothing
more (IPv6 link-local, inside its probe namespaces), but `swarm:`, `ipfs:` and
`https://` sources need an address and a route to the node they name. So before the
first of them is resolved, the client brings every NIC up (IPv6 link-local, and SLAAC
from a router's advertisements) and asks for a DHCPv4 lease on all of them at once with
busybox's udhcpc. The first lease is configured (address, default route, DNS servers)
and the other requests are stopped.

`client.lan` says when: `auto` (default) only when this system has neither a default
route nor an address beyond link-local, as in the ramdisk (a system someone configured
is left alone); `dhcp` always; `none` never.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import selectors
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bootlink.common import net, process
from bootlink.common.errors import BootlinkError

log = logging.getLogger("bootlink.lan")

MODES = ("auto", "dhcp", "none")
NETWORK_KINDS = {"swarm", "ipfs", "http", "https"}  # source kinds that fetch over the LAN
DHCP_TIMEOUT = 12.0  # seconds for the first lease on any NIC
RESOLV_CONF = Path("/etc/resolv.conf")

# udhcpc runs this on each event; on "bound" it prints the lease for us to configure
# (udhcpc itself configures nothing: the script would have to, busybox ships none).
_SCRIPT = """#!/bin/sh
[ "$1" = bound ] || exit 0
printf 'BOOTLINK-LEASE|%s|%s|%s|%s|%s\\n' "$interface" "$ip" "$subnet" "$router" "$dns"
"""


@dataclass(frozen=True)
class Lease:
    nic: str
    address: str
    prefixlen: int
    routers: list[str] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)

    def describe(self) -> str:
        via = f" via {self.routers[0]}" if self.routers else ""
        return f"{self.address}/{self.prefixlen} on {self.nic}{via}"


def parse_lease(line: str) -> Lease | None:
    """The lease in one line our udhcpc script printed; None for any other line or a
    lease that makes no sense (a DHCP server is on the LAN, not trusted for anything
    but addresses: the content is verified by its hashes)."""
    parts = line.strip().split("|")
    if len(parts) != 6 or parts[0] != "BOOTLINK-LEASE":
        return None
    _, nic, ip, subnet, routers, dns = parts
    try:
        iface = ipaddress.IPv4Interface(f"{ip}/{subnet}")
        gateways = [str(ipaddress.IPv4Address(r)) for r in routers.split()]
        servers = [str(ipaddress.ip_address(d)) for d in dns.split()]
    except ValueError:
        return None
    if not nic or iface.ip.is_unspecified or iface.ip.is_multicast:
        return None
    return Lease(nic, str(iface.ip), iface.network.prefixlen, gateways, servers)


def needs_lan(specs: Iterable[str]) -> bool:
    """Whether any source spec fetches over the network (not the link, not a local ISO)."""
    for spec in specs:
        kind = spec.strip().partition(":")[0].lower()
        if kind in NETWORK_KINDS:
            return True
        if kind == "iso" and "://" in spec:
            return True
    return False


def ensure_lan(mode: str) -> Lease | None:
    """Bring the LAN up as `mode` says (see module docstring); the lease taken, if any.
    No lease is a warning, not an error: a node on an IPv6 link-local or SLAAC address
    may still be reachable, and the source's own error names the URL if not."""
    if mode not in MODES:
        raise BootlinkError(f"client.lan must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "none":
        return None
    with IPRoute() as ipr:
        if mode == "auto" and (net.has_default_route(ipr) or has_global_address(ipr)):
            log.debug("lan: the network is configured already, leaving it as it is")
            return None
        nics = [n for n in net.list_nics(ipr) if not _is_virtual(n.name)]
        if not nics:
            log.warning("lan: no network interface to reach the sources' nodes with")
            return None
        for nic in nics:
            _bring_up_for_lan(ipr, nic)
        log.info("lan: asking for a DHCP lease on %s", ", ".join(n.name for n in nics))
        lease = first_lease([n.name for n in nics], DHCP_TIMEOUT)
        if lease is None:
            log.warning(
                "lan: no DHCP answer on %s within %g s; only IPv6 (link-local, SLAAC) "
                "addresses are left: plug the desktop into a network with a DHCP server, "
                "or name the node by such an address",
                ", ".join(n.name for n in nics),
                DHCP_TIMEOUT,
            )
            return None
        apply_lease(ipr, lease)
        log.info("lan: %s", lease.describe())
        return lease


def has_global_address(ipr) -> bool:
    """Whether any NIC has an address beyond its link (someone configured this host)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        for addr in ipr.get_addr(family=family):
            if addr["scope"] == 0 and addr.get_attr("IFA_LABEL") != "lo":  # RT_SCOPE_UNIVERSE
                ip = ipaddress.ip_address(addr.get_attr("IFA_ADDRESS"))
                if not ip.is_loopback:
                    return True
    return False


def _is_virtual(name: str) -> bool:
    # bootlink's own probe veths and bridges/tunnels a host may have: never the LAN
    return name.startswith(("veth", "blp", "virbr", "docker", "br-", "tun", "tap", "wg"))


def _bring_up_for_lan(ipr, nic: net.Nic) -> None:
    """Up, with IPv6 link-local and router advertisements accepted (SLAAC), unlike the
    link's bring_up: on a LAN there are routers to learn from."""
    with contextlib.suppress(net.LinkError):
        net.set_sysctl(nic.name, "disable_ipv6", "0")
        net.set_sysctl(nic.name, "accept_ra", "1")
    try:
        ipr.link("set", index=nic.index, state="up")
    except NetlinkError as exc:
        log.warning("lan: cannot bring up %s: %s", nic.name, os.strerror(exc.code))


def _udhcpc() -> list[str]:
    for name in ("udhcpc", "busybox"):
        path = shutil.which(name)
        if path:
            return [path] if name == "udhcpc" else [path, "udhcpc"]
    raise BootlinkError(
        "no DHCP client: install busybox (its udhcpc applet), or set client.lan: none "
        "and configure the network yourself"
    )


def first_lease(nics: list[str], timeout: float) -> Lease | None:
    """Run udhcpc on every NIC at once; the first lease, the others stopped."""
    cmd = _udhcpc()
    with tempfile.TemporaryDirectory(prefix="bootlink-dhcp-") as tmp:
        script = Path(tmp) / "lease.sh"
        script.write_text(_SCRIPT)
        script.chmod(0o700)
        procs = []
        sel = selectors.DefaultSelector()
        try:
            for nic in nics:
                # -f foreground, -q quit once bound (keeping the lease), -n give up
                # after -t discovers -T seconds apart, -s our script.
                p = subprocess.Popen(
                    [*cmd, "-i", nic, "-f", "-q", "-n", "-t", "6", "-T", "2", "-s", str(script)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                    text=True,
                )
                procs.append(p)
                sel.register(p.stdout, selectors.EVENT_READ, p)
            deadline = time.monotonic() + timeout
            while sel.get_map() and time.monotonic() < deadline:
                for key, _ in sel.select(deadline - time.monotonic()):
                    line = key.fileobj.readline()
                    if not line:
                        sel.unregister(key.fileobj)
                        continue
                    lease = parse_lease(line)
                    if lease is not None and lease.nic in nics:
                        return lease
            return None
        finally:
            sel.close()
            for p in procs:
                if p.poll() is None:
                    p.terminate()  # all at once, then wait for each
            for p in procs:
                process.stop(p, grace=2)
                p.stdout.close()


def apply_lease(ipr, lease: Lease, resolv: Path = RESOLV_CONF) -> None:
    """Address, default route (the first router) and, where none is configured yet,
    the DNS servers."""
    (index,) = ipr.link_lookup(ifname=lease.nic) or [None]
    if index is None:
        raise net.LinkError(f"{lease.nic} vanished while taking its DHCP lease")
    try:
        ipr.addr("add", index=index, address=lease.address, prefixlen=lease.prefixlen)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:  # (already there from an earlier run: fine)
            raise net.LinkError(
                f"cannot give {lease.nic} its DHCP address {lease.address}: {os.strerror(exc.code)}"
            ) from None
    if lease.routers:
        try:
            ipr.route("replace", dst="0.0.0.0/0", gateway=lease.routers[0], oif=index)
        except NetlinkError as exc:
            log.warning(
                "lan: no default route via %s (%s): only the local subnet is reachable",
                lease.routers[0],
                os.strerror(exc.code),
            )
    if lease.dns and not _has_nameserver(resolv):
        try:
            resolv.write_text("".join(f"nameserver {d}\n" for d in lease.dns))
        except OSError as exc:
            log.warning("lan: cannot write %s (%s): names will not resolve", resolv, exc)


def _has_nameserver(resolv: Path) -> bool:
    try:
        text = resolv.read_text()
    except OSError:
        return False
    return any(line.split()[:1] == ["nameserver"] for line in text.splitlines())
