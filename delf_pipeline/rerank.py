"""Stage 3, rerank: local matching + RANSAC on each query's shortlisted candidates.

For every query, its ``num_to_rerank`` best shortlisted index images are verified and scored
by :class:`delf_pipeline.verification.verifier.CandidateVerifier` (matching, RANSAC, scoring);
with adaptive depth (``rerank.first_depth``) only its first ones when they decide the query.

Work is split into numbered query blocks (see :mod:`delf_pipeline.formats.blocks`), run in
parallel by joblib processes (``--jobs``) or on a Dask cluster (``--dask ADDRESS``), each
block written atomically, so a killed run resumes and shards can run anywhere. Each worker
keeps one verifier, whose cache holds the index features it has read.

Output CSV: ``query_id,index_id,global_score,matches,inliers,score,status``, rows of a
query sorted by score (descending); one row per verified candidate, so a query's rows count the
depth it used.

With ``rerank.cascade`` (:mod:`delf_pipeline.verification.cascade`) a second stage re-verifies
the candidates that can still change a query's answer; it needs the index labels (its classes),
and the ``views`` stage the query images. Those views are extracted here, at rerank time, for
the selected queries only, from the images the query store was made from (``query_images``,
decoded and extracted with the settings that store recorded), rather than stored by the extract
stage: a query-side store of view features would cost ~12x the queries' extraction and store for
every query, where the cascade selects few, and it would be a second artifact to keep in step.
Extraction is deterministic, so a block redone after a kill or on another shard or worker gives
the same bytes: the unit of resume and sharding stays the query block, and the index side is
untouched. The labels' content is part of the output's manifest when the cascade is on.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import pandas as pd

from .config import (
    DEFAULT_PRESET,
    Config,
    RerankSettings,
    add_config_arguments,
    add_run_arguments,
    fingerprinted,
    list_presets,
    load_config,
)
from .formats.blocks import claim_blocks, read_table, run_blocks, write_block
from .formats.candidates import SHORTLIST_COLUMNS, top_candidates
from .formats.images import ImagePaths
from .formats.store import FeatureStore, open_store
from .formats.tables import read_labels
from .utils.artifacts import fingerprint, parse_shard, settings_manifest
from .utils.parallel import run_tasks, worker_local
from .utils.progress import track
from .verification.verifier import COLUMNS, CandidateVerifier

log = logging.getLogger("delf_pipeline.rerank")

QUERY_BLOCK = 32  # queries per block: the unit of resume, sharding and parallel work


def run(
    config: Config,
    shortlist_csv: str | Path,
    query_store: str | Path | FeatureStore,
    index_store: str | Path | FeatureStore,
    out: str | Path,
    *,
    shard: tuple[int, int] = (1, 1),
    overwrite: bool = False,
    jobs: int = 1,
    dask_address: str | None = None,
    index_labels: dict[str, str] | None = None,
    query_images: str | Path | None = None,
    query_split: str = "test",
    index_images: str | Path | None = None,
    index_split: str = "train",
) -> Path:
    """Verify the shortlisted candidates of every query; writes and returns ``out``.

    ``index_store`` must hold the candidates' local features: a store made with
    ``extract.local_features`` false holds global descriptors only, and then the store of
    ``extract --candidates`` (which :func:`delf_pipeline.pipeline.run` makes itself) is given.
    With ``rerank.cascade``: ``index_labels`` (index id -> landmark) are required, and for the
    views stage ``query_images`` (the image source the query store was extracted from, split
    ``query_split`` of a Kaggle folder); its asift fallback (``rerank.cascade_fallback``) reads
    those and ``index_images`` (split ``index_split``), and is skipped, logged, without both.
    """
    conf, out = config.rerank, Path(out)
    shortlist = read_table(Path(shortlist_csv), SHORTLIST_COLUMNS)
    candidates = top_candidates(shortlist, conf.num_to_rerank)
    stores = (open_store(query_store), open_store(index_store))
    require_local_features(stores[1])
    labels, images = cascade_inputs(conf, index_labels, query_images, query_split)
    index_paths = fallback_images(conf, images, index_images, index_split)

    def compute(blocks: list[tuple[int, list[str]]]) -> None:
        tasks = [(number, {q: candidates[q] for q in ids}, block_context(candidates, ids, labels, images, index_paths))
                 for number, ids in blocks]
        _run_parallel(tasks, out, stores, conf, jobs, dask_address)

    manifest = rerank_manifest(conf, shortlist, labels, fallback=index_paths is not None)
    with claim_blocks(out, shard, "rerank output", manifest, overwrite):
        run_blocks(out, list(candidates), QUERY_BLOCK, shard, COLUMNS, compute)
    if out.exists():
        table = read_table(out)
        counts = table["status"].value_counts().to_dict()
        log.info("rerank %s: %d pairs verified (%s)", out, sum(counts.values()),
                 ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        if conf.first_depth:
            log_depths(table, candidates, conf)
    return out


def log_depths(table: pd.DataFrame, candidates: dict, conf: RerankSettings) -> None:
    """Log how many queries adaptive depth stopped after their first round (each query's depth is
    its number of rows in the rerank CSV)."""
    depths = table.groupby("query_id").size()
    stopped = sum(int(depths.get(q, 0)) < len(c) for q, c in candidates.items())
    log.info("adaptive depth: %d of %d queries decided by their first %d candidates (>= %d inliers), %.1f pairs per "
             "query on average", stopped, len(depths), conf.first_depth, conf.decided_inliers, depths.mean())


def rerank_manifest(conf: RerankSettings, shortlist: pd.DataFrame, labels: dict[str, str] | None = None,
                    fallback: bool = False) -> dict:
    """Every ``rerank`` key (none of them is runtime-only: ``--jobs`` is not a setting) and the
    whole shortlist's content: any changed row or key gives another manifest; with a cascade,
    also the labels' content (they choose its second-stage pairs) and, with its asift fallback,
    whether it ran (``fallback``: the images were given)."""
    manifest = {**settings_manifest(fingerprinted(conf)), "shortlist_content": table_fingerprint(shortlist)}
    if conf.cascade:
        manifest["labels_content"] = fingerprint(sorted((labels or {}).items()))
    if conf.cascade and conf.cascade_fallback:
        manifest["fallback_ran"] = fallback
    return manifest


def cascade_inputs(conf: RerankSettings, labels: dict[str, str] | None, images: str | Path | None,
                   split: str) -> tuple[dict[str, str] | None, ImagePaths | None]:
    """(labels, query id -> image path) the cascade needs (None, None without one; the paths,
    listed when a worker first needs one, serve its views stage and asift fallback); ValueError
    saying what to give when the views stage misses them. Without labels each candidate is a class of its own
    (logged: the cascade then re-verifies the first candidates rather than the first classes)."""
    if not conf.cascade:
        return None, None
    if labels is None:
        log.warning("rerank.cascade = %r: no index labels given (`delf-pipeline rerank --index-labels train.csv`; "
                    "`run` gives them), so each candidate is a class of its own", conf.cascade)
        labels = {}
    if conf.cascade != "views" and (images is None or not conf.cascade_fallback):
        return labels, None  # a fallback without the images logs that it is skipped (fallback_images)
    if images is None:
        raise ValueError("rerank.cascade = 'views' extracts the selected queries' views from their images: give the "
                         "image source the query store was extracted from (`delf-pipeline rerank --query-images "
                         "DATA --query-split test`; `run` does)")
    return labels, ImagePaths(images, split)


def fallback_images(conf: RerankSettings, query_paths: ImagePaths | None, images: str | Path | None,
                    split: str) -> ImagePaths | None:
    """Index id -> image path for the cascade's asift fallback, listed when it first runs; None
    (logged) when it is off or it cannot run: both the query images and ``images`` (split
    ``split``) are needed."""
    if not conf.cascade or not conf.cascade_fallback:
        return None
    if query_paths is None or images is None:
        log.warning("rerank.cascade_fallback = %r reads the query and index images, which were not both given "
                    "(`delf-pipeline rerank --query-images DATA --index-images DATA`, `delf-pipeline calibrate "
                    "--index-images DATA`; `run` gives them): skipped", conf.cascade_fallback)
        return None
    return ImagePaths(images, split)


def block_context(candidates: dict, ids: list[str], labels: dict | None, images: ImagePaths | None,
                  index_images: ImagePaths | None = None) -> tuple:
    """(labels of the block's candidates, the query images' paths, the index images' paths): what
    a block's worker needs for the cascade, (None, None, None) without one."""
    if labels is None:
        return None, None, None
    wanted = {index_id for q in ids for index_id, _ in candidates[q]}
    return {i: labels[i] for i in wanted if i in labels}, images, index_images


def table_fingerprint(table: pd.DataFrame) -> str:
    """Hash of every cell (and the column names) of ``table``, in row order."""
    rows = pd.util.hash_pandas_object(table, index=False).to_numpy()
    return fingerprint({"columns": list(table.columns), "rows": hashlib.sha1(rows.tobytes()).hexdigest()})


def require_local_features(index_store: str | Path | FeatureStore) -> None:
    """Raise a ValueError saying what to do when ``index_store`` holds no local features."""
    index = open_store(index_store)
    if not index.manifest()["settings"].get("local_features", True):
        raise ValueError(
            f"{index.path} holds global descriptors only. Extract the shortlisted candidates' local features "
            "first with `delf-pipeline extract --candidates SHORTLIST.csv --set extract.local_features=true` "
            "(shardable) and pass that store as --index (`delf-pipeline run` does this itself)."
        )


def _run_parallel(tasks, out: Path, stores: tuple[FeatureStore, FeatureStore], conf: RerankSettings, jobs: int,
                  dask_address: str | None) -> None:
    """Run the blocks in this process (on the opened ``stores``), in joblib worker processes, or
    on a Dask cluster (each opening the stores by path)."""
    if jobs == 1 and dask_address is None:
        worker = CandidateVerifier(*stores, conf)
        for number, block, context in track(tasks, len(tasks), "rerank blocks"):
            write_block(out, number, worker.rerank_block(block, *context))
        return
    paths = tuple(str(store.path) for store in stores)
    tasks = [(number, block, context, str(out), paths, conf) for number, block, context in tasks]
    run_tasks(_rerank_and_write, tasks, "rerank blocks", jobs=jobs, dask_address=dask_address)


def _rerank_and_write(number: int, block: dict, context: tuple, out: str, paths: tuple[str, str],
                      conf: RerankSettings) -> int:
    """Task run in a worker process: verify one block and write it atomically."""
    worker = worker_local(("rerank", *paths, fingerprint(conf)), lambda: CandidateVerifier(*paths, conf))
    write_block(Path(out), number, worker.rerank_block(block, *context))
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shortlist", required=True, help="shortlist CSV from `delf-pipeline shortlist`")
    parser.add_argument("--queries", required=True, help="feature store of the query images")
    parser.add_argument("--index", required=True, help="feature store of the index images")
    parser.add_argument("--out", required=True, help="rerank CSV to write")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one per core works best)")
    add_run_arguments(parser, dask="run the blocks (the workers must see the stores and --out)")
    parser.add_argument("--index-labels", metavar="CSV", help="id,landmark_id of the index images (train.csv): "
                        "rerank.cascade (the default's) verifies the best candidate of each close class again; "
                        "without them, each candidate is a class of its own")
    parser.add_argument("--query-images", metavar="SOURCE", help="the images the query store was extracted from "
                        "(folder, Kaggle root or CSV): rerank.cascade = views extracts the selected queries' views")
    parser.add_argument("--query-split", default="test", help="Kaggle layout: the split of --query-images (test)")
    parser.add_argument("--index-images", metavar="SOURCE", help="the images the index store was extracted from: "
                        "with --query-images, the cascade's asift fallback (the default's) reads both images of a "
                        "query it left undecided; without them that fallback is skipped")
    parser.add_argument("--index-split", default="train", help="Kaggle layout: the split of --index-images (train)")
    add_config_arguments(parser)


