"""Validation figures of held-out images against the rest (pure NumPy over embeddings).

Each query ranks every other image (never itself) by cosine similarity: mAP@100 of that
ranking (a hit is an image of the query's place), top-1 (the nearest image's place is the
query's) and GAP of the nearest image's place with its similarity as the confidence, as
``delf-pipeline evaluate`` computes them.
"""
from __future__ import annotations

import numpy as np

from ..metrics.recognition import accuracy, global_average_precision
from ..metrics.retrieval import RETRIEVAL_DEPTH, retrieval_metrics


def figures(embeddings: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """{"map@100", "top1", "gap", "queries"} of the rows ``queries`` (indices) of ``embeddings``
    [N, D] (L2-normalised), each against all other rows; labels: [N]."""
    labels = np.asarray(labels)
    queries = np.asarray(queries, np.int64)
    if not len(queries):
        raise ValueError("validation needs at least one query image")
    similarity = embeddings[queries] @ embeddings.T
    similarity[np.arange(len(queries)), queries] = -np.inf
    depth = min(RETRIEVAL_DEPTH, len(labels) - 1)
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :depth]
    rankings = {str(q): [str(i) for i in row] for q, row in zip(queries, top)}
    relevant = {str(q): {str(i) for i in np.flatnonzero(labels == labels[q]) if i != q} for q in queries}
    solution = {str(q): {str(labels[q])} for q in queries}
    predictions = {str(q): (str(labels[row[0]]), float(similarity[k, row[0]])) for k, (q, row) in enumerate(zip(queries, top))}
    retrieval = retrieval_metrics(rankings, relevant)
    return {"map@100": retrieval["map@100"], "top1": accuracy(predictions, solution),
            "gap": global_average_precision(predictions, solution), "queries": len(queries)}
