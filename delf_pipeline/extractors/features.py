"""The per-image result of feature extraction, shared by every backend and the store, and
the extractor's call: one image, or (:class:`BatchExtractor`) a batch of images of one shape."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class ImageFeatures:
    """Local and global features of one image, in original-image pixel coordinates.

    locations: [N, 2] float32, (y, x) keypoint centres.
    descriptors: [N, D] float32, L2-normalised rows.
    scales: [N] float32, pyramid scale each feature came from.
    scores: [N] float32, attention (DELF/DELG) or response (SIFT) score.
    global_descriptor: [G] float32, L2-normalised, or None when the backend has none.
    """

    locations: np.ndarray
    descriptors: np.ndarray
    scales: np.ndarray
    scores: np.ndarray
    global_descriptor: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.locations)
        if self.locations.shape != (n, 2):
            raise ValueError(f"locations must be [N, 2], got {self.locations.shape}")
        if self.descriptors.ndim != 2 or len(self.descriptors) != n:
            raise ValueError(f"descriptors must be [{n}, D], got {self.descriptors.shape}")
        if self.scales.shape != (n,) or self.scores.shape != (n,):
            raise ValueError(f"scales and scores must be [{n}], got {self.scales.shape}, {self.scores.shape}")

    @property
    def num_features(self) -> int:
        return len(self.locations)

    def without_local(self) -> "ImageFeatures":
        """The same image with its global descriptor only (0 local features, same dimension)."""
        dim = self.descriptors.shape[1]
        return ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32),
                             np.zeros((0,), np.float32), np.zeros((0,), np.float32), self.global_descriptor)


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Rows (or any axis) of ``x`` scaled to unit L2 norm; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


Extractor = Callable[[np.ndarray], ImageFeatures]  # one image [H, W(, 3)] uint8 -> its features
BatchCall = Callable[[Sequence[np.ndarray]], list[ImageFeatures]]


class BatchExtractor:
    """An extractor defined by its batch call ``batch(images) -> [features, ...]`` (images of
    one shape, [H, W(, 3)] uint8 each); ``extractor(image)`` is ``batch([image])[0]``."""

    def __init__(self, batch: BatchCall):
        self.batch = batch

    def __call__(self, image: np.ndarray) -> ImageFeatures:
        return self.batch([image])[0]


def extract_batch(extractor: Extractor, images: Sequence[np.ndarray]) -> list[ImageFeatures]:
    """Features of ``images`` (each [H, W(, 3)] uint8, all of one shape), in order: one call of
    ``extractor.batch`` when it has one, else one call of ``extractor`` per image."""
    batch = getattr(extractor, "batch", None)
    if batch is None or not len(images):
        return [extractor(image) for image in images]
    return list(batch(images))


def mapped(extractor: Extractor, then: Callable[[ImageFeatures], ImageFeatures]) -> BatchExtractor:
    """``extractor`` with ``then`` applied to each image's features; batched as ``extractor`` is."""
    return BatchExtractor(lambda images: [then(features) for features in extract_batch(extractor, images)])
