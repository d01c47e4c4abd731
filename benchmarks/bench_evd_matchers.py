#!/usr/bin/env python3
"""Matchers and verifiers for wide-baseline photos, at the pair level on the 15 EVD pairs, one run.

Every row verifies XFeat features (the ``xfeat`` preset's extraction: max side 1024, 1000
features per image or per view) of image 1 (the query) against image 2 (the candidate) of each
true pair and of each swapped pair (image 1 of pair i with image 2 of pair i + 1). Rows:

- ``mutual``: the fast path (the ``xfeat`` preset: mutual nearest neighbours, ratio 0.9, MSAC
  affine at 20 px), and the same matches verified by OpenCV's USAC MAGSAC++ fundamental matrix
  (verifier ``magsac_fundamental``) at each --f-threshold (Sampson distance, px);
- ``lighterglue``: XFeat's LighterGlue matches, verified by both;
- ``views T``: XFeat on the query's simulated views of tilts T only
  (delf_pipeline.extractors.views), matched view by view against the candidate's ordinary
  features (delf_pipeline.verification.matching.match_views), then the MSAC affine fit.

Columns: true pairs whose inliers exceed the largest swapped-pair count, median true-pair and
largest swapped-pair inliers, true-pair inliers within 20 px of the true homography, median
process CPU ms per pair (matching + verification, one thread) and its ratio to the fast path's,
the query's extraction CPU as a ratio to one view's, and the share of (true, swapped) pairs of
pairs where the true one has more inliers (ties count half: the area under the ROC curve, a
steadier figure than the first column, which the single largest swapped count decides).

    delf-pipeline weights fetch xfeat
    python benchmarks/bench_evd_matchers.py [--tilts "1,2,4;1,1.414,2,2.828,4"] [--f-thresholds 2 4]
"""
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"  # before NumPy loads its BLAS: one core

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import common  # noqa: E402

from delf_pipeline.config import load_config  # noqa: E402
from delf_pipeline.extractors.build import local_extractor  # noqa: E402
from delf_pipeline.extractors.views import extract_views  # noqa: E402
from delf_pipeline.formats.images import load_image  # noqa: E402
from delf_pipeline.verification.lighterglue import load_xfeat_lighterglue  # noqa: E402
from delf_pipeline.verification.matching import match_descriptors, match_views  # noqa: E402
from delf_pipeline.verification.pairs import verify_matches, verify_options  # noqa: E402


def local_features(extractor, path: Path, max_image_size: int, tilts: tuple[float, ...]) -> dict:
    """{loc (y, x) original pixels, desc, views, size (h, w) original, cpu (s)} of one image."""
    image, factor = load_image(path, max_image_size)
    factor = np.broadcast_to(np.asarray(factor, np.float64), 2)
    start = time.process_time()
    features, views = extract_views(extractor, image, tilts)
    cpu = time.process_time() - start
    return {"loc": (features.locations * factor).astype(np.float32), "desc": features.descriptors, "views": views,
            "size": tuple(int(round(n * f)) for n, f in zip(image.shape[:2], factor)), "cpu": cpu}


def inlier_pairs(a: dict, b: dict, pairs: np.ndarray, verifier: str, options: dict) -> np.ndarray:
    """[K, 2] the inlier rows of ``pairs`` under ``verifier``: "affine" (the preset's) or "F<px>"
    (magsac_fundamental at that Sampson distance)."""
    if verifier != "affine":
        options = {**options, "verifier": "magsac_fundamental", "residual_threshold": float(verifier[1:])}
    return pairs[verify_matches(a["loc"], b["loc"], pairs, **options).inlier_mask]


def within(a: dict, b: dict, inliers: np.ndarray, homography: np.ndarray, threshold: float = 20.0) -> int:
    """Inliers whose query point maps within ``threshold`` px of its match by the true homography."""
    xy_a = a["loc"][inliers[:, 0], ::-1].astype(np.float64)
    projected = np.c_[xy_a, np.ones(len(xy_a))] @ homography.T
    xy_b = b["loc"][inliers[:, 1], ::-1]
    return int((np.linalg.norm(projected[:, :2] / projected[:, 2:] - xy_b, axis=1) <= threshold).sum())


def auc(true: list[int], swapped: list[int]) -> float:
    """P(a true pair has more inliers than a swapped pair), ties counted half."""
    t, s = np.array(true)[:, None], np.array(swapped)[None, :]
    return float(((t > s).sum() + 0.5 * (t == s).sum()) / (t.size * s.size))


