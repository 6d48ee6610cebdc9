"""Find the laptop: probe every NIC in parallel, each inside its own network namespace.

Why namespaces: each probe gets a private, identically configured IPv6 stack (link-local
address, DAD off, no routes, no interference from whatever the desktop's OS would do
with the other NICs), and a NIC that misbehaves cannot disturb the others. Each thread
moves its NIC into a fresh namespace, brings it up, sends probes with fresh nonces to
ff02::1 and waits for a sealed answer binding one of them. The first valid answer wins;
all NICs are then returned to the namespace we started in and every probe namespace is
removed, whatever happened (errors, a NIC unplugged mid-probe, Ctrl-C).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass

from pyroute2 import IPRoute

from bootlink.common import net, wire
from bootlink.common.errors import BootlinkError, ProtocolError

log = logging.getLogger("bootlink.client.probe")

PROBE_INTERVAL = 0.25  # resend period: a lost first packet costs 250 ms, not a second


@dataclass(frozen=True)
class Found:
    """A server that proved it holds the key, and the NIC it answered on."""

    nic: net.Nic
    server_addr: str  # fe80::... without scope
    offer: wire.ServerOffer
    elapsed: float


@dataclass(frozen=True)
class ProbeParams:
    k_disc: bytes
    port: int
    mtu: int
    deadline: float
    k_trig: bytes | None = None  # if set, ask laptops running autokexec to become servers


class NoServerFound(BootlinkError):
    pass


def probe_all(nics: list[net.Nic], params: ProbeParams) -> Found:
    """Probe `nics` in parallel; return the first authenticated server, or raise."""
    if not nics:
        raise NoServerFound(
            "no network interface to probe: plug in the cable/adapter (or check "
            "link.interfaces in the config)"
        )
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)  # where NICs must come back to
    results: queue.Queue = queue.Queue()
    cancel = threading.Event()
    start = time.monotonic()
    threads = [
        threading.Thread(
            target=_probe_one,
            args=(nic, params, home, cancel, results, start),
            name=f"probe-{nic.name}",
            daemon=True,
        )
        for nic in nics
    ]
    try:
        for t in threads:
            t.start()
        failures: list[str] = []
        pending = len(threads)
        winner: Found | None = None
        while pending and winner is None:
            try:
                kind, value = results.get(timeout=max(0.0, params.deadline - time.monotonic()))
            except queue.Empty:
                break
            if kind == "found":
                winner = value
            else:
                pending -= 1
                if value:
                    failures.append(value)
        cancel.set()
    finally:
        cancel.set()
        for t in threads:
            t.join()
        os.close(home)
    if winner is not None:
        log.info(
            "server %s (%s) found on %s after %.2f s",
            winner.server_addr,
            winner.offer.name or "unnamed",
            winner.nic.name,
            winner.elapsed,
        )
        return winner
    detail = f" ({'; '.join(failures)})" if failures else ""
    raise NoServerFound(
        f"no bootlink server answered on {', '.join(n.name for n in nics)}{detail}: check the "
        "cable, that the laptop runs 'bootlink server', and that both hold the same key"
    )


def _probe_one(nic, params, home, cancel, results, start) -> None:
    ns = f"blprobe-{os.getpid()}-{nic.index}"
    problem = ""
    try:
        with IPRoute() as home_ipr, net.private_netns(ns):
            net.move_to_netns(home_ipr, nic, ns)
            try:
                found = _probe_inside(nic, params, cancel, start)
            finally:
                _return_home(nic, home)
        if found is not None:
            results.put(("found", found))
            return
        if not cancel.is_set():
            problem = f"{nic.name}: no answer"
    except (BootlinkError, OSError) as exc:
        problem = f"{nic.name}: {exc}"
        log.info("probe on %s stopped: %s", nic.name, exc)
    except Exception as exc:  # a probe thread must never take the others down
        problem = f"{nic.name}: unexpected {type(exc).__name__}: {exc}"
        log.exception("probe on %s failed", nic.name)
    results.put(("failed", problem))


def _return_home(nic: net.Nic, home: int) -> None:
    with IPRoute() as ipr:
        try:
            current = next((n for n in net.list_nics(ipr) if n.mac == nic.mac), None)
        except BootlinkError:
            current = None
        if current is None:
            log.info("%s vanished during the probe", nic.name)
            return
        with contextlib.suppress(Exception):
            ipr.link("set", index=current.index, state="down")
        net.move_to_netns(ipr, current, home)


def _probe_inside(nic, params: ProbeParams, cancel, start) -> Found | None:
    with IPRoute() as ipr:
        here = next((n for n in net.list_nics(ipr) if n.mac == nic.mac), None)
        if here is None:
            raise net.LinkError(f"{nic.name} vanished")
        net.bring_up(ipr, here, params.mtu)
        addr = net.wait_link_ready(ipr, here, params.deadline, cancel.is_set)
        if addr is None:
            return None  # no carrier (dead cable) or cancelled
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        net.retry_bind(sock, (addr, 0, 0, here.index), params.deadline)
        return _exchange(sock, here, params, cancel, start)
    finally:
        sock.close()


def _exchange(sock, nic, params: ProbeParams, cancel, start) -> Found | None:
    target = ("ff02::1", params.port, 0, nic.index)
    nonces: set[bytes] = set()
    next_send = 0.0
    while not cancel.is_set():
        now = time.monotonic()
        if now >= params.deadline:
            return None
        if now >= next_send:
            nonce = wire.new_nonce()  # fresh per send: a recorded answer binds a stale one
            nonces.add(nonce)
            with contextlib.suppress(OSError):  # e.g. ENETDOWN while a cable flaps
                sock.sendto(wire.encode_probe(nonce), target)
            next_send = now + PROBE_INTERVAL
        sock.settimeout(max(0.01, min(next_send, params.deadline) - time.monotonic()))
        try:
            data, src = sock.recvfrom(wire.MAX_DATAGRAM)
        except TimeoutError:
            continue
        if len(data) > 4 and data[4] == wire.T_TRIGGER_OFFER:
            _answer_trigger_offer(sock, data, src, nonces, params, nic.name)
            continue
        offer = _check_answer(data, src, nonces, params.k_disc, nic.name)
        if offer is not None:
            return Found(nic, src[0].split("%", 1)[0], offer, time.monotonic() - start)
    return None


def _answer_trigger_offer(sock, data, src, nonces, params: ProbeParams, ifname: str) -> None:
    """A laptop in its normal OS offers to kexec into the server ramdisk: accept once.

    Probing goes on: the real server answers from the ramdisk a few seconds later.
    """
    if params.k_trig is None:
        return
    nonce = data[5 : 5 + wire.NONCE_SIZE]
    if nonce not in nonces:
        log.info("%s: ignoring trigger offer from %s for a nonce we never sent", ifname, src[0])
        return
    try:
        offer = wire.decode_trigger_offer(params.k_trig, nonce, data)
    except ProtocolError as exc:
        log.info("%s: ignoring trigger offer from %s: %s", ifname, src[0], exc)
        return
    nonces.discard(nonce)  # one trigger per offer
    with contextlib.suppress(OSError):
        sock.sendto(wire.encode_trigger(params.k_trig, offer.challenge), src)
    log.info(
        "%s: asked laptop %s (%s) to start the bootlink server; waiting for it",
        ifname,
        src[0],
        offer.name or "unnamed",
    )


def _check_answer(data, src, nonces, k_disc, ifname) -> wire.ServerOffer | None:
    if len(data) < 5 + wire.NONCE_SIZE:
        log.info("%s: ignoring short datagram from %s", ifname, src[0])
        return None
    nonce = data[5 : 5 + wire.NONCE_SIZE]
    if nonce not in nonces:
        log.info("%s: ignoring answer from %s bound to a nonce we never sent", ifname, src[0])
        return None
    try:
        return wire.decode_answer(k_disc, nonce, data)
    except ProtocolError as exc:
        log.info("%s: ignoring answer from %s: %s", ifname, src[0], exc)
        return None
