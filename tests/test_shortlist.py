"""Tests of delf_pipeline.shortlist: exact chunked top-K against brute force, ties, sharding, resume."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from support.synthetic_stores import global_only, random_unit_rows, write_store

from delf_pipeline import shortlist
from delf_pipeline.cli import main as cli_main
from delf_pipeline.config import load_config
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.formats.store import FeatureStore
from delf_pipeline.retrieval import search

GLOBAL = 16
CPU = search.select_matmul("cpu")


def store_of(path, vectors: np.ndarray, part_size: int, prefix: str = "i", **kwargs) -> FeatureStore:
    """A store of global descriptors ``vectors`` [M, G] with ids prefix000, prefix001, ..."""
    images = {f"{prefix}{row:03d}": global_only(vector) for row, vector in enumerate(vectors)}
    return FeatureStore(write_store(path, images, part_size, **kwargs))


def brute_force(queries: np.ndarray, index: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-K: full product, sorted by score descending then row ascending."""
    scores = queries @ index.T
    rows = np.arange(index.shape[0])
    order = np.stack([np.lexsort((rows, -s)) for s in scores])[:, :top_k]
    return order, np.take_along_axis(scores, order, 1)


def config(**shortlist_settings) -> dict:
    conf = load_config()
    conf.shortlist.update({"device": "cpu", **shortlist_settings})
    return conf


# ---------------------------------------------------------------- top_k_search


@pytest.mark.parametrize("part_size, chunk_rows, top_k", [
    (7, 5, 1), (7, 5, 10), (10, 16, 3), (53, 4096, 10), (3, 2, 53), (11, 8, 80),
])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_top_k_equals_brute_force_across_chunks_and_parts(tmp_path, part_size, chunk_rows, top_k, dtype):
    vectors = random_unit_rows(53, GLOBAL, seed=1)
    index = store_of(tmp_path, vectors, part_size, dtype=dtype)
    queries = random_unit_rows(9, GLOBAL, seed=2)
    ids, rows, scores = search.top_k_search(queries, index, top_k, chunk_rows, CPU)
    expected_rows, expected_scores = brute_force(queries, index.global_matrix(), top_k)
    assert ids == index.ids
    assert rows.shape == scores.shape == (9, min(top_k, 53))
    assert np.array_equal(rows, expected_rows)
    assert np.allclose(scores, expected_scores, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [3, 7, 64])
@pytest.mark.parametrize("top_k", [1, 5, 12])
def test_ties_are_ordered_by_row(tmp_path, chunk_rows, top_k):
    # entries in {0, +-0.5}: every inner product is exact, so equal rows tie exactly
    rng = np.random.default_rng(3)
    distinct = rng.choice([-0.5, 0.0, 0.5], size=(4, GLOBAL)).astype(np.float32)
    vectors = distinct[rng.integers(0, 4, size=60)]
    index = store_of(tmp_path, vectors, part_size=9)
    queries = np.vstack([distinct, np.zeros((1, GLOBAL), np.float32)])  # the zero query ties with everything
    _, rows, scores = search.top_k_search(queries, index, top_k, chunk_rows, CPU)
    expected_rows, expected_scores = brute_force(queries, vectors, top_k)
    assert np.array_equal(scores, expected_scores)
    assert np.array_equal(rows, expected_rows)
    assert np.array_equal(rows[-1], np.arange(top_k))


@pytest.mark.parametrize("direction", [1, -1])
def test_every_chunk_better_or_worse_than_the_last(tmp_path, direction):
    # index sorted by similarity to the queries: each chunk displaces all (or none) of the running top-K
    queries = random_unit_rows(3, GLOBAL, seed=10)
    vectors = random_unit_rows(70, GLOBAL, seed=11)
    vectors = vectors[np.argsort(direction * (vectors @ queries.sum(axis=0)))]
    index = store_of(tmp_path, vectors, part_size=8)
    _, rows, scores = search.top_k_search(queries, index, 6, 5, CPU)
    expected_rows, expected_scores = brute_force(queries, vectors, 6)
    assert np.array_equal(rows, expected_rows)
    assert np.allclose(scores, expected_scores, atol=1e-6)


def test_hand_worked_top_2():
    class Index:  # the one method top_k_search uses
        def iter_global(self, chunk_rows):
            matrix = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], np.float32)
            for start in range(0, 4, chunk_rows):
                yield ["a", "b", "c", "d"][start : start + chunk_rows], matrix[start : start + chunk_rows]

    queries = np.array([[1, 0], [0, -1]], np.float32)
    ids, rows, scores = search.top_k_search(queries, Index(), 2, 1, CPU)
    assert ids == ["a", "b", "c", "d"]
    assert rows.tolist() == [[0, 2], [0, 3]]  # query 2 scores 0, -1, -0.8, 0: the tie a/d goes to a
    assert np.allclose(scores, [[1.0, 0.6], [0.0, 0.0]])


