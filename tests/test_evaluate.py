"""Tests of the evaluate stage: golden metric values worked by hand, file readers, the
submission validator and the ``evaluate`` / ``validate-submission`` commands."""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from support import SHARED_DATA

from delf_pipeline import cli
from delf_pipeline.evaluate import evaluate
from delf_pipeline.formats.tables import (
    read_ids,
    read_ranking,
    read_solution,
    read_submission,
    validate_submission,
)
from delf_pipeline.metrics.recognition import accuracy, global_average_precision
from delf_pipeline.metrics.retrieval import retrieval_metrics
from delf_pipeline.metrics.revisitop import revisited_map, trapezoidal_ap

DATA = SHARED_DATA


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- GAP and accuracy


def official_case():
    """The recognition case of the official delf ``metrics_test.py`` (ids shortened)."""
    solution = {"q1": {"0", "12"}, "q2": {"100", "200", "300"}, "q3": {"1"}, "q4": set(), "q5": set()}
    predictions = {"q2": ("0", 0.01), "q3": ("1", 10.0), "q4": ("150", 15.0)}
    return predictions, solution


def test_gap_official_case():
    # M = 3 landmark queries (q1, q2, q3). Pooled by confidence: q4 (15, non-landmark: FP),
    # q3 (10, correct: P = 1/2), q2 (0.01, wrong). GAP = (1/2) / 3 = 0.166667.
    predictions, solution = official_case()
    assert global_average_precision(predictions, solution) == pytest.approx(1 / 6)


def test_gap_official_case_ignoring_non_landmarks():
    # q4 dropped: q3 correct (P = 1/1), q2 wrong. GAP = 1 / 3 = 0.333333.
    predictions, solution = official_case()
    assert global_average_precision(predictions, solution, ignore_non_landmarks=True) == pytest.approx(1 / 3)


def test_accuracy_official_case():
    # Landmark queries q1 (no prediction), q2 (wrong), q3 (right): 1 / 3.
    predictions, solution = official_case()
    assert accuracy(predictions, solution) == pytest.approx(1 / 3)


def mixed_case():
    solution = {"q1": {"A"}, "q2": {"B"}, "q3": {"C", "D"}, "q4": set(), "q5": {"E"}, "q6": {"F"}}
    predictions = {
        "q5": ("E", 0.5), "q4": ("A", 0.6), "q3": ("D", 0.7), "q2": ("X", 0.8), "q1": ("A", 0.9), "q6": None,
    }
    return predictions, solution


def test_gap_mixed_case():
    # M = 5 (q1, q2, q3, q5, q6). By confidence: q1 hit (P 1/1), q2 miss, q3 hit (P 2/3),
    # q4 miss (non-landmark), q5 hit (P 3/5); q6 has no prediction.
    # GAP = (1 + 2/3 + 3/5) / 5 = (34/15) / 5 = 34/75 = 0.453333.
    predictions, solution = mixed_case()
    assert global_average_precision(predictions, solution) == pytest.approx(34 / 75)


def test_gap_mixed_case_ignoring_non_landmarks():
    # Without q4: q1 hit (1/1), q2 miss, q3 hit (2/3), q5 hit (3/4). GAP = (29/12) / 5 = 29/60.
    predictions, solution = mixed_case()
    assert global_average_precision(predictions, solution, ignore_non_landmarks=True) == pytest.approx(29 / 60)


def test_accuracy_mixed_case():
    # q1, q3, q5 right; q2 wrong; q6 no prediction: 3 / 5.
    predictions, solution = mixed_case()
    assert accuracy(predictions, solution) == pytest.approx(0.6)


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_gap_ties_sorted_by_query_id(order):
    # Equal confidence: query id ascending, so a (wrong) comes before b (right), whatever
    # the input order. P at b = 1/2, M = 2: GAP = 0.25 (the other order would give 0.5).
    solution = {"a": {"1"}, "b": {"2"}}
    given = {"a": ("9", 0.5), "b": ("2", 0.5)}
    predictions = {q: given[q] for q in order}
    assert global_average_precision(predictions, solution) == pytest.approx(0.25)


