"""Tiny feature stores built directly (no images) for the shortlist, rerank and predict tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from delf_pipeline.config import load_config
from delf_pipeline.extract import store_manifest
from delf_pipeline.formats.features import ImageFeatures, l2_normalize
from delf_pipeline.formats.store import ExtractedImage, write_part
from delf_pipeline.utils.artifacts import write_json_atomic


def global_only(vector: np.ndarray) -> ImageFeatures:
    """An image with no local features and the global descriptor ``vector`` [G]."""
    return ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32),
                         np.zeros(0, np.float32), np.zeros(0, np.float32), np.asarray(vector, np.float32))


def local_features(locations: np.ndarray, descriptors: np.ndarray, global_vector: np.ndarray) -> ImageFeatures:
    """An image with local features at ``locations`` [N, 2] (y, x) with ``descriptors`` [N, D]."""
    n = len(locations)
    return ImageFeatures(np.asarray(locations, np.float32), np.asarray(descriptors, np.float32),
                         np.ones(n, np.float32), np.ones(n, np.float32), np.asarray(global_vector, np.float32))


def write_store(
    path: Path, images: dict[str, ImageFeatures], part_size: int, *, local_dim: int = 0,
    dtype: str = "float32", extract_settings: dict | None = None,
) -> Path:
    """A feature store at ``path`` holding ``images`` (id order) in parts of ``part_size``."""
    conf = load_config().extract
    conf.update(extract_settings or {})
    write_json_atomic(path / "manifest.json", store_manifest(conf))
    items = [ExtractedImage(image_id, features, (480, 640)) for image_id, features in images.items()]
    for number, start in enumerate(range(0, len(items), part_size)):
        write_part(path / "parts" / f"s001of001-p{number:06d}", items[start : start + part_size], [], dtype,
                   local_dim)
    (path / "parts").mkdir(parents=True, exist_ok=True)
    return path


def random_unit_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    """[rows, dim] float32 random L2-normalised rows."""
    return l2_normalize(np.random.default_rng(seed).normal(size=(rows, dim)))


def shortlist_frame(candidates: dict[str, list[tuple[str, float]]]) -> pd.DataFrame:
    """A shortlist table (query_id,index_id,rank,score) from query -> [(index id, score)] in rank order."""
    rows = [(q, i, rank, score) for q, cands in candidates.items() for rank, (i, score) in enumerate(cands, 1)]
    return pd.DataFrame(rows, columns=["query_id", "index_id", "rank", "score"])


DIM = 64  # random 64-d unit descriptors are ~1.4 apart (never within 0.9): unrelated images never match
PLACE_FEATURES = 60


def place_view(place: int, shared: int, seed: int, global_seed: int, extra: int = 10):
    """A view of ``place``: ``shared`` of its features moved by a random similarity transform
    (each an inlier of any other view of the place) plus ``extra`` unrelated features."""
    base = np.random.default_rng(1000 + place)
    descriptors = random_unit_rows(PLACE_FEATURES, DIM, seed=1000 + place)[:shared]
    locations = base.uniform(50, 400, (PLACE_FEATURES, 2))[:shared]
    rng = np.random.default_rng(seed)
    angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.2)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = locations @ rotation.T + rng.uniform(-20, 20, 2)
    noisy = l2_normalize(descriptors + rng.normal(0, 0.01, descriptors.shape))
    return local_features(np.vstack([moved, rng.uniform(0, 480, (extra, 2))]),
                          np.vstack([noisy, random_unit_rows(extra, DIM, seed=seed + 50000)]),
                          random_unit_rows(1, 8, global_seed)[0])