def stores_preset(index_store: Path) -> str:
    """The preset whose extract settings made ``index_store`` (rerank without --preset or --config
    uses its rerank settings, not the default preset's): the one whose settings match exactly, else
    the one of the same backend(s); the default preset wins a tie. ValueError when it is unclear."""
    from .extract import store_manifest

    made = FeatureStore(index_store).manifest()
    settings = made.get("settings", {})
    exact, family = [], []
    for name in list_presets():
        try:
            manifest = store_manifest(load_config(name).extract)
        except (OSError, ValueError, KeyError):  # a preset whose model is not here cannot have made it
            continue
        if manifest["fingerprint"] == made.get("fingerprint"):
            exact.append(name)
        if all(manifest["settings"].get(k) == settings.get(k) for k in ("backend", "local_backend")):
            family.append(name)
    for found in (exact, family):
        if DEFAULT_PRESET in found or len(found) == 1:
            return DEFAULT_PRESET if DEFAULT_PRESET in found else found[0]
        if found:
            raise ValueError(f"the index store {index_store} was made with the extract settings of presets "
                             f"{', '.join(found)}: give the one it was made with, --preset NAME")
    raise ValueError(f"no preset has the extract settings that made the index store {index_store} (backend "
                     f"{settings.get('backend')!r}): give --preset or --config")


def main(args: argparse.Namespace) -> int:
    preset = args.preset
    if preset is None and args.config is None:
        preset = stores_preset(Path(args.index))
        log.info("rerank with the settings of preset %s, the one whose extract settings made %s (--preset to "
                 "choose another)", preset, args.index)
    config = load_config(preset, args.config, args.overrides)
    labels = read_labels(args.index_labels) if args.index_labels else None
    run(config, args.shortlist, args.queries, args.index, args.out, shard=parse_shard(args.shard),
        overwrite=args.overwrite, jobs=args.jobs, dask_address=args.dask, index_labels=labels,
        query_images=args.query_images, query_split=args.query_split, index_images=args.index_images,
        index_split=args.index_split)
    return 0