def test_gap_queries_without_prediction():
    # M = 3; only a is predicted (right, P = 1); b is None and c is absent: GAP = 1/3.
    solution = {"a": {"1"}, "b": {"2"}, "c": {"3"}}
    predictions = {"a": ("1", 0.9), "b": None}
    assert global_average_precision(predictions, solution) == pytest.approx(1 / 3)
    assert accuracy(predictions, solution) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "non_landmark_prediction, expected, expected_ignoring",
    [
        (("5", 0.9), 0.5, 1.0),  # n first (FP), a second (P = 1/2): 0.5 / 1; ignoring n: 1
        (("5", 0.1), 1.0, 1.0),  # a first (P = 1), n after it adds no term
        (None, 1.0, 1.0),  # a non-landmark query without prediction costs nothing
    ],
)
def test_gap_non_landmark_queries(non_landmark_prediction, expected, expected_ignoring):
    solution = {"a": {"1"}, "n": set()}
    predictions = {"a": ("1", 0.8), "n": non_landmark_prediction}
    assert global_average_precision(predictions, solution) == pytest.approx(expected)
    assert global_average_precision(predictions, solution, ignore_non_landmarks=True) == pytest.approx(expected_ignoring)


def test_gap_empty_submission_is_zero():
    solution = {"a": {"1"}, "b": set()}
    assert global_average_precision({}, solution) == 0.0
    assert accuracy({}, solution) == 0.0


def test_gap_all_correct_is_one():
    solution = {f"q{i}": {str(i)} for i in range(7)}
    predictions = {f"q{i}": (str(i), float(i % 3)) for i in range(7)}
    assert global_average_precision(predictions, solution) == pytest.approx(1.0)
    assert accuracy(predictions, solution) == pytest.approx(1.0)


def test_gap_unknown_ids_are_ignored_with_warning(caplog):
    # "zz" is not in the solution: ignored (not a false positive), with a warning.
    solution = {"a": {"1"}}
    with caplog.at_level(logging.WARNING, logger="delf_pipeline.evaluate"):
        gap = global_average_precision({"zz": ("1", 0.99), "a": ("1", 0.5)}, solution)
    assert gap == pytest.approx(1.0)
    assert "not in the solution" in caplog.text


def test_gap_without_landmark_queries_is_an_error():
    with pytest.raises(ValueError, match="no query with a true landmark"):
        global_average_precision({"a": ("1", 1.0)}, {"a": set()})


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_official_case():
    # Retrieval case of the official delf metrics_test.py (ids shortened):
    # q1 no ranking: AP 0; q2 [x0, r10] relevant {r10}: hit at 2, AP = (1/2)/1;
    # q3 [r40] relevant {r30, r40, r50}: AP = 1/3; q4 [r30, r40] relevant {r30}: AP 1.
    # mAP@100 = (0 + 1/2 + 1/3 + 1) / 4 = 0.458333; P@1 = (0+0+1+1)/4 = 0.5;
    # P@2 = (0 + 1/2 + 1/2 + 1/2)/4 = 0.375; MRR = (0 + 1/2 + 1 + 1)/4 = 0.625.
    relevant = {"q1": {"r10", "r20"}, "q2": {"r10"}, "q3": {"r30", "r40", "r50"}, "q4": {"r30"}}
    rankings = {"q2": ["x0", "r10"], "q3": ["r40"], "q4": ["r30", "r40"]}
    out = retrieval_metrics(rankings, relevant, ks=(1, 2))
    assert out["map@100"] == pytest.approx(0.458333, abs=1e-6)
    assert out["precision@1"] == pytest.approx(0.5)
    assert out["precision@2"] == pytest.approx(0.375)
    assert out["mrr"] == pytest.approx(0.625)
    # R@2 = (0 + 1/1 + 1/3 + 1/1) / 4 = 7/12
    assert out["recall@2"] == pytest.approx(7 / 12)


