"""Stage 1, extract: images -> feature store (global descriptor + local features per image).

The job: list the images, lock the store (one writer per shard), check its manifest, take
the codebook step of the VLAD backends (:mod:`.extractors.codebook`), then extract the
pending images with the extractor of :func:`.extractors.build.build` into parts. The
backends are described in :mod:`.extractors.build`.

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
import hashlib
import logging
from pathlib import Path
from typing import Collection, Sequence

from .config import (
    Config,
    ExtractSettings,
    add_config_arguments,
    add_run_arguments,
    config_of,
    fingerprinted,
    with_recorded,
)
from .extractors.base import Extractor
from .extractors.build import build, decode_mode, resolve_model, vlad_backend
from .extractors.codebook import prepare_codebook, remove_finished_sample, stored_codebook
from .extractors.efficientnet_lite_export import export_record
from .extractors.stream import extract_records
from .formats.images import IMAGE_SUFFIXES, ErrorRecord, ImageError, ImageRecord, list_images
from .formats.parts import (
    next_part_number,
    part_name,
    part_prefix,
    pending_records,
    strict_failure,
    write_parts,
    write_results,
)
from .formats.store import (
    FORMAT_VERSION,
    PART_INFO,
    STORE_LAYOUT,
    FeatureStore,
    candidates_path,
    errors_to_csv,
    open_store,
    remove_store,
)
from .utils.artifacts import (
    check_manifest,
    output_lock,
    parse_shard,
    remove_unfinished,
    settings_manifest,
    shard_name,
    write_text_atomic,
)
from .utils.parallel import run_tasks, worker_local

log = logging.getLogger("delf_pipeline.extract")

def run(
    config: Config,
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
    is loaded and no codebook learned; it is given images decoded as
    :func:`.extractors.build.decode_mode` says (batches through its ``batch`` call if it has one).
    ``dask_address``: run the parts on that dask.distributed scheduler (same store bytes); the
    workers load the configured backend, so it does not go with ``extractor``.
    """
    if extractor is not None and dask_address:
        raise ValueError("an injected extractor runs in this process: it cannot go with dask_address")
    conf, out = config.extract, Path(out)
    records, listing_errors = list_images(images, split)
    if only_ids is not None:
        wanted = set(only_ids)
        records = [r for r in records if r.id in wanted]
        listing_errors = [e for e in listing_errors if e.id in wanted]
    if strict and listing_errors:
        raise ImageError(strict_failure(listing_errors[0]))
    if not records and only_ids is None:
        log.warning("no images in %s (a folder searched for %s files, a Kaggle root or a CSV id,path)", images,
                    "/".join(sorted(IMAGE_SUFFIXES)))
    with output_lock(out, shard_name(shard), "feature store"):  # one writer per shard of a store
        if overwrite:
            remove_store(out)
        conf = resolve_model(conf, records) if extractor is None else conf
        check_manifest(out / "manifest.json", store_manifest(conf), what="feature store", layout=STORE_LAYOUT)
        (out / "parts").mkdir(parents=True, exist_ok=True)
        if not pending_records(out, records, shard):
            log.info("Skipping extraction: all %d images of shard %d/%d are already in %s", len(records), *shard,
                     out)
            remove_finished_sample(out, shard)
        else:
            words, local = prepare_codebook(out, records, conf, shard, codebook) if extractor is None else (None, None)
            if dask_address:
                _extract_on_dask(dask_address, out, records, conf, shard, strict)
            else:
                extract_into(out, pending_records(out, records, shard), extractor or build(conf, words, local), conf,
                             shard, strict)
        finish(out, listing_errors)
    if strict:
        _refuse_recorded(out, only_ids)
    return out


def candidate_local_store(config: Config, index_store: str | Path | FeatureStore, wanted: set[str], data: Path, *,
                          strict: bool = False) -> Path:
    """The store to read the candidates' local features from: the index store itself, or, when
    it holds global descriptors only, ``<index_store>-candidates`` made by extracting
    ``wanted`` (each image once) with the index store's own settings and codebook."""
    index = open_store(index_store)
    recorded = index.manifest()["settings"]
    if recorded.get("local_features", True):
        return index.path
    local_config = with_recorded(config, "extract", {**recorded, "local_features": True},
                                 str(index.path / "manifest.json"))
    codebook = index.path / "codebook.npy"
    log.info("extracting local features of %d shortlisted index images", len(wanted))
    return run(local_config, data, candidates_path(index.path), split="train", only_ids=wanted,
               strict=strict, codebook=codebook if codebook.exists() else None)


def query_config(config: Config, index: FeatureStore) -> Config:
    """The settings that extract queries for the ``index`` store: local features always, whatever
    extract.local_features says for the index, and the index store's model (a built-in model is
    exported, with its local PCA learned from the index images, when the index is extracted)."""
    model = index.manifest()["settings"]["model"]
    return with_recorded(config, "extract", {"local_features": True, "model": model}, str(index.path / "manifest.json"))


