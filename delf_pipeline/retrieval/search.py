"""Exact top-K search by inner product: queries [Q, G] against an index of global descriptors.

The index is a feature store streamed in chunks of rows [C, G] from its memory-mapped parts,
or a matrix held in memory; a running top-K is kept per query, so peak memory depends on the
chunk and query sizes, not on the size of the index. Scores of a query do not depend on
which other queries share a pass, so sharded and resumed searches give the same bytes. The
matrix products run in NumPy's BLAS, or in TensorFlow on a GPU (:func:`select_matmul`).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from ..formats.store import FeatureStore

PAD_ROW = np.iinfo(np.int64).max  # row of the -inf padding in candidate blocks (never kept)
CHUNK_BYTES = 64 << 20  # at most this much index data per matrix product

MatMul = Callable[[np.ndarray, np.ndarray], np.ndarray]


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
    the pass: sharded and resumed runs write the same bytes. A chunk row holding NaN or inf
    makes its scores non-finite: the chunk is then refused naming its part (the query blocks
    must be finite: their rows spoil every score, see :meth:`FeatureStore.refuse_non_finite`).
    """
    rows = max(1, min(chunk_rows, CHUNK_BYTES // max(1, 4 * blocks[0].shape[1])))
    best = [(np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)) for q in blocks]
    all_ids: list[str] = []
    for ids, chunk in index.iter_global(rows):
        best = [_merge_chunk(*held, _checked_scores(q, chunk, ids, index, matmul), len(all_ids), top_k)
                for q, held in zip(blocks, best)]
        all_ids.extend(ids)
    return all_ids, [_sorted(*held) for held in best]


def _checked_scores(queries: np.ndarray, chunk: np.ndarray, ids: list[str], index: FeatureStore,
                    matmul: MatMul) -> np.ndarray:
    """``matmul(queries, chunk)`` [Q, C]; a NaN or inf row of the chunk spoils its scores, and
    their sum (one pass over the scores, not over the chunk) shows it: the chunk is then refused
    naming its part. (Scores of unit vectors are at most 1: their sum cannot overflow.)"""
    with np.errstate(invalid="ignore", over="ignore"):  # a damaged chunk is refused just below
        scores = matmul(queries, chunk)
        if not np.isfinite(scores.sum()):
            index.refuse_non_finite(chunk, ids)
    return scores


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
