"""Prefetcher: copies the misses of the next resident set host->device while a window decodes.

Its own thread (and, on CUDA, the kernels' side stream). The decode thread allocates the
device cells and hands over (host slots, device pages); the copy writes cells nobody reads
yet. At the next window boundary `wait()` returns at once if the copy is done; otherwise it
blocks, and the wait is counted as a stall (count and seconds), never skipped.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class Prefetcher:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsa-prefetch")

    def submit(self, copy: Callable[[], object]) -> Future:
        def run():
            event = copy()
            if event is not None:  # CUDA: wait for the side-stream copy inside the worker
                event.synchronize()

        return self._pool.submit(run)

    @staticmethod
    def wait(future: Future) -> float:
        """Block until done; returns the seconds spent waiting (0.0 if it was already done)."""
        if future.done():
            future.result()
            return 0.0
        t = time.perf_counter()
        future.result()
        return time.perf_counter() - t

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
