"""The hand-over from shortlist to rerank: a shortlist table -> each query's candidates.

This is the one place that decides which shortlisted index images are verified: the
``num_to_rerank`` best-ranked rows of each query (by ``rank``). Extraction of their local
features (``extract --candidates``), the time budget and the rerank stage all ask here.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .blocks import read_table

Candidates = dict[str, list[tuple[str, float]]]
SHORTLIST_COLUMNS = ("query_id", "index_id", "rank", "score")


def top_candidates(shortlist: pd.DataFrame, num_to_rerank: int) -> Candidates:
    """query id -> [(index id, global score)] of its ``num_to_rerank`` best-ranked candidates."""
    ordered = shortlist.sort_values(["query_id", "rank"], kind="stable")
    top = ordered.groupby("query_id", sort=True).head(num_to_rerank)
    result: Candidates = {}
    for query_id, index_id, score in zip(top["query_id"], top["index_id"], top["score"]):
        result.setdefault(query_id, []).append((index_id, float(score)))
    return result


def candidate_ids(candidates: Candidates) -> set[str]:
    """Union of the index images of ``candidates`` (each image once)."""
    return {index_id for pairs in candidates.values() for index_id, _ in pairs}


def read_candidates(shortlist_csv: str | Path, num_to_rerank: int) -> Candidates:
    """:func:`top_candidates` of the shortlist CSV at ``shortlist_csv``."""
    return top_candidates(read_table(Path(shortlist_csv), SHORTLIST_COLUMNS), num_to_rerank)
