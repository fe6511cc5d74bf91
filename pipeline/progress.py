"""Console progress of long stage work: one live line (tqdm) in a terminal, plain periodic lines otherwise.

Either way it shows done/total, images, the rate and the time left. The stages' Ray Data pools report
here instead of Ray Data's own progress output (`quiet_ray_data`), so a stage has one progress line.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("vq2")


def quiet_ray_data() -> None:
    """Ray Data's progress bars (or, without a terminal, its progress log lines every few seconds) off in this
    process; the stage's Progress shows the pool's progress instead."""
    from ray.data import DataContext
    from ray.util.debug import log_once

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # spends Ray Data's one warning that its bars are off


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Counts finished units (shards, batches) and images, on a live line when stderr is a terminal, else in a
    log line at most every `every_s` seconds and at the end."""

    def __init__(self, label: str, total: int, every_s: float = 5.0, live: bool | None = None):
        self.label, self.total, self.every_s = label, total, every_s
        self.done = self.images = 0
        self.started = self._last = time.monotonic()
        live = sys.stderr.isatty() if live is None else live
        self.bar = tqdm(total=total, desc=label, unit="task", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5) if live and total else None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.images / max(self.elapsed_s, 1e-9)

    def line(self) -> str:
        """done/total, images, images/s and the time left (from the rate of units so far)."""
        left = (self.total - self.done) * self.elapsed_s / self.done if self.done else None
        eta = "?" if left is None else _duration(left)
        return (f"{self.label}: {self.done}/{self.total}, {self.images} images, {self.rate:.1f} images/s, "
                f"{_duration(self.elapsed_s)} elapsed, {eta} left")

    def advance(self, units: int = 1, images: int = 0) -> None:
        self.done += units
        self.images += images
        finished = self.done >= self.total
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.images} images, {self.rate:.1f} images/s", refresh=False)
            self.bar.update(units)
            if finished:
                self.bar.close()
                log.info("%s", self.line())
            return
        now = time.monotonic()
        if finished or now - self._last >= self.every_s:
            self._last = now
            log.info("%s", self.line())