def test_retrieval_duplicates_skipped_and_missing_queries():
    # q1 [x, a, a, b, y], relevant {a, b, c}: hits at 2 and 4 (the repeated a counts
    # once): AP = (1/2 + 2/4) / 3 = 1/3, P@5 = 2/5, R@5 = 2/3, MRR = 1/2.
    # q2 has no relevant image: skipped. q3 has no ranking: AP 0, P 0, R 0, MRR 0.
    relevant = {"q1": {"a", "b", "c"}, "q2": set(), "q3": {"z"}}
    rankings = {"q1": ["x", "a", "a", "b", "y"], "q2": ["a"]}
    out = retrieval_metrics(rankings, relevant, ks=(1, 5))
    assert out["map@100"] == pytest.approx(1 / 6)
    assert out["precision@1"] == 0.0
    assert out["precision@5"] == pytest.approx(0.2)
    assert out["recall@5"] == pytest.approx(1 / 3)
    assert out["mrr"] == pytest.approx(0.25)
    assert (out["queries"], out["skipped_no_relevant"]) == (2, 1)


def test_retrieval_map_divides_by_at_most_100():
    # 150 relevant images, the first 100 ranked are all relevant: AP@100 = 100 / min(150, 100) = 1.
    relevant = {"q": {f"i{k}" for k in range(150)}}
    out = retrieval_metrics({"q": [f"i{k}" for k in range(120)]}, relevant)
    assert out["map@100"] == pytest.approx(1.0)
    assert out["recall@100"] == pytest.approx(100 / 150)


def test_retrieval_mrr_looks_beyond_depth():
    # First relevant image at rank 150: MRR 1/150 though mAP@100 is 0.
    ranking = [f"x{k}" for k in range(149)] + ["hit"]
    out = retrieval_metrics({"q": ranking}, {"q": {"hit"}})
    assert out["map@100"] == 0.0
    assert out["mrr"] == pytest.approx(1 / 150)


@pytest.mark.parametrize("relevant", [{}, {"q": set()}])
def test_retrieval_without_relevant_images_is_an_error(relevant):
    with pytest.raises(ValueError, match="no query has a relevant"):
        retrieval_metrics({"q": ["a"]}, relevant)


def test_retrieval_empty_rankings_score_zero():
    out = retrieval_metrics({}, {"q": {"a"}, "r": {"b"}})
    assert out["map@100"] == out["mrr"] == out["precision@1"] == out["recall@100"] == 0.0


def test_retrieval_rejects_bad_ks():
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics({}, {"q": {"a"}}, ks=(0, 5))


# ----------------------------------------------------------------------------- revisited Oxford / Paris


def revisited_case():
    """Two queries over index images 0..5 (ranks array [n_index, n_query], revisitop layout)."""
    ranks = np.array([[3, 0, 5, 1, 4, 2], [2, 0, 1, 3, 4, 5]]).T
    ground_truth = [
        {"easy": [0, 4], "hard": [1], "junk": [5]},
        {"easy": [2], "hard": [], "junk": []},
    ]
    return ranks, ground_truth


def test_trapezoidal_ap_hand_values():
    # Positives at 0-based ranks [1, 2] of 2: (0/1 + 1/2)/2 + (1/2 + 2/3)/2 = 0.25 + 7/12 = 5/6,
    # times recall step 1/2 = 5/12. One positive at rank 0: (1 + 1)/2 = 1.
    assert trapezoidal_ap(np.array([1, 2]), 2) == pytest.approx(5 / 12)
    assert trapezoidal_ap(np.array([0]), 1) == pytest.approx(1.0)
    assert trapezoidal_ap(np.array([], dtype=int), 3) == 0.0


