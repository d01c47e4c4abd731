"""Revisited Oxford/Paris evaluation (Radenovic et al. 2018; the revisitop protocol), pure functions."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

PROTOCOLS = ("easy", "medium", "hard")


def trapezoidal_ap(positive_ranks: np.ndarray, num_positives: int) -> float:
    """revisitop AP: positive_ranks [P] sorted 0-based ranks (junk removed) of the found
    positives, num_positives all positives. Each positive adds recall 1/num_positives times
    the mean of the precision just before it (j/r, 1 at r = 0) and at it ((j+1)/(r+1))."""
    r = np.asarray(positive_ranks, dtype=np.float64)
    j = np.arange(r.size, dtype=np.float64)
    before = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    return float(np.sum((before + (j + 1) / (r + 1)) / 2) / num_positives) if num_positives else 0.0


def _precision_at(positive_ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """revisitop mP@k of one query [len(ks)]: k is clipped to the last positive's rank."""
    if positive_ranks.size == 0:
        return np.zeros(len(ks))
    one_based = positive_ranks + 1
    cut = np.minimum(one_based.max(), np.asarray(ks))
    return (one_based[None, :] <= cut[:, None]).sum(axis=1) / cut


def _as_list(ids) -> list:
    """Any sequence or array of ids as a flat list of Python scalars (hashable, comparable)."""
    return np.asarray(ids).ravel().tolist()


def _protocol_split(truth: Mapping[str, Sequence], protocol: str) -> tuple[set, set]:
    """(positives, ignored) of one query: easy = (easy, hard+junk), medium = (easy+hard,
    junk), hard = (hard, easy+junk)."""
    easy, hard, junk = (set(_as_list(truth.get(key, ()))) for key in ("easy", "hard", "junk"))
    split = {"easy": (easy, hard | junk), "medium": (easy | hard, junk), "hard": (hard, easy | junk)}
    return split[protocol]


def _query_scores(ranking: list, positives: set, ignored: set, ks: Sequence[int]) -> tuple[float, np.ndarray]:
    """(AP, mP@k [len(ks)]) of one query, ignored images removed from the ranking first."""
    positive_at = np.flatnonzero([image in positives for image in ranking])
    ignored_at = np.flatnonzero([image in ignored for image in ranking])
    adjusted = positive_at - np.searchsorted(ignored_at, positive_at)
    return trapezoidal_ap(adjusted, len(positives)), _precision_at(adjusted, ks)


def _ranked_lists(ranks: np.ndarray | Sequence[Sequence], num_queries: int) -> list[list]:
    """Per query its ranked ids: the columns of a [n_index, n_query] array, or the sequences."""
    if isinstance(ranks, np.ndarray) and ranks.ndim == 2:
        lists = [_as_list(column) for column in ranks.T]
    else:
        lists = [_as_list(ranking) for ranking in ranks]
    if len(lists) != num_queries:
        raise ValueError(f"rankings for {len(lists)} queries but ground truth for {num_queries}")
    return lists


def revisited_map(
    ranks: np.ndarray | Sequence[Sequence],
    ground_truth: Sequence[Mapping[str, Sequence]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict]:
    """Revisited Oxford/Paris evaluation (Radenovic et al. 2018, revisitop protocol).

    ranks: int array [n_index, n_query] (column q: index positions best first, as in
    revisitop) or one ranked sequence of index ids per query (may be partial).
    ground_truth: per query a dict with 'easy', 'hard', 'junk' sequences of index ids.
    Per protocol (easy / medium / hard, see :func:`_protocol_split`) the ignored images
    are removed from the ranking, AP is :func:`trapezoidal_ap` over all positives
    (positives missing from a partial ranking add 0) and mP@k clips k to the last
    positive's rank. Queries with no positive are skipped (AP NaN) and counted.
    Returns {protocol: {"map", "mp@k": {k: value}, "ap": [n_query], "queries", "skipped"}}.
    """
    lists = _ranked_lists(ranks, len(ground_truth))
    return {protocol: _protocol_metrics(lists, ground_truth, protocol, ks) for protocol in PROTOCOLS}


def _protocol_metrics(lists: list[list], ground_truth: Sequence[Mapping], protocol: str, ks: Sequence[int]) -> dict:
    aps = np.full(len(lists), np.nan)
    precisions = np.full((len(lists), len(ks)), np.nan)
    for q, (ranking, truth) in enumerate(zip(lists, ground_truth)):
        positives, ignored = _protocol_split(truth, protocol)
        if positives:
            aps[q], precisions[q] = _query_scores(ranking, positives, ignored, ks)
    valid = ~np.isnan(aps)
    mean_ap = float(aps[valid].mean()) if valid.any() else math.nan
    mean_p = precisions[valid].mean(axis=0) if valid.any() else np.full(len(ks), np.nan)
    return {
        "map": mean_ap,
        "mp@k": {int(k): float(v) for k, v in zip(ks, mean_p)},
        "ap": aps.tolist(),
        "queries": int(valid.sum()),
        "skipped": int((~valid).sum()),
    }
