"""`bootlink autokexec`: the laptop's normal OS turns itself into the bootlink server.

Two triggers, both event-driven:
- a link NIC appears (netlink RTM_NEWLINK, no polling) whose MAC is in autokexec.macs or
  whose USB vendor:product (sysfs) is in autokexec.usb_ids; one that is already present
  when we start counts as appearing (the udev rule starts us exactly then);
- a desktop's bootlink client probes the link: we answer with a trigger offer sealed
  under the TRIGGER sub-key and carrying a fresh single-use challenge (short TTL); the
  client's sealed trigger redeeming that challenge counts once. A recorded trigger
  replayed later finds its challenge spent; one sealed under another key opens nothing.

On a trigger (after an optional console confirmation) we kexec into the bootlink ramdisk
with `bootlink.role=server`. What the ramdisk server needs is appended to its initrd in
memory (a memfd, never a file): the config (disk resolved to its kernel name, since the
ramdisk has no udev for /dev/disk/by-*), the key, and the laptop's own kernel and initrd
(which the ramdisk could not read otherwise: it does not mount the laptop's disk).

The kexec is the one side effect tests replace: `Autokexec(executor=...)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import re
import select
import shlex
import shutil
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml

from bootlink.common import kexec, net, wire
from bootlink.common.bootimage import BootImage, Provenance
from bootlink.common.config import Config, to_dict
from bootlink.common.errors import BootlinkError, ConfigError, ProtocolError
from bootlink.common.keys import Purpose, SharedKey, load_key_file

from .discovery import ChallengeBook, DatagramService

log = logging.getLogger("bootlink.autokexec")

TRIGGER_TTL = 15.0  # seconds a trigger challenge stays redeemable
DECLINE_QUIET = 60.0  # after "n" at the console, ignore triggers this long
RTM_NEWLINK, RTM_DELLINK = 16, 17
RAMDISK_ETC = "/etc/bootlink"  # where the appended layer puts config, key, boot files
SERVER_CMDLINE = f"bootlink.role=server bootlink.config={RAMDISK_ETC}/config.yaml"

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_USB_ID = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{4}$")


# --- pure helpers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Triggers:
    macs: frozenset[str]
    usb_ids: frozenset[str]
    remote: bool


def triggers_of(cfg: Config) -> Triggers:
    """The configured triggers, normalized (lower case), or a ConfigError naming the key."""
    ak = cfg.autokexec
    macs = {m.strip().lower().replace("-", ":") for m in ak.macs}
    for mac in macs:
        if not _MAC.match(mac):
            raise ConfigError(
                f"{cfg.source}: 'autokexec.macs' entry {mac!r} is not a MAC: "
                "write it as aa:bb:cc:dd:ee:ff"
            )
    ids = {u.strip().lower() for u in ak.usb_ids}
    for uid in ids:
        if not _USB_ID.match(uid):
            raise ConfigError(
                f"{cfg.source}: 'autokexec.usb_ids' entry {uid!r} is not vendor:product: "
                "write it as lsusb shows it, e.g. 0bda:8153"
            )
    if ak.confirm_timeout <= 0:
        raise ConfigError(f"{cfg.source}: 'autokexec.confirm_timeout' must be > 0 seconds")
    return Triggers(frozenset(macs), frozenset(ids), ak.remote_trigger)


def desktop_reason(cmdline: str, mountinfo: str) -> str | None:
    """Why this system is the desktop booted over bootlink (or its ramdisk), else None."""
    words = cmdline.split()
    for w in words:
        if w.startswith("bootlink.nbd_host="):
            return "the kernel command line has bootlink.nbd_host (booted over bootlink's NBD root)"
        if w.startswith("bootlink.role="):
            return "running inside the bootlink ramdisk"
    for line in mountinfo.splitlines():
        parts = line.split()
        if len(parts) > 4 and parts[4] == "/" and " - " in line:
            source = line.split(" - ", 1)[1].split()[1:2]
            if source and re.match(r"^/dev/nbd\d+", source[0]):
                return f"the root filesystem is on {source[0]}"
    return None


def served_cmdline(cfg: Config, running_cmdline: str) -> str:
    """The command line the desktop boots the laptop's kernel with: server.boot.cmdline, or
    (when empty) the one this very OS was booted with, minus loader and bootlink words."""
    if cfg.server.boot.cmdline.strip():
        return cfg.server.boot.cmdline.strip()
    drop = ("BOOT_IMAGE=", "initrd=", "bootlink.")
    return " ".join(w for w in running_cmdline.split() if not w.startswith(drop))


def console_words(running_cmdline: str) -> list[str]:
    """The running system's console= arguments: the ramdisk shows its progress (and its
    errors) where this laptop's own boot did, e.g. a serial console, not only on tty0."""
    return [w for w in running_cmdline.split() if w.startswith("console=")]


