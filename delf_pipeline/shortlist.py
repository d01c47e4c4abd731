"""Stage 2, shortlist: top-K index images per query by cosine similarity of global descriptors.

Exact search by chunked matrix products: queries [B, G] against the index in chunks of rows
[C, G] streamed from the memory-mapped store, keeping a running top-K. The queries of up to
PASS_QUERIES / QUERY_BLOCK blocks share one pass over the index, so each chunk's float16 ->
float32 conversion serves many queries. Peak memory depends on these sizes, not on the size
of the index. On a GPU the products run in TensorFlow; otherwise NumPy's BLAS. With
``--dask ADDRESS`` the passes are tasks on a Dask cluster whose workers share the output folder.

Before the search, optional post-processing of the global descriptors (shortlist section of
the config; see :mod:`delf_pipeline.descriptors`):

* whitening (PCA or supervised by the index labels), learned once on the index;
* database-side augmentation (DBA, plain or supervised by the labels) of the index;
* query expansion (average or alpha-QE): a first search, the query replaced by the weighted
  sum of itself and its ``qe_top_n`` first results, then the search that is kept.

Whitening and DBA are written once as a new global-only store under
``INDEX_STORE/derived/NAME-FINGERPRINT/`` (the whitening itself in ``whitening.npz`` there);
the index store's own descriptors are never changed. The fingerprint covers the settings, the
index ids and descriptor space, and the labels, so a changed input makes a new folder.

Output CSV: ``query_id,index_id,rank,score`` (rank 1 = most similar).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from .config import load_config
from .descriptors.expansion import augment_database, expand_queries, supervised_dba
from .descriptors.whitening import (
    Whitening,
    learn_pca_whitening,
    learn_supervised_whitening,
)
from .extractors.features import ImageFeatures
from .formats.store import ExtractedImage, FeatureStore, write_part
from .formats.tables import read_labels
from .utils.artifacts import (
    atomic_path,
    fingerprint,
    load_array,
    made_once,
    parse_shard,
    settings_manifest,
    write_json_atomic,
)
from .utils.blocks import claim_blocks, run_blocks, write_block
from .utils.parallel import run_tasks, worker_local
from .utils.progress import track

log = logging.getLogger("delf_pipeline.shortlist")

COLUMNS = ("query_id", "index_id", "rank", "score")
QUERY_BLOCK = 1024  # queries per block (one output file each)
PASS_QUERIES = 4096  # queries searched together in one pass over the index (whole blocks)
CHUNK_BYTES = 64 << 20  # at most this much index data per matrix product
RUNTIME_KEYS = ("chunk_rows", "device")  # shortlist keys that change how the products run, not their result
PAD_ROW = np.iinfo(np.int64).max  # row of the -inf padding in candidate blocks (never kept)
DERIVED_PART_ROWS = 65536  # index rows per part of a derived (whitened / augmented) store

MatMul = Callable[[np.ndarray, np.ndarray], np.ndarray]


def run(
    config: dict,
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
    conf, out = config["shortlist"], Path(out)
    index, queries = FeatureStore(index_store), FeatureStore(query_store)
    if not len(index):
        raise ValueError(f"no index images in {index.path}: nothing to shortlist from (is train.csv or the "
                         "image folder empty, or did every image fail? see its errors.csv)")
    check_postprocess(conf, index_labels)
    manifest = {**settings_manifest(conf, RUNTIME_KEYS), "index_images": len(index), "query_images": len(queries),
                "global_space": check_same_space(index, queries),
                "labels": _labels_fingerprint(index, index_labels) if _supervised(conf) else None}
    matmul = select_matmul(conf["device"])

    def compute(blocks: list[tuple[int, list[str]]]) -> None:
        searched, whitening = prepare_index(index, conf, index_labels, matmul)
        passes = group_blocks(blocks, PASS_QUERIES)
        if dask_address:
            tasks = [(str(searched.path), str(query_store), group, conf, str(out), whitening) for group in passes]
            run_tasks(_shortlist_pass, tasks, "shortlist passes", dask_address=dask_address)
            return
        for group in track(passes, len(passes), "shortlist passes"):
            write_pass(out, group, queries, searched, conf, matmul, whitening)

    with claim_blocks(out, shard, "shortlist", manifest, overwrite):
        return run_blocks(out, queries.ids, QUERY_BLOCK, shard, COLUMNS, compute)


def write_pass(out: Path, group: list[tuple[int, list[str]]], queries: FeatureStore, index: FeatureStore,
               conf: dict, matmul: MatMul, whitening: Whitening | None) -> None:
    """Search the (number, query ids) blocks of one pass and write each block's CSV."""
    frames = shortlist_blocks(queries, [ids for _, ids in group], index, conf, matmul, whitening)
    for (number, _), frame in zip(group, frames):
        write_block(out, number, frame)


