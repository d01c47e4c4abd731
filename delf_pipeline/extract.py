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
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Sequence

import numpy as np

from .config import fingerprint, load_config
from .extractors.features import ImageFeatures
from .formats.images import (
    ErrorRecord,
    ImageError,
    ImageRecord,
    iter_decoded,
    list_images,
)
from .formats.store import (
    FORMAT_VERSION,
    ExtractedImage,
    FeatureStore,
    errors_to_csv,
    remove_store,
    write_part,
)
from .utils.artifacts import (
    atomic_path,
    check_manifest,
    parse_shard,
    remove_unfinished,
    select_shard,
    write_text_atomic,
)
from .utils.progress import track

log = logging.getLogger("delf_pipeline.extract")

Extractor = Callable[[np.ndarray], ImageFeatures]
# settings that change what is stored; the others (part_size, ...) only change how
STORE_SETTINGS = (
    "backend", "model", "image_scales", "global_scale_indices", "max_image_size", "score_threshold",
    "max_features", "descriptor_dtype", "vlad_words", "codebook_images", "seed", "local_features", "local_backend",
    "affine_tilts",
)


@dataclass
class Backend:
    """A loaded extraction backend.

    extract: ``extract(image) -> ImageFeatures`` in the decoded image's pixels; ``image`` is
        uint8 [H, W] when :func:`decode_mode` is ``"L"`` (grey), [H, W, 3] when ``"RGB"``.
    ready: images already extracted while loading (the RootSIFT codebook sample), by id, as
        they are stored; the stage writes these instead of decoding and extracting them again.
    """

    extract: Extractor
    ready: dict[str, ExtractedImage] = field(default_factory=dict)


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
        backend = load_backend(conf, records, out, codebook)
        _keep_ready_of(backend, todo)
        _extract_parts(out, todo, backend, conf, shard, strict)
    return finish(out, listing_errors)


def decode_mode(conf: dict) -> str:
    """How the stage decodes images for the configured backend: ``"L"`` (grey) for the pure
    RootSIFT backend, which uses no colour, else ``"RGB"``."""
    return "L" if conf["backend"] == "rootsift" else "RGB"


def store_manifest(conf: dict) -> dict:
    settings = {key: conf[key] for key in STORE_SETTINGS}
    if decode_mode(conf) != "RGB":  # stores without this key were all decoded in RGB
        settings["decode"] = decode_mode(conf)
    return {"format_version": FORMAT_VERSION, "settings": settings, "fingerprint": fingerprint(settings)}


def pending_records(out: Path, records: Sequence[ImageRecord], shard: tuple[int, int]) -> list[ImageRecord]:
    """Records of this shard that are neither stored nor recorded as failed."""
    finished = FeatureStore(out).finished_ids()
    return [r for r in select_shard(records, shard) if r.id not in finished]


def load_backend(conf: dict, records: Sequence[ImageRecord], out: Path, codebook: str | Path | None) -> Backend:
    """The configured backend, loaded once; it keeps only global descriptors when
    ``local_features`` is false. ``records`` (all of the index) is what RootSIFT samples to
    learn its codebook when neither ``codebook`` nor ``out/codebook.npy`` gives one."""
    backend = _load_backend(conf, records, out, codebook)
    if conf["local_features"]:
        return backend
    ready = {i: replace(im, features=im.features.without_local()) for i, im in backend.ready.items()}
    return Backend(lambda image: backend.extract(image).without_local(), ready)


def _load_backend(conf: dict, records: Sequence[ImageRecord], out: Path, codebook) -> Backend:
    """With ``local_backend = "rootsift"`` and another ``backend``, the global descriptor comes
    from ``backend`` and the local features from RootSIFT (a hybrid)."""
    backend, local_backend = conf["backend"], conf["local_backend"]
    if backend == "rootsift":
        return _rootsift_backend(conf, records, out, codebook)
    if backend not in ("savedmodel", "hub"):
        raise ValueError(f"unknown extract.backend {backend!r}; use rootsift, savedmodel or hub")
    if local_backend not in ("", "rootsift"):
        raise ValueError(f"extract.local_backend must be empty (same as backend) or rootsift, got {local_backend!r}")
    from .extractors.models import load_extractor

    model = load_extractor(conf)
    if local_backend == "rootsift":
        return Backend(_with_rootsift_locals(model, conf["max_features"], conf["affine_tilts"]))
    return Backend(model)


