"""Image lists and decoding.

Three kinds of image source are understood:

* a folder, searched recursively; an image's id is its path relative to the folder,
  without the extension (``sacre_coeur/0292.jpg`` -> ``sacre_coeur/0292``);
* the Kaggle landmark-recognition layout: ``ROOT/train.csv`` (``id,landmark_id``) with
  ``ROOT/train/a/b/c/abc....jpg``, and ``ROOT/test/x/y/z/xyz....jpg`` (ids are file stems);
* a CSV file with ``id`` and ``path`` columns (relative paths are taken from the CSV's
  folder) and optionally ``landmark_id``.

Problems found while listing (malformed rows, duplicate ids, ids holding a control
character such as a newline, file names that are not UTF-8, dangling symlinks and symlink
loops) are returned as error records, never dropped silently. Extensions match whatever
their case. Decoding problems raise :class:`ImageError` with a reason.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
MIN_SIDE = 16  # pixels; smaller images are recorded as errors (degenerate size)
log = logging.getLogger("delf_pipeline.formats.images")


@dataclass(frozen=True)
class ImageRecord:
    id: str
    path: Path
    label: str | None = None


@dataclass(frozen=True)
class ErrorRecord:
    id: str
    path: str
    reason: str


class ImageError(Exception):
    """An image that cannot be used; ``str(error)`` is the reason recorded in errors.csv."""


def list_images(source: str | Path, split: str = "train") -> tuple[list[ImageRecord], list[ErrorRecord]]:
    """Records of ``source`` (folder, Kaggle root, or CSV) sorted by id, and listing errors."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        records, errors = _list_csv(source)
    elif (source / "train.csv").is_file() and (source / split).is_dir():
        records, errors = _list_kaggle(source, split)
    elif source.is_dir():
        records, errors = _list_folder(source)
    else:
        raise FileNotFoundError(f"image source not found (folder, Kaggle root or CSV): {source}")
    records, unusable = _drop_unusable_ids(records)
    unique, duplicates = _drop_duplicates(records)
    return sorted(unique, key=lambda r: r.id), errors + unusable + duplicates


@lru_cache(maxsize=4)
def listed_paths(source: str, split: str) -> dict[str, str]:
    """Image id -> file of ``source``'s ``split`` (:func:`list_images`), listed once per process."""
    return {record.id: str(record.path) for record in list_images(source, split)[0]}


class ImagePaths(Mapping):
    """Image id -> file of ``source``'s ``split``, listed on first lookup (:func:`listed_paths`):
    a stage that may need a few images' files (the cascade's asift fallback) lists none until
    then. Pickles as the source and split."""

    def __init__(self, source: str | Path, split: str):
        self.source, self.split = str(source), split

    def __getitem__(self, image_id: str) -> str:
        return listed_paths(self.source, self.split)[image_id]

    def __iter__(self) -> Iterator[str]:
        return iter(listed_paths(self.source, self.split))

    def __len__(self) -> int:
        return len(listed_paths(self.source, self.split))


def has_control_character(text: str) -> bool:
    """True when ``text`` holds a control character or a line/paragraph separator (what
    would break a one-id-per-line file)."""
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def _drop_unusable_ids(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ErrorRecord]]:
    kept, errors = [], []
    for record in records:
        undecodable = _undecodable_byte(record.id)
        if undecodable is not None:  # a file name in another encoding than UTF-8: the id cannot be stored
            errors.append(ErrorRecord(_printable(record.id), _printable(str(record.path)),
                                      f"file name is not valid UTF-8 (byte 0x{undecodable:02x}): rename the file"))
        elif has_control_character(record.id):
            bad = next(c for c in record.id if has_control_character(c))
            errors.append(ErrorRecord(record.id, str(record.path), f"id holds a control character (U+{ord(bad):04X})"))
        else:
            kept.append(record)
    return kept, errors


def _undecodable_byte(text: str) -> int | None:
    """The first byte of ``text`` that was not UTF-8 in the file system's name (Python keeps it as a
    lone surrogate, U+DC80-U+DCFF), or None."""
    return next((ord(c) - 0xDC00 for c in text if 0xDC80 <= ord(c) <= 0xDCFF), None)


