"""The verification cascade (rerank.cascade): the selection and combination rules, the views
stage through the rerank stage (images read at rerank time), the search path (views from the
photo in memory), and clear refusals. RootSIFT on tiny seeded textures, no weights needed."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from delf_pipeline import extract, index, rerank, shortlist
from delf_pipeline.config import ConfigError, load_config
from delf_pipeline.extractors.build import view_extractor
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.formats.images import kaggle_path
from delf_pipeline.formats.features import ImageFeatures
from delf_pipeline.formats.store import FeatureStore
from delf_pipeline.formats.tables import read_labels
from delf_pipeline.search.searcher import Searcher
from delf_pipeline.tools.show_matches import open_run, pair_caption, verify_recorded
from delf_pipeline.verification.cascade import AsiftFallback, QuerySide, combine, counted, select
from delf_pipeline.verification.matching import match_views
from delf_pipeline.verification.pairs import PairResult, verify_matches, verify_options
from delf_pipeline.verification.verifier import CandidateVerifier, store_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.synthetic_images import write_kaggle  # noqa: E402

SMALL = ["extract.vlad_words=4", "extract.max_image_size=96", "extract.max_features=200", "rerank.num_to_rerank=4",
         "shortlist.top_k=6"]
VIEWS = ["rerank.cascade=views", "rerank.cascade_tilts=[1, 2]", "rerank.cascade_pairs=2",
         "rerank.cascade_inliers=100000", "rerank.cascade_min_global=0"]  # every query undecided: its first two
# classes verified again


def settings(*more: str):
    return load_config("sift_default", None, SMALL + list(more))


# ------------------------------------------------------------------ rules


LABELS = {"a": "A", "b": "A", "c": "C", "d": "D"}


def test_select_takes_the_best_candidate_of_each_first_class_when_the_lead_is_small():
    ids, scores, inliers = ["a", "b", "c", "d"], [1.0, 0.875, 0.5, 0.0], [30, 20, 10, 0]
    assert select(ids, scores, inliers, LABELS, 2, 1.0, 0) == [0, 2]  # b is class A's second: never chosen
    assert select(ids, scores, inliers, LABELS, 3, 1.0, 0) == [0, 2, 3]
    assert select(ids, scores, inliers, LABELS, 1, 1.0, 0) == [0]
    assert select(ids, scores, inliers, LABELS, 2, 0.5, 0) == [], "the best class leads by 0.5: decided"
    assert select(ids, scores, inliers, LABELS, 2, 0.5000001, 0) == [0, 2]


def test_select_when_the_best_inliers_are_in_the_ambiguous_band():
    ids, scores = ["a", "c", "d"], [1.0, 0.5, 0.0]
    assert select(ids, scores, [9, 8, 0], LABELS, 5, 0.0, 10) == [0, 1, 2], "9 inliers < 10: undecided"
    assert select(ids, scores, [10, 8, 0], LABELS, 5, 0.0, 10) == [], "10 inliers and a lead: decided"
    assert select(ids, scores, [10, 8, 0], LABELS, 5, 0.6, 10) == [0, 1, 2], "a lead of 0.5 < 0.6: undecided"


def test_select_nothing_for_a_query_unlike_every_index_image():
    """Below min_global (the query's best global similarity), an undecided query is left to the
    fast path: most such queries show no landmark of the index."""
    ids, scores, inliers = ["a", "c", "d"], [1.0, 0.5, 0.0], [0, 0, 0]
    assert select(ids, scores, inliers, LABELS, 5, 0.0, 10, best_global=0.399, min_global=0.4) == []
    assert select(ids, scores, inliers, LABELS, 5, 0.0, 10, best_global=0.4, min_global=0.4) == [0, 1, 2]
    assert select(ids, scores, inliers, LABELS, 5, 0.0, 10) == [0, 1, 2], "no gate by default"


def test_select_one_class_or_none_needs_no_second_stage():
    assert select(["a", "b"], [0.5, 0.4], [0, 0], LABELS, 5, 1e6, 100) == []
    assert select([], [], [], LABELS, 5, 1e6, 100) == []


def test_select_without_labels_makes_each_candidate_its_class():
    assert select(["a", "b", "x"], [0.5, 0.45, 0.1], [0, 0, 0], None, 2, 1.0, 0) == [0, 1]
    assert select(["a", "x"], [0.5, 0.45], [0, 0], LABELS, 2, 1.0, 0) == [0, 1]  # x has no label: its own class


@pytest.mark.parametrize("rule, expected", [("replace", 3), ("max", 7), ("sum", 10)])
def test_combine_rules(rule, expected):
    assert combine(7, 3, rule) == expected


def test_combine_refuses_an_unknown_rule():
    with pytest.raises(ValueError, match="cascade_rule"):
        combine(1, 2, "mean")


def test_cascade_settings_are_checked_by_the_table():
    with pytest.raises(ConfigError, match="rerank.cascade"):
        load_config(None, None, ["rerank.cascade=disk"])
    with pytest.raises(ConfigError, match="rerank.cascade_tilts"):
        load_config(None, None, ["rerank.cascade_tilts=[0]"])
    conf = load_config(None, None, VIEWS).rerank
    assert (conf.cascade, conf.cascade_pairs, conf.cascade_tilts) == ("views", 2, [1.0, 2.0])
    assert load_config(None, None, ["rerank.cascade_tilts=[1, 0.5]"]).rerank.cascade_tilts == [1.0, 0.5]  # stretches


# ------------------------------------------------------------------ the rerank stage


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    """A Kaggle folder (3 places, 2 index views each, one query per place), its stores and shortlist."""
    root = tmp_path_factory.mktemp("cascade")
    write_kaggle(root / "data", places=3, index_views=2)
    conf = settings()
    istore = extract.run(conf, root / "data", root / "index", split="train")
    qstore = extract.run(conf, root / "data", root / "query", split="test", codebook=istore / "codebook.npy")
    short = shortlist.run(conf, istore, qstore, root / "shortlist.csv")
    fast = read_table(rerank.run(conf, short, qstore, istore, root / "fast.csv"))
    return {"root": root, "data": root / "data", "index": istore, "query": qstore, "shortlist": short, "fast": fast,
            "labels": read_labels(root / "data" / "train.csv")}


def cascade_run(task: dict, out: Path, *more: str, **kwargs) -> pd.DataFrame:
    options = {"index_labels": task["labels"], "query_images": task["data"], **kwargs}
    return read_table(rerank.run(settings(*more), task["shortlist"], task["query"], task["index"], out, **options))


def test_views_stage_reverifies_the_best_of_the_first_classes_and_keeps_the_rest(task, tmp_path):
    table = cascade_run(task, tmp_path / "r.csv", *VIEWS)
    fast = task["fast"]
    assert len(table) == len(fast) and set(table["query_id"]) == set(fast["query_id"])
    for query_id, rows in table.groupby("query_id"):
        before = fast[fast["query_id"] == query_id].sort_values(["score", "index_id"], ascending=[False, True])
        chosen = {before["index_id"].iloc[p] for p in select(before["index_id"].tolist(), before["score"].tolist(),
                                                              before["inliers"].tolist(), task["labels"], 2, 0, 10**5)}
        second = rows[rows["status"].str.startswith("views:")]
        assert set(second["index_id"]) == chosen and len(chosen) == 2
        kept = rows[~rows["index_id"].isin(chosen)].set_index("index_id").sort_index()
        same = before[~before["index_id"].isin(chosen)].set_index("index_id").sort_index()
        pd.testing.assert_frame_equal(kept, same)
        assert list(rows["score"]) == sorted(rows["score"], reverse=True)
        merged = second.merge(before, on="index_id", suffixes=("", "_fast"))
        assert (merged["inliers"] >= merged["inliers_fast"]).all(), "rule max never lowers a count"


def test_views_stage_matches_the_query_views_extracted_from_its_image(task, tmp_path):
    """A second-stage row equals the views matched by hand: the query image decoded as its store
    decoded it, view features in original pixels, match_views, the preset's verifier."""
    table = cascade_run(task, tmp_path / "r.csv", *VIEWS, "rerank.cascade_rule=replace")
    row = table[table["status"].str.startswith("views:")].iloc[0]
    conf = settings(*VIEWS).rerank
    views = view_extractor(store_settings(str(task["query"])), conf.cascade_tilts)
    features, view_index = views.of_file(kaggle_path(task["data"], "test", row["query_id"]))
    assert set(np.unique(view_index)) == set(range(6)), "tilts 1 and 2: the image and 5 rotated views"
    candidate = CandidateVerifier(str(task["query"]), str(task["index"]), conf).index_features(row["index_id"])
    options = verify_options(conf)
    pairs = match_views(features.descriptors, view_index, candidate.descriptors, matcher=options["matcher"],
                        match_threshold=options["match_threshold"], ratio=options["ratio"])
    expected = verify_matches(features.locations, candidate.locations, pairs, **options)
    assert (row["matches"], row["inliers"], row["status"]) == (expected.matches, expected.inliers,
                                                                f"views:{expected.status}")


def test_second_stage_counts_under_cascade_min_inliers_count_zero(task, tmp_path):
    table = cascade_run(task, tmp_path / "r.csv", *VIEWS, "rerank.cascade_rule=replace",
                        "rerank.cascade_min_inliers=100000")
    second = table[table["status"].str.startswith("views:")]
    assert len(second) and (second["inliers"] == 0).all() and (second["matches"] > 0).any()
    floors = load_config(None, None, ["rerank.cascade_min_inliers=6", "rerank.min_inliers=3"]).rerank
    assert counted(7, floors) == 7 and counted(5, floors) == 0


def test_no_pair_selected_gives_the_fast_rows(task, tmp_path):
    table = cascade_run(task, tmp_path / "r.csv", *VIEWS, "rerank.cascade_inliers=0", "rerank.cascade_margin=0")
    pd.testing.assert_frame_equal(table, task["fast"])


def test_worker_processes_and_shards_give_the_same_bytes(task, tmp_path):
    one = rerank.run(settings(*VIEWS), task["shortlist"], task["query"], task["index"], tmp_path / "one.csv",
                     index_labels=task["labels"], query_images=task["data"])
    two = rerank.run(settings(*VIEWS), task["shortlist"], task["query"], task["index"], tmp_path / "two.csv",
                     index_labels=task["labels"], query_images=task["data"], jobs=2)
    assert one.read_bytes() == two.read_bytes()


def test_the_labels_are_part_of_the_manifest(task, tmp_path):
    cascade_run(task, tmp_path / "r.csv", *VIEWS)
    other = {key: "0" for key in task["labels"]}
    with pytest.raises(Exception, match="settings|manifest"):
        cascade_run(task, tmp_path / "r.csv", *VIEWS, index_labels=other)


def test_without_labels_each_candidate_is_a_class_of_its_own(task, tmp_path, caplog):
    table = cascade_run(task, tmp_path / "a.csv", *VIEWS, index_labels=None)
    assert "each candidate is a class of its own" in caplog.text
    for query_id, rows in table.groupby("query_id"):
        before = task["fast"][task["fast"]["query_id"] == query_id].sort_values(["score", "index_id"],
                                                                               ascending=[False, True])
        first_two = set(before["index_id"].iloc[:2])  # two classes: the first two candidates, whatever their place
        assert set(rows[rows["status"].str.startswith("views:")]["index_id"]) == first_two


def test_refusals_name_what_is_missing(task, tmp_path):
    with pytest.raises(ValueError, match="--query-images"):
        cascade_run(task, tmp_path / "b.csv", *VIEWS, query_images=None)
    with pytest.raises(ValueError, match="holds 'rootsift' ones"):
        cascade_run(task, tmp_path / "c.csv", "rerank.cascade=lighterglue")
    with pytest.raises(ValueError, match="fast path, whose matcher"):
        CandidateVerifier(str(task["query"]), str(task["index"]),
                          settings("rerank.cascade=views", "rerank.matcher=lighterglue").rerank)


def test_a_query_without_its_image_is_refused_by_id(task, tmp_path):
    images = tmp_path / "images.csv"
    images.write_text("id,path\n")  # the query images given hold none of the queries
    with pytest.raises(ValueError, match="has none among the query images"):
        cascade_run(task, tmp_path / "r.csv", *VIEWS, query_images=images)


# ------------------------------------------------------------------ the asift fallback


FALLBACK = ["rerank.cascade_fallback=asift", "rerank.fallback_tilts=[1, 2]", "rerank.fallback_image_size=96",
            "rerank.fallback_features=100", "rerank.fallback_min_inliers=0", "rerank.fallback_pairs=1"]
NO_FALLBACK = ['rerank.cascade_fallback=""']


def test_fallback_settings_are_checked_by_the_table():
    conf = load_config(None, None, []).rerank
    assert (conf.cascade_fallback, conf.fallback_tilts, conf.fallback_pairs) == ("asift", [1.0, 2, 4, 6, 8], 3)
    with pytest.raises(ConfigError, match="rerank.fallback_tilts"):
        load_config(None, None, ["rerank.fallback_tilts=[0.5]"])  # both images compressed: t >= 1
    with pytest.raises(ConfigError, match="rerank.cascade_fallback"):
        load_config(None, None, ["rerank.cascade_fallback=mods"])


def test_fallback_reverifies_the_first_selected_pairs_of_an_undecided_query_from_both_images(task, tmp_path):
    """Every query stays undecided after the views stage (cascade_inliers 100000): the first
    selected candidate is matched again on both images' ASIFT RootSIFT, and its row becomes the
    fallback's where that count is the larger; every other row is the views run's."""
    before = cascade_run(task, tmp_path / "views.csv", *VIEWS, *NO_FALLBACK)
    table = cascade_run(task, tmp_path / "r.csv", *VIEWS, *FALLBACK, index_images=task["data"])
    conf = settings(*VIEWS, *FALLBACK).rerank
    fallback = AsiftFallback(conf)
    changed = 0
    for query_id, rows in table.groupby("query_id"):
        old = before[before["query_id"] == query_id]
        fast = task["fast"][task["fast"]["query_id"] == query_id].sort_values(["score", "index_id"],
                                                                             ascending=[False, True])
        chosen = select(fast["index_id"].tolist(), fast["score"].tolist(), fast["inliers"].tolist(), task["labels"],
                        2, 0, 10**5)
        index_id = fast["index_id"].iloc[chosen[0]]
        expected = fallback.verify(str(kaggle_path(task["data"], "test", query_id)),
                                   str(kaggle_path(task["data"], "train", index_id)))
        row = rows.set_index("index_id").loc[index_id]
        previous = old.set_index("index_id").loc[index_id]
        if expected.inliers > previous["inliers"]:
            assert (row["inliers"], row["matches"], row["status"]) == (expected.inliers, expected.matches,
                                                                       f"asift:{expected.status}")
            changed += 1
        else:
            assert row["status"] == previous["status"] and row["inliers"] == previous["inliers"]
        others = rows[rows["index_id"] != index_id].set_index("index_id").sort_index()
        pd.testing.assert_frame_equal(others, old[old["index_id"] != index_id].set_index("index_id").sort_index())
        assert list(rows["score"]) == sorted(rows["score"], reverse=True)
    assert changed, "two views of one textured place: the fallback finds more than the views stage somewhere"


def test_an_asift_row_is_verified_again_by_the_fallback_from_both_images(task, tmp_path):
    table = cascade_run(task, tmp_path / "r.csv", *VIEWS, *FALLBACK, index_images=task["data"])
    row = table[table["status"].str.startswith("asift:")].iloc[0]
    worker = CandidateVerifier(str(task["query"]), str(task["index"]), settings(*VIEWS, *FALLBACK).rerank)
    stored = worker.stored_query(row["query_id"])
    query = QuerySide(stored, path=str(kaggle_path(task["data"], "test", row["query_id"])))
    pair = worker.verify_row(query, row["index_id"], row["status"],
                             index_path=str(kaggle_path(task["data"], "train", row["index_id"])))
    assert (pair.stage, pair.result.inliers, pair.status) == ("asift", row["inliers"], row["status"])
    assert "affine views" in pair.matched_by and pair.query.descriptors.shape[1] == 128
    with pytest.raises(ValueError, match="reads both images"):
        worker.verify_row(QuerySide(stored), row["index_id"], row["status"])


def test_index_images_are_listed_only_when_the_fallback_runs(task, tmp_path, monkeypatch):
    """Listing a Kaggle train split stats every image (1.58M at Kaggle 2020's scale): a rerank
    whose queries the cascade decides lists no index image; one that reaches the fallback lists
    them once per process."""
    from delf_pipeline.formats import images as images_module

    listed = []
    real = images_module.list_images
    monkeypatch.setattr(images_module, "list_images", lambda source, split="train": listed.append(split) or
                        real(source, split))
    images_module.listed_paths.cache_clear()
    cascade_run(task, tmp_path / "decided.csv", *VIEWS, *FALLBACK, "rerank.cascade_inliers=0", "rerank.cascade_margin=0",
                index_images=task["data"])
    assert "train" not in listed
    table = cascade_run(task, tmp_path / "r.csv", *VIEWS, *FALLBACK, index_images=task["data"])
    assert table["status"].str.startswith("asift:").any() and listed.count("train") == 1


def test_fallback_counts_under_its_floor_count_zero(task, tmp_path):
    before = cascade_run(task, tmp_path / "views.csv", *VIEWS, *NO_FALLBACK)
    table = cascade_run(task, tmp_path / "r.csv", *VIEWS, *FALLBACK, "rerank.fallback_min_inliers=100000",
                        index_images=task["data"])
    pd.testing.assert_frame_equal(table, before)


def test_fallback_without_the_index_images_is_skipped_and_recorded(task, tmp_path, caplog):
    before = cascade_run(task, tmp_path / "views.csv", *VIEWS, *NO_FALLBACK)
    table = cascade_run(task, tmp_path / "r.csv", *VIEWS, *FALLBACK)
    assert "--index-images" in caplog.text and "skipped" in caplog.text
    pd.testing.assert_frame_equal(table, before)
    manifest = json.loads((tmp_path / "r.csv.blocks" / "manifest.json").read_text())
    assert manifest["fallback_ran"] is False
    with pytest.raises(Exception, match="settings|manifest"):  # the same settings with the images: another output
        cascade_run(task, tmp_path / "r.csv", *VIEWS, *FALLBACK, index_images=task["data"])


def test_fallback_leaves_a_query_the_second_stage_decided(task, tmp_path, monkeypatch):
    """A second stage whose count reaches cascade_inliers decides the query: no fallback."""
    monkeypatch.setattr(AsiftFallback, "verify", lambda *args: pytest.fail("the fallback ran on a decided query"))
    conf = settings(*VIEWS, *FALLBACK, "rerank.cascade_inliers=8").rerank
    worker = CandidateVerifier(str(task["query"]), str(task["index"]), conf)
    first = {}
    for index_id, landmark in sorted(task["labels"].items()):
        first.setdefault(landmark, index_id)
    a, c = list(first.values())[:2]  # the first images of two places
    rows = [("q", a, 0.9, 40, 0, 0.9, "ok"), ("q", c, 0.8, 40, 0, 0.8, "ok")]

    class Decisive:
        name = "views"

        def verify(self, *args):
            return PairResult(40, 30, "ok", np.zeros((40, 2), np.int64), np.ones(40, bool))

    worker.second = Decisive()
    out = worker.cascade(rows, QuerySide(task_features(), path="q.jpg"), task["labels"], {a: "a.jpg", c: "c.jpg"})
    assert [row[4] for row in out] == [30, 30]


def test_fallback_on_an_unreadable_image_keeps_the_counts(tmp_path, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    fallback = AsiftFallback(settings(*FALLBACK).rerank)
    assert fallback.verify(str(broken), str(broken)) is None
    assert "cannot be read" in caplog.text


def task_features() -> ImageFeatures:
    return ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), np.zeros(0, np.float32),
                         np.zeros(0, np.float32))