def _shortlist_pass(index_store: str, query_store: str, group: list[tuple[int, list[str]]], conf: dict,
                    out: str, whitening: Whitening | None) -> None:
    """Task on a worker: one pass. The matrix product (TensorFlow on a GPU) is set up once per
    worker; the stores are opened per task, so a store that grew between runs is seen whole."""
    matmul = worker_local(("shortlist", conf["device"]), lambda: select_matmul(conf["device"]))
    write_pass(Path(out), group, FeatureStore(query_store), FeatureStore(index_store), conf, matmul, whitening)


def check_postprocess(conf: dict, index_labels: dict[str, str] | None) -> None:
    """ValueError when supervised whitening / DBA is asked for without index labels (the values
    themselves are checked when the config is loaded, :data:`delf_pipeline.config.CHECKS`)."""
    if _supervised(conf) and not index_labels:
        raise ValueError("supervised whitening / DBA needs the index labels: give --index-labels CSV (id,landmark_id)")


def _supervised(conf: dict) -> bool:
    return "supervised" in (conf["whitening"], conf["dba"])


def _labels_fingerprint(index: FeatureStore, labels: dict[str, str] | None) -> str:
    return fingerprint({"labels": [(labels or {}).get(i, "") for i in index.ids]})


def prepare_index(index: FeatureStore, conf: dict, labels: dict[str, str] | None,
                  matmul: MatMul) -> tuple[FeatureStore, Whitening | None]:
    """The store to search (the index itself, or its whitened / augmented copy, made once) and
    the whitening to apply to queries (None without whitening)."""
    searched, whitening = index, None
    if conf["whitening"]:
        settings = {key: value for key, value in conf.items() if key.startswith("whitening")}
        folder = _derived_folder(index, "whitened", settings, labels if conf["whitening"] == "supervised" else None)
        with made_once(folder) as to_make:
            if to_make:
                learned = learn_whitening(index, conf, labels)
                _write_derived(folder, settings, index.iter_global(DERIVED_PART_ROWS), learned.apply, learned)
        searched, whitening = FeatureStore(folder), Whitening.load(folder / "whitening.npz")
    if conf["dba"]:
        settings = {"source": searched.path.name, **{k: conf[k] for k in ("dba", "dba_top_n", "dba_alpha")}}
        folder = _derived_folder(index, "dba", settings, labels if conf["dba"] == "supervised" else None)
        with made_once(folder) as to_make:
            if to_make:
                _write_derived(folder, settings, augmented_chunks(searched, conf, labels, matmul), None, None)
        searched = FeatureStore(folder)
    return searched, whitening


def learn_whitening(index: FeatureStore, conf: dict, labels: dict[str, str] | None) -> Whitening:
    """Whitening learned on up to ``whitening_images`` index descriptors (sampled with seed 0)."""
    ids = index.ids
    if len(ids) > conf["whitening_images"]:
        rows = np.sort(np.random.default_rng(0).choice(len(ids), conf["whitening_images"], replace=False))
        ids = [ids[r] for r in rows]
    matrix = index.global_matrix(ids)
    log.info("learning %s whitening on %d index descriptors", conf["whitening"], len(ids))
    if conf["whitening"] == "pca":
        return learn_pca_whitening(matrix, conf["whitening_dim"], conf["whitening_shrinkage"])
    names = np.array([labels.get(i, "") for i in ids], dtype=object)
    return learn_supervised_whitening(matrix, names, conf["whitening_dim"], conf["whitening_shrinkage"])


