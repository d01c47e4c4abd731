"""Time budget: depth arithmetic with golden values, and every branch of fit_num_to_rerank."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd
import pytest

from delf_pipeline import budget as budget_module
from delf_pipeline.budget import TimeBudget, affordable_depth, fit_num_to_rerank
from delf_pipeline.config import Config, load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.synthetic_images import write_kaggle  # noqa: E402


class FakeClock:
    """A clock that reads ``now`` (seconds), moved by hand."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("left", "per_pair", "queries", "jobs", "configured", "expected"),
    [
        (100.0, 0.01, 1000, 1, 10, 10),  # 1000 x 10 x 0.01 = 100 s: exactly fits
        (50.0, 0.01, 1000, 1, 10, 5),
        (50.0, 0.01, 1000, 2, 10, 10),  # two workers double the throughput
        (9.99, 0.01, 1000, 1, 10, 0),  # not even one candidate per query
        (1e6, 0.01, 1000, 1, 10, 10),  # never above the configured depth
        (0.0, 0.01, 1000, 1, 10, 0),
        (-5.0, 0.01, 1000, 1, 10, 0),  # budget already overrun
        (100.0, 0.01, 0, 1, 10, 10),  # no queries: nothing to lower
        (100.0, 0.01, 1000, 1, 0, 0),
        (100.0, 0.0, 1000, 1, 10, 10),
    ],
)
def test_affordable_depth(left, per_pair, queries, jobs, configured, expected):
    assert affordable_depth(left, per_pair, queries, jobs, configured) == expected


@pytest.mark.parametrize(
    ("left", "per_query", "expected"),
    [
        (100.0, 0.05, 5),  # 0.1 s per query, 0.05 of it the cascade's: 0.05 / 0.01 = depth 5
        (100.0, 0.1, 0),  # the cascade alone takes all the time
        (100.0, 0.5, 0),
        (1e6, 0.05, 10),
    ],
)
def test_affordable_depth_counts_the_cascades_time_per_query(left, per_query, expected):
    assert affordable_depth(left, 0.01, 1000, 1, 10, per_query) == expected


@pytest.mark.parametrize(("per_pair", "jobs"), [(-0.1, 1), (0.1, 0)])
def test_affordable_depth_rejects_nonsense(per_pair, jobs):
    with pytest.raises(ValueError, match="seconds_per_pair >= 0 and jobs >= 1"):
        affordable_depth(10.0, per_pair, 5, jobs, 10)


def test_time_budget_counts_from_its_start():
    clock = FakeClock(100.0)
    budget = TimeBudget(60.0, clock=clock)
    clock.now = 145.0
    assert (budget.elapsed(), budget.remaining()) == (45.0, 15.0)
    clock.now = 170.0
    assert budget.remaining() == -10.0


@pytest.mark.parametrize("seconds", [0.0, -1.0])
def test_time_budget_must_be_positive(seconds):
    with pytest.raises(ValueError, match="must be positive"):
        TimeBudget(seconds)


def write_shortlist(path, queries: int, per_query: int = 10):
    rows = [(f"q{q}", f"i{r}", r + 1, 1.0 - r / 100) for q in range(queries) for r in range(per_query)]
    pd.DataFrame(rows, columns=["query_id", "index_id", "rank", "score"]).to_csv(path, index=False)
    return path


def config(num_to_rerank: int = 10, cascade: str = '""') -> Config:
    return load_config(overrides=[f"rerank.num_to_rerank={num_to_rerank}", f"rerank.cascade={cascade}"])


def test_fit_lowers_depth_from_the_measured_pair_time(tmp_path, monkeypatch, caplog):
    clock = FakeClock(0.0)
    budget = TimeBudget(1000.0, clock=clock)
    clock.now = 900.0  # 100 s left; margin 0.8 -> 80 s for 40 queries at 0.5 s per pair = depth 4
    calls = []

    def measure(conf, shortlist, query_store, index_store, max_pairs, max_seconds):
        calls.append((len(shortlist), conf["num_to_rerank"], max_pairs, max_seconds))
        return 0.5, 20

    monkeypatch.setattr(budget_module, "measure_pair_seconds", measure)
    original = config(10)
    with caplog.at_level(logging.WARNING):
        fitted = fit_num_to_rerank(original, budget, write_shortlist(tmp_path / "s.csv", 40), tmp_path, tmp_path,
                                   tmp_path / "rerank.csv")
    assert fitted.rerank.num_to_rerank == 4
    assert original.rerank.num_to_rerank == 10  # the caller's config is not changed
    assert calls == [(400, 10, 200, 2.0)]  # sampling may use 2% of the time left
    assert "num_to_rerank lowered from 10 to 4" in caplog.text


