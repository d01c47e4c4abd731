"""Stage 1, extract: images -> feature store (global descriptor + local features per image).

Backends (``extract.backend``):

* ``rootsift`` (embedded default, no download): OpenCV SIFT + RootSIFT local features and a
  RootSIFT-VLAD global descriptor over a codebook learned from the index images;
* ``xfeat``: XFeat learned local features (64-d, weights fetched once with
  ``delf-pipeline weights fetch xfeat``) and a VLAD of them over a codebook learned the same way;
* ``savedmodel``: a DELF/DELG SavedModel exported by the official code (TF1 tensors or the
  TF2 export), from the path in ``extract.model``;
* ``hub``: the TF Hub DELF v1 module (local folder or hub handle).

The stage is resumable (finished ids are skipped before any model loads; each part is
written atomically) and shardable (``--shard I/N``: N processes write disjoint parts of
the same store). With ``--dask ADDRESS`` the parts are tasks on a Dask cluster whose workers
share the store's folder; each worker loads the model once (see :func:`_extract_part`).
Consecutive images of one decoded size go to the model together, up to ``batch_size`` (XFeat;
the other backends take them one by one; part of the store's fingerprint, since a batch's
results differ from one image's in the last bits).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import logging
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Collection, Iterable, Iterator, Sequence

import numpy as np

from .config import load_config
from .export.efficientnet_lite0 import BUILTIN, builtin_model, export_record
from .extractors.features import (
    BatchExtractor,
    Extractor,
    ImageFeatures,
    extract_batch,
    mapped,
)
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
    load_array,
    output_lock,
    parse_shard,
    remove_unfinished,
    select_shard,
    settings_manifest,
    shard_name,
    write_text_atomic,
)
from .utils.parallel import run_tasks, worker_local
from .utils.progress import track

log = logging.getLogger("delf_pipeline.extract")

RUNTIME_KEYS = ("part_size",)  # extract keys that change how the store is written, not what it holds
LOCAL_BACKENDS = ("rootsift", "xfeat")  # backends with their own local features and a VLAD global


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
    extractor: Extractor | None = None,
    dask_address: str | None = None,
) -> Path:
    """Extract features of the images in ``images`` into the store ``out``; returns ``out``.

    ``only_ids`` restricts the work to those image ids (e.g. the shortlisted candidates).
    ``extractor`` replaces the configured backend (tests and benchmarks inject one): no model
    is loaded and no codebook learned; it is given images decoded as :func:`decode_mode` says
    (batches through its ``batch`` call if it has one, see :func:`extract_batch`).
    ``dask_address``: run the parts on that dask.distributed scheduler (same store bytes); the
    workers load the configured backend, so it does not go with ``extractor``.
    """
    if extractor is not None and dask_address:
        raise ValueError("an injected extractor runs in this process: it cannot go with dask_address")
    conf, out = config["extract"], Path(out)
    records, listing_errors = list_images(images, split)
    if only_ids is not None:
        wanted = set(only_ids)
        records = [r for r in records if r.id in wanted]
        listing_errors = [e for e in listing_errors if e.id in wanted]
    if strict and listing_errors:
        raise ImageError(_describe(listing_errors[0]))
    with output_lock(out, shard_name(shard), "feature store"):  # one writer per shard of a store
        if overwrite:
            remove_store(out)
        conf = resolve_model(conf, records) if extractor is None else conf
        check_manifest(out / "manifest.json", store_manifest(conf), what="feature store")
        (out / "parts").mkdir(parents=True, exist_ok=True)
        if not pending_records(out, records, shard):
            log.info("Skipping extraction: all %d images of shard %d/%d are already in %s", len(records), *shard,
                     out)
        elif dask_address:
            _extract_on_dask(dask_address, out, records, conf, shard, strict, codebook)
        else:
            extractor = extractor or load_backend(conf, records, out, codebook, shard)
            _extract_parts(out, pending_records(out, records, shard), extractor, conf, shard, strict)
        finish(out, listing_errors)
    if strict:
        _refuse_recorded(out, only_ids)
    return out


def candidate_local_store(config: dict, index_store: Path, wanted: set[str], data: Path, *,
                          strict: bool = False) -> Path:
    """The store to read the candidates' local features from: ``index_store`` itself, or, when
    it holds global descriptors only, ``<index_store>-candidates`` made by extracting
    ``wanted`` (each image once) with the index store's own settings and codebook."""
    settings = FeatureStore(index_store).manifest()["settings"]
    if settings.get("local_features", True):
        return index_store
    local_config = copy.deepcopy(config)
    local_config["extract"].update({k: v for k, v in settings.items() if k in local_config["extract"]},
                                   local_features=True)
    codebook = index_store / "codebook.npy"
    log.info("extracting local features of %d shortlisted index images", len(wanted))
    return run(local_config, data, Path(f"{index_store}-candidates"), split="train", only_ids=wanted,
               strict=strict, codebook=codebook if codebook.exists() else None)