def usb_id_of(ifname: str, sysfs: Path = Path("/sys")) -> str | None:
    """vendor:product of the USB device behind a NIC, from sysfs (None if not USB)."""
    dev = sysfs / "class" / "net" / ifname / "device"
    try:
        here = dev.resolve(strict=True)
    except OSError:
        return None
    top = sysfs.resolve()
    while here != top and top in here.parents:
        vendor, product = here / "idVendor", here / "idProduct"
        if vendor.is_file() and product.is_file():
            try:
                return f"{vendor.read_text().strip()}:{product.read_text().strip()}".lower()
            except OSError:
                return None
        here = here.parent
    return None


# --- the initrd layer: newc cpio written straight into a file object -----------------------


def _cpio_entry(out: BinaryIO, name: str, mode: int, size: int, ino: int, mtime: int) -> None:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, mtime, size, 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(header + encoded)
    out.write(b"\0" * (-(len(header) + len(encoded)) % 4))


def write_cpio(out: BinaryIO, entries: Iterable[tuple[str, int, bytes | Path | None]]) -> None:
    """newc archive of (path, mode, content) entries; content None = directory, a Path is
    streamed (boot files are tens of MB). Linux unpacks it on top of the earlier layers."""
    mtime = int(time.time())
    ino = 1
    for name, mode, content in entries:
        ino += 1
        if content is None:
            _cpio_entry(out, name, 0o040000 | mode, 0, ino, mtime)
            continue
        if isinstance(content, Path):
            size = content.stat().st_size
            _cpio_entry(out, name, 0o100000 | mode, size, ino, mtime)
            copied = 0
            with open(content, "rb") as f:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
                    copied += len(chunk)
            if copied != size:
                raise BootlinkError(f"{content} changed size while being read: try again")
        else:
            size = len(content)
            _cpio_entry(out, name, 0o100000 | mode, size, ino, mtime)
            out.write(content)
        out.write(b"\0" * (-size % 4))
    _cpio_entry(out, "TRAILER!!!", 0, 0, 0, 0)


# --- what the ramdisk gets ----------------------------------------------------------------


@dataclass(frozen=True)
class ServerPlan:
    """Everything the kexec needs, checked at start-up (not when the desktop asks)."""

    ramdisk_kernel: Path
    ramdisk_initrd: Path
    boot_kernel: Path
    boot_initrd: Path
    disk: str  # as the ramdisk will see it
    cmdline: str  # the ramdisk's kernel command line
    config_yaml: bytes  # the config the ramdisk's server runs with
    key: SharedKey


