#!/usr/bin/env python
"""Per-pair cost and recall of geometric verification on one core, in one run.

Synthetic pairs with known correspondences: image a has N features with random unit
descriptors; image b holds, for each of them, a descriptor at a small distance (so
every feature passes the 0.8 distance test, as repeated structures do in real photos).
A fraction of these are true matches, placed by a random affine map (or homography)
plus Gaussian pixel noise; the others sit at random places in b. Methods compared
(rows): the official path (cKDTree at 0.8 + skimage AffineTransform RANSAC, 1000
trials), cKDTree + OpenCV MAGSAC++, and ``mode="fast"``; ``--extra`` adds variants.
Reported (process CPU time by default, see --clock): median ms per pair (matching +
verification), speed-up against the official row measured in the same run, recall of
the true matches among the inliers (nan for false pairs, fraction 0), and the mean
count of false inliers. "kdtree + magsac++" is OpenCV's USAC_MAGSAC homography with
1000 iterations, as one would write it first. Every setting runs at each descriptor
dimension of --dims (128: RootSIFT/DELG, 64: XFeat); "vs first dim" is a method's time
divided by its time at the first dimension, same features and inlier fraction, same run.

    python benchmarks/bench_rerank.py --features 300 1000 --inlier-fractions 0.1 0.3 0.6 --dims 128 64
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # a script may set this before numpy loads; the library never does

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from delf_pipeline.config import load_config  # noqa: E402
from delf_pipeline.verification.pairs import OPTION_KEYS, match_and_fit, resolve_options  # noqa: E402

#: The two verification settings the methods start from: the official DELF re-ranking (the
#: rerank section of the delf_v1_hub preset) and the fast path measured since the first table.
MODES = {
    "official": {key: load_config("delf_v1_hub").rerank[key] for key in OPTION_KEYS},
    "fast": {"matcher": "mutual", "match_threshold": 0.8, "ratio": 0.0, "verifier": "msac_affine",
             "residual_threshold": 20.0, "max_trials": 2000, "confidence": 0.99, "min_matches": 4},
}
#: name -> (mode, option overrides); the first row is the baseline of the ratios.
METHODS = {
    "official (kdtree + skimage affine)": ("official", {}),
    "kdtree + magsac++": ("fast", {"matcher": "kdtree", "verifier": "magsac", "max_trials": 1000}),
    "fast": ("fast", {}),
}
EXTRA = {
    "fast, max_trials 1000": ("fast", {"max_trials": 1000}),
    "fast, max_trials 3000": ("fast", {"max_trials": 3000}),
    "fast, magsac_affine": ("fast", {"verifier": "magsac_affine"}),
    "fast, affine2d": ("fast", {"verifier": "affine2d"}),
    "fast, magsac homography": ("fast", {"verifier": "magsac"}),
    "nn + fast verifier": ("fast", {"matcher": "nn"}),
    "mutual, match only": ("fast", {"min_matches": 100_000}),
    "kdtree, match only": ("fast", {"matcher": "kdtree", "min_matches": 100_000}),
}


def random_transform(rng: np.random.Generator, kind: str, size: float) -> np.ndarray:
    """A 3x3 map of (x, y) pixels: rotation +-20 deg, scale 0.7-1.4, mild shear, shift."""
    angle = np.deg2rad(rng.uniform(-20, 20))
    scale = rng.uniform(0.7, 1.4)
    shear = rng.uniform(-0.1, 0.1)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    transform = np.eye(3)
    transform[:2, :2] = scale * rot @ np.array([[1.0, shear], [0.0, 1.0]])
    transform[:2, 2] = rng.uniform(-0.1, 0.1, 2) * size
    if kind == "homography":
        transform[2, :2] = rng.uniform(-2e-4, 2e-4, 2)
    return transform


def apply(transform: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """[N, 2] (x, y) -> [N, 2] mapped by the 3x3 ``transform``."""
    h = xy @ transform[:2, :2].T + transform[:2, 2]
    w = xy @ transform[2, :2] + transform[2, 2]
    return h / w[:, None]


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_pair(rng, n: int, fraction: float, dim: int, args) -> dict:
    """One pair: loc_* [n, 2] (y, x), desc_* [n, dim] float32, truth [T, 2] (row a, row b)."""
    size = float(args.image_size)
    xy_a = rng.uniform(0, size, (n, 2))
    desc_a = unit_rows(rng.normal(size=(n, dim)))
    # a close neighbour for every descriptor: distance ~ desc_noise * sqrt(2)
    desc_b = unit_rows(desc_a + args.desc_noise * rng.normal(size=desc_a.shape) / np.sqrt(dim))
    true = int(round(fraction * n))
    xy_b = rng.uniform(0, size, (n, 2))
    transform = random_transform(rng, args.transform, size)
    xy_b[:true] = apply(transform, xy_a[:true]) + rng.normal(0, args.pixel_noise, (true, 2))
    order = rng.permutation(n)  # b's rows in a shuffled order
    position = np.argsort(order)
    return {
        "loc_a": xy_a[:, ::-1].astype(np.float32), "desc_a": desc_a,
        "loc_b": xy_b[order][:, ::-1].astype(np.float32), "desc_b": desc_b[order],
        "truth": np.stack([np.arange(true), position[:true]], axis=1),
    }


def recall_and_false(result, truth: np.ndarray, n: int) -> tuple[float, int]:
    """Fraction of the true matches among the inliers, and inliers that are not true."""
    inlier_pairs = result.match_indices[result.inlier_mask]
    codes = inlier_pairs[:, 0] * n + inlier_pairs[:, 1]
    hits = int(np.isin(truth[:, 0] * n + truth[:, 1], codes).sum())
    return (hits / len(truth) if len(truth) else float("nan")), len(codes) - hits


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_methods(pairs: list[dict], methods: dict, repeats: int, n: int, clock) -> dict[str, dict]:
    """Per method: median ms per pair (best of ``repeats``), mean recall and false inliers.

    Methods are interleaved pair by pair so that a change of machine load between them
    does not bias the ratios; a method's repeats run back to back, so its best time is the
    warm-cache steady state a rerank worker running that method sees.
    """
    times = {name: [] for name in methods}
    quality = {name: [] for name in methods}
    settings = {name: resolve_options({**MODES[mode], **options}) for name, (mode, options) in methods.items()}
    for pair in pairs:
        args = (pair["loc_a"], pair["desc_a"], pair["loc_b"], pair["desc_b"])
        best = dict.fromkeys(methods, np.inf)
        results = {}
        for name in methods:
            for _ in range(repeats):
                start = clock()
                results[name] = match_and_fit(*args, settings[name], seed=0)  # as the rerank: settings resolved once
                best[name] = min(best[name], clock() - start)
        for name in methods:  # seeded: every repeat gives the same result
            times[name].append(best[name] * 1e3)
            quality[name].append(recall_and_false(results[name], pair["truth"], n))
    return {
        name: {"ms": float(np.median(times[name])), "recall": float(np.mean([q[0] for q in quality[name]])),
               "false_inliers": float(np.mean([q[1] for q in quality[name]]))}
        for name in methods
    }


def single_thread():
    """Limit OpenCV and BLAS to one thread (threadpoolctl when installed)."""
    cv2.setNumThreads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()  # the environment variables above already apply
    return threadpool_limits(1)


def benchmark(args) -> list[dict]:
    methods = dict(METHODS, **({name: EXTRA[name] for name in EXTRA} if args.extra else {}))
    rows = []
    for n in args.features:
        for fraction in args.inlier_fractions:
            first = {}
            for dim in args.dims:
                rng = np.random.default_rng(args.seed)
                pairs = [synthetic_pair(rng, n, fraction, dim, args) for _ in range(args.pairs)]
                stats = time_methods(pairs, methods, args.repeats, n, CLOCKS[args.clock])
                base = stats[next(iter(methods))]["ms"]
                for name in methods:
                    first.setdefault(name, stats[name]["ms"])
                    rows.append({"features": n, "inlier_fraction": fraction, "dim": dim, "method": name,
                                 **stats[name], "speedup": base / stats[name]["ms"],
                                 "vs_first_dim": stats[name]["ms"] / first[name]})
                    print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    print(f"{row['features']:>8} {row['inlier_fraction']:>8.0%} {row['dim']:>4} {row['method']:<36} "
          f"{row['ms']:>9.3f} {row['speedup']:>8.1f}x {row['vs_first_dim']:>9.2f} {row['recall']:>7.3f} "
          f"{row['false_inliers']:>7.1f}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--features", type=int, nargs="+", default=[300, 1000], help="features per image")
    parser.add_argument("--inlier-fractions", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.6],
                        help="fraction of putative matches that are true (0: a false pair, the common case)")
    parser.add_argument("--pairs", type=int, default=10, help="synthetic pairs per setting")
    parser.add_argument("--repeats", type=int, default=3, help="timings per pair (best is kept)")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 64],
                        help="descriptor dimensions (128: RootSIFT, DELG; 64: XFeat), each a set of rows")
    parser.add_argument("--desc-noise", type=float, default=0.35, help="descriptor perturbation of a match")
    parser.add_argument("--pixel-noise", type=float, default=2.0, help="std of true-match location noise (px)")
    parser.add_argument("--image-size", type=float, default=1024, help="side of the square images (px)")
    parser.add_argument("--transform", choices=["affine", "homography"], default="affine")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                        help="cpu: process CPU time, far less disturbed by other processes on a busy "
                             "machine (there wall time inflates long calls more than short ones)")
    parser.add_argument("--extra", action="store_true",
                        help="also time variants (trial counts, other verifiers, nn, matching alone)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the process to this core")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    print(f"{'features':>8} {'true':>8} {'dim':>4} {'method':<36} {'ms/pair':>9} {'speedup':>9} "
          f"{'vs 1st dim':>9} {'recall':>7} {'false':>7}")
    with single_thread():
        rows = benchmark(args)
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