def test_fit_counts_the_measured_cascade_time_per_query(tmp_path, monkeypatch):
    clock = FakeClock(0.0)
    budget = TimeBudget(1000.0, clock=clock)
    clock.now = 900.0  # 80 s for 40 queries: 2 s each, 1 s of it the cascade's -> depth 2 at 0.5 s per pair
    monkeypatch.setattr(budget_module, "measure_pair_seconds", lambda *args, **kwargs: (0.5, 20))
    monkeypatch.setattr(budget_module, "measure_cascade_seconds", lambda *args, **kwargs: (1.0, 5))
    fitted = fit_num_to_rerank(config(10, "lighterglue"), budget, write_shortlist(tmp_path / "s.csv", 40), tmp_path,
                               tmp_path, tmp_path / "rerank.csv")
    assert fitted.rerank.num_to_rerank == 2


def test_fit_keeps_depth_that_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_module, "measure_pair_seconds", lambda *args, **kwargs: (0.001, 50))
    fitted = fit_num_to_rerank(config(10), TimeBudget(3600.0), write_shortlist(tmp_path / "s.csv", 40), tmp_path,
                               tmp_path, tmp_path / "rerank.csv")
    assert fitted.rerank.num_to_rerank == 10


def test_fit_with_no_time_left_measures_nothing(tmp_path, monkeypatch):
    clock = FakeClock(0.0)
    budget = TimeBudget(10.0, clock=clock)
    clock.now = 11.0
    monkeypatch.setattr(budget_module, "measure_pair_seconds", lambda *args, **kwargs: pytest.fail("measured"))
    fitted = fit_num_to_rerank(config(10), budget, write_shortlist(tmp_path / "s.csv", 3), tmp_path, tmp_path,
                               tmp_path / "rerank.csv")
    assert fitted.rerank.num_to_rerank == 0


@pytest.mark.parametrize(("queries", "configured"), [(0, 10), (3, 0)])
def test_fit_with_nothing_to_rerank_keeps_depth(tmp_path, monkeypatch, queries, configured):
    monkeypatch.setattr(budget_module, "measure_pair_seconds", lambda *args, **kwargs: pytest.fail("measured"))
    fitted = fit_num_to_rerank(config(configured), TimeBudget(60.0), write_shortlist(tmp_path / "s.csv", queries),
                               tmp_path, tmp_path, tmp_path / "rerank.csv")
    assert fitted.rerank.num_to_rerank == configured


@pytest.mark.parametrize(("overwrite", "expected"), [(False, 7), (True, 10)])
def test_fit_resumes_with_the_depth_already_started(tmp_path, monkeypatch, overwrite, expected):
    blocks = tmp_path / "rerank.csv.blocks"
    blocks.mkdir()
    (blocks / "manifest.json").write_text(json.dumps({"settings": {"num_to_rerank": 7}}))
    monkeypatch.setattr(budget_module, "measure_pair_seconds", lambda *args, **kwargs: (0.0001, 10))
    fitted = fit_num_to_rerank(config(10), TimeBudget(3600.0), write_shortlist(tmp_path / "s.csv", 2), tmp_path,
                               tmp_path, tmp_path / "rerank.csv", overwrite=overwrite)
    assert fitted.rerank.num_to_rerank == expected


def test_the_cascade_is_timed_with_the_image_files_its_fallback_reads(tmp_path, monkeypatch):
    write_kaggle(tmp_path / "data", places=2, index_views=1)
    seen = {}
    monkeypatch.setattr(budget_module, "measure_pair_seconds", lambda *args, **kwargs: (0.001, 50))
    monkeypatch.setattr(budget_module, "measure_cascade_seconds",
                        lambda *args, **kwargs: seen.update(kwargs) or (0.0, 1))
    fit_num_to_rerank(config(10, "lighterglue"), TimeBudget(3600.0), write_shortlist(tmp_path / "s.csv", 4), tmp_path,
                      tmp_path, tmp_path / "rerank.csv", images=tmp_path / "data")
    queries, index = seen["paths"]
    assert queries and index and all(Path(p).is_file() for p in [*queries.values(), *index.values()])
    off = config(10, "lighterglue")
    off.rerank.cascade_fallback = ""
    assert budget_module.fallback_paths(off.rerank, tmp_path / "data") == ({}, {})
    assert budget_module.fallback_paths(config(10, "lighterglue").rerank, None) == ({}, {})