def plan_server(cfg: Config, key: SharedKey, running_cmdline: str) -> ServerPlan:
    ak, srv = cfg.autokexec, cfg.server
    for what, path in (
        ("ramdisk_kernel", ak.ramdisk_kernel),
        ("ramdisk_initrd", ak.ramdisk_initrd),
    ):
        if not Path(path).is_file():
            raise ConfigError(
                f"{cfg.source}: autokexec.{what} {path} does not exist: run "
                "'bootlink setup-server-os --ramdisk DIR' with a 'bootlink ramdisk build' output"
            )
    if not srv.disk:
        raise ConfigError(f"{cfg.source}: server.disk is empty: name the laptop disk to export")
    disk = Path(srv.disk)
    if not disk.exists():
        raise ConfigError(f"{cfg.source}: server.disk {disk} does not exist: fix server.disk")
    # /dev/disk/by-id/... -> /dev/nvme0n1: the ramdisk runs no udev, kernel names it has.
    resolved = os.path.realpath(disk)
    boot = {}
    for name in ("kernel", "initrd"):
        p = Path(getattr(srv.boot, name))
        if not p.is_file():
            raise ConfigError(
                f"{cfg.source}: server.boot.{name} {p} is not a file: fix server.boot.{name}"
            )
        boot[name] = Path(os.path.realpath(p))
    served = dataclasses.replace(
        cfg,
        key=f"{RAMDISK_ETC}/key",
        # The ramdisk names NICs the kernel's way (no udev renames): serve on every NIC;
        # the server answers only authenticated probes on link-local addresses anyway.
        link=dataclasses.replace(cfg.link, interfaces=[]),
        server=dataclasses.replace(
            srv,
            disk=resolved,
            boot=dataclasses.replace(
                srv.boot,
                kernel=f"{RAMDISK_ETC}/boot/vmlinuz",
                initrd=f"{RAMDISK_ETC}/boot/initrd.img",
                cmdline=served_cmdline(cfg, running_cmdline),
            ),
        ),
    )
    data = to_dict(served)
    data.pop("autokexec", None)  # means nothing inside the ramdisk
    cmdline = " ".join(
        [SERVER_CMDLINE, *console_words(running_cmdline), *shlex.split(ak.extra_cmdline)]
    )
    return ServerPlan(
        ramdisk_kernel=Path(ak.ramdisk_kernel),
        ramdisk_initrd=Path(ak.ramdisk_initrd),
        boot_kernel=boot["kernel"],
        boot_initrd=boot["initrd"],
        disk=resolved,
        cmdline=cmdline,
        config_yaml=yaml.safe_dump(data, sort_keys=True).encode(),
        key=key,
    )