def _with_rootsift_locals(model: Extractor, max_features: int, tilts: Sequence[float]) -> Extractor:
    from .extractors.rootsift import extract_rootsift

    def extract(image: np.ndarray) -> ImageFeatures:
        global_descriptor = model(image).global_descriptor
        return replace(extract_rootsift(image, max_features, tilts), global_descriptor=global_descriptor)

    return extract


def _rootsift_backend(conf: dict, records: Sequence[ImageRecord], out: Path, given) -> Backend:
    """RootSIFT locals + VLAD global over the store's codebook, on grey images.

    When the codebook has to be learned, the sample images' features are kept (``ready``):
    on an index of up to ``codebook_images`` images nothing is extracted twice.
    """
    from .extractors.rootsift import extract_rootsift, vlad

    words, sample = _stored_codebook(out, given), {}
    if words is None:
        sample = _sample_features(_codebook_sample(records, conf), conf)
        words = _learn_codebook(sample, conf, out)

    def extract(image: np.ndarray) -> ImageFeatures:
        features = extract_rootsift(image, conf["max_features"], conf["affine_tilts"])
        return replace(features, global_descriptor=vlad(features.descriptors, words))

    ready = {}
    for image_id, im in sample.items():
        global_descriptor = vlad(im.features.descriptors, words)  # from float32, as ``extract`` does
        descriptors = im.features.descriptors.astype(conf["descriptor_dtype"])  # as stored: half the memory
        ready[image_id] = replace(im, features=replace(
            im.features, descriptors=descriptors, global_descriptor=global_descriptor))
    return Backend(extract, ready)


def _stored_codebook(out: Path, given) -> np.ndarray | None:
    """The store's VLAD codebook [K, 128], copied from ``given`` if set; None if it has none yet."""
    path = out / "codebook.npy"
    if given is not None:
        given_words = np.load(given)
        if path.exists() and not np.array_equal(np.load(path), given_words):
            raise ValueError(f"{out} was built with another codebook than {given}; use --overwrite")
        if not path.exists():
            _save_atomic(path, given_words)
        return given_words
    return np.load(path) if path.exists() else None


