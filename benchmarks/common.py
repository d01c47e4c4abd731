"""What the measurement scripts share: the data paths, synthetic stores, the EVD pair
statistics, the hard recognition task and the leave-one-out run.

Each script in benchmarks/ imports this module (``import common``; Python puts the script's
own folder first on its path) and never another script. The stages, the verifiers and the
demo's photo helpers are imported where they are used: a script that only builds synthetic
stores (bench_shortlist measures its own peak memory) does not load OpenCV, SciPy or pandas.
"""
from __future__ import annotations

import argparse
import csv
import json
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from delf_pipeline.config import Config, load_config, make_section
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.formats.features import ImageFeatures
from delf_pipeline.formats.images import kaggle_path, load_image
from delf_pipeline.formats.store import ExtractedImage, FeatureStore, write_part
from delf_pipeline.formats.tables import read_labels
from delf_pipeline.utils.artifacts import write_json_atomic, write_text_atomic

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repository
PART_ROWS = 16384  # images per synthetic store part


def require_data(*names: str) -> Path:
    """``DATA``, after checking that each of ``names`` (e.g. "evd/1") is there; SystemExit if not."""
    missing = [name for name in names if not (DATA / name).exists()]
    if missing:
        raise SystemExit(f"shared data not found: {', '.join(str(DATA / n) for n in missing)}")
    return DATA


def random_unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    """[count, dim] float32 rows of unit length, drawn with ``seed``."""
    rows = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# Synthetic global-only stores and memory readings (bench_shortlist, bench_scale, bench_query)

NO_LOCALS = (np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.float32))


