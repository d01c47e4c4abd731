"""Putative descriptor matches between two images (kdtree, nn, mutual; Lowe's ratio test).

Descriptors are L2-normalised rows, so the descriptor distance is ``sqrt(max(0, 2 - 2 * cos))``.
The learned matcher ``lighterglue`` (:mod:`.lighterglue`) also needs keypoints, image sizes and
its model: the rerank's worker runs it, then the same verifier.
"""
from __future__ import annotations

import numpy as np

MATCHERS = ("kdtree", "nn", "mutual")  # by descriptors alone
LEARNED_MATCHERS = ("lighterglue",)


def match_descriptors(desc_a, desc_b, *, matcher: str, match_threshold: float, ratio: float = 0.0) -> np.ndarray:
    """Putative matches [M, 2] int64 (row in a, row in b), ordered by row in a.

    desc_a: [Na, D], desc_b: [Nb, D] L2-normalised (float16 is computed in float32). A
    match needs descriptor distance < match_threshold; ``ratio`` > 0 adds Lowe's test
    (matmul matchers only). Mutual matches are one-to-one even under exact ties.
    """
    if matcher in LEARNED_MATCHERS:
        raise ValueError(f"matcher {matcher!r} needs keypoints, image sizes and its model: the rerank runs it "
                         f"(verification.lighterglue), match_descriptors takes one of {', '.join(MATCHERS)}")
    if matcher == "kdtree" and ratio > 0:
        raise ValueError("the ratio test needs matcher 'nn' or 'mutual', not 'kdtree'")
    desc_a = np.asarray(desc_a, dtype=np.float32)  # no copy for float32 input
    desc_b = np.asarray(desc_b, dtype=np.float32)
    if len(desc_a) == 0 or len(desc_b) == 0:
        return np.zeros((0, 2), np.int64)
    if matcher == "kdtree":
        return _match_kdtree(desc_a, desc_b, match_threshold)
    similarity = desc_a @ desc_b.T  # [Na, Nb]
    best = similarity.argmax(axis=1)
    best_sim = similarity[np.arange(len(best)), best]
    keep = best_sim > 1.0 - 0.5 * match_threshold**2  # distance < threshold, no sqrt
    if ratio > 0:
        keep &= _passes_ratio(similarity, best_sim, ratio)
    if matcher == "mutual":
        keep &= best_sim >= similarity.max(axis=0)[best]  # column max: cheaper than argmax
    rows = np.flatnonzero(keep)
    if matcher == "mutual":
        _, first = np.unique(best[rows], return_index=True)  # a tie for a column keeps one row
        rows = rows[np.sort(first)]
    return np.stack([rows, best[rows]], axis=1)


def match_views(desc_a, views_a, desc_b, *, matcher: str = "mutual", match_threshold: float,
                ratio: float = 0.0) -> np.ndarray:
    """Putative matches [M, 2] int64 (row in a, row in b), ordered by row in a, of a's features
    found in simulated views (:func:`delf_pipeline.extractors.views.extract_views`) against b's.

    Each view of a is matched to b on its own (:func:`match_descriptors`), so a feature of b
    can be the mutual neighbour of one feature in every view; it keeps the match of the first
    view (views are numbered by tilt: the least distorted view of the point wins). Measured on
    the EVD pairs against keeping the most similar match: 11/15 against 8/15 true pairs above
    every swapped pair, within one inlier of noise (REPORT of issue 23).
    views_a: [Na] int, the view of each row of desc_a.
    """
    desc_a = np.asarray(desc_a, dtype=np.float32)
    views_a = np.asarray(views_a)
    if views_a.shape != (len(desc_a),):
        raise ValueError(f"views_a must be [{len(desc_a)}] (one view per row of desc_a), got {views_a.shape}")
    parts = [np.zeros((0, 2), np.int64)]
    for view in np.unique(views_a):  # ascending: a b matched in several views is first met in the lowest
        rows = np.flatnonzero(views_a == view)
        found = match_descriptors(desc_a[rows], desc_b, matcher=matcher, match_threshold=match_threshold, ratio=ratio)
        parts.append(np.stack([rows[found[:, 0]], found[:, 1]], axis=1))
    pairs = np.concatenate(parts)
    _, first = np.unique(pairs[:, 1], return_index=True)
    kept = pairs[first]
    return kept[np.argsort(kept[:, 0], kind="stable")]


def _match_kdtree(desc_a: np.ndarray, desc_b: np.ndarray, match_threshold: float) -> np.ndarray:
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(desc_b).query(desc_a, distance_upper_bound=match_threshold)
    rows = np.flatnonzero(nearest < len(desc_b))  # misses come back as index Nb
    return np.stack([rows, nearest[rows]], axis=1).astype(np.int64)


def _passes_ratio(similarity: np.ndarray, best_sim: np.ndarray, ratio: float) -> np.ndarray:
    """Lowe's test on distances: d1 < ratio * d2, i.e. 2 - 2 s1 < ratio^2 (2 - 2 s2)."""
    if similarity.shape[1] < 2:
        return np.ones(len(similarity), bool)  # no second neighbour: nothing to compare
    second = np.partition(similarity, -2, axis=1)[:, -2]
    return (1.0 - best_sim) < ratio**2 * (1.0 - second)
