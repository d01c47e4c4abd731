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

    python benchmarks/build_hard_task.py --out /tmp/hard_task
    delf-pipeline run --data /tmp/hard_task --out /tmp/hard_run --solution /tmp/hard_task/solution.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="task folder to write (outside the repository)")
    parser.add_argument("--data", type=Path, default=common.DATA, help="shared data folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out landmarks_mini photos")
    args = parser.parse_args()
    if not (args.data / "landmarks_mini" / "labels.csv").exists() or not (args.data / "evd" / "1").is_dir():
        raise SystemExit(f"{args.data} lacks landmarks_mini/labels.csv or evd/1: give --data the shared data folder")
    counts = common.build_hard_task(args.out, args.data, args.seed)
    print(f"hard task in {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