# ------------------------------------------------------------------ the search path


def test_searcher_extracts_the_views_from_the_photo_in_memory(task, tmp_path):
    """The index's rerank settings carry the cascade; the answer's verified candidates are the
    batch rerank's rows for the same query (same stores, same views from the same pixels)."""
    built = index.build(settings(*VIEWS), task["data"], tmp_path / "idx", previews=0)
    assert_search_answers_as_batch(Searcher(built, top_candidates=4), task["data"],
                                   cascade_run(task, tmp_path / "r.csv", *VIEWS), "views:")


def assert_search_answers_as_batch(searcher: Searcher, data: Path, batch: pd.DataFrame, stage: str) -> None:
    """Each query photo searched: its verified candidates are the ``batch`` rerank rows of that
    query, some of them by the second ``stage`` (a status prefix)."""
    for query_id, rows in batch.groupby("query_id"):
        answer = searcher.search_file(kaggle_path(data, "test", query_id))
        got = {(c["index_id"], c["inliers"], c["status"]) for c in answer.candidates}
        assert got == set(zip(rows["index_id"], rows["inliers"], rows["status"]))
        assert any(c["status"].startswith(stage) for c in answer.candidates)


# ------------------------------------------------------------------ lighterglue on kept XFeat features


@pytest.fixture(scope="module")
def fused_task(tmp_path_factory, delf_test_models, xfeat_weights_file) -> dict:
    """The default's layout on the DELG test model: its own local features verify fast, the XFeat
    features of its fused VLAD are kept (extract.keep_vlad_locals) for the lighterglue stage."""
    root = tmp_path_factory.mktemp("fused_cascade")
    write_kaggle(root / "data", places=3, index_views=2)
    overrides = [f'extract.model="{delf_test_models["tf2_delg"]}"', "extract.image_scales=[1.0]",
                 "extract.global_scale_indices=[]", "extract.max_features=200", "extract.vlad_words=4",
                 "extract.vlad_dim=4", "extract.codebook_images=6", "extract.descriptor_dtype=float32",
                 f'extract.xfeat_weights="{xfeat_weights_file.parent}"', "extract.keep_vlad_locals=true",
                 "shortlist.top_k=6",
                 "rerank.num_to_rerank=4", "rerank.first_depth=0"]
    conf = load_config(None, None, overrides)
    istore = extract.run(conf, root / "data", root / "index", split="train")
    qstore = extract.run(conf, root / "data", root / "query", split="test", codebook=istore / "codebook.npy")
    return {"root": root, "data": root / "data", "index": istore, "query": qstore, "overrides": overrides,
            "shortlist": shortlist.run(conf, istore, qstore, root / "shortlist.csv"),
            "labels": read_labels(root / "data" / "train.csv")}