def augmented_chunks(store: FeatureStore, conf: dict, labels: dict[str, str] | None,
                     matmul: MatMul) -> Iterator[tuple[list[str], np.ndarray]]:
    """DBA of every index descriptor, in store order, as (ids, [n, G]) chunks.

    Plain: each image's ``dba_top_n`` nearest index images (itself included) by the exact
    search. Supervised: nearest among the images of its own label (needs all descriptors in
    memory, [N, G] float32).
    """
    if conf["dba"] == "supervised":
        ids = store.ids
        names = np.array([labels.get(i, "") for i in ids], dtype=object)
        matrix = supervised_dba(store.global_matrix(), names, conf["dba_top_n"], conf["dba_alpha"])
        for start in range(0, len(ids), DERIVED_PART_ROWS):
            yield ids[start:start + DERIVED_PART_ROWS], matrix[start:start + DERIVED_PART_ROWS]
        return
    for ids, chunk in store.iter_global(DERIVED_PART_ROWS):
        all_ids, [(rows, sims)] = search_blocks([chunk], store, conf["dba_top_n"], conf["chunk_rows"], matmul)
        neighbours = store.global_matrix([all_ids[r] for r in rows.reshape(-1)]).reshape(*rows.shape, -1)
        yield ids, augment_database(neighbours, sims, conf["dba_alpha"])


def _derived_folder(index: FeatureStore, kind: str, settings: dict, labels: dict[str, str] | None) -> Path:
    """INDEX/derived/KIND-FINGERPRINT of the settings, index ids, descriptor space and labels."""
    key = {"settings": settings, "ids": fingerprint({"ids": index.ids}), "space": _global_space(index),
           "labels": _labels_fingerprint(index, labels) if labels is not None else None}
    return index.path / "derived" / f"{kind}-{fingerprint(key)}"


def _write_derived(folder: Path, settings: dict, chunks, transform, whitening: Whitening | None) -> None:
    """A global-only store of ``transform(chunk)`` for each (ids, chunk), written atomically."""
    log.info("writing %s", folder)
    dtype = "float32"
    with atomic_path(folder, is_dir=True) as tmp:
        if whitening is not None:
            whitening.save(tmp / "whitening.npz")
        for number, (ids, chunk) in enumerate(chunks):
            vectors = transform(chunk) if transform else chunk
            images = [ExtractedImage(i, _global_only(v), (0, 0)) for i, v in zip(ids, vectors)]
            write_part(tmp / "parts" / f"p{number:06d}", images, [], dtype, 0)
        (tmp / "parts").mkdir(exist_ok=True)
        write_json_atomic(tmp / "manifest.json", {"derived": settings})


def _global_only(vector: np.ndarray) -> ImageFeatures:
    empty = np.zeros(0, np.float32)
    return ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32), empty, empty, vector)


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
    spaces = [_global_space(store) for store in (index, queries)]
    if spaces[0] != spaces[1]:
        raise ValueError(
            f"index store {index.path} and query store {queries.path} hold different global descriptors "
            f"({spaces[0]} vs {spaces[1]}): extract both with the same settings (and, for rootsift, "
            "pass the index store's codebook.npy to the query extraction with --codebook)"
        )
    return spaces[0]


def _global_space(store: FeatureStore) -> str:
    settings = dict(store.manifest()["settings"])
    settings.pop("local_features", None)  # whether local features are stored does not change the globals
    codebook = store.path / "codebook.npy"
    if codebook.exists():
        settings["codebook"] = fingerprint({"words": load_array(codebook).tobytes().hex()})
    return fingerprint(settings)


def shortlist_blocks(
    queries: FeatureStore, blocks: list[list[str]], index: FeatureStore, conf: dict, matmul: MatMul,
    whitening: Whitening | None = None,
) -> list[pd.DataFrame]:
    """Top-K rows of each block of query ids, as frames with COLUMNS, from one pass over the index
    (two with query expansion)."""
    exclude = bool(conf["exclude_same_id"])
    matrices = [queries.global_matrix(ids) for ids in blocks]
    if whitening is not None:
        matrices = [whitening.apply(m) for m in matrices]
    if conf["qe_top_n"]:
        matrices = expand_blocks(matrices, blocks, index, conf, matmul)
    index_ids, results = search_blocks(matrices, index, conf["top_k"] + exclude, conf["chunk_rows"], matmul)
    return [_frame(ids, index_ids, *result, conf) for ids, result in zip(blocks, results)]


