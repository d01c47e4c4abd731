"""Progress reporting: a rich progress bar on a terminal, periodic log lines with an
estimated remaining time elsewhere (CI, Kaggle kernels, log files)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("delf_pipeline")


def track(items: Iterable[T], total: int, description: str, every_seconds: float = 30.0,
          status: Callable[[], str] | None = None) -> Iterator[T]:
    """Yield ``items`` while showing progress; ``total`` is the expected count. ``status``, if
    given, is called after each item for a short text shown beside the bar (a running loss, say).
    Nothing is shown while the package's INFO lines are held back (a leave-one-out calibration
    inside a run)."""
    if total <= 0 or not log.isEnabledFor(logging.INFO):
        yield from items
        return
    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(transient=False) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.update(task, advance=1, description=f"{description} {status()}" if status else description)
        return
    yield from _log_progress(items, total, description, every_seconds, status)


def _log_progress(items: Iterable[T], total: int, description: str, every_seconds: float,
                  status: Callable[[], str] | None = None) -> Iterator[T]:
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
            log.info("%s: %d/%d (%.1f/s, about %s left)%s", description, done, total, rate, format_seconds(eta),
                     f" {status()}" if status else "")


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
