"""Progress of a long loop over images: done / total, images per second, time left.

Generation and scoring log one line per finished batch, e.g.

    generated 12/48 images (25 %), 0.80 images/s, ETA 45 s

The rate is the images finished so far divided by the time since the loop started; the ETA is
the images left at that rate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min 05 s``, ``3 h 07 min``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 120:
        return f"{s} s"
    if s < 3600 * 2:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_rate(per_second: float) -> str:
    """Three significant digits: ``0.812``, ``12.3``, ``145``."""
    if not math.isfinite(per_second):
        return "?"
    return f"{per_second:.3g}" if per_second < 1000 else f"{per_second:.0f}"


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` images finished ``seconds`` after the loop started; ``latest``: the
    file of the last image finished, where there is one."""

    done: int
    total: int
    seconds: float
    latest: Path | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else math.inf

    @property
    def eta_seconds(self) -> float:
        """Seconds left at the rate so far (0 when done; inf before anything finished)."""
        left = self.total - self.done
        if left <= 0:
            return 0.0
        rate = self.images_per_second
        return left / rate if rate > 0 else math.inf

    def line(self, verb: str) -> str:
        """``<verb> 12/48 images (25 %), 0.80 images/s, ETA 45 s``."""
        return (f"{verb} {self.done}/{self.total} images ({math.floor(100 * self.fraction)} %), "
                f"{format_rate(self.images_per_second)} images/s, ETA {format_duration(self.eta_seconds)}")


@dataclass
class ProgressClock:
    """Counts finished images against ``total`` from the moment it is made."""

    total: int
    started: float = field(default_factory=time.perf_counter)
    done: int = 0

    def advance(self, images: int, latest: Path | None = None) -> Progress:
        self.done += images
        return Progress(self.done, self.total, time.perf_counter() - self.started, latest)