GLUE = ["rerank.cascade=lighterglue", "rerank.cascade_pairs=2", "rerank.cascade_inliers=100000",
        "rerank.cascade_rule=replace", "rerank.cascade_min_global=0"]  # every query undecided: its first two
# classes matched by LighterGlue


def test_lighterglue_stage_matches_the_kept_xfeat_features(fused_task, tmp_path):
    """A second-stage row equals LighterGlue by hand on both images' kept XFeat features (not the
    model's own, which the fast rows match), then the preset's verifier."""
    from delf_pipeline.verification.lighterglue import load_xfeat_lighterglue

    conf = load_config(None, None, fused_task["overrides"] + GLUE)
    out = rerank.run(conf, fused_task["shortlist"], fused_task["query"], fused_task["index"], tmp_path / "r.csv",
                     index_labels=fused_task["labels"])
    table = read_table(out)
    second = table[table["status"].str.startswith("lighterglue:")]
    assert len(second) == 2 * table["query_id"].nunique()
    queries, index_store = FeatureStore(fused_task["query"]), FeatureStore(fused_task["index"])
    glue = load_xfeat_lighterglue(str(Path(conf.extract.xfeat_weights)))
    for row in second.itertuples():
        a, b = queries.vlad_locals(row.query_id), index_store.vlad_locals(row.index_id)
        assert a.descriptors.shape[1] == 64 != queries.features(row.query_id).descriptors.shape[1]
        pairs = glue.match_stored(a.locations, a.descriptors, queries.size(row.query_id), b.locations,
                                  b.descriptors, index_store.size(row.index_id))
        expected = verify_matches(a.locations, b.locations, pairs, **verify_options(conf.rerank))
        assert (row.matches, row.inliers, row.status) == (expected.matches, expected.inliers,
                                                          f"lighterglue:{expected.status}")


