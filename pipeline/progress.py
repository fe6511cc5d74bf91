"""Console progress for long stage work: done/total, images and rate, at most every few seconds."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("vq2")


class Progress:
    """Counts finished units (shards, batches) and images; logs a line at most every `every_s` seconds."""

    def __init__(self, label: str, total: int, every_s: float = 5.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.done = self.images = 0
        self.started = self._last = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.images / max(self.elapsed_s, 1e-9)

    def advance(self, units: int = 1, images: int = 0) -> None:
        self.done += units
        self.images += images
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self.every_s:
            self._last = now
            log.info("%s: %d/%d, %d images, %.1f images/s", self.label, self.done, self.total, self.images, self.rate)
