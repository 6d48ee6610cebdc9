"""Test hosts as network namespaces wired with veth pairs (real kernel networking).

Every name carries the test process's pid so that concurrent test runs never collide,
and `Lab.close()` removes every namespace and kills every process it started, even
when the test failed. Only addresses on these private veths are ever used.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BOOTLINK = [sys.executable, "-m", "bootlink"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    ns: str

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], **kw)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], **kw)

    def link_local(self, ifname: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["ip", "-6", "-o", "addr", "show", "dev", ifname, "scope", "link"])
            for word in out.stdout.split():
                if word.startswith("fe80::") and "tentative" not in out.stdout:
                    return word.split("/")[0]
            time.sleep(0.05)
        raise TimeoutError(f"{ifname} in {self.ns} got no link-local address")


@dataclass
class Lab:
    tag: str = field(default_factory=lambda: f"t{os.getpid()}")
    hosts: list[Host] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _ifindex: itertools.count = field(
        default_factory=lambda: itertools.count(20000 + (os.getpid() % 2000) * 20)
    )

    def host(self, role: str) -> Host:
        h = Host(f"bl{self.tag}-{role}-{next(self._ids)}")
        _ip("netns", "add", h.ns)
        self.hosts.append(h)
        h.run(["ip", "link", "set", "lo", "up"], check=True)
        return h

    def cable(self, a: Host, a_if: str, b: Host | None, b_if: str = "peer", up_b: bool = True):
        """A veth pair: a_if in `a`, b_if in `b` (or left dangling in a throwaway namespace
        with its end down: a NIC with a dead cable). Explicit distinct ifindexes avoid the
        equal-index carrier delay FACTS.md describes."""
        dangling = b is None
        if dangling:
            b = self.host("void")
        ia, ib = next(self._ifindex), next(self._ifindex)
        _ip(
            "link",
            "add",
            a_if,
            "netns",
            a.ns,
            "index",
            str(ia),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.ns,
            "index",
            str(ib),
        )
        if up_b and not dangling:
            b.run(["sysctl", "-qw", f"net.ipv6.conf.{b_if}.accept_dad=0"], check=True)
            b.run(["ip", "link", "set", b_if, "up"], check=True)

    def start(self, host: Host, cmd: list[str], log: Path) -> subprocess.Popen:
        out = open(log, "wb")  # noqa: SIM115 - owned by the process for its lifetime
        proc = host.popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for h in self.hosts:
            # kill anything still running inside (e.g. an nbdkit a crashed server left)
            pids = subprocess.run(["ip", "netns", "pids", h.ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)


def wait_for_log(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before '{needle}':\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for '{needle}' in {path}:\n{path.read_text()}")
