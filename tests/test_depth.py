"""Tests of the rerank's adaptive depth (rerank.first_depth, decided_inliers): the stopping rule,
its settings, one code path for the batch rerank and the Searcher, its record, resume and shards."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
from support.synthetic_stores import DIM, shortlist_frame, write_store
from support.synthetic_stores import place_view as image

from delf_pipeline import rerank
from delf_pipeline.config import (
    DEFAULT_PRESET,
    ConfigError,
    list_presets,
    load_config,
    make_section,
    to_toml,
)
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.verification.verifier import CandidateVerifier, decided, first_round


def config(**rerank_settings):
    conf = load_config(overrides=['rerank.cascade=""'])  # the fast path (the synthetic stores hold no XFeat)
    conf.rerank.update({"scoring": "kaggle2020", "max_inlier_score": 70, **rerank_settings})
    return conf


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("first_depth, candidates, expected", [
    (0, 100, 100),  # off: every candidate
    (20, 100, 20),
    (20, 7, 7),  # fewer candidates than the first round
    (150, 100, 100),  # more than num_to_rerank counts as num_to_rerank
    (1, 0, 0),
])
def test_first_round(first_depth, candidates, expected):
    assert first_round(make_section("rerank", first_depth=first_depth), candidates) == expected


@pytest.mark.parametrize("inliers, expected", [([], False), ([0, 29], False), ([3, 30], True), ([31, 0], True)])
def test_a_query_is_decided_by_its_best_inlier_count(inliers, expected):
    rows = [("q", f"i{n}", 0.5, 40, count, 0.0, "ok") for n, count in enumerate(inliers)]
    assert decided(rows, make_section("rerank", first_depth=2, decided_inliers=30)) is expected


# ---------------------------------------------------------------- one query, counted pairs


@pytest.fixture
def stores(tmp_path: Path) -> dict:
    """One query of place 0; index: 'strong' (35 shared features with it), 'weak' (12), and
    eight images of other places (no match)."""
    index = {"strong": image(0, 35, seed=2, global_seed=2), "weak": image(0, 12, seed=3, global_seed=3)}
    index.update({f"other{n}": image(1 + n % 5, 40, seed=10 + n, global_seed=10 + n) for n in range(8)})
    return {"query": image(0, 50, seed=1, global_seed=1), "queries": {"q0": image(0, 50, seed=1, global_seed=1)},
            "index": write_store(tmp_path / "i", index, 4, local_dim=DIM)}


def counted(conf, stores: dict, candidates: list[tuple[str, float]], monkeypatch) -> tuple[list[tuple], list[str]]:
    """(rows, index ids verified in order) of the query against ``candidates`` by the Searcher's path."""
    worker = CandidateVerifier(None, stores["index"], conf.rerank)
    seen: list[str] = []
    features = worker.index_features

    def spying(image_id):
        seen.append(image_id)
        return features(image_id)

    monkeypatch.setattr(worker, "index_features", spying)
    return worker.rerank_features("q0", stores["query"], candidates), seen


def ranked(first: list[str]) -> list[tuple[str, float]]:
    """Candidates in shortlist order: ``first``, then the other index images; scores descending."""
    rest = [i for i in ["strong", "weak", *(f"other{n}" for n in range(8))] if i not in first]
    return [(i, round(0.9 - 0.05 * n, 2)) for n, i in enumerate(first + rest)]


def test_a_decided_query_verifies_exactly_first_depth_pairs(stores, monkeypatch):
    candidates = ranked(["other0", "strong", "other1"])
    rows, seen = counted(config(first_depth=3, decided_inliers=30), stores, candidates, monkeypatch)
    assert seen == ["other0", "strong", "other1"]
    assert rows[0][1] == "strong" and rows[0][4] >= 30
    full, _ = counted(config(first_depth=0), stores, candidates, monkeypatch)
    assert rows == sorted((r for r in full if r[1] in seen), key=lambda r: (-r[5], r[1]))  # the full run's rows


def test_an_undecided_query_verifies_num_to_rerank_pairs(stores, monkeypatch):
    candidates = ranked(["other0", "weak", "other1"])  # weak: 12 inliers < 30
    rows, seen = counted(config(first_depth=3, decided_inliers=30, num_to_rerank=10), stores, candidates, monkeypatch)
    assert seen == [i for i, _ in candidates] and len(rows) == 10
    full, _ = counted(config(first_depth=0), stores, candidates, monkeypatch)
    assert rows == full  # the same rows as without adaptive depth, in the same order
    assert rows[0][1] == "strong"


def test_inliers_below_min_inliers_do_not_decide(stores, monkeypatch):
    candidates = ranked(["strong", "other0"])
    conf = config(first_depth=2, decided_inliers=30, min_inliers=40)  # strong's ~35 count as 0
    rows, seen = counted(conf, stores, candidates, monkeypatch)
    assert len(seen) == len(candidates) and max(row[4] for row in rows) == 0


def test_off_and_a_first_round_as_deep_as_num_to_rerank_give_the_same_rows(stores, monkeypatch):
    candidates = ranked(["weak", "other3"])
    off, _ = counted(config(first_depth=0), stores, candidates, monkeypatch)
    whole, _ = counted(config(first_depth=10, decided_inliers=1), stores, candidates, monkeypatch)
    assert off == whole and len(off) == 10


