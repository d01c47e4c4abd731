#!/usr/bin/env python
"""Dry run at GLDv2 scale on synthetic stores: time, peak memory and read throughput, in one run.

Stores are real feature stores on disk (the store format, float16, parts of 16384 rows for
global-only stores and 256 images for local ones), filled with random unit vectors:

* shortlist: a query store of ``--queries`` 2048-d global descriptors against global-only
  index stores of each of ``--index-sizes`` rows (``delf_pipeline.shortlist.run``, NumPy, one thread);
* rerank: each of ``--union-sizes`` candidate images holds ``--features`` x 128 local
  features; ``--num-to-rerank`` candidates per query, every candidate shortlisted once
  (pairs = union), visited in random order (``delf_pipeline.rerank.run``, one process).
  Random descriptors make every pair a false pair (no putative match, so no RANSAC): the
  time is reading plus matching; the verifier's cost on true pairs is bench_rerank.py's.

Each stage runs in a fresh child process after the store's pages were dropped from the page
cache (fsync + POSIX_FADV_DONTNEED), and reports wall time, CPU time of its thread (not
distorted by other processes on a shared machine), peak RSS (VmHWM) and peak anonymous
memory (RssAnon: what is not file cache the kernel can drop). In the same run, from a cold
cache each time: a plain sequential read of the same files (8 MiB reads) and, for rerank,
reading every candidate through ``FeatureStore.features`` in the rerank's order.

    nice python benchmarks/bench_scale.py --index-sizes 100000 400000 1580000 --queries 10000 \\
        --union-sizes 2500 10000 --workdir /work/scratch/bench_scale --json scale.json

(the run of docs/scale.md: 6.5 GB of index at its largest, ~25 min on 2 busy cores)

The stores go in a new folder under ``--workdir``, deleted at the end (``--keep``: kept).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # a script may set this before numpy loads; the library never does

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from common import MemoryWatch, build_store, status_kb  # noqa: E402

from delf_pipeline import rerank, shortlist  # noqa: E402
from delf_pipeline.config import load_config  # noqa: E402
from delf_pipeline.extract import store_manifest  # noqa: E402
from delf_pipeline.formats.features import ImageFeatures  # noqa: E402
from delf_pipeline.formats.store import ExtractedImage, FeatureStore, write_part  # noqa: E402
from delf_pipeline.utils.artifacts import write_json_atomic  # noqa: E402

LOCAL_PART = 256  # images per part of the local-feature stores (the extract default)
READ_BYTES = 8 << 20


# ---------------------------------------------------------------- stores


def build_local_store(path: Path, ids: list[str], features: int, dim: int, seed: int) -> Path:
    """A store of local features only: per image ``features`` x ``dim`` random unit float16
    descriptors at random (y, x) in a 1024 px square (reused if complete)."""
    if (path / "manifest.json").exists() and len(FeatureStore(path)) == len(ids):
        return path
    conf = load_config().extract
    write_json_atomic(path / "manifest.json", store_manifest(conf))
    rng = np.random.default_rng(seed)
    for number, start in enumerate(range(0, len(ids), LOCAL_PART)):
        images = [ExtractedImage(image_id, _random_local(rng, features, dim), (1024, 1024))
                  for image_id in ids[start : start + LOCAL_PART]]
        write_part(path / "parts" / f"p{number:06d}", images, [], "float16", dim)
    return path


def _random_local(rng: np.random.Generator, features: int, dim: int) -> ImageFeatures:
    descriptors = rng.standard_normal((features, dim), dtype=np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    ones = np.ones(features, np.float32)
    return ImageFeatures(rng.uniform(0, 1024, (features, 2)).astype(np.float32), descriptors, ones, ones, None)


def rerank_inputs(workdir: Path, union: int, args) -> tuple[Path, Path, Path]:
    """(shortlist CSV, query store, union store): union / num_to_rerank queries, each with
    ``num_to_rerank`` distinct candidates, every union image a candidate once, in random order."""
    queries = union // args.num_to_rerank
    union_ids = [f"u{i:08d}" for i in range(union)]
    query_ids = [f"q{i:06d}" for i in range(queries)]
    order = np.random.default_rng(3).permutation(queries * args.num_to_rerank)
    table = pd.DataFrame({
        "query_id": np.repeat(query_ids, args.num_to_rerank),
        "index_id": np.asarray(union_ids, dtype=object)[order],
        "rank": np.tile(np.arange(1, args.num_to_rerank + 1), queries),
        "score": 0.5,
    })
    csv = workdir / f"shortlist-{union}.csv"
    table.to_csv(csv, index=False)
    store = build_local_store(workdir / f"union-{union}", union_ids, args.features, args.local_dim, seed=4)
    query_store = build_local_store(workdir / f"rerank-queries-{union}", query_ids, args.features, args.local_dim, 5)
    return csv, query_store, store


# ---------------------------------------------------------------- reads


def store_files(store: Path, names: tuple[str, ...]) -> list[Path]:
    return [p / f"{name}.npy" for p in sorted((store / "parts").iterdir()) for name in names]


def drop_cache(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (written pages are flushed first)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(paths: list[Path]) -> dict:
    """Read every file start to end (cold cache): MB/s and bytes."""
    drop_cache(paths)
    total, start = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(READ_BYTES):
                total += len(chunk)
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "mb_s": total / seconds / 1e6}


def rerank_order_read(store: Path, shortlist_csv: Path) -> dict:
    """Read every candidate's features through the store, in the order rerank visits them (cold)."""
    drop_cache(store_files(store, ("offsets", "locations", "descriptors", "scales", "scores")))
    ids = pd.read_csv(shortlist_csv, dtype={"index_id": str})["index_id"].tolist()
    opened, total, start = FeatureStore(store), 0, time.perf_counter()
    for image_id in ids:
        features = opened.features(image_id)
        total += features.descriptors.size * 2 + features.locations.nbytes + 2 * features.scales.nbytes
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "mb_s": total / seconds / 1e6, "images": len(ids)}


