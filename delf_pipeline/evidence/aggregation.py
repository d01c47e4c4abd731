"""Per-class evidence of a query's ranked candidates, and the aggregations that pick its class.

A query's candidates are its final ranking (re-ranked candidates first, then the rest of its
shortlist), one row each in a *candidate table*::

    query_id, index_id, rank, score, global_score, inliers, verified

``score`` is the rerank score (global score for unverified rows), ``inliers`` the RANSAC
inliers (0 for unverified rows) and ``verified`` 1 for re-ranked rows. The ``top_k`` best
ranked candidates of a query give each of their classes (landmark ids) a score:

* ``sum``: the sum of the class's scores (Kaggle 2020 host baseline). A class with many
  index photos gets many votes: a street with 29 photos beats a building with one photo.
* ``max``: the class's best score. One vote per class.
* ``mean_best``: the class's scores summed and divided by ``min(top_k, n)``, ``n`` the
  class's photos in the index: the mean of the best ``min(top_k, n)`` candidates the class
  could place in the top ``top_k``, a missing one counting 0. A one-photo class is judged on
  its single candidate, a 29-photo class on its best ``top_k``, so size alone wins nothing.
* ``verified``: verified geometric evidence first, by lexicographic order of (inliers of the
  class's best verified candidate, candidates of the class that verify with inliers > 0,
  best global score), encoded as ``inliers + (agree + (global + 1) / 2) / (top_k + 1)``.
  An unverified candidate's global score never outweighs one inlier.

:func:`class_evidence` also gives each (query, class) the features that calibration uses
(:mod:`delf_pipeline.evidence.calibration`): best inliers, agreeing candidates, best global
score, and the margin of the class's aggregated score over the next class.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pandas as pd

log = logging.getLogger("delf_pipeline.evidence")

AGGREGATIONS = ("sum", "max", "mean_best", "verified")
CANDIDATE_COLUMNS = ("query_id", "index_id", "rank", "score", "global_score", "inliers", "verified")
EVIDENCE_COLUMNS = ("query_id", "label", "score", "margin", "best_inliers", "agree", "best_global", "votes")


def candidate_table(shortlist: pd.DataFrame, rerank: pd.DataFrame | None) -> pd.DataFrame:
    """Final ranking with evidence columns (CANDIDATE_COLUMNS): re-ranked first, then the rest by global score.

    shortlist: ``query_id,index_id,score`` (global score) rows; rerank: ``query_id,index_id,
    global_score,inliers,score`` rows or None (global-only: every row unverified).
    """
    base = shortlist[["query_id", "index_id", "score"]].assign(global_score=shortlist["score"], inliers=0, verified=0)
    if rerank is not None and len(rerank):
        verified = rerank[["query_id", "index_id", "score", "global_score", "inliers"]].assign(verified=1)
        keys = set(zip(verified["query_id"], verified["index_id"]))
        rest = base[[key not in keys for key in zip(base["query_id"], base["index_id"])]]
        base = pd.concat([verified, rest], ignore_index=True)
    ordered = base.sort_values(["query_id", "verified", "score", "index_id"], ascending=[True, False, False, True],
                               kind="stable").reset_index(drop=True)
    ordered.insert(2, "rank", ordered.groupby("query_id", sort=False).cumcount() + 1)
    ordered["inliers"] = ordered["inliers"].astype(np.int64)
    return ordered[list(CANDIDATE_COLUMNS)]


def class_evidence(candidates: pd.DataFrame, labels: dict[str, str], top_k: int, how: str) -> pd.DataFrame:
    """One row per (query, class) voted by the ``top_k`` best candidates: EVIDENCE_COLUMNS.

    ``score`` is the class's aggregated score under ``how`` (one of AGGREGATIONS); ``margin``
    is that score minus the next class's score of the same query (the score itself when the
    class is alone). Rows of a query are sorted best class first (ties: smaller label text).
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"predict.aggregation must be one of {', '.join(AGGREGATIONS)}, got {how!r}")
    top = candidates[candidates["rank"] <= top_k].assign(label=lambda t: t["index_id"].map(labels))
    unlabelled = int(top["label"].isna().sum())
    if unlabelled:
        log.warning("%d shortlisted index images have no label and do not vote", unlabelled)
    top = top.dropna(subset=["label"])
    if top.empty:
        return pd.DataFrame(columns=list(EVIDENCE_COLUMNS))
    top = top.assign(agrees=(top["verified"] > 0) & (top["inliers"] > 0),
                     verified_inliers=top["inliers"].where(top["verified"] > 0, 0))
    grouped = top.groupby(["query_id", "label"], sort=True)
    classes = grouped.agg(total=("score", "sum"), best=("score", "max"), votes=("score", "size"),
                          best_inliers=("verified_inliers", "max"), agree=("agrees", "sum"),
                          best_global=("global_score", "max")).reset_index()
    classes["score"] = _aggregate(classes, labels, top_k, how)
    classes = classes.sort_values(["query_id", "score", "label"], ascending=[True, False, True], kind="stable")
    following = classes.groupby("query_id", sort=False)["score"].shift(-1).fillna(0.0)
    classes["margin"] = classes["score"] - following
    classes[["best_inliers", "agree", "votes"]] = classes[["best_inliers", "agree", "votes"]].astype(np.int64)
    return classes[list(EVIDENCE_COLUMNS)].reset_index(drop=True)


def _aggregate(classes: pd.DataFrame, labels: dict[str, str], top_k: int, how: str) -> pd.Series:
    """Aggregated score per row of ``classes`` (columns total, best, best_inliers, agree, best_global)."""
    if how == "sum":
        return classes["total"]
    if how == "max":
        return classes["best"]
    if how == "mean_best":
        sizes = Counter(labels.values())
        return classes["total"] / np.minimum(top_k, classes["label"].map(sizes).to_numpy())
    return classes["best_inliers"] + (classes["agree"] + (classes["best_global"] + 1.0) / 2.0) / (top_k + 1)


def best_classes(evidence: pd.DataFrame) -> pd.DataFrame:
    """The best class of each query: the first row per query of :func:`class_evidence`'s output."""
    return evidence.drop_duplicates("query_id").reset_index(drop=True)


def frequency_factor(labels: pd.Series, max_share: float) -> np.ndarray:
    """[N] confidence factor of each prediction: min(1, max_share / share of its label).

    share = the fraction of all N predictions that name this label. A landmark predicted for
    more than ``max_share`` of the queries (a frequent distractor: a place whose photos look
    like many things) has its confidences scaled down in proportion, after the idea of
    smlyaka's 2019 ban of landmark ids predicted too often; 0 turns the rule off (all ones).
    """
    if max_share <= 0 or labels.empty:
        return np.ones(len(labels))
    share = labels.map(labels.value_counts(normalize=True)).to_numpy(np.float64)
    return np.minimum(1.0, max_share / share)