def test_revisited_golden_values():
    # Query 1, ranking [3, 0, 5, 1, 4, 2], easy {0, 4}, hard {1}, junk {5}:
    # - easy: ignore {1, 5} -> [3, 0, 4, 2]; positives at ranks [1, 2] of 2: AP 5/12;
    #   mP@1: k clipped to min(3, 1) = 1, 0 positives -> 0; mP@5: k = min(3, 5) = 3 -> 2/3.
    # - medium: ignore {5} -> [3, 0, 1, 4, 2]; positives at [1, 2, 3] of 3:
    #   (0 + 1/2)/2 + (1/2 + 2/3)/2 + (2/3 + 3/4)/2 = 6/24 + 14/24 + 17/24 = 37/24; /3 = 37/72;
    #   mP@5: k = min(4, 5) = 4 -> 3/4.
    # - hard: ignore {0, 4, 5} -> [3, 1, 2]; positive at [1] of 1: (0 + 1/2)/2 = 1/4; mP@5: k = 2 -> 1/2.
    # Query 2, ranking [2, 0, 1, 3, 4, 5], easy {2}: AP 1, mP@k 1 for easy and medium;
    # no hard positive: skipped in hard.
    ranks, ground_truth = revisited_case()
    out = revisited_map(ranks, ground_truth, ks=(1, 5))
    assert out["easy"]["map"] == pytest.approx((5 / 12 + 1) / 2)
    assert out["easy"]["mp@k"] == pytest.approx({1: 0.5, 5: (2 / 3 + 1) / 2})
    assert out["medium"]["map"] == pytest.approx((37 / 72 + 1) / 2)
    assert out["medium"]["mp@k"] == pytest.approx({1: 0.5, 5: (3 / 4 + 1) / 2})
    assert out["hard"]["map"] == pytest.approx(0.25)
    assert out["hard"]["mp@k"] == pytest.approx({1: 0.0, 5: 0.5})
    assert (out["hard"]["queries"], out["hard"]["skipped"]) == (1, 1)
    assert math.isnan(out["hard"]["ap"][1])


def test_revisited_partial_ranking_counts_all_positives():
    # Positives {a, b}, only a is ranked (first): AP = (1 + 1)/2 * 1/2 = 0.5 (revisitop divides
    # by all positives, not by those found).
    out = revisited_map([["a", "x"]], [{"easy": ["a", "b"], "hard": [], "junk": []}])
    assert out["easy"]["map"] == pytest.approx(0.5)
    assert out["medium"]["map"] == pytest.approx(0.5)
    assert math.isnan(out["hard"]["map"])


@pytest.mark.parametrize("num_index, num_queries", [(1, 1), (6, 2), (30, 5)])
def test_revisited_array_and_lists_agree(num_index, num_queries):
    rng = np.random.default_rng(num_index)
    ranks = np.stack([rng.permutation(num_index) for _ in range(num_queries)], axis=1)
    kinds = [rng.integers(0, 4, num_index) for _ in range(num_queries)]  # 0 negative, 1 easy, 2 hard, 3 junk
    truth = [{key: np.flatnonzero(k == v) for key, v in (("easy", 1), ("hard", 2), ("junk", 3))} for k in kinds]
    from_array = revisited_map(ranks, truth)
    from_lists = revisited_map([list(ranks[:, q]) for q in range(num_queries)], truth)
    for protocol in ("easy", "medium", "hard"):
        assert len(from_array[protocol]["ap"]) == num_queries
        np.testing.assert_allclose(from_array[protocol]["ap"], from_lists[protocol]["ap"])
        assert all(0.0 <= ap <= 1.0 for ap in from_array[protocol]["ap"] if not math.isnan(ap))


def test_revisited_perfect_ranking_scores_one():
    ranks = np.arange(4)[:, None]  # [n_index 4, n_query 1]: 0, 1, 2, 3
    out = revisited_map(ranks, [{"easy": [0], "hard": [1], "junk": [3]}])
    assert out["medium"]["map"] == pytest.approx(1.0)
    assert out["medium"]["mp@k"][1] == pytest.approx(1.0)