def build_initrd(plan: ServerPlan, out: BinaryIO) -> None:
    """The installed ramdisk followed by a layer holding config, key and boot files."""
    with open(plan.ramdisk_initrd, "rb") as f:
        while chunk := f.read(1 << 20):
            out.write(chunk)
    # Compressed archives may end unaligned: the kernel looks for the next magic at a
    # 4-byte boundary after zero padding.
    out.write(b"\0" * (-out.tell() % 4))
    write_cpio(
        out,
        [
            ("etc", 0o755, None),
            ("etc/bootlink", 0o755, None),
            ("etc/bootlink/boot", 0o755, None),
            ("etc/bootlink/config.yaml", 0o644, plan.config_yaml),
            ("etc/bootlink/key", 0o600, plan.key.secret),
            ("etc/bootlink/boot/vmlinuz", 0o644, plan.boot_kernel),
            ("etc/bootlink/boot/initrd.img", 0o644, plan.boot_initrd),
        ],
    )


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def server_image(plan: ServerPlan, reason: str):
    """A BootImage whose initrd lives in a memfd (closed when the block ends)."""
    fd = os.memfd_create("bootlink-server-initrd", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            build_initrd(plan, out)
        with open(plan.ramdisk_kernel, "rb") as k:
            kernel_sha = hashlib.file_digest(k, "sha256").hexdigest()
        yield BootImage(
            label="bootlink server ramdisk",
            kernel=plan.ramdisk_kernel,
            initrd=Path(f"/proc/{os.getpid()}/fd/{fd}"),
            cmdline=plan.cmdline,
            provenance=Provenance("autokexec", reason, "local files installed by setup-server-os"),
            kernel_sha256=kernel_sha,
            initrd_sha256=_sha256_fd(fd),
            extra={"disk": plan.disk},
        )
    finally:
        os.close(fd)


# --- executors (the seam tests replace) ----------------------------------------------------

Executor = Callable[[BootImage], None]


def kexec_executor(image: BootImage) -> None:
    """Load the ramdisk, then let systemd shut down cleanly into it (plain kexec without)."""
    result = kexec.load(image)
    log.info("loaded %s with %s", image.describe(), result.method)
    if Path("/run/systemd/system").is_dir():
        # A clean shutdown (filesystems unmounted) whose last step is the loaded kernel.
        proc = subprocess.run(["systemctl", "kexec"], capture_output=True, text=True)
        if proc.returncode == 0:
            # The kexec job is queued and systemd now stops every service, this one too:
            # exit rather than wait (a waiting service holds the shutdown up to its stop
            # timeout, 90 s).
            log.info("systemd is shutting down into the ramdisk")
            return
        log.warning("systemctl kexec failed (%s); kexec directly", proc.stderr.strip())
    kexec.execute()


class RecordingExecutor:
    """Tests (and `--record FILE`): write what would be kexec'd instead of doing it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self, image: BootImage) -> None:
        import json

        initrd_copy = self.path.with_name(self.path.name + ".initrd")
        # the ramdisk's initrd holds the shared key (its config layer): 0600, like the key
        fd = os.open(initrd_copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(fd, "wb") as dst, open(image.initrd, "rb") as src:
            os.fchmod(dst.fileno(), 0o600)  # an existing file keeps its mode otherwise
            shutil.copyfileobj(src, dst, 1 << 20)
        record = {
            "kernel": str(image.kernel),
            "kernel_sha256": image.kernel_sha256,
            "initrd_copy": str(initrd_copy),
            "initrd_sha256": image.initrd_sha256,
            "cmdline": image.cmdline,
            "reason": image.provenance.locator,
            "disk": image.extra.get("disk", ""),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


# --- confirmation ------------------------------------------------------------------------


class ConsoleConfirmer:
    """Ask on a terminal; Enter/y = yes, n = no, silence until the timeout = yes."""

    def __init__(self, device: str = "/dev/console") -> None:
        self.device = device

    def __call__(self, question: str, timeout: float) -> bool:
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_NOCTTY)
        except OSError as exc:
            log.warning("cannot ask on %s (%s): going ahead", self.device, exc.strerror)
            return True
        try:
            with contextlib.suppress(termios.error):
                termios.tcflush(fd, termios.TCIFLUSH)  # old keystrokes are no answer
            os.write(fd, f"\r\n\a{question} [Y/n] (yes in {timeout:.0f} s) ".encode())
            deadline = time.monotonic() + timeout
            answer = b""
            while b"\n" not in answer and b"\r" not in answer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    os.write(fd, b"\r\nno answer: going ahead\r\n")
                    return True
                chunk = os.read(fd, 64)
                if not chunk:
                    return True
                answer += chunk
            yes = not answer.strip().lower().startswith(b"n")
            os.write(fd, b"going ahead\r\n" if yes else b"cancelled\r\n")
            return yes
        finally:
            os.close(fd)


# --- the watchers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    kind: str  # "mac", "usb", "remote"
    detail: str


class LinkWatcher:
    """RTM_NEWLINK events for NICs matching the MAC / USB-id triggers (no polling)."""

    def __init__(self, triggers: Triggers, fire: Callable[[Trigger], None], sysfs: Path) -> None:
        from pyroute2 import IPRoute

        self.triggers, self.fire, self.sysfs = triggers, fire, sysfs
        self.present: set[int] = set()  # ifindexes already reported (one trigger each)
        self.events = IPRoute()
        self.events.bind()  # subscribe first, then list: nothing slips in between
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="netlink", daemon=True)

    def start(self) -> None:
        self.scan()
        self.thread.start()

    def _run(self) -> None:
        fd = self.events.fileno()
        while not self._stop.is_set():
            # select only so close() can stop us; events wake us at once
            if not select.select([fd], [], [], 0.5)[0]:
                continue
            try:
                msgs = self.events.get()
            except Exception as exc:  # a netlink buffer overrun must not end the watch
                log.warning("netlink: %s; rescanning links", exc)
                self.present.clear()
                with contextlib.suppress(Exception):
                    self.scan()
                continue
            for msg in msgs:
                kind = msg["header"]["type"]
                if kind in (RTM_NEWLINK, RTM_DELLINK):
                    self._consider(msg, kind)

    def scan(self) -> None:
        """Every NIC present now counts as appearing (the udev rule starts us on one)."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for msg in ipr.get_links():
                self._consider(msg, RTM_NEWLINK)

    def _consider(self, msg, kind: int) -> None:
        index = msg["index"]
        if kind == RTM_DELLINK:
            self.present.discard(index)
            return
        if index in self.present:
            return  # a flag change of a NIC we saw already
        name = msg.get_attr("IFLA_IFNAME") or f"#{index}"
        mac = (msg.get_attr("IFLA_ADDRESS") or "").lower()
        if mac in self.triggers.macs:
            self.present.add(index)
            self.fire(Trigger("mac", f"{name} ({mac}) appeared"))
            return
        if self.triggers.usb_ids:
            uid = usb_id_of(name, self.sysfs)
            if uid in self.triggers.usb_ids:
                self.present.add(index)
                self.fire(Trigger("usb", f"{name} (USB {uid}) appeared"))

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)
        self.events.close()


