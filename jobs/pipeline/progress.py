"""Progress of a pipeline run: a live bar on a terminal, one log line now and then otherwise.

A bar redraws with carriage returns, which a captured log (a RayJob's, a CI's) keeps as one
ever-longer line; so the bar is only drawn when stderr is a terminal, and everywhere else a
line `segment: 120/1024 images (11.7 %), 3.2 images/s, about 4.7 min left` is logged every
`--progress-interval` seconds (and when the run ends). `--quiet` shows neither.
"""

from __future__ import annotations

import logging
import sys
import time

from jobs.logs import settings

logger = logging.getLogger(__name__)


def describe_left(seconds: float) -> str:
    """Seconds -> 'about 40 s' / 'about 4.7 min' / 'about 2.1 h'."""
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.1f} min"
    return f"about {seconds / 3600:.1f} h"


class Progress:
    """`with Progress(total, "segment", interval) as progress: progress.update(images)`."""

    def __init__(self, total: int, name: str, interval: float, unit: str = "images") -> None:
        self.total, self.name, self.interval, self.unit = total, name, interval, unit
        self.done = self.reported = 0
        self.bar = None
        self.started = self.last = time.monotonic()
        mode = settings()
        self.silent = getattr(logging, mode.level.upper()) > logging.INFO
        if not self.silent and mode.interactive and mode.format == "text":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=name, file=sys.stderr, mininterval=0.5)

    def __enter__(self) -> "Progress":
        return self

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if not self.silent and now - self.last >= self.interval:
            self.last, self.reported = now, self.done
            logger.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self.started)
        rate = self.done / elapsed
        share = 100.0 * self.done / self.total if self.total else 100.0
        left = describe_left((self.total - self.done) / rate) if rate > 0 and self.done < self.total else "done"
        return (f"{self.name}: {self.done}/{self.total} {self.unit} ({share:.1f} %), "
                f"{rate:.2f} {self.unit}/s, {left}" + (" left" if left != "done" else ""))

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.silent and exc[0] is None and 0 < self.reported < self.done:
            logger.info(self.line())  # the final count, when earlier lines showed a partial one
