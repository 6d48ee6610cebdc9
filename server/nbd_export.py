"""The laptop's disk over NBD, served by a real nbdkit process per connection.

bootlink accepts the TCP connections itself and hands each admitted one to its own
`nbdkit --single` (the connection becomes nbdkit's stdin/stdout). Why not let nbdkit
listen: Debian bookworm's nbdkit 1.32 cannot parse IPv6 addresses in its ip filter
(every IPv6 rule is rejected), and it has no keepalive option. Accepting here gives both:
only addresses that proved the key in the boot exchange, on the link they proved it on,
reach nbdkit; and every admitted socket carries TCP keepalive and TCP_USER_TIMEOUT, so a
desktop that lost power cannot pin a connection (or an nbdkit) forever. Once admitted,
the bytes flow between the desktop and nbdkit with no bootlink code in between.

The listener is bound to the link's own link-local address. The file plugin passes flush
and FUA through to the disk (fdatasync), so write barriers from the desktop's filesystem
hold; separate processes share the page cache, so a flush on one connection covers all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
import subprocess
import threading
from pathlib import Path

from bootlink.common import process
from bootlink.common.errors import BootlinkError

from .mounts import mounts_of
from .payload import disk_facts, disk_kind

log = logging.getLogger("bootlink.server.nbd")

KEEPIDLE, KEEPINTVL, KEEPCNT = 10, 5, 3  # a dead peer is dropped after ~25 s of silence
USER_TIMEOUT_MS = 30_000  # unacknowledged data for 30 s: the cable is gone


def check_exportable(disk: Path, read_only: bool) -> int:
    """Refuse a server.disk that is no disk (missing, a directory, a character device,
    empty, unreadable, not writable for a read-write export) or that this machine has
    mounted in a way that would corrupt it. Returns the disk's size in bytes."""
    disk_kind(disk)  # a missing disk or a directory is named as such, not as "mounted"
    mounted = mounts_of(disk)
    rw = [m for m in mounted if m.read_write]
    if rw:
        raise BootlinkError(
            f"{disk} is mounted read-write here ({rw[0].mountpoint}): exporting it would corrupt "
            "it; boot the laptop into the bootlink ramdisk (autokexec) or unmount it"
        )
    if mounted and not read_only:
        raise BootlinkError(
            f"{disk} is mounted here ({mounted[0].mountpoint}): set server.read_only: true "
            "or unmount it before exporting it read-write"
        )
    size, _first = disk_facts(disk)  # opened and read only once it is known not mounted
    if not read_only:
        why = _not_writable(disk)
        if why:
            raise BootlinkError(
                f"server.disk {disk} is not writable ({why}): set server.read_only: true, "
                "or fix its permissions"
            )
    return size


def _not_writable(disk: Path) -> str | None:
    """Why nbdkit could not open `disk` for writing, if we can tell without opening it
    so (opening a disk for writing makes udev re-read its partitions when it is closed)."""
    if not os.access(disk, os.W_OK):
        return "read-only filesystem" if _on_read_only_fs(disk) else "permission denied"
    st = os.stat(disk)
    if stat.S_ISBLK(st.st_mode):
        ro = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/ro")
        with contextlib.suppress(OSError):
            if ro.read_text().strip() == "1":
                return "the block device is read-only"
    return None


def _on_read_only_fs(disk: Path) -> bool:
    try:
        return bool(os.statvfs(disk).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def listen_socket(addr: str, port: int, ifindex: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port, 0, ifindex))
    except OSError as exc:
        sock.close()
        raise BootlinkError(
            f"cannot listen for NBD on [{addr}]:{port} ({exc.strerror}): "
            "is another NBD server running? stop it or change link.nbd_port"
        ) from None
    sock.listen(16)
    return sock


def _keepalive(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NbdExport:
    """Serves `disk` to the allow-listed clients that connect to `listener`."""

    def __init__(
        self, disk: Path, export_name: str, read_only: bool, listener: socket.socket
    ) -> None:
        if shutil.which("nbdkit") is None:
            raise BootlinkError("nbdkit not found: install it (apt-get install nbdkit)")
        self.disk, self.export_name, self.read_only = disk, export_name, read_only
        self.listener = listener
        self.scope = listener.getsockname()[3]
        self._allowed: set[str] = set()
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._thread.start()

    def allow(self, client_addr: str) -> None:
        """Admit one more authenticated client address (on this export's link)."""
        addr = client_addr.split("%", 1)[0]
        with self._lock:
            if addr not in self._allowed:
                log.info("NBD export %s now admits %s", self.export_name, addr)
            self._allowed.add(addr)

    def command(self) -> list[str]:
        cmd = ["nbdkit", "--single", "--exit-with-parent", "--log=stderr"]
        cmd += ["--exportname", self.export_name]
        if self.read_only:
            cmd.append("--readonly")
        return [*cmd, "file", f"file={self.disk}"]

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return  # listener closed: we are stopping
            host, _port, _flow, scope = peer[:4]
            with self._lock:
                admitted = host in self._allowed and scope == self.scope and not self._closed
            if not admitted:
                log.warning("NBD connection from %s refused: it has not authenticated", host)
                conn.close()
                continue
            try:
                self._serve(conn, host)
            except OSError as exc:
                log.error("cannot start nbdkit for %s: %s", host, exc)
            finally:
                conn.close()  # nbdkit holds its own copy

    def _serve(self, conn: socket.socket, host: str) -> None:
        _keepalive(conn)
        proc = subprocess.Popen(self.command(), stdin=conn.fileno(), stdout=conn.fileno())
        with self._lock:
            self._procs = [p for p in self._procs if p.poll() is None]
            self._procs.append(proc)
        log.info(
            "NBD client %s connected: export %s of %s (%s), nbdkit pid %d",
            host,
            self.export_name,
            self.disk,
            "read-only" if self.read_only else "read-write",
            proc.pid,
        )

    @property
    def connections(self) -> int:
        with self._lock:
            return sum(1 for p in self._procs if p.poll() is None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            procs, self._procs = self._procs, []
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.close()
        self._thread.join(timeout=2)
        for proc in procs:
            process.stop(proc)  # nbdkit may ignore SIGTERM while a dead peer's socket is open
