"""Shortlist with whitening, DBA and query expansion: the stage against the same maths done by hand."""
from __future__ import annotations

import numpy as np
import pytest
from support.synthetic_stores import global_only, write_store

from delf_pipeline import shortlist
from delf_pipeline.config import load_config
from delf_pipeline.descriptors import derived
from delf_pipeline.descriptors.expansion import augment_database, expand_queries, supervised_dba
from delf_pipeline.descriptors.superglobal import rescore
from delf_pipeline.descriptors.whitening import learn_pca_whitening, learn_supervised_whitening
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.formats.store import FeatureStore
from delf_pipeline.retrieval import search

GLOBAL = 8


def store_of(path, vectors, prefix="i", part_size=4) -> FeatureStore:
    images = {f"{prefix}{row:03d}": global_only(vector) for row, vector in enumerate(vectors)}
    return FeatureStore(write_store(path, images, part_size))


def config(**settings) -> dict:
    conf = load_config()
    conf.shortlist.update({"device": "cpu", "chunk_rows": 7, **settings})
    return conf


@pytest.fixture
def stores(tmp_path):
    """Index of 24 images in 6 classes (4 each, clustered), 9 queries."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((6, GLOBAL))
    index = centres.repeat(4, axis=0) + 0.6 * rng.standard_normal((24, GLOBAL))
    queries = centres[rng.integers(0, 6, 9)] + 0.6 * rng.standard_normal((9, GLOBAL))
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    return store_of(tmp_path / "index", unit(index)), store_of(tmp_path / "queries", unit(queries), "q")


LABELS = {f"i{row:03d}": f"class{row // 4}" for row in range(24)}


def brute_force(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ index.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)


def assert_table_is(table, query_ids, index_ids, rows, scores):
    k = rows.shape[1]
    assert table["query_id"].tolist() == [q for q in query_ids for _ in range(k)]
    assert table["index_id"].tolist() == [index_ids[r] for r in rows.reshape(-1)]
    np.testing.assert_allclose(table["score"], scores.reshape(-1), atol=1e-5)


def test_alpha_qe_stage_equals_hand_computation(stores, tmp_path):
    index, queries = stores
    x, q = index.global_matrix(), queries.global_matrix()
    table = read_table(shortlist.run(config(top_k=5, qe_top_n=3, qe_alpha=3.0), index.path, queries.path,
                                     tmp_path / "s.csv"))
    rows, sims = brute_force(q, x, 3)
    expanded = expand_queries(q, x[rows], sims, alpha=3.0)
    assert_table_is(table, queries.ids, index.ids, *brute_force(expanded, x, 5))


def test_qe_leave_one_out_never_expands_with_the_query_itself(stores, tmp_path):
    index, _ = stores
    x = index.global_matrix()
    table = read_table(shortlist.run(config(top_k=4, qe_top_n=2, exclude_same_id=True), index.path, index.path,
                                     tmp_path / "loo.csv"))
    scores = x @ x.T
    np.fill_diagonal(scores, -np.inf)
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    expanded = expand_queries(x, x[rows], np.take_along_axis(scores, rows, 1), alpha=0.0)
    second = expanded @ x.T
    second[np.arange(24), np.arange(24)] = -np.inf
    order = np.argsort(-second, axis=1, kind="stable")[:, :4]
    assert_table_is(table, index.ids, index.ids, order, np.take_along_axis(second, order, 1))


def test_pca_whitening_learned_once_stored_beside_the_index(stores, tmp_path, monkeypatch):
    index, queries = stores
    before = {p: p.read_bytes() for p in index.path.glob("parts/*/global.npy")}
    conf = config(top_k=3, whitening="pca", whitening_shrinkage=0.2, whitening_dim=5)
    table = read_table(shortlist.run(conf, index.path, queries.path, tmp_path / "a.csv"))
    whitening = learn_pca_whitening(index.global_matrix(), 5, 0.2)
    x, q = whitening.apply(index.global_matrix()), whitening.apply(queries.global_matrix())
    assert_table_is(table, queries.ids, index.ids, *brute_force(q, x, 3))
    made = list((index.path / "derived").glob("whitened-*/whitening.npz"))
    assert len(made) == 1
    assert {p: p.read_bytes() for p in index.path.glob("parts/*/global.npy")} == before  # original untouched
    monkeypatch.setattr(derived, "learn_whitening", lambda *a: pytest.fail("whitening learned twice"))
    again = read_table(shortlist.run(conf, index.path, queries.path, tmp_path / "b.csv"))
    assert again.equals(table)


def test_supervised_whitening_and_dba_use_the_labels(stores, tmp_path):
    index, queries = stores
    conf = config(top_k=4, whitening="supervised", whitening_shrinkage=0.1, dba="supervised", dba_top_n=3)
    with pytest.raises(ValueError, match="--index-labels"):
        shortlist.run(conf, index.path, queries.path, tmp_path / "s.csv")
    table = read_table(shortlist.run(conf, index.path, queries.path, tmp_path / "s.csv", index_labels=LABELS))
    names = np.array([LABELS[i] for i in index.ids], dtype=object)
    whitening = learn_supervised_whitening(index.global_matrix(), names, 0, 0.1)
    x = supervised_dba(whitening.apply(index.global_matrix()), names, 3)
    q = whitening.apply(queries.global_matrix())
    assert_table_is(table, queries.ids, index.ids, *brute_force(q, x, 4))
    assert len(list((index.path / "derived").glob("dba-*/parts"))) == 1


def test_plain_dba_stage_equals_hand_computation(stores, tmp_path):
    index, queries = stores
    table = read_table(shortlist.run(config(top_k=4, dba="plain", dba_top_n=3, dba_alpha=1.0), index.path,
                                     queries.path, tmp_path / "s.csv"))
    x = index.global_matrix()
    rows, sims = brute_force(x, x, 3)  # each image's own row comes first (similarity 1)
    augmented = augment_database(x[rows], sims, alpha=1.0)
    assert_table_is(table, queries.ids, index.ids, *brute_force(queries.global_matrix(), augmented, 4))


def test_changed_setting_never_reuses_the_shortlist(stores, tmp_path):
    index, queries = stores
    shortlist.run(config(top_k=3), index.path, queries.path, tmp_path / "s.csv")
    with pytest.raises(ValueError, match="settings.qe_top_n: was 0, now 2"):
        shortlist.run(config(top_k=3, qe_top_n=2), index.path, queries.path, tmp_path / "s.csv")


def test_changed_labels_make_a_new_derived_index(stores, tmp_path):
    index, queries = stores
    conf = config(top_k=3, dba="supervised", dba_top_n=2)
    shortlist.run(conf, index.path, queries.path, tmp_path / "a.csv", index_labels=LABELS)
    other = {**LABELS, "i000": "class5"}
    shortlist.run(conf, index.path, queries.path, tmp_path / "b.csv", index_labels=other)
    assert len(list((index.path / "derived").glob("dba-*"))) == 2


def test_cli_reads_index_labels(stores, tmp_path):
    from delf_pipeline.cli import main as cli_main

    index, queries = stores
    labels = tmp_path / "train.csv"
    labels.write_text("id,landmark_id\n" + "".join(f"{i},{c}\n" for i, c in LABELS.items()))
    args = ["shortlist", "--index", str(index.path), "--queries", str(queries.path), "--out", str(tmp_path / "s.csv"),
            "--set", 'shortlist.device="cpu"', "--set", 'shortlist.dba="supervised"', "--set", "shortlist.top_k=2"]
    assert cli_main(args) == 2  # no labels: the ValueError names --index-labels
    assert cli_main(args + ["--index-labels", str(labels)]) == 0
    assert len(read_table(tmp_path / "s.csv")) == 2 * len(queries)


def test_two_shard_processes_make_a_derived_store_once(stores, monkeypatch):
    """Two shortlist shards that need the same whitened index at the same moment: the second
    waits for the first and reuses its store (before: both wrote it, and the second rename
    failed with 'Directory not empty')."""
    import threading

    index, _ = stores
    conf = config(whitening="pca", whitening_shrinkage=0.2, whitening_dim=5).shortlist
    learned, started, errors = [], threading.Barrier(2), []
    real = derived.learn_whitening

    def slow_learn(*args):
        learned.append(1)
        threading.Event().wait(0.5)  # both threads are inside prepare_index now
        return real(*args)

    monkeypatch.setattr(derived, "learn_whitening", slow_learn)

    def prepare():
        started.wait()
        try:
            derived.prepare_index(FeatureStore(index.path), conf, None, search.select_matmul("cpu"))
        except Exception as error:  # noqa: BLE001 - the test reports whatever a thread raised
            errors.append(error)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(learned) == 1
    assert len(list((index.path / "derived").glob("whitened-*/manifest.json"))) == 1


def superglobal_by_hand(q: np.ndarray, x: np.ndarray, depth: int, neighbours: int, k: int):
    rows, _ = brute_force(q, x, depth)
    out_rows, out_scores = [], []
    for query, found in zip(q, rows):
        new = rescore(query, x[found], neighbours)
        order = np.argsort(-new, kind="stable")[:k]
        out_rows.append(found[order])
        out_scores.append(new[order])
    return np.array(out_rows), np.array(out_scores)


def test_superglobal_stage_equals_hand_computation(stores, tmp_path):
    index, queries = stores
    conf = config(top_k=5, superglobal_depth=12, superglobal_neighbours=3)
    out = shortlist.run(conf, index.path, queries.path, tmp_path / "shortlist.csv")
    rows, scores = superglobal_by_hand(queries.global_matrix(), index.global_matrix(), 12, 3, 5)
    assert_table_is(read_table(out), queries.ids, index.ids, rows, scores)


def test_superglobal_leave_one_out_takes_the_query_out_first(stores, tmp_path):
    index, _ = stores
    conf = config(top_k=5, superglobal_depth=12, superglobal_neighbours=3, exclude_same_id=True)
    table = read_table(shortlist.run(conf, index.path, index.path, tmp_path / "shortlist.csv"))
    x = index.global_matrix()
    for row, query in enumerate(index.ids[:4]):
        others = np.delete(np.arange(len(x)), row)
        found, scores = superglobal_by_hand(x[row : row + 1], x[others], 12, 3, 5)
        mine = table[table["query_id"] == query]
        assert mine["index_id"].tolist() == [index.ids[others[r]] for r in found[0]]
        np.testing.assert_allclose(mine["score"], scores[0], atol=1e-5)


def test_superglobal_depth_below_top_k_keeps_only_the_reranked_results(stores, tmp_path):
    index, queries = stores
    out = shortlist.run(config(top_k=5, superglobal_depth=3, superglobal_neighbours=2), index.path, queries.path,
                        tmp_path / "s.csv")
    rows, scores = superglobal_by_hand(queries.global_matrix(), index.global_matrix(), 3, 2, 3)
    assert_table_is(read_table(out), queries.ids, index.ids, rows, scores)
