#!/usr/bin/env python
"""Latency of a search by photo, per step, at several index sizes, and the HTTP layer's cost.

The index is landmarks_mini without its held-out query photos (every ``--every``-th photo),
made with the preset (default ``sift_default``); larger sizes add synthetic images to copies
of it (random unit global descriptors, no local features, as tests/synthetic_stores.py
makes them), so the shortlist's matrix product runs over the full size while the photos'
true candidates stay the real ones. Random descriptors never reach the re-ranked top: the
rerank cost is the same as on a real index of that size (``num_to_rerank`` pairs).

Per size, one process: the Searcher (what ``delf-pipeline query`` runs per photo) answers
every query photo ``--repeat`` times, after one warm-up; each answer's step times give
p50/p95 per step (decode, extract, shortlist, rerank, answer). In the same loop, each
photo is also sent to ``POST /query`` of the service (uvicorn on loopback, the same
Searcher), alternating with the direct call so load changes on a shared machine hit both
alike; the ratio of their median latencies is the HTTP layer's overhead.

    python benchmarks/bench_query.py --sizes 100 1000 10000 --out runs/bench_query
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import DATA, global_only, random_unit_rows  # noqa: E402

from delf_pipeline import index  # noqa: E402
from delf_pipeline.config import load_config  # noqa: E402
from delf_pipeline.formats.index_folder import open_index  # noqa: E402
from delf_pipeline.formats.store import ExtractedImage, write_part  # noqa: E402
from delf_pipeline.search.searcher import STEPS, Searcher  # noqa: E402

DEFAULT_DATA = DATA / "landmarks_mini"
SYNTHETIC_PART = 1000  # synthetic images per store part


def split_photos(data: Path, every: int) -> tuple[Path, list[Path]]:
    """(CSV id,path,landmark_id of the index photos, the held-out query photos)."""
    import csv

    with open(data / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    queries = [data / r["image"] for r in rows[::every]]
    kept = [r for number, r in enumerate(rows) if number % every]
    return kept, queries


def base_index(config: dict, data: Path, every: int, out: Path) -> tuple[Path, list[Path]]:
    """The real index (built once, reused by later runs) and the query photos."""
    kept, queries = split_photos(data, every)
    listing = out / "index_images.csv"
    out.mkdir(parents=True, exist_ok=True)
    listing.write_text("id,path,landmark_id\n" + "".join(
        f"{Path(r['image']).with_suffix('').as_posix()},{data / r['image']},{r['label']}\n" for r in kept))
    return index.build(config, listing, out / "index-real", previews=256), queries


def padded_index(base: Path, size: int, out: Path, seed: int) -> Path:
    """A copy of ``base`` holding ``size`` images: the real ones plus synthetic ones."""
    target, opened = out / f"index-{size}", open_index(base)
    real = len(opened.store)
    if target.exists() and len(open_index(target).store) == size:
        return target
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(base, target)
    dim = opened.store.global_matrix(opened.store.ids[:1]).shape[1]
    dtype = opened.config.extract.descriptor_dtype
    for number, start in enumerate(range(0, max(0, size - real), SYNTHETIC_PART)):
        count = min(SYNTHETIC_PART, size - real - start)
        vectors = random_unit_rows(count, dim, seed + number)
        images = [ExtractedImage(f"synthetic/{start + i:07d}", global_only(v), (480, 640)) for i, v in enumerate(vectors)]
        write_part(target / "store" / "parts" / f"s999of999-p{number:06d}", images, [], dtype, 0)
    return target


def measure(index_path: Path, queries: list[Path], repeat: int) -> dict:
    """Step times of the direct search and latencies of direct vs HTTP calls, interleaved."""
    import httpx

    from delf_pipeline.service.app import create_app
    from delf_pipeline.service.serve import running

    start = time.perf_counter()
    searcher = Searcher(index_path)
    load_seconds = time.perf_counter() - start
    searcher.search_file(queries[0])  # warm-up: first calls of OpenCV, BLAS, caches
    steps = {step: [] for step in STEPS}
    direct, http, cpu = [], [], []
    with running(create_app(index_path, searcher=searcher)) as url, httpx.Client(base_url=url, timeout=300) as client:
        client.post("/query", files={"photo": ("warm.jpg", queries[0].read_bytes())})
        for _ in range(repeat):
            for photo in queries:
                data = photo.read_bytes()
                start, cpu_start = time.perf_counter(), time.process_time()
                answer = searcher.search(data, photo.name)
                direct.append(time.perf_counter() - start)
                cpu.append(time.process_time() - cpu_start)
                for step in STEPS:
                    steps[step].append(answer.timings[step])
                start = time.perf_counter()
                response = client.post("/query", files={"photo": (photo.name, data)})
                http.append(time.perf_counter() - start)
                response.raise_for_status()
    return {"images": len(searcher.ids), "load_seconds": load_seconds, "matrix_mb": searcher.matrix.nbytes / 1e6,
            "steps": steps, "direct": direct, "http": http, "cpu": cpu}


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def table(results: list[dict]) -> str:
    """Markdown: per size, p50 / p95 milliseconds per step and in total, and the HTTP ratio."""
    head = (["index images", "load s", "matrix MB"] + [f"{s} ms" for s in STEPS]
            + ["total ms", "CPU s p50", "HTTP / query (p50)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [str(r["images"]), f"{r['load_seconds']:.1f}", f"{r['matrix_mb']:.0f}"]
        for values in [*(r["steps"][s] for s in STEPS), r["direct"]]:
            p50, p95 = percentiles(values)
            cells.append(f"{p50 * 1000:.0f} / {p95 * 1000:.0f}")
        cells.append(f"{np.median(r['cpu']):.2f}")
        cells.append(f"{np.median(r['http']) / np.median(r['direct']):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="landmarks_mini folder (labels.csv)")
    parser.add_argument("--preset", default="sift_default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a setting of the preset (repeatable; give each setting its own --out)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--every", type=int, default=10, help="every N-th photo is a query, the rest the index")
    parser.add_argument("--repeat", type=int, default=2, help="passes over the query photos per size")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_query"), help="indexes and results.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.data / "labels.csv").is_file():
        sys.exit(f"no labels.csv in {args.data}: give --data (landmarks_mini)")
    base, queries = base_index(load_config(args.preset, None, args.overrides), args.data, args.every, args.out)
    results = []
    for size in args.sizes:
        results.append(measure(padded_index(base, size, args.out, args.seed), queries, args.repeat))
        print(f"{size}: done ({len(results[-1]['direct'])} searches)", file=sys.stderr)
    load = os.getloadavg()
    print(f"{len(queries)} query photos x {args.repeat}, preset {args.preset} {' '.join(args.overrides)}, "
          f"{os.cpu_count()} cores, "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the end\n")
    print(table(results))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