def test_lighterglue_stage_leaves_queries_under_min_global_to_the_fast_path(fused_task, tmp_path):
    """With the gate between the queries' best global similarities, only the queries at or above
    it get second-stage rows; the others' rows are the fast path's, unchanged."""
    best = read_table(fused_task["shortlist"]).groupby("query_id")["score"].max().sort_values()
    gate = float(best.iloc[len(best) // 2])
    assert best.iloc[0] < gate, "the fixture's queries need different best global similarities"

    def table(name: str, setting: str) -> pd.DataFrame:
        conf = load_config(None, None, fused_task["overrides"] + GLUE + [setting])
        out = rerank.run(conf, fused_task["shortlist"], fused_task["query"], fused_task["index"],
                         tmp_path / f"{name}.csv", index_labels=fused_task["labels"])
        return read_table(out).sort_values(["query_id", "index_id"]).reset_index(drop=True)

    gated, fast = table("gated", f"rerank.cascade_min_global={gate}"), table("fast", 'rerank.cascade=""')
    glued = set(gated.loc[gated["status"].str.startswith("lighterglue:"), "query_id"])
    assert glued == set(best.index[best >= gate])
    left = ~gated["query_id"].isin(glued)
    pd.testing.assert_frame_equal(gated[left], fast[left])


def test_lighterglue_stage_on_a_store_without_kept_xfeat_features_is_refused(fused_task, tmp_path):
    conf = load_config(None, None, fused_task["overrides"] + ["extract.keep_vlad_locals=false"] + GLUE)
    plain = extract.run(conf, fused_task["data"], tmp_path / "plain", split="train")
    with pytest.raises(ValueError, match="keep_vlad_locals = true"):
        rerank.run(conf, fused_task["shortlist"], fused_task["query"], plain, tmp_path / "r.csv",
                   index_labels=fused_task["labels"])


def test_searcher_matches_the_photos_xfeat_features_in_memory(fused_task, tmp_path):
    """The search path keeps the photo's XFeat features in memory (mapped to original pixels as
    the store maps them): its verified candidates are the batch rerank's rows for that query."""
    conf = load_config(None, None, fused_task["overrides"] + GLUE)
    built = index.build(conf, fused_task["data"], tmp_path / "idx", previews=0)
    batch = read_table(rerank.run(conf, fused_task["shortlist"], fused_task["query"], fused_task["index"],
                                  tmp_path / "r.csv", index_labels=fused_task["labels"]))
    assert_search_answers_as_batch(Searcher(built, top_candidates=4), fused_task["data"], batch, "lighterglue:")


def test_a_part_of_global_descriptors_only_needs_no_kept_xfeat_features(fused_task, tmp_path):
    """An index grown with images of global descriptors only (no local features: nothing to
    match) still serves the lighterglue stage; a part with local features but no kept XFeat
    features does not."""
    import shutil

    from delf_pipeline.formats.store import ExtractedImage, write_part
    from delf_pipeline.verification.verifier import keeps_xfeat

    index_copy = tmp_path / "index"
    shutil.copytree(fused_task["index"], index_copy)
    settings = store_settings(str(index_copy))
    dim = FeatureStore(index_copy).global_matrix().shape[1]
    bare = ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.float32), np.zeros(0, np.float32),
                         np.zeros(0, np.float32), np.ones(dim, np.float32) / np.sqrt(dim))
    write_part(index_copy / "parts" / "zz-global-only", [ExtractedImage("g", bare, (10, 10))], [], "float32", 32)
    assert keeps_xfeat(FeatureStore(index_copy), settings)
    with_locals = ImageFeatures(np.zeros((1, 2), np.float32), np.ones((1, 32), np.float32), np.ones(1, np.float32),
                                np.ones(1, np.float32), bare.global_descriptor)
    write_part(index_copy / "parts" / "zz-no-kept", [ExtractedImage("h", with_locals, (10, 10))], [], "float32", 32)
    assert not keeps_xfeat(FeatureStore(index_copy), settings)


