#!/usr/bin/env python
"""What the extract stage adds over the bare model, measured in one run, as a ratio.

For each backend the same photos are extracted two ways, taking turns on groups of
``--group`` photos (so a drift in the machine's speed, common on shared and virtual
machines, hits both alike), ``--repeats`` times:

* bare: every image decoded as the stage decodes it (grey for rootsift, RGB otherwise) and
  resized to extract.max_image_size, into memory first, not timed; then only the
  ``extract(image)`` calls are timed;
* stage: ``extract.run`` on the group's image files into a fresh store: listing, decoding in
  background threads, the model, part writes, errors.csv. The model is loaded once,
  before both (its load time is reported on its own), and handed to the stage.

Reported per backend: images per second of both (median over repeats), the stage's
overhead, stage time / bare time - 1 (target: at most 10%), and the same ratio of process
CPU time (the work the stage adds; it is what a busy or shared machine pays). Backends: ``rootsift`` (the
embedded default, preset sift_default), ``savedmodel`` (preset delg_gldv2 settings) and ``xfeat``
(preset xfeat; its weights fetched once with ``delf-pipeline weights fetch xfeat``). The bare
calls are batched as the stage batches them (extract.batch_size, consecutive images of one size).

With ``--batch-sizes 1 8`` a second table times bare calls and the stage at each
extract.batch_size, taking turns on every group in the same run: wall and CPU seconds per
image and their ratios to the first size.
Without ``--model`` the SavedModel is the tiny TF2 test export that
tests/support/export_test_models.py writes (run as a script): its model calls are cheap, so the decode and
write costs weigh more and its overhead ratio is pessimistic for a real DELG model.

    python benchmarks/bench_extract.py                       # landmarks_mini, both backends
    python benchmarks/bench_extract.py --model /path/to/delg --backends savedmodel --json out.json
    python benchmarks/bench_extract.py --backends xfeat --batch-sizes 1 8 --group 20 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import DATA

from delf_pipeline import extract
from delf_pipeline.config import load_config
from delf_pipeline.extractors.base import Extractor, extract_batch
from delf_pipeline.extractors.build import build, decode_mode
from delf_pipeline.extractors.codebook import prepare_codebook
from delf_pipeline.extractors.stream import batches
from delf_pipeline.formats.images import list_images, load_image

MINI = DATA / "landmarks_mini"
PRESETS = {"rootsift": "sift_default", "savedmodel": "delg_gldv2", "xfeat": "xfeat"}
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="photo folder (default: ../shared/data/landmarks_mini, "
                                                    "else skimage sample photos)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--backends", nargs="+", default=["rootsift", "savedmodel"], choices=sorted(PRESETS))
    parser.add_argument("--model", help="SavedModel folder (default: export the tiny TF2 test model)")
    parser.add_argument("--repeats", type=int, default=5, help="bare/stage measurements of all photos per backend")
    parser.add_argument("--group", type=int, default=10,
                        help="photos per turn: bare and stage alternate on groups this size (0: all in one turn)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override applied to every backend, e.g. extract.max_image_size=512")
    parser.add_argument("--batch-sizes", type=int, nargs="+", metavar="B",
                        help="also time bare calls and the stage at each extract.batch_size (ratios to the first)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def photo_groups(args: argparse.Namespace, scratch: Path) -> list[Path]:
    """The photos to extract (--images, landmarks_mini, or skimage samples written to scratch),
    linked into folders ``scratch/photos/gNNN`` of ``--group`` photos each."""
    source = args.images or (MINI if MINI.is_dir() else None)
    if source is None:
        source = write_skimage_photos(scratch / "skimage")
    records = list_images(source)[0][: args.limit or None]
    size = args.group or len(records) or 1
    groups = []
    for start in range(0, len(records), size):
        groups.append(scratch / "photos" / f"g{start // size:03d}")
        for record in records[start : start + size]:
            link = groups[-1] / f"{record.id}{record.path.suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(record.path.resolve())
    return groups


def write_skimage_photos(folder: Path) -> Path:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True)
    for name in SKIMAGE_PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.jpg", quality=92)
    return folder


def load_backend(backend: str, conf: dict, folder: Path, scratch: Path) -> tuple[Extractor, float]:
    """(extractor, load seconds): the model loaded once, as the stage would load it (rootsift:
    with its codebook learned from ``folder``)."""
    records, store = list_images(folder)[0], scratch / f"load-{backend}"
    start = time.perf_counter()
    words, local = prepare_codebook(store, records, conf.extract, (1, 1), None)
    loaded = build(conf.extract, words, local)
    return loaded, time.perf_counter() - start


def time_bare(extractor, images: list, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the model calls alone, batched as the stage batches ``images``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for group in batches([(None, image, None, None) for image in images], batch_size, len(images)):
        extract_batch(extractor, [item[1] for item in group])
    return time.perf_counter() - wall, time.process_time() - cpu


def time_stage(extractor: Extractor, conf: dict, folder: Path, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of the whole stage with the loaded ``extractor`` injected, every
    image through it: the per-image cost, which is what an index much larger than the
    codebook sample pays."""
    wall, cpu = time.perf_counter(), time.process_time()
    extract.run(conf, folder, out, extractor=extractor)
    return time.perf_counter() - wall, time.process_time() - cpu


