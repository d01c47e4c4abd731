#!/usr/bin/env python3
"""XFeat matched by mutual nearest neighbours (preset ``xfeat``) vs by LighterGlue, in one run.

The same XFeat features (the ``xfeat`` preset's extraction, max side 1024, 1000 features) of
the 15 EVD pairs are matched both ways and verified by the preset's verifier (MSAC affine at
20 px): median true-pair inliers, max swapped-pair inliers (image 1 of a pair against the
next pair's image 2), true pairs above that maximum, and true-pair inliers within 20 px of the
true homography, as benchmarks/bench_xfeat.py counts them. Per-pair CPU time (process time of
all threads: matching + verification) is measured on the same 30 pairs, and given as a ratio
to the mutual matcher's. With --loo OUT, landmarks_mini leave-one-out (benchmarks/leave_one_out.py)
runs ``xfeat`` and ``xfeat`` with ``rerank.matcher = "lighterglue"`` on one feature store.

    delf-pipeline weights fetch xfeat
    python benchmarks/bench_lighterglue.py --loo runs/bench_lighterglue
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import common

from delf_pipeline.cli import setup_logging
from delf_pipeline.config import load_config
from delf_pipeline.extractors.build import local_extractor
from delf_pipeline.verification.pairs import verify_options

MATCHERS = ("mutual", "lighterglue")


def evd_table(args: argparse.Namespace) -> str:
    """One row per matcher on the same XFeat features (see the module docstring)."""
    folder = common.DATA / "evd"
    names = sorted(p.stem for p in (folder / "1").glob("*.png"))
    extractor = local_extractor(replace(load_config("xfeat").extract, max_features=args.max_features), "xfeat")
    options = verify_options(load_config("xfeat").rerank)
    matches = {"mutual": None, "lighterglue": common.glue_match()}
    stats = {matcher: common.evd_stats(extractor, options, folder, names, args, match)
             for matcher, match in matches.items()}
    rows = [f"| {matcher} | {s['median_true']:.0f} | {s['max_swapped']} | {s['above']}/{len(names)} "
            f"| {s['agreeing']}/{s['true_inliers']} ({s['agreeing'] / max(s['true_inliers'], 1):.0%}) "
            f"| {1000 * s['pair_cpu']:.1f} | {s['pair_cpu'] / stats['mutual']['pair_cpu']:.1f} |"
            for matcher, s in stats.items()]
    return (f"EVD, {len(names)} pairs, XFeat max side {args.max_image_size}, max {args.max_features} features, "
            "verifier of the xfeat preset, CPU\n\n| matcher | median true-pair inliers | max swapped-pair inliers "
            "| true pairs above max swapped | true-pair inliers within 20 px | CPU ms/pair (median) "
            "| CPU / mutual |\n|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows))


def loo_table(out: Path, jobs: int) -> str:
    """Leave-one-out rows of ``xfeat`` with each matcher, one feature store; rerank wall seconds."""
    lines = ["| matcher | GAP global → re-ranked | top-1 | mAP@100 | rerank wall s |", "|---|---|---|---|---:|"]
    for matcher in MATCHERS:
        config = load_config("xfeat", None, [f'rerank.matcher="{matcher}"'])
        results = common.leave_one_out(config, common.DATA / "landmarks_mini", out / matcher, jobs,
                                    features=out / "features")
        cells = [f"{common.metric(results['global'], key):.3f} → "
                 f"{common.metric(results['reranked'], key):.3f}" for key in ("gap", "accuracy", "map@100")]
        lines.append(f"| {matcher} | " + " | ".join(cells) + f" | {results['seconds']['rerank']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loo", type=Path, help="work folder: also run landmarks_mini leave-one-out")
    parser.add_argument("--max-image-size", type=int, default=1024, help="EVD: longest side, as the preset")
    parser.add_argument("--max-features", type=int, default=1000, help="EVD: local features per image")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    args = parser.parse_args()
    if not common.DATA.is_dir():
        raise SystemExit(f"shared data not found at {common.DATA}")
    setup_logging(False)
    logging.getLogger("delf_pipeline").setLevel(logging.WARNING)
    print(evd_table(args))
    if args.loo:
        print(f"\nlandmarks_mini leave-one-out, preset xfeat, {args.loo}\n")
        print(loo_table(args.loo, args.jobs))


if __name__ == "__main__":
    main()
