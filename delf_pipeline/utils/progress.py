"""Progress reporting: a rich progress bar on a terminal, periodic log lines with an
estimated remaining time elsewhere (CI, Kaggle kernels, log files)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("delf_pipeline")


def track(items: Iterable[T], total: int, description: str, every_seconds: float = 30.0) -> Iterator[T]:
    """Yield ``items`` while showing progress; ``total`` is the expected count. Nothing is shown
    while the package's INFO lines are held back (a leave-one-out calibration inside a run)."""
    if total <= 0 or not log.isEnabledFor(logging.INFO):
        yield from items
        return
    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(transient=False) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    yield from _log_progress(items, total, description, every_seconds)


def _log_progress(items: Iterable[T], total: int, description: str, every_seconds: float) -> Iterator[T]:
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_seconds or done == total:
            last = now
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d (%.1f/s, about %s left)", description, done, total, rate, format_seconds(eta))


def format_seconds(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``; ``42`` -> ``"42s"``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