def test_empty_index_gives_no_candidates(tmp_path):
    index = store_of(tmp_path, np.zeros((0, GLOBAL), np.float32), part_size=4)
    ids, rows, scores = search.top_k_search(random_unit_rows(3, GLOBAL, 0), index, 5, 4, CPU)
    assert ids == [] and rows.shape == scores.shape == (3, 0)


def test_gpu_device_path_gives_the_cpu_result(tmp_path):
    pytest.importorskip("tensorflow", reason="the gpu device path runs the products in TensorFlow")
    index = store_of(tmp_path, random_unit_rows(40, GLOBAL, seed=4), part_size=16, dtype="float16")
    queries = random_unit_rows(6, GLOBAL, seed=5)
    _, cpu_rows, cpu_scores = search.top_k_search(queries, index, 7, 9, CPU)
    _, gpu_rows, gpu_scores = search.top_k_search(queries, index, 7, 9, search.select_matmul("gpu"))
    assert np.array_equal(gpu_rows, cpu_rows)
    assert np.allclose(gpu_scores, cpu_scores, atol=1e-5)


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="shortlist.device must be auto, cpu or gpu, got 'tpu'"):
        search.select_matmul("tpu")


# ---------------------------------------------------------------- the stage


@pytest.fixture
def stores(tmp_path):
    """(index store with 30 images, query store with 21 images) in parts of 4 and 5."""
    index = store_of(tmp_path / "index", random_unit_rows(30, GLOBAL, seed=6), part_size=4)
    queries = store_of(tmp_path / "queries", random_unit_rows(21, GLOBAL, seed=7), part_size=5, prefix="q")
    return index.path, queries.path


def test_stage_writes_ranked_rows_of_brute_force(stores, tmp_path):
    out = shortlist.run(config(top_k=4), *stores, tmp_path / "shortlist.csv")
    table = read_table(out)
    assert list(table.columns) == list(shortlist.COLUMNS)
    index, queries = FeatureStore(stores[0]), FeatureStore(stores[1])
    expected_rows, expected_scores = brute_force(queries.global_matrix(), index.global_matrix(), 4)
    assert table["query_id"].tolist() == [q for q in queries.ids for _ in range(4)]
    assert table["index_id"].tolist() == [index.ids[r] for r in expected_rows.reshape(-1)]
    assert table["rank"].tolist() == [1, 2, 3, 4] * 21
    assert np.allclose(table["score"], expected_scores.reshape(-1), atol=1e-6)


def test_more_wanted_than_index_images_gives_all_of_them(stores, tmp_path):
    table = read_table(shortlist.run(config(top_k=100), *stores, tmp_path / "shortlist.csv"))
    assert table.groupby("query_id").size().eq(30).all()
    assert table.groupby("query_id")["rank"].apply(list).map(lambda ranks: ranks == list(range(1, 31))).all()


def test_leave_one_out_never_shortlists_the_query_itself(stores, tmp_path):
    index = stores[0]
    table = read_table(shortlist.run(config(top_k=5, exclude_same_id=True), index, index, tmp_path / "loo.csv"))
    assert not (table["query_id"] == table["index_id"]).any()
    vectors = FeatureStore(index).global_matrix()
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    ids = FeatureStore(index).ids
    assert table["index_id"].tolist() == [ids[r] for r in expected.reshape(-1)]
    assert table["rank"].tolist() == [1, 2, 3, 4, 5] * 30


def test_shards_give_the_unsharded_csv_byte_for_byte(stores, tmp_path, monkeypatch):
    monkeypatch.setattr(shortlist, "QUERY_BLOCK", 4)  # 21 queries: 6 blocks, 3 per shard
    args = ["shortlist", "--index", str(stores[0]), "--queries", str(stores[1]), "--set", "shortlist.top_k=3",
            "--set", 'shortlist.device="cpu"']
    assert cli_main([*args, "--out", str(tmp_path / "whole.csv")]) == 0
    sharded = tmp_path / "sharded.csv"
    assert cli_main([*args, "--out", str(sharded), "--shard", "1/2"]) == 0
    assert not sharded.exists(), "merged before shard 2/2 ran"
    assert len(list((tmp_path / "sharded.csv.blocks").glob("block-*.csv"))) == 3
    assert cli_main([*args, "--out", str(sharded), "--shard", "2/2"]) == 0
    assert sharded.read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_group_blocks_fills_passes_with_whole_blocks():
    blocks = [(0, ["a"] * 3), (2, ["b"] * 3), (4, ["c"] * 2), (6, ["d"] * 7)]
    assert [[n for n, _ in group] for group in shortlist.group_blocks(blocks, 6)] == [[0, 2], [4], [6]]
    assert shortlist.group_blocks([], 6) == []


