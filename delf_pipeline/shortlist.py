"""Stage 2, shortlist: top-K index images per query by cosine similarity of global descriptors.

Exact search by chunked matrix products (:mod:`delf_pipeline.retrieval.search`): the queries
of up to PASS_QUERIES / QUERY_BLOCK blocks share one pass over the index, so each chunk's
float16 -> float32 conversion serves many queries. With ``--dask ADDRESS`` the passes are
tasks on a Dask cluster whose workers share the output folder.

Before the search, optional post-processing of the global descriptors (shortlist section of
the config; see :mod:`delf_pipeline.descriptors`):

* whitening (PCA or supervised by the index labels), learned once on the index;
* database-side augmentation (DBA, plain or supervised by the labels) of the index;
* query expansion (average or alpha-QE): a first search, the query replaced by the weighted
  sum of itself and its ``qe_top_n`` first results, then the search that is kept;
* SuperGlobal re-ranking (:mod:`delf_pipeline.descriptors.superglobal`): the first
  ``superglobal_depth`` results re-ordered by descriptors refined with their neighbours among
  them and a max-pooled expanded query (their scores are then SuperGlobal's, not cosines).

Whitening and DBA are written once as derived stores beside the index
(:mod:`delf_pipeline.descriptors.derived`); the index store's own descriptors are never changed.

Output CSV: ``query_id,index_id,rank,score`` (rank 1 = most similar).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .config import (
    Config,
    ShortlistSettings,
    add_config_arguments,
    add_run_arguments,
    config_of,
    fingerprinted,
)
from .descriptors.derived import global_space, labels_fingerprint, prepare_index
from .descriptors.expansion import expand_blocks
from .descriptors.superglobal import rerank_rows
from .descriptors.whitening import Whitening
from .formats.blocks import claim_blocks, run_blocks, write_block
from .formats.store import FeatureStore, open_store
from .formats.tables import read_labels
from .retrieval.search import MatMul, search_blocks, select_matmul
from .utils.artifacts import parse_shard, settings_manifest
from .utils.parallel import run_tasks, worker_local
from .utils.progress import track

log = logging.getLogger("delf_pipeline.shortlist")

COLUMNS = ("query_id", "index_id", "rank", "score")
QUERY_BLOCK = 1024  # queries per block (one output file each)
PASS_QUERIES = 4096  # queries searched together in one pass over the index (whole blocks)


def run(
    config: Config,
    index_store: str | Path,
    query_store: str | Path,
    out: str | Path,
    *,
    shard: tuple[int, int] = (1, 1),
    overwrite: bool = False,
    index_labels: dict[str, str] | None = None,
    dask_address: str | None = None,
) -> Path:
    """Write the shortlist CSV ``out`` for every query of ``query_store``; returns ``out``.

    ``index_labels`` (index id -> landmark id) are needed only by supervised whitening / DBA.
    ``dask_address``: run the passes on that dask.distributed scheduler (same CSV bytes); the
    whitened / augmented index, if any, is made here first.
    """
    conf, out = config.shortlist, Path(out)
    index, queries = open_store(index_store), open_store(query_store)
    if not len(index):
        raise ValueError(f"no index images in {index.path}: nothing to shortlist from (is train.csv or the "
                         "image folder empty, or did every image fail? see its errors.csv)")
    check_postprocess(conf, index_labels)
    manifest = {**settings_manifest(fingerprinted(conf)), "index_images": len(index), "query_images": len(queries),
                "global_space": check_same_space(index, queries),
                "labels": labels_fingerprint(index, index_labels) if _supervised(conf) else None}
    matmul = select_matmul(conf.device)

    def compute(blocks: list[tuple[int, list[str]]]) -> None:
        searched, whitening = prepare_index(index, conf, index_labels, matmul)
        passes = group_blocks(blocks, PASS_QUERIES)
        if dask_address:
            tasks = [(str(searched.path), str(queries.path), group, conf, str(out), whitening) for group in passes]
            run_tasks(_shortlist_pass, tasks, "shortlist passes", dask_address=dask_address)
            return
        for group in track(passes, len(passes), "shortlist passes"):
            write_pass(out, group, queries, searched, conf, matmul, whitening)

    with claim_blocks(out, shard, "shortlist", manifest, overwrite):
        return run_blocks(out, queries.ids, QUERY_BLOCK, shard, COLUMNS, compute)


def write_pass(out: Path, group: list[tuple[int, list[str]]], queries: FeatureStore, index: FeatureStore,
               conf: ShortlistSettings, matmul: MatMul, whitening: Whitening | None) -> None:
    """Search the (number, query ids) blocks of one pass and write each block's CSV."""
    frames = shortlist_blocks(queries, [ids for _, ids in group], index, conf, matmul, whitening)
    for (number, _), frame in zip(group, frames):
        write_block(out, number, frame)


def _shortlist_pass(index_store: str, query_store: str, group: list[tuple[int, list[str]]], conf: ShortlistSettings,
                    out: str, whitening: Whitening | None) -> None:
    """Task on a worker: one pass. The matrix product (TensorFlow on a GPU) is set up once per
    worker; the stores are opened per task, so a store that grew between runs is seen whole."""
    matmul = worker_local(("shortlist", conf.device), lambda: select_matmul(conf.device))
    write_pass(Path(out), group, FeatureStore(query_store), FeatureStore(index_store), conf, matmul, whitening)