def test_revisited_query_count_mismatch():
    with pytest.raises(ValueError, match="rankings for 1 queries but ground truth for 2"):
        revisited_map([[0]], [{"easy": [0]}, {"easy": [0]}])


def test_revisited_empty_queries():
    out = revisited_map([], [])
    assert math.isnan(out["easy"]["map"]) and out["easy"]["queries"] == 0


# ----------------------------------------------------------------------------- files


def test_read_submission(tmp_path):
    path = write(tmp_path / "s.csv", 'id,landmarks\nq1,12 0.5\nq2,\n"q3","park  0.25 "\n')
    assert read_submission(path) == {"q1": ("12", 0.5), "q2": None, "q3": ("park", 0.25)}


def test_read_submission_header_only_is_empty(tmp_path):
    assert read_submission(write(tmp_path / "s.csv", "id,landmarks\n")) == {}


def test_read_submission_raises_with_line_numbers(tmp_path):
    path = write(tmp_path / "s.csv", "id,landmarks\nq1,12 abc\n")
    with pytest.raises(ValueError, match=r"line 2: confidence 'abc' is not a number"):
        read_submission(path)


def test_validate_submission_reports_every_problem(tmp_path):
    text = (
        "id,landmark\n"  # 1: wrong header
        "q1,12 0.5\n"  # 2: fine
        "q1,13 0.4\n"  # 3: duplicate
        "q2,12 0.5,extra\n"  # 4: three columns
        "q3,12\n"  # 5: no confidence
        "q4,12 nan\n"  # 6: non-finite
        "q5,12 high\n"  # 7: unparsable
        "q6,1 0.5 2 0.4\n"  # 8: two labels
        ",1 0.5\n"  # 9: empty id
        "q7,\n"  # 10: fine (no prediction)
    )
    problems = validate_submission(write(tmp_path / "s.csv", text))
    assert problems == [
        "line 1: header must be 'id,landmarks', got 'id,landmark'",
        "line 3: duplicate id 'q1' (first on line 2)",
        "line 4: expected 2 columns (id,landmarks), found 3",
        "line 5: expected '<landmark_id> <confidence>', got '12'",
        "line 6: confidence 'nan' is not finite",
        "line 7: confidence 'high' is not a number",
        "line 8: more than one label (2); one '<landmark_id> <confidence>' is allowed",
        "line 9: empty id",
    ]


def test_validate_submission_expected_ids(tmp_path):
    path = write(tmp_path / "s.csv", "id,landmarks\nq1,1 0.5\nzz,2 0.5\n")
    assert validate_submission(path, expected_ids=["q1", "q2", "q3"]) == [
        "line 3: id 'zz' is not among the expected ids",
        "end of file: 2 expected id(s) missing: 'q2', 'q3'",
    ]
    assert validate_submission(path, expected_ids=["q1", "zz"]) == []


def test_validate_submission_empty_file(tmp_path):
    assert validate_submission(write(tmp_path / "s.csv", "")) == [
        "line 1: empty file, expected the header 'id,landmarks'"
    ]


SOLUTION = "id,landmarks,Usage\nq1,1,Public\nq2,2 3,Private\nq3,,Public\nq4,9,Ignored\n"


@pytest.mark.parametrize(
    "usage, expected",
    [
        (None, {"q1": {"1"}, "q2": {"2", "3"}, "q3": set()}),
        ("all", {"q1": {"1"}, "q2": {"2", "3"}, "q3": set()}),
        ("Public", {"q1": {"1"}, "q3": set()}),
        ("private", {"q2": {"2", "3"}}),
    ],
)
def test_read_solution_usage(tmp_path, usage, expected):
    assert read_solution(write(tmp_path / "sol.csv", SOLUTION), usage) == expected


