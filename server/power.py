"""The server ramdisk treats the laptop kindly: battery warnings and the lid.

While the desktop runs the laptop's OS, the laptop is only a disk on a cable: if its
battery runs flat the desktop's root filesystem vanishes mid-write. So we warn on the
console, with a beep (console bell and PC speaker), when it leaves mains power and again
and again while the charge is low. Nothing happens on a machine without a battery.

The lid: in the bootlink ramdisk no logind or acpid runs, so closing the lid does nothing
(the kernel itself never suspends on a lid event); the laptop can be closed and put
aside. Should a logind (systemd or elogind) be present, a runtime drop-in tells it to
ignore the lid and the suspend keys; acpid's lid scripts are not touched (not installed).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bootlink.server.power")

LOW_PERCENT = 20.0
CRITICAL_PERCENT = 8.0
CHECK_INTERVAL = 20.0  # seconds between battery reads
REPEAT_LOW = 120.0  # seconds between repeated warnings while low (every check if critical)
KIOCSOUND = 0x4B2F  # console ioctl: start a PC-speaker tone (0 stops it)
PIT_HZ = 1193180

LOGIND_DROPIN = """\
# bootlink server: the laptop serves its disk to another PC; closing the lid must not
# suspend it (written at run time, gone at the next boot).
[Login]
HandleLidSwitch=ignore
HandleLidSwitchExternalPower=ignore
HandleLidSwitchDocked=ignore
HandleSuspendKey=ignore
HandleHibernateKey=ignore
IdleAction=ignore
"""


@dataclass(frozen=True)
class Battery:
    percent: float
    plugged: bool | None  # None: unknown


def read_battery() -> Battery | None:
    try:
        import psutil
    except ImportError:
        return None
    try:
        b = psutil.sensors_battery()
    except (OSError, RuntimeError):
        return None
    if b is None:
        return None
    return Battery(float(b.percent), b.power_plugged)


class BatteryWatch:
    """Decides when to warn; reading, beeping and the clock are injected for tests."""

    def __init__(
        self,
        read: Callable[[], Battery | None] = read_battery,
        beep: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read, self.beep, self.clock = read, beep or console_beep, clock
        self.was_plugged: bool | None = True
        self.last_low_warning = -1e9

    def check(self) -> str | None:
        """Look once; return the warning given (also logged and beeped), if any."""
        b = self.read()
        if b is None:
            return None
        msg, beeps = None, 0
        on_battery = b.plugged is False
        if on_battery and b.percent <= LOW_PERCENT:
            critical = b.percent <= CRITICAL_PERCENT
            if critical or self.clock() - self.last_low_warning >= REPEAT_LOW:
                self.last_low_warning = self.clock()
                level = "CRITICAL" if critical else "low"
                msg = (
                    f"laptop battery {level}: {b.percent:.0f}% and discharging. Plug its "
                    "charger in now: if it dies, the desktop loses its root disk"
                )
                beeps = 3 if critical else 2
        elif on_battery and self.was_plugged is not False:
            msg = (
                f"laptop on battery ({b.percent:.0f}%): plug its charger in; the desktop's "
                "OS depends on it staying on"
            )
            beeps = 1
        elif b.plugged and self.was_plugged is False:
            log.info("laptop charger connected (%.0f%%)", b.percent)
        self.was_plugged = b.plugged
        if msg:
            log.warning("%s", msg)
            self.beep(beeps)
        return msg

    def run(self, stop: threading.Event, interval: float = CHECK_INTERVAL) -> None:
        while True:
            try:
                self.check()
            except Exception:  # a sensor hiccup must never take the server down
                log.exception("battery check failed")
            if stop.wait(interval):
                return


def console_beep(times: int, console: str = "/dev/console") -> None:
    """Bell character and a PC-speaker tone on the console (whatever of it works)."""
    try:
        fd = os.open(console, os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return
    try:
        for _ in range(times):
            with contextlib.suppress(OSError):
                os.write(fd, b"\a")
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, KIOCSOUND, PIT_HZ // 880)
                time.sleep(0.2)
                fcntl.ioctl(fd, KIOCSOUND, 0)
            time.sleep(0.15)
    finally:
        os.close(fd)


def ignore_lid(root: Path = Path("/")) -> list[Path]:
    """If a logind runs here, tell it to ignore the lid (runtime drop-in); returns the
    files written. Without logind (the bootlink ramdisk) there is nothing to do."""
    written = []
    candidates = [
        ("run/systemd/logind.conf.d", "usr/lib/systemd/systemd-logind", "systemd-logind"),
        ("run/elogind/logind.conf.d", "usr/libexec/elogind/elogind", "elogind"),
    ]
    for dropin_dir, binary, service in candidates:
        if not (root / binary).exists():
            continue
        d = root / dropin_dir
        d.mkdir(parents=True, exist_ok=True)
        path = d / "90-bootlink-lid.conf"
        path.write_text(LOGIND_DROPIN)
        written.append(path)
        if root == Path("/") and shutil.which("pkill"):
            # logind re-reads its configuration on SIGHUP
            subprocess.run(["pkill", "-HUP", "-x", service], check=False)
    return written


def start_power_watch(stop: threading.Event) -> threading.Thread | None:
    """Background battery watch for the server; None when there is no battery."""
    in_ramdisk = False
    with contextlib.suppress(OSError):
        in_ramdisk = "bootlink.role=server" in Path("/proc/cmdline").read_text()
    if in_ramdisk:
        for path in ignore_lid():
            log.info("lid switch ignored (%s)", path)
    first = read_battery()
    if first is None:
        log.debug("no battery: no power watch")
        return None
    watch = BatteryWatch()
    t = threading.Thread(target=watch.run, args=(stop,), name="battery", daemon=True)
    t.start()
    state = "on mains" if first.plugged else "on battery"
    log.info("battery %.0f%%, %s: watching it", first.percent, state)
    return t
