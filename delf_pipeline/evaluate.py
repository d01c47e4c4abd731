"""The evaluate stage: score a submission (GAP, top-1 accuracy) and a ranking (mAP@100, P@k,
R@k, MRR) against a solution. The readers are in :mod:`delf_pipeline.formats.tables`, the
metrics (pure functions) in :mod:`delf_pipeline.metrics`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .formats.run_folder import RunFolder
from .formats.run_record import read_run_record, recorded_path
from .formats.tables import (
    read_index_labels,
    read_ranking,
    read_submission,
    select_usage,
    solution_rows,
)
from .metrics.recognition import accuracy, global_average_precision
from .metrics.retrieval import relevant_index_images, retrieval_metrics
from .utils.artifacts import write_json_atomic

log = logging.getLogger(__name__)


def evaluate(
    predictions_path: str | Path,
    solution_path: str | Path,
    ranking_path: str | Path | None = None,
    index_labels_path: str | Path | None = None,
    json_path: str | Path | None = None,
    usage: str | None = None,
) -> dict:
    """Score a submission (and optionally a ranking) against a solution; write JSON if asked.

    Returns {"gap", "gap_ignoring_non_landmarks", "accuracy", "queries",
    "landmark_queries", "predicted", "unknown_ids", "usage"} plus "retrieval" (see
    :func:`retrieval_metrics`) when ``ranking_path`` and ``index_labels_path`` are given.
    """
    if (ranking_path is None) != (index_labels_path is None):
        raise ValueError("retrieval metrics need both a ranking and the index labels (--ranking and --index-labels)")
    rows = solution_rows(solution_path)
    solution = select_usage(rows, usage)
    predictions = read_submission(predictions_path)
    unknown = predictions.keys() - {q for q, _, _ in rows}
    if unknown:
        log.warning("%d submission id(s) are not in the solution and are ignored, e.g. %s", len(unknown), sorted(unknown)[:3])
    scoped = {q: p for q, p in predictions.items() if q in solution}
    result = {
        "gap": global_average_precision(scoped, solution),
        "gap_ignoring_non_landmarks": global_average_precision(scoped, solution, ignore_non_landmarks=True),
        "accuracy": accuracy(scoped, solution),
        "queries": len(solution),
        "landmark_queries": sum(1 for labels in solution.values() if labels),
        "predicted": sum(1 for p in scoped.values() if p is not None),
        "unknown_ids": len(unknown),
        "usage": usage or "all",
    }
    if ranking_path is not None:
        relevant = relevant_index_images(solution, read_index_labels(index_labels_path))
        result["retrieval"] = retrieval_metrics(read_ranking(ranking_path), relevant)
    if json_path is not None:
        write_json_atomic(Path(json_path), result)
    return result


def print_report(result: dict) -> None:
    """A rich table of the numbers :func:`evaluate` returns."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evaluation ({result['usage']} queries)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = {key: value for key, value in result.items() if key not in ("retrieval", "usage")}
    rows.update({f"retrieval {key}": value for key, value in result.get("retrieval", {}).items()})
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def run_inputs(run_dir: str | Path) -> dict:
    """The arguments of :func:`evaluate` for a folder of ``delf-pipeline run``, from its run.json:
    its submission and ranking, the solution it was given (None if none), the labels of its
    data's train.csv."""
    folder = RunFolder(run_dir)
    record = read_run_record(folder.path)
    has_ranking = folder.ranking.is_file()
    return {"predictions_path": folder.submission, "solution_path": recorded_path(record, "solution"),
            "ranking_path": folder.ranking if has_ranking else None,
            "index_labels_path": recorded_path(record, "data") / "train.csv" if has_ranking else None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="OUT", help="folder of `delf-pipeline run`: the four files below come "
                                                     "from its run.json (each flag given still wins)")
    parser.add_argument("--predictions", metavar="SUB.csv", help="submission to score (id,landmarks)")
    parser.add_argument("--solution", metavar="SOL.csv", help="ground truth (id,landmarks[,Usage])")
    parser.add_argument("--ranking", metavar="R.csv", help="retrieval ranking (query_id,index_id,rank|score)")
    parser.add_argument("--index-labels", metavar="train.csv", help="index labels (id,landmark_id), needed with --ranking")
    parser.add_argument("--usage", choices=["Public", "Private", "all"], default="all", help="solution rows to score")
    parser.add_argument("--json", metavar="OUT.json", help="also write the numbers as JSON")


def main(args: argparse.Namespace) -> int:
    given = {"predictions_path": args.predictions, "solution_path": args.solution, "ranking_path": args.ranking,
             "index_labels_path": args.index_labels}
    inputs = run_inputs(args.run) if args.run else {}
    inputs.update({key: value for key, value in given.items() if value})
    if args.run and not inputs["solution_path"]:
        raise ValueError(f"{args.run} was run without --solution: give --solution")
    if not (inputs.get("predictions_path") and inputs.get("solution_path")):
        raise ValueError("give --run OUT, or --predictions and --solution")
    result = evaluate(**inputs, json_path=args.json, usage=args.usage)
    print_report(result)
    return 0
