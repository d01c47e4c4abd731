#!/usr/bin/env python3
"""Build the hard recognition task of docs/confidence.md from ../shared/data, in the Kaggle layout.

index (train):  landmarks_mini minus a few held-out photos of each place, plus image 1 of
                each EVD pair (one photo per place: 15 one-photo places beside a 29-photo street)
queries (test): image 2 of each EVD pair (extreme change of viewpoint), the held-out
                landmarks_mini photos, and non-landmark photos (scikit-image samples)

Held out per landmarks_mini place: min(3, n // 2) of its n photos, drawn with --seed.
No image is copied: train/ and test/ hold symbolic links to the originals (the decoder reads
PNG content behind a .jpg name); only the non-landmark samples, which scikit-image makes in
memory, are written as JPEG files. Writes OUT/train.csv, OUT/sample_submission.csv,
OUT/solution.csv (id,landmarks,Usage; empty for non-landmarks) and OUT/sources.csv (what each
id is). Keep OUT outside the repository. Example::

    python scripts/build_hard_task.py --out /tmp/hard_task
    delf-pipeline run --data /tmp/hard_task --out /tmp/hard_run --solution /tmp/hard_task/solution.csv
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from delf_pipeline.formats.images import kaggle_path
from delf_pipeline.tools.demo import demo_id, load_photo

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NON_LANDMARKS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "coins", "hubble_deep_field")


def held_out(paths: list[str], rng: np.random.Generator) -> set[str]:
    """min(3, n // 2) of a place's n photo paths, drawn with ``rng``."""
    count = min(3, len(paths) // 2)
    return set(rng.choice(sorted(paths), size=count, replace=False).tolist()) if count else set()


def landmarks_mini_rows(data: Path, seed: int) -> tuple[list[tuple], list[tuple]]:
    """(index rows, query rows), each (id, landmark, source path)."""
    with open(data / "landmarks_mini" / "labels.csv", newline="") as handle:
        rows = [(r["image"], r["label"]) for r in csv.DictReader(handle)]
    rng = np.random.default_rng(seed)
    queries: set[str] = set()
    for place in sorted({label for _, label in rows}):
        queries |= held_out([image for image, label in rows if label == place], rng)
    index, test = [], []
    for image, label in rows:
        row = (demo_id(f"landmarks_mini/{image}"), label, data / "landmarks_mini" / image)
        (test if image in queries else index).append(row)
    return index, test


def evd_rows(data: Path) -> tuple[list[tuple], list[tuple]]:
    """Image 1 of each EVD pair to the index, image 2 to the queries; the pair name is the landmark."""
    names = sorted(p.stem for p in (data / "evd" / "1").glob("*.png"))
    index = [(demo_id(f"evd/1/{n}"), f"evd_{n}", data / "evd" / "1" / f"{n}.png") for n in names]
    test = [(demo_id(f"evd/2/{n}"), f"evd_{n}", data / "evd" / "2" / f"{n}.png") for n in names]
    return index, test


def link(root: Path, split: str, image_id: str, source: Path) -> None:
    target = kaggle_path(root, split, image_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source.resolve())


def write_csv(path: Path, header: tuple, rows: list) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def build(out: Path, data: Path = DATA, seed: int = 0) -> dict[str, int]:
    """Write the task under ``out``; returns counts of each kind of image."""
    mini_index, mini_test = landmarks_mini_rows(data, seed)
    evd_index, evd_test = evd_rows(data)
    for image_id, _, source in mini_index + evd_index:
        link(out, "train", image_id, source)
    for image_id, _, source in mini_test + evd_test:
        link(out, "test", image_id, source)
    non_landmarks = [(demo_id(f"skimage/{name}"), "", f"skimage.data.{name}") for name in NON_LANDMARKS]
    for (image_id, _, _), name in zip(non_landmarks, NON_LANDMARKS):
        path = kaggle_path(out, "test", image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(load_photo(name)).save(path, quality=90)
    queries = mini_test + evd_test + non_landmarks
    write_csv(out / "train.csv", ("id", "landmark_id"), [(i, label) for i, label, _ in mini_index + evd_index])
    write_csv(out / "sample_submission.csv", ("id", "landmarks"), [(i, "") for i, _, _ in queries])
    write_csv(out / "solution.csv", ("id", "landmarks", "Usage"), [(i, label, "Public") for i, label, _ in queries])
    write_csv(out / "sources.csv", ("id", "split", "landmark_id", "source"),
              [(i, "train", label, s) for i, label, s in mini_index + evd_index]
              + [(i, "test", label, s) for i, label, s in queries])
    return {"index landmarks_mini": len(mini_index), "index evd": len(evd_index), "query landmarks_mini": len(mini_test),
            "query evd": len(evd_test), "query non-landmark": len(non_landmarks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="task folder to write (outside the repository)")
    parser.add_argument("--data", type=Path, default=DATA, help="shared data folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out landmarks_mini photos")
    args = parser.parse_args()
    if not (args.data / "landmarks_mini" / "labels.csv").exists() or not (args.data / "evd" / "1").is_dir():
        raise SystemExit(f"{args.data} lacks landmarks_mini/labels.csv or evd/1: give --data the shared data folder")
    counts = build(args.out, args.data, args.seed)
    print(f"hard task in {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
