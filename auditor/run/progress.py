"""Progress of a run: a tqdm bar on a terminal, else a log line at most every 10 s (CI logs stay readable)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Progress:
    """tqdm on a terminal; otherwise a log line at most every 10 s (CI logs stay readable)."""

    def __init__(self, batches: int, done: int, images: int, enabled: bool | None) -> None:
        self.bar = None
        self.total, self.count, self.images = batches, done, 0
        self.start = self.last = time.perf_counter()
        self.initial = done
        tty = sys.stderr.isatty()
        if enabled or (enabled is None and tty):
            from tqdm import tqdm

            self.bar = tqdm(total=batches, initial=done, unit="batch", desc="auditing", dynamic_ncols=True)

    def update(self, n_images: int) -> None:
        self.count += 1
        self.images += n_images
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.images / (time.perf_counter() - self.start):.1f} img/s")
            return
        now = time.perf_counter()
        if now - self.last >= 10 or self.count == self.total:
            rate = self.images / max(now - self.start, 1e-9)
            left = (self.total - self.count) * (now - self.start) / max(self.count - self.initial, 1)
            log.info("batch %d/%d, %.1f images/s, ETA %ds", self.count, self.total, rate, left)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Log a long stage after the map stage as it starts and ends (``<name>: done in 12.3 s``), so that a run
    never sits silent for minutes (the analyses log their own lines in between)."""
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", name, time.perf_counter() - start)
