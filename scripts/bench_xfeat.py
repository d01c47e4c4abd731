#!/usr/bin/env python3
"""RootSIFT vs EfficientNet-Lite0 locals vs XFeat on the shared real data, in one run.

1. landmarks_mini leave-one-out (scripts/leave_one_out.py's stages) for each preset:
   GAP, top-1 and mAP@100, global descriptor only -> re-ranked.
2. The 15 EVD pairs (scripts/bench_efficientnet_lite0.py's row): median true-pair inliers,
   max swapped-pair inliers, true-pair inliers within 20 px of the true homography, each
   backend verified with its preset's rerank section.
3. Extraction time per image on the EVD images, same run: wall and process CPU time
   (all threads), as ratios to RootSIFT's.

Presets that need the exported Lite0 model run only with --lite0:

    python scripts/export_efficientnet_lite0.py --pca-images ../shared/data/landmarks_mini --out models/lite0
    delf-pipeline weights fetch xfeat
    python scripts/bench_xfeat.py --lite0 models/lite0 --out runs/bench_xfeat
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_efficientnet_lite0 as lite_bench  # noqa: E402
import leave_one_out  # noqa: E402

from delf_pipeline import extract  # noqa: E402
from delf_pipeline.cli import setup_logging  # noqa: E402
from delf_pipeline.config import load_config  # noqa: E402
from delf_pipeline.extractors.rootsift import extract_rootsift  # noqa: E402
from delf_pipeline.verification.pairs import verify_options  # noqa: E402

DATA = lite_bench.DATA
NO_MODEL = ("sift_default", "xfeat")
WITH_LITE0 = ("efficientnet_lite0", "efficientnet_lite0_rootsift", "xfeat_lite0")


def loo_table(args: argparse.Namespace) -> str:
    """Markdown rows: preset | GAP | top-1 | mAP@100, each global -> re-ranked."""
    presets = NO_MODEL + (WITH_LITE0 if args.lite0 else ())
    lines = ["| preset | GAP global → re-ranked | top-1 | mAP@100 |", "|---|---|---|---|"]
    for preset in presets:
        overrides = [f'extract.model="{args.lite0}"'] if preset in WITH_LITE0 else []
        results = leave_one_out.run(load_config(preset, None, overrides), DATA / "landmarks_mini",
                                    args.out / "loo" / preset, args.jobs)
        cells = [f"{_metric(results['global'], key):.3f} → {_metric(results['reranked'], key):.3f}"
                 for key in ("gap", "accuracy", "map@100")]
        lines.append(f"| `{preset}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric(metrics: dict, key: str) -> float:
    return metrics[key] if key in metrics else metrics["retrieval"][key]


def evd_tables(args: argparse.Namespace) -> str:
    """The EVD table (one row per backend) and the extraction-time table of the same run."""
    folder = DATA / "evd"
    names = sorted(p.stem for p in (folder / "1").glob("*.png"))
    backends = {"RootSIFT (sift_default)": (lambda image: extract_rootsift(image, args.max_features), "sift_default")}
    if args.lite0:
        lite_args = argparse.Namespace(model=str(args.lite0), scales=[1.0], global_scales_ind=[0], threshold=0.0,
                                       max_features=args.max_features)
        backends["Lite0 locals (efficientnet_lite0)"] = (lite_bench.load_model(lite_args), "efficientnet_lite0")
    xfeat_conf = load_config("xfeat")["extract"]
    backends["XFeat (xfeat)"] = (extract.local_extractor({**xfeat_conf, "max_features": args.max_features}, "xfeat"),
                                 "xfeat")
    row_args = argparse.Namespace(max_image_size=args.max_image_size)
    rows, times = [], {}
    for label, (extractor, preset) in backends.items():
        extractor(np.zeros((64, 64, 3), np.uint8))  # warm-up (graph tracing) outside the timing
        cpu: list[float] = []
        wall: list[float] = []
        rows.append(lite_bench.evd_row(label, _timed(extractor, cpu, wall),
                                       verify_options(load_config(preset)["rerank"]), folder, names, row_args))
        times[label] = (float(np.median(cpu)), float(np.median(wall)))
    base_cpu, base_wall = times["RootSIFT (sift_default)"]
    header = (f"EVD, {len(names)} pairs, max side {args.max_image_size}, max {args.max_features} features, CPU\n\n"
              "| backend | features/image | median true-pair inliers | max swapped-pair inliers | true pairs above "
              "max swapped | true-pair inliers within 20 px of the true homography | extraction s/image (median) |\n"
              "|---|---:|---:|---:|---:|---:|---:|")
    timing = ["| backend | CPU s/image (median) | CPU time / RootSIFT | wall / RootSIFT |", "|---|---:|---:|---:|"]
    timing += [f"| {label} | {c:.3f} | {c / base_cpu:.2f} | {w / base_wall:.2f} |" for label, (c, w) in times.items()]
    return header + "\n" + "\n".join(rows) + "\n\n" + "\n".join(timing)


def _timed(extractor, cpu: list[float], wall: list[float]):
    """``extractor`` that appends each call's process CPU time and wall time (seconds)."""
    def timed(image):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        features = extractor(image)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
        return features

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="work folder (leave-one-out stages resume inside it)")
    parser.add_argument("--lite0", type=Path, help="exported EfficientNet-Lite0 DELG model: adds the Lite0 rows")
    parser.add_argument("--max-image-size", type=int, default=1024, help="EVD: longest side, as the presets")
    parser.add_argument("--max-features", type=int, default=1000, help="EVD: local features per image")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"shared data not found at {DATA}")
    setup_logging(False)
    logging.getLogger("delf_pipeline").setLevel(logging.WARNING)
    print(evd_tables(args))
    print()
    print(f"landmarks_mini leave-one-out, {args.out}\n")
    print(loo_table(args))


if __name__ == "__main__":
    main()
