"""The feature store: sharded, append-only, memory-mapped.

Layout of a store folder::

    STORE/manifest.json        backend, model and settings that made it (checked on reuse)
    STORE/codebook.npy         rootsift backend: the VLAD codebook [K, 128]
    STORE/errors.csv           id,path,reason of every image that could not be used
    STORE/parts/NAME/          one part per <= part_size images, written atomically:
        ids.txt                image ids, one per line, in row order            [n]
        offsets.npy  int64     local features of row r are rows offsets[r]:offsets[r+1]  [n+1]
        locations.npy float32  (y, x) in original-image pixels                  [T, 2]
        descriptors.npy        L2-normalised local descriptors (float16/32)     [T, D]
        scales.npy  float32    [T];  scores.npy float32 [T]
        global.npy             L2-normalised global descriptors (float16/32)    [n, G]
        sizes.npy   int32      original (height, width)                         [n, 2]
        errors.csv             images of this part that failed

Ragged arrays with offsets (not one file per image) keep reading in bulk fast and scale to
millions of images. Arrays are opened with ``mmap_mode="r"``: looking up one image touches
only its rows, and global descriptors stream from disk in chunks.
"""
from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..extractors.features import ImageFeatures
from ..utils.artifacts import atomic_path, read_json
from .images import ErrorRecord

FORMAT_VERSION = 1
ERROR_COLUMNS = ("id", "path", "reason")


@dataclass
class ExtractedImage:
    """One image's features as stored: features plus its original (height, width)."""

    id: str
    features: ImageFeatures
    size: tuple[int, int]


def write_part(
    part_dir: Path, images: Sequence[ExtractedImage], errors: Sequence[ErrorRecord], dtype: str, local_dim: int
) -> None:
    """Write one part atomically: it appears complete or not at all."""
    with atomic_path(part_dir, is_dir=True) as tmp:
        counts = [im.features.num_features for im in images]
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        np.save(tmp / "locations.npy", _stack([im.features.locations for im in images], (0, 2), np.float32))
        np.save(tmp / "descriptors.npy", _stack([im.features.descriptors for im in images], (0, local_dim), dtype))
        np.save(tmp / "scales.npy", _stack([im.features.scales for im in images], (0,), np.float32))
        np.save(tmp / "scores.npy", _stack([im.features.scores for im in images], (0,), np.float32))
        np.save(tmp / "sizes.npy", np.array([im.size for im in images], np.int32).reshape(-1, 2))
        globals_ = [im.features.global_descriptor for im in images if im.features.global_descriptor is not None]
        if globals_:
            if len(globals_) != len(images):
                raise ValueError("either every image of a part has a global descriptor or none has")
            np.save(tmp / "global.npy", np.stack(globals_).astype(dtype))
        (tmp / "ids.txt").write_text("".join(f"{im.id}\n" for im in images), encoding="utf-8")
        (tmp / "errors.csv").write_text(errors_to_csv(errors), encoding="utf-8")


