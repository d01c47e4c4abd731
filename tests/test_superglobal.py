"""SuperGlobal re-ranking (descriptors/superglobal.py) against small hand-worked cases."""
from __future__ import annotations

import numpy as np
import pytest

from delf_pipeline.descriptors.superglobal import refine, rerank_rows, rescore


def unit(*rows):
    x = np.array(rows, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_refine_by_hand():
    x = unit([1, 0], [0.6, 0.8], [0, 1])
    refined = refine(x, neighbours=1, beta=0.5)
    # candidate 0's nearest other is 1 (similarity 0.6): (x0 + 0.5 * 0.6 * x1) / 1.3
    assert np.allclose(refined[0], (x[0] + 0.3 * x[1]) / 1.3)
    # candidate 1's nearest others are 0 and 2, both at 0.6 or 0.8: 2 (0.8) wins
    assert np.allclose(refined[1], (x[1] + 0.4 * x[2]) / 1.4)
    assert np.allclose(refined[2], (x[2] + 0.4 * x[1]) / 1.4)


def test_rescore_by_hand():
    x = unit([1, 0], [0.6, 0.8], [0, 1])
    q = unit([1, 0.2])[0]
    refined = refine(x, 1, 0.5)
    first = refined @ q
    best = np.argsort(-first)[:2]
    expanded = refined[best].max(axis=0)
    assert np.allclose(rescore(q, x, 1, 0.5), (first + refined @ expanded) / 2)


@pytest.mark.parametrize("count", [0, 1])
def test_rescore_tiny_sets(count):
    x = unit(*([[1.0, 0.0]] * count)) if count else np.zeros((0, 2), np.float32)
    scores = rescore(np.array([1.0, 0.0], np.float32), x, neighbours=9)
    assert scores.shape == (count,)
    if count:
        assert np.allclose(scores, 1.0)  # alone: refined = itself, expanded = itself


def test_neighbours_lift_a_candidate_of_a_cluster():
    # the query sits nearer a lone distractor (row 0) than each view of a tight cluster (rows 1-3)
    x = unit([1, 0.05, 0], [0.8, 0, 0.6], [0.8, 0.02, 0.6], [0.8, -0.02, 0.6])
    q = unit([1, 0, 0.25])[0]
    plain = x @ q
    assert np.argmax(plain) == 0
    assert np.argmax(rescore(q, x, neighbours=2, beta=0.15)) in (1, 2, 3)


def test_rerank_rows_keeps_padding_last():
    matrix = unit([1, 0], [0.9, 0.1], [0, 1])
    rows = np.array([[1, 0, 9]])
    scores = np.array([[0.9, 0.8, -np.inf]], np.float32)
    new_rows, new_scores = rerank_rows(unit([1, 0.1]), rows, scores, lambda r: matrix[r], depth=3, neighbours=1)
    assert sorted(new_rows[0, :2].tolist()) == [0, 1] and new_rows[0, 2] == 9
    assert np.isinf(new_scores[0, 2]) and np.all(np.isfinite(new_scores[0, :2]))
    assert new_scores[0, 0] >= new_scores[0, 1]
    short_rows, _ = rerank_rows(unit([1, 0.1]), rows, scores, lambda r: matrix[r], depth=2, neighbours=1)
    assert short_rows.shape == (1, 2)