def test_the_match_picture_of_a_lighterglue_answer_shows_lighterglues_matches(fused_task, tmp_path):
    """verify_best redoes the stage that verified the best candidate: for a lighterglue row, the
    same count on both images' XFeat features (what the service's match picture draws)."""
    conf = load_config(None, None, fused_task["overrides"] + GLUE)
    searcher = Searcher(index.build(conf, fused_task["data"], tmp_path / "idx", previews=0), top_candidates=4)
    checked = 0
    for query_id in sorted(set(read_table(fused_task["shortlist"])["query_id"])):
        answer = searcher.search_file(kaggle_path(fused_task["data"], "test", query_id))
        best = searcher.verify_best(answer)
        first = [c for c in answer.candidates if c["inliers"] >= 0][0]
        assert best.index_id == first["index_id"]
        if first["status"].startswith("lighterglue:"):
            assert best.stage == "lighterglue" and best.query.descriptors.shape[1] == 64
            assert counted(best.result.inliers, conf.rerank) == first["inliers"]
            checked += 1
    assert checked, "no answer's best candidate was verified by LighterGlue"


@pytest.fixture(scope="module")
def glue_run(fused_task, tmp_path_factory) -> dict:
    """A run folder of the fused stores (linked in) reranked with the lighterglue cascade, with a
    submission that predicts nothing (what the report reads); its rerank rows."""
    folder = tmp_path_factory.mktemp("glue_run")
    (folder / "features").mkdir()
    for store in ("index", "query"):
        (folder / "features" / store).symlink_to(fused_task[store])
    conf = load_config(None, None, fused_task["overrides"] + GLUE)
    table = read_table(rerank.run(conf, fused_task["shortlist"], fused_task["query"], fused_task["index"],
                                  folder / "rerank.csv", index_labels=fused_task["labels"]))
    queries = sorted(set(table["query_id"]))
    (folder / "submission.csv").write_text("id,landmarks\n" + "".join(f"{q},\n" for q in queries))
    return {"folder": folder, "table": table}