def _stack(arrays: list[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    arrays = [a for a in arrays if len(a)]
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(empty_shape, dtype)


def errors_to_csv(errors: Sequence[ErrorRecord]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ERROR_COLUMNS)
    writer.writerows((e.id, e.path, e.reason) for e in errors)
    return buffer.getvalue()


def read_errors(path: Path) -> list[ErrorRecord]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [ErrorRecord(r["id"], r["path"], r["reason"]) for r in csv.DictReader(handle)]


class Part:
    """One finished part of a store, its arrays memory-mapped on first use."""

    def __init__(self, path: Path):
        self.path = path
        self.ids = (path / "ids.txt").read_text(encoding="utf-8").splitlines()
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        """The part's ``name``.npy, memory-mapped read-only."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    @property
    def has_global(self) -> bool:
        return (self.path / "global.npy").exists()

    def errors(self) -> list[ErrorRecord]:
        return read_errors(self.path / "errors.csv")

    def local(self, row: int) -> ImageFeatures:
        start, stop = self.array("offsets")[row : row + 2]
        global_ = np.asarray(self.array("global")[row], np.float32) if self.has_global else None
        return ImageFeatures(
            locations=np.asarray(self.array("locations")[start:stop]),
            descriptors=np.asarray(self.array("descriptors")[start:stop], np.float32),
            scales=np.asarray(self.array("scales")[start:stop]),
            scores=np.asarray(self.array("scores")[start:stop]),
            global_descriptor=global_,
        )


class FeatureStore:
    """Read access to a store folder: all finished parts of all shards.

    >>> store = FeatureStore("out/features/index")
    >>> store.features("some_id").descriptors.shape   # [N, D]
    >>> for ids, block in store.iter_global(4096): ...  # block: [<=4096, G] float32
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "parts").is_dir():
            raise FileNotFoundError(f"no feature store at {self.path} (run `delf-pipeline extract` first)")

    def manifest(self) -> dict:
        """The settings that made this store (see extract.store_manifest)."""
        return read_json(self.path / "manifest.json")

    @cached_property
    def parts(self) -> list[Part]:
        names = sorted(p.name for p in (self.path / "parts").iterdir() if p.is_dir() and not p.name.startswith("."))
        return [Part(self.path / "parts" / name) for name in names]

    @cached_property
    def _rows(self) -> dict[str, tuple[int, int]]:
        return {image_id: (p, r) for p, part in enumerate(self.parts) for r, image_id in enumerate(part.ids)}

    @property
    def ids(self) -> list[str]:
        """Image ids in store order (part by part)."""
        return [image_id for part in self.parts for image_id in part.ids]

    def __len__(self) -> int:
        return sum(len(part.ids) for part in self.parts)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._rows

    def features(self, image_id: str) -> ImageFeatures:
        """Local (and global) features of one image; KeyError names a missing id."""
        if image_id not in self._rows:
            raise KeyError(f"image id {image_id!r} is not in the feature store {self.path}")
        part, row = self._rows[image_id]
        return self.parts[part].local(row)

    def size(self, image_id: str) -> tuple[int, int]:
        """Original (height, width) of an image."""
        part, row = self._rows[image_id]
        height, width = self.parts[part].array("sizes")[row]
        return int(height), int(width)

    def iter_global(self, chunk_rows: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
        """Global descriptors in chunks: (ids [n], float32 [n, G]) with n <= chunk_rows."""
        ids: list[str] = []
        blocks: list[np.ndarray] = []
        for part in self.parts:
            if part.ids and not part.has_global:
                raise ValueError(f"store part {part.path} has no global descriptors")
            # a map of its own, released after the part, so pages read do not pile up in resident memory
            matrix = np.load(part.path / "global.npy", mmap_mode="r") if part.ids else None
            for start in range(0, len(part.ids), chunk_rows):
                ids.extend(part.ids[start : start + chunk_rows])
                blocks.append(matrix[start : start + chunk_rows])
                while len(ids) >= chunk_rows:
                    yield _take(ids, blocks, chunk_rows)
        if ids:
            yield _take(ids, blocks, len(ids))

    def global_matrix(self, ids: Sequence[str] | None = None) -> np.ndarray:
        """Global descriptors of ``ids`` (default: all, store order) as float32 [n, G]."""
        if ids is None:
            blocks = [np.asarray(p.array("global"), np.float32) for p in self.parts if p.ids]
            return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)
        missing = [i for i in ids if i not in self._rows]
        if missing:
            raise KeyError(f"image id {missing[0]!r} is not in the feature store {self.path}")
        rows = [self.parts[part].array("global")[row] for part, row in map(self._rows.get, ids)]
        return np.array(rows, np.float32).reshape(len(rows), -1)  # only the global rows are read

    def errors(self) -> list[ErrorRecord]:
        """Error records of all parts."""
        return [error for part in self.parts for error in part.errors()]

    def finished_ids(self) -> set[str]:
        """Ids already extracted or recorded as failed: work a resumed run skips."""
        return {i for part in self.parts for i in part.ids} | {e.id for e in self.errors()}

    def release(self) -> None:
        """Unmap the part arrays read so far. Pages of a map count in the process's resident
        memory until it is unmapped, so a long run of random reads (rerank over a candidate
        union) calls this now and then to keep its RSS bounded (a Dask nanny watches RSS)."""
        for part in self.parts:
            part._arrays.clear()


def _take(ids: list[str], blocks: list[np.ndarray], n: int) -> tuple[list[str], np.ndarray]:
    """Pop the first ``n`` rows from the pending ``ids`` / ``blocks`` buffers."""
    matrix = np.concatenate(blocks, dtype=np.float32)  # converts while copying: one pass
    head_ids, head = ids[:n], matrix[:n]
    del ids[:n]
    blocks[:] = [matrix[n:]] if len(matrix) > n else []
    return head_ids, head


def remove_store(path: Path) -> None:
    """Delete a store folder (used by --overwrite)."""
    if path.exists():
        shutil.rmtree(path)
