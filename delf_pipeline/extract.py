"""Stage 1, extract: images -> feature store (global descriptor + local features per image).

Backends (``extract.backend``):

* ``rootsift`` (embedded default, no download): OpenCV SIFT + RootSIFT local features and a
  RootSIFT-VLAD global descriptor over a codebook learned from the index images;
* ``savedmodel``: a DELF/DELG SavedModel exported by the official code (TF1 tensors or the
  TF2 export), from the path in ``extract.model``;
* ``hub``: the TF Hub DELF v1 module (local folder or hub handle).

The stage is resumable (finished ids are skipped before any model loads; each part is
written atomically) and shardable (``--shard I/N``: N processes write disjoint parts of
the same store).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Callable, Collection, Sequence

import numpy as np

from .artifacts import atomic_path, check_manifest, parse_shard, select_shard, write_text_atomic
from .config import fingerprint, load_config
from .features import ImageFeatures
from .images import ErrorRecord, ImageError, ImageRecord, iter_decoded, list_images
from .progress import track
from .store import FORMAT_VERSION, ExtractedImage, FeatureStore, errors_to_csv, remove_store, write_part

log = logging.getLogger("delf_pipeline.extract")

Extractor = Callable[[np.ndarray], ImageFeatures]
# settings that change what is stored; the others (part_size, ...) only change how
STORE_SETTINGS = (
    "backend", "model", "image_scales", "global_scale_indices", "max_image_size", "score_threshold",
    "max_features", "descriptor_dtype", "vlad_words", "codebook_images", "seed", "local_features", "local_backend",
    "affine_tilts",
)


def run(
    config: dict,
    images: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    shard: tuple[int, int] = (1, 1),
    overwrite: bool = False,
    strict: bool = False,
    codebook: str | Path | None = None,
    only_ids: Collection[str] | None = None,
) -> Path:
    """Extract features of the images in ``images`` into the store ``out``; returns ``out``.

    ``only_ids`` restricts the work to those image ids (e.g. the shortlisted candidates).
    """
    conf, out = config["extract"], Path(out)
    records, listing_errors = list_images(images, split)
    if only_ids is not None:
        wanted = set(only_ids)
        records = [r for r in records if r.id in wanted]
        listing_errors = [e for e in listing_errors if e.id in wanted]
    if strict and listing_errors:
        raise ImageError(_describe(listing_errors[0]))
    if overwrite:
        remove_store(out)
    check_manifest(out / "manifest.json", store_manifest(conf), what="feature store")
    (out / "parts").mkdir(parents=True, exist_ok=True)
    todo = pending_records(out, records, shard)
    if not todo:
        log.info("Skipping extraction: all %d images of shard %d/%d are already in %s", len(records), *shard, out)
    else:
        extractor = make_extractor(conf, records, out, codebook)
        _extract_parts(out, todo, extractor, conf, shard, strict)
    return finish(out, listing_errors)


def store_manifest(conf: dict) -> dict:
    settings = {key: conf[key] for key in STORE_SETTINGS}
    return {"format_version": FORMAT_VERSION, "settings": settings, "fingerprint": fingerprint(settings)}


def pending_records(out: Path, records: Sequence[ImageRecord], shard: tuple[int, int]) -> list[ImageRecord]:
    """Records of this shard that are neither stored nor recorded as failed."""
    finished = FeatureStore(out).finished_ids()
    return [r for r in select_shard(records, shard) if r.id not in finished]


def make_extractor(conf: dict, records: Sequence[ImageRecord], out: Path, codebook: str | Path | None) -> Extractor:
    """The backend's extractor, keeping only the global descriptor when ``local_features`` is false."""
    extract = _backend_extractor(conf, records, out, codebook)
    return extract if conf["local_features"] else lambda image: extract(image).without_local()