def decode_mode(conf: dict) -> str:
    """How the stage decodes images for the configured backend: ``"L"`` (grey) for the pure
    RootSIFT backend, which uses no colour, else ``"RGB"`` (XFeat averages the three channels,
    which is not the luma that grey decoding gives)."""
    return "L" if conf["backend"] == "rootsift" else "RGB"


def store_manifest(conf: dict) -> dict:
    """The store's manifest: every ``extract`` key but :data:`RUNTIME_KEYS`, how images were
    decoded (``decode``, recorded when not RGB: older stores were all decoded in RGB) and, for a
    model exported by this package, what the export was made from (``model_export``)."""
    decode = {"decode": decode_mode(conf)} if decode_mode(conf) != "RGB" else {}
    manifest = {"format_version": FORMAT_VERSION, **settings_manifest({**conf, **decode}, RUNTIME_KEYS)}
    record = export_record(conf["model"]) if conf["model"] else None
    return {**manifest, "model_export": record} if record else manifest


def resolve_model(conf: dict, records: Sequence[ImageRecord]) -> dict:
    """``conf`` with ``model = "builtin:efficientnet_lite0"`` replaced by the folder of its export,
    which is made on first use with the local PCA learned from ``records`` (the index images
    about to be extracted); any other model is left as it is."""
    if not conf["model"].startswith("builtin:"):
        return conf
    if conf["model"] != BUILTIN:
        raise ValueError(f"unknown built-in model extract.model={conf['model']!r}; the built-in one is {BUILTIN!r}")
    model = builtin_model(conf, records)
    log.info("%s is %s; extract the queries of these index images with --set extract.model=%s (its PCA was "
             "learned from them; `delf-pipeline run` does this itself)", BUILTIN, model, model)
    return {**conf, "model": str(model)}


def pending_records(out: Path, records: Sequence[ImageRecord], shard: tuple[int, int]) -> list[ImageRecord]:
    """Records of this shard that are neither stored nor recorded as failed."""
    finished = FeatureStore(out).finished_ids()
    return [r for r in select_shard(records, shard) if r.id not in finished]


def load_backend(conf: dict, records: Sequence[ImageRecord], out: Path, codebook: str | Path | None,
                 shard: tuple[int, int] = (1, 1)) -> Extractor:
    """The configured backend, loaded once; it keeps only global descriptors when
    ``local_features`` is false. RootSIFT and XFeat need a codebook: ``codebook``, else
    ``out/codebook.npy``, else one learned by :func:`codebook_step` from ``records`` (all of the index)."""
    extractor = _load_backend(conf, records, out, codebook, shard)
    if conf["local_features"]:
        return extractor
    return mapped(extractor, ImageFeatures.without_local)


def _load_backend(conf: dict, records: Sequence[ImageRecord], out: Path, codebook, shard) -> Extractor:
    """With ``local_backend`` set (rootsift or xfeat) and a model ``backend``, the global
    descriptor comes from the model and the local features from ``local_backend`` (a hybrid)."""
    backend, local_backend = conf["backend"], conf["local_backend"]
    if backend in LOCAL_BACKENDS:
        local = local_extractor(conf, backend)
        words = _stored_codebook(out, codebook)
        if words is None or _sample_store(out, shard).is_dir():  # to learn, or a killed run's step to finish
            words = codebook_step(out, records, conf, shard, words, local)
        return _vlad_extractor(local, words)
    if backend not in ("savedmodel", "hub"):
        raise ValueError(f"unknown extract.backend {backend!r}; use rootsift, xfeat, savedmodel or hub")
    if local_backend not in ("", *LOCAL_BACKENDS):
        raise ValueError(f"extract.local_backend must be empty (same as backend), rootsift or xfeat, "
                         f"got {local_backend!r}")
    from .extractors.models import load_extractor

    model = load_extractor(conf)
    if local_backend:
        return _with_locals(model, local_extractor(conf, local_backend))
    return model


