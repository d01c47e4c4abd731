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
``mutual``.

Verifiers: ``skimage_affine`` (official: ``skimage.measure.ransac`` with an
``AffineTransform``, fitted from b to a exactly as the reference does), ``magsac``
(OpenCV USAC MAGSAC++ homography), ``magsac_affine`` (the same estimator with an affine
model), ``msac_affine`` (OpenCV USAC affine with MSAC scoring and inner local
optimisation), ``affine2d`` (OpenCV ``estimateAffine2D`` RANSAC) and
``degensac`` (``pydegensac`` homography, an optional extra).

Every returned model is a 3x3 matrix mapping a's (x, y) pixel coordinates to b's, so it
can be compared with a ground-truth homography directly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import cv2
import numpy as np

MATCHERS = ("kdtree", "nn", "mutual")
#: verifier -> matches in its minimal sample (fewer can never be verified)
MIN_SAMPLES = {"skimage_affine": 3, "magsac": 4, "magsac_affine": 3, "msac_affine": 3, "affine2d": 3, "degensac": 4}
VERIFIERS = tuple(MIN_SAMPLES)

#: The two named settings of ``verify_pair(mode=...)``; any key can be overridden.
MODES: dict[str, dict[str, Any]] = {
    "official": {
        "matcher": "kdtree",  # DELF reference: cKDTree nearest neighbour
        "match_threshold": 0.8,  # descriptor distance bound (DELF v1)
        "ratio": 0.0,  # no ratio test
        "verifier": "skimage_affine",  # skimage RANSAC, AffineTransform, min_samples 3
        "residual_threshold": 20.0,  # pixels
        "max_trials": 1000,
        "confidence": 0.99,  # unused by skimage_affine
        "min_matches": 4,  # reference: more than 3 putative matches
    },
    "fast": {
        "matcher": "mutual",  # mutual nearest neighbours by one float32 matmul
        "match_threshold": 0.8,
        "ratio": 0.0,
        "verifier": "msac_affine",  # OpenCV USAC affine, MSAC score: 3-point samples like the reference
        "residual_threshold": 20.0,  # pixels, as the reference, so inlier counts compare
        "max_trials": 2000,  # false pairs run them all; 1000 loses true inliers at 10% true matches
        "confidence": 0.99,
        "min_matches": 4,
    },
}
OPTION_KEYS = tuple(MODES["official"])


@dataclass
class PairResult:
    """The outcome of verifying one (a, b) pair.

    matches: number M of putative matches.
    inliers: number of matches consistent with the fitted model (0 unless status is "ok").
    status: "ok" | "too_few_matches" (M below min_matches or the verifier's minimal
        sample) | "degenerate" (no model: singular or failed fit).
    match_indices: [M, 2] int64, rows (index into a, index into b).
    inlier_mask: [M] bool over match_indices.
    model: [3, 3] float64 mapping a's (x, y) to b's (x, y), or None.
    """

    matches: int
    inliers: int
    status: str
    match_indices: np.ndarray = field(repr=False)
    inlier_mask: np.ndarray = field(repr=False)
    model: np.ndarray | None = field(default=None, repr=False)


def verify_options(rerank_section: dict) -> dict:
    """The keyword arguments of :func:`verify_pair` taken from a config ``rerank`` section.

    Returns the :data:`OPTION_KEYS` present in the section plus ``seed``.
    """
    options = {key: rerank_section[key] for key in OPTION_KEYS if key in rerank_section}
    if "seed" in rerank_section:
        options["seed"] = int(rerank_section["seed"])
    return options