@pytest.mark.parametrize(
    "text, usage, message",
    [
        ("id,landmarks\nq1,1\n", "Public", "no Usage column"),
        (SOLUTION, "Secret", "usage must be Public, Private or all"),
        ("id,landmarks,Usage\nq1,1,Later\n", None, "line 2: Usage must be one of"),
        ("id,landmarks\nq1,1\nq1,2\n", None, "line 3: duplicate id 'q1'"),
        ("id,labels\nq1,1\n", None, "lacks column"),
        ("", None, "empty file"),
    ],
)
def test_read_solution_errors(tmp_path, text, usage, message):
    with pytest.raises(ValueError, match=message):
        read_solution(write(tmp_path / "sol.csv", text), usage)


def test_read_ranking_by_rank(tmp_path):
    path = write(tmp_path / "r.csv", "query_id,index_id,rank\nq,b,2\nq,a,1\np,c,1\n")
    assert read_ranking(path) == {"p": ["c"], "q": ["a", "b"]}


def test_read_ranking_by_score_then_global_score(tmp_path):
    # rerank output: score desc, ties broken by global_score desc; ids stay strings ("007").
    text = (
        "query_id,index_id,global_score,matches,inliers,score\n"
        "q,007,0.1,9,5,5\nq,b,0.9,9,5,5\nq,c,0.5,9,8,8\n"
    )
    assert read_ranking(write(tmp_path / "r.csv", text)) == {"q": ["c", "b", "007"]}


def test_read_ranking_header_only_is_empty(tmp_path):
    assert read_ranking(write(tmp_path / "r.csv", "query_id,index_id,score\n")) == {}


def test_read_ranking_needs_an_order(tmp_path):
    with pytest.raises(ValueError, match="needs a 'rank', 'score' or 'global_score'"):
        read_ranking(write(tmp_path / "r.csv", "query_id,index_id\nq,a\n"))


def test_read_ids(tmp_path):
    assert read_ids(write(tmp_path / "sample.csv", "id,landmarks\na,\nb,1 0.5\n")) == ["a", "b"]


# ----------------------------------------------------------------------------- stage and CLI


@pytest.fixture
def stage_files(tmp_path):
    """A submission, solution, ranking and index labels for three queries.

    Recognition: M = 2 (q1, q2). By confidence: q3 (non-landmark, FP), q1 hit (P = 1/2),
    q2 miss: GAP = 0.25; ignoring q3: q1 hit (P = 1) -> 0.5; accuracy 1/2.
    Retrieval (q3 has no landmark: skipped): q1 [i1 (L1), i2 (L2)], relevant {i1}: AP 1;
    q2 [i1, i3 (L2)], relevant {i2, i3}: hit at 2, AP = (1/2) / 2 = 1/4. mAP@100 = 5/8.
    """
    files = {
        "sub": "id,landmarks\nq1,L1 0.8\nq2,L1 0.1\nq3,L2 0.9\nextra,L1 0.3\n",
        "sol": "id,landmarks,Usage\nq1,L1,Public\nq2,L2,Private\nq3,,Public\n",
        "rank": "query_id,index_id,rank\nq1,i1,1\nq1,i2,2\nq2,i1,1\nq2,i3,2\n",
        "labels": "id,landmark_id\ni1,L1\ni2,L2\ni3,L2\n",
    }
    return {name: write(tmp_path / f"{name}.csv", text) for name, text in files.items()}


def test_evaluate_stage(stage_files, tmp_path):
    out_json = tmp_path / "out" / "metrics.json"
    result = evaluate(stage_files["sub"], stage_files["sol"], stage_files["rank"], stage_files["labels"], out_json)
    assert result["gap"] == pytest.approx(0.25)
    assert result["gap_ignoring_non_landmarks"] == pytest.approx(0.5)
    assert result["accuracy"] == pytest.approx(0.5)
    assert (result["queries"], result["landmark_queries"], result["predicted"], result["unknown_ids"]) == (3, 2, 3, 1)
    assert result["retrieval"]["map@100"] == pytest.approx(5 / 8)
    assert result["retrieval"]["skipped_no_relevant"] == 1
    assert json.loads(out_json.read_text()) == result