def local_extractor(conf: dict, name: str) -> Extractor:
    """Local features only (no global descriptor) of the local backend ``name`` (rootsift or
    xfeat), as the config asks. XFeat's weights come from ``xfeat_weights`` or the cache."""
    if name == "rootsift":
        from .extractors.rootsift import extract_rootsift

        return lambda image: extract_rootsift(image, conf["max_features"], conf["affine_tilts"])
    from .extractors import weights, xfeat

    path = weights.locate("xfeat", conf["xfeat_weights"] or None)
    return xfeat.XFeatExtractor(xfeat.load_weights(path), conf["max_features"], conf["xfeat_threshold"],
                                tuple(conf["xfeat_scales"]))


def _with_locals(model: Extractor, local: Extractor) -> BatchExtractor:
    """``local``'s features with ``model``'s global descriptor; batched where each of them is."""
    def batch(images: Sequence[np.ndarray]) -> list[ImageFeatures]:
        wholes = extract_batch(model, images)
        return [replace(features, global_descriptor=whole.global_descriptor)
                for features, whole in zip(extract_batch(local, images), wholes)]

    return BatchExtractor(batch)


def _vlad_extractor(local: Extractor, words: np.ndarray) -> BatchExtractor:
    """``local`` features + VLAD global over the codebook ``words`` [K, D]; batched as ``local`` is."""
    from .extractors.rootsift import vlad

    return mapped(local, lambda features: replace(features, global_descriptor=vlad(features.descriptors, words)))


def _stored_codebook(out: Path, given) -> np.ndarray | None:
    """The store's VLAD codebook [K, D], copied from ``given`` if set; None if it has none yet."""
    path = out / "codebook.npy"
    if given is not None:
        given_words = load_array(Path(given))
        if path.exists() and not np.array_equal(load_array(path), given_words):
            raise ValueError(f"{out} was built with another codebook than {given}; use --overwrite")
        if not path.exists():
            _save_atomic(path, given_words)
        return given_words
    return load_array(path) if path.exists() else None


def codebook_step(out: Path, records: Sequence[ImageRecord], conf: dict, shard: tuple[int, int],
                  words: np.ndarray | None = None, local: Extractor | None = None) -> np.ndarray:
    """Learn the VLAD codebook [K, D] of the store ``out`` (saved as ``out/codebook.npy``).

    An ordinary resumable step: the sample's local features (``local``, default the
    configured backend's) are extracted, in parts, into
    the store ``out/codebook-sample-IofN`` (float32, as the extraction computes VLAD); the
    codebook is learned from them (unless a killed run already saved it: ``words``); then this
    shard's sample images are written as ordinary parts of ``out`` with their VLAD (the first
    parts: store order is part order), so the extraction that follows skips them like any
    finished image, and the sample store is removed. Every shard learns the same codebook.
    """
    sample_out = _sample_store(out, shard)
    sample = _codebook_sample(records, conf)
    sample_conf = {**conf, "descriptor_dtype": "float32"}
    for folder in (out, sample_out):
        (folder / "parts").mkdir(parents=True, exist_ok=True)
    local = local or local_extractor(conf, conf["backend"])
    _extract_parts(sample_out, pending_records(sample_out, sample, (1, 1)), local, sample_conf,
                   (1, 1), strict=False, label="codebook sample")
    store = FeatureStore(sample_out)
    words = _learn_codebook(store, conf, out) if words is None else words
    mine = [r for r in pending_records(out, records, shard) if r.id in store]
    _write_parts(out, _with_vlad(store, mine, words, conf), len(mine), conf, shard, strict=False,
                 label="codebook sample to the store")
    remove_store(sample_out)
    return words


def _sample_store(out: Path, shard: tuple[int, int]) -> Path:
    """The folder of this shard's codebook sample store (see :func:`codebook_step`)."""
    return out / f"codebook-sample-{shard[0]}of{shard[1]}"


