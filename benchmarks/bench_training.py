#!/usr/bin/env python3
"""Before / after `delf-pipeline train` on landmarks_dev, in one table with bootstrap intervals.

Two tasks, each a Kaggle-layout folder of links to ../shared/data/landmarks_dev:

- split by image: per place, sorted by name, every 4th photo is a query, the rest the index;
  the model trains on the index part (`delf-pipeline train --images TASK --out MODEL`);
- split by place: PLACES_UNSEEN places (seeded) are held out; the model trains on every photo
  of the other places and is tested on the held-out ones (every 4th a query, the rest the index).

Both tasks add the 114 non-landmark photos as queries (their truth is "no landmark"). Rows
(each a `delf-pipeline run` with the efficientnet_lite0 preset): ImageNet Lite0 GeM (the
built-in model) global only and re-ranked, the trained model global only and re-ranked (the
two rows of a model share its feature stores: the second run's features/ links to the first's),
with --no-calibrate: confidences are the raw scores, GAP ranks by them (the table was measured
so, before run calibrated by default; a calibration fitted on a task's index can reorder them).
mAP@100 and top-1 are over landmark queries, GAP over all queries; [low, high] is the 95%
bootstrap interval over queries (BOOTSTRAP resamples), and "gain" the paired interval of the
difference to the ImageNet row of the same ranking (same resamples).

    python benchmarks/bench_training.py --out /work/cache/train/bench
    python benchmarks/bench_training.py --step-times     # CPU seconds per training step, by setting
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np

from delf_pipeline.formats.tables import read_index_labels, read_ranking, read_solution, read_submission
from delf_pipeline.metrics.recognition import gap_of_pooled
from delf_pipeline.metrics.retrieval import relevant_index_images, retrieval_metrics

DEV = common.DATA / "landmarks_dev"
PLACES_UNSEEN = 10
BOOTSTRAP = 1000
ROWS = (("ImageNet Lite0 GeM, global only", "imagenet", 0), ("ImageNet Lite0 GeM, re-ranked", "imagenet", 100),
        ("trained, global only", "trained", 0), ("trained, re-ranked", "trained", 100))


def image_id(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:16]


def dev_rows() -> list[tuple[str, str]]:
    """(image path relative to landmarks_dev, place or "") of every photo, sorted."""
    with open(DEV / "labels.csv", newline="") as handle:
        return sorted((row["image"], row["label"]) for row in csv.DictReader(handle))


def every_fourth(rows: list[tuple[str, str]]) -> tuple[list, list]:
    """(index, queries): per place, sorted by name, every 4th photo is a query."""
    index, queries = [], []
    for place in sorted({label for _, label in rows}):
        photos = sorted(name for name, label in rows if label == place)
        for i, name in enumerate(photos):
            (queries if i % 4 == 3 else index).append((name, place))
    return index, queries


def write_task(root: Path, index: list, queries: list) -> Path:
    """A Kaggle-layout folder of links: train.csv, train/, test/, sample_submission.csv, solution.csv."""
    if (root / "solution.csv").is_file():
        return root
    for split, rows in (("train", index), ("test", queries)):
        for name, _ in rows:
            common.link(root, split, image_id(name), DEV / name)
    common.write_csv(root / "train.csv", ("id", "landmark_id"), [(image_id(n), p) for n, p in index])
    common.write_csv(root / "sample_submission.csv", ("id", "landmarks"), [(image_id(n), "") for n, _ in queries])
    common.write_csv(root / "solution.csv", ("id", "landmarks", "Usage"),
                     [(image_id(n), p, "Private") for n, p in queries])
    return root


def tasks(out: Path) -> dict[str, tuple[Path, Path]]:
    """{task: (Kaggle folder to test on, what to train on)}."""
    rows = dev_rows()
    landmarks = [r for r in rows if r[1]]
    distractors = [(name, "") for name, label in rows if not label]
    index, queries = every_fourth(landmarks)
    by_image = write_task(out / "task_by_image", index, queries + distractors)
    places = sorted({label for _, label in landmarks})
    unseen = set(np.random.default_rng(0).choice(places, PLACES_UNSEEN, replace=False).tolist())
    index, queries = every_fourth([r for r in landmarks if r[1] in unseen])
    by_place = write_task(out / "task_by_place", index, queries + distractors)
    seen_csv = out / "train_seen_places.csv"
    common.write_csv(seen_csv, ("id", "path", "landmark_id"),
              [(image_id(n), str(DEV / n), p) for n, p in landmarks if p not in unseen])
    return {"split by image": (by_image, by_image), "split by place": (by_place, seen_csv)}


def command(*args: str) -> None:
    print("$ delf-pipeline " + " ".join(args), flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "delf_pipeline", *args], check=True)
    print(f"  ({time.time() - started:.0f} s)", flush=True)


def share_features(run: Path, kind: str) -> None:
    """A new run folder whose features/ links to those of a run of the same model (the rows of
    one model differ only in re-ranking, so the stores are the same and are made once)."""
    if run.exists():
        return
    sibling = next((p for p in sorted(run.parent.glob(f"{kind}_rerank*")) if (p / "features").is_dir()), None)
    if sibling is not None:
        run.mkdir(parents=True)
        (run / "features").symlink_to(sibling.resolve() / "features")


def per_query(run: Path, task: Path) -> dict:
    """Per query (sorted ids): AP@100 and top-1 hit (landmark queries), prediction confidence and right."""
    solution = read_solution(task / "solution.csv")
    submission = read_submission(run / "submission.csv")
    relevant = relevant_index_images(solution, read_index_labels(task / "train.csv"))
    rankings = read_ranking(run / "ranking.csv")
    ids = sorted(solution)
    ap = np.array([retrieval_metrics({q: rankings.get(q, [])}, {q: relevant[q]})["map@100"] if solution[q] else np.nan
                   for q in ids])
    predicted = [submission.get(q) for q in ids]
    right = np.array([p is not None and p[0] in solution[q] for q, p in zip(ids, predicted)])
    confidence = np.array([p[1] if p is not None else -np.inf for p in predicted])
    landmark = np.array([bool(solution[q]) for q in ids])
    return {"ap": ap, "right": right, "confidence": confidence, "landmark": landmark}


def figures(q: dict, sample: np.ndarray) -> np.ndarray:
    """[mAP@100, top-1, GAP] of the queries ``sample`` (indices, repeats allowed)."""
    landmark = q["landmark"][sample]
    predicted = np.isfinite(q["confidence"][sample])
    gap = gap_of_pooled(q["confidence"][sample][predicted], q["right"][sample][predicted], int(landmark.sum()))
    return np.array([np.mean(q["ap"][sample][landmark]), np.mean(q["right"][sample][landmark]), gap])


def interval(values: np.ndarray) -> str:
    low, high = np.percentile(values, [2.5, 97.5])
    return f"[{low:.3f}, {high:.3f}]"


STEP_SETTINGS = [(size, blocks) for size in (160, 224) for blocks in (0, 6, 18)]  # 18: every unit of Lite0


def step_times(batch_size: int = 16, steps: int = 6) -> None:
    """Median seconds per training step (augmentation overlapped, as in training) of Lite0 at each
    (image size, trained units) of STEP_SETTINGS, on noise photos of 4 places, op determinism on as
    the job runs; settings measured in turn after a warm-up epoch each."""
    from types import SimpleNamespace

    import tensorflow as tf

    from delf_pipeline.config import load_config
    from delf_pipeline.extractors import efficientnet_lite as lite
    from delf_pipeline.training import data, loop

    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    examples = [data.Example(f"p{i % 4}/{i}", "", f"p{i % 4}") for i in range(batch_size * steps)]
    bank = SimpleNamespace(images={e.id: rng.integers(0, 256, (384, 512, 3), dtype=np.uint8) for e in examples})
    weights = lite.load_weights()
    print(f"\n| image size | trained units | s / step (batch {batch_size}) | images / s |\n|---:|---:|---:|---:|")
    for size, blocks in STEP_SETTINGS:
        conf = {**load_config()["train"], "image_size": size, "train_blocks": blocks, "batch_size": batch_size,
                "val_share": 0.0, "epochs": 2}
        trainer = loop.Trainer(conf, data.split(examples, 0.0, 0, seed=0), bank, weights)
        trainer.train_epoch(0)
        median = float(np.median(trainer.train_epoch(1)["step_seconds"]))
        print(f"| {size} | {blocks} | {median:.3f} | {batch_size / median:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="work folder (tasks, models, runs, table.md)")
    parser.add_argument("--step-times", action="store_true", help="only measure the CPU step time by setting")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE",
                        help="training settings for both models")
    args = parser.parse_args(argv)
    if args.step_times:
        step_times()
        return 0
    if args.out is None:
        parser.error("--out is required (or --step-times)")
    common.require_data("landmarks_dev/labels.csv")
    settings = [a for item in args.overrides for a in ("--set", item)]
    results, cards = {}, {}
    for task, (folder, train_on) in tasks(args.out).items():
        model = args.out / "models" / task.replace(" ", "_")
        command("train", "--images", str(train_on), "--out", str(model), *settings)
        cards[task] = json.loads((model / "model_card.json").read_text())
        queries = {}
        for name, kind, depth in ROWS:
            run = args.out / "runs" / task.replace(" ", "_") / f"{kind}_rerank{depth}"
            share_features(run, kind)
            chosen = ["--model", str(model)] if kind == "trained" else ["--preset", "efficientnet_lite0"]
            command("run", "--data", str(folder), "--out", str(run), "--solution", str(folder / "solution.csv"),
                    *chosen, "--set", f"rerank.num_to_rerank={depth}", "--no-calibrate")
            queries[name] = per_query(run, folder)
        results[task] = queries
    table = make_table(results, cards)
    (args.out / "table.md").write_text(table)
    print("\n" + table, end="")
    return 0


def make_table(results: dict, cards: dict) -> str:
    """The Markdown table (figures with their 95% intervals, gains over ImageNet with paired intervals)
    and a line per trained model."""
    rng = np.random.default_rng(0)
    lines = ["| task | descriptor | mAP@100 | top-1 | GAP | gain mAP@100 | gain top-1 | gain GAP |",
             "|---|---|---|---|---|---|---|---|"]
    for task, queries in results.items():
        count = len(next(iter(queries.values()))["ap"])
        samples = [rng.integers(0, count, count) for _ in range(BOOTSTRAP)]
        boot = {name: np.array([figures(q, s) for s in samples]) for name, q in queries.items()}
        for name, q in queries.items():
            point = figures(q, np.arange(count))
            cells = [f"{point[i]:.3f} {interval(boot[name][:, i])}" for i in range(3)]
            base = name.replace("trained", "ImageNet Lite0 GeM")
            gains = ["" for _ in range(3)] if base == name else [
                f"{point[i] - figures(queries[base], np.arange(count))[i]:+.3f} "
                f"{interval(boot[name][:, i] - boot[base][:, i])}" for i in range(3)]
            lines.append(f"| {task} | {name} | " + " | ".join(cells + gains) + " |")
    for task, card in cards.items():
        lines.append(f"\n{task}: trained on {card['data']['train_images']} images of {card['data']['places']} places, "
                     f"{card['epochs_run']} epochs (best {card['best_epoch']}), median step {card['step_seconds']:.3f} s "
                     f"at batch {card['settings']['batch_size']} x {card['settings']['image_size']} px on the "
                     f"{card['device']}; validation {card.get('validation')}, before training "
                     f"{card.get('validation_imagenet')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
