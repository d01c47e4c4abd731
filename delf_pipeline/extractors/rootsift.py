"""The backend that needs no weights: OpenCV SIFT keypoints with RootSIFT descriptors (its
global descriptor is a VLAD of them, :mod:`.vlad`, over a codebook learned from the index).

This is not DELF: no network, no landmark training. It needs no download and runs on
any CPU. Measured on landmarks_mini (see ``docs/design.md``): RootSIFT-VLAD with 256
words learned on the index gives leave-one-out mAP 0.879, about 290 ms per image.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ..formats.features import ImageFeatures
from .views import back_to_image, simulate_view, view_angles

SIFT_DIM = 128


def extract_rootsift(image: np.ndarray, max_features: int, tilts: Sequence[float] = (1.0,)) -> ImageFeatures:
    """SIFT keypoints + RootSIFT descriptors of a uint8 image, RGB [H, W, 3] or grey [H, W].

    ``tilts`` other than 1 add simulated views (affine view synthesis, as in ASIFT, Morel &
    Yu 2009): for tilt t the image is rotated by angles 72/t degrees apart, blurred and
    compressed by t along x, and the keypoints found there are mapped back. That lets
    SIFT match across extreme viewpoint changes, at the cost of one SIFT run per view.
    ``max_features`` applies per view.

    Returns locations [N, 2] (y, x) in this image's pixels, descriptors [N, 128]
    (L2-normalised RootSIFT), scales [N] (keypoint size), scores [N] (detector response).
    """
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    sift = cv2.SIFT_create(nfeatures=max(int(max_features), 0))
    views = [_sift_view(sift, gray, tilt, angle, max_features) for tilt, angle in view_angles(tilts)]
    views = [view for view in views if view.num_features]
    if not views:
        return empty_features(SIFT_DIM)
    return ImageFeatures(*(np.concatenate(parts) for parts in zip(*(
        (v.locations, v.descriptors, v.scales, v.scores) for v in views))))


def _sift_view(sift, gray: np.ndarray, tilt: float, angle: float, max_features: int) -> ImageFeatures:
    """SIFT on one simulated view of ``gray`` [H, W], keypoints mapped back to ``gray``."""
    view, affine = simulate_view(gray, tilt, angle)
    keypoints, descriptors = sift.detectAndCompute(view, None)
    keypoints = keypoints[:max_features] if max_features > 0 else ()
    if not keypoints or descriptors is None:
        return empty_features(SIFT_DIM)
    xy, inside = back_to_image(np.array([k.pt for k in keypoints], dtype=np.float64), affine, gray.shape)
    return ImageFeatures(
        locations=xy[inside, ::-1].astype(np.float32),
        descriptors=root_sift(descriptors[: len(keypoints)][inside]),
        scales=np.array([k.size for k in keypoints], dtype=np.float32)[inside],
        scores=np.array([k.response for k in keypoints], dtype=np.float32)[inside],
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
