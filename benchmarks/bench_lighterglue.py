#!/usr/bin/env python3
"""LighterGlue per pair on one core: this tree's matcher against an earlier commit's, in one run.

Both matchers run on the same XFeat features (the ``xfeat`` preset's extraction: max side 1024,
--max-features per image) of the 15 EVD pairs and the 15 swapped pairs (image 1 of pair i with
image 2 of pair i + 1), pair by pair alternately, after one warm-up pair, with BLAS held to one
thread (set before NumPy loads). The baseline is ``delf_pipeline/verification/lighterglue.py`` as
it was at --baseline (default a2f4353, the first NumPy port), read from git into a temporary
module. Printed: median process CPU ms per pair of each, the median of the per-pair ratios, the
pairs whose matches are identical, the floating-point operations of this tree's pass per pair
(from the points each layer keeps, at 1000 features) and the rate it reaches, against the rate
of one [1000, 96] x [96, 1000] product measured in the same run. --tensorflow also times the
pass's three largest products in TensorFlow (one thread, a traced function) against NumPy.

    delf-pipeline weights fetch xfeat
    python benchmarks/bench_lighterglue.py --features /tmp/evd_xfeat_1000.npz [--tensorflow]
"""
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
    os.environ[_name] = "1"  # before NumPy loads its BLAS: one core

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import common  # noqa: E402

from delf_pipeline.extractors import weights  # noqa: E402
from delf_pipeline.verification import lighterglue as lg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULE = "delf_pipeline/verification/lighterglue.py"


def baseline_module(commit: str, folder: Path):
    """The matcher module of ``commit``, read from git into ``folder`` and loaded as
    delf_pipeline.verification._baseline_lighterglue (its relative imports resolve in the package)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{MODULE}"], check=True,
                            capture_output=True, text=True).stdout
    path = folder / "baseline_lighterglue.py"
    path.write_text(source)
    name = "delf_pipeline.verification._baseline_lighterglue"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def evd_features(path: Path | None, max_features: int) -> dict[str, np.ndarray]:
    """{side/name/loc|desc|size} of the EVD images (kept in ``path`` when given, reused if there)."""
    if path is not None and path.exists():
        with np.load(path) as stored:
            return dict(stored)
    from dataclasses import replace

    from delf_pipeline.config import load_config
    from delf_pipeline.extractors.build import local_extractor
    from delf_pipeline.formats.images import load_image

    conf = load_config("xfeat").extract
    extractor = local_extractor(replace(conf, max_features=max_features), "xfeat")
    folder = common.require_data("evd/1", "evd/2") / "evd"
    arrays: dict[str, np.ndarray] = {"names": np.array(sorted(p.stem for p in (folder / "1").glob("*.png")))}
    for side in "12":
        for name in arrays["names"]:
            image, factor = load_image(folder / side / f"{name}.png", conf["max_image_size"])
            features = extractor(image)
            arrays[f"{side}/{name}/loc"] = features.locations * np.float32(factor)
            arrays[f"{side}/{name}/desc"] = features.descriptors
            arrays[f"{side}/{name}/size"] = np.array([round(n * f) for n, f in
                                                      zip(image.shape[:2], np.broadcast_to(factor, 2))])
    if path is not None:
        np.savez(path, **arrays)
    return arrays


def pairs_of(features: dict[str, np.ndarray]) -> list[tuple[tuple, tuple]]:
    """(image 1, image 2) inputs of match_stored: the true pairs, then the swapped ones."""
    names = list(features["names"])

    def side(s: str, name: str) -> tuple:
        return features[f"{s}/{name}/loc"], features[f"{s}/{name}/desc"], tuple(features[f"{s}/{name}/size"])

    true = [(side("1", n), side("2", n)) for n in names]
    return true + [(side("1", n), side("2", names[(i + 1) % len(names)])) for i, n in enumerate(names)]


def pass_flops(shapes: list[tuple[int, int]]) -> float:
    """Floating-point operations of this tree's pass (products only) for the points kept before
    each layer, [(m, n)] per layer, then the log assignment on the last layer's points."""
    total = 0.0
    for m, n in shapes:
        total += 2 * lg.DIM * 2 * (m * m + n * n)  # self-attention: logits and weighted sum, each image
        total += 2 * lg.DIM * 3 * m * n  # cross: one similarity, two weighted sums
        # per point: self (q, k) 96 x 192, cross to_qk 96 x 96, two MLPs 192 x 192 + 192 x 96
        total += 2 * 15 * lg.DIM ** 2 * (m + n)
    m, n = shapes[-1]
    return total + 2 * lg.DIM * m * n + 2 * lg.DIM * lg.DIM * (m + n)


def kept_shapes(glue: lg.LighterGlue, a: tuple, b: tuple) -> list[tuple[int, int]]:
    """[(m, n)] points entering each layer's cross-attention of ``glue`` on one pair."""
    shapes: list[tuple[int, int]] = []
    cross = glue.cross_block
    glue.cross_block = lambda block, x0, x1: shapes.append((len(x0), len(x1))) or cross(block, x0, x1)
    try:
        glue.match_stored(*a, *b)
    finally:
        del glue.cross_block
    return shapes


