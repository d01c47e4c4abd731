#!/usr/bin/env python3
"""Shortlist post-processing measured: whitening, DBA and query expansion, one run.

For each global descriptor (``--descriptors``: RootSIFT-VLAD of ``sift_default``, the
EfficientNet-Lite0 global descriptor of ``efficientnet_lite0_rootsift``; all verify with RootSIFT) and
each variant of :data:`VARIANTS`, on two tasks built from ``../shared/data``:

* ``loo``: landmarks_mini leave-one-out (every photo a query against the other 78);
* ``split``: index = landmarks_mini minus held-out photos (2 per place, 1 where a place has
  2, chosen with seed 0) + image 1 of each EVD pair (its own place); queries = the held-out
  photos + image 2 of each EVD pair (extreme viewpoint changes).

The Lite0 poolings other than GeM (MAC, SPoC: models exported with ``--pooling``) run only
:data:`POOLING_VARIANTS`. For each it runs the real stages (shortlist, rerank, predict, evaluate) and prints mAP@100, MRR,
recall@20 and recall@100 of the shortlist (what re-ranking can reach), the re-ranked GAP,
and the seconds the shortlist and rerank stages took (whitening / DBA learned afresh for
every variant, so their one-off cost is in the shortlist column). Variants that learn from
the index (DBA, supervised whitening) are not run on ``loo``: there the query is itself an
index image, so they would learn from it.

    python benchmarks/measure_shortlist.py --out runs/measure --model lite0_gem=DIR --model lite0_mac=DIR2 \\
        --model lite0_spoc=DIR3 [--json out.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import time
from pathlib import Path

import common

from delf_pipeline import extract, predict, rerank, shortlist
from delf_pipeline.cli import setup_logging
from delf_pipeline.config import load_config, with_recorded
from delf_pipeline.evaluate import evaluate
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.formats.tables import read_index_labels, read_labels, read_ranking, read_solution
from delf_pipeline.metrics.retrieval import relevant_index_images, retrieval_metrics

DATA = common.DATA
DESCRIPTORS = {  # name: preset (the Lite0 ones need --model NAME=DIR, exported with that pooling)
    "rootsift_vlad": "sift_default",
    "lite0_gem": "efficientnet_lite0_rootsift",
    "lite0_mac": "efficientnet_lite0_rootsift",
    "lite0_spoc": "efficientnet_lite0_rootsift",
}
POOLING_VARIANTS = ("baseline", "alpha-QE n3 a3")  # the only variants run for the other poolings
VARIANTS = {  # name: shortlist settings
    "baseline": {},
    "pca-w s0.1": {"whitening": "pca", "whitening_shrinkage": 0.1},
    "pca-w s0.5": {"whitening": "pca", "whitening_shrinkage": 0.5},
    "sup-w s0.1": {"whitening": "supervised", "whitening_shrinkage": 0.1},
    "avg-QE n2": {"qe_top_n": 2},
    "alpha-QE n3 a3": {"qe_top_n": 3, "qe_alpha": 3.0},
    "DBA n3": {"dba": "plain", "dba_top_n": 3},
    "sup-DBA n3": {"dba": "supervised", "dba_top_n": 3},
    "pca-w s0.5 + alpha-QE": {"whitening": "pca", "whitening_shrinkage": 0.5, "qe_top_n": 3, "qe_alpha": 3.0},
    "pca-w s0.5 + sup-DBA + alpha-QE": {"whitening": "pca", "whitening_shrinkage": 0.5, "dba": "supervised",
                                        "dba_top_n": 3, "qe_top_n": 3, "qe_alpha": 3.0},
}
HELD_OUT = 2  # photos per landmarks_mini place held out as queries in the split task


def learns_from_index(settings: dict) -> bool:
    """Whether a variant learns from the index images' neighbours or labels (DBA, supervised whitening)."""
    return bool(settings.get("dba")) or settings.get("whitening") == "supervised"


def landmarks_rows(data: Path) -> list[tuple[str, Path, str]]:
    """(id, path, label) of landmarks_mini, ids as extract gives them for the folder."""
    with open(data / "landmarks_mini" / "labels.csv", newline="") as handle:
        return [(Path(r["image"]).with_suffix("").as_posix(), data / "landmarks_mini" / r["image"], r["label"])
                for r in csv.DictReader(handle)]


def split_task(data: Path, seed: int = 0) -> tuple[list, list]:
    """(index rows, query rows) of the split task, each (id, path, label)."""
    rows = landmarks_rows(data)
    held = common.held_out_ids(common.by_place([(i, label) for i, _, label in rows]),
                               lambda n: min(HELD_OUT, n - 1), seed)
    index, queries = [], []
    for label in sorted({r[2] for r in rows}):
        place = [r for r in rows if r[2] == label]
        queries += [r for r in place if r[0] in held]
        index += [r for r in place if r[0] not in held]
    for first in sorted((data / "evd" / "1").glob("*.png")):
        label = f"evd_{first.stem}"
        index.append((f"evd1/{first.stem}", first, label))
        queries.append((f"evd2/{first.stem}", data / "evd" / "2" / first.name, label))
    return index, queries


