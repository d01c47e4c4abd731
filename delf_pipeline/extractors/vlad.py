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
