"""The embedded default backend: OpenCV SIFT keypoints with RootSIFT descriptors, and a
VLAD global descriptor over a codebook learned from the index images.

This is not DELF: no network, no landmark training. It needs no download and runs on
any CPU. Measured on landmarks_mini (see ``../shared/DESIGN.md``): RootSIFT-VLAD with 256
words learned on the index gives leave-one-out mAP 0.879, about 290 ms per image.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.cluster.vq import kmeans2

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


def learn_codebook(descriptors: np.ndarray, words: int, seed: int) -> np.ndarray:
    """k-means codebook over pooled local descriptors [M, D] -> [words, D] float32."""
    if len(descriptors) < words:
        raise ValueError(
            f"cannot learn a {words}-word codebook from {len(descriptors)} descriptors; "
            "give more index images or lower extract.vlad_words"
        )
    data = np.asarray(descriptors, dtype=np.float32)
    centroids, _ = kmeans2(data, words, iter=20, minit="++", seed=seed)
    return centroids.astype(np.float32)


def vlad(descriptors: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """VLAD with signed square-root and L2 normalisation.

    descriptors: [N, D]; codebook: [K, D]. Returns [K * D] float32 with unit norm
    (all zeros when N == 0).
    """
    k, d = codebook.shape
    if len(descriptors) == 0:
        return np.zeros(k * d, np.float32)
    x = np.asarray(descriptors, dtype=np.float32)
    # nearest word by ||x - c||^2 = |x|^2 - 2 x.c + |c|^2 (|x|^2 is constant per row)
    nearest = np.argmin((codebook * codebook).sum(1) - 2.0 * x @ codebook.T, axis=1)
    residuals = np.zeros((k, d), np.float32)
    np.add.at(residuals, nearest, x - codebook[nearest])
    flat = residuals.reshape(-1)
    return l2_normalize(np.sign(flat) * np.sqrt(np.abs(flat)))