def expand_blocks(matrices: list[np.ndarray], blocks: list[list[str]], index: FeatureStore, conf: dict,
                  matmul: MatMul) -> list[np.ndarray]:
    """Query expansion of each block [Q_b, G]: a first search for the ``qe_top_n`` first results
    (never the query itself with exclude_same_id), then :func:`expand_queries`."""
    exclude, n = bool(conf["exclude_same_id"]), conf["qe_top_n"]
    index_ids, results = search_blocks(matrices, index, n + exclude, conf["chunk_rows"], matmul)
    expanded = []
    for query_ids, matrix, (rows, scores) in zip(blocks, matrices, results):
        rows, scores = _without_self(query_ids, index_ids, rows, scores, n) if exclude else (rows[:, :n], scores[:, :n])
        neighbours = index.global_matrix([index_ids[r] for r in rows.reshape(-1)]).reshape(*rows.shape, -1)
        expanded.append(expand_queries(matrix, neighbours, scores, conf["qe_alpha"]))
    return expanded


def expand_in_memory(queries: np.ndarray, matrix: np.ndarray, conf: dict, matmul: MatMul) -> np.ndarray:
    """Query expansion of queries [Q, G] against an index held in memory, matrix [M, G] float32."""
    rows, scores = top_k_in_memory(queries, matrix, conf["qe_top_n"], matmul)
    return expand_queries(queries, matrix[rows], scores, conf["qe_alpha"])


