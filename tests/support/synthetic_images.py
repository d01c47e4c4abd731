"""Tiny textured photos made from seeded noise (no downloads, no shared data): folders and a
Kaggle layout for the fault and misuse tests, small enough that a whole run takes a second."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from delf_pipeline.formats.images import kaggle_path

SIDE = 96  # pixels per photo side
# Small, fast settings for tests of the stages' mechanics. The textures are made for SIFT, so they
# pin the RootSIFT preset (XFeat has its own tests: test_xfeat.py, test_extract_hybrid.py).
FAST = ["--preset", "sift_default", "--set", "extract.vlad_words=4", "--set", "extract.max_image_size=96",
        "--set", "extract.part_size=2", "--set", "extract.max_features=200", "--set", "rerank.num_to_rerank=3",
        "--set", "shortlist.top_k=4"]


def place_texture(place: int) -> np.ndarray:
    """A grey scene [2*SIDE, 2*SIDE] uint8 of blurred seeded noise: blobs SIFT finds."""
    rng = np.random.default_rng(1000 + place)
    noise = rng.uniform(0, 255, (SIDE // 4, SIDE // 4)).astype(np.uint8)
    return np.asarray(Image.fromarray(noise).resize((2 * SIDE, 2 * SIDE), Image.BICUBIC))


def photo(place: int, view: int) -> Image.Image:
    """View ``view`` of ``place``: a SIDE x SIDE crop shifted by a few pixels per view."""
    shift = 7 * view
    return Image.fromarray(place_texture(place)[shift : shift + SIDE, shift : shift + SIDE]).convert("RGB")


def write_photos(folder: Path, places: int = 4, views: int = 2) -> list[str]:
    """PNG photos ``folder/pP_vV.png``; returns their ids (file stems)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for place in range(places):
        for view in range(views):
            photo(place, view).save(folder / f"p{place}_v{view}.png")
            ids.append(f"p{place}_v{view}")
    return ids


def kaggle_id(place: int, view: int) -> str:
    return f"{place:x}{view:x}{place + view:x}{place * 16 + view:013x}"


def write_kaggle(root: Path, places: int = 3, index_views: int = 2) -> dict[str, str]:
    """ROOT/train.csv, train/, test/ (one query per place, view ``index_views``), sample_submission.csv
    and solution.csv; returns {query id: landmark id}."""
    train, truth = [], {}
    for place in range(places):
        for view in range(index_views + 1):
            image_id = kaggle_id(place, view)
            split = "train" if view < index_views else "test"
            path = kaggle_path(root, split, image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(place, view).save(path, format="JPEG", quality=95)
            if split == "train":
                train.append((image_id, str(100 + place)))
            else:
                truth[image_id] = str(100 + place)
    write_csv(root / "train.csv", ("id", "landmark_id"), train)
    write_csv(root / "sample_submission.csv", ("id", "landmarks"), [(i, "") for i in truth])
    write_csv(root / "solution.csv", ("id", "landmarks", "Usage"), [(i, t, "Private") for i, t in truth.items()])
    return truth


def write_csv(path: Path, header: tuple, rows: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
