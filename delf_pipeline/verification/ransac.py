"""Robust model fits of putative matches (the verifiers); every model is a 3x3 matrix
mapping a's (x, y) pixel coordinates to b's, except ``magsac_fundamental``'s: the fundamental
matrix F (unit Frobenius norm) with ``[x_b, y_b, 1] F [x_a, y_a, 1]^T = 0`` for its inliers."""
from __future__ import annotations

import warnings
from functools import partial

import cv2
import numpy as np

#: verifier -> matches in its minimal sample (fewer can never be verified)
MIN_SAMPLES = {"skimage_affine": 3, "magsac": 4, "magsac_affine": 3, "msac_affine": 3, "affine2d": 3, "degensac": 4,
               "magsac_fundamental": 8}
VERIFIERS = tuple(MIN_SAMPLES)


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
        "magsac_fundamental": _fit_fundamental,
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


def _fit_fundamental(xy_a, xy_b, settings, seed):
    """OpenCV USAC MAGSAC++ fundamental matrix (``residual_threshold``: the Sampson distance in
    pixels). For 3D scenes, where no single plane holds the matches; on the EVD pairs (planar
    scenes) at 4 px it ranked true pairs above swapped ones better than MSAC affine at 20 px
    for mutual matches (8/15 against 5/15) and alike for LighterGlue's (9/15)."""
    failed = None, np.zeros(len(xy_a), bool)
    try:
        model, mask = cv2.findFundamentalMat(xy_a, xy_b, _usac_params(settings, seed, "magsac"))
    except cv2.error:  # OpenCV raises on fewer points than its minimal sample
        return failed
    if model is None or mask is None or model.shape != (3, 3) or not np.isfinite(model).all():
        return failed
    norm = np.linalg.norm(model)
    if norm < 1e-12:
        return failed
    return np.asarray(model, np.float64) / norm, np.asarray(mask, bool).reshape(-1)


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
    """pydegensac homography (Kaggle 2020 baseline), refit by least squares on its inliers.

    pydegensac takes no seed (``seed`` is unused) and returns the model of its last local
    optimisation sample, which differs between builds of the library; the refit makes the model
    a function of the inlier mask alone.
    """
    try:
        import pydegensac
    except ImportError:
        raise ModuleNotFoundError(
            "the degensac verifier needs pydegensac: pip install delf_pipeline[degensac]"
        ) from None
    model, mask = pydegensac.findHomography(
        xy_a.astype(np.float64), xy_b.astype(np.float64), float(settings["residual_threshold"]),
        float(settings["confidence"]), int(settings["max_trials"]),
    )
    model, mask = _cv_result(model, mask, len(xy_a))
    if mask.sum() >= MIN_SAMPLES["degensac"]:
        refit, _ = cv2.findHomography(xy_a[mask].astype(np.float64), xy_b[mask].astype(np.float64), 0)
        if refit is not None and np.isfinite(refit).all() and abs(refit[2, 2]) > 1e-12:
            model = refit / refit[2, 2]
    return model, mask


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