def _without_self(query_ids: list[str], index_ids: list[str], rows: np.ndarray, scores: np.ndarray,
                  n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` of rows / scores [Q, K] (K <= n + 1) that are not the query's own id."""
    own = np.array([[index_ids[r] == q for r in row] for q, row in zip(query_ids, rows)], bool).reshape(rows.shape)
    keep = np.argsort(own, axis=1, kind="stable")[:, :min(n, rows.shape[1] - 1)]  # own id moves to the end
    return np.take_along_axis(rows, keep, 1), np.take_along_axis(scores, keep, 1)


def _frame(query_ids: list[str], index_ids: list[str], top_rows: np.ndarray, top_scores: np.ndarray,
           conf: dict) -> pd.DataFrame:
    """COLUMNS rows of one block from its top rows / scores [Q, K] (minus each query itself for leave-one-out)."""
    k = top_rows.shape[1]
    frame = pd.DataFrame({
        "query_id": np.repeat(np.asarray(query_ids, dtype=object), k),
        "index_id": np.asarray(index_ids, dtype=object)[top_rows.reshape(-1)] if len(index_ids) else [],
        "score": top_scores.reshape(-1),
    })
    if conf["exclude_same_id"]:
        frame = frame[frame["query_id"] != frame["index_id"]].groupby("query_id", sort=False).head(conf["top_k"])
    frame.insert(2, "rank", frame.groupby("query_id", sort=False).cumcount() + 1)
    return frame.reset_index(drop=True)


def top_k_search(
    queries: np.ndarray, index: FeatureStore, top_k: int, chunk_rows: int, matmul: MatMul
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Exact top-K by inner product.

    queries: [Q, G] float32. Returns (index ids [M], rows [Q, K] into them, scores [Q, K]),
    K = min(top_k, M), each row sorted by score descending (ties: lower row first).
    """
    index_ids, [(rows, scores)] = search_blocks([queries], index, top_k, chunk_rows, matmul)
    return index_ids, rows, scores


def top_k_in_memory(queries: np.ndarray, matrix: np.ndarray, top_k: int, matmul: MatMul) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k_search` against an index held in memory: matrix [M, G] float32.

    Returns (rows [Q, K] into ``matrix``, scores [Q, K]), K = min(top_k, M), sorted as there.
    """
    empty = (np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32))
    return _sorted(*_merge_chunk(*empty, matmul(queries, matrix), 0, top_k))


def search_blocks(
    blocks: list[np.ndarray], index: FeatureStore, top_k: int, chunk_rows: int, matmul: MatMul
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`top_k_search` of several query matrices [Q_b, G] in one pass over the index.

    Each index chunk is read and converted once for all blocks, while each block keeps its
    own matrix product, so its scores (to the last bit) do not depend on which blocks share
    the pass: sharded and resumed runs write the same bytes.
    """
    rows = max(1, min(chunk_rows, CHUNK_BYTES // max(1, 4 * blocks[0].shape[1])))
    best = [(np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)) for q in blocks]
    all_ids: list[str] = []
    for ids, chunk in index.iter_global(rows):
        best = [_merge_chunk(*held, matmul(q, chunk), len(all_ids), top_k) for q, held in zip(blocks, best)]
        all_ids.extend(ids)
    return all_ids, [_sorted(*held) for held in best]


def _sorted(rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of (rows, scores) [Q, K] by score descending, ties by lower row."""
    order = np.lexsort((rows, -scores), axis=1) if rows.size else rows
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


def _merge_chunk(
    best_rows: np.ndarray, best_scores: np.ndarray, scores: np.ndarray, first_row: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The running top-k [Q, <=k] merged with a chunk's scores [Q, C] (index rows first_row...).

    Once k are held, only chunk columns strictly above a query's k-th score can enter (an
    equal one has a higher row, so loses the tie): far fewer than C after the first chunks,
    which saves a partition of the whole [Q, C] block per chunk.
    """
    if best_rows.shape[1] < k:
        rows = np.broadcast_to(np.arange(first_row, first_row + scores.shape[1]), scores.shape)
        candidates = scores
    else:
        rows, candidates = _above(scores, best_scores.min(axis=1), first_row)
        if not rows.shape[1]:
            return best_rows, best_scores
    merged = np.concatenate([best_rows, rows], axis=1), np.concatenate([best_scores, candidates], axis=1)
    return _keep_top(*merged, k)


def _above(scores: np.ndarray, kth: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries of scores [Q, C] above kth [Q] as (rows, scores) [Q, W], W = most of any query.

    Shorter rows are padded with score -inf at row ``PAD_ROW``, which never wins.
    """
    flat = np.flatnonzero(scores > kth[:, None])
    query, column = np.divmod(flat, scores.shape[1])
    counts = np.bincount(query, minlength=len(scores))
    slot = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
    width = int(counts.max(initial=0))
    rows = np.full((len(scores), width), PAD_ROW, np.int64)
    values = np.full((len(scores), width), -np.inf, scores.dtype)
    rows[query, slot] = column + first_row
    values[query, slot] = scores.reshape(-1)[flat]
    return rows, values


def _keep_top(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each row of ``scores`` [Q, C] with their ``rows`` [Q, C], unsorted.

    Ties at the k-th score keep the lowest rows (argpartition alone picks any of them).
    """
    if scores.shape[1] <= k:
        return rows, scores
    keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_rows, top_scores = np.take_along_axis(rows, keep, 1), np.take_along_axis(scores, keep, 1)
    kth = top_scores.min(axis=1, keepdims=True)
    cut_ties = (scores == kth).sum(axis=1) > (top_scores == kth).sum(axis=1)
    for q in np.flatnonzero(cut_ties):
        contenders = np.flatnonzero(scores[q] >= kth[q])
        best = contenders[np.lexsort((rows[q, contenders], -scores[q, contenders]))[:k]]
        top_rows[q], top_scores[q] = rows[q, best], scores[q, best]
    return top_rows, top_scores


def select_matmul(device: str) -> MatMul:
    """``queries [Q, G] @ chunk [C, G].T -> [Q, C]`` on the chosen device.

    ``auto`` uses TensorFlow only when an NVIDIA driver is visible (so CPU-only runs never
    pay for importing TensorFlow); ``gpu`` forces the TensorFlow path, which also runs
    (on the CPU) where there is no GPU; ``cpu`` is NumPy BLAS.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"shortlist.device must be auto, cpu or gpu, got {device!r}")
    if device == "cpu" or (device == "auto" and not os.path.exists("/proc/driver/nvidia/version")):
        return lambda q, c: q @ np.asarray(c, np.float32).T
    import tensorflow as tf

    if device == "auto" and not tf.config.list_physical_devices("GPU"):
        return lambda q, c: q @ np.asarray(c, np.float32).T
    return lambda q, c: tf.matmul(q, tf.convert_to_tensor(c, tf.float32), transpose_b=True).numpy()



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import add_config_arguments, add_run_arguments

    parser.add_argument("--index", required=True, help="feature store of the index images")
    parser.add_argument("--queries", required=True, help="feature store of the query images")
    parser.add_argument("--out", required=True, help="shortlist CSV to write (query_id,index_id,rank,score)")
    parser.add_argument("--index-labels", help="CSV id,landmark_id of the index images (supervised whitening / DBA)")
    parser.add_argument("--dask", metavar="ADDRESS", help="run the passes on this dask.distributed scheduler "
                                                          "(its workers must see the stores and --out)")
    add_run_arguments(parser)
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.preset, args.config, args.overrides)
    labels = read_labels(args.index_labels) if args.index_labels else None
    run(config, args.index, args.queries, args.out, shard=parse_shard(args.shard), overwrite=args.overwrite,
        index_labels=labels, dask_address=args.dask)
    return 0
