#!/usr/bin/env python3
"""XFeat matched by mutual nearest neighbours (preset ``xfeat``) vs by LighterGlue, in one run.

The same XFeat features (the ``xfeat`` preset's extraction, max side 1024, 1000 features) of
the 15 EVD pairs are matched both ways and verified by the preset's verifier (MSAC affine at
20 px): median true-pair inliers, max swapped-pair inliers (image 1 of a pair against the
next pair's image 2), true pairs above that maximum, and true-pair inliers within 20 px of the
true homography, as scripts/bench_xfeat.py counts them. Per-pair CPU time (process time of
all threads: matching + verification) is measured on the same 30 pairs, and given as a ratio
to the mutual matcher's. With --loo OUT, landmarks_mini leave-one-out (scripts/leave_one_out.py)
runs ``xfeat`` and ``xfeat`` with ``rerank.matcher = "lighterglue"`` on one feature store.

    delf-pipeline weights fetch xfeat
    python scripts/bench_lighterglue.py --loo runs/bench_lighterglue
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
import bench_xfeat  # noqa: E402
import leave_one_out  # noqa: E402

from delf_pipeline import extract  # noqa: E402
from delf_pipeline.cli import setup_logging  # noqa: E402
from delf_pipeline.config import load_config  # noqa: E402
from delf_pipeline.formats.images import load_image  # noqa: E402
from delf_pipeline.verification.lighterglue import load_xfeat_lighterglue  # noqa: E402
from delf_pipeline.verification.pairs import verify_matches, verify_options, verify_pair  # noqa: E402

MATCHERS = ("mutual", "lighterglue")


def evd_features(folder: Path, names: list[str], max_image_size: int, max_features: int) -> dict:
    """{side: [(locations [N, 2] (y, x) original pixels, descriptors [N, 64], (height, width))]}."""
    conf = {**load_config("xfeat")["extract"], "max_features": max_features}
    extractor = extract.local_extractor(conf, "xfeat")
    sides = {}
    for side in ("1", "2"):
        sides[side] = []
        for name in names:
            image, factor = load_image(folder / side / f"{name}.png", max_image_size)
            features = extractor(image)
            size = tuple(int(round(n * f)) for n, f in zip(image.shape[:2], np.broadcast_to(factor, 2)))
            sides[side].append((features.locations * np.float32(factor), features.descriptors, size))
    return sides


def verify(matcher: str, glue, options: dict, a: tuple, b: tuple, seconds: list[float]):
    """The pair result of (loc, desc, size) ``a`` against ``b``; appends its process CPU time."""
    start = time.process_time()
    if matcher == "lighterglue":
        pairs = glue.match_stored(a[0], a[1], a[2], b[0], b[1], b[2])
        result = verify_matches(a[0], b[0], pairs, **options)
    else:
        result = verify_pair(a[0], a[1], b[0], b[1], **options)
    seconds.append(time.process_time() - start)
    return result


def evd_table(args: argparse.Namespace) -> str:
    """One row per matcher on the same XFeat features (see the module docstring)."""
    folder = bench_xfeat.DATA / "evd"
    names = sorted(p.stem for p in (folder / "1").glob("*.png"))
    sides = evd_features(folder, names, args.max_image_size, args.max_features)
    glue = load_xfeat_lighterglue()
    rows, cpu = [], {}
    for matcher in MATCHERS:
        options = {**verify_options(load_config("xfeat")["rerank"]), "matcher": matcher}
        seconds: list[float] = []
        true, swapped, agreeing = [], [], []
        for i, name in enumerate(names):
            result = verify(matcher, glue, options, sides["1"][i], sides["2"][i], seconds)
            true.append(result.inliers)
            agreeing.append(lite_bench._agree_with_truth(result, sides, i, np.loadtxt(folder / "h" / f"{name}.txt")))
            other = sides["2"][(i + 1) % len(names)]
            swapped.append(verify(matcher, glue, options, sides["1"][i], other, seconds).inliers)
        cpu[matcher] = float(np.median(seconds))
        rows.append(f"| {matcher} | {np.median(true):.0f} | {max(swapped)} | {sum(t > max(swapped) for t in true)}/"
                    f"{len(true)} | {sum(agreeing)}/{sum(true)} ({sum(agreeing) / max(sum(true), 1):.0%}) "
                    f"| {1000 * cpu[matcher]:.1f} | {cpu[matcher] / cpu['mutual']:.1f} |")
    return (f"EVD, {len(names)} pairs, XFeat max side {args.max_image_size}, max {args.max_features} features, "
            "verifier of the xfeat preset, CPU\n\n| matcher | median true-pair inliers | max swapped-pair inliers "
            "| true pairs above max swapped | true-pair inliers within 20 px | CPU ms/pair (median) "
            "| CPU / mutual |\n|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows))


def loo_table(out: Path, jobs: int) -> str:
    """Leave-one-out rows of ``xfeat`` with each matcher, one feature store; rerank wall seconds."""
    lines = ["| matcher | GAP global → re-ranked | top-1 | mAP@100 | rerank wall s |", "|---|---|---|---|---:|"]
    for matcher in MATCHERS:
        config = load_config("xfeat", None, [f'rerank.matcher="{matcher}"'])
        results = leave_one_out.run(config, bench_xfeat.DATA / "landmarks_mini", out / matcher, jobs,
                                    features=out / "features")
        cells = [f"{bench_xfeat._metric(results['global'], key):.3f} → "
                 f"{bench_xfeat._metric(results['reranked'], key):.3f}" for key in ("gap", "accuracy", "map@100")]
        lines.append(f"| {matcher} | " + " | ".join(cells) + f" | {results['seconds']['rerank']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loo", type=Path, help="work folder: also run landmarks_mini leave-one-out")
    parser.add_argument("--max-image-size", type=int, default=1024, help="EVD: longest side, as the preset")
    parser.add_argument("--max-features", type=int, default=1000, help="EVD: local features per image")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    args = parser.parse_args()
    if not bench_xfeat.DATA.is_dir():
        raise SystemExit(f"shared data not found at {bench_xfeat.DATA}")
    setup_logging(False)
    logging.getLogger("delf_pipeline").setLevel(logging.WARNING)
    print(evd_table(args))
    if args.loo:
        print(f"\nlandmarks_mini leave-one-out, preset xfeat, {args.loo}\n")
        print(loo_table(args.loo, args.jobs))


if __name__ == "__main__":
    main()