def test_show_matches_redoes_the_stage_of_the_pairs_rerank_row(fused_task, glue_run):
    """A lighterglue row's pair is matched again by LighterGlue on both images' kept XFeat
    features, with the row's matches, inliers and status; any other row's by the fast path on
    the model's own features (as before), also with the row's numbers."""
    run = open_run(glue_run["folder"], fused_task["data"])
    queries = FeatureStore(fused_task["query"])
    for row in glue_run["table"].to_dict("records"):
        pair = verify_recorded(run, row["query_id"], row["index_id"], row["status"])
        caption = pair_caption(run, row["query_id"], pair, row["global_score"], row)
        by_glue = row["status"].startswith("lighterglue:")
        kept = queries.vlad_locals(row["query_id"]) if by_glue else queries.features(row["query_id"])
        np.testing.assert_array_equal(pair.query.locations, kept.locations)
        assert (pair.query.descriptors.shape[1] == 64) == by_glue
        assert ("LighterGlue on XFeat features (cascade)" in caption[2]) == by_glue
        assert (pair.result.matches, pair.status) == (row["matches"], row["status"])
        assert f"inliers {pair.result.inliers} " in caption[1] and "rerank.csv" not in caption[1]
        assert pair.counted(run.settings) == row["inliers"]


def test_show_matches_and_report_pictures_say_which_stage_drew_them(fused_task, glue_run, tmp_path, caplog):
    """The command (its pair's rerank row looked up) and the report's pictures log the stage
    that drew each pair: LighterGlue for the cascade's rows, the fast path for the others."""
    from delf_pipeline import cli
    from delf_pipeline.tools import report

    caplog.set_level(logging.DEBUG, logger="delf_pipeline.tools.show_matches")
    table = glue_run["table"]
    row = table[table["status"].str.startswith("lighterglue:")].iloc[0]
    out = tmp_path / "pair.png"
    assert cli.main(["show-matches", "--run", str(glue_run["folder"]), "--query", row["query_id"], "--candidate",
                     row["index_id"], "--data", str(fused_task["data"]), "--out", str(out)]) == 0
    assert out.is_file() and "LighterGlue on XFeat features (cascade)" in caplog.text
    caplog.clear()
    report.build(glue_run["folder"], tmp_path / "report", data=fused_task["data"], top=4, matches=4)
    drawn = [r.getMessage() for r in caplog.records if r.name == "delf_pipeline.tools.show_matches"]
    assert len(drawn) == len(table) == len(list((tmp_path / "report" / "matches").glob("*/*.jpg")))
    assert sum("LighterGlue on XFeat features (cascade)" in m for m in drawn) == table["status"].str.startswith(
        "lighterglue:").sum()