def test_evaluate_stage_usage_subset(stage_files):
    # Public: q1 (hit, 0.8) and q3 (non-landmark, 0.9, FP first): M = 1, GAP = (1/2) / 1.
    result = evaluate(stage_files["sub"], stage_files["sol"], usage="Public")
    assert result["gap"] == pytest.approx(0.5)
    assert result["queries"] == 2 and "retrieval" not in result


def test_evaluate_stage_needs_both_retrieval_files(stage_files):
    with pytest.raises(ValueError, match="need both a ranking and the index labels"):
        evaluate(stage_files["sub"], stage_files["sol"], ranking_path=stage_files["rank"])


def test_cli_evaluate(stage_files, tmp_path, capsys):
    out_json = tmp_path / "m.json"
    code = cli.main([
        "evaluate", "--predictions", str(stage_files["sub"]), "--solution", str(stage_files["sol"]),
        "--ranking", str(stage_files["rank"]), "--index-labels", str(stage_files["labels"]), "--json", str(out_json),
    ])
    assert code == 0
    written = json.loads(out_json.read_text())
    assert written["gap"] == pytest.approx(0.25) and written["accuracy"] == pytest.approx(0.5)
    assert "gap" in capsys.readouterr().out


def test_cli_evaluate_malformed_submission_exits_2(stage_files, tmp_path):
    bad = write(tmp_path / "bad.csv", "id,landmarks\nq1,L1 x\n")
    assert cli.main(["evaluate", "--predictions", str(bad), "--solution", str(stage_files["sol"])]) == 2


def test_cli_validate_submission(stage_files, tmp_path, capsys):
    sample = write(tmp_path / "sample.csv", "id,landmarks\nq1,\nq2,\nq3,\nq4,\n")
    assert cli.main(["validate-submission", str(stage_files["sub"])]) == 0
    assert cli.main(["validate-submission", str(stage_files["sub"]), "--sample", str(sample)]) == 1
    out = capsys.readouterr().out
    assert "line 5: id 'extra' is not among the expected ids" in out
    assert "end of file: 1 expected id(s) missing: 'q4'" in out


# ----------------------------------------------------------------------------- real data


def test_retrieval_on_landmarks_mini_labels():
    """Leave-one-out on the real label layout of landmarks_mini (79 photos, 11 places):
    every other photo is ranked, so R@100 = 1 and P@100 = m_q / 100 exactly."""
    labels_csv = DATA / "landmarks_mini" / "labels.csv"
    if not labels_csv.exists():
        pytest.skip(f"real test data not found at {labels_csv}")
    with open(labels_csv, newline="") as handle:
        label = {row["image"]: row["label"] for row in csv.DictReader(handle)}
    rng = np.random.default_rng(0)
    images = sorted(label)
    rankings = {q: [images[i] for i in rng.permutation(len(images)) if images[i] != q] for q in images}
    relevant = {q: {i for i in images if i != q and label[i] == label[q]} for q in images}
    out = retrieval_metrics(rankings, relevant)
    m = np.array([len(relevant[q]) for q in images if relevant[q]])
    assert out["recall@100"] == pytest.approx(1.0)
    assert out["precision@100"] == pytest.approx(m.mean() / 100)
    assert out["queries"] == 79 and out["skipped_no_relevant"] == 0


def test_index_labels_are_read_by_one_rule(tmp_path):
    """predict and evaluate read the same file alike: landmark_id or label, BOM or not."""
    from delf_pipeline.formats.tables import read_index_labels, read_labels

    (tmp_path / "kaggle.csv").write_text("\ufeffid,landmark_id\na,5\nb,5\nc,7\n", encoding="utf-8")
    (tmp_path / "plain.csv").write_text("id,label\na,5\nb,5\nc,7\n")
    for name in ("kaggle.csv", "plain.csv"):
        assert read_labels(tmp_path / name) == {"a": "5", "b": "5", "c": "7"}
        assert read_index_labels(tmp_path / name) == {"5": {"a", "b"}, "7": {"c"}}