def test_blocks_sharing_a_pass_give_the_same_bytes(stores, tmp_path, monkeypatch):
    monkeypatch.setattr(shortlist, "QUERY_BLOCK", 4)
    together = shortlist.run(config(top_k=5), *stores, tmp_path / "together.csv")
    monkeypatch.setattr(shortlist, "PASS_QUERIES", 4)  # one block per pass over the index
    alone = shortlist.run(config(top_k=5), *stores, tmp_path / "alone.csv")
    assert together.read_bytes() == alone.read_bytes()


@pytest.mark.parametrize("what", ["codebook", "settings"])
def test_different_global_spaces_are_refused(stores, tmp_path, what):
    index_path, query_path = stores
    if what == "codebook":  # rootsift stores whose VLAD codebooks differ
        np.save(index_path / "codebook.npy", random_unit_rows(4, 128, seed=8))
        np.save(query_path / "codebook.npy", random_unit_rows(4, 128, seed=9))
    else:
        queries = {f"q{i}": global_only(v) for i, v in enumerate(random_unit_rows(3, GLOBAL, 9))}
        query_path = write_store(tmp_path / "other", queries, 2, extract_settings={"vlad_words": 64})
    with pytest.raises(ValueError, match="hold different global descriptors .*--codebook"):
        shortlist.run(config(), index_path, query_path, tmp_path / "shortlist.csv")


def test_same_codebook_is_accepted(stores, tmp_path):
    words = random_unit_rows(4, 128, seed=8)
    for store in stores:
        np.save(store / "codebook.npy", words)
    assert shortlist.run(config(top_k=2), *stores, tmp_path / "shortlist.csv").exists()


def test_rerun_skips_and_keeps_the_output(stores, tmp_path, monkeypatch, caplog):
    out = shortlist.run(config(top_k=3), *stores, tmp_path / "shortlist.csv")
    first = out.read_bytes()

    def fail(*args, **kwargs):
        raise AssertionError("a finished block was computed again")

    monkeypatch.setattr(shortlist, "shortlist_blocks", fail)
    with caplog.at_level(logging.INFO, logger="delf_pipeline"):
        shortlist.run(config(top_k=3), *stores, out)
    assert "Skipping shortlist.csv" in caplog.text
    assert out.read_bytes() == first


def test_other_settings_need_overwrite(stores, tmp_path):
    out = shortlist.run(config(top_k=3), *stores, tmp_path / "shortlist.csv")
    with pytest.raises(ValueError, match="top_k: was 3, now 5"):
        shortlist.run(config(top_k=5), *stores, out)
    shortlist.run(config(top_k=5), *stores, out, overwrite=True)
    assert read_table(out)["rank"].max() == 5


def test_no_queries_give_a_header_only_csv(stores, tmp_path):
    empty = store_of(tmp_path / "none", np.zeros((0, GLOBAL), np.float32), part_size=4, prefix="q")
    out = shortlist.run(config(), stores[0], empty.path, tmp_path / "shortlist.csv")
    assert out.read_text().strip() == ",".join(shortlist.COLUMNS)
    assert read_table(out).empty and isinstance(read_table(out), pd.DataFrame)


def test_dask_cluster_writes_the_local_csv_byte_for_byte_and_resumes(stores, tmp_path, monkeypatch):
    distributed = pytest.importorskip("dask.distributed", reason="the Dask run needs dask[distributed] (test extra)")
    monkeypatch.setattr(shortlist, "QUERY_BLOCK", 4)
    monkeypatch.setattr(shortlist, "PASS_QUERIES", 8)  # 6 blocks in 3 passes: 3 tasks
    local = shortlist.run(config(top_k=5), *stores, tmp_path / "local.csv")
    resumed = tmp_path / "resumed.csv"
    shortlist.run(config(top_k=5), *stores, resumed, shard=(2, 2))  # blocks 1, 3, 5 done before
    leftover = tmp_path / "resumed.csv.blocks" / ".block-000002.csv.abc.tmp"  # as a killed worker leaves it
    leftover.write_text("query_id,ind")
    args = ["shortlist", "--index", str(stores[0]), "--queries", str(stores[1]), "--set", "shortlist.top_k=5",
            "--set", 'shortlist.device="cpu"']
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        on_dask = shortlist.run(config(top_k=5), *stores, tmp_path / "dask.csv",
                                dask_address=cluster.scheduler_address)
        assert cli_main([*args, "--out", str(resumed), "--dask", cluster.scheduler_address]) == 0
    assert on_dask.read_bytes() == local.read_bytes()
    assert resumed.read_bytes() == local.read_bytes() and not leftover.exists()
