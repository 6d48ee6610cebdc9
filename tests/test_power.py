"""The server's battery watch and lid handling (sensors, beeper and clock injected)."""

from __future__ import annotations

import os
import threading

from bootlink.server import power
from bootlink.server.power import Battery, BatteryWatch


class Feed:
    def __init__(self, *readings):
        self.readings = list(readings)

    def __call__(self):
        return self.readings.pop(0)


def make(*readings):
    beeps: list[int] = []
    now = [0.0]
    watch = BatteryWatch(read=Feed(*readings), beep=beeps.append, clock=lambda: now[0])
    return watch, beeps, now


def test_warns_once_when_unplugged_then_repeatedly_when_low_and_louder_when_critical():
    watch, beeps, now = make(
        Battery(80, True),  # on mains: quiet
        Battery(79, False),  # unplugged: one warning
        Battery(70, False),  # still fine: quiet
        Battery(19, False),  # low: warn
        Battery(18, False),  # low again soon after: quiet
        Battery(17, False),  # low, REPEAT_LOW later: warn again
        Battery(7, False),  # critical: every check
        Battery(6, False),
        Battery(6, True),  # charger back: quiet
        Battery(6, True),
    )
    said = []
    for step in range(10):
        if step == 5:
            now[0] += power.REPEAT_LOW
        said.append(watch.check())
    assert said[0] is None and "on battery (79%)" in said[1] and said[2] is None
    assert "low: 19%" in said[3] and said[4] is None and "low: 17%" in said[5]
    assert "CRITICAL: 7%" in said[6] and "CRITICAL: 6%" in said[7]
    assert said[8] is None and said[9] is None
    assert beeps == [1, 2, 2, 3, 3]


def test_no_battery_means_no_watch(monkeypatch):
    monkeypatch.setattr(power, "read_battery", lambda: None)
    assert power.start_power_watch(threading.Event()) is None
    watch, beeps, _ = make(None)
    assert watch.check() is None and beeps == []


def test_watch_thread_runs_and_stops(monkeypatch):
    monkeypatch.setattr(power, "read_battery", lambda: Battery(50, True))
    stop = threading.Event()
    t = power.start_power_watch(stop)
    assert t is not None and t.is_alive()
    stop.set()
    t.join(2)
    assert not t.is_alive()


def test_lid_ignored_only_where_a_logind_runs(tmp_path):
    assert power.ignore_lid(tmp_path) == []  # the ramdisk: no logind, nothing to write
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    (tmp_path / "usr/lib/systemd/systemd-logind").write_text("")
    (written,) = power.ignore_lid(tmp_path)
    assert written == tmp_path / "run/systemd/logind.conf.d/90-bootlink-lid.conf"
    assert "HandleLidSwitch=ignore" in written.read_text()


def test_beep_writes_the_bell(tmp_path):
    fifo = tmp_path / "console"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        power.console_beep(2, str(fifo))  # the tone ioctl fails on a fifo: the bell still rings
        assert os.read(reader, 16) == b"\a\a"
    finally:
        os.close(reader)
