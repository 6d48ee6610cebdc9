"""Ordered parallel map with a bounded window: the AEAD frames of one stream are
independent, and OpenSSL releases the GIL while it works, so sealing or opening a few
frames at once uses every core while memory stays at `window` frames."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WORKERS = max(1, min(4, os.cpu_count() or 1))


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int = WORKERS, window: int = 0
) -> Iterator[R]:
    """Like map(fn, items) but up to `workers` calls run at once, results in order.

    At most `window` (default 2 * workers) items are read ahead of the consumer. If the
    consumer stops early or an item raises, pending work is cancelled.
    """
    window = window or 2 * workers
    if workers <= 1:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aead") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
