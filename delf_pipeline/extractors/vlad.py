"""VLAD global descriptors over a k-means codebook of local descriptors (RootSIFT, XFeat).

The codebook [K, D] is learned from the index images' local descriptors
(:func:`learn_codebook`); an image's VLAD [K * D] sums the residuals of its descriptors to
their nearest words, with signed square-root and L2 normalisation (:func:`vlad`).
"""
from __future__ import annotations

import numpy as np
from scipy import sparse

from ..formats.features import l2_normalize


def learn_codebook(
    descriptors: np.ndarray, words: int, seed: int, iterations: int = 20, max_points: int = 100_000
) -> np.ndarray:
    """k-means (k-means++ start, Lloyd steps by matrix product) of descriptors [M, D] -> [words, D].

    At most ``max_points`` descriptors (a seeded random subset) are used, and the seeding
    looks at a fifth of those. Deterministic for a given ``seed``. Words that lose all
    their members keep their previous centre.
    """
    data = np.asarray(descriptors, dtype=np.float32)
    if len(data) < words:
        raise ValueError(
            f"cannot learn a {words}-word codebook from {len(data)} descriptors; "
            "give more index images or lower extract.vlad_words"
        )
    rng = np.random.default_rng(seed)
    if len(data) > max_points:
        data = data[np.sort(rng.choice(len(data), max_points, replace=False))]
    seeding = data[: max(words, len(data) // 5)] if len(data) > 5 * words else data
    centres = _kmeans_plus_plus(seeding, words, rng)
    for _ in range(iterations):
        nearest = nearest_word(data, centres)
        counts = np.bincount(nearest, minlength=words).astype(np.float32)
        members = sparse.csr_matrix((np.ones(len(data), np.float32), (nearest, np.arange(len(data)))),
                                    shape=(words, len(data)))
        sums = members @ data
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def _kmeans_plus_plus(data: np.ndarray, words: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability ~ squared distance [words, D]."""
    centres = np.empty((words, data.shape[1]), np.float32)
    norms = (data * data).sum(1)
    centres[0] = data[rng.integers(len(data))]
    closest = np.maximum(norms - 2.0 * data @ centres[0] + centres[0] @ centres[0], 0)
    for k in range(1, words):
        total = float(closest.sum())
        index = rng.choice(len(data), p=closest / total) if total > 0 else rng.integers(len(data))
        centres[k] = data[index]
        distance = norms - 2.0 * data @ centres[k] + centres[k] @ centres[k]
        np.minimum(closest, np.maximum(distance, 0), out=closest)
    return centres


def nearest_word(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook row for each row of x [N, D] -> [N] int."""
    # ||x - c||^2 = |x|^2 - 2 x.c + |c|^2, and |x|^2 does not change the argmin
    return np.argmin((codebook * codebook).sum(1) - 2.0 * x @ codebook.T, axis=1)


def vlad(descriptors: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """VLAD with signed square-root and L2 normalisation.

    descriptors: [N, D]; codebook: [K, D]. Returns [K * D] float32 with unit norm
    (all zeros when N == 0).
    """
    k, d = codebook.shape
    if len(descriptors) == 0:
        return np.zeros(k * d, np.float32)
    x = np.asarray(descriptors, dtype=np.float32)
    nearest = nearest_word(x, codebook)
    residuals = np.zeros((k, d), np.float32)
    np.add.at(residuals, nearest, x - codebook[nearest])
    flat = residuals.reshape(-1)
    return l2_normalize(np.sign(flat) * np.sqrt(np.abs(flat)))


# The VLAD model of a store (``codebook.npy``): the words [K, D], followed, when the VLAD is
# reduced (extract.vlad_dim), by the mean [K * D] and the d principal axes [d, K * D] of the index
# sample's VLADs, each reshaped to [K, D] rows, so that one file (copied to query stores,
# fingerprinted in the global space) carries all of it.

def pack_codebook(words: np.ndarray, mean: np.ndarray | None = None, axes: np.ndarray | None = None) -> np.ndarray:
    """The stored VLAD model: words [K, D], then (when given) mean [K * D] and axes [d, K * D]
    as [(1 + d) * K, D] more rows."""
    words = np.asarray(words, np.float32)
    if mean is None:
        return words
    k, dim = words.shape
    reduction = np.concatenate([np.asarray(mean, np.float32)[None], np.asarray(axes, np.float32)])
    return np.concatenate([words, reduction.reshape(-1, dim)])


def unpack_codebook(codebook: np.ndarray, words: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(words [K, D], mean [K * D] or None, axes [d, K * D] or None) of a stored VLAD model whose
    first ``words`` rows are the words."""
    rows, dim = codebook.shape
    if rows == words:
        return codebook, None, None
    if rows < words or (rows - words) % words or rows - words < 2 * words:
        raise ValueError(f"a VLAD codebook of {words} words holds {words} rows or a reduction after them "
                         f"(a multiple of {words} rows, at least {2 * words}), got {rows}: was it made with "
                         "another extract.vlad_words?")
    reduction = codebook[words:].reshape(-1, words * dim)
    return codebook[:words], reduction[0], reduction[1:]


def learn_reduction(vlads: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [K * D], axes [d, K * D]): the top d = min(dim, N - 1) principal axes of VLADs [N, K * D]
    (a plain PCA: the descriptor is L2-normalised after the projection)."""
    x = np.asarray(vlads, np.float64)
    if len(x) < 2:
        raise ValueError(f"reducing the VLAD (extract.vlad_dim) needs at least 2 sample images, got {len(x)}")
    mean = x.mean(axis=0)
    centred = x - mean
    values, vectors = np.linalg.eigh(centred @ centred.T)  # Gram matrix: N x N, N <= codebook_images
    order = np.argsort(values)[::-1][: min(dim, len(x) - 1)]
    axes = (centred.T @ vectors[:, order]).T
    axes /= np.maximum(np.linalg.norm(axes, axis=1, keepdims=True), 1e-12)
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    return mean.astype(np.float32), axes.astype(np.float32)


def vlad_global(descriptors: np.ndarray, codebook: np.ndarray, words: int) -> np.ndarray:
    """The global descriptor of a stored VLAD model: :func:`vlad` [K * D], or, with a reduction,
    its projection on the d axes, L2-normalised [d] (all zeros when there is no descriptor)."""
    centres, mean, axes = unpack_codebook(codebook, words)
    full = vlad(descriptors, centres)
    if mean is None:
        return full
    if not len(descriptors):
        return np.zeros(len(axes), np.float32)
    return l2_normalize((full - mean) @ axes.T)