def _codebook_sample(records: Sequence[ImageRecord], conf: dict) -> list[ImageRecord]:
    """A fixed, evenly spaced subset of *all* records (not of one shard), so every shard
    process learns the identical codebook."""
    step = max(1, len(records) // max(1, conf["codebook_images"]))
    return list(records[::step])[: conf["codebook_images"]]


def _learn_codebook(sample: FeatureStore, conf: dict, out: Path) -> np.ndarray:
    """k-means codebook [K, D] of the sample store's descriptors, saved as ``out/codebook.npy``."""
    from .extractors.rootsift import learn_codebook

    log.info("learning a %d-word VLAD codebook from %d images", conf["vlad_words"], len(sample))
    descriptors = [sample.features(image_id).descriptors for image_id in sample.ids]
    words = learn_codebook(np.concatenate(descriptors), conf["vlad_words"], conf["seed"])
    _save_atomic(out / "codebook.npy", words)
    return words


def _with_vlad(sample: FeatureStore, records: Sequence[ImageRecord], words: np.ndarray,
               conf: dict) -> Iterator[ExtractedImage]:
    """The sample store's images ``records`` as the extraction would store them: with their VLAD."""
    from .extractors.rootsift import vlad

    for record in records:
        features = sample.features(record.id)
        features = replace(features, global_descriptor=vlad(features.descriptors, words))
        yield ExtractedImage(record.id, features if conf["local_features"] else features.without_local(),
                             sample.size(record.id))


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def _extract_parts(out: Path, todo: list[ImageRecord], extractor: Extractor, conf: dict, shard, strict,
                   label: str = "extract") -> None:
    """Extract ``todo`` into parts of ``out`` (see :func:`_write_parts`)."""
    _write_parts(out, _extract_each(todo, extractor, conf), len(todo), conf, shard, strict, label)


def _write_parts(out: Path, results: Iterator[ExtractedImage | ErrorRecord], count: int, conf: dict, shard,
                 strict, label: str) -> None:
    """Write ``count`` results in parts of ``part_size`` images, each written atomically."""
    size = conf["part_size"]
    remove_unfinished(out / "parts", _part_name(shard, 0)[:-6])  # this shard's only: others may be writing
    first = _next_part_number(out, shard)
    results = track(results, count, f"{label} {shard[0]}/{shard[1]}")
    for number, start in enumerate(range(0, count, size), start=first):
        _write_results(out, _part_name(shard, number), islice(results, min(size, count - start)), conf, strict)
    next(results, None)  # let the progress report finish (its last line comes after the last item)


def _write_results(out: Path, name: str, results: Iterable[ExtractedImage | ErrorRecord], conf: dict,
                   strict: bool) -> None:
    """Write ``results`` as the part ``out/parts/name`` (atomically)."""
    extracted, errors = _split_results(results, strict)
    write_part(out / "parts" / name, extracted, errors, conf["descriptor_dtype"], _local_dim(extracted))


def _extract_on_dask(address: str, out: Path, records: Sequence[ImageRecord], conf: dict, shard: tuple[int, int],
                     strict: bool, codebook) -> None:
    """The parts :func:`_extract_parts` would write, each a task on the Dask scheduler at ``address``.

    The codebook step (RootSIFT, XFeat) runs here, once, before any task starts. Temporaries
    of workers killed while writing (their tasks ran again on other workers) are removed
    once all tasks are done.
    """
    if conf["backend"] in LOCAL_BACKENDS:
        load_backend(conf, records, out, codebook, shard)  # learns and stores the codebook if needed
    todo = pending_records(out, records, shard)
    prefix = _part_name(shard, 0)[:-6]
    remove_unfinished(out / "parts", prefix)  # this shard's only: others may be writing
    size, first, model = conf["part_size"], _next_part_number(out, shard), _model_key(out, conf)
    tasks = [(str(out), _part_name(shard, number), todo[start : start + size], conf, strict, shard, model)
             for number, start in enumerate(range(0, len(todo), size), start=first)]
    run_tasks(_extract_part, tasks, f"extract {shard[0]}/{shard[1]} parts", dask_address=address)
    remove_unfinished(out / "parts", prefix)


def _model_key(out: Path, conf: dict) -> tuple[str, str, str]:
    """What a worker's loaded backend depends on: the store, its settings and its codebook."""
    codebook = out / "codebook.npy"
    words = hashlib.sha256(codebook.read_bytes()).hexdigest() if codebook.exists() else ""
    return str(out), store_manifest(conf)["fingerprint"], words


def _extract_part(out: str, name: str, records: list[ImageRecord], conf: dict, strict: bool,
                  shard: tuple[int, int], model: tuple[str, str, str]) -> str:
    """Task on a worker: extract ``records`` into the part ``out/parts/name``; returns ``name``.

    The backend is loaded on the worker's first task and kept for the next ones (one model
    per worker process); its codebook, if any, is the one the client stored in ``out``.
    """
    extractor = worker_local(("extract", *model), lambda: load_backend(conf, [], Path(out), None, shard))
    _write_results(Path(out), name, _extract_each(records, extractor, conf), conf, strict)
    return name


def _extract_each(todo: list[ImageRecord], extractor: Extractor, conf: dict) -> Iterator[ExtractedImage | ErrorRecord]:
    """Each record of ``todo`` in order: its stored form, or its error. Decoding runs ahead in
    background threads, overlapping the model; images are extracted in the groups of
    :func:`batches` (one batch call each, see :func:`extract_batch`)."""
    decoded = iter_decoded(todo, conf["max_image_size"], lookahead=max(8, conf["batch_size"]), mode=decode_mode(conf))
    for group in batches(decoded, conf["batch_size"], conf["part_size"]):
        found = iter(extract_batch(extractor, [image for _, image, _, error in group if error is None]))
        for record, image, factors, error in group:
            if error is not None:
                yield ErrorRecord(record.id, str(record.path), error)
            else:
                yield as_stored(record.id, next(found), image.shape, factors)


def batches(decoded: Iterable[tuple], batch_size: int, part_size: int) -> Iterator[list[tuple]]:
    """``decoded`` (record, image, factors, error) tuples, in order, cut into consecutive groups
    holding at most ``batch_size`` images, all of one shape, and never crossing a part boundary
    (every ``part_size`` records: a resumed run groups its images as the first run did). A
    failed record (image None) stays in the group it falls in."""
    group, shape, count = [], None, 0
    for position, item in enumerate(decoded):
        image = item[1]
        cut = image is not None and count > 0 and (image.shape != shape or count == batch_size)
        if group and (cut or position % part_size == 0):
            yield group
            group, count = [], 0
        group.append(item)
        if image is not None:
            shape, count = image.shape, count + 1
    if group:
        yield group


def as_stored(image_id: str, features: ImageFeatures, shape: tuple, factors: np.ndarray) -> ExtractedImage:
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
    return f"{shard_name(shard)}-p{number:06d}"


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


def _refuse_recorded(out: Path, only_ids: Collection[str] | None) -> None:
    """--strict on a store where an earlier run recorded a failed image (of ``only_ids``, if
    given): ImageError, as if it had failed now (a rerun skips recorded images)."""
    recorded = [e for e in FeatureStore(out).errors() if only_ids is None or e.id in only_ids]
    if recorded:
        raise ImageError(f"{_describe(recorded[0])} (recorded in {out / 'errors.csv'} by an earlier run; "
                         f"{len(recorded)} in all)")


def _describe(error: ErrorRecord) -> str:
    return f"--strict: image {error.id!r} ({error.path}) failed: {error.reason}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import add_config_arguments, add_run_arguments

    parser.add_argument("--images", required=True, help="image folder (recursive), Kaggle root, or CSV with id,path")
    parser.add_argument("--out", required=True, help="feature store folder to write (created; resumed if present)")
    parser.add_argument("--split", default="train", help="Kaggle layout: which split folder to read (train or test)")
    parser.add_argument("--codebook", help="rootsift, xfeat: use this codebook.npy (the index store's) instead of learning one")
    parser.add_argument("--candidates", metavar="SHORTLIST_CSV",
                        help="extract only the index images shortlisted there (top rerank.num_to_rerank per query): "
                             "local features for an index store made with extract.local_features=false")
    parser.add_argument("--strict", action="store_true", help="stop with exit code 1 at the first unusable image")
    parser.add_argument("--dask", metavar="ADDRESS", help="extract the parts on this dask.distributed scheduler "
                                                          "(its workers must see --images and --out)")
    add_run_arguments(parser)
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.preset, args.config, args.overrides)
    only_ids = None
    if args.candidates:
        from .candidates import candidate_ids, read_candidates

        if config["extract"]["backend"] in LOCAL_BACKENDS and not args.codebook:
            raise ValueError(f"--candidates with the {config['extract']['backend']} backend needs --codebook (the "
                             "index store's codebook.npy): a codebook learned from the candidates alone would differ")
        only_ids = candidate_ids(read_candidates(args.candidates, config["rerank"]["num_to_rerank"]))
    run(config, args.images, args.out, split=args.split, shard=parse_shard(args.shard),
        overwrite=args.overwrite, strict=args.strict, codebook=args.codebook, only_ids=only_ids,
        dask_address=args.dask)
    return 0