def check_postprocess(conf: ShortlistSettings, index_labels: dict[str, str] | None) -> None:
    """ValueError when supervised whitening / DBA is asked for without index labels (the values
    themselves are checked when the config is loaded, :data:`delf_pipeline.config.SETTINGS`)."""
    if _supervised(conf) and not index_labels:
        raise ValueError("supervised whitening / DBA needs the index labels: give --index-labels CSV (id,landmark_id)")


def _supervised(conf: ShortlistSettings) -> bool:
    return "supervised" in (conf.whitening, conf.dba)


def group_blocks(blocks: list[tuple[int, list[str]]], max_queries: int) -> list[list[tuple[int, list[str]]]]:
    """Consecutive blocks gathered into passes of at most ``max_queries`` queries (at least one block)."""
    passes: list[list[tuple[int, list[str]]]] = []
    size = max_queries
    for number, ids in blocks:
        if size + len(ids) > max_queries:
            passes.append([])
            size = 0
        passes[-1].append((number, ids))
        size += len(ids)
    return passes


def check_same_space(index: FeatureStore, queries: FeatureStore) -> str:
    """Fingerprint of the global descriptor space; raises if the two stores differ."""
    spaces = [global_space(store) for store in (index, queries)]
    if spaces[0] != spaces[1]:
        raise ValueError(
            f"index store {index.path} and query store {queries.path} hold different global descriptors "
            f"({spaces[0]} vs {spaces[1]}): extract both with the same settings (and, for rootsift, "
            "pass the index store's codebook.npy to the query extraction with --codebook)"
        )
    return spaces[0]


def shortlist_blocks(
    queries: FeatureStore, blocks: list[list[str]], index: FeatureStore, conf: ShortlistSettings, matmul: MatMul,
    whitening: Whitening | None = None,
) -> list[pd.DataFrame]:
    """Top-K rows of each block of query ids, as frames with COLUMNS, from one pass over the index
    (two with query expansion)."""
    exclude = bool(conf.exclude_same_id)
    matrices = [queries.global_matrix(ids) for ids in blocks]
    for ids, matrix in zip(blocks, matrices):
        queries.refuse_non_finite(matrix, ids)
    if whitening is not None:
        matrices = [whitening.apply(m) for m in matrices]
    if conf.qe_top_n:
        matrices = expand_blocks(matrices, blocks, index, conf, matmul)
    depth = max(conf.top_k, conf.superglobal_depth)
    index_ids, results = search_blocks(matrices, index, depth + exclude, conf.chunk_rows, matmul)
    if conf.superglobal_depth:
        results = [_superglobal(m, ids, index_ids, *result, index, conf) for m, ids, result in zip(matrices, blocks, results)]
    return [_frame(ids, index_ids, *result, conf) for ids, result in zip(blocks, results)]


def _superglobal(queries: np.ndarray, query_ids: list[str], index_ids: list[str], rows: np.ndarray, scores: np.ndarray,
                 index: FeatureStore, conf: ShortlistSettings) -> tuple[np.ndarray, np.ndarray]:
    """A block's results [Q, K] (each query itself taken out first for leave-one-out) re-ranked by
    SuperGlobal, cut to ``top_k``: min(top_k, superglobal_depth) per query (re-ranked scores are not
    cosines, so results past the depth are not kept beside them)."""
    if conf.exclude_same_id:
        rows, scores = _without_self(query_ids, index_ids, rows, scores)
    rows, scores = rerank_rows(queries, rows, scores, lambda found: index.global_matrix([index_ids[r] for r in found]),
                               conf.superglobal_depth, conf.superglobal_neighbours)
    return rows[:, : conf.top_k], scores[:, : conf.top_k]


def _without_self(query_ids: list[str], index_ids: list[str], rows: np.ndarray,
                  scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows, scores [Q, K] -> [Q, K - 1]: each query's own index row dropped (else its last)."""
    own = np.array([[index_ids[r] == q if r < len(index_ids) else False for r in row] for q, row in zip(query_ids, rows)],
                   dtype=bool).reshape(rows.shape)
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return rows[keep].reshape(len(rows), -1), scores[keep].reshape(len(rows), -1)


def _frame(query_ids: list[str], index_ids: list[str], top_rows: np.ndarray, top_scores: np.ndarray,
           conf: ShortlistSettings) -> pd.DataFrame:
    """COLUMNS rows of one block from its top rows / scores [Q, K] (minus each query itself for leave-one-out)."""
    k = top_rows.shape[1]
    frame = pd.DataFrame({
        "query_id": np.repeat(np.asarray(query_ids, dtype=object), k),
        "index_id": np.asarray(index_ids, dtype=object)[top_rows.reshape(-1)] if len(index_ids) else [],
        "score": top_scores.reshape(-1),
    })
    if conf.exclude_same_id:
        frame = frame[frame["query_id"] != frame["index_id"]].groupby("query_id", sort=False).head(conf.top_k)
    frame.insert(2, "rank", frame.groupby("query_id", sort=False).cumcount() + 1)
    return frame.reset_index(drop=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="feature store of the index images")
    parser.add_argument("--queries", required=True, help="feature store of the query images")
    parser.add_argument("--out", required=True, help="shortlist CSV to write (query_id,index_id,rank,score)")
    parser.add_argument("--index-labels", help="CSV id,landmark_id of the index images (supervised whitening / DBA)")
    add_run_arguments(parser, dask="run the passes (the workers must see the stores and --out)")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = config_of(args)
    labels = read_labels(args.index_labels) if args.index_labels else None
    run(config, args.index, args.queries, args.out, shard=parse_shard(args.shard), overwrite=args.overwrite,
        index_labels=labels, dask_address=args.dask)
    return 0