class TriggerListener(DatagramService):
    """Answers link-local probes with sealed trigger offers; redeems sealed triggers."""

    thread_name = "trigger"

    def __init__(
        self,
        k_trig: bytes,
        port: int,
        name: str,
        fire: Callable[[Trigger], None],
        interfaces: list[str],
    ) -> None:
        super().__init__(port, "remote triggers (or set autokexec.remote_trigger: false)")
        self.k_trig, self.name, self.fire = k_trig, name, fire
        self.interfaces = set(interfaces)
        self.challenges = ChallengeBook(ttl=TRIGGER_TTL, limit=256)

    def _on_link(self, addr: tuple) -> bool:
        host, scope = addr[0], addr[3]
        if not host.lower().startswith("fe80:") or not scope:
            return False  # the link is a cable: link-local peers only
        if not self.interfaces:
            return True
        try:
            return socket.if_indextoname(scope) in self.interfaces
        except OSError:
            return False

    def handle(self, data: bytes, addr: tuple) -> None:
        if len(data) < 5 or data[:4] != wire.MAGIC or not self._on_link(addr):
            return
        host = addr[0].split("%", 1)[0]
        if data[4] == wire.T_PROBE:
            try:
                nonce = wire.decode_probe(data)
            except ProtocolError:
                return
            offer = wire.TriggerOffer(self.challenges.issue(), self.name)
            with contextlib.suppress(OSError):
                self.sock.sendto(wire.encode_trigger_offer(self.k_trig, nonce, offer), addr)
            log.debug("offered a trigger to %s", host)
        elif data[4] == wire.T_TRIGGER:
            try:
                challenge = wire.decode_trigger(self.k_trig, data)
                self.challenges.redeem(challenge)
            except ProtocolError as exc:
                log.info("ignoring trigger from %s: %s", host, exc)
                return
            self.fire(Trigger("remote", f"authenticated trigger from {host}"))


# --- the daemon ----------------------------------------------------------------------------