def store_manifest(conf: ExtractSettings) -> dict:
    """The store's manifest: every ``extract`` key but the runtime ones, how images were
    decoded (``decode``, recorded when not RGB: older stores were all decoded in RGB) and, for a
    model exported by this package, what the export was made from (``model_export``)."""
    decode = {"decode": decode_mode(conf)} if decode_mode(conf) != "RGB" else {}
    manifest = {"format_version": FORMAT_VERSION, **settings_manifest({**fingerprinted(conf), **decode})}
    record = export_record(conf.model) if conf.model else None
    return {**manifest, "model_export": record} if record else manifest


def extract_into(out: Path, todo: list[ImageRecord], extractor: Extractor, conf: ExtractSettings, shard: tuple[int, int],
                 strict: bool) -> None:
    """Extract ``todo`` with ``extractor`` into new parts of the store ``out``."""
    write_parts(out, extract_records(todo, extractor, conf), len(todo), part_size=conf.part_size,
                dtype=conf.descriptor_dtype, shard=shard, strict=strict, label="extract")


def _extract_on_dask(address: str, out: Path, records: Sequence[ImageRecord], conf: ExtractSettings, shard: tuple[int, int],
                     strict: bool) -> None:
    """The parts :func:`extract_into` would write, each a task on the Dask scheduler at ``address``
    (the codebook step, if any, ran before, here). Temporaries of workers killed while writing
    (their tasks ran again on other workers) are removed once all tasks are done.
    """
    todo = pending_records(out, records, shard)
    prefix = part_prefix(shard)
    remove_unfinished(out / "parts", prefix)  # this shard's only: others may be writing
    size, first, model = conf.part_size, next_part_number(out, shard), _model_key(out, conf)
    tasks = [(str(out), part_name(shard, number), todo[start : start + size], conf, strict, model)
             for number, start in enumerate(range(0, len(todo), size), start=first)]
    run_tasks(_extract_part, tasks, f"extract {shard[0]}/{shard[1]} parts", dask_address=address)
    remove_unfinished(out / "parts", prefix)


def _model_key(out: Path, conf: ExtractSettings) -> tuple[str, str, str]:
    """What a worker's loaded backend depends on: the store, its settings and its codebook."""
    codebook = out / "codebook.npy"
    words = hashlib.sha256(codebook.read_bytes()).hexdigest() if codebook.exists() else ""
    return str(out), store_manifest(conf)["fingerprint"], words


def _extract_part(out: str, name: str, records: list[ImageRecord], conf: ExtractSettings, strict: bool,
                  model: tuple[str, str, str]) -> str:
    """Task on a worker: extract ``records`` into the part ``out/parts/name``; returns ``name``.

    The backend is loaded on the worker's first task and kept for the next ones (one model
    per worker process); its codebook, if any, is the one the client stored in ``out``. A part
    already written (Dask runs a finished task again when the worker holding its result dies:
    parts are named when the client plans them, so only this task wrote that name) is kept.
    """
    if (Path(out) / "parts" / name / PART_INFO).is_file():
        return name
    extractor = worker_local(("extract", *model), lambda: build(conf, stored_codebook(Path(out))))
    write_results(Path(out), name, extract_records(records, extractor, conf), conf.descriptor_dtype, strict)
    return name


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
        raise ImageError(f"{strict_failure(recorded[0])} (recorded in {out / 'errors.csv'} by an earlier run; "
                         f"{len(recorded)} in all)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="image folder (recursive), Kaggle root, or CSV with id,path")
    parser.add_argument("--out", required=True, help="feature store folder to write (created; resumed if present)")
    parser.add_argument("--split", default="train", help="Kaggle layout: which split folder to read (train or test)")
    parser.add_argument("--codebook", help="rootsift, xfeat: use this codebook.npy (the index store's) instead of learning one")
    parser.add_argument("--candidates", metavar="SHORTLIST_CSV",
                        help="extract only the index images shortlisted there (top rerank.num_to_rerank per query): "
                             "local features for an index store made with extract.local_features=false")
    parser.add_argument("--strict", action="store_true", help="stop with exit code 1 at the first unusable image")
    add_run_arguments(parser, dask="extract the parts (the workers must see --images and --out)")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = config_of(args)
    only_ids = None
    if args.candidates:
        from .formats.candidates import candidate_ids, read_candidates

        if vlad_backend(config.extract) and not args.codebook:
            raise ValueError(f"--candidates with the {config.extract.backend} backend needs --codebook (the "
                             "index store's codebook.npy): a codebook learned from the candidates alone would differ")
        only_ids = candidate_ids(read_candidates(args.candidates, config.rerank.num_to_rerank))
    run(config, args.images, args.out, split=args.split, shard=parse_shard(args.shard),
        overwrite=args.overwrite, strict=args.strict, codebook=args.codebook, only_ids=only_ids,
        dask_address=args.dask)
    return 0
