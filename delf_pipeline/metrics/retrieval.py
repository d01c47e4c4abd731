"""Retrieval metrics (pure functions): mAP@100, precision@k, recall@k, MRR (GLDv2 retrieval)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

RETRIEVAL_DEPTH = 100  # mAP@100 of the GLDv2 retrieval challenge


def relevant_index_images(solution: Mapping[str, set[str]], images_by_label: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """{query id: index images whose landmark is among the query's true landmarks}."""
    empty: set[str] = set()
    return {q: set().union(*(images_by_label.get(label, empty) for label in labels)) for q, labels in solution.items()}


def _hit_matrix(rankings: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], queries: list[str], depth: int) -> np.ndarray:
    """hits [Q, depth] bool: the image at rank k of query q is relevant (repeats of an
    image count once, at its first rank; short rankings are padded with misses)."""
    hits = np.zeros((len(queries), depth), dtype=bool)
    for row, q in enumerate(queries):
        seen: set[str] = set()
        for k, image in enumerate(rankings.get(q, ())[:depth]):
            hits[row, k] = image in relevant[q] and image not in seen
            seen.add(image)
    return hits


def _first_relevant(ranking: Sequence[str], relevant: set[str]) -> int | None:
    """1-based rank of the first relevant image of a whole ranking, None if there is none."""
    return next((k for k, image in enumerate(ranking, start=1) if image in relevant), None)


def retrieval_metrics(
    rankings: Mapping[str, Sequence[str]],
    relevant: Mapping[str, set[str]],
    ks: Sequence[int] = (1, 5, 10, 100),
) -> dict:
    """Retrieval metrics over the queries of ``relevant`` with m_q >= 1 relevant images.

    mAP@100 = (1/Q) sum_q 1/min(m_q, 100) sum_{k<=100} P_q(k) rel_q(k) (GLDv2 retrieval);
    precision@k = hits in top k / k; recall@k = hits in top k / m_q; MRR = mean 1/rank of
    the first relevant image over the whole ranking (0 if none). A query missing from
    ``rankings`` has an empty ranking. Queries with m_q = 0 are skipped and counted.
    Returns {"map@100", "mrr", "precision@k", "recall@k" per k, "queries", "skipped_no_relevant"}.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive ranks, got {tuple(ks)}")
    queries = sorted(q for q, images in relevant.items() if images)
    if not queries:
        raise ValueError("no query has a relevant index image: retrieval metrics are undefined")
    hits = _hit_matrix(rankings, relevant, queries, max(RETRIEVAL_DEPTH, max(ks)))
    found = np.cumsum(hits, axis=1)
    m = np.array([len(relevant[q]) for q in queries], dtype=np.float64)
    ranks = np.arange(1, hits.shape[1] + 1)
    top = slice(0, RETRIEVAL_DEPTH)
    ap = np.sum((found / ranks)[:, top] * hits[:, top], axis=1) / np.minimum(m, RETRIEVAL_DEPTH)
    reciprocal = [1.0 / (_first_relevant(rankings.get(q, ()), relevant[q]) or math.inf) for q in queries]
    out = {"map@100": float(ap.mean()), "mrr": float(np.mean(reciprocal))}
    for k in ks:
        out[f"precision@{k}"] = float(np.mean(found[:, k - 1] / k))
        out[f"recall@{k}"] = float(np.mean(found[:, k - 1] / m))
    out.update(queries=len(queries), skipped_no_relevant=len(relevant) - len(queries))
    return out
