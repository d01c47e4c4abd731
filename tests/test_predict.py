"""Tests of delf_pipeline.predict: final ranking, per-class votes, submission rows for every query."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from support.synthetic_stores import global_only, shortlist_frame

from delf_pipeline import predict
from delf_pipeline.cli import main as cli_main
from delf_pipeline.config import load_config
from delf_pipeline.evidence.aggregation import class_evidence
from delf_pipeline.evidence.calibration import Calibration
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.formats.images import ErrorRecord
from delf_pipeline.formats.store import ExtractedImage, write_part
from delf_pipeline.formats.tables import (
    read_labels,
    read_submission,
    validate_submission,
)

LABELS = {"a": "1", "b": "2", "c": "2", "d": "1", "x": "7", "y": "3", "z": "10"}


def ranking(candidates: dict[str, list[tuple[str, float]]]) -> pd.DataFrame:
    """A final ranking (query_id,index_id,rank,score) from query -> [(index id, score)] in rank order."""
    return shortlist_frame(candidates)


def class_votes(table: pd.DataFrame, top_k: int, how: str) -> pd.DataFrame:
    """Rows ``query_id,label,score`` of every voted class, best first: predict's class evidence
    of a plain ranking (every candidate unverified, global score = its score, ranks as given)."""
    plain = table.assign(global_score=table["score"], inliers=0, verified=0)
    return class_evidence(plain, LABELS, top_k, how)[["query_id", "label", "score"]]


def best_votes(table: pd.DataFrame, top_k: int, how: str) -> dict[str, tuple[str, float]]:
    """query id -> (landmark id, class score) of its best class."""
    best = class_votes(table, top_k, how).drop_duplicates("query_id")
    return {q: (label, float(score)) for q, label, score in zip(best["query_id"], best["label"], best["score"])}


def config(**predict_settings) -> dict:
    """The default settings with these predict keys; the raw confidence is the class score alone
    (``margin_weight`` 0) unless a test sets it."""
    conf = load_config()
    conf.predict.update({"margin_weight": 0.0, **predict_settings})
    return conf


# ---------------------------------------------------------------- aggregation


@pytest.mark.parametrize("how, top_k, expected", [
    ("sum", 3, ("2", 0.95)),  # 2: 0.5 + 0.45 beats 1: 0.9 (d at rank 4 does not vote)
    ("max", 3, ("1", 0.9)),
    ("sum", 4, ("1", 1.5)),  # with d: 0.9 + 0.6
    ("sum", 1, ("1", 0.9)),
])
def test_golden_class_votes(how, top_k, expected):
    table = ranking({"q": [("a", 0.9), ("b", 0.5), ("c", 0.45), ("d", 0.6)]})
    label, score = best_votes(table, top_k, how)["q"]
    assert (label, round(score, 6)) == expected


@pytest.mark.parametrize("how", ["sum", "max"])
def test_tied_classes_go_to_the_smaller_label(how):
    table = ranking({"q": [("x", 0.5), ("y", 0.5), ("z", 0.5)]})  # labels 7, 3, 10
    assert best_votes(table, 3, how) == {"q": ("10", 0.5)}  # labels compare as text


def test_unlabelled_candidates_do_not_vote(caplog):
    table = ranking({"q0": [("unknown", 0.9), ("a", 0.3)], "q1": [("unknown", 0.8)]})
    with caplog.at_level(logging.WARNING, logger="delf_pipeline"):
        votes = best_votes(table, 2, "sum")
    assert votes == {"q0": ("1", 0.3)}
    assert "2 shortlisted index images have no label and do not vote" in caplog.text
    assert best_votes(table, 1, "sum") == {}  # the unlabelled one used the only vote


@pytest.mark.parametrize("how, expected", [
    ("sum", [("2", 0.95), ("1", 0.9)]),  # every class the top 3 vote for, best first
    ("max", [("1", 0.9), ("2", 0.5)]),
])
def test_golden_class_scores_list_every_voted_class(how, expected):
    table = ranking({"q": [("a", 0.9), ("b", 0.5), ("c", 0.45), ("d", 0.6)]})
    classes = class_votes(table, 3, how)
    assert [(label, round(score, 6)) for label, score in zip(classes["label"], classes["score"])] == expected


def test_empty_ranking_gives_no_votes():
    assert best_votes(ranking({}), 3, "sum") == {}
    assert class_votes(ranking({}), 3, "sum").empty


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="predict.aggregation must be one of sum, max, mean_best, verified, got .mean."):
        best_votes(ranking({"q": [("a", 1.0)]}), 3, "mean")


# ---------------------------------------------------------------- final ranking


def rerank_frame(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame([(q, i, 0.0, 10, 5, s, "ok") for q, i, s in rows],
                        columns=["query_id", "index_id", "global_score", "matches", "inliers", "score", "status"])


def test_verified_candidates_come_first_then_the_rest_by_global_score():
    shortlist = shortlist_frame({"q1": [("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6)], "q0": [("x", 0.2), ("y", 0.1)]})
    rerank = rerank_frame([("q1", "c", 5.2), ("q1", "a", 0.45)])
    table = predict.final_ranking(shortlist, rerank)
    assert table.columns.tolist() == ["query_id", "index_id", "rank", "score"]
    assert table.values.tolist() == [
        ["q0", "x", 1, 0.2], ["q0", "y", 2, 0.1],
        ["q1", "c", 1, 5.2], ["q1", "a", 2, 0.45], ["q1", "b", 3, 0.8], ["q1", "d", 4, 0.6],
    ]


def test_without_rerank_the_shortlist_is_the_ranking():
    shortlist = shortlist_frame({"q": [("a", 0.5), ("b", 0.5), ("c", 0.9)]})
    for rerank in (None, rerank_frame([])):
        table = predict.final_ranking(shortlist, rerank)
        assert table["index_id"].tolist() == ["c", "a", "b"] and table["rank"].tolist() == [1, 2, 3]


# ---------------------------------------------------------------- the stage


@pytest.fixture
def inputs(tmp_path):
    """Shortlist and rerank CSVs of queries q0 (verified) and q1 (global only)."""
    shortlist_frame({"q0": [("a", 0.9), ("b", 0.8), ("c", 0.7)], "q1": [("x", 0.6), ("y", 0.5)]}).to_csv(
        tmp_path / "shortlist.csv", index=False)
    rerank_frame([("q0", "b", 1.2), ("q0", "c", 1.1), ("q0", "a", 0.9)]).to_csv(tmp_path / "rerank.csv", index=False)
    return tmp_path


def test_submission_has_every_query_once_in_the_given_order(inputs):
    ids = ["q1", "failed", "q0", "no_candidates", "q1"]
    out = predict.run(config(top_k=2, aggregation="sum"), inputs / "shortlist.csv", LABELS, ids,
                      inputs / "submission.csv", rerank_csv=inputs / "rerank.csv")
    assert out.read_text() == "id,landmarks\nq1,7 0.600000\nfailed,\nq0,2 2.300000\nno_candidates,\n"
    assert validate_submission(out, expected_ids=set(ids)) == []
    assert read_submission(out)["q0"] == ("2", pytest.approx(2.3))
    ranking_csv = read_table(inputs / "ranking.csv")
    assert ranking_csv.values.tolist() == [
        ["q0", "b", 1, 1.2], ["q0", "c", 2, 1.1], ["q0", "a", 3, 0.9], ["q1", "x", 1, 0.6], ["q1", "y", 2, 0.5],
    ]


def test_global_only_submission(inputs):
    out = predict.run(config(top_k=1), inputs / "shortlist.csv", LABELS, ["q0", "q1"], inputs / "submission.csv")
    assert out.read_text() == "id,landmarks\nq0,1 0.900000\nq1,7 0.600000\n"


def test_queries_with_failed_images_get_a_row(inputs, monkeypatch):
    store = inputs / "queries"
    images = [ExtractedImage(q, global_only(np.ones(4, np.float32) / 2), (8, 8)) for q in ("q0", "q1")]
    write_part(store / "parts" / "p0", images, [ErrorRecord("broken", "test/b/r/o/broken.jpg", "empty file")],
               "float32", 0)
    assert predict.query_ids(store) == ["broken", "q0", "q1"]
    pd.DataFrame({"id": ["x", "a"], "landmark_id": ["7", "1"]}).to_csv(inputs / "train.csv", index=False)
    args = ["predict", "--shortlist", str(inputs / "shortlist.csv"), "--rerank", str(inputs / "rerank.csv"),
            "--index-labels", str(inputs / "train.csv"), "--out", str(inputs / "submission.csv")]
    assert cli_main([*args, "--queries", str(store)]) == 0
    # the default raw confidence: each query's one labelled class is alone, its margin its score (0.9, 0.6)
    assert (inputs / "submission.csv").read_text() == "id,landmarks\nbroken,\nq0,1 1.800000\nq1,7 1.200000\n"
    pd.DataFrame({"id": ["q1", "q0", "broken"], "landmarks": ""}).to_csv(inputs / "sample.csv", index=False)
    assert cli_main([*args, "--queries", str(inputs / "sample.csv")]) == 0
    text = (inputs / "submission.csv").read_text()
    assert text == "id,landmarks\nq1,7 1.200000\nq0,1 1.800000\nbroken,\n"  # sample order; b and c unlabelled


def test_index_labels_need_an_id_and_a_label_column(tmp_path):
    pd.DataFrame({"id": ["a"], "label": ["5"]}).to_csv(tmp_path / "ok.csv", index=False)
    assert read_labels(tmp_path / "ok.csv") == {"a": "5"}
    pd.DataFrame({"image": ["place/a.jpg"], "label": ["5"]}).to_csv(tmp_path / "folder.csv", index=False)
    assert read_labels(tmp_path / "folder.csv") == {"place/a": "5"}  # a photo folder's list: id = path sans suffix
    pd.DataFrame({"path": ["a"], "landmark_id": ["5"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="index labels need columns id and landmark_id"):
        read_labels(tmp_path / "bad.csv")


# ---------------------------------------------------------------- calibrated confidence


def write_calibration(path, weights=(2.0,), bias=0.0, **settings) -> str:
    """A calibration on the single feature log_inliers, standardised by mean log(11) and scale 1."""
    fitted = Calibration(["log_inliers"], [float(np.log(11))], [1.0], list(weights), bias,
                         {"aggregation": "sum", "top_k": 2, **settings})
    path.write_text(fitted.to_json())
    return str(path)


def test_calibrated_confidence_is_the_fitted_probability(inputs):
    # q0's best class 2 (b, c: 5 inliers each in rerank_frame) -> expit(2 (log 6 - log 11)); q1 unverified -> expit(-2 log 11)
    settings = dict(top_k=2, aggregation="sum", calibration=write_calibration(inputs / "calibration.json"))
    out = predict.run(config(**settings), inputs / "shortlist.csv", LABELS, ["q0", "q1"], inputs / "submission.csv",
                      rerank_csv=inputs / "rerank.csv")
    expected = 1 / (1 + np.exp(-2 * (np.log(6) - np.log(11)))), 1 / (1 + np.exp(2 * np.log(11)))
    assert out.read_text() == f"id,landmarks\nq0,2 {expected[0]:.6f}\nq1,7 {expected[1]:.6f}\n"


def test_abstain_leaves_low_confidence_rows_empty(inputs):
    settings = dict(top_k=2, aggregation="sum", calibration=write_calibration(inputs / "calibration.json"), abstain=0.1)
    out = predict.run(config(**settings), inputs / "shortlist.csv", LABELS, ["q0", "q1"], inputs / "submission.csv",
                      rerank_csv=inputs / "rerank.csv")
    assert out.read_text().splitlines()[1:] == [f"q0,2 {1 / (1 + np.exp(-2 * np.log(6 / 11))):.6f}", "q1,"]


def test_calibration_fitted_with_other_settings_is_refused(inputs):
    settings = dict(top_k=2, aggregation="max", calibration=write_calibration(inputs / "calibration.json"))
    with pytest.raises(ValueError, match="fitted with predict.aggregation = 'sum', not 'max'"):
        predict.run(config(**settings), inputs / "shortlist.csv", LABELS, ["q0"], inputs / "submission.csv")


def test_calibration_with_non_landmarks_needs_and_uses_the_query_store(inputs):
    from support.synthetic_stores import write_store

    queries = write_store(inputs / "q", {"q0": global_only([1.0, 0.0]), "q1": global_only([0.0, 1.0])}, 4)
    others = write_store(inputs / "n", {"n0": global_only([0.0, 1.0])}, 4)
    fitted = Calibration(["nonlandmark"], [0.0], [1.0], [3.0], 0.0,
                         {"aggregation": "max", "top_k": 1, "non_landmarks": str(others)})
    (inputs / "c.json").write_text(fitted.to_json())
    conf = config(top_k=1, calibration=str(inputs / "c.json"))
    with pytest.raises(ValueError, match="uses non-landmark images: predict needs the query feature store"):
        predict.run(conf, inputs / "shortlist.csv", LABELS, ["q0"], inputs / "submission.csv")
    out = predict.run(conf, inputs / "shortlist.csv", LABELS, ["q0", "q1"], inputs / "submission.csv",
                      query_store=queries)
    # global only: best_global q0 0.9 (a), q1 0.6 (x); closeness to n0: q0 0, q1 1
    expected = 1 / (1 + np.exp(-3 * 0.9)), 1 / (1 + np.exp(-3 * (0.6 - 1.0)))
    assert out.read_text() == f"id,landmarks\nq0,1 {expected[0]:.6f}\nq1,7 {expected[1]:.6f}\n"


def test_max_share_scales_down_a_frequent_landmark(inputs):
    # top_k 1, global only: q0 -> a (label 1, 0.9), q1 -> x (label 7, 0.6): each 1/2 of the predictions
    out = predict.run(config(top_k=1, max_share=0.25), inputs / "shortlist.csv", LABELS, ["q0", "q1"],
                      inputs / "submission.csv")
    assert out.read_text() == "id,landmarks\nq0,1 0.450000\nq1,7 0.300000\n"


# ---------------------------------------------------------------- the margin in the raw confidence


def test_raw_confidence_adds_the_margin_over_the_next_class(tmp_path):
    # global only, max of the top 2: q0 names 1 (0.9) a nose ahead of 2 (0.85); q1 names 7 (0.8) far ahead of
    # 3 (0.3); q2's two candidates are both of 1 (0.5), so its margin is its score
    shortlist_frame({"q0": [("a", 0.9), ("b", 0.85)], "q1": [("x", 0.8), ("y", 0.3)],
                     "q2": [("a", 0.5), ("d", 0.4)]}).to_csv(tmp_path / "shortlist.csv", index=False)
    ids = ["q0", "q1", "q2"]
    plain = read_submission(predict.run(config(top_k=2, margin_weight=0.0), tmp_path / "shortlist.csv", LABELS,
                                        ids, tmp_path / "plain.csv"))
    assert plain == {"q0": ("1", pytest.approx(0.9)), "q1": ("7", pytest.approx(0.8)), "q2": ("1", pytest.approx(0.5))}
    assert load_config().predict.margin_weight == 1.0  # the default preset's
    lead = read_submission(predict.run(config(top_k=2, margin_weight=1.0), tmp_path / "shortlist.csv", LABELS, ids,
                                       tmp_path / "lead.csv"))
    assert lead == {"q0": ("1", pytest.approx(0.95)), "q1": ("7", pytest.approx(1.3)), "q2": ("1", pytest.approx(1.0))}
    # the same answers, and the one far ahead of its next class now pools before the one that is not
    half = read_submission(predict.run(config(top_k=2, margin_weight=0.5), tmp_path / "shortlist.csv", LABELS, ids,
                                       tmp_path / "half.csv"))
    assert half == {"q0": ("1", pytest.approx(0.925)), "q1": ("7", pytest.approx(1.05)), "q2": ("1", pytest.approx(0.75))}


def test_calibrated_confidence_ignores_the_margin_weight(inputs):
    calibration = write_calibration(inputs / "calibration.json")
    texts = [predict.run(config(top_k=2, aggregation="sum", calibration=calibration, margin_weight=weight),
                         inputs / "shortlist.csv", LABELS, ["q0", "q1"], inputs / f"s{weight}.csv",
                         rerank_csv=inputs / "rerank.csv").read_text() for weight in (0.0, 1.0)]
    assert texts[0] == texts[1]