def test_show_matches_of_a_lighterglue_row_without_its_weights_says_how_to_fetch_them(fused_task, glue_run,
                                                                                     tmp_path, monkeypatch):
    from delf_pipeline.extractors import weights
    from delf_pipeline.verification import lighterglue

    monkeypatch.setattr(lighterglue, "load_xfeat_lighterglue",
                        lambda folder=None: weights.locate("xfeat", tmp_path, lighterglue.WEIGHTS_FILE))
    run = open_run(glue_run["folder"], fused_task["data"])
    rows = glue_run["table"].to_dict("records")
    glue = next(row for row in rows if row["status"].startswith("lighterglue:"))
    with pytest.raises(FileNotFoundError, match="LighterGlue stage.*`delf-pipeline weights fetch xfeat`"):
        verify_recorded(run, glue["query_id"], glue["index_id"], glue["status"])
    fast = next(row for row in rows if not row["status"].startswith("lighterglue:"))
    assert verify_recorded(run, fast["query_id"], fast["index_id"], fast["status"]).status == fast["status"]


def test_the_time_budget_measures_the_lighterglue_stage_per_query(fused_task):
    """budget.measure_cascade_seconds times the second stage on real pairs (none without it)."""
    from delf_pipeline.budget import measure_cascade_seconds

    short = read_table(fused_task["shortlist"])
    conf = load_config(None, None, fused_task["overrides"] + GLUE).rerank
    seconds, timed = measure_cascade_seconds(conf, short, fused_task["query"], fused_task["index"], 2, 60.0)
    assert timed == 2 and seconds > 0
    conf.cascade = ""
    assert measure_cascade_seconds(conf, short, fused_task["query"], fused_task["index"], 2, 60.0) == (0.0, 0)
