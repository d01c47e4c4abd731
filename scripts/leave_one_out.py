#!/usr/bin/env python3
"""Leave-one-out recognition and retrieval on a labelled photo folder (default:
../shared/data/landmarks_mini): every photo is a query against all the others.

Runs the real stages (extract, shortlist with exclude_same_id, rerank, predict, evaluate)
and prints a Markdown table of global-only vs re-ranked metrics. Example::

    python scripts/leave_one_out.py --out runs/loo --preset sift_default

The folder must hold ``labels.csv`` with ``image,label`` columns (image = relative path).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

from delf_pipeline import extract, predict, rerank, shortlist
from delf_pipeline.cli import setup_logging
from delf_pipeline.config import load_config
from delf_pipeline.evaluate import evaluate
from delf_pipeline.formats.tables import read_labels

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "landmarks_mini"
ROWS = (("gap", "GAP"), ("accuracy", "top-1 accuracy"), ("map@100", "mAP@100"), ("mrr", "MRR"),
        ("precision@1", "P@1"), ("precision@5", "P@5"), ("recall@10", "R@10"))


def write_label_files(data: Path, out: Path) -> tuple[Path, Path]:
    """labels.csv -> (index labels ``id,landmark_id``, solution ``id,landmarks,Usage``)."""
    with open(data / "labels.csv", newline="") as handle:
        rows = [(Path(r["image"]).with_suffix("").as_posix(), r["label"]) for r in csv.DictReader(handle)]
    out.mkdir(parents=True, exist_ok=True)
    labels, solution = out / "index_labels.csv", out / "solution.csv"
    with open(labels, "w", newline="") as a, open(solution, "w", newline="") as b:
        csv.writer(a).writerows([("id", "landmark_id"), *rows])
        csv.writer(b).writerows([("id", "landmarks", "Usage"), *((i, lab, "Public") for i, lab in rows)])
    return labels, solution


def run(config: dict, data: Path, out: Path, jobs: int, features: Path | None = None) -> dict:
    """All stages; returns {"global": metrics, "reranked": metrics, "seconds": {...}}."""
    config["shortlist"]["exclude_same_id"] = True
    labels_csv, solution = write_label_files(data, out)
    seconds = {}
    start = time.perf_counter()
    store = extract.run(config, data, features or out / "features")
    seconds["extract"] = time.perf_counter() - start
    start = time.perf_counter()
    shortlist_csv = shortlist.run(config, store, store, out / "shortlist.csv")
    seconds["shortlist"] = time.perf_counter() - start
    start = time.perf_counter()
    rerank_csv = rerank.run(config, shortlist_csv, store, store, out / "rerank.csv", jobs=jobs)
    seconds["rerank"] = time.perf_counter() - start
    labels = read_labels(labels_csv)
    ids = predict.query_ids(store)
    results = {"seconds": seconds}
    for name, rerank_input in (("global", None), ("reranked", rerank_csv)):
        submission = predict.run(config, shortlist_csv, labels, ids, out / name / "submission.csv",
                                 rerank_csv=rerank_input)
        results[name] = evaluate(submission, solution, out / name / "ranking.csv", labels_csv)
    return results


def markdown_table(results: dict) -> str:
    def value(metrics: dict, key: str) -> float:
        return metrics[key] if key in metrics else metrics["retrieval"][key]

    lines = ["| metric | global only | re-ranked |", "|---|---|---|"]
    for key, title in ROWS:
        lines.append(f"| {title} | {value(results['global'], key):.3f} | {value(results['reranked'], key):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled photo folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="work folder (stages resume inside it)")
    parser.add_argument("--preset", help="named preset (default: sift_default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="SECTION.KEY=VALUE override")
    parser.add_argument("--features", type=Path, help="feature store to use or make (default: OUT/features)")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    setup_logging(False)
    logging.getLogger("delf_pipeline").setLevel(logging.WARNING)
    if not (args.data / "labels.csv").exists():
        raise SystemExit(f"{args.data}/labels.csv not found: give --data a labelled photo folder")
    results = run(load_config(args.preset, None, args.overrides), args.data, args.out, args.jobs, args.features)
    print(markdown_table(results))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
