"""Measure exported EfficientNet-Lite DELG models on the shared real data.

retrieval: leave-one-out on landmarks_mini (each photo a query against the other 78,
labels from labels.csv): mAP (= mAP@100: 78 candidates) and top-1 of the global descriptor
(L2 per scale, summed, L2, as the official DELG extractor), and seconds per image of the
model call on CPU. Several ``--model`` folders are timed in the same run, interleaved image
by image, each also as a ratio to the first model.

evd: local features of the model and of RootSIFT (same max side and feature count) on the
15 EVD pairs, verified with delf_pipeline.verification.pairs.verify_pair (the model: the rerank section
of --model-preset; RootSIFT: the rerank section of --sift-preset): one Markdown table
of the inliers of the true pairs against "swapped" pairs (image 1 of pair i with image 2 of
pair i + 1), how many true-pair inliers agree with the ground-truth homography, and the
extraction seconds per image in the same run.

    python benchmarks/bench_efficientnet_lite0.py retrieval --model DIR [DIR2 ...] --max-image-size 512
    python benchmarks/bench_efficientnet_lite0.py evd --model DIR --max-image-size 1024
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from common import DATA, evd_stats, load_model

from delf_pipeline.config import load_config
from delf_pipeline.extractors.rootsift import extract_rootsift
from delf_pipeline.formats.images import load_image
from delf_pipeline.verification.pairs import verify_options


def leave_one_out(descriptors: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """mAP and top-1 accuracy of every row as a query against all other rows.

    descriptors: [N, D] L2-normalised; labels: [N]. AP averages the precision at the
    rank of each same-label image; queries with no other same-label image are skipped.
    """
    similarity = descriptors @ descriptors.T
    np.fill_diagonal(similarity, -np.inf)
    aps, hits = [], []
    for i in range(len(labels)):
        order = np.argsort(-similarity[i])[:-1]
        relevant = labels[order] == labels[i]
        if not relevant.any():
            continue
        ranks = np.flatnonzero(relevant) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        hits.append(relevant[0])
    return float(np.mean(aps)), float(np.mean(hits))


def retrieval(args: argparse.Namespace) -> None:
    folder = DATA / "landmarks_mini"
    with open(folder / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    extracts = [load_model(args, model) for model in args.model]
    for extract in extracts:
        extract(np.zeros((64, 64, 3), np.uint8))  # warm-up trace
    descriptors, seconds, baseline = [[] for _ in extracts], [[] for _ in extracts], []
    for row in rows:
        image, _ = load_image(folder / row["image"], args.max_image_size)
        for extract, found, timed in zip(extracts, descriptors, seconds):
            start = time.perf_counter()
            found.append(extract(image).global_descriptor)
            timed.append(time.perf_counter() - start)
        start = time.perf_counter()
        extract_rootsift(image, args.max_features)
        baseline.append(time.perf_counter() - start)
    print(f"landmarks_mini leave-one-out, {len(rows)} images, max side {args.max_image_size}, "
          f"scales {args.scales}, global scales {args.global_scales_ind}\n")
    print("| model | mAP@100 | top-1 | ms/img (median) | ms/img (mean) | time / first model | time / RootSIFT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model, found, timed in zip(args.model, descriptors, seconds):
        mean_ap, top1 = leave_one_out(np.stack(found), np.array([r["label"] for r in rows]))
        print(f"| {Path(model).name} | {mean_ap:.3f} | {top1:.3f} | {np.median(timed) * 1000:.0f} "
              f"| {np.mean(timed) * 1000:.0f} | {np.median(timed) / np.median(seconds[0]):.2f} "
              f"| {np.median(timed) / np.median(baseline):.2f} |")
    print(f"\nRootSIFT extraction (no VLAD) in the same run: {np.median(baseline) * 1000:.0f} ms/img median")


def evd(args: argparse.Namespace) -> None:
    folder = DATA / "evd"
    names = sorted(p.stem for p in (folder / "1").glob("*.png"))
    model = load_model(args, args.model[0])
    model(np.zeros((64, 64, 3), np.uint8))  # warm-up trace
    preset = args.model_preset
    model_options = verify_options(load_config(preset).rerank)
    backends = {
        f"{Path(args.model[0]).name} ({preset})": (model, model_options),
        f"RootSIFT ({args.sift_preset})": (
            lambda image: extract_rootsift(image, args.max_features),
            verify_options(load_config(args.sift_preset).rerank),
        ),
    }
    print(f"EVD, {len(names)} pairs, max side {args.max_image_size}, model scales {args.scales}, "
          f"max {args.max_features} features, ground truth within 20 px, CPU\n")
    print("| backend | features/image | median true-pair inliers | max swapped-pair inliers | true pairs above "
          "max swapped | true-pair inliers agreeing with ground truth | extraction s/image (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, (extract, options) in backends.items():
        print(evd_row(label, extract, options, folder, names, args))


def evd_row(label: str, extract, options: dict, folder: Path, names: list[str], args: argparse.Namespace) -> str:
    """One Markdown table row of ``extract``'s local features on the EVD pairs, verified with ``options``."""
    stats = evd_stats(extract, options, folder, names, args)
    return (f"| {label} | {stats['features']:.0f} | {stats['median_true']:.0f} | {stats['max_swapped']} "
            f"| {stats['above']}/{len(names)} | {stats['agreeing']}/{stats['true_inliers']} "
            f"({stats['agreeing'] / max(stats['true_inliers'], 1):.0%}) | {stats['seconds']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("retrieval", "evd"))
    parser.add_argument("--model", required=True, nargs="+",
                        help="exported DELG SavedModel folder(s); evd uses the first only")
    parser.add_argument("--max-image-size", type=int, default=512, help="longest side before the model")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="pyramid scales")
    parser.add_argument("--global-scales-ind", type=int, nargs="+", default=[0], help="scales of the global descriptor")
    parser.add_argument("--max-features", type=int, default=1000, help="local features kept per image")
    parser.add_argument("--threshold", type=float, default=0.0, help="attention (feature norm) threshold")
    parser.add_argument("--model-preset", default="efficientnet_lite0",
                        help="evd: verify the model with this preset's rerank section (default: %(default)s)")
    parser.add_argument("--sift-preset", default="sift_default", help="evd: rerank section that verifies RootSIFT")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"shared data not found at {DATA}")
    retrieval(args) if args.task == "retrieval" else evd(args)


if __name__ == "__main__":
    main()
