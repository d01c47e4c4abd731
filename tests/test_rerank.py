"""Tests of delf_pipeline.rerank: scoring, empty inputs, resume after a kill, joblib, Dask, shards, cache."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from support.synthetic_stores import (
    DIM,
    global_only,
    local_features,
    random_unit_rows,
    shortlist_frame,
    write_store,
)
from support.synthetic_stores import place_view as image

from delf_pipeline import rerank
from delf_pipeline.config import load_config, make_section
from delf_pipeline.formats.blocks import blocks_dir, read_table
from delf_pipeline.formats.store import FeatureStore
from delf_pipeline.verification import verifier

REPO = Path(__file__).resolve().parents[1]
FAST_PATH = ['rerank.cascade=""']  # no cascade: its lighterglue stage needs XFeat features

def config(**rerank_settings) -> dict:
    conf = load_config(overrides=FAST_PATH)  # the default's fast path: the synthetic stores hold no XFeat
    conf.rerank.update(rerank_settings)
    return conf


def run_rerank(tmp_path: Path, queries: dict, index: dict, candidates: dict, conf: dict, **kwargs) -> pd.DataFrame:
    """Write the stores and shortlist, rerank, and return the rerank table."""
    qstore = write_store(tmp_path / "q", queries, part_size=4, local_dim=DIM)
    istore = write_store(tmp_path / "i", index, part_size=4, local_dim=DIM)
    shortlist_frame(candidates).to_csv(tmp_path / "shortlist.csv", index=False)
    return read_table(rerank.run(conf, tmp_path / "shortlist.csv", qstore, istore, tmp_path / "rerank.csv", **kwargs))


# ---------------------------------------------------------------- scores


@pytest.mark.parametrize("scoring, inliers, global_score, cap, expected", [
    ("official", 12, 0.5, 70, 12.25),
    ("official", 0, -0.4, 70, -0.2),
    ("kaggle2020", 35, 0.4, 70, 0.9),
    ("kaggle2020", 100, 0.4, 70, 1.4),  # capped: min(100, 70) / 70 = 1
    ("kaggle2020", 0, 0.25, 30, 0.25),
    ("kaggle2020", 15, -0.1, 30, 0.4),
])
def test_final_score_golden_values(scoring, inliers, global_score, cap, expected):
    conf = make_section("rerank", scoring=scoring, max_inlier_score=cap)
    assert verifier.final_score(inliers, global_score, conf) == pytest.approx(expected)


def test_unknown_scoring_is_refused():
    with pytest.raises(ValueError, match="unknown rerank.scoring 'best'; use official or kaggle2020"):
        verifier.final_score(3, 0.5, SimpleNamespace(scoring="best", max_inlier_score=70))


def test_official_score_orders_by_inliers_then_global_score():
    rng = np.random.default_rng(0)
    inliers = rng.integers(0, 30, 2000)
    global_scores = rng.uniform(-0.999, 0.999, 2000)
    scores = [verifier.final_score(int(n), g, make_section("rerank", scoring="official")) for n, g in zip(inliers, global_scores)]
    assert np.array_equal(np.argsort(scores, kind="stable"), np.lexsort((global_scores, inliers)))


# ---------------------------------------------------------------- one small run, by hand


def test_candidates_are_verified_and_sorted_by_score(tmp_path):
    queries = {"q0": image(0, 40, seed=1, global_seed=1)}
    index = {"a": image(0, 12, seed=2, global_seed=2), "b": image(0, 30, seed=3, global_seed=3),
             "c": image(1, 40, seed=4, global_seed=4), "d": image(0, 3, seed=5, global_seed=5)}
    cands = {"q0": [("c", 0.9), ("a", 0.8), ("d", 0.7), ("b", 0.1)]}
    table = run_rerank(tmp_path, queries, index, cands, config(scoring="kaggle2020", max_inlier_score=20))
    assert list(table.columns) == list(rerank.COLUMNS)
    assert table["index_id"].tolist() == ["a", "b", "c", "d"]  # 12/20 + 0.8 > 20/20 + 0.1 > 0.9 > 0.7
    assert table["inliers"].tolist() == [12, 30, 0, 0]
    assert table["status"].tolist() == ["ok", "ok", "too_few_matches", "too_few_matches"]
    assert table["matches"].tolist()[2:] == [0, 3]  # another place: nothing; 3 shared < min_matches 5
    assert np.allclose(table["score"], [1.4, 1.1, 0.9, 0.7])
    assert np.allclose(table["global_score"], [0.8, 0.1, 0.9, 0.7])


def test_official_scoring_ranks_by_inliers_then_global(tmp_path):
    queries = {"q0": image(2, 40, seed=1, global_seed=1)}
    index = {name: image(2, shared, seed=10 + i, global_seed=i) for i, (name, shared) in
             enumerate([("a", 20), ("b", 20), ("c", 35), ("e", 0)])}
    cands = {"q0": [("a", 0.3), ("b", 0.6), ("c", 0.2), ("e", 0.95)]}
    table = run_rerank(tmp_path, queries, index, cands, config(scoring="official"))
    assert table["index_id"].tolist() == ["c", "b", "a", "e"]
    assert table["inliers"].tolist() == [35, 20, 20, 0]
    assert np.allclose(table["score"], [35.1, 20.3, 20.15, 0.475])


@pytest.mark.parametrize("min_inliers, expected", [(0, [25, 8]), (8, [25, 8]), (9, [25, 0]), (26, [0, 0])])
def test_min_inliers_zeroes_smaller_counts(tmp_path, min_inliers, expected):
    queries = {"q0": image(3, 40, seed=1, global_seed=1)}
    index = {"a": image(3, 25, seed=2, global_seed=2), "b": image(3, 8, seed=3, global_seed=3)}
    table = run_rerank(tmp_path, queries, index, {"q0": [("a", 0.5), ("b", 0.4)]},
                       config(scoring="kaggle2020", max_inlier_score=30, min_inliers=min_inliers))
    by_id = table.set_index("index_id")
    assert [by_id.loc[i, "inliers"] for i in "ab"] == expected
    assert [by_id.loc[i, "matches"] for i in "ab"] == [25, 8]  # the matches are still reported
    assert np.allclose([by_id.loc[i, "score"] for i in "ab"], [n / 30 + g for n, g in zip(expected, [0.5, 0.4])])


# ---------------------------------------------------------------- empty inputs


def no_features(global_seed: int, dim: int = DIM):
    return local_features(np.zeros((0, 2)), np.zeros((0, dim)), random_unit_rows(1, 8, global_seed)[0])


@pytest.mark.parametrize("query_features, candidate_features", [(0, 40), (40, 0), (0, 0)])
def test_no_features_on_either_side_gives_zero(tmp_path, query_features, candidate_features):
    make = lambda n, seed: image(4, n, seed, seed, extra=0) if n else no_features(seed)  # noqa: E731
    table = run_rerank(tmp_path, {"q0": make(query_features, 1)}, {"a": make(candidate_features, 2)},
                       {"q0": [("a", 0.25)]}, config(scoring="official"))
    assert table[["matches", "inliers"]].values.tolist() == [[0, 0]]
    assert table["status"].tolist() == ["too_few_matches"]
    assert table["score"].tolist() == [0.125]


def test_a_part_of_featureless_images_does_not_stop_the_run(tmp_path):
    # extract stores descriptors [0, 0] when no image of a part has a feature
    qstore = write_store(tmp_path / "q", {"q0": image(5, 40, seed=1, global_seed=1)}, 4, local_dim=DIM)
    istore = write_store(tmp_path / "i", {"blank": global_only(random_unit_rows(1, 8, 2)[0])}, 4, local_dim=0)
    assert FeatureStore(istore).features("blank").descriptors.shape == (0, 0)
    shortlist_frame({"q0": [("blank", 0.5)]}).to_csv(tmp_path / "s.csv", index=False)
    table = read_table(rerank.run(config(), tmp_path / "s.csv", qstore, istore, tmp_path / "r.csv"))
    assert table[["index_id", "matches", "inliers", "status"]].values.tolist() == [["blank", 0, 0, "too_few_matches"]]


def test_header_only_shortlist_gives_header_only_output(tmp_path):
    qstore = write_store(tmp_path / "q", {"q0": image(0, 10, 1, 1)}, 4, local_dim=DIM)
    istore = write_store(tmp_path / "i", {}, 4, local_dim=DIM)
    shortlist_frame({}).to_csv(tmp_path / "s.csv", index=False)
    out = rerank.run(config(), tmp_path / "s.csv", qstore, istore, tmp_path / "r.csv")
    assert out.read_text().strip() == ",".join(rerank.COLUMNS)


def test_a_query_without_candidates_has_no_rows(tmp_path):
    queries = {"q0": image(0, 40, 1, 1), "q1": image(1, 40, 2, 2)}
    table = run_rerank(tmp_path, queries, {"a": image(0, 30, 3, 3)}, {"q0": [("a", 0.5)]}, config())
    assert table["query_id"].tolist() == ["q0"]


# ---------------------------------------------------------------- many blocks: resume, jobs, Dask, shards


NUM_QUERIES, NUM_INDEX = 100, 12  # 100 queries: blocks of 32, 32, 32 and 4


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> dict[str, Path]:
    """Stores and a shortlist of NUM_QUERIES queries x 3 candidates over NUM_INDEX index images (6 places)."""
    root = tmp_path_factory.mktemp("many")
    index = {f"i{n:02d}": image(n % 6, 20 + n, seed=n, global_seed=n) for n in range(NUM_INDEX)}
    queries = {f"q{n:03d}": image(n % 6, 15 + n % 25, seed=100 + n, global_seed=100 + n) for n in range(NUM_QUERIES)}
    rng = np.random.default_rng(0)
    candidates = {}
    for n, query_id in enumerate(queries):  # both views of the query's place and one of another place
        other = (n % 6 + rng.integers(1, 6)) % 6 + 6 * rng.integers(0, 2)
        scores = np.round(np.sort(rng.uniform(0, 1, 3))[::-1], 4)
        candidates[query_id] = list(zip([f"i{n % 6:02d}", f"i{n % 6 + 6:02d}", f"i{other:02d}"], scores))
    shortlist_frame(candidates).to_csv(root / "shortlist.csv", index=False)
    return {"root": root, "shortlist": root / "shortlist.csv",
            "queries": write_store(root / "q", queries, 16, local_dim=DIM),
            "index": write_store(root / "i", index, 5, local_dim=DIM)}


@pytest.fixture(scope="module")
def reference(many) -> bytes:
    """The uninterrupted single-process output."""
    out = many["root"] / "reference.csv"
    rerank.run(config(), many["shortlist"], many["queries"], many["index"], out)
    return out.read_bytes()


def stage_args(many, out: Path) -> tuple:
    return (config(), many["shortlist"], many["queries"], many["index"], out)


def test_reference_run_has_every_pair_once(many, reference):
    table = read_table(many["root"] / "reference.csv")
    assert len(table) == 3 * NUM_QUERIES
    assert table["query_id"].nunique() == NUM_QUERIES and not table.duplicated(["query_id", "index_id"]).any()
    assert table["query_id"].is_monotonic_increasing
    assert (table["inliers"] > 0).sum() == 2 * NUM_QUERIES  # the two views of each query's place
    assert len(list(blocks_dir(many["root"] / "reference.csv").glob("block-*.csv"))) == 4


@pytest.mark.slow
def test_killed_rerank_resumes_to_identical_output(many, reference, tmp_path):
    out = tmp_path / "rerank.csv"
    # the official skimage RANSAC (100 trials) makes a block slow enough to kill the run after the first one
    args = [sys.executable, "-m", "delf_pipeline", "rerank", "--shortlist", str(many["shortlist"]),
            "--queries", str(many["queries"]), "--index", str(many["index"]), "--out", str(out),
            "--set", "rerank.verifier=skimage_affine", "--set", "rerank.max_trials=100", "--set", *FAST_PATH]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(blocks_dir(out).glob("block-*.csv")):
        assert process.poll() is None and time.monotonic() < deadline, "rerank ended before writing a block"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(blocks_dir(out).glob("block-*.csv")))
    assert 1 <= done < 4 and not out.exists(), "the kill came too late to test resuming"
    resumed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    conf = config(verifier="skimage_affine", max_trials=100)
    whole = rerank.run(conf, many["shortlist"], many["queries"], many["index"], tmp_path / "whole.csv")
    assert out.read_bytes() == whole.read_bytes()


def test_rerun_skips_finished_blocks(many, reference, caplog):
    with caplog.at_level(logging.INFO, logger="delf_pipeline"):
        out = rerank.run(*stage_args(many, many["root"] / "reference.csv"))
    assert "Skipping reference.csv" in caplog.text
    assert out.read_bytes() == reference


def test_two_joblib_workers_equal_one_process(many, reference, tmp_path):
    out = rerank.run(*stage_args(many, tmp_path / "rerank.csv"), jobs=2)
    assert out.read_bytes() == reference


def test_shards_equal_one_run(many, reference, tmp_path):
    out = tmp_path / "rerank.csv"
    rerank.run(*stage_args(many, out), shard=(2, 2))
    assert not out.exists()
    assert sorted(p.name for p in blocks_dir(out).glob("block-*.csv")) == ["block-000001.csv", "block-000003.csv"]
    rerank.run(*stage_args(many, out), shard=(1, 2))
    assert out.read_bytes() == reference


@pytest.mark.slow
def test_dask_cluster_equals_the_local_run(many, reference, tmp_path):
    distributed = pytest.importorskip("dask.distributed", reason="the Dask run needs dask[distributed] (test extra)")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        out = rerank.run(*stage_args(many, tmp_path / "rerank.csv"), dask_address=cluster.scheduler_address)
    assert out.read_bytes() == reference


def test_index_features_are_read_once_per_worker(many, tmp_path, monkeypatch):
    calls: list[tuple[str, str]] = []
    read = FeatureStore.features

    def counting(store, image_id):
        calls.append((store.path.name, image_id))
        return read(store, image_id)

    monkeypatch.setattr(FeatureStore, "features", counting)
    rerank.run(*stage_args(many, tmp_path / "rerank.csv"))
    index_reads = [i for store, i in calls if store == "i"]
    shortlisted = read_table(many["shortlist"])["index_id"]
    assert len(shortlisted) == 3 * NUM_QUERIES
    assert sorted(index_reads) == sorted(shortlisted.unique())
    assert sorted(i for store, i in calls if store == "q") == [f"q{n:03d}" for n in range(NUM_QUERIES)]


def test_mapped_pages_are_released_every_release_every_candidates(many, tmp_path, monkeypatch):
    """Resident memory is bounded by a count of reads: with RELEASE_EVERY = 7 and 3 candidates
    per query, both stores are released after every third query (9 reads), and results are the same."""
    released: list[str] = []
    monkeypatch.setattr(verifier, "RELEASE_EVERY", 7)
    monkeypatch.setattr(FeatureStore, "release", lambda store: released.append(store.path.name))
    out = rerank.run(*stage_args(many, tmp_path / "rerank.csv"))
    assert len(released) == 2 * (NUM_QUERIES // 3)
    assert set(released) == {"q", "i"}
    assert out.read_bytes() == (many["root"] / "reference.csv").read_bytes()


def test_global_only_index_is_a_clear_error(tmp_path):
    vectors = random_unit_rows(2, 8, seed=3)
    index = write_store(tmp_path / "index", {"a": global_only(vectors[0])}, 4,
                        extract_settings={"local_features": False})
    queries = write_store(tmp_path / "queries", {"q": global_only(vectors[1])}, 4)
    shortlist_frame({"q": [("a", 0.5)]}).to_csv(tmp_path / "shortlist.csv", index=False)
    with pytest.raises(ValueError, match="holds global descriptors only. Extract the shortlisted candidates"):
        rerank.run(load_config(overrides=FAST_PATH), tmp_path / "shortlist.csv", queries, index,
                   tmp_path / "rerank.csv")


# ---------------------------------------------------------------- learned matcher


def xfeat_stores(tmp_path: Path, queries: dict, index: dict) -> tuple[Path, Path]:
    settings = {"backend": "xfeat"}
    return (write_store(tmp_path / "q", queries, 4, local_dim=DIM, extract_settings=settings),
            write_store(tmp_path / "i", index, 4, local_dim=DIM, extract_settings=settings))


def test_lighterglue_matches_go_to_the_same_verifier(tmp_path, xfeat_weights_file):
    from delf_pipeline.verification.lighterglue import load_xfeat_lighterglue
    from delf_pipeline.verification.pairs import verify_matches, verify_options

    queries = {"q0": image(0, 40, seed=1, global_seed=1)}
    index = {"a": image(0, 30, seed=2, global_seed=2), "b": image(1, 40, seed=3, global_seed=3)}
    qstore, istore = xfeat_stores(tmp_path, queries, index)
    conf = config(matcher="lighterglue").rerank
    rows = verifier.CandidateVerifier(str(qstore), str(istore), conf).rerank_query("q0", [("a", 0.5), ("b", 0.4)])
    glue = load_xfeat_lighterglue()
    for _, index_id, _, matches, inliers, _, status in rows:
        q, c = queries["q0"], index[index_id]
        pairs = glue.match_stored(q.locations, q.descriptors, (480, 640), c.locations, c.descriptors, (480, 640))
        expected = verify_matches(q.locations, c.locations, pairs, **verify_options(conf))
        assert (matches, inliers, status) == (expected.matches, expected.inliers, expected.status)
    assert [(row[1], row[4] > 0) for row in rows] == [("a", True), ("b", False)]  # only the same place verifies


def test_lighterglue_on_other_local_features_is_a_clear_error(tmp_path):
    view = image(0, 10, seed=1, global_seed=1)
    qstore = write_store(tmp_path / "q", {"q": view}, 4, local_dim=DIM, extract_settings={"backend": "rootsift"})
    with pytest.raises(ValueError, match="matches 64-d XFeat local features; .* holds 'rootsift' ones"):
        verifier.CandidateVerifier(str(qstore), str(qstore), config(matcher="lighterglue").rerank)


def test_lighterglue_needs_both_sizes(tmp_path, xfeat_weights_file):
    qstore, istore = xfeat_stores(tmp_path, {"q": image(0, 10, seed=1, global_seed=1)}, {})
    worker = verifier.CandidateVerifier(None, str(qstore), config(matcher="lighterglue").rerank)
    view = worker.index_features("q")
    with pytest.raises(ValueError, match="needs the original \\(height, width\\) of both images"):
        worker.verify(view, view)


def test_lighterglue_weights_come_from_the_stores_xfeat_folder(tmp_path):
    settings = {"backend": "xfeat", "xfeat_weights": str(tmp_path / "bundle")}  # as a Kaggle bundle sets it
    store = write_store(tmp_path / "i", {"a": image(0, 10, seed=1, global_seed=1)}, 4, local_dim=DIM,
                        extract_settings=settings)
    with pytest.raises(FileNotFoundError, match="bundle/xfeat-lighterglue.pt is missing"):
        verifier.CandidateVerifier(None, str(store), config(matcher="lighterglue").rerank)