def table(queries: dict, candidates: dict, names: list[str], matchers: dict, verifiers: list[str],
          options: dict, folder: Path) -> list[tuple[str, dict]]:
    """Per (matcher, verifier): inliers of true and swapped pairs, agreement, CPU per pair."""
    rows = []
    for matcher, match in matchers.items():
        stats = {verifier: {"true": [], "swapped": [], "within": [], "cpu": []} for verifier in verifiers}
        for i, name in enumerate(names):
            for kind, other in (("true", name), ("swapped", names[(i + 1) % len(names)])):
                a, b = queries[matcher.split(" ")[-1]][name], candidates[other]
                start = time.process_time()
                pairs = match(a, b)
                match_cpu = time.process_time() - start
                for verifier in verifiers:
                    start = time.process_time()
                    inliers = inlier_pairs(a, b, pairs, verifier, options)
                    stats[verifier]["cpu"].append(match_cpu + time.process_time() - start)
                    stats[verifier][kind].append(len(inliers))
                    if kind == "true":
                        homography = np.loadtxt(folder / "h" / f"{name}.txt")
                        stats[verifier]["within"].append(within(a, b, inliers, homography))
        rows += [(f"{matcher} + {'MSAC affine 20 px' if v == 'affine' else f'MAGSAC++ F {v[1:]} px'}", s)
                 for v, s in stats.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tilts", default="1,2,4;1,1.414,2,2.828,4", help="query view tilt sets, ';' between sets")
    parser.add_argument("--f-thresholds", type=float, nargs="*", default=[2.0, 4.0])
    parser.add_argument("--no-lighterglue", action="store_true")
    args = parser.parse_args()
    folder = common.require_data("evd/1", "evd/2", "evd/h") / "evd"
    logging.getLogger("delf_pipeline").setLevel(logging.WARNING)
    conf = load_config("xfeat")
    extractor = local_extractor(replace(conf.extract, max_features=1000), "xfeat")
    extractor(np.zeros((64, 64, 3), np.uint8))  # warm-up (graph tracing) outside the timing
    options = verify_options(conf.rerank)
    names = sorted(p.stem for p in (folder / "1").glob("*.png"))
    size = conf.extract.max_image_size
    candidates = {n: local_features(extractor, folder / "2" / f"{n}.png", size, (1.0,)) for n in names}
    tilt_sets = {"image": (1.0,)} | {s: tuple(float(t) for t in s.split(",")) for s in args.tilts.split(";") if s}
    queries = {key: {n: local_features(extractor, folder / "1" / f"{n}.png", size, tilts) for n in names}
               for key, tilts in tilt_sets.items()}

    def mutual(a, b):
        return match_descriptors(a["desc"], b["desc"], matcher="mutual", match_threshold=options["match_threshold"],
                                 ratio=options["ratio"])

    def by_view(a, b):
        return match_views(a["desc"], a["views"], b["desc"], match_threshold=options["match_threshold"],
                           ratio=options["ratio"])

    matchers = {"mutual image": mutual}
    if not args.no_lighterglue:
        glue = load_xfeat_lighterglue()
        matchers["lighterglue image"] = lambda a, b: glue.match_stored(a["loc"], a["desc"], a["size"],
                                                                       b["loc"], b["desc"], b["size"])
    fits = {k: options[k] for k in ("verifier", "residual_threshold", "max_trials", "confidence", "min_matches")}
    verifiers = ["affine"] + [f"F{t:g}" for t in args.f_thresholds]
    rows = table(queries, candidates, names, matchers, verifiers, fits, folder)
    rows += table(queries, candidates, names, {f"views {key}": by_view for key in tilt_sets if key != "image"},
                  verifiers, fits, folder)
    base_cpu = np.median(rows[0][1]["cpu"])
    one_view = np.median([q["cpu"] for q in queries["image"].values()])
    print(f"EVD, {len(names)} true and {len(names)} swapped pairs, XFeat (max side {size}, 1000 features per image "
          "or view), one thread\n")
    print("| combination | true pairs above max swapped | median true-pair inliers | max swapped-pair inliers "
          "| true-pair inliers within 20 px | CPU ms/pair (median) | CPU / fast path | query extraction CPU / one view "
          "| true > swapped (AUC) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in rows:
        top = max(s["swapped"])
        key = name.split(" + ")[0].split(" ")[-1]
        extraction = np.median([q["cpu"] for q in queries[key].values()]) / one_view
        print(f"| {name} | {sum(t > top for t in s['true'])}/{len(names)} | {np.median(s['true']):.0f} | {top} "
              f"| {sum(s['within'])}/{sum(s['true'])} | {1000 * np.median(s['cpu']):.1f} "
              f"| {np.median(s['cpu']) / base_cpu:.1f} | {extraction:.1f} | {auc(s['true'], s['swapped']):.3f} |")


if __name__ == "__main__":
    main()