def write_lists(out: Path, index: list, queries: list) -> dict[str, Path]:
    """Image lists, index labels and solution CSVs of a task."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.csv" for name in ("index", "queries", "labels", "solution")}
    for name, rows in (("index", index), ("queries", queries)):
        with open(paths[name], "w", newline="") as handle:
            csv.writer(handle).writerows([("id", "path", "landmark_id"), *rows])
    with open(paths["labels"], "w", newline="") as handle:
        csv.writer(handle).writerows([("id", "landmark_id"), *((i, lab) for i, _, lab in index)])
    with open(paths["solution"], "w", newline="") as handle:
        csv.writer(handle).writerows([("id", "landmarks", "Usage"), *((i, lab, "Public") for i, _, lab in queries)])
    return paths


def build_stores(config: dict, task: str, paths: dict[str, Path], work: Path) -> tuple[Path, Path]:
    """(index store, query store) of a task; leave-one-out uses one store for both."""
    index = extract.run(config, paths["index"], work / "index")
    if task == "loo":
        return index, index
    codebook = index / "codebook.npy"
    return index, extract.run(config, paths["queries"], work / "queries", codebook=codebook if codebook.exists() else None)


def run_variant(config: dict, task: str, stores: tuple[Path, Path], paths: dict[str, Path], out: Path,
                jobs: int) -> dict:
    """Shortlist (derived index made afresh), rerank, predict, evaluate one variant."""
    index, queries = stores
    shutil.rmtree(index / "derived", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    labels = read_labels(paths["labels"])
    start = time.perf_counter()
    shortlist_csv = shortlist.run(config, index, queries, out / "shortlist.csv", index_labels=labels)
    shortlist_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rerank_csv = rerank.run(config, shortlist_csv, queries, index, out / "rerank.csv", jobs=jobs)
    rerank_seconds = time.perf_counter() - start
    query_ids = [row["id"] for row in csv.DictReader(open(paths["solution"], newline=""))]
    submission = predict.run(config, shortlist_csv, labels, query_ids, out / "submission.csv", rerank_csv=rerank_csv)
    relevant = relevant_index_images(read_solution(paths["solution"]), read_index_labels(paths["labels"]))
    found = retrieval_metrics(read_ranking(shortlist_csv), relevant, ks=(1, 20, 100))
    gap = evaluate(submission, paths["solution"])["gap"]
    return {"map@100": found["map@100"], "mrr": found["mrr"], "recall@20": found["recall@20"],
            "recall@100": found["recall@100"], "gap_reranked": gap, "queries": found["queries"],
            "shortlist_seconds": shortlist_seconds, "rerank_seconds": rerank_seconds,
            "shortlisted": len(read_table(shortlist_csv))}


def task_lists(data: Path, out: Path) -> dict[str, dict[str, Path]]:
    rows = landmarks_rows(data)
    return {"loo": write_lists(out / "loo", rows, rows), "split": write_lists(out / "split", *split_task(data))}


def markdown(results: list[dict]) -> str:
    lines = ["| descriptor | task | variant | mAP@100 | MRR | R@20 | R@100 | GAP re-ranked | shortlist s | rerank s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['descriptor']} | {r['task']} | {r['variant']} | {r['map@100']:.3f} | {r['mrr']:.3f} | "
                     f"{r['recall@20']:.3f} | {r['recall@100']:.3f} | {r['gap_reranked']:.3f} | "
                     f"{r['shortlist_seconds']:.2f} | {r['rerank_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="shared data folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="work folder (feature stores are reused)")
    parser.add_argument("--descriptors", nargs="+", choices=list(DESCRIPTORS), default=list(DESCRIPTORS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--tasks", nargs="+", choices=["loo", "split"], default=["loo", "split"])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="exported EfficientNet-Lite0 SavedModel of a lite0_* descriptor (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    setup_logging(False)
    logging.getLogger("delf_pipeline").setLevel(logging.WARNING)
    models = dict(item.split("=", 1) for item in args.model)
    lists = task_lists(args.data, args.out / "lists")
    results = []
    for descriptor in args.descriptors:
        if descriptor.startswith("lite0") and descriptor not in models:
            raise SystemExit(f"{descriptor} needs --model {descriptor}=DIR (scripts/export_efficientnet_lite0.py)")
        overrides = [f'extract.model="{models[descriptor]}"'] if descriptor in models else []
        variants = [v for v in args.variants if v in POOLING_VARIANTS or descriptor in ("rootsift_vlad", "lite0_gem")]
        for task in args.tasks:
            base = load_config(DESCRIPTORS[descriptor], None, overrides)
            base.shortlist.exclude_same_id = task == "loo"
            stores = build_stores(base, task, lists[task], args.out / descriptor / task / "features")
            for variant in variants:
                settings = VARIANTS[variant]
                if task == "loo" and learns_from_index(settings):
                    continue
                config = with_recorded(base, "shortlist", settings, "variant")
                row = run_variant(config, task, stores, lists[task], args.out / descriptor / task / variant, args.jobs)
                results.append({"descriptor": descriptor, "task": task, "variant": variant, **row})
                print(markdown(results[-1:]).splitlines()[-1], flush=True)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
