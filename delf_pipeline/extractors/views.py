"""Simulated affine views of one image, for matching across extreme viewpoint changes.

View synthesis as in ASIFT (Morel & Yu, "ASIFT: A New Framework for Fully Affine Invariant
Image Comparison", SIAM J. Imaging Sciences 2009) and MODS (Mishkin, Matas, Perdoch, "MODS:
Fast and robust method for two-view matching", CVIU 2015): for a tilt t > 1 the image is
rotated by angles 72/t degrees apart in [0, 180), blurred along x (sigma 0.8 sqrt(t^2 - 1))
and compressed by t along x; tilt 1 is the image itself. The cascade's query views (not
``extract.affine_tilts``) also take 0 < t < 1: rotated 72 t degrees apart and stretched by 1 / t
along x, unblurred, which undoes a compression of the query itself at full resolution. Any local-feature extractor runs on
each view and the keypoints are mapped back to the image's pixels (those landing outside it,
on a rotated canvas's corners, are dropped). Measured on the EVD pairs (REPORT of issue 23):
XFeat on the query's 16 views of tilts (1, 2, 4), matched view by view
(:func:`delf_pipeline.verification.matching.match_views`), lifts the true pairs above every
swapped pair from 5/15 to 11/15.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from ..formats.features import ImageFeatures
from ..formats.images import load_image


def view_angles(tilts: Sequence[float], stretch: bool = False) -> list[tuple[float, float]]:
    """(tilt, rotation in degrees) of every simulated view; tilt 1 is the image itself. With
    ``stretch``, a tilt t < 1 stretches by 1 / t (see :func:`simulate_view`)."""
    views = []
    for tilt in tilts:
        if tilt < 1 and not (stretch and tilt > 0):
            raise ValueError(f"extract.affine_tilts must be >= 1, got {tilt}")
        angles = [0.0] if tilt == 1 else list(np.arange(0.0, 180.0, 72.0 / max(tilt, 1.0 / tilt)))
        views.extend((float(tilt), float(angle)) for angle in angles)
    return views


def simulate_view(image: np.ndarray, tilt: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """The view of ``image`` ([H, W] or [H, W, C]) rotated by ``angle`` degrees and tilted by
    ``tilt`` (t > 1 compresses x by t after a blur; t < 1 stretches x by 1 / t), and the 2x3
    affine map from ``image``'s (x, y) to the view's."""
    affine = np.eye(2, 3)
    if tilt == 1 and angle == 0:
        return image, affine
    height, width = image.shape[:2]
    affine = cv2.getRotationMatrix2D((0, 0), angle, 1.0)
    corners = affine @ np.array([[0, width, 0, width], [0, 0, height, height], [1, 1, 1, 1]], np.float64)
    affine[:, 2] -= corners.min(axis=1)
    size = np.ceil(corners.max(axis=1) - corners.min(axis=1)).astype(int)
    view = cv2.warpAffine(image, affine, (int(size[0]), int(size[1])), flags=cv2.INTER_LINEAR)
    if tilt == 1:
        return view, affine
    if tilt > 1:
        view = cv2.GaussianBlur(view, (0, 0), sigmaX=0.8 * np.sqrt(tilt * tilt - 1), sigmaY=0.01)
    view = cv2.resize(view, (0, 0), fx=1.0 / tilt, fy=1.0, interpolation=cv2.INTER_LINEAR)
    return view, np.diag([1.0 / tilt, 1.0]) @ affine


def back_to_image(xy: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(view's [N, 2] (x, y) mapped to the image, [N] bool: inside the image of ``shape``)."""
    back = cv2.invertAffineTransform(affine)
    mapped = np.asarray(xy, np.float64) @ back[:, :2].T + back[:, 2]
    height, width = shape[:2]
    inside = (mapped[:, 0] >= 0) & (mapped[:, 0] < width) & (mapped[:, 1] >= 0) & (mapped[:, 1] < height)
    return mapped, inside


def extract_views(extract: Callable[[np.ndarray], ImageFeatures], image: np.ndarray,
                  tilts: Sequence[float]) -> tuple[ImageFeatures, np.ndarray]:
    """The features ``extract`` finds on every simulated view of ``image``, in ``image``'s pixels,
    and [N] int32 the view each came from (its index in :func:`view_angles`).

    ``extract(view) -> ImageFeatures`` with (y, x) locations in the view's pixels; each view
    keeps what the extractor keeps (its own feature budget). The global descriptor is the first
    view's (the image itself when ``tilts`` starts with 1).
    """
    if not len(tilts):
        raise ValueError("extract_views needs at least one tilt (1: the image itself)")
    parts, views = [], []
    for index, (tilt, angle) in enumerate(view_angles(tilts, stretch=True)):
        view, affine = simulate_view(image, tilt, angle)
        found = extract(view)
        xy, inside = back_to_image(found.locations[:, ::-1], affine, image.shape)
        parts.append(ImageFeatures(xy[inside, ::-1].astype(np.float32), found.descriptors[inside],
                                   found.scales[inside], found.scores[inside], found.global_descriptor))
        views.append(np.full(int(inside.sum()), index, np.int32))
    features = ImageFeatures(*(np.concatenate(arrays) for arrays in zip(*(
        (p.locations, p.descriptors, p.scales, p.scores) for p in parts))), parts[0].global_descriptor)
    return features, np.concatenate(views)



class ViewExtractor:
    """Local features of a query on its simulated views, in original-image pixels (what the
    verification cascade's ``views`` stage matches); made by
    :func:`delf_pipeline.extractors.build.view_extractor` from a store's ``extract`` settings.

    make: () -> the local extractor, called once, on first use (a worker whose queries never
    reach the second stage loads no model); tilts: the views' tilts; max_image_size, mode: the
    decoding of the query's store.
    """

    def __init__(self, make: Callable[[], Callable[[np.ndarray], ImageFeatures]], tilts: Sequence[float],
                 max_image_size: int, mode: str):
        view_angles(tilts, stretch=True)  # a tilt of 0 or less is refused now, not at the first query
        self.make, self.tilts, self.max_image_size, self.mode = make, tuple(float(t) for t in tilts), max_image_size, mode
        self._extract: Callable[[np.ndarray], ImageFeatures] | None = None

    def of_image(self, image: np.ndarray, factors: np.ndarray) -> tuple[ImageFeatures, np.ndarray]:
        """(features of every view in original pixels, [N] view index) of a decoded image whose
        pixels map to the original by ``factors`` [2] (y, x), as :func:`load_image` returns them."""
        if self._extract is None:
            self._extract = self.make()
        features, views = extract_views(self._extract, image, self.tilts)
        return replace(features, locations=features.locations * np.asarray(factors, np.float32)), views

    def of_file(self, path: str | Path) -> tuple[ImageFeatures, np.ndarray]:
        """:meth:`of_image` of an image file decoded as its store decoded it (ImageError when it
        cannot be read now)."""
        return self.of_image(*load_image(Path(path), self.max_image_size, self.mode))
