"""QEMU harness: boot a kernel + initrd under software emulation, wired through taps.

QEMU runs inside a private network namespace that owns its tap devices; whatever plays
the other side (a `bootlink server` or `bootlink client`) runs in the same namespace on
the tap of the guest's live NIC. Taps nobody listens on are dead cables. The serial
console is read line by line with a host timestamp relative to QEMU's start, so tests
wait for markers with timeouts and report milestones. QEMU is always stopped by its PID.
Never `-netdev user`: it would reach out of the sandbox.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bootlink.common.errors import BootlinkError

from .kernel import tool

# QEMU's default TCG model (qemu64) lacks RDRAND, which every desktop since 2012 has:
# without it the guest kernel spends ~1 s of emulated time gathering jitter entropy on
# the first getrandom() (Python's start-up). TCG implements RDRAND from the host's RNG.
CPU = "qemu64,+rdrand"
MILESTONE_RE = re.compile(r"bootlink-milestone: (.+?) uptime=([0-9.]+)")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([tool("ip"), *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise BootlinkError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


@dataclass
class Namespace:
    """A network namespace with tap devices; removed (with its taps) by `close()`."""

    name: str = field(default_factory=lambda: f"bltest-{uuid.uuid4().hex[:8]}")
    taps: list[str] = field(default_factory=list)

    def create(self) -> Namespace:
        _ip("netns", "add", self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")
        return self

    @property
    def exec_prefix(self) -> list[str]:
        return [tool("ip"), "netns", "exec", self.name]

    def add_tap(self, name: str) -> str:
        _ip("-n", self.name, "tuntap", "add", "dev", name, "mode", "tap")
        # Link-local only, no DAD: a cable between two machines.
        for key, value in (("accept_dad", "0"), ("dad_transmits", "0"), ("disable_ipv6", "0")):
            subprocess.run(
                [*self.exec_prefix, "sysctl", "-q", "-w", f"net.ipv6.conf.{name}.{key}={value}"],
                capture_output=True,
                check=False,
            )
        _ip("-n", self.name, "link", "set", name, "up")
        self.taps.append(name)
        return name

    def close(self) -> None:
        _ip("netns", "del", self.name, check=False)


@contextlib.contextmanager
def namespace(taps: int = 0, prefix: str = "bltap") -> Iterator[Namespace]:
    ns = Namespace().create()
    try:
        for i in range(taps):
            ns.add_tap(f"{prefix}{i}")
        yield ns
    finally:
        ns.close()


@dataclass
class ConsoleLine:
    t: float  # seconds since QEMU was started
    text: str


class ConsoleLog:
    """Lines of a serial console with timestamps; waiters block until a pattern appears."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.lines: list[ConsoleLine] = []
        self._cond = threading.Condition()
        self._closed = False
        self._log = open(log_path, "w", buffering=1) if log_path else None  # noqa: SIM115
        self.t0 = time.monotonic()

    def feed(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n").replace("\r", "")
        line = ConsoleLine(round(time.monotonic() - self.t0, 3), text)
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()
        if self._log:
            self._log.write(f"[{line.t:8.3f}] {text}\n")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._log:
            self._log.close()
            self._log = None

    def find(self, pattern: str | re.Pattern, start: int = 0) -> tuple[int, ConsoleLine] | None:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        for i in range(start, len(self.lines)):
            if rx.search(self.lines[i].text):
                return i, self.lines[i]
        return None

    def wait_for(
        self, pattern: str | re.Pattern, timeout: float, fail: str | re.Pattern | None = None
    ) -> ConsoleLine:
        """The first line matching `pattern`; BootlinkError on timeout, exit or `fail`."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        frx = re.compile(fail) if isinstance(fail, str) else fail
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for i in range(seen, len(self.lines)):
                    text = self.lines[i].text
                    if rx.search(text):
                        return self.lines[i]
                    if frx is not None and frx.search(text):
                        raise BootlinkError(
                            f"guest failed before {rx.pattern!r}: {text!r}\n{self.tail()}"
                        )
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._closed:
                    raise BootlinkError(
                        f"QEMU exited before {rx.pattern!r} appeared\n{self.tail()}"
                    )
                if left <= 0:
                    raise BootlinkError(
                        f"no {rx.pattern!r} on the console within {timeout:.0f} s\n{self.tail()}"
                    )
                self._cond.wait(min(left, 0.5))

    def tail(self, n: int = 25) -> str:
        return "\n".join(f"  [{ln.t:7.2f}] {ln.text}" for ln in self.lines[-n:])

    def milestones(self) -> dict[str, float]:
        """Host seconds since QEMU start for each milestone line (first occurrence)."""
        out: dict[str, float] = {}
        for ln in self.lines:
            m = MILESTONE_RE.search(ln.text)
            if m and m.group(1) not in out:
                out[m.group(1)] = ln.t
                if m.group(1) == "/init":
                    # uptime counts from the kernel's start: the kernel began that long ago
                    out.setdefault("kernel", round(ln.t - float(m.group(2)), 3))
        return out


@dataclass
class Nic:
    tap: str
    mac: str
    model: str = "virtio-net-pci"


@dataclass
class VM:
    kernel: Path
    initrd: Path
    append: str
    nics: list[Nic]
    ns: Namespace
    memory_mib: int = 1024
    cpus: int = 1
    log_path: Path | None = None
    extra: list[str] = field(default_factory=list)
    stdin_pipe: bool = False  # True: send() types into the serial console (usb passphrase)
    proc: subprocess.Popen | None = None
    console: ConsoleLog | None = None
    _reader: threading.Thread | None = None

    def command(self) -> list[str]:
        cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", CPU, "-nodefaults",
            "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-no-reboot", "-m", str(self.memory_mib), "-smp", str(self.cpus),
            "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.append,
        ]  # fmt: skip
        for i, nic in enumerate(self.nics):
            cmd += [
                "-netdev", f"tap,id=n{i},ifname={nic.tap},script=no,downscript=no",
                "-device", f"{nic.model},netdev=n{i},mac={nic.mac}",
            ]  # fmt: skip
        return cmd + self.extra

    def start(self) -> VM:
        self.console = ConsoleLog(self.log_path)
        try:
            self.proc = subprocess.Popen(
                [*self.ns.exec_prefix, *self.command()],
                stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the test reaches us, not QEMU directly
            )
        except FileNotFoundError:
            raise BootlinkError(
                "qemu/ip not found: apt-get install qemu-system-x86 iproute2"
            ) from None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self.console
        for raw in iter(self.proc.stdout.readline, b""):
            self.console.feed(raw)
        self.proc.wait()
        self.console.feed(f"[harness] QEMU exited with {self.proc.returncode}".encode())
        self.console.close()

    def wait_for(self, pattern: str, timeout: float, fail: str | None = None) -> ConsoleLine:
        assert self.console is not None
        return self.console.wait_for(pattern, timeout, fail)

    def send(self, text: str) -> None:
        """Type `text` on the guest's serial console (needs stdin_pipe=True)."""
        assert self.proc is not None and self.proc.stdin is not None, "VM(stdin_pipe=True)"
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BootlinkError(f"QEMU still running after {timeout:.0f} s") from None

    def stop(self) -> None:
        """Kill QEMU by its PID (TERM, then KILL), and wait for the console reader."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if self.console is not None:
            self.console.close()

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def mac_for(i: int, prefix: str = "52:54:00:b1:00") -> str:
    return f"{prefix}:{i:02x}"
