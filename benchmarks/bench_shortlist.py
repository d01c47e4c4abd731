#!/usr/bin/env python
"""Exact top-K shortlist: achieved GFLOP/s against a plain float32 GEMM, and peak memory.

A synthetic index of random 2048-d global descriptors is written as a real feature store
(float16, memory-mapped parts) at each size of ``--sizes``; a query store of ``--queries``
images likewise. For each size fresh processes (``--repeats``) run the shortlist stage
(:func:`delf_pipeline.shortlist.run`, NumPy BLAS) and reports its time and its peak
resident memory (VmHWM, and the part of it that is anonymous memory: memory-mapped index
pages are file cache the kernel can drop). The same run measures:

* the GEMM peak: ``[B, G] @ [G, C]`` float32 with the stage's query block B and chunk C;
* one query at a time (the same search, a block of one query), for contrast.

GFLOP/s counts 2 * Q * M * G per search, divided by the CPU time of the working thread
(``time.thread_time``), so other processes on a busy machine do not distort the ratios;
wall time is reported too. With ``--qe-top-n N`` the stage runs query expansion (a first
search for N results, the expanded queries searched again): GFLOP/s then counts both passes.
Threads: one (as docs/design.md measures); with OMP_NUM_THREADS etc.
set higher, CPU time no longer measures the work and only the wall column means anything.

    python benchmarks/bench_shortlist.py --sizes 50000 200000 --queries 2048 [--qe-top-n 3] [--json out.json]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # a script may set this before numpy loads; the library never does

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from common import MemoryWatch, build_store, status_kb  # noqa: E402

from delf_pipeline import shortlist  # noqa: E402
from delf_pipeline.config import load_config  # noqa: E402
from delf_pipeline.formats.store import FeatureStore  # noqa: E402
from delf_pipeline.retrieval import search  # noqa: E402


def measure_stage(index: Path, queries: Path, top_k: int, chunk_rows: int, qe_top_n: int = 0) -> dict:
    """Child process: one shortlist stage run, its time and peak memory."""
    config = load_config()
    config.shortlist.update({"top_k": top_k, "chunk_rows": chunk_rows, "device": "cpu", "qe_top_n": qe_top_n,
                                "qe_alpha": 3.0})
    with tempfile.TemporaryDirectory() as tmp, MemoryWatch() as watch:
        wall, cpu = time.perf_counter(), time.thread_time()
        shortlist.run(config, index, queries, Path(tmp) / "shortlist.csv")
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    return {"seconds": cpu, "wall_seconds": wall, "peak_rss_mb": status_kb("VmHWM") / 1024,
            "peak_anon_mb": watch.peak_anon_kb / 1024}


def measure_gemm(rows: int, dim: int, cols: int, repeats: int = 5) -> float:
    """GFLOP/s of a plain float32 ``[rows, dim] @ [dim, cols]`` (best of ``repeats``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, dim), dtype=np.float32)
    b = rng.standard_normal((dim, cols), dtype=np.float32)
    a @ b  # warm up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * rows * dim * cols / best / 1e9


def measure_single(index: Path, num_queries: int, dim: int, top_k: int, chunk_rows: int) -> float:
    """Seconds per query when each query searches the index on its own."""
    store = FeatureStore(index)
    queries = np.random.default_rng(1).standard_normal((num_queries, dim), dtype=np.float32)
    matmul = search.select_matmul("cpu")
    total = _timed(lambda: [search.top_k_search(q[None], store, top_k, chunk_rows, matmul) for q in queries])
    return total / num_queries


def _timed(work) -> float:
    """CPU seconds of this thread spent in ``work()``."""
    start = time.thread_time()
    work()
    return time.thread_time() - start


