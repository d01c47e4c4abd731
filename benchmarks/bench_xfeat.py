#!/usr/bin/env python3
"""RootSIFT vs EfficientNet-Lite0 locals vs XFeat on the shared real data: one table, one run.

For each preset (one row):

1. landmarks_mini leave-one-out (benchmarks/leave_one_out.py's stages): GAP, top-1 and
   mAP@100, global descriptor only -> re-ranked;
2. the hard task of docs/confidence.md (benchmarks/build_hard_task.py: EVD pairs, held-out
   landmarks_mini photos and non-landmark queries) through ``delf-pipeline run``: top-1 and
   GAP with the preset's own predict settings;
3. the 15 EVD pairs (benchmarks/bench_efficientnet_lite0.py's statistics), for the preset's
   local features verified with its rerank section: median true-pair inliers, max
   swapped-pair inliers, true pairs above that max, true-pair inliers within 20 px of the
   true homography;
4. local-feature extraction time per EVD image, process CPU time of all threads, as a ratio
   to RootSIFT's in the same run (wall time beside it), and the verification's (matching +
   RANSAC) CPU time per EVD pair, as a ratio to RootSIFT's.

Hybrid presets (Lite0 global + RootSIFT or XFeat locals) fill the EVD and time columns with
their local backend's row: the same features verified with the same settings.
``xfeat_lighterglue`` matches XFeat's features with LighterGlue (its rerank costs ~1 s per
pair on CPU: its leave-one-out takes about 40 minutes on 2 cores). Presets that
need the exported Lite0 model run only with --lite0:

    python scripts/export_efficientnet_lite0.py --pca-images ../shared/data/landmarks_mini --out models/lite0
    delf-pipeline weights fetch xfeat
    python benchmarks/bench_xfeat.py --lite0 models/lite0 --out runs/bench_xfeat
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import common
import numpy as np

from delf_pipeline import pipeline
from delf_pipeline.cli import setup_logging
from delf_pipeline.config import load_config
from delf_pipeline.evaluate import evaluate
from delf_pipeline.extractors.build import local_extractor
from delf_pipeline.extractors.rootsift import extract_rootsift
from delf_pipeline.verification.pairs import verify_options

DATA = common.DATA
# preset -> its local features (the EVD and time columns); a hybrid names its local backend's preset
LOCALS = {"sift_default": "RootSIFT", "efficientnet_lite0": "Lite0 locals", "xfeat": "XFeat",
          "xfeat_lighterglue": "XFeat + LighterGlue", "efficientnet_lite0_rootsift": "sift_default",
          "xfeat_lite0": "xfeat"}
WITH_LITE0 = ("efficientnet_lite0", "efficientnet_lite0_rootsift", "xfeat_lite0")
HEADER = ("| preset | local features | LOO GAP global → re-ranked | LOO top-1 | LOO mAP@100 | hard top-1 | hard GAP "
          "| EVD median true-pair inliers | EVD max swapped-pair inliers | EVD true pairs above max swapped "
          "| EVD true-pair inliers within 20 px of the true homography | extraction CPU / RootSIFT "
          "| extraction wall / RootSIFT | verification CPU per pair / RootSIFT |\n"
          "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def preset_config(preset: str, args: argparse.Namespace) -> dict:
    return load_config(preset, None, [f'extract.model="{args.lite0}"'] if preset in WITH_LITE0 else [])


def loo_cells(preset: str, args: argparse.Namespace) -> list[str]:
    """GAP, top-1, mAP@100 of landmarks_mini leave-one-out, each "global → re-ranked"."""
    results = common.leave_one_out(preset_config(preset, args), DATA / "landmarks_mini", args.out / "loo" / preset,
                                args.jobs)
    return [f"{common.metric(results['global'], key):.3f} → {common.metric(results['reranked'], key):.3f}"
            for key in ("gap", "accuracy", "map@100")]


def hard_cells(preset: str, args: argparse.Namespace) -> list[str]:
    """Top-1 and GAP of the hard task run end to end with ``preset``."""
    task = args.out / "hard_task"
    if not (task / "solution.csv").exists():
        common.build_hard_task(task, DATA)
    out = args.out / "hard" / preset
    submission = pipeline.run(preset_config(preset, args), task, out, jobs=args.jobs)
    metrics = evaluate(submission, task / "solution.csv", out / "ranking.csv", task / "train.csv")
    return [f"{metrics['accuracy']:.3f}", f"{metrics['gap']:.3f}"]


def local_backends(args: argparse.Namespace) -> dict[str, tuple]:
    """{preset: (extractor of its local features, image -> ImageFeatures; match(a, b) or None for
    the preset's own verify_pair)} of the non-hybrid presets."""
    backends = {"sift_default": lambda image: extract_rootsift(image, args.max_features)}
    if args.lite0:
        lite_args = argparse.Namespace(scales=[1.0], global_scales_ind=[0], threshold=0.0, max_features=args.max_features)
        backends["efficientnet_lite0"] = common.load_model(lite_args, str(args.lite0))
    xfeat_conf = load_config("xfeat").extract
    backends["xfeat"] = local_extractor(replace(xfeat_conf, max_features=args.max_features), "xfeat")
    backends["xfeat_lighterglue"] = backends["xfeat"]
    return {preset: (extractor, common.glue_match() if preset == "xfeat_lighterglue" else None)
            for preset, extractor in backends.items()}


def evd_cells(args: argparse.Namespace) -> dict[str, list[str]]:
    """{preset: EVD and time cells} of each local backend, every one timed in this run."""
    folder = DATA / "evd"
    names = sorted(p.stem for p in (folder / "1").glob("*.png"))
    row_args = argparse.Namespace(max_image_size=args.max_image_size)
    stats, times = {}, {}
    for preset, (extractor, match) in local_backends(args).items():
        extractor(np.zeros((64, 64, 3), np.uint8))  # warm-up (graph tracing) outside the timing
        cpu: list[float] = []
        wall: list[float] = []
        stats[preset] = common.evd_stats(_timed(extractor, cpu, wall), verify_options(load_config(preset).rerank),
                                             folder, names, row_args, match)
        times[preset] = (float(np.median(cpu)), float(np.median(wall)))
    base_cpu, base_wall = times["sift_default"]
    cells = {}
    for preset, s in stats.items():
        share = s["agreeing"] / max(s["true_inliers"], 1)
        cells[preset] = [f"{s['median_true']:.0f}", f"{s['max_swapped']}", f"{s['above']}/{len(names)}",
                         f"{s['agreeing']}/{s['true_inliers']} ({share:.0%})", f"{times[preset][0] / base_cpu:.2f}",
                         f"{times[preset][1] / base_wall:.2f}", f"{s['pair_cpu'] / stats['sift_default']['pair_cpu']:.2f}"]
        logging.getLogger("bench_xfeat").warning(
            "%s: %.0f features/image, CPU %.3f s, wall %.3f s per image; verification CPU %.1f ms per pair",
            preset, s["features"], *times[preset], 1000 * s["pair_cpu"])
    return cells


def _timed(extractor, cpu: list[float], wall: list[float]):
    """``extractor`` that appends each call's process CPU time and wall time (seconds)."""
    def timed(image):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        features = extractor(image)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
        return features

    return timed


def table(args: argparse.Namespace) -> str:
    """The one Markdown table: a row per preset."""
    evd = evd_cells(args)
    lines = [HEADER]
    for preset, local in LOCALS.items():
        if preset in WITH_LITE0 and not args.lite0:
            continue
        evd_preset = local if local in LOCALS else preset
        label = LOCALS[evd_preset]
        cells = [f"`{preset}`", label, *loo_cells(preset, args), *hard_cells(preset, args), *evd[evd_preset]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="work folder (the stages resume inside it)")
    parser.add_argument("--lite0", type=Path, help="exported EfficientNet-Lite0 DELG model: adds the Lite0 rows")
    parser.add_argument("--max-image-size", type=int, default=1024, help="EVD: longest side, as the presets")
    parser.add_argument("--max-features", type=int, default=1000, help="EVD: local features per image")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"shared data not found at {DATA}")
    setup_logging(False)
    logging.getLogger("delf_pipeline").setLevel(logging.WARNING)
    print(f"landmarks_mini leave-one-out (79 queries), hard task (35 landmark + 8 non-landmark queries), "
          f"EVD (15 pairs, max side {args.max_image_size}, max {args.max_features} features), CPU; work in {args.out}\n")
    print(table(args))


if __name__ == "__main__":
    main()