def resolve_options(mode: str, options: dict) -> dict:
    """Settings of ``mode`` overridden by ``options``, validated."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise TypeError(f"unknown verification option(s) {', '.join(unknown)}; known: {', '.join(OPTION_KEYS)}")
    settings = {**MODES[mode], **options}
    if settings["matcher"] not in MATCHERS:
        raise ValueError(f"unknown matcher {settings['matcher']!r}; choose one of {', '.join(MATCHERS)}")
    if settings["verifier"] not in VERIFIERS:
        raise ValueError(f"unknown verifier {settings['verifier']!r}; choose one of {', '.join(VERIFIERS)}")
    for key in ("match_threshold", "residual_threshold"):
        if not settings[key] > 0:
            raise ValueError(f"{key} must be > 0, got {settings[key]!r}")
    if not 0 <= settings["ratio"] < 1:
        raise ValueError(f"ratio must be in [0, 1) (0 disables the ratio test), got {settings['ratio']!r}")
    if not 0 < settings["confidence"] < 1:
        raise ValueError(f"confidence must be in (0, 1), got {settings['confidence']!r}")
    if int(settings["max_trials"]) < 1:
        raise ValueError(f"max_trials must be >= 1, got {settings['max_trials']!r}")
    return settings


def count_inliers(loc_a, desc_a, loc_b, desc_b, *, mode: str = "fast", seed: int = 0, **options) -> int:
    """Number of RANSAC inliers between a (query) and b (candidate); 0 when unverifiable.

    loc_*: [N, 2] (y, x) pixels; desc_*: [N, D] L2-normalised (float16 or float32).
    mode: "fast" or "official" (see :data:`MODES`); options override any of its keys.
    """
    return verify_pair(loc_a, desc_a, loc_b, desc_b, mode=mode, seed=seed, **options).inliers


def verify_pair(loc_a, desc_a, loc_b, desc_b, *, mode: str = "fast", seed: int = 0, **options) -> PairResult:
    """Match a's descriptors to b's, then fit a robust model; see :class:`PairResult`.

    loc_*: [N, 2] (y, x) pixels; desc_*: [N, D] L2-normalised (float16 or float32).
    mode: "fast" or "official" (see :data:`MODES`); options override any of its keys.
    """
    settings = resolve_options(mode, options)
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


# ---------------------------------------------------------------- matching


def match_descriptors(desc_a, desc_b, *, matcher: str, match_threshold: float, ratio: float = 0.0) -> np.ndarray:
    """Putative matches [M, 2] int64 (row in a, row in b), ordered by row in a.

    desc_a: [Na, D], desc_b: [Nb, D] L2-normalised (float16 is computed in float32). A
    match needs descriptor distance < match_threshold; ``ratio`` > 0 adds Lowe's test
    (matmul matchers only). Mutual matches are one-to-one even under exact ties.
    """
    if matcher == "kdtree" and ratio > 0:
        raise ValueError("the ratio test needs matcher 'nn' or 'mutual', not 'kdtree'")
    desc_a = np.asarray(desc_a, dtype=np.float32)  # no copy for float32 input
    desc_b = np.asarray(desc_b, dtype=np.float32)
    if len(desc_a) == 0 or len(desc_b) == 0:
        return np.zeros((0, 2), np.int64)
    if matcher == "kdtree":
        return _match_kdtree(desc_a, desc_b, match_threshold)
    similarity = desc_a @ desc_b.T  # [Na, Nb]
    best = similarity.argmax(axis=1)
    best_sim = similarity[np.arange(len(best)), best]
    keep = best_sim > 1.0 - 0.5 * match_threshold**2  # distance < threshold, no sqrt
    if ratio > 0:
        keep &= _passes_ratio(similarity, best_sim, ratio)
    if matcher == "mutual":
        keep &= best_sim >= similarity.max(axis=0)[best]  # column max: cheaper than argmax
    rows = np.flatnonzero(keep)
    if matcher == "mutual":
        _, first = np.unique(best[rows], return_index=True)  # a tie for a column keeps one row
        rows = rows[np.sort(first)]
    return np.stack([rows, best[rows]], axis=1)


def _match_kdtree(desc_a: np.ndarray, desc_b: np.ndarray, match_threshold: float) -> np.ndarray:
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(desc_b).query(desc_a, distance_upper_bound=match_threshold)
    rows = np.flatnonzero(nearest < len(desc_b))  # misses come back as index Nb
    return np.stack([rows, nearest[rows]], axis=1).astype(np.int64)


def _passes_ratio(similarity: np.ndarray, best_sim: np.ndarray, ratio: float) -> np.ndarray:
    """Lowe's test on distances: d1 < ratio * d2, i.e. 2 - 2 s1 < ratio^2 (2 - 2 s2)."""
    if similarity.shape[1] < 2:
        return np.ones(len(similarity), bool)  # no second neighbour: nothing to compare
    second = np.partition(similarity, -2, axis=1)[:, -2]
    return (1.0 - best_sim) < ratio**2 * (1.0 - second)


# ---------------------------------------------------------------- model fitting


def fit_model(xy_a: np.ndarray, xy_b: np.ndarray, settings: dict, seed: int = 0):
    """Robust fit of b ~ T(a); returns (model [3, 3] or None, inlier mask [M] bool).

    xy_a, xy_b: [M, 2] float32 (x, y) pixels of the putative matches.
    """
    fitter = {
        "skimage_affine": _fit_skimage_affine,
        "magsac": partial(_fit_usac, recipe="magsac", homography=True),
        "magsac_affine": partial(_fit_usac, recipe="magsac", homography=False),
        "msac_affine": partial(_fit_usac, recipe="msac", homography=False),
        "affine2d": _fit_affine2d,
        "degensac": _fit_degensac,
    }[settings["verifier"]]
    return fitter(xy_a, xy_b, settings, seed)


