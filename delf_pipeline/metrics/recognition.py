"""Recognition metrics (pure functions): Kaggle GAP and top-1 accuracy.

Definitions follow ``docs/design.md`` (Kaggle's GAP, micro-AP over one prediction per query).
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

Prediction = tuple[str, float]
log = logging.getLogger(__name__)


def _known_predictions(predictions: Mapping[str, Prediction | None], solution: Mapping[str, set[str]]) -> dict[str, Prediction]:
    """Predictions (not None) of ids in the solution; unknown ids are dropped with a warning."""
    unknown = sorted(q for q in predictions if q not in solution)
    if unknown:
        log.warning("%d submission id(s) not in the solution are ignored, e.g. %s", len(unknown), unknown[:3])
    return {q: p for q, p in predictions.items() if p is not None and q in solution}


def _landmark_query_count(solution: Mapping[str, set[str]]) -> int:
    count = sum(1 for labels in solution.values() if labels)
    if count == 0:
        raise ValueError("the solution has no query with a true landmark: GAP and accuracy are undefined")
    return count


def global_average_precision(
    predictions: Mapping[str, Prediction | None],
    solution: Mapping[str, set[str]],
    ignore_non_landmarks: bool = False,
) -> float:
    """Kaggle GAP (micro-AP): GAP = (1/M) sum_i P(i) rel(i).

    The one (label, confidence) of every predicted query is pooled and sorted by
    confidence descending (ties: query id, then label, ascending); P(i) is the precision
    of the first i pooled predictions, rel(i) whether prediction i is a true landmark of
    its query, M the number of queries with at least one true landmark. Predictions on
    non-landmark queries only add false positives, unless ``ignore_non_landmarks`` drops
    them first. Queries without a prediction add nothing.
    """
    num_landmark_queries = _landmark_query_count(solution)
    scored = _known_predictions(predictions, solution)
    if ignore_non_landmarks:
        scored = {q: p for q, p in scored.items() if solution[q]}
    ids = sorted(scored)  # one prediction per query, so (query id, label) order is query id order
    confidence = np.array([scored[q][1] for q in ids], dtype=np.float64)
    hits = np.array([scored[q][0] in solution[q] for q in ids], dtype=bool)
    return gap_of_pooled(confidence, hits, num_landmark_queries)


def pooled_precision(confidence: np.ndarray, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GAP's pooling: (order [N], precision [N]) of predictions given in query-id order.

    confidence: [N] float; hits: [N] bool (prediction right). ``order`` sorts them by
    confidence descending, ties kept in the given (query id) order; ``precision[i]`` is the
    precision of the first i + 1 predictions in that order.
    """
    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
    ranked_hits = np.asarray(hits, dtype=bool)[order]
    return order, np.cumsum(ranked_hits) / np.arange(1, ranked_hits.size + 1)


def gap_of_pooled(confidence: np.ndarray, hits: np.ndarray, num_landmark_queries: int) -> float:
    """GAP = (1/M) sum_i P(i) rel(i) of predictions [N] in query-id order (see :func:`pooled_precision`)."""
    order, precision = pooled_precision(confidence, hits)
    return float(np.sum(precision[np.asarray(hits, dtype=bool)[order]]) / num_landmark_queries)


def accuracy(predictions: Mapping[str, Prediction | None], solution: Mapping[str, set[str]]) -> float:
    """Top-1 accuracy over queries with a true landmark; no prediction counts as wrong."""
    num_landmark_queries = _landmark_query_count(solution)
    scored = _known_predictions(predictions, solution)
    correct = sum(1 for q, labels in solution.items() if labels and q in scored and scored[q][0] in labels)
    return correct / num_landmark_queries
