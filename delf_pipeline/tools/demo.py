"""``delf-pipeline demo``: the whole pipeline on a small landmark set made on the spot.

No download, no GPU. The "landmarks" are photos that scikit-image ships; index and query
views of each are made by known geometric (random homographies: rotation, scale,
perspective, crop) and photometric (gamma, contrast, noise, blur, JPEG) changes, and the
stereo pair shipped with scikit-image gives one real change of viewpoint. Photos that
are not in the index are the non-landmark (distractor) queries. The set is written in
the Kaggle layout with a solution file, then :func:`delf_pipeline.pipeline.run` runs
every stage with the embedded default features and prints the metrics.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import logging
from pathlib import Path

import cv2
import numpy as np

from ..config import add_config_arguments, config_of
from ..formats.images import kaggle_path

log = logging.getLogger("delf_pipeline.tools.demo")

LANDMARKS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
             "motorcycle")
DISTRACTORS = ("moon", "coins", "page", "brick", "clock", "horse")
INDEX_VIEWS, QUERY_VIEWS = 3, 2


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as RGB uint8 [H, W, 3] (the stereo pair's left view for motorcycle)."""
    from skimage import data

    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def random_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A new view of ``image`` [H, W, 3]: random homography, then photometric changes."""
    height, width = image.shape[:2]
    corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    jitter = rng.uniform(-0.12, 0.12, size=(4, 2)) * [width, height]
    angle, scale = rng.uniform(-20, 20), rng.uniform(0.7, 1.1)
    rotation = cv2.getRotationMatrix2D((width / 2, height / 2), angle, scale)
    moved = cv2.transform((corners + jitter)[None], rotation)[0].astype(np.float32)
    homography = cv2.getPerspectiveTransform(corners, moved)
    view = cv2.warpPerspective(image, homography, (width, height), borderMode=cv2.BORDER_REFLECT)
    return photometric(view, rng)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast, brightness, blur and noise, each drawn at random."""
    x = (image.astype(np.float32) / 255.0) ** rng.uniform(0.7, 1.4)
    x = (x - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.08, 0.08)
    if rng.random() < 0.5:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 1.2))
    x = x + rng.normal(0, rng.uniform(0.0, 0.02), x.shape)
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def demo_id(name: str) -> str:
    """A Kaggle-style 16-hex-digit id derived from a view's name."""
    return hashlib.sha1(name.encode()).hexdigest()[:16]


def build_demo_set(root: Path, seed: int = 0) -> Path:
    """Write the demo set in the Kaggle layout under ``root``; returns the solution CSV path."""
    rng = np.random.default_rng(seed)
    train_rows, solution_rows = [], []
    for label, name in enumerate(LANDMARKS):
        photo = load_photo(name)
        for view in range(INDEX_VIEWS):
            image_id = demo_id(f"{name}/index/{view}")
            _save(kaggle_path(root, "train", image_id), random_view(photo, rng))
            train_rows.append((image_id, label))
        queries = [random_view(photo, rng) for _ in range(QUERY_VIEWS)]
        if name == "motorcycle":  # the other camera of the stereo pair: a real viewpoint change
            from skimage import data

            queries[0] = photometric(data.stereo_motorcycle()[1], rng)
        for view, image in enumerate(queries):
            image_id = demo_id(f"{name}/query/{view}")
            _save(kaggle_path(root, "test", image_id), image)
            solution_rows.append((image_id, str(label)))
    for name in DISTRACTORS:
        image_id = demo_id(f"{name}/query")
        _save(kaggle_path(root, "test", image_id), random_view(load_photo(name), rng))
        solution_rows.append((image_id, ""))
    _write_csv(root / "train.csv", ("id", "landmark_id"), train_rows)
    _write_csv(root / "sample_submission.csv", ("id", "landmarks"), [(i, "") for i, _ in solution_rows])
    _write_csv(root / "solution.csv", ("id", "landmarks", "Usage"), [(i, lab, "Public") for i, lab in solution_rows])
    return root / "solution.csv"


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])


def _write_csv(path: Path, header: tuple, rows: list) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="delf_demo", help="folder for the demo data and results (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random views")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from ..pipeline import run

    config = config_of(args)
    out = Path(args.out)
    data = out / "data"
    solution = data / "solution.csv"
    if not solution.exists():
        log.info("building the demo landmark set in %s", data)
        build_demo_set(data, args.seed)
    submission = run(config, data, out / "run", solution=solution, jobs=args.jobs, config_file=args.config,
                     overrides=args.overrides)
    print(f"\nDemo outputs in {out.resolve()}:\n  data: {data}\n  submission: {submission}\n"
          f"  metrics: {out / 'run' / 'metrics.json'}")
    return 0
