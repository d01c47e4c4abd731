#!/usr/bin/env python3
"""The confidence table of docs/confidence.md in one run: GAP, top-1 and GAP / (GAP of the same
predictions ordered right) of every aggregation, raw and calibrated, on three tasks:

* ``loo``: landmarks_mini leave-one-out (every photo a query against the other 78);
* ``hard``: the task of scripts/build_hard_task.py (EVD pairs, one-photo places beside a
  29-photo street, held-out photos, non-landmark queries);
* ``demo``: the set of ``delf-pipeline demo``.

"GAP ordered right" puts every right prediction above every wrong one; it equals top-1
accuracy (each right prediction then has precision 1), so the ratio is GAP / top-1.

"calibrated" = the confidence is P(right) from a logistic fit (delf_pipeline.calibrate) on
the leave-one-out evidence of the task's own index: no query label is used. On ``loo`` the
queries *are* the index images, so there the fit is cross-fitted: 5 folds, each query's
confidence from the model fitted on the other four. "before" is the preset's aggregation
with raw scores as confidence (today's behaviour). Example::

    python scripts/measure_confidence.py --out /tmp/confidence [--preset sift_default] [--jobs 2]
"""
from __future__ import annotations

import argparse
import copy
import csv
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from delf_pipeline import calibrate, extract, pipeline
from delf_pipeline.config import load_config
from delf_pipeline.evidence import aggregation, calibration
from delf_pipeline.formats.tables import read_solution
from delf_pipeline.metrics.recognition import accuracy, global_average_precision
from delf_pipeline.predict import read_labels
from delf_pipeline.tools.demo import build_demo_set
from delf_pipeline.utils.blocks import read_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_hard_task  # noqa: E402  (a sibling script)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FOLDS = 5


def loo_task(config: dict, data: Path, work: Path, jobs: int) -> tuple[pd.DataFrame, dict, dict, pd.DataFrame]:
    """landmarks_mini leave-one-out: (candidates, labels, solution, index LOO evidence = the same queries)."""
    with open(data / "labels.csv", newline="") as handle:
        labels = {Path(r["image"]).with_suffix("").as_posix(): r["label"] for r in csv.DictReader(handle)}
    store = extract.run(config, data, work / "features")
    candidates = calibrate.loo_candidates(_all(config), store, work / "loo", jobs=jobs)
    return candidates, labels, {q: {label} for q, label in labels.items()}, None


def pipeline_task(config: dict, data: Path, work: Path, jobs: int) -> tuple[pd.DataFrame, dict, dict, pd.DataFrame]:
    """A Kaggle-layout task: (query candidates, index labels, solution, index LOO candidates)."""
    pipeline.run(config, data, work, jobs=jobs)
    candidates = aggregation.candidate_table(read_table(work / "shortlist.csv"), _rerank(work / "rerank.csv"))
    labels = read_labels(data / "train.csv")
    index_loo = calibrate.loo_candidates(_all(config), work / "features" / "index", work / "calibration", jobs=jobs)
    return candidates, labels, read_solution(data / "solution.csv"), index_loo


def _rerank(path: Path) -> pd.DataFrame | None:
    return read_table(path) if path.exists() else None


def _all(config: dict) -> dict:
    """``config`` with calibrate.sample 0: every index image is a leave-one-out query (small tasks)."""
    whole = copy.deepcopy(config)
    whole["calibrate"]["sample"] = 0
    return whole


def scores(best: pd.DataFrame, confidence: np.ndarray, solution: dict) -> tuple[float, float]:
    """(GAP, top-1) of best-class rows with ``confidence`` [N] against ``solution``."""
    predictions = {q: (label, float(c)) for q, label, c in zip(best["query_id"], best["label"], confidence)}
    return global_average_precision(predictions, solution), accuracy(predictions, solution)


def calibrated(config: dict, best: pd.DataFrame, labels: dict, index_loo: pd.DataFrame | None) -> np.ndarray | None:
    """P(right) of ``best`` from the index leave-one-out fit (cross-fitted when index_loo is None);
    None when the sample cannot be fitted (every prediction right, say)."""
    try:
        if index_loo is not None:
            train = calibrate.predicted_classes(config, index_loo, labels)
            return calibration.fit(train, _right(train, labels)).probability(best)
        right, fold = _right(best, labels), np.random.default_rng(0).permutation(len(best)) % FOLDS
        probability = np.zeros(len(best))
        for k in range(FOLDS):
            probability[fold == k] = calibration.fit(best[fold != k], right[fold != k]).probability(best[fold == k])
        return probability
    except ValueError as error:
        logging.warning("no calibration: %s", error)
        return None


def _right(best: pd.DataFrame, labels: dict) -> np.ndarray:
    return np.array([labels.get(q) == label for q, label in zip(best["query_id"], best["label"])])


def measure(config: dict, task: str, work: Path, data: Path, jobs: int) -> list[tuple]:
    """Rows (task, aggregation, confidence, GAP, top-1, ratio) for every aggregation."""
    if task == "loo":
        candidates, labels, solution, index_loo = loo_task(config, data / "landmarks_mini", work, jobs)
    else:
        folder = work / "data"
        if not (folder / "solution.csv").exists():
            build_hard_task.build(folder, data) if task == "hard" else build_demo_set(folder)
        candidates, labels, solution, index_loo = pipeline_task(config, folder, work / "run", jobs)
    rows = []
    for how in aggregation.AGGREGATIONS:
        setting = copy.deepcopy(config)
        setting["predict"]["aggregation"] = how
        best = calibrate.predicted_classes(setting, candidates, labels)
        for name, confidence in (("raw", best["score"].to_numpy()),
                                 ("calibrated", calibrated(setting, best, labels, index_loo))):
            if confidence is not None:
                gap, top1 = scores(best, confidence, solution)
                rows.append((task, how, name, gap, top1, gap / top1 if top1 else float("nan")))
    return rows


def markdown(rows: list[tuple], before: str) -> str:
    lines = ["| task | aggregation | confidence | GAP | top-1 | GAP / ordered right |", "|---|---|---|---|---|---|"]
    for task, how, name, gap, top1, ratio in rows:
        mark = " (before)" if how == before and name == "raw" else ""
        lines.append(f"| {task} | {how}{mark} | {name} | {gap:.3f} | {top1:.3f} | {ratio:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="work folder (every stage resumes inside it)")
    parser.add_argument("--data", type=Path, default=DATA, help="shared data folder (default: %(default)s)")
    parser.add_argument("--tasks", default="loo,hard,demo", help="comma-separated subset of loo,hard,demo")
    parser.add_argument("--preset", help="named preset (default: sift_default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="SECTION.KEY=VALUE override")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.preset, None, args.overrides)
    rows = []
    for task in args.tasks.split(","):
        rows += measure(config, task, args.out / task, args.data, args.jobs)
    print(f"preset {config['preset']}, predict.top_k {config['predict']['top_k']}")
    print(markdown(rows, config["predict"]["aggregation"]))


if __name__ == "__main__":
    main()
