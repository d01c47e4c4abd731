"""Closeness of a query to known non-landmark images: the non-landmark evidence feature.

Following the Landmark Recognition 2020 winners, who penalised a query by its similarity to
the top-5/10 nearest of a set of images without a landmark (GLDv2 test images with no label),
the feature of query q predicted as class c is::

    nonlandmark(q) = best_global(q, c) - mean of the m largest cos(q, n) over non-landmark images n

best_global(q, c) is the cosine similarity of q to its closest shortlisted index image of
class c, and m = min(NEIGHBOURS, number of non-landmark images). It is positive when the
query looks more like its predicted landmark than like non-landmarks, negative otherwise.
It enters the calibration's logistic model as one more feature, so the penalty's weight is
fitted on the leave-one-out sample, not set by hand: P(right) falls as the feature falls
when the sample shows that it should.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..formats.store import FeatureStore, open_store

NEIGHBOURS = 5  # non-landmark images averaged per query (2020 1st place: top 5 or 10)


def nonlandmark_similarity(queries: np.ndarray, non_landmarks: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """[Q] mean of each query's ``neighbours`` largest cosine similarities to the non-landmark images.

    queries: [Q, G] and non_landmarks: [M, G], rows L2-normalised (M >= 1).
    """
    if len(non_landmarks) == 0:
        raise ValueError("the non-landmark set is empty: give a folder with at least one image")
    if queries.shape[1:] != non_landmarks.shape[1:]:
        raise ValueError(f"query descriptors {queries.shape} and non-landmark descriptors {non_landmarks.shape} "
                         "differ in dimension: extract both with the index's settings")
    m = min(neighbours, len(non_landmarks))
    similarity = np.asarray(queries, np.float32) @ np.asarray(non_landmarks, np.float32).T  # [Q, M]
    return -np.sort(-similarity, axis=1)[:, :m].mean(axis=1) if len(queries) else np.zeros(0, np.float32)


def add_nonlandmark(best: pd.DataFrame, query_store: str | Path | FeatureStore,
                    nonlandmark_store: str | Path) -> pd.DataFrame:
    """``best`` (best-class rows of aggregation.class_evidence) with the ``nonlandmark`` column."""
    if best.empty:
        return best.assign(nonlandmark=np.zeros(0))
    queries = open_store(query_store).global_matrix(best["query_id"].tolist())
    similarity = nonlandmark_similarity(queries, FeatureStore(nonlandmark_store).global_matrix())
    return best.assign(nonlandmark=best["best_global"].to_numpy(np.float64) - similarity)
