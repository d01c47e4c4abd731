#!/usr/bin/env python3
"""The confidence table of docs/confidence.md in one run: top-1, GAP and GAP / (GAP of the same
predictions ordered right) of every aggregation, with four confidences, on three tasks:

* ``loo``: landmarks_mini leave-one-out (every photo a query against the other 78);
* ``hard``: the task of benchmarks/build_hard_task.py (EVD pairs, one-photo places beside a
  29-photo street, held-out photos, non-landmark queries);
* ``demo``: the set of ``delf-pipeline demo``.

"GAP ordered right" puts every right prediction above every wrong one; it equals top-1
accuracy (each right prediction then has precision 1), so the ratio is GAP / top-1.

Confidences: ``raw`` = the aggregated score (with ``sum``, the behaviour before this work:
"before"); ``calibrated`` = P(right) from a logistic fit (delf_pipeline.calibrate)
on the leave-one-out evidence of the task's own index, no query label used; ``+non-landmarks``
= the same fit with the non-landmark feature, against scikit-image samples that are neither
queries nor index images of any task (NON_LANDMARKS); ``+max_share`` = calibrated, times the
frequent-distractor factor with predict.max_share = MAX_SHARE. On ``loo`` the queries *are*
the index images, so there the fit is cross-fitted: 5 folds, each query's confidence from
the model fitted on the other four. A last table sets BEFORE against AFTER. Example::

    python benchmarks/measure_confidence.py --out /tmp/confidence [--preset sift_default] [--jobs 2]
"""
from __future__ import annotations

import argparse
import copy
import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import common
import numpy as np
import pandas as pd
from PIL import Image

from delf_pipeline import calibrate, extract, pipeline
from delf_pipeline.config import load_config
from delf_pipeline.evidence import aggregation, calibration
from delf_pipeline.evidence.nonlandmarks import add_nonlandmark
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.formats.tables import read_labels, read_solution
from delf_pipeline.metrics.recognition import accuracy, global_average_precision
from delf_pipeline.tools.demo import build_demo_set, load_photo

DATA = common.DATA
FOLDS = 5
MAX_SHARE = 0.1
NON_LANDMARKS = ("grass", "gravel", "text", "cell", "logo", "retina", "colorwheel", "microaneurysms")
VARIANTS = ("raw", "calibrated", "+non-landmarks", "+max_share")
BEFORE = ("sum", "raw")  # (aggregation, confidence) before this work
AFTER = ("max", "+non-landmarks")


@dataclass
class Task:
    """What a task gives the measurement: query candidates, index labels, solution (query id ->
    set of landmarks), the query and index stores, and the index's leave-one-out candidates
    (None on ``loo``, whose queries are the index itself)."""

    candidates: pd.DataFrame
    labels: dict
    solution: dict
    query_store: Path
    index_store: Path
    index_loo: pd.DataFrame | None


def loo_task(config: dict, data: Path, work: Path, jobs: int) -> Task:
    """landmarks_mini leave-one-out: every photo a query against the other photos."""
    with open(data / "labels.csv", newline="") as handle:
        labels = {Path(r["image"]).with_suffix("").as_posix(): r["label"] for r in csv.DictReader(handle)}
    store = extract.run(config, data, work / "features")
    candidates = calibrate.loo_candidates(_all(config), store, work / "loo", jobs=jobs)
    return Task(candidates, labels, {q: {label} for q, label in labels.items()}, store, store, None)


def pipeline_task(config: dict, data: Path, work: Path, jobs: int) -> Task:
    """A Kaggle-layout task through ``delf-pipeline run``, plus its index's leave-one-out."""
    pipeline.run(config, data, work, jobs=jobs)
    candidates = aggregation.candidate_table(read_table(work / "shortlist.csv"), _rerank(work / "rerank.csv"))
    index = work / "features" / "index"
    index_loo = calibrate.loo_candidates(_all(config), index, work / "calibration", jobs=jobs)
    return Task(candidates, read_labels(data / "train.csv"), read_solution(data / "solution.csv"),
                work / "features" / "query", index, index_loo)


def _rerank(path: Path) -> pd.DataFrame | None:
    return read_table(path) if path.exists() else None


def _all(config: dict) -> dict:
    """``config`` with calibrate.sample 0: every index image is a leave-one-out query (small tasks)."""
    whole = copy.deepcopy(config)
    whole.calibrate.sample = 0
    return whole


def non_landmark_folder(folder: Path) -> Path:
    """The NON_LANDMARKS scikit-image samples as JPEG files in ``folder`` (made once)."""
    for name in NON_LANDMARKS:
        path = folder / f"{name}.jpg"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(load_photo(name)).save(path, quality=90)
    return folder


