"""Logging setup and a small progress reporter for long operations.

Progress goes to stderr (never stdout, which carries `--json` output) and is throttled,
so a 1 GiB download prints a handful of lines, not thousands.
"""

from __future__ import annotations

import logging
import sys
import time

LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=LOG_FORMAT,
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


class Progress:
    """Throttled "label: 42% (420/1000 MiB, 350 MB/s)" lines on stderr."""

    def __init__(self, label: str, total: int, interval: float = 1.0, stream=None) -> None:
        self.label, self.total, self.interval = label, total, interval
        self.done = 0
        self._start = self._last = time.monotonic()
        self._stream = stream if stream is not None else sys.stderr

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def finish(self) -> None:
        self._print(time.monotonic(), final=True)

    def _print(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed / 1e6
        pct = f"{100 * self.done / self.total:.0f}% " if self.total else ""
        mib = f"{self.done / 2**20:.1f}/{self.total / 2**20:.1f} MiB"
        tail = " done" if final else ""
        print(f"{self.label}: {pct}({mib}, {rate:.0f} MB/s){tail}", file=self._stream, flush=True)
