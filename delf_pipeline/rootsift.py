"""The embedded default backend: OpenCV SIFT keypoints with RootSIFT descriptors, and a
VLAD global descriptor over a codebook learned from the index images.

This is not DELF: no network, no landmark training. It needs no download and runs on
any CPU. Measured on landmarks_mini (see ``../shared/DESIGN.md``): RootSIFT-VLAD with 256
words learned on the index gives leave-one-out mAP 0.879, about 290 ms per image.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import sparse

from .features import ImageFeatures, l2_normalize

SIFT_DIM = 128


def extract_rootsift(image: np.ndarray, max_features: int) -> ImageFeatures:
    """SIFT keypoints + RootSIFT descriptors of an RGB uint8 image [H, W, 3].

    Returns locations [N, 2] (y, x), descriptors [N, 128] (L2-normalised RootSIFT),
    scales [N] (keypoint size in pixels), scores [N] (detector response), N <= max_features.
    """
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    sift = cv2.SIFT_create(nfeatures=max(int(max_features), 0))
    keypoints, descriptors = sift.detectAndCompute(gray, None)
    keypoints = keypoints[:max_features] if max_features > 0 else ()
    if not keypoints or descriptors is None:
        return empty_features(SIFT_DIM)
    descriptors = descriptors[: len(keypoints)]
    return ImageFeatures(
        locations=np.array([(k.pt[1], k.pt[0]) for k in keypoints], dtype=np.float32),
        descriptors=root_sift(descriptors),
        scales=np.array([k.size for k in keypoints], dtype=np.float32),
        scores=np.array([k.response for k in keypoints], dtype=np.float32),
    )


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then element-wise sqrt.

    descriptors: [N, 128] non-negative SIFT. Returns [N, 128] float32 with unit L2 norm.
    """
    d = np.asarray(descriptors, dtype=np.float32)
    d = d / np.maximum(d.sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(d)


def empty_features(dim: int) -> ImageFeatures:
    """An image with no keypoints: a valid entry, not an error."""
    return ImageFeatures(
        locations=np.zeros((0, 2), np.float32),
        descriptors=np.zeros((0, dim), np.float32),
        scales=np.zeros((0,), np.float32),
        scores=np.zeros((0,), np.float32),
    )


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
