"""Find the laptop: probe every NIC in parallel, each inside its own network namespace.

Why namespaces: each probe gets a private, identically configured IPv6 stack (link-local
address, DAD off, no routes, no interference from whatever the desktop's OS would do
with the other NICs), and a NIC that misbehaves cannot disturb the others. Each thread
moves its NIC into a fresh namespace, brings it up, sends probes with fresh nonces to
ff02::1 and waits for a sealed answer binding one of them. The first valid answer wins;
all NICs are then returned to the namespace we started in and every probe namespace is
removed, whatever happened (errors, a NIC unplugged mid-probe, Ctrl-C).

Creating a namespace and moving a NIC serialize inside the kernel (15-30 ms each), so
with eight NICs the order matters: `MoveOrder` lets the NICs that already show carrier go
first (all NICs are brought up, IPv6 off, in our own namespace so that carrier shows), and
a NIC on a dead cable waits its turn behind the live ones instead of delaying them.
"""

from __future__ import annotations

import atexit
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
# How long close() waits for cancelled probe threads to bring their NICs home. A thread
# notices the cancel within PROBE_INTERVAL and moving back costs tens of milliseconds
# per NIC; the bound only matters if the kernel hangs, and keeps an interrupt from
# hanging the client (later interrupts are ignored while it waits: client/boot.py).
CLOSE_TIMEOUT = 10.0
REPORT_GRACE = 0.5  # seconds past the deadline to collect the probes' reasons


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


class OtherKey(BootlinkError):
    """A server answered our probes, sealed under another key."""


class Probe:
    """One discovery round over `nics`; a context manager that always cleans up.

    `run()` returns as soon as a server has proved itself and the winning NIC is back in
    our namespace; the other NICs return home in the background (each move costs tens of
    milliseconds), overlapping the download. Leaving the `with` block waits for them and
    restores everything, whatever happened (also a KeyboardInterrupt landing in close()
    itself, and as a last resort at interpreter exit: see run() and close()).
    """

    def __init__(self, nics: list[net.Nic], params: ProbeParams) -> None:
        if not nics:
            raise NoServerFound(
                "no network interface to probe: plug in the cable/adapter (or check "
                "link.interfaces in the config)"
            )
        self.nics, self.params = nics, params
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)  # NICs come back here
        self._results: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._active = _Active(self._cancel)
        self._threads: list[threading.Thread] = []
        self._order: MoveOrder | None = None

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self) -> Found:
        start = time.monotonic()
        # Before any NIC moves: should an interrupt land before close() can catch it
        # (on the way into __exit__), interpreter exit still runs close(), while the
        # daemon probe threads are still alive to bring their NICs home.
        atexit.register(self.close)
        self._order = MoveOrder(self.nics, self._cancel)
        self._order.show_carrier()
        self._threads = [
            threading.Thread(
                target=self._probe_thread, args=(nic, start), name=f"probe-{nic.name}", daemon=True
            )
            for nic in self.nics
        ]
        for t in self._threads:
            t.start()
        failures: list[str] = []
        other_key: list[str] = []  # servers that answered under another key
        pending = len(self._threads)
        winner: Found | None = None
        while pending and winner is None:
            try:
                # the threads stop at the deadline themselves; a moment more lets each
                # say why (e.g. a server that answered with another key)
                timeout = max(0.0, self.params.deadline + REPORT_GRACE - time.monotonic())
                kind, value = self._results.get(timeout=timeout)
            except queue.Empty:
                break
            if kind == "found":
                winner = value
            elif kind == "other key":
                pending -= 1
                other_key.append(value)
            else:
                pending -= 1
                if value:
                    failures.append(value)
        self._cancel.set()
        if winner is not None:
            log.info(
                "server %s (%s) found on %s after %.2f s",
                winner.server_addr,
                winner.offer.name or "unnamed",
                winner.nic.name,
                winner.elapsed,
            )
            return winner
        if other_key:  # a server did answer: the cable and the laptop are fine
            raise NoServerFound(
                f"{'; '.join(other_key)}: copy the same key file to both machines (their "
                "logs show its key id)"
            )
        detail = f" ({'; '.join(failures)})" if failures else ""
        names = ", ".join(n.name for n in self.nics)
        raise NoServerFound(
            f"no bootlink server answered on {names}{detail}: check the cable, that the "
            "laptop runs 'bootlink server', and that both hold the same key"
        )

    def _probe_thread(self, nic: net.Nic, start: float) -> None:
        if not self._active.enter(nic.name):
            self._results.put(("failed", ""))  # cancelled before it began: NIC untouched
            return
        try:
            _probe_one(
                nic, self.params, self._home, self._cancel, self._results, start, self._order
            )
        finally:
            self._active.leave(nic.name)

    def close(self) -> None:
        """Stop the probe threads, wait (bounded) for each to move its NIC home, restore
        NICs that never left. Idempotent.

        The interrupt that unwinds us may land right here, while we wait (SIGTERM
        during the download, when the losing NICs are still on their way back): we
        finish waiting, then let it go on. Returning early would let the process exit
        with a NIC inside a probe namespace, which dies with it (a veth is destroyed, a
        physical NIC lands in the root namespace)."""
        try:
            self._wait_and_release()
        except KeyboardInterrupt:
            self._wait_and_release()
            raise

    def _wait_and_release(self) -> None:
        stragglers = self._active.stop_and_wait(CLOSE_TIMEOUT)
        if stragglers:
            log.error(
                "probe on %s did not stop within %g s: its NIC may not be back",
                ", ".join(stragglers),
                CLOSE_TIMEOUT,
            )
            return  # they still need self._home and the move order
        self._release()

    def _release(self) -> None:
        """Every probe thread is done: restore and free what they shared. Idempotent."""
        atexit.unregister(self.close)
        if self._order is not None:
            self._order.close()
        if self._home >= 0:
            os.close(self._home)
            self._home = -1