def _printable(text: str) -> str:
    """``text`` with undecodable bytes written as ``\\xNN`` (storable as UTF-8)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _list_folder(folder: Path) -> tuple[list[ImageRecord], list[ErrorRecord]]:
    """Image files under ``folder`` (symlinked folders are not followed); entries with an image
    extension that are not readable files (dangling symlinks, symlink loops) as errors."""
    records, errors = [], []
    for path in folder.rglob("*"):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        image_id = path.relative_to(folder).with_suffix("").as_posix()
        if path.is_file():
            records.append(ImageRecord(image_id, path))
        elif not path.is_dir():
            errors.append(ErrorRecord(image_id, str(path), _not_a_file(path)))
    return records, errors


def _not_a_file(path: Path) -> str:
    """Why ``path`` (with an image extension) is not an image file."""
    if not path.is_symlink():
        return "not a regular file"
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        return f"dangling symlink: {path.readlink()} does not exist"
    except (RuntimeError, OSError):  # RuntimeError: Python < 3.13 reports a loop so
        return f"symlink loop: {path.readlink()}"
    return "not a regular file"


def _list_kaggle(root: Path, split: str) -> tuple[list[ImageRecord], list[ErrorRecord]]:
    """Kaggle layout: train ids and labels from train.csv; other splits from the files."""
    if split != "train":
        records, errors = _list_folder(root / split)
        records = [ImageRecord(r.path.stem, r.path) for r in records if r.path.suffix.lower() in (".jpg", ".jpeg")]
        return records, [ErrorRecord(Path(e.path).stem, e.path, e.reason) for e in errors]
    rows, errors = _read_rows(root / "train.csv", required=("id", "landmark_id"))
    records = [ImageRecord(r["id"], _any_case(kaggle_path(root, split, r["id"])), r["landmark_id"]) for r in rows]
    return records, errors


def kaggle_path(root: Path, split: str, image_id: str) -> Path:
    """``ROOT/split/a/b/c/abc....jpg`` for id ``abc...``."""
    return root / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def _any_case(path: Path) -> Path:
    """``path``, or the file beside it whose name differs only in case (``ABC.JPG``) when ``path`` is missing."""
    if path.exists() or not path.parent.is_dir():
        return path
    wanted = path.name.lower()
    return next((p for p in sorted(path.parent.iterdir()) if p.name.lower() == wanted), path)


def _list_csv(path: Path) -> tuple[list[ImageRecord], list[ErrorRecord]]:
    rows, errors = _read_rows(path, required=("id", "path"))
    records = []
    for row in rows:
        image_path = Path(row["path"])
        image_path = image_path if image_path.is_absolute() else path.parent / image_path
        records.append(ImageRecord(row["id"], image_path, row.get("landmark_id") or None))
    return records, errors


def _read_rows(path: Path, required: Sequence[str]) -> tuple[list[dict], list[ErrorRecord]]:
    """Rows of a CSV with the ``required`` columns; malformed rows become error records.
    A UTF-8 BOM is accepted; other text than UTF-8 is a ValueError naming the file."""
    try:
        return _read_rows_of(path, required)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason}: byte 0x{error.object[error.start]:02x} "
                         f"at offset {error.start}); save it as UTF-8") from None
    except csv.Error as error:
        raise ValueError(f"{path} is not a valid CSV file ({error})") from None


def _read_rows_of(path: Path, required: Sequence[str]) -> tuple[list[dict], list[ErrorRecord]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
        rows, errors = [], []
        for line, row in enumerate(reader, start=2):
            values = [row.get(c) for c in required]
            if None in row or any(v is None or not v.strip() for v in values):
                reason = f"malformed CSV row at {path.name} line {line}"
                errors.append(ErrorRecord(row.get("id") or f"<line {line}>", row.get("path") or "", reason))
                continue
            rows.append({k: v.strip() for k, v in row.items() if isinstance(v, str)})
    return rows, errors


def _drop_duplicates(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ErrorRecord]]:
    seen: dict[str, ImageRecord] = {}
    errors = []
    for record in records:
        if record.id in seen:
            reason = f"duplicate id (first seen at {seen[record.id].path})"
            errors.append(ErrorRecord(record.id, str(record.path), reason))
        else:
            seen[record.id] = record
    return list(seen.values()), errors


def load_image(path: Path, max_image_size: int = 0, mode: str = "RGB") -> tuple[np.ndarray, np.ndarray]:
    """Decode ``path`` to uint8 RGB [H, W, 3] (``mode="RGB"``) or grey [H, W] (``mode="L"``),
    upright (EXIF), resized so max(H, W) <= max_image_size.

    Grey decoding of a colour JPEG reads only its luma plane (no chroma upsampling or colour
    conversion): 2.6x cheaper on landmarks_mini, for models that need no colour.

    Returns the image and the factors [2] (y, x) that map its pixel coordinates back to the
    original image: original (height, width) = (H, W) * factors, and locations [N, 2] (y, x)
    * factors are original pixels (ones when not resized; per axis, because both sides are
    rounded). Raises ImageError with a reason for unusable files.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError("missing file")
    if path.stat().st_size == 0:
        raise ImageError("empty file (0 bytes)")
    return _decode(path, max_image_size, mode)