# ---------------------------------------------------------------- settings


def test_first_depth_and_decided_inliers_are_checked():
    with pytest.raises(ConfigError, match=r"rerank.first_depth must be an integer in \[0, 100000\], got -1"):
        load_config(overrides=["rerank.first_depth=-1"])
    with pytest.raises(ConfigError, match=r"rerank.decided_inliers must be an integer"):
        load_config(overrides=["rerank.decided_inliers=2.5"])
    deeper = load_config(overrides=["rerank.first_depth=500", "rerank.num_to_rerank=100"])  # clamped, not refused
    assert first_round(deeper.rerank, 100) == 100


def test_decided_inliers_is_marked_unused_when_adaptive_depth_is_off():
    assert "decided_inliers = 30  # [unused: only for rerank.first_depth > 0]" in to_toml(
        load_config("sift_default", overrides=["rerank.decided_inliers=30"]))
    assert "[unused" not in next(line for line in to_toml(load_config(overrides=["rerank.first_depth=5"])).splitlines()
                                 if line.startswith("decided_inliers"))


def test_every_preset_but_the_default_keeps_adaptive_depth_off():
    """The presets other than the default verify num_to_rerank candidates per query, as they did."""
    for name in list_presets():
        if name != DEFAULT_PRESET:
            assert load_config(name).rerank.first_depth == 0, name


# ---------------------------------------------------------------- the stage: log, resume, shards, jobs


NUM_QUERIES = 40


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> dict:
    """NUM_QUERIES queries x 6 candidates; a query of an even number has its place's strong view
    first (decided after 2 with decided_inliers 30), an odd one only other places first."""
    root = tmp_path_factory.mktemp("depth")
    index = {f"p{p}s": image(p, 40, seed=p, global_seed=p) for p in range(4)}
    index.update({f"p{p}w": image(p, 10, seed=20 + p, global_seed=20 + p) for p in range(4)})
    queries = {f"q{n:03d}": image(n % 4, 50, seed=100 + n, global_seed=100 + n) for n in range(NUM_QUERIES)}
    candidates = {}
    for n, query_id in enumerate(queries):
        place, others = n % 4, [f"p{(n + k) % 4}s" for k in (1, 2)]
        order = [f"p{place}s", others[0], others[1], f"p{place}w"] if n % 2 == 0 else \
            [others[0], others[1], f"p{place}w", f"p{place}s"]
        order += [f"p{(n + 3) % 4}w", f"p{(n + 3) % 4}s"]
        candidates[query_id] = [(i, round(0.9 - 0.1 * k, 2)) for k, i in enumerate(order)]
    shortlist_frame(candidates).to_csv(root / "shortlist.csv", index=False)
    return {"root": root, "shortlist": root / "shortlist.csv",
            "queries": write_store(root / "q", queries, 16, local_dim=DIM),
            "index": write_store(root / "i", index, 5, local_dim=DIM)}


def adaptive():
    return config(first_depth=2, decided_inliers=30)


def stage(many, out: Path, conf=None, **kwargs) -> Path:
    return rerank.run(conf or adaptive(), many["shortlist"], many["queries"], many["index"], out, **kwargs)


@pytest.fixture(scope="module")
def reference(many) -> bytes:
    return stage(many, many["root"] / "reference.csv").read_bytes()


def test_the_rerank_csv_records_each_querys_depth_and_the_log_sums_them(many, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="delf_pipeline"):
        out = stage(many, tmp_path / "rerank.csv")
    depths = read_table(out).groupby("query_id").size()
    assert depths.to_dict() == {f"q{n:03d}": 2 if n % 2 == 0 else 6 for n in range(NUM_QUERIES)}
    assert f"adaptive depth: {NUM_QUERIES // 2} of {NUM_QUERIES} queries decided by their first 2 candidates " \
           "(>= 30 inliers), 4.0 pairs per query" in caplog.text
    full = read_table(stage(many, tmp_path / "full.csv", config()))
    kept = full.merge(read_table(out)[["query_id", "index_id"]])  # the full run's rows of the pairs verified
    pd.testing.assert_frame_equal(kept, read_table(out))


def test_adaptive_runs_resume_and_shard_to_identical_bytes(many, reference, tmp_path, caplog):
    out = tmp_path / "rerank.csv"
    stage(many, out, shard=(2, 2))
    assert not out.exists()
    stage(many, out, shard=(1, 2))
    assert out.read_bytes() == reference
    with caplog.at_level(logging.INFO, logger="delf_pipeline"):
        assert stage(many, out).read_bytes() == reference
    assert "Skipping rerank.csv" in caplog.text


def test_adaptive_depth_with_two_joblib_workers_equals_one_process(many, reference, tmp_path):
    assert stage(many, tmp_path / "rerank.csv", jobs=2).read_bytes() == reference


def test_changing_the_rule_is_another_rerank_output(many, reference, tmp_path):
    assert "first_depth" in rerank.rerank_manifest(adaptive().rerank, read_table(many["shortlist"]))["settings"]
    other = stage(many, tmp_path / "rerank.csv", config(first_depth=2, decided_inliers=100))
    assert other.read_bytes() != reference  # every query undecided: 6 pairs each
    assert len(read_table(other)) == 6 * NUM_QUERIES
