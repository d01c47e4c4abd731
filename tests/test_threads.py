"""Tests of delf_pipeline.utils.threads: the rerank matches pairs in one BLAS thread, with the
same matches and rows as with OpenBLAS's threads."""
from __future__ import annotations

import threading
from contextlib import nullcontext

import numpy as np
import pytest
from support.synthetic_stores import DIM, random_unit_rows, shortlist_frame, write_store
from support.synthetic_stores import place_view as image

from delf_pipeline import rerank
from delf_pipeline.config import load_config
from delf_pipeline.utils import threads
from delf_pipeline.verification import verifier
from delf_pipeline.verification.matching import match_descriptors


def test_one_blas_thread_limits_blas_and_restores_it():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    def blas() -> list[int]:
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]

    before = blas()
    with threads.one_blas_thread():
        assert set(blas()) <= {1}
    assert blas() == before


def test_overlapping_blocks_of_two_threads_restore_the_limit_when_the_last_one_leaves():
    """serve searches in several threads: A enters, B enters, A leaves (still one thread: B is
    inside), B leaves (restored), whatever the order of leaving."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas() -> set[int]:
        return {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"}

    before = blas()
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def first():
        with threads.one_blas_thread():
            a_inside.set()
            b_inside.wait(10)
        a_left.set()

    def second():
        a_inside.wait(10)
        with threads.one_blas_thread():
            b_inside.set()
            a_left.wait(10)
            seen["after a left"] = blas()

    workers = [threading.Thread(target=first), threading.Thread(target=second)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(20)
    assert seen["after a left"] <= {1}
    assert blas() == before


def test_matches_in_one_blas_thread_equal_those_of_every_thread():
    """1000 x 128 float16 descriptors, as the default preset stores them: a product OpenBLAS splits
    between its threads; the matches are the same bit for bit."""
    rng = np.random.default_rng(0)
    a = random_unit_rows(1000, 128, seed=1).astype(np.float16)
    b = np.vstack([a[:300] + rng.normal(0, 0.02, (300, 128)), random_unit_rows(700, 128, seed=2)]).astype(np.float16)
    for matcher in ("mutual", "nn"):
        free = match_descriptors(a, b, matcher=matcher, match_threshold=0.8)
        with threads.one_blas_thread():
            one = match_descriptors(a, b, matcher=matcher, match_threshold=0.8)
        assert np.array_equal(free, one) and len(one) >= 300


def test_rerank_rows_are_the_same_without_the_thread_limit(tmp_path, monkeypatch):
    queries = {f"q{n}": image(n % 3, 30 + n, seed=100 + n, global_seed=100 + n) for n in range(6)}
    index = {f"i{n}": image(n % 3, 20 + n, seed=n, global_seed=n) for n in range(6)}
    shortlist_frame({q: [(f"i{n}", 0.9 - 0.1 * n) for n in range(6)] for q in queries}).to_csv(
        tmp_path / "shortlist.csv", index=False)
    stores = (write_store(tmp_path / "q", queries, 4, local_dim=DIM),
              write_store(tmp_path / "i", index, 4, local_dim=DIM))
    fast = load_config(overrides=['rerank.cascade=""'])  # the synthetic stores hold no XFeat features
    limited = rerank.run(fast, tmp_path / "shortlist.csv", *stores, tmp_path / "limited.csv")
    monkeypatch.setattr(verifier, "one_blas_thread", nullcontext)
    free = rerank.run(fast, tmp_path / "shortlist.csv", *stores, tmp_path / "free.csv")
    assert limited.read_bytes() == free.read_bytes()