def prepared(backend: str, args: argparse.Namespace, groups: list[Path], scratch: Path) -> tuple:
    """(config, loaded extractor, load seconds, decoded images of each group) of ``backend``."""
    conf = load_config(PRESETS[backend], overrides=args.overrides)
    if backend == "savedmodel":
        conf.extract.model = args.model or str(export_test_model(scratch))
    loaded, load_seconds = load_backend(backend, conf, scratch / "photos", scratch)
    mode = decode_mode(conf.extract)  # what the stage hands the model: grey for rootsift
    decoded = [[load_image(r.path, conf.extract.max_image_size, mode)[0] for r in list_images(group)[0]]
               for group in groups]
    for size in {conf.extract.batch_size, *(args.batch_sizes or ())}:  # warm-up: tracing, allocator
        extract_batch(loaded, [decoded[0][0]] * size)
    return conf, loaded, load_seconds, decoded


def bench_backend(backend: str, args: argparse.Namespace, groups: list[Path], scratch: Path) -> dict:
    conf, loaded, load_seconds, decoded = prepared(backend, args, groups, scratch)
    images = [image for group in decoded for image in group]
    bare, stage = [], []
    for repeat in range(args.repeats):
        bare_times, stage_times = np.zeros(2), np.zeros(2)  # (wall, CPU) summed over the groups
        for number, (group, group_images) in enumerate(zip(groups, decoded)):
            bare_times += time_bare(loaded, group_images, conf.extract.batch_size)
            stage_times += time_stage(loaded, conf, group, scratch / f"store-{backend}-{repeat}-{number}")
        bare.append(tuple(bare_times))
        stage.append(tuple(stage_times))
    bare_s, bare_cpu = (statistics.median(column) for column in zip(*bare))  # (wall, CPU) medians
    stage_s, stage_cpu = (statistics.median(column) for column in zip(*stage))
    return {
        "backend": backend, "model": conf.extract.model or "(opencv sift)", "images": len(images),
        "max_image_size": conf.extract.max_image_size, "load_seconds": load_seconds, "groups": len(groups),
        "bare_seconds": [b[0] for b in bare], "stage_seconds": [s[0] for s in stage],
        "bare_cpu_seconds": [b[1] for b in bare], "stage_cpu_seconds": [s[1] for s in stage],
        "bare_images_per_second": len(images) / bare_s, "stage_images_per_second": len(images) / stage_s,
        "overhead": stage_s / bare_s - 1.0, "cpu_overhead": stage_cpu / bare_cpu - 1.0,
    }


