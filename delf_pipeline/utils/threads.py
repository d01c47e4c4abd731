"""One BLAS thread for small matrix products done many times (the rerank's pair matching).

A pair's mutual nearest neighbours are one [1000, 128] x [128, 1000] float32 product. OpenBLAS
splits a product of that size over all its threads, and on a machine with other work on it
(2 cores, load 1.5) the threads wait for each other: measured 15.8 ms per product with 2
threads against 2.7 ms with one, and a search by photo re-ranked 100 candidates 4x faster in
one (docs/benchmarks.md, "The default chosen from it"). OpenBLAS divides a product's rows and
columns between threads, never the sum of one entry, so each entry is computed alike either
way: the matches, inliers and scores are the same.

The limit holds for the whole process while any thread is inside a :func:`one_blas_thread`
block (BLAS has one setting per library): the first thread in sets it, the last one out
restores the earlier value, so overlapping searches of ``serve`` never leave it set. Without
threadpoolctl the block changes nothing (same results, only slower on a loaded machine).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache


@lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's controller of the BLAS libraries loaded at the first call, or None
    without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController().select(user_api="blas")


class _SharedLimit:
    """One BLAS thread while any thread is inside; the first in sets it, the last out restores it.

    threadpoolctl (3.8) lets one Python thread at a time change OpenBLAS's process-wide limit and
    ignores the others; the lock here serialises ours, so the thread that sets or restores it
    takes that control first and gives it up after (:func:`_take_control`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.limiter = None

    def enter(self, controller) -> None:
        with self.lock:
            if self.inside == 0:
                _take_control()
                self.limiter = controller.limit(limits=1)
                _take_control()
            self.inside += 1

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1
            if self.inside == 0:
                _take_control()
                self.limiter.restore_original_limits()
                self.limiter = None
                _take_control()


def _take_control() -> None:
    """Clear threadpoolctl's controlling thread of OpenBLAS (versions that have one), so that the
    next limit set, by any thread, applies."""
    import threadpoolctl

    clear = getattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


_SHARED = _SharedLimit()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with every loaded BLAS library limited to one thread."""
    controller = _blas_controller()
    if controller is None:
        yield
        return
    _SHARED.enter(controller)
    try:
        yield
    finally:
        _SHARED.leave()
