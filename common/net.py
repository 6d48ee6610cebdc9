"""Narrow netlink and namespace helpers (pyroute2), the only place that touches links.

Everything bootlink needs from the kernel's network stack: list NICs, move a NIC between
network namespaces, bring it up with IPv6 link-local addressing (DAD off: on a point-to-
point cable there is nobody to collide with, and DAD would delay the first packet by a
second), wait for carrier and a usable address, and run a thread inside a namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from .errors import BootlinkError

CLONE_NEWNET = 0x40000000
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
RT_SCOPE_LINK = 253
NETNS_RUN_DIR = Path("/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)


class LinkError(BootlinkError):
    """A NIC is missing, vanished, or could not be configured."""


@dataclass(frozen=True)
class Nic:
    name: str
    index: int
    mac: str
    up: bool
    running: bool  # carrier


def list_nics(ipr: IPRoute, only: list[str] | None = None) -> list[Nic]:
    """Every NIC except loopback (or just the named ones, in the order given)."""
    nics = {}
    for msg in ipr.get_links():
        flags = msg["flags"]
        if flags & IFF_LOOPBACK:
            continue
        nic = _nic_from_msg(msg)
        nics[nic.name] = nic
    if not only:
        return sorted(nics.values(), key=lambda n: n.name)
    missing = [n for n in only if n not in nics]
    if missing:
        raise LinkError(
            f"interface {', '.join(missing)} not found "
            f"(have: {', '.join(sorted(nics)) or 'none'}): "
            "plug the cable/adapter in or fix link.interfaces in the config"
        )
    return [nics[n] for n in only]


def _nic_from_msg(msg) -> Nic:
    flags = msg["flags"]
    return Nic(
        name=msg.get_attr("IFLA_IFNAME"),
        index=msg["index"],
        mac=(msg.get_attr("IFLA_ADDRESS") or "").lower(),
        up=bool(flags & IFF_UP),
        running=bool(flags & IFF_RUNNING),
    )


def get_nic(ipr: IPRoute, index: int) -> Nic:
    try:
        (msg,) = ipr.get_links(index)
    except NetlinkError as exc:
        raise LinkError(f"interface #{index} vanished ({os.strerror(exc.code)})") from None
    return _nic_from_msg(msg)


def set_sysctl(ifname: str, key: str, value: str) -> None:
    """Write /proc/sys/net/ipv6/conf/<if>/<key> in the calling thread's namespace."""
    path = Path("/proc/sys/net/ipv6/conf") / ifname / key
    try:
        path.write_text(value)
    except FileNotFoundError:
        raise LinkError(f"interface {ifname} vanished while being configured") from None


def bring_up(ipr: IPRoute, nic: Nic, mtu: int | None = None) -> None:
    """Up with IPv6 link-local addressing and no DAD (see module docstring)."""
    set_sysctl(nic.name, "disable_ipv6", "0")
    set_sysctl(nic.name, "accept_dad", "0")
    set_sysctl(nic.name, "accept_ra", "0")  # a cable to a laptop: no routers to learn from
    try:
        if mtu:
            ipr.link("set", index=nic.index, mtu=mtu)
        ipr.link("set", index=nic.index, state="up")
    except NetlinkError as exc:
        raise LinkError(f"cannot bring up {nic.name}: {os.strerror(exc.code)}") from None


def has_default_route(ipr: IPRoute) -> bool:
    """A default route (IPv4 or IPv6, main table) through a gateway: a way off the LAN."""
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.get_routes(family=family, table=254):
            if route["dst_len"] == 0 and (
                route.get_attr("RTA_GATEWAY") or route.get_attr("RTA_MULTIPATH")
            ):
                return True
    return False


def loopback_up() -> None:
    """lo up: the ramdisk boots with it down, and a local service (a Bee node the client
    starts) listens on 127.0.0.1, which exists only while lo is up."""
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname="lo"):
            ipr.link("set", index=index, state="up")


def link_local_address(ipr: IPRoute, index: int) -> str | None:
    """The NIC's usable (non-tentative) fe80:: address, or None yet."""
    try:
        addrs = ipr.get_addr(family=socket.AF_INET6, index=index)
    except NetlinkError as exc:
        raise LinkError(f"interface #{index} vanished ({os.strerror(exc.code)})") from None
    for a in addrs:
        flags = a.get_attr("IFA_FLAGS") or a["flags"]
        if a["scope"] != RT_SCOPE_LINK or flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            continue
        return a.get_attr("IFA_ADDRESS")
    return None


def wait_link_ready(
    ipr: IPRoute, nic: Nic, deadline: float, cancelled=lambda: False, poll: float = 0.02
) -> str | None:
    """Wait for carrier and a link-local address; None on timeout or cancel."""
    while time.monotonic() < deadline and not cancelled():
        cur = get_nic(ipr, nic.index)
        if cur.running:
            addr = link_local_address(ipr, nic.index)
            if addr:
                return addr
        time.sleep(poll)
    return None


def move_to_netns(ipr: IPRoute, nic: Nic, target: str | int) -> None:
    """Move a NIC into a named namespace (str) or the namespace behind an open fd (int)."""
    try:
        ipr.link("set", index=nic.index, net_ns_fd=target)
    except NetlinkError as exc:
        raise LinkError(
            f"cannot move {nic.name} to another namespace: {os.strerror(exc.code)}"
        ) from None


def remove_netns(name: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        netns.remove(name)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with the *calling thread* inside the named namespace.

    setns(2) switches only the calling thread, so parallel probe threads can each live in
    their own namespace; sockets opened inside stay bound to it after we switch back.
    """
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_RUN_DIR / name, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(orig)
    finally:
        os.close(orig)


@contextlib.contextmanager
def private_netns(name: str) -> Iterator[int]:
    """Move the calling thread into a brand-new namespace, visible as `name` while in use.

    unshare(2) in the thread itself costs no fork (pyroute2's netns.create forks a helper
    per namespace, which adds up when eight NICs are probed at once); the name is a bind
    mount of the thread's namespace so `ip netns` shows (and can clean) what we made.
    Yields an fd of the namespace the thread came from. On exit the thread goes back and
    the name is removed; the namespace dies with its last reference, so callers must move
    their NICs home before leaving (a physical NIC would otherwise land in the root
    namespace, a veth would be destroyed). Meant for worker threads (client/probe.py):
    a KeyboardInterrupt is only ever raised in the main thread, so none can land between
    unshare, attach and the move home; what the main thread must do instead is wait for
    the workers before the process exits (Probe.close).
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LinkError(f"cannot create a network namespace: {os.strerror(err)}")
        try:
            NETNS_RUN_DIR.mkdir(parents=True, exist_ok=True)
            netns.attach(name, threading.get_native_id())
            try:
                yield home
            finally:
                remove_netns(name)
        finally:
            _setns(home)
    finally:
        os.close(home)


def scoped(addr: str, ifname: str) -> str:
    """'fe80::1' + 'eth0' -> 'fe80::1%eth0' (link-local addresses need their interface)."""
    return f"{addr}%{ifname}" if ipaddress.IPv6Address(addr).is_link_local else addr


def retry_bind(sock: socket.socket, address: tuple, deadline: float) -> None:
    """bind() that waits out EADDRNOTAVAIL while a just-added address becomes usable."""
    while True:
        try:
            sock.bind(address)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)