def decode_bytes(
    data: bytes, max_image_size: int = 0, mode: str = "RGB", max_pixels: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_image` of an encoded image held in memory (an upload).

    ``max_pixels`` > 0 refuses, from the header and before anything is decoded, images whose
    width x height is larger (a small file can claim a huge size: a decompression bomb), in every
    format PIL opens. Reasons never name a path.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    return _decode(io.BytesIO(data), max_image_size, mode, max_pixels)


def _decode(source, max_image_size: int, mode: str, max_pixels: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The body of :func:`load_image` for a path or a binary file object."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"decode mode must be RGB or L, got {mode!r}")
    try:
        with Image.open(source) as image:  # reads the header only
            _log_if_huge(source if isinstance(source, Path) else "an image in memory", image)
            if 0 < max_pixels < image.size[0] * image.size[1]:  # before anything that may decode (PNG's getexif)
                raise ImageError(f"image too large: {image.size[0]}x{image.size[1]} pixels "
                                 f"(limit {max_pixels / 1e6:g} megapixels)")
            original = _upright_size(image)
            _draft(image, max_image_size, mode)
            image.load()
            image = ImageOps.exif_transpose(image)
            converted = to_mode(image, mode)
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large: {error}") from None
    except UnidentifiedImageError:
        raise ImageError("cannot decode image: cannot identify image file (not an image, or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises these for bad or truncated data
        raise ImageError(f"cannot decode image: {error}") from None
    if min(original) < MIN_SIDE:
        raise ImageError(f"degenerate size {original[0]}x{original[1]} (min side {MIN_SIDE} px)")
    array, factors = _resize(converted, original, max_image_size)
    if min(array.shape[:2]) < MIN_SIDE:
        raise ImageError(f"degenerate aspect ratio {original[0]}x{original[1]}: under {MIN_SIDE} px once resized")
    return array, factors


def _log_if_huge(path: Path | str, image: Image.Image) -> None:
    """Say through the log (not as a raw warning) that an image is over PIL's decompression-bomb
    warning size; over twice that size PIL refuses it (an ImageError)."""
    pixels = image.size[0] * image.size[1]
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        log.warning("%s: %d x %d = %d pixels, over PIL's decompression-bomb warning size (%d pixels): decoding it "
                    "anyway", path, *image.size, pixels, Image.MAX_IMAGE_PIXELS)


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the full-resolution image once its EXIF orientation is applied."""
    width, height = image.size
    turned = image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)  # the transposing ones
    return (height, width) if turned else (width, height)


def _draft(image: Image.Image, max_image_size: int, mode: str) -> None:
    """Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while both sides stay >= the target size,
    and decode a colour JPEG straight to grey when ``mode`` is ``"L"``.

    Decoding in the DCT domain is several times cheaper than decoding the full image and
    shrinking it; the final resize to the exact target happens in :func:`_resize`.
    """
    if image.format != "JPEG":
        return
    longest = max(image.size)
    size = image.size
    if 0 < max_image_size < longest:
        scale = max_image_size / longest
        size = (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale))
    target_mode = "L" if mode == "L" and image.mode == "RGB" else image.mode  # libjpeg converts YCbCr -> Y only
    if size != image.size or target_mode != image.mode:
        image.draft(target_mode, size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK, I;16, I, F, 1, ...) as 8-bit RGB."""
    return to_mode(image, "RGB")


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK, I;16, I, F, 1, ...) as 8-bit ``mode`` (``"RGB"`` or ``"L"``)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    return image.convert(mode) if image.mode != mode else image


def _resize(image: Image.Image, original: tuple[int, int], max_image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (possibly drafted) at the target size computed from the ``original`` (width, height)."""
    width, height = original
    longest = max(width, height)
    if max_image_size <= 0 or longest <= max_image_size:
        return np.asarray(image, dtype=np.uint8), np.ones(2)
    factor = max_image_size / longest
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resized = image.resize(size, Image.BILINEAR) if image.size != size else image
    return np.asarray(resized, dtype=np.uint8), np.array([height / size[1], width / size[0]])


def iter_decoded(
    records: Sequence[ImageRecord], max_image_size: int, workers: int = 2, lookahead: int = 8, mode: str = "RGB"
) -> Iterator[tuple[ImageRecord, np.ndarray | None, np.ndarray, str | None]]:
    """Decode ``records`` in background threads, in order: (record, image, factors [2], error).

    ``image`` is [H, W, 3] uint8 for ``mode="RGB"``, [H, W] for ``mode="L"`` (see :func:`load_image`).
    Decoding overlaps whatever the caller does with the previous images (the model), with
    at most ``lookahead`` decoded images waiting. ``image`` is None when ``error`` is set.
    """
    def decode(record: ImageRecord):
        try:
            image, factors = load_image(record.path, max_image_size, mode)
            return record, image, factors, None
        except ImageError as error:
            return record, None, np.ones(2), str(error)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending = []
        for record in records:
            pending.append(pool.submit(decode, record))
            if len(pending) > lookahead:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
