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
        vlad_offsets.npy, vlad_locations.npy, vlad_descriptors.npy, vlad_scales.npy,
        vlad_scores.npy        the same for the local features a fused global's VLAD was made
                               of, when kept (extract.keep_vlad_locals): [n+1], [V, 2], [V, D'], [V], [V]
        errors.csv             images of this part that failed
        part.json              what the part holds: rows, and per file its size in bytes,
                               array shape and dtype, and for the small files (ids.txt,
                               errors.csv, offsets.npy, sizes.npy, vlad_offsets.npy) a CRC-32; written last,
                               inside the same atomic rename, from the data in memory

Opening a part checks it against part.json: every file's size and array header (a cut,
padded or overwritten file), the CRC-32 of the small files (a changed, added or swapped id),
and that ids, offsets and arrays agree on the row and feature counts. The bytes of the
feature arrays are not checksummed: the shortlist would pay a pass over global.npy per
search, and rerank, which reads a few rows of the local arrays, would read the whole store.
A store holding an id twice is refused.
"""
from __future__ import annotations

import csv
import io
import json
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..utils.artifacts import DamagedArtifact, Layout, atomic_path, read_json, rebuild_with, remove_owned
from .features import ImageFeatures
from .images import ErrorRecord, has_control_character

FORMAT_VERSION = 2  # 2: parts record what they hold (part.json)
ERROR_COLUMNS = ("id", "path", "reason")
PART_INFO = "part.json"
CHECKED_CONTENT = ("ids.txt", "errors.csv", "offsets.npy", "sizes.npy", "vlad_offsets.npy")  # CRC-32 checked on open
PART_FILES = ("ids.txt", "errors.csv", "offsets.npy", "locations.npy", "descriptors.npy", "scales.npy", "scores.npy",
              "global.npy", "sizes.npy", PART_INFO)
LOCAL_ARRAYS = ("offsets", "locations", "descriptors", "scales", "scores")  # one set of local features
VLAD_FILES = tuple(f"vlad_{name}.npy" for name in LOCAL_ARRAYS)  # the kept VLAD local features, when kept
_PARTS = Layout("feature store", folders=(("*", Layout("store part", PART_FILES + VLAD_FILES)),))
_DERIVED = Layout("derived store", ("manifest.json", "whitening.npz"), (("parts", _PARTS),))
_SAMPLE = Layout("codebook sample store", ("manifest.json", "errors.csv"), (("parts", _PARTS),))
# What a store folder holds (``--overwrite`` deletes these only): see the module docstring, plus
# the codebook step's sample stores and the whitened / augmented copies under derived/.
STORE_LAYOUT = Layout("feature store", ("manifest.json", "codebook.npy", "errors.csv"), (
    ("parts", _PARTS), ("codebook-sample-*", _SAMPLE), ("derived", Layout("feature store", folders=(("*", _DERIVED),))),
))


@dataclass
class ExtractedImage:
    """One image's features as stored: features plus its original (height, width)."""

    id: str
    features: ImageFeatures
    size: tuple[int, int]