def scores(best: pd.DataFrame, confidence: np.ndarray, solution: dict) -> tuple[float, float]:
    """(GAP, top-1) of best-class rows with ``confidence`` [N] against ``solution``."""
    predictions = {q: (label, float(c)) for q, label, c in zip(best["query_id"], best["label"], confidence)}
    return global_average_precision(predictions, solution), accuracy(predictions, solution)


def calibrated(best: pd.DataFrame, train: pd.DataFrame | None, labels: dict) -> np.ndarray | None:
    """P(right) of ``best`` fitted on ``train`` (cross-fitted on ``best`` itself when None); None
    when the sample cannot be fitted (every prediction right, say)."""
    try:
        if train is not None:
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


def confidences(task: Task, setting: dict, nl_store: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray | None]]:
    """Best-class rows of the task's queries under ``setting`` and their confidence per VARIANTS."""
    best = calibrate.predicted_classes(setting, task.candidates, task.labels)
    train = None if task.index_loo is None else calibrate.predicted_classes(setting, task.index_loo, task.labels)
    plain = calibrated(best, train, task.labels)
    with_nl = calibrated(add_nonlandmark(best, task.query_store, nl_store),
                         None if train is None else add_nonlandmark(train, task.index_store, nl_store), task.labels)
    share = None if plain is None else plain * aggregation.frequency_factor(best["label"], MAX_SHARE)
    return best, dict(zip(VARIANTS, (best["score"].to_numpy(), plain, with_nl, share)))


def measure(config: dict, task_name: str, work: Path, data: Path, jobs: int) -> list[tuple]:
    """Rows (task, aggregation, top-1, {variant: GAP or None}) for every aggregation."""
    if task_name == "loo":
        task = loo_task(config, data / "landmarks_mini", work, jobs)
    else:
        folder = work / "data"
        if not (folder / "solution.csv").exists():
            common.build_hard_task(folder, data) if task_name == "hard" else build_demo_set(folder)
        task = pipeline_task(config, folder, work / "run", jobs)
    nl_store = calibrate.nonlandmark_store(config, task.index_store, non_landmark_folder(work.parent / "non_landmarks"),
                                          work / "non_landmarks_store")
    rows = []
    for how in aggregation.AGGREGATIONS:
        setting = copy.deepcopy(config)
        setting.predict.aggregation = how
        best, variants = confidences(task, setting, nl_store)
        gaps = {name: None if c is None else scores(best, c, task.solution)[0] for name, c in variants.items()}
        rows.append((task_name, how, scores(best, variants["raw"], task.solution)[1], gaps))
    return rows


def markdown(rows: list[tuple]) -> str:
    """One line per (task, aggregation): top-1, then GAP (GAP / top-1) per confidence variant."""
    lines = ["| task | aggregation | top-1 | " + " | ".join(f"GAP ({v})" for v in VARIANTS) + " |",
             "|---|---|---|" + "---|" * len(VARIANTS)]
    for task, how, top1, gaps in rows:
        cells = [("n/a" if g is None else f"{g:.3f} ({g / top1:.2f})") for g in gaps.values()]
        lines.append(f"| {task} | {how}{' (before)' if how == BEFORE[0] else ''} | {top1:.3f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def summary(rows: list[tuple]) -> str:
    """Per task: BEFORE against AFTER (raw scores where AFTER's confidence could not be fitted)."""
    lines = ["| task | top-1 before | top-1 after | GAP before | GAP after | ratio before | ratio after |",
             "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(row[0] for row in rows):
        found = {how: (top1, gaps) for name, how, top1, gaps in rows if name == task}
        top_b, gap_b = found[BEFORE[0]][0], found[BEFORE[0]][1][BEFORE[1]]
        top_a, gaps = found[AFTER[0]]
        gap_a = gaps[AFTER[1]] if gaps[AFTER[1]] is not None else gaps["raw"]
        lines.append(f"| {task} | {top_b:.3f} | {top_a:.3f} | {gap_b:.3f} | {gap_a:.3f} | {gap_b / top_b:.2f} | "
                     f"{gap_a / top_a:.2f} |")
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
    logging.getLogger("delf_pipeline.evidence").setLevel(logging.ERROR)  # unlabelled non-landmark candidates
    config = load_config(args.preset, None, args.overrides)
    rows = []
    for task in args.tasks.split(","):
        rows += measure(config, task, args.out / task, args.data, args.jobs)
    print(f"preset {config.preset}, predict.top_k {config.predict.top_k}; cells: GAP (GAP / top-1)\n")
    print(markdown(rows))
    print(f"\nbefore: {BEFORE[0]} with {BEFORE[1]} confidence; after: {AFTER[0]} with {AFTER[1]} confidence "
          "(raw where it could not be fitted)")
    print(summary(rows))


if __name__ == "__main__":
    main()
