"""Time budget: fit the rerank depth (``num_to_rerank``) to the time that is left.

Extraction and shortlisting cannot be shortened without changing the result, so they
run in full; the budget acts on the rerank stage, whose cost is queries x (depth x time per
pair + the cascade's time per query). :func:`fit_num_to_rerank` measures the time per pair on
a sample of the real shortlisted pairs (same code as the rerank stage: store reads + matching
+ RANSAC) and, with a lighterglue cascade, its second stage's time per query on a few of those
queries, its asift fallback included where the images are given and a timed query reaches it
(:func:`measure_cascade_seconds`), then picks the largest depth, at most the configured
one, that fits the remaining time. With no time left it returns 0, and the predictions fall
back to the global shortlist.

``jobs`` worker processes are assumed to verify ``jobs`` times as many pairs per second
(one single-thread process per core, see docs/design.md); that is an estimate, not measured
here, which is one reason for the safety ``margin``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from .config import Config, RerankSettings, with_recorded
from .formats.blocks import blocks_dir, read_table
from .formats.store import FeatureStore
from .utils.artifacts import read_json
from .utils.progress import format_seconds

log = logging.getLogger("delf_pipeline.budget")


@dataclass
class TimeBudget:
    """``seconds`` of wall time counted from ``start`` (a ``clock()`` reading)."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    start: float | None = None  # now, unless given

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"a time budget must be positive, got {self.seconds!r} seconds")
        if self.start is None:
            self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        """Seconds left (negative once the budget is spent)."""
        return self.seconds - self.elapsed()


def affordable_depth(seconds_left: float, seconds_per_pair: float, num_queries: int, jobs: int,
                     configured: int, seconds_per_query: float = 0.0) -> int:
    """Largest depth <= ``configured`` with num_queries x (depth x seconds_per_pair +
    seconds_per_query) / jobs <= seconds_left (``seconds_per_query``: what a query costs whatever
    its depth, the cascade's second stage)."""
    if seconds_per_pair < 0 or jobs < 1:
        raise ValueError(f"need seconds_per_pair >= 0 and jobs >= 1, got {seconds_per_pair}, {jobs}")
    if num_queries == 0 or configured == 0:
        return configured
    if seconds_left <= 0:
        return 0
    per_query = seconds_left * jobs / num_queries - seconds_per_query
    if per_query <= 0:
        return 0
    if seconds_per_pair == 0:
        return configured
    return max(0, min(configured, math.floor(per_query / seconds_per_pair)))