def write_part(
    part_dir: Path, images: Sequence[ExtractedImage], errors: Sequence[ErrorRecord], dtype: str, local_dim: int
) -> None:
    """Write one part atomically: it appears complete or not at all, with its part.json."""
    bad = [im.id for im in images if has_control_character(im.id)]
    if bad:
        raise ValueError(f"image id {bad[0]!r} holds a control character: it cannot be stored in ids.txt")
    arrays = _part_arrays(images, dtype, local_dim)
    texts = {"ids.txt": "".join(f"{im.id}\n" for im in images).encode("utf-8"),
             "errors.csv": errors_to_csv(errors).encode("utf-8")}
    with atomic_path(part_dir, is_dir=True) as tmp:
        files = {}
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
            files[f"{name}.npy"] = {"bytes": (tmp / f"{name}.npy").stat().st_size, "shape": list(array.shape),
                                    "dtype": array.dtype.str}
            if f"{name}.npy" in CHECKED_CONTENT:
                files[f"{name}.npy"]["crc32"] = zlib.crc32(array)
        for name, data in texts.items():
            (tmp / name).write_bytes(data)
            files[name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
        info = {"rows": len(images), "files": files}
        (tmp / PART_INFO).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _part_arrays(images: Sequence[ExtractedImage], dtype: str, local_dim: int) -> dict[str, np.ndarray]:
    """The arrays of a part by name (see the module docstring), C-contiguous."""
    arrays = {**_local_arrays([im.features for im in images], dtype, local_dim),
              "sizes": np.array([im.size for im in images], np.int32).reshape(-1, 2)}
    globals_ = [im.features.global_descriptor for im in images if im.features.global_descriptor is not None]
    if globals_:
        if len(globals_) != len(images):
            raise ValueError("either every image of a part has a global descriptor or none has")
        arrays["global"] = np.stack(globals_).astype(dtype)
    kept = [im.features.vlad_locals for im in images if im.features.vlad_locals is not None]
    if kept:
        if len(kept) != len(images):
            raise ValueError("either every image of a part has its VLAD's local features kept or none has")
        dim = next((f.descriptors.shape[1] for f in kept if f.num_features), 0)
        arrays.update({f"vlad_{name}": array for name, array in _local_arrays(kept, dtype, dim).items()})
    return {name: np.ascontiguousarray(array) for name, array in arrays.items()}


def _local_arrays(features: Sequence[ImageFeatures], dtype: str, local_dim: int) -> dict[str, np.ndarray]:
    """offsets [n+1], locations [T, 2], descriptors [T, local_dim] (``dtype``), scales and scores
    [T] of the local features of ``features`` (n images, T features in all)."""
    return {
        "offsets": np.concatenate([[0], np.cumsum([f.num_features for f in features])]).astype(np.int64),
        "locations": _stack([f.locations for f in features], (0, 2), np.float32),
        "descriptors": _stack([f.descriptors for f in features], (0, local_dim), dtype),
        "scales": _stack([f.scales for f in features], (0,), np.float32),
        "scores": _stack([f.scores for f in features], (0,), np.float32),
    }


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
        return _errors_of(handle)


def _errors_of(handle) -> list[ErrorRecord]:
    return [ErrorRecord(r["id"], r["path"], r["reason"]) for r in csv.DictReader(handle)]


class Part:
    """One finished part of a store, checked against its part.json when opened (see the module
    docstring; :class:`DamagedArtifact` naming the part otherwise), its arrays memory-mapped on
    first use."""

    def __init__(self, path: Path):
        self.path = path
        self.info = self._read_info()
        self._contents = {name: self._checked(name) for name in CHECKED_CONTENT if name in self.info["files"]}
        self.ids = self._contents["ids.txt"].decode("utf-8").split("\n")[:-1]
        self._arrays: dict[str, np.ndarray] = {}
        self._check_rows()

    def _damaged(self, reason: str) -> DamagedArtifact:
        return DamagedArtifact(f"store part {self.path} is damaged: {reason}. Delete the part and rerun "
                               f"extract to extract its images again, or rebuild the store with {rebuild_with()}")

    def _read_info(self) -> dict:
        path = self.path / PART_INFO
        if not path.is_file():
            raise self._damaged(f"{path} is missing (no record of what the part holds)")
        info = read_json(path)
        if not isinstance(info, dict) or not isinstance(info.get("rows"), int) or not isinstance(info.get("files"), dict):
            raise self._damaged(f"{path} lacks rows or files")
        for name, record in info["files"].items():
            self._check_file(name, record)
        return info

    def _check_file(self, name: str, record: dict) -> None:
        """Size in bytes and, for arrays, the header's shape and dtype as recorded."""
        path = self.path / name
        if not path.is_file():
            raise self._damaged(f"{path} is missing")
        if path.stat().st_size != record["bytes"]:
            raise self._damaged(f"{path} holds {path.stat().st_size} bytes, {record['bytes']} were written")
        if name.endswith(".npy"):
            try:
                shape, dtype = _npy_header(path)
            except (ValueError, EOFError) as error:
                raise self._damaged(f"{path} has no valid .npy header ({error})") from None
            if list(shape) != record["shape"] or dtype.str != record["dtype"]:
                raise self._damaged(f"{path} holds an array {shape} {dtype}, {tuple(record['shape'])} "
                                    f"{record['dtype']} was written")

    def _checked(self, name: str) -> bytes:
        """The bytes of ``name`` (or, for an array, its data), once their CRC-32 matches."""
        path = self.path / name
        data = np.load(path) if name.endswith(".npy") else path.read_bytes()
        if zlib.crc32(data) != self.info["files"][name]["crc32"]:
            raise self._damaged(f"{path} does not match its checksum (changed after it was written)")
        return data

    def _check_rows(self) -> None:
        rows, offsets = self.info["rows"], self._contents["offsets.npy"]
        if len(self.ids) != rows:
            raise self._damaged(f"{self.path / 'ids.txt'} holds {len(self.ids)} ids for {rows} rows")
        if len(offsets) != rows + 1 or len(self._contents["sizes.npy"]) != rows:
            raise self._damaged("offsets.npy or sizes.npy disagree with the row count")
        self._check_features("", offsets[-1])
        if self.has_vlad_locals:
            kept = self.info["files"]["vlad_offsets.npy"]["shape"]
            if kept != [rows + 1]:
                raise self._damaged(f"vlad_offsets.npy holds {kept} offsets for {rows} rows")
            self._check_features("vlad_", int(self._contents["vlad_offsets.npy"][-1]))
        if self.has_global and self.info["files"]["global.npy"]["shape"][0] != rows:
            raise self._damaged(f"global.npy does not hold {rows} rows")

    def _check_features(self, prefix: str, count: int) -> None:
        """The local arrays named ``prefix`` + name hold the ``count`` features their offsets count."""
        for name in LOCAL_ARRAYS[1:]:
            record = self.info["files"].get(f"{prefix}{name}.npy")
            if record is None:
                raise self._damaged(f"part.json records no {prefix}{name}.npy beside {prefix}offsets.npy")
            if record["shape"][0] != count:
                raise self._damaged(f"{prefix}{name}.npy does not hold the {count} features {prefix}offsets.npy counts")

    def array(self, name: str) -> np.ndarray:
        """The part's ``name``.npy, memory-mapped read-only."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    @property
    def has_global(self) -> bool:
        return "global.npy" in self.info["files"]

    @property
    def num_features(self) -> int:
        """Local features the part holds, all its images together (the first set)."""
        return int(self.info["files"]["locations.npy"]["shape"][0])

    @property
    def has_vlad_locals(self) -> bool:
        return "vlad_offsets.npy" in self.info["files"]

    def errors(self) -> list[ErrorRecord]:
        return _errors_of(io.StringIO(self._contents["errors.csv"].decode("utf-8"), newline=""))

    def local(self, row: int) -> ImageFeatures:
        """The image of ``row``: its local features and global descriptor (not its kept VLAD
        local features: :meth:`vlad_locals`)."""
        global_ = np.asarray(self.array("global")[row], np.float32) if self.has_global else None
        return self._features("", row, global_)

    def vlad_locals(self, row: int) -> ImageFeatures | None:
        """The kept VLAD local features of ``row`` (None when the part holds none)."""
        return self._features("vlad_", row) if self.has_vlad_locals else None

    def _features(self, prefix: str, row: int, global_: np.ndarray | None = None) -> ImageFeatures:
        start, stop = self.array(f"{prefix}offsets")[row : row + 2]
        return ImageFeatures(
            locations=np.asarray(self.array(f"{prefix}locations")[start:stop]),
            descriptors=np.asarray(self.array(f"{prefix}descriptors")[start:stop], np.float32),
            scales=np.asarray(self.array(f"{prefix}scales")[start:stop]),
            scores=np.asarray(self.array(f"{prefix}scores")[start:stop]),
            global_descriptor=global_,
        )


def candidates_path(index_store: str | Path) -> Path:
    """Where the local features of an index store's shortlisted images go when the index store
    holds global descriptors only: ``INDEX-candidates`` beside it."""
    return Path(f"{index_store}-candidates")


def open_store(store: str | Path | "FeatureStore") -> "FeatureStore":
    """``store`` itself when it is an opened :class:`FeatureStore` (its parts read once), else the
    store at that path."""
    return store if isinstance(store, FeatureStore) else FeatureStore(store)


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
        """Every finished part, checked (:class:`DamagedArtifact` for a damaged part or an id held twice)."""
        names = sorted(p.name for p in (self.path / "parts").iterdir() if p.is_dir() and not p.name.startswith("."))
        parts = [Part(self.path / "parts" / name) for name in names]
        self._check_unique(parts)
        return parts

    def _check_unique(self, parts: list[Part]) -> None:
        """Refuse a store holding an id twice (what two writers of one shard used to leave)."""
        seen: dict[str, str] = {}
        for part in parts:
            counts = {} if len(set(part.ids)) == len(part.ids) else {i: part.ids.count(i) for i in part.ids}
            for image_id in part.ids:
                first = seen.setdefault(image_id, part.path.name)
                if first != part.path.name or counts.get(image_id, 1) > 1:
                    raise DamagedArtifact(
                        f"feature store {self.path} holds an image id twice ({image_id!r} in parts {first} and "
                        f"{part.path.name}): written by two processes at once? Rebuild it with {rebuild_with()}")

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

    def vlad_locals(self, image_id: str) -> ImageFeatures | None:
        """The local features one image's fused VLAD was made of, when the store kept them
        (``extract.keep_vlad_locals``), else None; KeyError names a missing id."""
        if image_id not in self._rows:
            raise KeyError(f"image id {image_id!r} is not in the feature store {self.path}")
        part, row = self._rows[image_id]
        return self.parts[part].vlad_locals(row)

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

    def part_path(self, image_id: str) -> Path:
        """The folder of the part holding ``image_id``."""
        return self.parts[self._rows[image_id][0]].path

    def refuse_non_finite(self, matrix: np.ndarray, ids: Sequence[str] | None = None) -> None:
        """:class:`DamagedArtifact` naming the part of the first row of ``matrix`` [n, G] (global
        descriptors of ``ids``, default: the whole store in store order) that holds NaN or inf."""
        bad = non_finite_rows(matrix)
        if len(bad):
            image_id = (self.ids if ids is None else ids)[bad[0]]
            raise DamagedArtifact(
                f"store part {self.part_path(image_id)} holds non-finite global descriptors ({len(bad)} of "
                f"{len(matrix)} rows, the first of image {image_id!r}): damaged after it was written? Delete the "
                f"part and rerun extract to extract its images again, or rebuild the store with {rebuild_with()}")

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


def non_finite_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows of ``matrix`` [n, G] holding NaN or inf. One pass over memory already read (column
    sums); the rows themselves are looked at only when a sum is not finite (a NaN or inf, or
    huge finite values whose sum overflows: those rows are then not reported)."""
    if not matrix.size or np.isfinite(matrix.sum(axis=0)).all():
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(matrix).all(axis=1))


def _take(ids: list[str], blocks: list[np.ndarray], n: int) -> tuple[list[str], np.ndarray]:
    """Pop the first ``n`` rows from the pending ``ids`` / ``blocks`` buffers."""
    matrix = np.concatenate(blocks, dtype=np.float32)  # converts while copying: one pass
    head_ids, head = ids[:n], matrix[:n]
    del ids[:n]
    blocks[:] = [matrix[n:]] if len(matrix) > n else []
    return head_ids, head


def _npy_header(path: Path) -> tuple[tuple, np.dtype]:
    """(shape, dtype) from a .npy file's header, without mapping it; ValueError if it has none."""
    with open(path, "rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(handle)
    return shape, dtype


def remove_store(path: Path) -> None:
    """Delete a store folder's own files (:data:`STORE_LAYOUT`); one with lock files is emptied but
    for them (``--overwrite``: the lock is held by the process that overwrites it). A folder
    holding anything else is refused (ForeignContent), nothing deleted."""
    remove_owned(path, STORE_LAYOUT)
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