def bench_batch_sizes(backend: str, args: argparse.Namespace, groups: list[Path], scratch: Path) -> dict:
    """Bare and stage (wall, CPU) seconds per image at each of ``args.batch_sizes`` (medians of
    the repeats), the sizes taking turns on every group, first in rotation."""
    conf, loaded, _, decoded = prepared(backend, args, groups, scratch)
    count = sum(len(group) for group in decoded)
    times = {(size, kind): [] for size in args.batch_sizes for kind in ("bare", "stage")}
    for repeat in range(args.repeats):
        sums = {key: np.zeros(2) for key in times}
        for number, (group, group_images) in enumerate(zip(groups, decoded)):
            turn = (number + repeat) % len(args.batch_sizes)
            for size in args.batch_sizes[turn:] + args.batch_sizes[:turn]:
                sized = conf.copy()
                sized.extract.batch_size = size
                sums[size, "bare"] += time_bare(loaded, group_images, size)
                store = scratch / f"b{size}-{backend}-{repeat}-{number}"
                sums[size, "stage"] += time_stage(loaded, sized, group, store)
        for key, total in sums.items():
            times[key].append(total)
    per_image = {f"{kind} {size}": [statistics.median(column) / count for column in zip(*times[size, kind])]
                 for size, kind in times}
    return {"backend": backend, "images": count, "max_image_size": conf.extract.max_image_size,
            "groups": len(groups), "per_image_wall_cpu": per_image}


def print_batch_table(rows: list[dict], sizes: list[int]) -> None:
    print(f"\n| backend | images | batch size | bare wall s/image | bare CPU s/image | stage wall s/image "
          f"| stage CPU s/image | stage wall / batch {sizes[0]} | stage CPU / batch {sizes[0]} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        times = row["per_image_wall_cpu"]
        base_wall, base_cpu = times[f"stage {sizes[0]}"]
        for size in sizes:
            (bare_wall, bare_cpu), (wall, cpu) = times[f"bare {size}"], times[f"stage {size}"]
            print(f"| {row['backend']} | {row['images']} | {size} | {bare_wall:.3f} | {bare_cpu:.3f} | {wall:.3f} "
                  f"| {cpu:.3f} | {wall / base_wall:.2f} | {cpu / base_cpu:.2f} |")


def export_test_model(scratch: Path) -> Path:
    """The tiny TF2 DELG test model, exported by the test suite's own script into ``scratch``."""
    script = Path(__file__).resolve().parents[1] / "tests" / "support" / "export_test_models.py"
    subprocess.run([sys.executable, str(script), str(scratch / "models")], check=True, capture_output=True)
    return scratch / "models" / "tf2_delg"


def print_table(rows: list[dict]) -> None:
    print(f"{'backend':<11} {'images':>6} {'max px':>6} {'load s':>7} {'bare img/s':>10} "
          f"{'stage img/s':>11} {'overhead':>8} {'CPU overhead':>12}")
    for row in rows:
        print(f"{row['backend']:<11} {row['images']:>6} {row['max_image_size']:>6} {row['load_seconds']:>7.2f} "
              f"{row['bare_images_per_second']:>10.2f} {row['stage_images_per_second']:>11.2f} "
              f"{100 * row['overhead']:>7.1f}% {100 * row['cpu_overhead']:>11.1f}%")
    print("load s: loading the model once (rootsift: learning the VLAD codebook), in neither timing.")
    print("overhead = stage wall time / bare model wall time - 1 (median of the repeats); target <= 10%.")
    print("CPU overhead: the same with process CPU time (all threads): the work the stage adds, which")
    print("costs wall time only when the cores are busy (a model using every core, or a shared machine).")


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_extract.") as tmp:
        scratch = Path(tmp)
        groups = photo_groups(args, scratch)
        rows = [bench_backend(backend, args, groups, scratch) for backend in args.backends]
        batch_rows = [bench_batch_sizes(backend, args, groups, scratch) for backend in args.backends
                      if args.batch_sizes]
    print_table(rows)
    if batch_rows:
        print_batch_table(batch_rows, args.batch_sizes)
    if args.json:
        args.json.write_text(json.dumps(rows + batch_rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
