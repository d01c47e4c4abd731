"""SuperGlobal's training-free re-ranking of a shortlist by global descriptors alone
(Shao, Chen, Karpur, Cui, Araujo, Cao, "Global Features are All You Need for Image Retrieval
and Reranking", ICCV 2023, section 3.3), for one query's top-M candidates at a time:

1. each candidate x_i is refined with its ``neighbours`` nearest candidates (by inner product,
   within the same top-M set): ``x'_i = (x_i + sum_j beta s_ij x_j) / (1 + sum_j beta s_ij)``;
2. the refined candidates are scored against the query, ``s1_i = q . x'_i``;
3. the expanded query is the element-wise maximum of the refined descriptors of the
   ``neighbours + 1`` best candidates by ``s1`` (max-pooling; the query itself is not in it),
   and ``s2_i = q_e . x'_i``;
4. the candidate's new score is ``(s1_i + s2_i) / 2``.

The refined vectors are not re-normalised (as in the authors' description), so the new
scores are not cosines: they order a query's candidates, they are not comparable with
another query's global scores in the way cosines are.
"""
from __future__ import annotations

import numpy as np

BETA = 0.15  # the paper's weight of a neighbour's similarity in the refinement


def refine(candidates: np.ndarray, neighbours: int, beta: float = BETA) -> np.ndarray:
    """Candidates [M, D] -> refined [M, D]: each one averaged with its ``neighbours`` most similar
    other candidates, weighted ``beta * similarity`` (itself weighing 1)."""
    x = np.asarray(candidates, np.float32)
    count = min(neighbours, len(x) - 1)
    if count <= 0:
        return x.copy()
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argpartition(-similarity, count - 1, axis=1)[:, :count]
    weights = beta * np.take_along_axis(similarity, nearest, 1)  # [M, count]
    summed = x + np.einsum("mk,mkd->md", weights, x[nearest])
    return summed / (1.0 + weights.sum(axis=1, keepdims=True))


def rescore(query: np.ndarray, candidates: np.ndarray, neighbours: int, beta: float = BETA) -> np.ndarray:
    """SuperGlobal scores [M] of one query [D] against its top-M candidates [M, D]."""
    if not len(candidates):
        return np.zeros(0, np.float32)
    refined = refine(candidates, neighbours, beta)
    first = refined @ np.asarray(query, np.float32)
    best = np.argsort(-first, kind="stable")[: neighbours + 1]
    expanded = refined[best].max(axis=0)
    return ((first + refined @ expanded) / 2).astype(np.float32)


def rerank_rows(queries: np.ndarray, rows: np.ndarray, scores: np.ndarray, vectors, depth: int,
                neighbours: int, beta: float = BETA) -> tuple[np.ndarray, np.ndarray]:
    """Each query's first ``depth`` candidates re-ordered by :func:`rescore`.

    queries [Q, D]; rows, scores [Q, K]: a search's result, best first (a row of -inf score is
    padding and stays last); vectors(rows [n]) -> [n, D]: the candidates' descriptors. Returns
    (rows, scores) [Q, min(K, depth)]: the re-ordered candidates with their new scores.
    """
    keep = min(rows.shape[1], depth)
    out_rows = np.array(rows[:, :keep], copy=True)
    out_scores = np.full(out_rows.shape, -np.inf, np.float32)
    for q in range(len(queries)):
        valid = np.isfinite(scores[q, :keep])
        found = rows[q, :keep][valid]
        new = rescore(queries[q], vectors(found), neighbours, beta)
        order = np.argsort(-new, kind="stable")
        out_rows[q, : len(found)] = found[order]
        out_scores[q, : len(found)] = new[order]
    return out_rows, out_scores