# ---------------------------------------------------------------- stages (child processes)


def child_shortlist(index: Path, queries: Path, top_k: int) -> dict:
    config = load_config()
    config.shortlist.update({"top_k": top_k, "device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        return _measured(lambda: shortlist.run(config, index, queries, Path(tmp) / "shortlist.csv"))


def child_rerank(shortlist_csv: Path, queries: Path, union: Path, num_to_rerank: int, matcher: str) -> dict:
    config = load_config()
    config.rerank.update({"num_to_rerank": num_to_rerank, "matcher": matcher})
    with tempfile.TemporaryDirectory() as tmp:
        return _measured(lambda: rerank.run(config, shortlist_csv, queries, union, Path(tmp) / "rerank.csv"))


def _measured(work) -> dict:
    with MemoryWatch() as watch:
        wall, cpu = time.perf_counter(), time.thread_time()
        work()
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    return {"cpu_s": cpu, "wall_s": wall, "peak_rss_mb": status_kb("VmHWM") / 1024,
            "peak_anon_mb": watch.peak_anon_kb / 1024}


def run_child(*args) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"child {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- benchmark


def bench_shortlist(args, workdir: Path) -> list[dict]:
    queries = build_store(workdir / f"queries-{args.queries}", args.queries, args.dim, seed=1)
    passes = -(-args.queries // shortlist.PASS_QUERIES)
    rows = []
    for size in args.index_sizes:
        index = build_store(workdir / f"index-{size}", size, args.dim, seed=2)
        files = store_files(index, ("global",))
        plain = sequential_read(files)
        drop_cache(files + store_files(queries, ("global",)))
        stage = run_child("shortlist", index, queries, args.top_k)
        rows.append({"index_rows": size, "index_gb": plain["bytes"] / 1e9, **stage,
                     "ns_per_query_row": stage["cpu_s"] / (args.queries * size) * 1e9,
                     "stage_read_mb_s": passes * plain["bytes"] / stage["wall_s"] / 1e6,
                     "sequential_mb_s": plain["mb_s"]})
        print_shortlist_row(rows[-1], flush=True)
        if not args.keep:
            shutil.rmtree(index)
    return rows


def bench_rerank(args, workdir: Path) -> list[dict]:
    rows = []
    for union in args.union_sizes:
        csv, queries, store = rerank_inputs(workdir, union, args)
        files = store_files(store, ("offsets", "locations", "descriptors", "scales", "scores"))
        plain = sequential_read(files)
        ordered = rerank_order_read(store, csv)
        drop_cache(files + store_files(queries, ("offsets", "locations", "descriptors", "scales", "scores")))
        stage = run_child("rerank", csv, queries, store, args.num_to_rerank, args.matcher)
        rows.append({"union": union, "pairs": union, "union_gb": plain["bytes"] / 1e9, **stage,
                     "ms_per_pair": stage["cpu_s"] / union * 1e3, "ordered_read_mb_s": ordered["mb_s"],
                     "ordered_read_ms_per_image": ordered["seconds"] / union * 1e3,
                     "sequential_mb_s": plain["mb_s"]})
        print_rerank_row(rows[-1], flush=True)
        if not args.keep:
            for path in (store, queries):
                shutil.rmtree(path)
            csv.unlink()
    return rows


SHORTLIST_HEADER = ("index rows", "index GB", "wall s", "CPU s", "ns/(query*row)", "peak RSS MB", "peak anon MB",
                    "stage read MB/s", "sequential MB/s")
RERANK_HEADER = ("union = pairs", "union GB", "wall s", "CPU s", "ms/pair", "peak RSS MB", "peak anon MB",
                 "rerank-order read MB/s", "ms/image read", "sequential MB/s")


def print_shortlist_row(row: dict, **kwargs) -> None:
    values = (row["index_rows"], f"{row['index_gb']:.2f}", f"{row['wall_s']:.1f}", f"{row['cpu_s']:.1f}",
              f"{row['ns_per_query_row']:.2f}", f"{row['peak_rss_mb']:.0f}", f"{row['peak_anon_mb']:.0f}",
              f"{row['stage_read_mb_s']:.0f}", f"{row['sequential_mb_s']:.0f}")
    print(" | ".join(str(v).rjust(len(h)) for v, h in zip(values, SHORTLIST_HEADER)), **kwargs)


def print_rerank_row(row: dict, **kwargs) -> None:
    values = (row["union"], f"{row['union_gb']:.2f}", f"{row['wall_s']:.1f}", f"{row['cpu_s']:.1f}",
              f"{row['ms_per_pair']:.2f}", f"{row['peak_rss_mb']:.0f}", f"{row['peak_anon_mb']:.0f}",
              f"{row['ordered_read_mb_s']:.0f}", f"{row['ordered_read_ms_per_image']:.2f}",
              f"{row['sequential_mb_s']:.0f}")
    print(" | ".join(str(v).rjust(len(h)) for v, h in zip(values, RERANK_HEADER)), **kwargs)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--index-sizes", type=int, nargs="*", default=[25000, 100000], help="index rows")
    parser.add_argument("--queries", type=int, default=10000, help="shortlist queries")
    parser.add_argument("--dim", type=int, default=2048, help="global descriptor dimension")
    parser.add_argument("--top-k", type=int, default=100, help="shortlist length")
    parser.add_argument("--union-sizes", type=int, nargs="*", default=[2500, 10000],
                        help="rerank candidate union (= pairs)")
    parser.add_argument("--num-to-rerank", type=int, default=100, help="candidates per rerank query")
    parser.add_argument("--features", type=int, default=1000, help="local features per image")
    parser.add_argument("--local-dim", type=int, default=128, help="local descriptor dimension")
    parser.add_argument("--matcher", default="nn", help="rerank.matcher (nn: kdtree's answer by one product)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="the stores go in a new folder under it, deleted at the end (with --keep: in it, kept)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "shortlist":
            result = child_shortlist(Path(rest[0]), Path(rest[1]), int(rest[2]))
        else:
            result = child_rerank(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]), rest[4])
        print(json.dumps(result))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir if args.keep else Path(tempfile.mkdtemp(prefix="bench_scale-", dir=args.workdir))
    results = {"settings": {k: str(v) for k, v in vars(args).items() if k != "child"}}
    try:
        print(f"shortlist: {args.queries} queries x {args.dim}-d float16, top {args.top_k}, one thread")
        print(" | ".join(SHORTLIST_HEADER), flush=True)
        results["shortlist"] = bench_shortlist(args, workdir)
        print(f"\nrerank: {args.num_to_rerank} candidates per query, {args.features} x {args.local_dim} float16 "
              f"local features per image, matcher {args.matcher}, one process")
        print(" | ".join(RERANK_HEADER), flush=True)
        results["rerank"] = bench_rerank(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
