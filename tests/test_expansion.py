"""Golden tests of descriptors.expansion (query expansion, DBA) on a tiny hand-worked index.

Index: a = (1, 0), b = (0.6, 0.8), c = (0, 1); similarities a.b = 0.6, a.c = 0, b.c = 0.8.
"""
from __future__ import annotations

import numpy as np
import pytest

from delf_pipeline.descriptors.expansion import (
    augment_database,
    expand_queries,
    neighbour_weights,
    supervised_dba,
)

A, B, C = np.array([1.0, 0.0]), np.array([0.6, 0.8]), np.array([0.0, 1.0])
INDEX = np.stack([A, B, C])


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def test_average_qe_by_hand():
    """Query a, first results b (0.6) and c (0): a + b + c = (1.6, 1.8)."""
    out = expand_queries(A[None], np.stack([B, C])[None], np.array([[0.6, 0.0]]), alpha=0)
    np.testing.assert_allclose(out, [unit([1.6, 1.8])], rtol=1e-6)


def test_alpha_qe_by_hand():
    """alpha = 2: weights 0.36 and 0 -> a + 0.36 b = (1.216, 0.288)."""
    out = expand_queries(A[None], np.stack([B, C])[None], np.array([[0.6, 0.0]]), alpha=2)
    np.testing.assert_allclose(out, [unit([1.216, 0.288])], rtol=1e-6)


def test_alpha_qe_ignores_negative_similarities():
    neighbours = np.stack([B, -A])[None]
    out = expand_queries(A[None], neighbours, np.array([[0.6, -1.0]]), alpha=3)
    np.testing.assert_allclose(out, [unit(A + 0.216 * B)], rtol=1e-6)
    np.testing.assert_array_equal(neighbour_weights(np.array([[0.5, -0.5]]), 1.0), [[0.5, 0.0]])


@pytest.mark.parametrize("num_queries, n", [(0, 2), (2, 0), (0, 0)])
def test_qe_empty_nocrash(num_queries, n):
    queries = np.tile(A * 2, (num_queries, 1))
    out = expand_queries(queries, np.zeros((num_queries, n, 2)), np.zeros((num_queries, n)), alpha=3)
    assert out.shape == (num_queries, 2)
    np.testing.assert_allclose(out, np.tile(A, (num_queries, 1)))  # no neighbour: the query, normalised


def test_dba_by_hand():
    """top 2 with itself: a -> a + b = (1.6, 0.8); b -> b + c = (0.6, 1.8); c -> c + b = (0.6, 1.8)."""
    neighbours = np.stack([np.stack([A, B]), np.stack([B, C]), np.stack([C, B])])
    sims = np.array([[1.0, 0.6], [1.0, 0.8], [1.0, 0.8]])
    out = augment_database(neighbours, sims, alpha=0)
    np.testing.assert_allclose(out, [unit([1.6, 0.8]), unit([0.6, 1.8]), unit([0.6, 1.8])], rtol=1e-6)
    # alpha 1: a -> a + 0.6 b = (1.36, 0.48)
    np.testing.assert_allclose(augment_database(neighbours[:1], sims[:1], alpha=1), [unit([1.36, 0.48])], rtol=1e-6)


def test_supervised_dba_by_hand():
    """Labels x, x, y: a and b average each other (a + b = (1.6, 0.8) for both); c stays c
    although b is its nearest image, since b has another label."""
    out = supervised_dba(INDEX, np.array(["x", "x", "y"], dtype=object), top_n=2)
    np.testing.assert_allclose(out, [unit([1.6, 0.8]), unit([1.6, 0.8]), C], rtol=1e-6)


def test_supervised_dba_top_n_and_unlabelled():
    """top_n 1 keeps each image itself; an unlabelled image is only normalised."""
    labels = np.array(["x", "x", ""], dtype=object)
    np.testing.assert_allclose(supervised_dba(INDEX * 3, labels, top_n=1), INDEX, rtol=1e-6)
    out = supervised_dba(INDEX * 3, labels, top_n=5)
    np.testing.assert_allclose(out[2], C)
    np.testing.assert_allclose(out[0], unit([1.6, 0.8]), rtol=1e-6)


def test_supervised_dba_empty():
    assert supervised_dba(np.zeros((0, 4)), np.array([], dtype=object), top_n=3).shape == (0, 4)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        neighbour_weights(np.ones((1, 1)), -1)
    with pytest.raises(ValueError, match="neighbours \\[Q, n, D\\]"):
        expand_queries(A[None], np.stack([B, C]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="neighbours \\[B, n, D\\]"):
        augment_database(np.stack([B, C]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        supervised_dba(INDEX, np.array(["x"] * 3, dtype=object), top_n=0)
    with pytest.raises(ValueError, match="one label per descriptor"):
        supervised_dba(INDEX, np.array(["x"], dtype=object), top_n=2)
