"""The per-image result of feature extraction, shared by every backend, the store and the
verifier: :class:`ImageFeatures`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageFeatures:
    """Local and global features of one image, in original-image pixel coordinates.

    locations: [N, 2] float32, (y, x) keypoint centres.
    descriptors: [N, D] float32, L2-normalised rows.
    scales: [N] float32, pyramid scale each feature came from.
    scores: [N] float32, attention (DELF/DELG) or response (SIFT) score.
    global_descriptor: [G] float32, L2-normalised, or None when the backend has none.
    vlad_locals: the local features a fused global descriptor's VLAD was made of (XFeat's), kept
        beside the model's own (``extract.keep_vlad_locals``) for the cascade's learned matcher;
        None when not kept.
    """

    locations: np.ndarray
    descriptors: np.ndarray
    scales: np.ndarray
    scores: np.ndarray
    global_descriptor: np.ndarray | None = None
    vlad_locals: ImageFeatures | None = None

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
        """The same image with its global descriptor only (0 local features, same dimension, no
        ``vlad_locals``)."""
        dim = self.descriptors.shape[1]
        return ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32),
                             np.zeros((0,), np.float32), np.zeros((0,), np.float32), self.global_descriptor)


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Rows (or any axis) of ``x`` scaled to unit L2 norm; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)