def build_store(path: Path, rows: int, dim: int, seed: int) -> Path:
    """A store of ``rows`` random unit global descriptors [rows, dim] float16 (reused if complete)."""
    from delf_pipeline import extract
    if (path / "manifest.json").exists() and len(FeatureStore(path)) == rows:
        return path
    conf = load_config().extract
    write_json_atomic(path / "manifest.json", extract.store_manifest(conf))
    rng = np.random.default_rng(seed)
    for number, start in enumerate(range(0, rows, PART_ROWS)):
        block = rng.standard_normal((min(PART_ROWS, rows - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        images = [ExtractedImage(f"{seed}-{start + i:08d}", global_only(vector), (1, 1))
                  for i, vector in enumerate(block)]
        write_part(path / "parts" / f"p{number:06d}", images, [], "float16", 0)
    return path


def global_only(vector: np.ndarray) -> ImageFeatures:
    locations, descriptors, empty = NO_LOCALS
    return ImageFeatures(locations, descriptors, empty, empty, vector)


class MemoryWatch:
    """Samples this process's anonymous resident memory (RssAnon) to find its peak."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_anon_kb = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon_kb = max(self.peak_anon_kb, status_kb("RssAnon"))
            time.sleep(self.interval)


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmHWM: peak resident set, RssAnon: anonymous part)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


# EVD pairs: local features verified on true and swapped pairs

def load_model(args: argparse.Namespace, model: str):
    """``extract(image) -> ImageFeatures`` of the SavedModel ``model``, through models.load_extractor."""
    from delf_pipeline.extractors.models import load_extractor

    return load_extractor(make_section(
        "extract", backend="savedmodel", model=model, image_scales=args.scales,
        global_scale_indices=args.global_scales_ind, score_threshold=args.threshold, max_features=args.max_features,
    ))


def evd_stats(extract, options: dict, folder: Path, names: list[str], args: argparse.Namespace,
              match=None) -> dict:
    """``extract``'s local features on the EVD pairs, verified with ``options``: mean features per
    image, median true-pair and max swapped-pair inliers, true pairs above that max, true-pair
    inliers (all, and within 20 px of the true homography), median extraction seconds and median
    verification CPU seconds per pair; "pairs": (name, true, swapped, agreeing inliers) per pair.
    ``match(a, b) -> PairResult`` of two images' (locations, descriptors, original (height,
    width)) replaces ``verify_pair`` (a learned matcher)."""
    from delf_pipeline.verification.pairs import verify_pair
    seconds: list[float] = []
    sides = {side: [local_features_of(extract, folder / side / f"{n}.png", args, seconds) for n in names] for side in ("1", "2")}
    match = match or (lambda a, b: verify_pair(a[0], a[1], b[0], b[1], **options))
    pair_cpu: list[float] = []
    true, swapped, agreeing = [], [], []
    for i, name in enumerate(names):
        result = timed_pair(match, sides["1"][i], sides["2"][i], pair_cpu)
        true.append(result.inliers)
        agreeing.append(agree_with_truth(result, sides, i, np.loadtxt(folder / "h" / f"{name}.txt")))
        swapped.append(timed_pair(match, sides["1"][i], sides["2"][(i + 1) % len(names)], pair_cpu).inliers)
    return {"features": float(np.mean([len(image[0]) for side in sides.values() for image in side])),
            "median_true": float(np.median(true)), "max_swapped": max(swapped),
            "above": sum(t > max(swapped) for t in true), "true_inliers": sum(true), "agreeing": sum(agreeing),
            "seconds": float(np.median(seconds)), "pair_cpu": float(np.median(pair_cpu)),
            "pairs": [(name, t, s, a) for name, t, s, a in zip(names, true, swapped, agreeing)]}


def timed_pair(match, a: tuple, b: tuple, cpu: list[float]):
    """``match(a, b)``, appending its process CPU time (seconds) to ``cpu``."""
    start = time.process_time()
    result = match(a, b)
    cpu.append(time.process_time() - start)
    return result


def local_features_of(extract, path: Path, args: argparse.Namespace, seconds: list[float]) -> tuple:
    """Keypoints [N, 2] (y, x) in original-image pixels, descriptors [N, D] and the original
    (height, width); appends the extraction time."""
    image, factor = load_image(path, args.max_image_size)
    start = time.perf_counter()
    features = extract(image)
    seconds.append(time.perf_counter() - start)
    size = tuple(int(round(n * f)) for n, f in zip(image.shape[:2], np.broadcast_to(factor, 2)))
    return features.locations * np.float32(factor), features.descriptors, size


def agree_with_truth(result, sides, i: int, homography: np.ndarray, threshold: float = 20.0) -> int:
    """RANSAC inliers whose image-1 point maps within ``threshold`` px of its image-2 match."""
    pairs = result.match_indices[result.inlier_mask]
    xy_a = sides["1"][i][0][pairs[:, 0], ::-1].astype(np.float64)
    xy_b = sides["2"][i][0][pairs[:, 1], ::-1].astype(np.float64)
    projected = np.c_[xy_a, np.ones(len(xy_a))] @ homography.T
    projected = projected[:, :2] / projected[:, 2:]
    return int((np.linalg.norm(projected - xy_b, axis=1) <= threshold).sum())


def glue_match(options: dict | None = None):
    """match(a, b) -> PairResult: LighterGlue on two images' (locations, descriptors, size), then
    the verifier of ``options`` (default: the xfeat_lighterglue preset's, as its rerank does)."""
    from delf_pipeline.verification.lighterglue import load_xfeat_lighterglue
    from delf_pipeline.verification.pairs import verify_matches, verify_options
    glue = load_xfeat_lighterglue()
    options = options or verify_options(load_config("xfeat_lighterglue").rerank)
    return lambda a, b: verify_matches(a[0], b[0], glue.match_stored(*a, *b), **options)


# Held-out splits and Kaggle-layout tasks (the hard task, the landmarks_dev split)

NON_LANDMARKS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "coins", "hubble_deep_field")


def held_out_ids(places: dict[str, list[str]], count, seed: int) -> set[str]:
    """The ids held out as queries: for each place in sorted order, ``count(n)`` of its n ids
    (in the order given) drawn without replacement by one generator seeded with ``seed``.

    The one split drawer of the benchmarks: the hard task (min(3, n // 2) of each
    landmarks_mini place, ids sorted), measure_shortlist's split (min(2, n - 1)) and the
    landmarks_dev split (round(n / 3), non-landmarks as the place "").
    """
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for place in sorted(places):
        ids = places[place]
        k = count(len(ids))
        if k:
            held |= {ids[i] for i in rng.choice(len(ids), size=k, replace=False).tolist()}
    return held


def labelled_rows(folder: Path) -> list[tuple[str, str, str]]:
    """(image, label, relative path) of a photo folder's labels.csv, in its order; the image is
    the path without its extension (the id a folder source gives it), the label "" for none."""
    with open(folder / "labels.csv", newline="") as handle:
        return [(Path(r["image"]).with_suffix("").as_posix(), r["label"], r["image"]) for r in csv.DictReader(handle)]


def by_place(rows: list[tuple]) -> dict[str, list[str]]:
    """{label: ids in row order} of (id, label, ...) rows."""
    places: dict[str, list[str]] = {}
    for row in rows:
        places.setdefault(row[1], []).append(row[0])
    return places


def demo_image_id(name: str) -> str:
    """The id ``delf-pipeline demo`` gives the photo ``name`` (tools.demo, which loads OpenCV)."""
    from delf_pipeline.tools.demo import demo_id
    return demo_id(name)


def landmarks_mini_rows(data: Path, seed: int) -> tuple[list[tuple], list[tuple]]:
    """(index rows, query rows), each (id, landmark, source path)."""
    rows = labelled_rows(data / "landmarks_mini")
    queries = held_out_ids(by_place(sorted(rows)), lambda n: min(3, n // 2), seed)
    index, test = [], []
    for image, label, path in rows:
        row = (demo_image_id(f"landmarks_mini/{path}"), label, data / "landmarks_mini" / path)
        (test if image in queries else index).append(row)
    return index, test


def landmarks_dev_rows(data: Path, seed: int) -> tuple[list[tuple], list[tuple]]:
    """The landmarks_dev split: (index rows, query rows), each (id, landmark or "", source path).
    Queries: round(n / 3) of each place's n photos and of the non-landmarks, drawn with ``seed``;
    index: the other landmark photos (the other non-landmarks are left out)."""
    folder = data / "landmarks_dev"
    rows = labelled_rows(folder)
    queries = held_out_ids(by_place(rows), lambda n: round(n / 3), seed)
    index, test = [], []
    for image, label, path in rows:
        row = (demo_image_id(f"landmarks_dev/{path}"), label, folder / path)
        if image in queries:
            test.append(row)
        elif label:
            index.append(row)
    return index, test


def evd_rows(data: Path) -> tuple[list[tuple], list[tuple]]:
    """Image 1 of each EVD pair to the index, image 2 to the queries; the pair name is the landmark."""
    names = sorted(p.stem for p in (data / "evd" / "1").glob("*.png"))
    index = [(demo_image_id(f"evd/1/{n}"), f"evd_{n}", data / "evd" / "1" / f"{n}.png") for n in names]
    test = [(demo_image_id(f"evd/2/{n}"), f"evd_{n}", data / "evd" / "2" / f"{n}.png") for n in names]
    return index, test


def link(root: Path, split: str, image_id: str, source: Path) -> None:
    target = kaggle_path(root, split, image_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source.resolve())


def write_csv(path: Path, header: tuple, rows: list) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_kaggle_task(out: Path, index: list[tuple], queries: list[tuple]) -> None:
    """A Kaggle-layout task under ``out`` from (id, landmark or "", source) rows: train/ and test/
    hold symbolic links to the sources, except a source named ``skimage.data.NAME`` (a
    scikit-image sample, made in memory), written as a JPEG file; train.csv,
    sample_submission.csv, solution.csv (empty landmarks for non-landmarks) and sources.csv."""
    from delf_pipeline.tools.demo import load_photo
    for split, rows in (("train", index), ("test", queries)):
        for image_id, _, source in rows:
            if str(source).startswith("skimage.data."):
                path = kaggle_path(out, split, image_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(load_photo(str(source).rpartition(".")[2])).save(path, quality=90)
            else:
                link(out, split, image_id, Path(source))
    write_csv(out / "train.csv", ("id", "landmark_id"), [(i, label) for i, label, _ in index])
    write_csv(out / "sample_submission.csv", ("id", "landmarks"), [(i, "") for i, _, _ in queries])
    write_csv(out / "solution.csv", ("id", "landmarks", "Usage"), [(i, label, "Public") for i, label, _ in queries])
    write_csv(out / "sources.csv", ("id", "split", "landmark_id", "source"),
              [(i, "train", label, s) for i, label, s in index] + [(i, "test", label, s) for i, label, s in queries])


def build_hard_task(out: Path, data: Path = DATA, seed: int = 0) -> dict[str, int]:
    """The hard recognition task (EVD second views, held-out landmarks_mini photos, non-landmarks)
    under ``out``; returns counts of each kind of image."""
    mini_index, mini_test = landmarks_mini_rows(data, seed)
    evd_index, evd_test = evd_rows(data)
    non_landmarks = [(demo_image_id(f"skimage/{name}"), "", f"skimage.data.{name}") for name in NON_LANDMARKS]
    write_kaggle_task(out, mini_index + evd_index, mini_test + evd_test + non_landmarks)
    return {"index landmarks_mini": len(mini_index), "index evd": len(evd_index), "query landmarks_mini": len(mini_test),
            "query evd": len(evd_test), "query non-landmark": len(non_landmarks)}


def build_dev_split(out: Path, data: Path = DATA, seed: int = 0) -> dict[str, int]:
    """The landmarks_dev split (:func:`landmarks_dev_rows`) as a Kaggle-layout task under ``out``;
    returns counts of each kind of image."""
    index, queries = landmarks_dev_rows(data, seed)
    write_kaggle_task(out, index, queries)
    return {"index": len(index), "query landmark": sum(1 for q in queries if q[1]),
            "query non-landmark": sum(1 for q in queries if not q[1])}


# Leave-one-out: every photo of a labelled folder a query against the others

LOO_ROWS = (("gap", "GAP"), ("accuracy", "top-1 accuracy"), ("map@100", "mAP@100"), ("mrr", "MRR"),
        ("precision@1", "P@1"), ("precision@5", "P@5"), ("recall@10", "R@10"))


def write_label_files(data: Path, out: Path, queries: set[str] | None = None) -> tuple[Path, Path]:
    """labels.csv -> (index labels ``id,landmark_id`` of the labelled images, solution
    ``id,landmarks,Usage`` of ``queries``, default every image)."""
    rows = [(image, label) for image, label, _ in labelled_rows(data)]
    out.mkdir(parents=True, exist_ok=True)
    labels, solution = out / "index_labels.csv", out / "solution.csv"
    with open(labels, "w", newline="") as a, open(solution, "w", newline="") as b:
        csv.writer(a).writerows([("id", "landmark_id"), *((i, lab) for i, lab in rows if lab)])
        csv.writer(b).writerows([("id", "landmarks", "Usage"),
                                 *((i, lab, "Public") for i, lab in rows if queries is None or i in queries)])
    return labels, solution


def leave_one_out(config: Config, data: Path, out: Path, jobs: int, features: Path | None = None,
                  queries: set[str] | None = None) -> dict:
    """All stages; returns {"global": metrics, "reranked": metrics, "seconds": {...}, "cpu": {...},
    "files": {...}}. ``queries``: only these ids are queries (all images stay in the index;
    images without a label are distractors that never vote); default every image. Seconds and
    CPU seconds (this process, all threads) are of this call's stages; "extract" is the store's
    recorded cost when it was made (:func:`timed_store`) or this call's."""
    from delf_pipeline import predict, rerank, shortlist
    from delf_pipeline.evaluate import evaluate
    config.shortlist.exclude_same_id = True
    labels_csv, solution = write_label_files(data, out, queries)
    seconds, cpu = {}, {}
    store, made = timed_store(config, data, features or out / "features")
    seconds["extract"], cpu["extract"] = made["wall"], made["cpu"]
    with Timer(seconds, cpu, "shortlist"):
        shortlist_csv = shortlist.run(config, store, store, out / "shortlist.csv")
        if queries is not None:
            table = read_table(shortlist_csv)
            shortlist_csv = out / "shortlist-queries.csv"
            write_text_atomic(shortlist_csv, table[table["query_id"].isin(queries)].to_csv(index=False))
    labels = read_labels(labels_csv)
    rerank_csv = None  # rerank.num_to_rerank = 0: global-only
    if config.rerank.num_to_rerank > 0:
        with Timer(seconds, cpu, "rerank"):  # a cascade's selection needs the index labels, its fallback the images
            cascade = bool(config.rerank.cascade)
            rerank_csv = rerank.run(config, shortlist_csv, store, store, out / "rerank.csv", jobs=jobs,
                                    index_labels=labels if cascade else None, query_images=data if cascade else None,
                                    index_images=data if cascade else None)
    ids = predict.query_ids(store) if queries is None else sorted(queries)
    results = {"seconds": seconds, "cpu": cpu, "files": {"shortlist": shortlist_csv, "rerank": rerank_csv,
                                                          "labels": labels_csv, "solution": solution}}
    for name, rerank_input in (("global", None), ("reranked", rerank_csv)):
        with Timer(seconds, cpu, f"predict {name}"):
            submission = predict.run(config, shortlist_csv, labels, ids, out / name / "submission.csv",
                                     rerank_csv=rerank_input)
        results[name] = evaluate(submission, solution, out / name / "ranking.csv", labels_csv)
        results["files"][name] = submission
    return results


class Timer:
    """``with Timer(wall, cpu, key):`` adds the block's wall and process CPU seconds (all threads
    of this process) to ``wall[key]`` and ``cpu[key]``."""

    def __init__(self, wall: dict, cpu: dict, key: str):
        self.wall, self.cpu, self.key = wall, cpu, key

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall[self.key] = self.wall.get(self.key, 0.0) + time.perf_counter() - self.start[0]
        self.cpu[self.key] = self.cpu.get(self.key, 0.0) + time.process_time() - self.start[1]


def timed_store(config: Config, images: Path, store: Path, **options) -> tuple[Path, dict]:
    """``extract.run(config, images, store, **options)`` and the cost of making the store:
    {"wall", "cpu"} seconds, recorded in ``STORE.timing.json`` beside it when this call made
    it from nothing, read back when an earlier call did ({"wall": nan, ...} when neither: a
    store made or resumed by something else)."""
    from delf_pipeline import extract
    record = store.with_name(store.name + ".timing.json")
    fresh = not (store / "manifest.json").exists()
    wall, cpu = {}, {}
    with Timer(wall, cpu, "extract"):
        extract.run(config, images, store, **options)
    if fresh:
        write_json_atomic(record, {"wall": wall["extract"], "cpu": cpu["extract"]})
    if record.exists():
        return store, json.loads(record.read_text())
    return store, {"wall": float("nan"), "cpu": float("nan")}


def metric(metrics: dict, key: str) -> float:
    """A metric of ``evaluate``'s result: top level, else under "retrieval"."""
    return metrics[key] if key in metrics else metrics["retrieval"][key]


def loo_markdown(results: dict) -> str:
    def value(metrics: dict, key: str) -> float:
        return metrics[key] if key in metrics else metrics["retrieval"][key]

    lines = ["| metric | global only | re-ranked |", "|---|---|---|"]
    for key, title in LOO_ROWS:
        lines.append(f"| {title} | {value(results['global'], key):.3f} | {value(results['reranked'], key):.3f} |")
    return "\n".join(lines)