class _Active:
    """The probe threads that may hold a NIC outside our namespace, as they register
    themselves, so that close() can wait for every NIC to come home.

    Not Thread.join()/is_alive(): in CPython 3.11 a KeyboardInterrupt that interrupts
    join() marks the still-running thread as stopped (cpython#90882), so waiting again
    after the interrupt returns at once and the process exits with the NIC in its
    probe namespace. And a thread is registered or never touches its NIC, whatever
    moment an interrupt cuts run() short (even between starting two threads).
    """

    def __init__(self, cancel: threading.Event) -> None:
        self._cancel = cancel
        self._names: list[str] = []
        self._cond = threading.Condition()

    def enter(self, name: str) -> bool:
        """Register the calling thread before it touches its NIC; False once cancelled:
        it must then leave the NIC alone, since nobody would wait for it."""
        with self._cond:
            if self._cancel.is_set():
                return False
            self._names.append(name)
            return True

    def leave(self, name: str) -> None:
        """The thread is done with its NIC (home, or gone)."""
        with self._cond:
            self._names.remove(name)
            self._cond.notify_all()

    def stop_and_wait(self, timeout: float) -> list[str]:
        """Cancel, then wait until every registered thread has left or `timeout` passed;
        the names of those still out."""
        until = time.monotonic() + timeout
        with self._cond:
            self._cancel.set()  # under the lock: enter() sees it or is waited for
            self._cond.wait_for(lambda: not self._names, max(0.0, until - time.monotonic()))
            return list(self._names)


def reclaim_stale_probes() -> None:
    """Bring back NICs from probe namespaces whose client died (SIGKILL, power cut):
    the namespace outlives it through its name and would keep the NIC forever. Call it
    before listing NICs."""
    for path in sorted(net.NETNS_RUN_DIR.glob("blprobe-*-*")):
        try:
            pid = int(path.name.split("-")[1])
            os.kill(pid, 0)
            continue  # its client is alive: not ours to touch
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        log.info("reclaiming NICs from %s, left by a client that died", path.name)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            with net.in_netns(path.name), IPRoute() as ipr:
                for nic in net.list_nics(ipr):
                    net.move_to_netns(ipr, nic, home)
        except (BootlinkError, OSError) as exc:
            log.warning("could not reclaim NICs from %s: %s", path.name, exc)
        finally:
            os.close(home)
        net.remove_netns(path.name)