def run_child(args: argparse.Namespace, index: Path, queries: Path) -> dict:
    """``measure_stage`` in a fresh process (so each index size starts from zero memory)."""
    command = [sys.executable, __file__, "--child", str(index), str(queries),
               "--top-k", str(args.top_k), "--chunk-rows", str(args.chunk_rows), "--qe-top-n", str(args.qe_top_n)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    queries = build_store(workdir / f"queries-{args.queries}", args.queries, args.dim, seed=1)
    block = min(args.queries, shortlist.QUERY_BLOCK)
    gemm = measure_gemm(block, args.dim, args.chunk_rows)
    results = {"gemm_gflops": gemm, "queries": args.queries, "dim": args.dim, "top_k": args.top_k,
               "chunk_rows": args.chunk_rows, "threads": os.environ["OMP_NUM_THREADS"], "qe_top_n": args.qe_top_n,
               "sizes": []}
    for size in args.sizes:
        index = build_store(workdir / f"index-{size}", size, args.dim, seed=2)
        runs = [run_child(args, index, queries) for _ in range(args.repeats)]
        stage = min(runs, key=lambda run: run["seconds"])
        stage.update({key: max(run[key] for run in runs) for key in ("peak_rss_mb", "peak_anon_mb")})
        flops = 2 * args.queries * size * args.dim * (2 if args.qe_top_n else 1)  # QE: two passes
        single = measure_single(index, args.single_queries, args.dim, args.top_k, args.chunk_rows)
        results["sizes"].append({
            "index_rows": size, **stage, "gflops": flops / stage["seconds"] / 1e9,
            "single_query_gflops": 2 * size * args.dim / single / 1e9, "single_query_ms": single * 1e3,
        })
    return results


def print_table(results: dict) -> None:
    gemm = results["gemm_gflops"]
    print(f"GEMM peak ([{min(results['queries'], shortlist.QUERY_BLOCK)}, {results['dim']}] @ "
          f"[{results['dim']}, {results['chunk_rows']}] float32, {results['threads']} thread(s)): {gemm:.1f} GFLOP/s")
    qe = f", query expansion top {results['qe_top_n']} (two passes)" if results.get("qe_top_n") else ""
    print(f"{results['queries']} queries, top {results['top_k']}, chunks of {results['chunk_rows']} rows{qe}\n")
    header = ("index rows", "stage CPU s", "wall s", "GFLOP/s", "% of GEMM", "1-query GFLOP/s", "batch speed-up",
              "peak RSS MB", "peak anon MB")
    print(" | ".join(header))
    for row in results["sizes"]:
        values = (f"{row['index_rows']}", f"{row['seconds']:.2f}", f"{row['wall_seconds']:.2f}", f"{row['gflops']:.1f}",
                  f"{100 * row['gflops'] / gemm:.0f}%", f"{row['single_query_gflops']:.1f}",
                  f"{row['gflops'] / row['single_query_gflops']:.1f}x", f"{row['peak_rss_mb']:.0f}",
                  f"{row['peak_anon_mb']:.0f}")
        print(" | ".join(v.rjust(len(h)) for v, h in zip(values, header)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50000, 200000], help="index rows to measure")
    parser.add_argument("--queries", type=int, default=2048, help="query images (1024-4096 is typical)")
    parser.add_argument("--dim", type=int, default=2048, help="global descriptor dimension")
    parser.add_argument("--top-k", type=int, default=100, help="shortlist length")
    parser.add_argument("--chunk-rows", type=int, default=load_config().shortlist.chunk_rows,
                        help="index rows per matrix product")
    parser.add_argument("--single-queries", type=int, default=8, help="queries timed one at a time")
    parser.add_argument("--qe-top-n", type=int, default=0, help="query expansion: first results added (0: off)")
    parser.add_argument("--repeats", type=int, default=2, help="stage runs per size (fastest kept, peak memory: max)")
    parser.add_argument("--workdir", type=Path, help="where the synthetic stores go (kept; default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--child", nargs=2, metavar=("INDEX", "QUERIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_stage(Path(args.child[0]), Path(args.child[1]), args.top_k, args.chunk_rows,
                                       args.qe_top_n)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = benchmark(args, args.workdir or Path(tmp))
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