def _codebook_sample(records: Sequence[ImageRecord], conf: dict) -> list[ImageRecord]:
    """A fixed, evenly spaced subset of *all* records (not of one shard), so every shard
    process learns the identical codebook."""
    step = max(1, len(records) // max(1, conf["codebook_images"]))
    return list(records[::step])[: conf["codebook_images"]]


def _learn_codebook(sample: dict[str, ExtractedImage], conf: dict, out: Path) -> np.ndarray:
    """k-means codebook [K, 128] of the sample's descriptors, saved as ``out/codebook.npy``."""
    from .extractors.rootsift import learn_codebook

    log.info("learning a %d-word VLAD codebook from %d images", conf["vlad_words"], len(sample))
    descriptors = [im.features.descriptors for im in sample.values()]
    words = learn_codebook(np.concatenate(descriptors), conf["vlad_words"], conf["seed"])
    _save_atomic(out / "codebook.npy", words)
    return words


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def _sample_features(sample: Sequence[ImageRecord], conf: dict) -> dict[str, ExtractedImage]:
    """RootSIFT local features of the codebook sample (no global descriptor yet), by id;
    images that fail to decode are left out (the extraction records their errors)."""
    from .extractors.rootsift import extract_rootsift

    decoded = iter_decoded(sample, conf["max_image_size"], mode=decode_mode(conf))
    return {
        record.id: _as_stored(record.id, extract_rootsift(image, conf["max_features"], conf["affine_tilts"]),
                              image.shape, factors)
        for record, image, factors, error in track(decoded, len(sample), "codebook sample")
        if error is None
    }


def _keep_ready_of(backend: Backend, todo: Sequence[ImageRecord]) -> None:
    """Keep only the ready images (codebook sample) that are in ``todo``; others are other shards'."""
    backend.ready = {r.id: backend.ready[r.id] for r in todo if r.id in backend.ready}
    if backend.ready:
        log.info("%d of the %d images to extract were extracted for the codebook sample: stored from there",
                 len(backend.ready), len(todo))


def _extract_parts(out: Path, todo: list[ImageRecord], backend: Backend, conf: dict, shard, strict) -> None:
    """Extract ``todo`` in parts of ``part_size`` images, each written atomically."""
    size = conf["part_size"]
    remove_unfinished(out / "parts", _part_name(shard, 0)[:-6])  # this shard's only: others may be writing
    first = _next_part_number(out, shard)
    results = track(_extract_each(todo, backend, conf), len(todo), f"extract {shard[0]}/{shard[1]}")
    for number, start in enumerate(range(0, len(todo), size), start=first):
        extracted, errors = _split_results(islice(results, min(size, len(todo) - start)), strict)
        write_part(out / "parts" / _part_name(shard, number), extracted, errors,
                   conf["descriptor_dtype"], _local_dim(extracted))
    next(results, None)  # let the progress report finish (its last line comes after the last item)


def _extract_each(todo: list[ImageRecord], backend: Backend, conf: dict) -> Iterator[ExtractedImage | ErrorRecord]:
    """Each record of ``todo`` in order: its stored form, or its error. Decoding runs ahead in
    background threads (overlapping the model) and skips the images ``backend.ready`` has."""
    to_decode = [r for r in todo if r.id not in backend.ready]
    decoded = iter_decoded(to_decode, conf["max_image_size"], mode=decode_mode(conf))
    for record in todo:
        if record.id in backend.ready:
            yield backend.ready.pop(record.id)
            continue
        _, image, factors, error = next(decoded)
        if error is not None:
            yield ErrorRecord(record.id, str(record.path), error)
        else:
            yield _as_stored(record.id, backend.extract(image), image.shape, factors)


def _as_stored(image_id: str, features: ImageFeatures, shape: tuple, factors: np.ndarray) -> ExtractedImage:
    """Features of a decoded image of ``shape`` [H, W(, 3)], with locations and size mapped back
    to the original image by ``factors`` [2] (y, x)."""
    features = replace(features, locations=features.locations * factors.astype(np.float32))
    height, width = round(shape[0] * factors[0]), round(shape[1] * factors[1])
    return ExtractedImage(image_id, features, (height, width))


def _split_results(
    results: Iterable[ExtractedImage | ErrorRecord], strict: bool
) -> tuple[list[ExtractedImage], list[ErrorRecord]]:
    """(extracted images, errors) of ``results``; with ``strict`` the first error raises ImageError."""
    extracted, errors = [], []
    for result in results:
        if isinstance(result, ErrorRecord):
            if strict:
                raise ImageError(_describe(result))
            errors.append(result)
        else:
            extracted.append(result)
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
    from .config import add_config_arguments, add_run_arguments

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
        from .candidates import candidate_ids, read_candidates

        if config["extract"]["backend"] == "rootsift" and not args.codebook:
            raise ValueError("--candidates with the rootsift backend needs --codebook (the index store's "
                             "codebook.npy): a codebook learned from the candidates alone would differ")
        only_ids = candidate_ids(read_candidates(args.candidates, config["rerank"]["num_to_rerank"]))
    run(config, args.images, args.out, split=args.split, shard=parse_shard(args.shard),
        overwrite=args.overwrite, strict=args.strict, codebook=args.codebook, only_ids=only_ids)
    return 0
