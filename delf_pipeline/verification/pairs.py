"""Pairwise geometric verification: putative descriptor matches, then a robust model fit.

Image ``a`` is the query and image ``b`` the candidate (index) image. Locations are
(y, x) pixels as stored by every backend; descriptors are L2-normalised rows, so the
descriptor distance is ``sqrt(max(0, 2 - 2 * cos))``. Matchers:

- ``kdtree``: the official DELF re-ranking: a ``scipy.spatial.cKDTree`` on b's
  descriptors, nearest neighbour of every a descriptor, kept when its distance is below
  ``match_threshold`` (cKDTree's bound is strict). One b feature may serve several a's.
- ``nn``: the same answer by one matrix product (float32 BLAS), cheaper for N ~ 1000.
- ``mutual``: mutual nearest neighbours by the same product.

``ratio`` > 0 adds Lowe's ratio test (best distance < ratio * second best) to ``nn`` and
``mutual``. ``lighterglue`` (XFeat's learned matcher, :mod:`.lighterglue`) needs keypoints,
image sizes and its model, so the rerank runs it and passes its matches to
:func:`verify_matches`; ``match_threshold`` and ``ratio`` do not apply to it.

Verifiers: ``skimage_affine`` (official: ``skimage.measure.ransac`` with an
``AffineTransform``, fitted from b to a exactly as the reference does), ``magsac``
(OpenCV USAC MAGSAC++ homography), ``magsac_affine`` (the same estimator with an affine
model), ``msac_affine`` (OpenCV USAC affine with MSAC scoring and inner local
optimisation), ``affine2d`` (OpenCV ``estimateAffine2D`` RANSAC),
``degensac`` (``pydegensac`` homography, an optional extra) and ``magsac_fundamental``
(OpenCV USAC MAGSAC++ fundamental matrix, for 3D scenes; ``residual_threshold`` is then the
Sampson distance, a few pixels, not the 20 px of the affine fits).

Every returned model is a 3x3 matrix mapping a's (x, y) pixel coordinates to b's, so it
can be compared with a ground-truth homography directly; ``magsac_fundamental``'s is the
fundamental matrix instead (see :mod:`.ransac`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import DEFAULTS, parse_value
from .matching import match_descriptors
from .ransac import MIN_SAMPLES, fit_model

#: The keys of a ``rerank`` settings section that :func:`verify_pair` takes (and ``seed``).
OPTION_KEYS = ("matcher", "match_threshold", "ratio", "verifier", "residual_threshold", "max_trials", "confidence",
               "min_matches")


@dataclass
class PairResult:
    """The outcome of verifying one (a, b) pair.

    matches: number M of putative matches.
    inliers: number of matches consistent with the fitted model (0 unless status is "ok").
    status: "ok" | "too_few_matches" (M below min_matches or the verifier's minimal
        sample) | "degenerate" (no model: singular or failed fit).
    match_indices: [M, 2] int64, rows (index into a, index into b).
    inlier_mask: [M] bool over match_indices.
    model: [3, 3] float64 mapping a's (x, y) to b's (x, y) (magsac_fundamental: the fundamental
        matrix), or None.
    """

    matches: int
    inliers: int
    status: str
    match_indices: np.ndarray = field(repr=False)
    inlier_mask: np.ndarray = field(repr=False)
    model: np.ndarray | None = field(default=None, repr=False)


def verify_options(rerank) -> dict:
    """The keyword arguments of :func:`verify_pair` taken from a ``rerank`` settings section:
    its :data:`OPTION_KEYS` and ``seed``."""
    return {**{key: rerank[key] for key in OPTION_KEYS}, "seed": int(rerank["seed"])}


def resolve_options(options: dict) -> dict:
    """The default preset's verification settings (``config.DEFAULTS.rerank``) overridden by
    ``options``, each checked as the settings table checks a ``rerank`` key (ConfigError, a
    ValueError, naming it); TypeError for a key that is not a verification option."""
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise TypeError(f"unknown verification option(s) {', '.join(unknown)}; known: {', '.join(OPTION_KEYS)}")
    settings = {key: DEFAULTS.rerank[key] for key in OPTION_KEYS}
    for key, value in options.items():
        settings[key] = parse_value("rerank", key, value, origin="verification option")
    return settings


def verify_pair(loc_a, desc_a, loc_b, desc_b, *, seed: int = 0, **options) -> PairResult:
    """Match a's descriptors to b's, then fit a robust model; see :class:`PairResult`.

    loc_*: [N, 2] (y, x) pixels; desc_*: [N, D] L2-normalised (float16 or float32).
    options: any of :data:`OPTION_KEYS` (the default preset's value where not given; the
    official DELF re-ranking is the rerank section of the ``delf_v1_hub`` preset).
    """
    return match_and_fit(loc_a, desc_a, loc_b, desc_b, resolve_options(options), seed)


def match_and_fit(loc_a, desc_a, loc_b, desc_b, settings: dict, seed: int = 0) -> PairResult:
    """:func:`verify_pair` with ``settings`` already resolved by :func:`resolve_options` (the
    rerank resolves them once, not per pair)."""
    loc_a, desc_a = _check_side(loc_a, desc_a, "a")
    loc_b, desc_b = _check_side(loc_b, desc_b, "b")
    if desc_a.shape[1] != desc_b.shape[1]:
        raise ValueError(
            f"descriptor dimensions differ: desc_a is [{len(desc_a)}, {desc_a.shape[1]}], "
            f"desc_b is [{len(desc_b)}, {desc_b.shape[1]}]"
        )
    pairs = match_descriptors(
        desc_a, desc_b, matcher=settings["matcher"],
        match_threshold=settings["match_threshold"], ratio=settings["ratio"],
    )
    return fit_matches(loc_a, loc_b, pairs, settings, seed)


def verify_matches(loc_a, loc_b, pairs, *, seed: int = 0, **options) -> PairResult:
    """Fit the robust model of ``verify_pair``'s settings to given putative matches (those of a
    learned matcher); see :class:`PairResult`.

    loc_*: [N, 2] (y, x) pixels; pairs: [M, 2] int (row in a, row in b).
    """
    return fit_matches(loc_a, loc_b, pairs, resolve_options(options), seed)


def fit_matches(loc_a, loc_b, pairs, settings: dict, seed: int = 0) -> PairResult:
    """The verifier of ``settings`` (resolved by :func:`resolve_options`) on putative ``pairs``
    [M, 2] (row in a, row in b) of (y, x) locations ``loc_a`` [N, 2], ``loc_b`` [N', 2]."""
    loc_a, loc_b, pairs = np.asarray(loc_a), np.asarray(loc_b), np.asarray(pairs, np.int64).reshape(-1, 2)
    no_inliers = np.zeros(len(pairs), bool)
    if len(pairs) < max(int(settings["min_matches"]), MIN_SAMPLES[settings["verifier"]]):
        return PairResult(len(pairs), 0, "too_few_matches", pairs, no_inliers)
    xy_a = loc_a[pairs[:, 0], ::-1].astype(np.float32)
    xy_b = loc_b[pairs[:, 1], ::-1].astype(np.float32)
    model, mask = fit_model(xy_a, xy_b, settings, seed)
    if model is None:
        return PairResult(len(pairs), 0, "degenerate", pairs, no_inliers)
    return PairResult(len(pairs), int(mask.sum()), "ok", pairs, mask, model)


def _check_side(loc, desc, name: str) -> tuple[np.ndarray, np.ndarray]:
    loc = np.asarray(loc)
    desc = np.asarray(desc)
    if desc.ndim != 2:
        raise ValueError(f"desc_{name} must be [N, D], got shape {desc.shape}")
    if loc.shape != (len(desc), 2):
        raise ValueError(f"loc_{name} must be [{len(desc)}, 2] (y, x) to match desc_{name}, got {loc.shape}")
    return loc, desc
