"""Stage 4, predict: per-class evidence into a Kaggle ``submission.csv``.

The final ranking of a query is its re-ranked candidates (by rerank score), followed by the
rest of its shortlist (by global score); without a rerank file it is the shortlist alone
(global-only recognition). The ``top_k`` best candidates vote for their landmark, pooled by
``predict.aggregation`` (sum as the Kaggle 2020 host baseline, max, mean_best or verified:
see :mod:`delf_pipeline.evidence.aggregation`), and the best class is the prediction.

Its confidence is the class's aggregated score plus ``predict.margin_weight`` times the score's
lead over the query's next class, or, with ``predict.calibration`` (a
``calibration.json`` from ``delf-pipeline calibrate``), the fitted probability that the
prediction is right. ``predict.max_share`` scales down the confidence of a landmark predicted
for too large a share of the queries, and ``predict.abstain`` then leaves the row empty below
a confidence.

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

import numpy as np
import pandas as pd

from .config import Config, PredictSettings, add_config_arguments, config_of
from .evidence.aggregation import best_classes, candidate_table, class_evidence, frequency_factor
from .evidence.calibration import load_checked
from .evidence.nonlandmarks import add_nonlandmark
from .formats.blocks import read_table
from .formats.store import open_store
from .formats.tables import read_ids, read_labels
from .utils.artifacts import atomic_path, write_text_atomic

log = logging.getLogger("delf_pipeline.predict")


def run(
    config: Config,
    shortlist_csv: str | Path,
    index_labels: dict[str, str],
    query_ids: Iterable[str],
    out: str | Path,
    *,
    rerank_csv: str | Path | None = None,
    query_store: str | Path | None = None,
) -> Path:
    """Write ``out`` (submission.csv) and ``ranking.csv`` beside it; returns ``out``.

    ``query_store`` (the queries' feature store) is needed by a calibration that uses
    non-landmark images, for the queries' global descriptors.
    """
    conf, out = config.predict, Path(out)
    refuse_unwritable_labels(index_labels)
    shortlist = read_table(Path(shortlist_csv), ("query_id", "index_id", "score"))
    rerank = read_table(Path(rerank_csv), ("query_id", "index_id", "score")) if rerank_csv else None
    candidates = candidate_table(shortlist, rerank)
    with atomic_path(out.with_name("ranking.csv")) as tmp:
        candidates[list(RANKING_COLUMNS)].to_csv(tmp, index=False)
    best = best_classes(class_evidence(candidates, index_labels, conf.top_k, conf.aggregation))
    confidence = confidences(best, conf, query_store) * frequency_factor(best["label"], conf.max_share)
    keep = confidence >= conf.abstain
    predictions = {q: (label, float(c)) for q, label, c, k in zip(best["query_id"], best["label"], confidence, keep) if k}
    ids = list(dict.fromkeys(query_ids))
    write_text_atomic(out, submission_csv(ids, predictions))
    answered = sum(1 for i in ids if i in predictions)
    log.info("submission %s: %d queries, %d with a prediction, %d empty (%d abstained)", out, len(ids), answered,
             len(ids) - answered, int((~keep).sum()))
    return out


RANKING_COLUMNS = ("query_id", "index_id", "rank", "score")


def refuse_unwritable_labels(index_labels: dict[str, str]) -> None:
    """ValueError naming a landmark id that a submission row ("LANDMARK CONFIDENCE") cannot hold:
    empty, or holding white space."""
    for image_id, label in index_labels.items():
        if not label or any(c.isspace() for c in label):
            raise ValueError(f"landmark id {label!r} (of index image {image_id!r}) is empty or holds white space: a "
                             "submission row is 'LANDMARK CONFIDENCE', so it cannot be written; rename it in the labels")


def final_ranking(shortlist: pd.DataFrame, rerank: pd.DataFrame | None) -> pd.DataFrame:
    """Rows ``query_id,index_id,rank,score``: re-ranked candidates first, then the rest by global score."""
    return candidate_table(shortlist, rerank)[list(RANKING_COLUMNS)]


def confidences(best: pd.DataFrame, conf: PredictSettings, query_store: str | Path | None = None) -> np.ndarray:
    """[N] confidence of best-class rows: aggregated score + ``conf.margin_weight`` x its margin over
    the query's next class, or P(right) with ``conf.calibration``."""
    if not conf.calibration:
        return (best["score"] + conf.margin_weight * best["margin"]).to_numpy(np.float64)
    fitted = load_checked(conf.calibration, conf)
    if "nonlandmark" in fitted.features:
        if query_store is None:
            raise ValueError(f"{conf.calibration} uses non-landmark images: predict needs the query feature store "
                             "(--queries STORE)")
        best = add_nonlandmark(best, query_store, fitted.settings["non_landmarks"])
    return fitted.probability(best) if len(best) else np.zeros(0)


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
    found = open_store(store)
    ids = sorted(set(found.ids) | {error.id for error in found.errors()})
    if listed_csv is None or not Path(listed_csv).exists():
        return ids
    listed = read_ids(listed_csv)
    return listed + sorted(set(ids) - set(listed))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shortlist", required=True, help="shortlist CSV from `delf-pipeline shortlist`")
    parser.add_argument("--rerank", help="rerank CSV from `delf-pipeline rerank` (omit for global-only predictions)")
    parser.add_argument("--index-labels", required=True, help="CSV with id,landmark_id of the index images")
    parser.add_argument("--queries", required=True,
                        help="query feature store (its ids, failed ones included) or a CSV with an id column "
                             "such as sample_submission.csv")
    parser.add_argument("--out", required=True, help="submission CSV to write; ranking.csv is written beside it")
    parser.add_argument("--calibration", help="calibration.json from `delf-pipeline calibrate` (sets predict.calibration)")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = config_of(args)
    if args.calibration:
        config.predict.calibration = args.calibration
    queries = Path(args.queries)
    store = None if queries.suffix == ".csv" else queries
    ids = query_ids(store) if store else read_ids(queries)
    run(config, args.shortlist, read_labels(args.index_labels), ids, args.out, rerank_csv=args.rerank, query_store=store)
    return 0
