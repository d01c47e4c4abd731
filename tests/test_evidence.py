"""Golden tests of delf_pipeline.evidence: per-class aggregations on hand-made rankings, the
logistic fit on synthetic evidence with a known answer, the threshold table by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from support.synthetic_stores import global_only, write_store

from delf_pipeline.evidence import aggregation, calibration, nonlandmarks

# a one-photo building "B" against a 29-photo street "S" (s00..s28)
LABELS = {"b0": "B", **{f"s{i:02d}": "S" for i in range(29)}, "u": "U", "v": "V"}


def candidates(rows: list[tuple[str, float, float, int, int]], query: str = "q") -> pd.DataFrame:
    """Candidate table of one query from (index id, score, global score, inliers, verified) in rank order."""
    frame = pd.DataFrame(rows, columns=["index_id", "score", "global_score", "inliers", "verified"])
    frame.insert(0, "query_id", query)
    frame.insert(2, "rank", np.arange(1, len(rows) + 1))
    return frame[list(aggregation.CANDIDATE_COLUMNS)]


# The building's only photo verifies strongly (30 inliers, kaggle2020-style score 1 + 0.5); three
# street photos verify weakly (5-6 inliers) but their scores sum higher.
BUILDING_VS_STREET = candidates([
    ("b0", 1.5, 0.5, 30, 1),
    ("s00", 0.8, 0.6, 6, 1),
    ("s01", 0.75, 0.55, 6, 1),
    ("s02", 0.7, 0.5, 5, 1),
])


@pytest.mark.parametrize("how, top_k, label, score, margin", [
    ("sum", 4, "S", 2.25, 0.75),  # 0.8 + 0.75 + 0.7 over 1.5: class size wins
    ("max", 4, "B", 1.5, 0.7),
    ("mean_best", 4, "B", 1.5, 0.9375),  # B: 1.5 / min(4, 1); S: 2.25 / min(4, 29) = 0.5625
    ("verified", 4, "B", 30.35, 30.35 - 6.76),  # B: 30 + (1 + 0.75) / 5; S: 6 + (3 + 0.8) / 5
    ("sum", 1, "B", 1.5, 1.5),  # only the first candidate votes: B alone, margin = its score
])
def test_golden_building_against_street(how, top_k, label, score, margin):
    best = aggregation.best_classes(aggregation.class_evidence(BUILDING_VS_STREET, LABELS, top_k, how))
    row = best.iloc[0]
    assert (row["label"], round(row["score"], 6), round(row["margin"], 6)) == (label, round(score, 6), round(margin, 6))


def test_evidence_columns_of_each_class():
    evidence = aggregation.class_evidence(BUILDING_VS_STREET, LABELS, 4, "max")
    rows = {r.label: (r.best_inliers, r.agree, round(r.best_global, 6), r.votes) for r in evidence.itertuples()}
    assert rows == {"B": (30, 1, 0.5, 1), "S": (6, 3, 0.6, 3)}


# An unverified candidate (beyond num_to_rerank) with a high global score against a verified one.
VERIFIED_VS_NOT = candidates([
    ("u", 0.5, 0.3, 12, 1),  # verified: 12 inliers, score 12 / 30 + 0.3 ... as rerank wrote it
    ("v", 0.9, 0.9, 0, 0),  # unverified: its global score only
])


@pytest.mark.parametrize("how, label", [("sum", "V"), ("max", "V"), ("mean_best", "V"), ("verified", "U")])
def test_golden_verified_against_unverified(how, label):
    best = aggregation.best_classes(aggregation.class_evidence(VERIFIED_VS_NOT, LABELS, 2, how))
    assert best["label"].tolist() == [label]


def test_verified_orders_by_inliers_then_agreement_then_global():
    table = pd.concat([
        candidates([("u", 1, 0.1, 10, 1), ("v", 1, 0.9, 9, 1), ("s00", 1, 0.9, 9, 1)], "q1"),  # inliers first
        candidates([("u", 1, 0.9, 10, 1), ("v", 1, 0.1, 10, 1), ("b0", 1, 0.1, 0, 1),
                    ("s00", 1, 0.0, 10, 1)], "q2"),  # ties on inliers: higher global wins (agree 1 each)
    ])
    best = aggregation.best_classes(aggregation.class_evidence(table, {**LABELS}, 4, "verified"))
    assert best["label"].tolist() == ["U", "U"]
    assert best["score"].round(6).tolist() == [round(10 + (1 + 0.55) / 5, 6), round(10 + (1 + 0.95) / 5, 6)]


@pytest.mark.parametrize("how", aggregation.AGGREGATIONS)
def test_empty_and_unlabelled_inputs(how):
    empty = candidates([])
    assert aggregation.class_evidence(empty, LABELS, 3, how).empty
    assert aggregation.class_evidence(candidates([("nobody", 1.0, 1.0, 0, 0)]), LABELS, 3, how).empty


def test_unknown_aggregation_is_named():
    with pytest.raises(ValueError, match="predict.aggregation must be one of sum, max, mean_best, verified"):
        aggregation.class_evidence(BUILDING_VS_STREET, LABELS, 3, "median")


def test_candidate_table_puts_verified_rows_first():
    shortlist = pd.DataFrame({"query_id": ["q"] * 3, "index_id": ["a", "b", "c"], "rank": [1, 2, 3],
                              "score": [0.9, 0.8, 0.7]})
    rerank = pd.DataFrame({"query_id": ["q", "q"], "index_id": ["a", "b"], "global_score": [0.9, 0.8],
                           "matches": [10, 40], "inliers": [0, 25], "score": [0.9, 1.63], "status": ["ok", "ok"]})
    table = aggregation.candidate_table(shortlist, rerank)
    assert table[["index_id", "rank", "inliers", "verified"]].values.tolist() == [
        ["b", 1, 25, 1], ["a", 2, 0, 1], ["c", 3, 0, 0]]
    assert aggregation.candidate_table(shortlist, None)["verified"].tolist() == [0, 0, 0]


# ---------------------------------------------------------------- calibration


def test_logistic_fit_recovers_known_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2))
    y = rng.random(20000) < 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0 * x[:, 1] + 0.5)))
    weights, bias = calibration.fit_logistic(x, y, l2=1e-6)
    np.testing.assert_allclose(np.append(weights, bias), [2.0, -1.0, 0.5], atol=0.08)


def test_logistic_fit_of_a_hand_worked_sample():
    # no features: the bias is the log-odds of the sample, 3 right of 4 -> log(3)
    weights, bias = calibration.fit_logistic(np.zeros((4, 0)), np.array([1, 1, 1, 0]), l2=1.0)
    assert weights.shape == (0,) and bias == pytest.approx(np.log(3), abs=1e-5)


def test_fit_gives_probabilities_that_match_the_truth():
    rng = np.random.default_rng(1)
    inliers = rng.integers(0, 60, size=4000)
    truth = 1 / (1 + np.exp(-(np.log1p(inliers) - 2.5) * 2))  # right more often with more inliers
    evidence = pd.DataFrame({"score": rng.random(4000), "margin": rng.random(4000), "best_inliers": inliers,
                             "agree": rng.integers(0, 3, 4000), "best_global": rng.random(4000)})
    fitted = calibration.fit(evidence, rng.random(4000) < truth, l2=1e-3)
    np.testing.assert_allclose(fitted.probability(evidence), truth, atol=0.06)
    assert abs(fitted.weights[fitted.features.index("log_inliers")]) > 5 * max(
        abs(w) for n, w in zip(fitted.features, fitted.weights) if n != "log_inliers")
    again = calibration.Calibration(**__import__("json").loads(fitted.to_json()))
    np.testing.assert_allclose(again.probability(evidence), fitted.probability(evidence))


def test_fit_needs_right_and_wrong_predictions():
    evidence = pd.DataFrame({"score": [1.0, 2.0], "margin": [1, 1], "best_inliers": [3, 4], "agree": [1, 1],
                             "best_global": [0.5, 0.5]})
    with pytest.raises(ValueError, match="calibration needs right and wrong predictions; got 2 right of 2"):
        calibration.fit(evidence, np.array([1, 1]))


def test_threshold_table_by_hand():
    confidence = np.array([0.9, 0.8, 0.6, 0.4, 0.2])
    right = np.array([1, 0, 1, 1, 0], bool)
    table = calibration.threshold_table(confidence, right, np.array([0.0, 0.5, 0.85, 0.95]))
    # t=0: keep all 5, 3 right: P 3/5, R 3/3, F1 2*.6*1/1.6 = 0.75
    # t=0.5: keep .9 .8 .6 (2 right): P 2/3, R 2/3, F1 2/3
    # t=0.85: keep .9 (right): P 1, R 1/3, F1 0.5
    # t=0.95: keep nothing: P 1 (by convention), R 0, F1 0
    assert table["kept"].tolist() == [5, 3, 1, 0]
    np.testing.assert_allclose(table["precision"], [0.6, 2 / 3, 1, 1])
    np.testing.assert_allclose(table["recall"], [1, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(table["f1"], [0.75, 2 / 3, 0.5, 0])
    assert calibration.chosen_thresholds(table) == {"precision": 0.85, "recall": 0.0, "f1": 0.0}


def test_threshold_table_of_nothing():
    table = calibration.threshold_table(np.zeros(0), np.zeros(0, bool), np.array([0.5]))
    assert table[["kept", "precision", "recall", "f1"]].values.tolist() == [[0, 1.0, 0.0, 0.0]]


def test_reliability_bins_by_hand():
    table = calibration.reliability(np.array([0.05, 0.15, 0.12, 0.95, 1.0]), np.array([0, 1, 0, 1, 1]), bins=10)
    assert table["count"].tolist() == [1, 2, 2]
    np.testing.assert_allclose(table["confidence"], [0.05, 0.135, 0.975])
    np.testing.assert_allclose(table["observed"], [0, 0.5, 1])


# ---------------------------------------------------------------- non-landmarks


def test_nonlandmark_similarity_by_hand():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    non_landmarks = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # query 0: cosines 1, 0.6, 0 -> best two 1 and 0.6 -> 0.8; query 1: 0, 0.8, 1 -> 0.9
    np.testing.assert_allclose(nonlandmarks.nonlandmark_similarity(queries, non_landmarks, 2), [0.8, 0.9])
    np.testing.assert_allclose(nonlandmarks.nonlandmark_similarity(queries, non_landmarks, 9), [1.6 / 3, 1.8 / 3])
    assert nonlandmarks.nonlandmark_similarity(np.zeros((0, 2)), non_landmarks).shape == (0,)


def test_nonlandmark_similarity_refuses_an_empty_set_or_other_dimension():
    with pytest.raises(ValueError, match="non-landmark set is empty"):
        nonlandmarks.nonlandmark_similarity(np.ones((1, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="differ in dimension"):
        nonlandmarks.nonlandmark_similarity(np.ones((1, 2)), np.ones((1, 3)))


def test_nonlandmark_feature_is_best_global_minus_closeness(tmp_path):
    queries = write_store(tmp_path / "q", {"q0": global_only([1.0, 0.0]), "q1": global_only([0.0, 1.0])}, 4)
    others = write_store(tmp_path / "n", {"n0": global_only([0.0, 1.0])}, 4)
    best = pd.DataFrame({"query_id": ["q1", "q0"], "best_global": [0.5, 0.5]})
    assert nonlandmarks.add_nonlandmark(best, queries, others)["nonlandmark"].tolist() == [-0.5, 0.5]


# ---------------------------------------------------------------- frequent distractors


@pytest.mark.parametrize("max_share, expected", [
    (0.0, [1, 1, 1, 1, 1]),  # off
    (0.2, [0.25, 0.25, 0.25, 0.25, 1]),  # S: 4 of 5 (share 0.8) -> 0.2 / 0.8; B: share 0.2 -> 1
    (0.5, [0.625, 0.625, 0.625, 0.625, 1]),
    (0.8, [1, 1, 1, 1, 1]),
])
def test_frequency_factor_by_hand(max_share, expected):
    labels = pd.Series(["S", "S", "S", "S", "B"])
    np.testing.assert_allclose(aggregation.frequency_factor(labels, max_share), expected)
    assert aggregation.frequency_factor(pd.Series([], dtype=object), max_share).shape == (0,)