class MoveOrder:
    """Hands out turns to move into a probe namespace, NICs with carrier first.

    After a NIC with carrier takes its turn, NICs without carrier are held back for
    HOLD seconds: most likely the server is on that cable, and its answer (then the move
    back) would otherwise queue behind their moves inside the kernel. If no answer
    comes by then, the rest go anyway.
    """

    HOLD = 0.3
    POLL = 0.02

    def __init__(self, nics: list[net.Nic], cancel: threading.Event) -> None:
        self._ipr = IPRoute()  # in our own namespace; used under self._cond only
        self._nics = list(nics)
        self._pending = list(nics)
        self._restore: list[net.Nic] = []
        self._cancel = cancel
        self._cond = threading.Condition()
        self._turn: int | None = None
        self._hold_until = 0.0
        self._next_look = 0.0  # carrier is looked up at most every POLL seconds
        self._closed = False

    def show_carrier(self) -> None:
        """Bring the NICs that are down up with IPv6 off: carrier becomes visible,
        nothing is sent from here. Each is listed for close() before it is touched,
        so an interrupt half-way through still puts it back (down, IPv6 on)."""
        with self._cond:
            for nic in self._nics:
                if not nic.up:
                    self._restore.append(nic)
                    with contextlib.suppress(BootlinkError, Exception):
                        net.set_sysctl(nic.name, "disable_ipv6", "1")
                        self._ipr.link("set", index=nic.index, state="up")

    def _next(self) -> None:
        """Pick whose turn it is (called with the lock held and no turn outstanding)."""
        now = time.monotonic()
        if not self._pending or now < self._next_look:
            return
        self._next_look = now + self.POLL
        try:
            links = self._ipr.get_links()
            running = {m["index"] for m in links if m["flags"] & net.IFF_RUNNING}
        except Exception:
            running = set()
        ready = [n for n in self._pending if n.index in running]
        if ready:
            self._turn = ready[0].index
            self._hold_until = time.monotonic() + self.HOLD
        elif time.monotonic() >= self._hold_until:
            self._turn = self._pending[0].index
        if self._turn is not None:
            log.debug("namespace turn: index %d (with carrier: %s)", self._turn, bool(ready))

    def wait_turn(self, nic: net.Nic) -> bool:
        with self._cond:
            while True:
                if self._cancel.is_set():
                    return False
                if self._turn is None:
                    self._next()
                if self._turn == nic.index:
                    return True
                self._cond.wait(self.POLL)

    def moved(self, nic: net.Nic) -> None:
        """`nic` left our namespace: coming back resets it, so there is nothing to restore."""
        with self._cond:
            self._restore = [n for n in self._restore if n.index != nic.index]

    def done(self, nic: net.Nic) -> None:
        """`nic` has moved (or given up): the next NIC may go. Idempotent."""
        with self._cond:
            self._pending = [n for n in self._pending if n.index != nic.index]
            if self._turn == nic.index:
                self._turn = None
                self._next_look = 0.0  # decide the next turn now, not at the next poll
            self._cond.notify_all()

    def close(self) -> None:
        """Put NICs that never left our namespace back as they were (down, IPv6 on).
        Idempotent."""
        with self._cond:
            if self._closed:
                return
            for nic in self._restore:
                with contextlib.suppress(Exception):
                    self._ipr.link("set", index=nic.index, state="down")
                with contextlib.suppress(BootlinkError, OSError):
                    net.set_sysctl(nic.name, "disable_ipv6", "0")
            self._closed = True  # only now: a close() cut short is done again in full
            self._ipr.close()


def _probe_one(nic, params, home, cancel, results, start, order: MoveOrder) -> None:
    ns = f"blprobe-{os.getpid()}-{nic.index}"
    problem = ""
    try:
        if not order.wait_turn(nic):
            results.put(("failed", ""))
            return
        try:
            with IPRoute() as home_ipr, net.private_netns(ns):
                try:
                    net.move_to_netns(home_ipr, nic, ns)
                    order.moved(nic)
                finally:
                    order.done(nic)
                try:
                    found = _probe_inside(nic, params, cancel, start)
                finally:
                    _return_home(nic, home)
        finally:
            order.done(nic)  # idempotent: also when the namespace could not be made
        if found is not None:
            results.put(("found", found))
            return
        if not cancel.is_set():
            problem = f"{nic.name}: no answer"
    except OtherKey as exc:
        results.put(("other key", str(exc)))
        return
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
    foreign: set[str] = set()  # who answered our nonces under another key
    next_send = 0.0
    while not cancel.is_set():
        now = time.monotonic()
        if now >= params.deadline:
            if foreign:
                raise OtherKey(
                    f"{', '.join(sorted(foreign))} on {nic.name} answered with another key"
                )
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
        offer = _check_answer(data, src, nonces, params.k_disc, nic.name, foreign)
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


def _check_answer(data, src, nonces, k_disc, ifname, foreign: set[str]) -> wire.ServerOffer | None:
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
        if isinstance(exc, wire.WrongKey):  # bound to our nonce: a server, not noise
            foreign.add(src[0].split("%", 1)[0])
        return None