class Autokexec:
    def __init__(
        self,
        cfg: Config,
        executor: Executor = kexec_executor,
        confirmer: Callable[[str, float], bool] | None = None,
        proc: Path = Path("/proc"),
        sysfs: Path = Path("/sys"),
    ) -> None:
        self.cfg = cfg
        self.triggers = triggers_of(cfg)
        self.executor = executor
        self.confirmer = confirmer or ConsoleConfirmer()
        self.proc, self.sysfs = proc, sysfs
        self.events: queue.Queue[Trigger] = queue.Queue()
        self._stop = threading.Event()

    def _fire(self, trigger: Trigger) -> None:
        self.events.put(trigger)

    def run(self) -> int:
        cmdline = (self.proc / "cmdline").read_text()
        reason = desktop_reason(cmdline, _read(self.proc / "self" / "mountinfo"))
        if reason is not None:
            log.info("not arming autokexec: %s", reason)
            return 0
        t = self.triggers
        if not (t.macs or t.usb_ids or t.remote):
            log.info("no trigger configured (autokexec.macs, usb_ids, remote_trigger): idle")
            return 0
        key = load_key_file(self.cfg.key_path)
        plan = plan_server(self.cfg, key, cmdline)  # fail now, not when the desktop asks
        watchers: list = []
        try:
            if t.remote:
                self._bring_up_link_nics()
                listener = TriggerListener(
                    key.subkey(Purpose.TRIGGER),
                    self.cfg.link.discovery_port,
                    socket.gethostname(),
                    self._fire,
                    self.cfg.link.interfaces,
                )
                watchers.append(listener)
                listener.start()
            if t.macs or t.usb_ids:
                watcher = LinkWatcher(t, self._fire, self.sysfs)
                watchers.append(watcher)
                watcher.start()
            log.info(
                "armed (key id %s): %s; server disk %s",
                key.key_id(),
                ", ".join(_describe(t)),
                plan.disk,
            )
            return self._loop(key, cmdline)
        finally:
            for w in watchers:
                w.close()

    def _loop(self, key: SharedKey, cmdline: str) -> int:
        quiet_until = 0.0
        while not self._stop.is_set():
            try:
                trigger = self.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if time.monotonic() < quiet_until:
                log.debug("ignoring %s (declined a moment ago)", trigger.detail)
                continue
            log.info("trigger: %s", trigger.detail)
            try:  # again: a kernel update may have moved /boot/vmlinuz since we started
                plan = plan_server(self.cfg, key, cmdline)
            except BootlinkError as exc:
                log.error("cannot become the server: %s", exc)
                continue
            if self.cfg.autokexec.confirm and not self.confirmer(
                f"bootlink: {trigger.detail}. Restart this laptop as the bootlink server "
                f"(exporting {plan.disk})?",
                self.cfg.autokexec.confirm_timeout,
            ):
                log.info("declined at the console; ignoring triggers for %.0f s", DECLINE_QUIET)
                quiet_until = time.monotonic() + DECLINE_QUIET
                continue
            with server_image(plan, trigger.detail) as image:
                log.info("kexec into %s: %s", plan.ramdisk_kernel, image.cmdline)
                self.executor(image)
            return 0
        return 0

    def _bring_up_link_nics(self) -> None:
        """Named link NICs are usually left unmanaged (NetworkManager rule): bring them up
        with a link-local address so that a desktop's probes reach us."""
        if not self.cfg.link.interfaces:
            return
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for nic in net.list_nics(ipr):
                if nic.name in self.cfg.link.interfaces and not nic.up:
                    try:
                        net.bring_up(ipr, nic, self.cfg.link.mtu)
                        log.info("link %s up for remote triggers", nic.name)
                    except BootlinkError as exc:
                        log.warning("%s", exc)

    def stop(self) -> None:
        self._stop.set()


def _describe(t: Triggers) -> list[str]:
    out = []
    if t.macs:
        out.append("NIC by MAC " + " ".join(sorted(t.macs)))
    if t.usb_ids:
        out.append("USB NIC " + " ".join(sorted(t.usb_ids)))
    if t.remote:
        out.append("remote trigger")
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
