"""Stopping a helper process bootlink started (nbdkit, udhcpc, a Bee node)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop(proc: subprocess.Popen, grace: float = 3.0, *, group: bool = False) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds (a process may ignore SIGTERM while it
    waits on a dead peer); its exit status. `group`: signal its whole process group (it
    was started with start_new_session=True and may have children of its own)."""
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM, group)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL, group)
            proc.wait()
    return proc.returncode


def _signal(proc: subprocess.Popen, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass  # gone meanwhile