def _backend_extractor(conf: dict, records: Sequence[ImageRecord], out: Path, codebook) -> Extractor:
    """Load the backend once and return ``extract(image [H, W, 3] uint8) -> ImageFeatures``.

    With ``local_backend = "rootsift"`` and another ``backend``, the global descriptor comes
    from ``backend`` and the local features from RootSIFT (a hybrid).
    """
    backend, local_backend = conf["backend"], conf["local_backend"]
    if backend == "rootsift":
        return _rootsift_extractor(conf, records, out, codebook)
    if backend not in ("savedmodel", "hub"):
        raise ValueError(f"unknown extract.backend {backend!r}; use rootsift, savedmodel or hub")
    if local_backend not in ("", "rootsift"):
        raise ValueError(f"extract.local_backend must be empty (same as backend) or rootsift, got {local_backend!r}")
    from .models import load_extractor

    model = load_extractor(conf)
    if local_backend == "rootsift":
        return _with_rootsift_locals(model, conf["max_features"], conf["affine_tilts"])
    return model


def _with_rootsift_locals(model: Extractor, max_features: int, tilts: Sequence[float]) -> Extractor:
    from .rootsift import extract_rootsift

    def extract(image: np.ndarray) -> ImageFeatures:
        global_descriptor = model(image).global_descriptor
        return replace(extract_rootsift(image, max_features, tilts), global_descriptor=global_descriptor)

    return extract


def _rootsift_extractor(conf: dict, records: Sequence[ImageRecord], out: Path, codebook) -> Extractor:
    from .rootsift import extract_rootsift, vlad

    words = _ensure_codebook(conf, records, out, codebook)

    def extract(image: np.ndarray) -> ImageFeatures:
        features = extract_rootsift(image, conf["max_features"], conf["affine_tilts"])
        return replace(features, global_descriptor=vlad(features.descriptors, words))

    return extract


