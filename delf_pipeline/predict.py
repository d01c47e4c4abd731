"""Stage 4, predict: per-class score aggregation into a Kaggle ``submission.csv``.

The final ranking of a query is its re-ranked candidates (by rerank score), followed by the
rest of its shortlist (by global score); without a rerank file it is the shortlist alone
(global-only recognition). The ``top_k`` best candidates vote for their landmark: a class
scores the sum (or max) of its candidates' scores, and the best class is the prediction,
with that score as confidence, as the Kaggle 2020 host baseline does.

Writes ``submission.csv`` (``id,landmarks`` with ``"<landmark_id> <confidence>"``; every
query id exactly once, an empty cell where a query has no candidate) and, beside it,
``ranking.csv`` (``query_id,index_id,rank,score``) for the retrieval metrics.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path
from typing import Iterable

import pandas as pd

from .config import load_config
from .formats.store import FeatureStore
from .formats.tables import read_ids, read_labels
from .utils.artifacts import atomic_path, write_text_atomic
from .utils.blocks import read_table

log = logging.getLogger("delf_pipeline.predict")


def run(
    config: dict,
    shortlist_csv: str | Path,
    index_labels: dict[str, str],
    query_ids: Iterable[str],
    out: str | Path,
    *,
    rerank_csv: str | Path | None = None,
) -> Path:
    """Write ``out`` (submission.csv) and ``ranking.csv`` beside it; returns ``out``."""
    conf, out = config["predict"], Path(out)
    ranking = final_ranking(read_table(Path(shortlist_csv)), read_table(Path(rerank_csv)) if rerank_csv else None)
    with atomic_path(out.with_name("ranking.csv")) as tmp:
        ranking.to_csv(tmp, index=False)
    predictions = aggregate(ranking, index_labels, conf["top_k"], conf["aggregation"])
    ids = list(dict.fromkeys(query_ids))
    write_text_atomic(out, submission_csv(ids, predictions))
    answered = sum(1 for i in ids if i in predictions)
    log.info("submission %s: %d queries, %d with a prediction, %d empty", out, len(ids), answered, len(ids) - answered)
    return out


def final_ranking(shortlist: pd.DataFrame, rerank: pd.DataFrame | None) -> pd.DataFrame:
    """Rows ``query_id,index_id,rank,score``: re-ranked candidates first, then the rest by global score."""
    base = shortlist[["query_id", "index_id", "score"]].assign(verified=0)
    if rerank is not None and len(rerank):
        verified = rerank[["query_id", "index_id", "score"]].assign(verified=1)
        keys = set(zip(verified["query_id"], verified["index_id"]))
        rest = base[[key not in keys for key in zip(base["query_id"], base["index_id"])]]
        base = pd.concat([verified, rest], ignore_index=True)
    ordered = base.sort_values(["query_id", "verified", "score", "index_id"], ascending=[True, False, False, True],
                               kind="stable")
    ordered = ordered.drop(columns="verified").reset_index(drop=True)
    ordered.insert(2, "rank", ordered.groupby("query_id", sort=False).cumcount() + 1)
    return ordered


def aggregate(ranking: pd.DataFrame, labels: dict[str, str], top_k: int, how: str) -> dict[str, tuple[str, float]]:
    """query id -> (landmark id, confidence) from the ``top_k`` best ranked candidates."""
    best = class_scores(ranking, labels, top_k, how).drop_duplicates("query_id")
    return {q: (label, float(score)) for q, label, score in zip(best["query_id"], best["label"], best["score"])}


def class_scores(ranking: pd.DataFrame, labels: dict[str, str], top_k: int, how: str) -> pd.DataFrame:
    """Rows ``query_id,label,score``: every class voted for by a query's ``top_k`` best ranked
    candidates, with its pooled score; each query's classes best first (ties: label)."""
    if how not in ("sum", "max"):
        raise ValueError(f"predict.aggregation must be sum or max, got {how!r}")
    top = ranking[ranking["rank"] <= top_k].copy()
    top["label"] = top["index_id"].map(labels)
    unlabelled = int(top["label"].isna().sum())
    if unlabelled:
        log.warning("%d shortlisted index images have no label and do not vote", unlabelled)
    per_class = top.dropna(subset=["label"]).groupby(["query_id", "label"], sort=True)["score"].agg(how)
    if per_class.empty:
        return pd.DataFrame({"query_id": [], "label": [], "score": []})
    ordered = per_class.reset_index().sort_values(["query_id", "score", "label"], ascending=[True, False, True])
    return ordered.reset_index(drop=True)


def submission_csv(query_ids: list[str], predictions: dict[str, tuple[str, float]]) -> str:
    """Kaggle submission text: header ``id,landmarks``, one row per query id."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "landmarks"])
    for query_id in query_ids:
        label_score = predictions.get(query_id)
        writer.writerow([query_id, f"{label_score[0]} {label_score[1]:.6f}" if label_score else ""])
    return buffer.getvalue()


def query_ids(store: str | Path, listed_csv: str | Path | None = None) -> list[str]:
    """The ids that need a submission row: those of ``listed_csv`` (e.g. sample_submission.csv,
    when it exists) in its order, then every other query of ``store``, failed images included."""
    found = FeatureStore(store)
    ids = sorted(set(found.ids) | {error.id for error in found.errors()})
    if listed_csv is None or not Path(listed_csv).exists():
        return ids
    listed = read_ids(listed_csv)
    return listed + sorted(set(ids) - set(listed))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import add_config_arguments

    parser.add_argument("--shortlist", required=True, help="shortlist CSV from `delf-pipeline shortlist`")
    parser.add_argument("--rerank", help="rerank CSV from `delf-pipeline rerank` (omit for global-only predictions)")
    parser.add_argument("--index-labels", required=True, help="CSV with id,landmark_id of the index images")
    parser.add_argument("--queries", required=True,
                        help="query feature store (its ids, failed ones included) or a CSV with an id column "
                             "such as sample_submission.csv")
    parser.add_argument("--out", required=True, help="submission CSV to write; ranking.csv is written beside it")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.preset, args.config, args.overrides)
    queries = Path(args.queries)
    ids = read_ids(queries) if queries.suffix == ".csv" else query_ids(queries)
    run(config, args.shortlist, read_labels(args.index_labels), ids, args.out, rerank_csv=args.rerank)
    return 0