def cpu_ms(function) -> tuple[float, object]:
    start = time.process_time()
    result = function()
    return 1000 * (time.process_time() - start), result


def gemm_rate(size: int = 1000, rounds: int = 20) -> float:
    """GFLOP/s of one [size, 96] x [96, size] float32 product (median of ``rounds``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, lg.DIM), np.float32)
    out = np.empty((size, size), np.float32)
    times = [cpu_ms(lambda: np.matmul(a, a.T, out=out))[0] for _ in range(rounds)]
    return 2 * size * size * lg.DIM / np.median(times) / 1e6


def tensorflow_table(size: int = 900, rounds: int = 20) -> str:
    """CPU ms of the pass's three largest products (logits, weighted sum, MLP input) in
    TensorFlow (one thread, traced) and in NumPy, on the same arrays."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((size, lg.DIM), np.float32)
    weights = rng.random((size, size), np.float32)
    joined, w = rng.standard_normal((size, 2 * lg.DIM), np.float32), rng.standard_normal((2 * lg.DIM,) * 2, np.float32)
    def logits(t):
        return tf.matmul(t, t, transpose_b=True)

    products = {"logits q k^T": (logits, lambda a: a @ a.T, (q,)),
                "weights @ x": (tf.matmul, np.matmul, (weights, q)),
                "MLP input": (tf.matmul, np.matmul, (joined, w))}
    rows = []
    for name, (tf_op, np_op, arrays) in products.items():
        traced, tensors = tf.function(tf_op), [tf.constant(a) for a in arrays]
        traced(*tensors).numpy()
        tf_ms = np.median([cpu_ms(lambda f=traced, t=tensors: f(*t).numpy())[0] for _ in range(rounds)])
        np_ms = np.median([cpu_ms(lambda f=np_op, t=arrays: f(*t))[0] for _ in range(rounds)])
        rows.append(f"| {name} | {tf_ms:.2f} | {np_ms:.2f} | {tf_ms / np_ms:.2f} |")
    return (f"\nTensorFlow {tf.__version__} vs NumPy, N = {size}, one thread, CPU ms (median of {rounds})\n\n"
            "| product | TensorFlow | NumPy | TF / NumPy |\n|---|---:|---:|---:|\n" + "\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="a2f4353", help="commit whose lighterglue.py is the baseline")
    parser.add_argument("--features", type=Path, help="npz of the EVD features (written if absent, else reused)")
    parser.add_argument("--max-features", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1, help="passes over the 30 pairs")
    parser.add_argument("--tensorflow", action="store_true", help="also time the largest products in TensorFlow")
    args = parser.parse_args()
    params = lg.load_lighterglue(weights.locate("xfeat", None, lg.WEIGHTS_FILE))
    with tempfile.TemporaryDirectory() as folder:
        old, new = baseline_module(args.baseline, Path(folder)).LighterGlue(params), lg.LighterGlue(params)
    pairs = pairs_of(evd_features(args.features, args.max_features))
    for glue in (old, new):
        glue.match_stored(*pairs[0][0], *pairs[0][1])  # warm-up (first-touch of the weights)
    times: dict[str, list[float]] = {"baseline": [], "this tree": []}
    same = 0
    for _ in range(args.rounds):
        for a, b in pairs:
            old_ms, old_matches = cpu_ms(lambda a=a, b=b: old.match_stored(*a, *b))
            new_ms, new_matches = cpu_ms(lambda a=a, b=b: new.match_stored(*a, *b))
            times["baseline"].append(old_ms)
            times["this tree"].append(new_ms)
            same += np.array_equal(old_matches, new_matches)
    ratios = np.array(times["baseline"]) / np.array(times["this tree"])
    flops = np.median([pass_flops(kept_shapes(new, a, b)) for a, b in pairs])
    new_ms = float(np.median(times["this tree"]))
    print(f"LighterGlue on {len(pairs)} EVD pairs (15 true, 15 swapped), {args.max_features} XFeat features, "
          f"one thread, {args.rounds} round(s), baseline {args.baseline}\n")
    print("| matcher | CPU ms per pair (median) | baseline / this (median of per-pair ratios) |\n|---|---:|---:|")
    for name, values in times.items():
        ratio = "1.00" if name == "baseline" else f"{np.median(ratios):.2f}"
        print(f"| {name} | {np.median(values):.1f} | {ratio} |")
    print(f"\nidentical matches: {same} of {len(times['baseline'])} pair runs")
    print(f"this tree's products per pair (median): {flops / 1e9:.2f} GFLOP, {flops / new_ms / 1e6:.0f} GFLOP/s "
          f"over the whole pass; one [1000, 96] x [96, 1000] product alone: {gemm_rate():.0f} GFLOP/s")
    if args.tensorflow:
        print(tensorflow_table())


if __name__ == "__main__":
    main()
