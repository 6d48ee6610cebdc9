"""Ordered parallel map with a bounded window, fed from its own thread.

The AEAD frames of one stream are independent, and OpenSSL, hashlib and socket/file I/O
release the GIL, so a transfer can keep every core busy: one thread pulls items (reads
the socket or the file), workers seal or open them, and the consumer writes results in
order. Without the feeder thread the consumer would stop reading the socket while it
writes, the TCP window would fill and the sender would stall. Memory stays at `window`
items.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WORKERS = max(1, min(4, os.cpu_count() or 1))
_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int = WORKERS, window: int = 0
) -> Iterator[R]:
    """Like map(fn, items), but items are pulled on a feeder thread and up to `workers`
    calls run at once; results come back in order.

    At most `window` (default 2 * workers) items are in flight. An exception from
    `items` or `fn` is raised to the consumer at that item's position; if the consumer
    stops early, the feeder stops and pending work is cancelled.
    """
    window = window or 2 * workers
    slots: queue.Queue = queue.Queue(maxsize=window)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aead")

    def feed() -> None:
        try:
            for item in items:
                fut = pool.submit(fn, item)
                while not stop.is_set():
                    try:
                        slots.put(fut, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    fut.cancel()
                    return
            slots.put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised in its place
            slots.put(_Failed(exc))

    feeder = threading.Thread(target=feed, name="feeder", daemon=True)
    feeder.start()
    try:
        while True:
            slot = slots.get()
            if slot is _DONE:
                return
            if isinstance(slot, _Failed):
                raise slot.exc
            fut: Future[R] = slot
            yield fut.result()
    finally:
        stop.set()
        while True:  # unblock a feeder waiting for room, cancel what was queued
            try:
                slot = slots.get_nowait()
            except queue.Empty:
                break
            if isinstance(slot, Future):
                slot.cancel()
        feeder.join(timeout=5)
        pool.shutdown(wait=True, cancel_futures=True)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of up to `size` consecutive items (itertools.batched is Python >= 3.12)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