def measure_pair_seconds(conf: RerankSettings, shortlist: pd.DataFrame, query_store: Path | FeatureStore,
                         index_store: Path | FeatureStore,
                         max_pairs: int, max_seconds: float) -> tuple[float, int]:
    """Mean seconds per verified pair and the number of pairs timed.

    Queries are taken evenly spaced over the sorted ids, each with its ``num_to_rerank``
    best candidates, until ``max_pairs`` pairs or ``max_seconds`` are spent (at least one
    query). The index-feature cache starts empty, so the estimate errs on the slow side.
    A cascade's second stage is timed apart (:func:`measure_cascade_seconds`): only the fast path is here.
    """
    from .formats.candidates import top_candidates
    from .verification.verifier import CandidateVerifier

    candidates = top_candidates(shortlist, conf.num_to_rerank)
    queries = sorted(candidates)
    step = max(1, len(queries) * conf.num_to_rerank // max(1, max_pairs))
    # the cascade's second stage needs labels and images, and runs on few pairs: not timed
    worker = CandidateVerifier(query_store, index_store, replace(conf, cascade=""))
    start, pairs = time.perf_counter(), 0
    for query_id in queries[::step]:
        pairs += len(worker.rerank_query(query_id, candidates[query_id]))
        if pairs >= max_pairs or time.perf_counter() - start >= max_seconds:
            break
    return (time.perf_counter() - start) / max(pairs, 1), pairs


def measure_cascade_seconds(conf: RerankSettings, shortlist: pd.DataFrame, query_store: Path | FeatureStore,
                            index_store: Path | FeatureStore, max_queries: int, max_seconds: float,
                            paths: tuple[Mapping[str, str], Mapping[str, str]] = ({}, {})) -> tuple[float, int]:
    """Mean seconds per query of the cascade's lighterglue stage and the number of queries timed
    ((0.0, 0) without that stage: views need the query images, and are not timed).

    Queries evenly spaced over the sorted ids, until ``max_queries`` or ``max_seconds``: each
    verified by the fast path, then its second stage timed on the pairs it selects without
    labels (each candidate a class of its own: at least as many pairs as with labels), so the
    estimate errs on the slow side. ``paths``: (query id -> image file, index id -> image file)
    for the cascade's asift fallback, timed on the queries it reaches.
    """
    from .formats.candidates import top_candidates
    from .verification.cascade import QuerySide
    from .verification.verifier import CandidateVerifier

    if conf.cascade != "lighterglue":
        return 0.0, 0
    candidates = top_candidates(shortlist, conf.num_to_rerank)
    queries = sorted(candidates)
    fast = CandidateVerifier(query_store, index_store, replace(conf, cascade=""))
    glue = CandidateVerifier(query_store, index_store, conf)
    spent, timed, start = 0.0, 0, time.perf_counter()
    for query_id in queries[::max(1, len(queries) // max(1, max_queries))]:
        rows = fast.rerank_query(query_id, candidates[query_id])
        side = QuerySide(glue.stored_query(query_id), glue.queries.size(query_id), path=paths[0].get(query_id))
        begin = time.perf_counter()
        glue.cascade(rows, side, None, paths[1])
        spent, timed = spent + time.perf_counter() - begin, timed + 1
        if timed >= max_queries or time.perf_counter() - start >= max_seconds:
            break
    return spent / max(timed, 1), timed


def fit_num_to_rerank(config: Config, budget: TimeBudget, shortlist_csv: Path, query_store: Path | FeatureStore,
                      index_store: Path | FeatureStore, rerank_csv: Path, *, jobs: int = 1, overwrite: bool = False,
                      margin: float = 0.8, sample_pairs: int = 200, sample_queries: int = 20,
                      images: str | Path | None = None) -> Config:
    """A copy of ``config`` whose ``rerank.num_to_rerank`` fits ``margin`` x the time left, the
    cascade's second stage counted at its measured time per query (with its asift fallback
    when ``images``, the Kaggle root, is given: its test and train images).

    A rerank output already begun (its manifest exists, no ``overwrite``) keeps the depth
    it was started with, so a resumed run finishes the same work.
    """
    started = blocks_dir(Path(rerank_csv)) / "manifest.json"
    if started.exists() and not overwrite:
        depth = read_json(started)["settings"]["num_to_rerank"]
        log.info("time budget: resuming %s with num_to_rerank=%d", rerank_csv, depth)
        return with_recorded(config, "rerank", {"num_to_rerank": depth}, str(started))
    config = config.copy()
    conf = config.rerank
    configured, left = conf.num_to_rerank, budget.remaining()
    shortlist = read_table(Path(shortlist_csv))
    num_queries = shortlist["query_id"].nunique()
    if configured == 0 or num_queries == 0 or left <= 0:
        conf.num_to_rerank = affordable_depth(left, 0.0, num_queries, jobs, configured)
    else:
        per_pair, timed = measure_pair_seconds(conf, shortlist, query_store, index_store, sample_pairs,
                                               max_seconds=0.02 * left)
        per_query, sampled = measure_cascade_seconds(conf, shortlist, query_store, index_store, sample_queries,
                                                     max_seconds=0.02 * left, paths=fallback_paths(conf, images))
        left = budget.remaining()
        conf.num_to_rerank = affordable_depth(margin * left, per_pair, num_queries, jobs, configured, per_query)
        log.info("time budget: %.1f ms per pair (%d pairs timed), %.2f s of cascade per query (%d queries timed), "
                 "%d queries, %d jobs", 1000 * per_pair, timed, per_query, sampled, num_queries, jobs)
    log_decision(configured, conf.num_to_rerank, budget)
    return config


def fallback_paths(conf: RerankSettings, images: str | Path | None) -> tuple[Mapping[str, str], Mapping[str, str]]:
    """(query id -> file, index id -> file) of the Kaggle root ``images`` when the cascade's asift
    fallback would read them (listed when it first does), else two empty maps."""
    if images is None or conf.cascade != "lighterglue" or not conf.cascade_fallback:
        return {}, {}
    from .formats.images import ImagePaths

    return ImagePaths(images, "test"), ImagePaths(images, "train")


def log_decision(configured: int, chosen: int, budget: TimeBudget) -> None:
    spent, left = format_seconds(budget.elapsed()), format_seconds(max(budget.remaining(), 0.0))
    if chosen < configured:
        log.warning("time budget: num_to_rerank lowered from %d to %d (%s spent, %s left)", configured, chosen,
                    spent, left)
    else:
        log.info("time budget: num_to_rerank=%d fits (%s spent, %s left)", chosen, spent, left)
