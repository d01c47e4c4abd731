"""Query expansion (QE) and database-side augmentation (DBA) of L2-normalised global descriptors.

Both replace a descriptor by the weighted sum of itself and its nearest neighbours, then
L2-normalise (Chum et al. 2007 average QE; Radenovic et al. 2018 alpha-QE; Arandjelovic &
Zisserman 2012 DBA). A neighbour with similarity s weighs ``max(s, 0) ** alpha``; alpha = 0
gives every neighbour weight 1 (average QE / plain averaging DBA).

* QE: the query weighs 1, plus its ``top_n`` first results.
* DBA: an index image's ``top_n`` nearest index images *including itself* (similarity 1),
  so it weighs 1 as well; :func:`supervised_dba` takes neighbours only among the images with
  the same label (as the 2019 retrieval winners, Yokoo et al., did on the train set).

The neighbour search is :mod:`delf_pipeline.retrieval.search`'s; :func:`expand_blocks` and
:func:`expand_in_memory` run it for query expansion, the others only combine vectors.
"""
from __future__ import annotations

import numpy as np

from ..config import ShortlistSettings
from ..formats.store import FeatureStore
from ..retrieval.search import MatMul, search_blocks, top_k_in_memory
from .whitening import l2_normalize


def neighbour_weights(similarities: np.ndarray, alpha: float) -> np.ndarray:
    """Weights [Q, n] of neighbours with similarities [Q, n]: ``max(s, 0) ** alpha`` (alpha 0: all 1)."""
    if alpha < 0:
        raise ValueError(f"query expansion alpha must be >= 0, got {alpha}")
    s = np.asarray(similarities, np.float32)
    return np.ones_like(s) if alpha == 0 else np.maximum(s, 0.0) ** np.float32(alpha)


def expand_queries(queries: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray,
                   alpha: float = 0.0) -> np.ndarray:
    """alpha-QE: queries [Q, D], their first results' descriptors [Q, n, D] and similarities [Q, n]
    -> ``normalize(q + sum_i w_i x_i)`` [Q, D] float32 (n may be 0: queries unchanged, normalised)."""
    q, x = np.asarray(queries, np.float32), np.asarray(neighbours, np.float32)
    if x.ndim != 3 or x.shape[0] != len(q) or np.shape(similarities) != x.shape[:2]:
        raise ValueError(f"need neighbours [Q, n, D] and similarities [Q, n] for {len(q)} queries, got "
                         f"{x.shape} and {np.shape(similarities)}")
    weights = neighbour_weights(similarities, alpha)
    return l2_normalize(q + np.einsum("qn,qnd->qd", weights, x))


def augment_database(neighbours: np.ndarray, similarities: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """DBA of a block of index images: each one's ``n`` nearest index images (itself included)
    as descriptors [B, n, D] with similarities [B, n] -> ``normalize(sum_i w_i x_i)`` [B, D]."""
    x = np.asarray(neighbours, np.float32)
    if x.ndim != 3 or np.shape(similarities) != x.shape[:2]:
        raise ValueError(f"need neighbours [B, n, D] and similarities [B, n], got {x.shape} and "
                         f"{np.shape(similarities)}")
    return l2_normalize(np.einsum("bn,bnd->bd", neighbour_weights(similarities, alpha), x))


def supervised_dba(descriptors: np.ndarray, labels: np.ndarray, top_n: int, alpha: float = 0.0) -> np.ndarray:
    """DBA where each index image [N, D] averages its ``top_n`` most similar images *of its own
    label* (itself included); images without a label ("" or None) are only normalised."""
    x = np.asarray(descriptors, np.float32)
    labels = np.asarray(labels, dtype=object)
    if labels.shape != (len(x),):
        raise ValueError(f"need one label per descriptor: {len(x)} descriptors, labels of shape {labels.shape}")
    if top_n < 1:
        raise ValueError(f"DBA top_n must be >= 1, got {top_n}")
    out = l2_normalize(x)
    for label in set(labels.tolist()) - {None, ""}:
        rows = np.flatnonzero(labels == label)
        members = x[rows]
        sims = members @ members.T
        n = min(top_n, len(rows))
        # stable sort on -similarity: ties keep the lower row, as the shortlist does
        nearest = np.argsort(-sims, axis=1, kind="stable")[:, :n]
        out[rows] = augment_database(members[nearest], np.take_along_axis(sims, nearest, 1), alpha)
    return out


def expand_blocks(matrices: list[np.ndarray], blocks: list[list[str]], index: FeatureStore, conf: ShortlistSettings,
                  matmul: MatMul) -> list[np.ndarray]:
    """Query expansion of each block [Q_b, G]: a first search for the ``qe_top_n`` first results
    (never the query itself with exclude_same_id), then :func:`expand_queries`."""
    exclude, n = bool(conf.exclude_same_id), conf.qe_top_n
    index_ids, results = search_blocks(matrices, index, n + exclude, conf.chunk_rows, matmul)
    expanded = []
    for query_ids, matrix, (rows, scores) in zip(blocks, matrices, results):
        rows, scores = _without_self(query_ids, index_ids, rows, scores, n) if exclude else (rows[:, :n], scores[:, :n])
        neighbours = index.global_matrix([index_ids[r] for r in rows.reshape(-1)]).reshape(*rows.shape, -1)
        expanded.append(expand_queries(matrix, neighbours, scores, conf.qe_alpha))
    return expanded


def expand_in_memory(queries: np.ndarray, matrix: np.ndarray, conf: ShortlistSettings, matmul: MatMul) -> np.ndarray:
    """Query expansion of queries [Q, G] against an index held in memory, matrix [M, G] float32."""
    rows, scores = top_k_in_memory(queries, matrix, conf.qe_top_n, matmul)
    return expand_queries(queries, matrix[rows], scores, conf.qe_alpha)


def _without_self(query_ids: list[str], index_ids: list[str], rows: np.ndarray, scores: np.ndarray,
                  n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` of rows / scores [Q, K] (K <= n + 1) that are not the query's own id."""
    own = np.array([[index_ids[r] == q for r in row] for q, row in zip(query_ids, rows)], bool).reshape(rows.shape)
    keep = np.argsort(own, axis=1, kind="stable")[:, :min(n, rows.shape[1] - 1)]  # own id moves to the end
    return np.take_along_axis(rows, keep, 1), np.take_along_axis(scores, keep, 1)
