"""Independent work units (store parts, query blocks) run in worker processes or on a Dask cluster.

Each task writes its own output atomically, so results are not sent back: a task's output
is on disk once it returns, and a run killed at any point resumes from what is there.
Engines are existing ones: joblib's loky processes (``jobs``) or a ``dask.distributed``
scheduler (``--dask ADDRESS``, one future per unit); the cluster's workers must see the same
output folder (a shared file system). A worker that dies mid-task leaves at
most a temporary of :func:`delf_pipeline.utils.artifacts.atomic_path`; the scheduler runs
its task again elsewhere, and a rerun removes the temporary and redoes what is missing.

State that is expensive to build (a model, a verifier with its cache) is kept by
:func:`worker_local`: one per worker process, built on its first task, not per task.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Hashable, Sequence, TypeVar

from .processes import exit_with_parent
from .progress import track

T = TypeVar("T")
log = logging.getLogger("delf_pipeline.utils.parallel")

_HELD: dict[Hashable, object] = {}  # at most one entry: this process's current worker state
_LOCK = threading.Lock()  # a worker with several threads builds it once


def run_tasks(function: Callable[..., object], tasks: Sequence[tuple], label: str, *, jobs: int = 1,
              dask_address: str | None = None) -> None:
    """Call ``function(*task)`` for every task, in ``jobs`` loky processes or, when
    ``dask_address`` is given, on that dask.distributed scheduler; returns when all are done
    (in any order), raising the first task's error."""
    if dask_address:
        _run_on_dask(function, tasks, label, dask_address)
        return
    from joblib import Parallel, delayed, parallel_config

    with parallel_config(**worker_config(jobs)):
        runner = Parallel(n_jobs=jobs, return_as="generator_unordered")
        for _ in track(runner(delayed(function)(*task) for task in tasks), len(tasks), label):
            pass


def worker_config(jobs: int) -> dict:
    """joblib ``parallel_config`` of ``jobs`` loky worker processes that end with this process:
    each watches its parent (:func:`exit_with_parent`), so killing the main process does not
    leave the workers (and their resource tracker) running until loky's 5-minute idle timeout."""
    return {"backend": "loky", "n_jobs": jobs, "initializer": exit_with_parent, "initargs": (os.getpid(),)}


def _run_on_dask(function: Callable[..., object], tasks: Sequence[tuple], label: str, address: str) -> None:
    """One Dask task per work unit, through the client's own futures.

    Not joblib's dask backend: when a task's worker dies more often than the scheduler's
    ``distributed.scheduler.allowed-failures``, its ``Parallel`` never returned (joblib 1.6,
    distributed 2026.8); the future raises ``KilledWorker``.
    A failed task does not stop the others: the run returns or raises only when no task of
    it runs any more, so a rerun started right after it cannot race one of them (a cancelled
    task that already runs would go on writing).
    """
    client = dask_client(address)  # first: it names the extra to install when dask is missing
    from dask.distributed import as_completed

    try:
        futures = [client.submit(function, *task, pure=False) for task in tasks]
        failed = [f for f in track(as_completed(futures), len(futures), label) if f.status != "finished"]
        if failed:
            log.error("%d of %d tasks failed; a rerun redoes them", len(failed), len(futures))
            failed[0].result()  # raises the first failure's error (the task's own, or KilledWorker)
    finally:
        client.close()


def dask_client(address: str):
    """A ``dask.distributed`` client of the scheduler at ``address`` (e.g. tcp://host:8786)."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise ModuleNotFoundError("--dask needs dask.distributed: pip install 'delf_pipeline[dask]'") from None
    return Client(address)


def worker_local(key: Hashable, build: Callable[[], T]) -> T:
    """This process's object for ``key``, built by ``build()`` on first use.

    One object is held at a time: a new key (other settings, another store) releases the
    previous one, so a worker never holds two models.
    """
    with _LOCK:
        if key not in _HELD:
            _HELD.clear()
            _HELD[key] = build()
        return _HELD[key]
