"""One BLAS thread for small matrix products done many times (the rerank's pair matching).

A pair's mutual nearest neighbours are one [1000, 128] x [128, 1000] float32 product. OpenBLAS
splits a product of that size over all its threads, and on a machine with other work on it
(2 cores, load 1.5) the threads wait for each other: measured 15.8 ms per product with 2
threads against 2.7 ms with one, and the whole search by photo re-ranked 100 candidates in
1075 ms against 261 ms (docs/benchmarks.md, "Re-ranking in one BLAS thread"). OpenBLAS divides a
product's rows and columns between threads, never the sum of one entry, so each entry is
computed alike either way: the matches, inliers and scores are the same.

The limit holds for the whole process while a :func:`one_blas_thread` block runs (BLAS has one
setting per library); the block restores the earlier value on exit. Without threadpoolctl the
block changes nothing (same results, only slower on a loaded machine).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with every loaded BLAS library limited to one thread."""
    controller = _blas_controller()
    with controller.limit(limits=1) if controller is not None else nullcontext():
        yield