def _fit_skimage_affine(xy_a, xy_b, settings, seed):
    """The reference fit: model from b to a (residuals in the query), inverted on return."""
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    failed = None, np.zeros(len(xy_a), bool)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "No inliers found", UserWarning)
            model, mask = ransac(
                (xy_b.astype(np.float64), xy_a.astype(np.float64)), AffineTransform, min_samples=3,
                residual_threshold=settings["residual_threshold"], max_trials=int(settings["max_trials"]), rng=seed,
            )
        if model is None or mask is None:
            return failed
        return np.linalg.inv(model.params), mask
    except np.linalg.LinAlgError:
        return failed


#: USAC recipes: score and local optimisation. "magsac" is OpenCV's USAC_MAGSAC.
USAC_RECIPES = {
    "magsac": (cv2.SCORE_METHOD_MAGSAC, cv2.LOCAL_OPTIM_SIGMA),
    "msac": (cv2.SCORE_METHOD_MSAC, cv2.LOCAL_OPTIM_INNER_LO),
}


def _usac_params(settings: dict, seed: int, recipe: str):
    """OpenCV USAC parameters, seeded; single-threaded (one process per core is the plan).

    With recipe "magsac" and ``seed=0`` the result equals ``cv2.findHomography(...,
    cv2.USAC_MAGSAC, ...)`` (checked on OpenCV 5.0: same model and mask).
    """
    params = cv2.UsacParams()
    params.threshold = float(settings["residual_threshold"])
    params.confidence = float(settings["confidence"])
    params.maxIterations = int(settings["max_trials"])
    params.randomGeneratorState = int(seed)
    params.sampler = cv2.SAMPLING_UNIFORM
    params.score, params.loMethod = USAC_RECIPES[recipe]
    params.isParallel = False
    return params


def _fit_usac(xy_a, xy_b, settings, seed, *, recipe: str, homography: bool):
    params = _usac_params(settings, seed, recipe)
    try:
        if homography:
            model, mask = cv2.findHomography(xy_a, xy_b, params)
        else:
            model, mask = cv2.estimateAffine2D(xy_a, xy_b, params)
            model = _affine_3x3(model)
    except cv2.error:  # OpenCV raises on fewer points than its minimal sample
        return None, np.zeros(len(xy_a), bool)
    return _cv_result(model, mask, len(xy_a))


def _affine_3x3(model):
    return None if model is None else np.vstack([model, [0.0, 0.0, 1.0]])


def _fit_affine2d(xy_a, xy_b, settings, seed):
    """OpenCV RANSAC affine; its sampler has a fixed internal seed, so ``seed`` is unused."""
    try:
        model, mask = cv2.estimateAffine2D(
            xy_a, xy_b, method=cv2.RANSAC, ransacReprojThreshold=float(settings["residual_threshold"]),
            maxIters=int(settings["max_trials"]), confidence=float(settings["confidence"]),
        )
    except cv2.error:
        return None, np.zeros(len(xy_a), bool)
    return _cv_result(_affine_3x3(model), mask, len(xy_a))


def _fit_degensac(xy_a, xy_b, settings, seed):
    """pydegensac homography (Kaggle 2020 baseline); it takes no seed, so ``seed`` is unused."""
    try:
        import pydegensac
    except ImportError:
        raise ImportError(
            "the degensac verifier needs pydegensac: pip install delf_pipeline[degensac]"
        ) from None
    model, mask = pydegensac.findHomography(
        xy_a.astype(np.float64), xy_b.astype(np.float64), float(settings["residual_threshold"]),
        float(settings["confidence"]), int(settings["max_trials"]),
    )
    return _cv_result(model, mask, len(xy_a))


def _cv_result(model, mask, count: int):
    """(3x3 model scaled so that model[2, 2] == 1, inlier mask [count]) or (None, all False)."""
    if model is None or mask is None or not np.isfinite(model).all():
        return None, np.zeros(count, bool)
    model = np.asarray(model, np.float64)
    if model.shape == (3, 3):
        if abs(model[2, 2]) < 1e-12:
            return None, np.zeros(count, bool)
        model = model / model[2, 2]  # a homography is defined up to scale (pydegensac returns any scale)
    return model, np.asarray(mask, bool).reshape(-1)