def _ensure_codebook(conf: dict, records: Sequence[ImageRecord], out: Path, given) -> np.ndarray:
    """The store's VLAD codebook [K, 128]: copied from ``given``, or learned from the images.

    The learning sample is a fixed, evenly spaced subset of *all* records (not of one
    shard), so every shard process learns the identical codebook.
    """
    from .rootsift import learn_codebook

    path = out / "codebook.npy"
    if given is not None:
        given_words = np.load(given)
        if path.exists() and not np.array_equal(np.load(path), given_words):
            raise ValueError(f"{out} was built with another codebook than {given}; use --overwrite")
        if not path.exists():
            _save_atomic(path, given_words)
        return given_words
    if path.exists():
        return np.load(path)
    step = max(1, len(records) // max(1, conf["codebook_images"]))
    sample = list(records[::step])[: conf["codebook_images"]]
    descriptors = [f.descriptors for f in _sample_features(sample, conf)]
    log.info("learning a %d-word VLAD codebook from %d images", conf["vlad_words"], len(sample))
    words = learn_codebook(np.concatenate(descriptors), conf["vlad_words"], conf["seed"])
    _save_atomic(path, words)
    return words


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def _sample_features(sample: Sequence[ImageRecord], conf: dict) -> list[ImageFeatures]:
    from .rootsift import extract_rootsift

    decoded = iter_decoded(sample, conf["max_image_size"])
    return [
        extract_rootsift(image, conf["max_features"], conf["affine_tilts"])
        for _, image, _, error in track(decoded, len(sample), "codebook sample")
        if error is None
    ]


def _extract_parts(out: Path, todo: list[ImageRecord], extractor: Extractor, conf: dict, shard, strict) -> None:
    """Extract ``todo`` in parts of ``part_size`` images, each written atomically."""
    size = conf["part_size"]
    first = _next_part_number(out, shard)
    decoded = track(iter_decoded(todo, conf["max_image_size"]), len(todo), f"extract {shard[0]}/{shard[1]}")
    for number, start in enumerate(range(0, len(todo), size), start=first):
        chunk = islice(decoded, min(size, len(todo) - start))  # lazy: decoding overlaps the model
        extracted, errors = _extract_chunk(chunk, extractor, strict)
        write_part(out / "parts" / _part_name(shard, number), extracted, errors,
                   conf["descriptor_dtype"], _local_dim(extracted))
    next(decoded, None)  # let the progress report finish (its last line comes after the last item)


def _extract_chunk(chunk, extractor: Extractor, strict: bool) -> tuple[list[ExtractedImage], list[ErrorRecord]]:
    extracted, errors = [], []
    for record, image, factors, error in chunk:
        if error is not None:
            failure = ErrorRecord(record.id, str(record.path), error)
            if strict:
                raise ImageError(_describe(failure))
            errors.append(failure)
            continue
        features = extractor(image)
        features = replace(features, locations=features.locations * factors.astype(np.float32))
        height, width = round(image.shape[0] * factors[0]), round(image.shape[1] * factors[1])
        extracted.append(ExtractedImage(record.id, features, (height, width)))
    return extracted, errors


def _local_dim(extracted: list[ExtractedImage]) -> int:
    dims = {im.features.descriptors.shape[1] for im in extracted}
    if len(dims) > 1:
        raise ValueError(f"local feature dimensionality is not consistent across images: {sorted(dims)}")
    return dims.pop() if dims else 0


def _part_name(shard: tuple[int, int], number: int) -> str:
    return f"s{shard[0]:03d}of{shard[1]:03d}-p{number:06d}"


def _next_part_number(out: Path, shard: tuple[int, int]) -> int:
    prefix = _part_name(shard, 0)[:-6]
    numbers = [int(p.name[len(prefix):]) for p in (out / "parts").glob(f"{prefix}*") if p.is_dir()]
    return max(numbers, default=-1) + 1


def finish(out: Path, listing_errors: list[ErrorRecord]) -> Path:
    """Write ``out/errors.csv`` (all parts + listing problems) and log the totals."""
    store = FeatureStore(out)
    errors = listing_errors + store.errors()
    write_text_atomic(out / "errors.csv", errors_to_csv(sorted(errors, key=lambda e: e.id)))
    log.info("feature store %s: %d images, %d errors%s", out, len(store), len(errors),
             f" (see {out / 'errors.csv'})" if errors else "")
    return out


def _describe(error: ErrorRecord) -> str:
    return f"--strict: image {error.id!r} ({error.path}) failed: {error.reason}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_config_arguments, add_run_arguments

    parser.add_argument("--images", required=True, help="image folder (recursive), Kaggle root, or CSV with id,path")
    parser.add_argument("--out", required=True, help="feature store folder to write (created; resumed if present)")
    parser.add_argument("--split", default="train", help="Kaggle layout: which split folder to read (train or test)")
    parser.add_argument("--codebook", help="rootsift: use this codebook.npy (the index store's) instead of learning one")
    parser.add_argument("--candidates", metavar="SHORTLIST_CSV",
                        help="extract only the index images shortlisted there (top rerank.num_to_rerank per query): "
                             "local features for an index store made with extract.local_features=false")
    parser.add_argument("--strict", action="store_true", help="stop with exit code 1 at the first unusable image")
    add_run_arguments(parser)
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.preset, args.config, args.overrides)
    only_ids = None
    if args.candidates:
        from .rerank import candidate_ids

        if config["extract"]["backend"] == "rootsift" and not args.codebook:
            raise ValueError("--candidates with the rootsift backend needs --codebook (the index store's "
                             "codebook.npy): a codebook learned from the candidates alone would differ")
        only_ids = candidate_ids(args.candidates, config["rerank"]["num_to_rerank"])
    run(config, args.images, args.out, split=args.split, shard=parse_shard(args.shard),
        overwrite=args.overwrite, strict=args.strict, codebook=args.codebook, only_ids=only_ids)
    return 0
