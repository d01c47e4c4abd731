"""Tests of delf_pipeline.verification.pairs: matching, robust fits, options, and EVD ground truth."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from support import SHARED_DATA

from delf_pipeline.config import DEFAULTS, load_config
from delf_pipeline.verification.matching import MATCHERS, match_descriptors, match_views
from delf_pipeline.verification.pairs import OPTION_KEYS, verify_matches, verify_options, verify_pair
from delf_pipeline.verification.ransac import VERIFIERS

#: The verification settings these tests compare: the official DELF re-ranking (the rerank
#: section of the delf_v1_hub preset) and a fast path (mutual nearest neighbours, MSAC affine).
MODES = {
    "official": {key: load_config("delf_v1_hub").rerank[key] for key in OPTION_KEYS},
    "fast": {"matcher": "mutual", "match_threshold": 0.8, "ratio": 0.0, "verifier": "msac_affine",
             "residual_threshold": 20.0, "max_trials": 2000, "confidence": 0.99, "min_matches": 4},
}


def verify(loc_a, desc_a, loc_b, desc_b, *, mode: str = "fast", **options):
    """:func:`verify_pair` with the settings of ``mode`` (see :data:`MODES`), ``options`` over them."""
    return verify_pair(loc_a, desc_a, loc_b, desc_b, **{**MODES[mode], **options})

EVD = SHARED_DATA / "evd"
HAS_DEGENSAC = importlib.util.find_spec("pydegensac") is not None
needs_degensac = pytest.mark.skipif(not HAS_DEGENSAC, reason="pydegensac (extra [degensac]) is not installed")
RUNNABLE_VERIFIERS = [pytest.param(v, marks=needs_degensac) if v == "degensac" else v for v in VERIFIERS]
MAPPING_VERIFIERS = [v for v in RUNNABLE_VERIFIERS if v != "magsac_fundamental"]  # models that map a to b


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_unit(rng, n: int, dim: int) -> np.ndarray:
    return unit(rng.normal(size=(n, dim)))


def synthetic_pair(rng, n: int = 200, true_fraction: float = 0.7, transform=None):
    """Features of a and b with known matches: rows 0..T-1 of a are true matches of b's rows.

    The first T putative matches follow ``transform`` (3x3 on (x, y)) plus 0.5 px noise;
    the rest have close descriptors but random places. Returns loc_a, desc_a, loc_b,
    desc_b (locations (y, x)) and the true count T.
    """
    transform = np.array([[0.9, -0.2, 40.0], [0.25, 1.05, -30.0], [0.0, 0.0, 1.0]]) if transform is None else transform
    xy_a = rng.uniform(0, 800, (n, 2))
    mapped = np.c_[xy_a, np.ones(n)] @ transform.T
    xy_b = mapped[:, :2] / mapped[:, 2:] + rng.normal(0, 0.5, (n, 2))
    true = int(true_fraction * n)
    xy_b[true:] = rng.uniform(0, 800, (n - true, 2))
    desc_a = random_unit(rng, n, 32)
    desc_b = unit(desc_a + 0.05 * rng.normal(size=desc_a.shape))
    return xy_a[:, ::-1].astype(np.float32), desc_a, xy_b[:, ::-1].astype(np.float32), desc_b, true


# ---------------------------------------------------------------- matching


def test_match_views_matches_each_view_then_keeps_the_first_view_per_b():
    # a's rows 0, 1 come from view 0 and rows 2, 3 from view 1. b0 is the mutual neighbour of a0
    # in view 0 and of a2 in view 1: b0 keeps view 0's a0 although a2 is closer. b2 is matched in
    # view 1 only (by a3), b1 in view 0 only (by a1).
    desc_b = unit(np.eye(4)[:3])
    desc_a = unit([[1, 0.3, 0, 0], [0, 1, 0.05, 0], [1, 0.1, 0, 0], [0, 0.1, 1, 0]])
    views = np.array([0, 0, 1, 1])
    pairs = match_views(desc_a, views, desc_b, match_threshold=1.0)
    np.testing.assert_array_equal(pairs, [[0, 0], [1, 1], [3, 2]])
    # one view is match_descriptors itself
    one = match_views(desc_a[:2], np.zeros(2), desc_b, match_threshold=1.0)
    np.testing.assert_array_equal(one, match_descriptors(desc_a[:2], desc_b, matcher="mutual", match_threshold=1.0))


def test_match_views_finds_what_the_union_of_views_loses():
    # view 0 sees b's rows 0-29, view 1 rows 20-49 (noisy copies): rows 20-29 are matched in both
    # views and kept once, the others by the one view that sees them
    rng = np.random.default_rng(0)
    desc_b = random_unit(rng, 50, 16)
    view0 = unit(desc_b[:30] + 0.05 * rng.normal(size=(30, 16)))
    view1 = unit(desc_b[20:] + 0.05 * rng.normal(size=(30, 16)))
    desc_a, views = np.concatenate([view0, view1]), np.repeat([0, 1], 30)
    pairs = match_views(desc_a, views, desc_b, match_threshold=0.8)
    assert sorted(pairs[:, 1]) == list(range(50))  # every b once
    assert (np.diff(pairs[:, 0]) > 0).all()  # ordered by row in a


def test_match_views_empty_and_wrong_shape():
    desc = unit(np.eye(3))
    assert match_views(desc[:0], np.zeros(0), desc, match_threshold=1.0).shape == (0, 2)
    with pytest.raises(ValueError, match="views_a must be \\[3\\]"):
        match_views(desc, np.zeros(2), desc, match_threshold=1.0)


def test_hand_made_matches():
    # a0 ~ b1, a2 ~ b0, a1 has no descriptor within 0.8 in b
    desc_a = unit(np.eye(4)[:3])
    desc_b = unit([[0.1, 0, 1, 0], [1, 0.1, 0, 0], [0, 0, 0, 1]])
    for matcher in MATCHERS:
        pairs = match_descriptors(desc_a, desc_b, matcher=matcher, match_threshold=0.8)
        np.testing.assert_array_equal(pairs, [[0, 1], [2, 0]])


def test_mutual_drops_many_to_one_and_nn_keeps_it():
    desc_a = unit([[1, 0, 0], [1, 0.3, 0]])  # both nearest to b0; a0 is closer
    desc_b = unit([[1, 0, 0], [0, 0, 1]])
    nn = match_descriptors(desc_a, desc_b, matcher="nn", match_threshold=0.8)
    kd = match_descriptors(desc_a, desc_b, matcher="kdtree", match_threshold=0.8)
    mutual = match_descriptors(desc_a, desc_b, matcher="mutual", match_threshold=0.8)
    np.testing.assert_array_equal(nn, [[0, 0], [1, 0]])
    np.testing.assert_array_equal(kd, nn)
    np.testing.assert_array_equal(mutual, [[0, 0]])


def test_ratio_test_drops_ambiguous_match():
    desc_a = unit([[1, 0, 0], [0, 0, 1]])
    desc_b = unit([[1, 0.05, 0], [1, -0.06, 0], [0, 0.1, 1]])  # a0 has two near-equal neighbours
    for matcher in ("nn", "mutual"):
        plain = match_descriptors(desc_a, desc_b, matcher=matcher, match_threshold=0.8)
        ratio = match_descriptors(desc_a, desc_b, matcher=matcher, match_threshold=0.8, ratio=0.8)
        np.testing.assert_array_equal(plain, [[0, 0], [1, 2]])
        np.testing.assert_array_equal(ratio, [[1, 2]])


def test_ratio_test_needs_matmul_matcher():
    desc = unit(np.eye(3))
    with pytest.raises(ValueError, match="ratio test needs matcher 'nn' or 'mutual'"):
        match_descriptors(desc, desc, matcher="kdtree", match_threshold=0.8, ratio=0.8)


def test_mutual_is_one_to_one_under_exact_ties():
    desc_a = unit([[1, 0, 0], [1, 0, 0], [0, 1, 0]])  # a0 and a1 identical: both best for b0
    desc_b = unit([[1, 0, 0], [0, 1, 0]])
    mutual = match_descriptors(desc_a, desc_b, matcher="mutual", match_threshold=0.8)
    np.testing.assert_array_equal(mutual, [[0, 0], [2, 1]])


def test_float16_descriptors_match_like_float32():
    rng = np.random.default_rng(11)
    desc_a = random_unit(rng, 30, 40)
    desc_b = unit(desc_a + 0.1 * rng.normal(size=desc_a.shape))
    for matcher in MATCHERS:
        half = match_descriptors(desc_a.astype(np.float16), desc_b.astype(np.float16), matcher=matcher,
                                 match_threshold=0.8)
        np.testing.assert_array_equal(half, np.stack([np.arange(30), np.arange(30)], axis=1))


def test_threshold_golden():
    # distance between unit vectors at 60 degrees is exactly 1.0
    desc_a = unit([[1, 0]])
    desc_b = unit([[0.5, np.sqrt(3) / 2]])
    for matcher in MATCHERS:
        assert len(match_descriptors(desc_a, desc_b, matcher=matcher, match_threshold=0.99)) == 0
        assert len(match_descriptors(desc_a, desc_b, matcher=matcher, match_threshold=1.01)) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("num_a, num_b, dim", [(50, 80, 40), (300, 200, 128), (1, 7, 16)])
def test_nn_equals_kdtree(num_a, num_b, dim, dtype):
    rng = np.random.default_rng(num_a + num_b)
    desc_b = random_unit(rng, num_b, dim)
    picks = rng.integers(0, num_b, num_a)
    desc_a = unit(desc_b[picks] + rng.uniform(0.0, 1.2, (num_a, 1)) * rng.normal(size=(num_a, dim)) / np.sqrt(dim))
    desc_a, desc_b = desc_a.astype(dtype), desc_b.astype(dtype)
    a32, b32 = desc_a.astype(np.float32), desc_b.astype(np.float32)
    dist = np.sqrt(np.maximum(0, 2 - 2 * a32 @ b32.T))
    ordered = np.sort(dist, axis=1)
    threshold = 0.8
    # the equality holds where nothing is tied: check the data has no near ties
    assert np.abs(ordered[:, 0] - threshold).min() > 1e-3
    if num_b > 1:
        assert (ordered[:, 1] - ordered[:, 0]).min() > 1e-4
    kd = verify(np.zeros((num_a, 2)), desc_a, np.zeros((num_b, 2)), desc_b, matcher="kdtree", min_matches=100_000)
    nn = verify(np.zeros((num_a, 2)), desc_a, np.zeros((num_b, 2)), desc_b, matcher="nn", min_matches=100_000)
    assert kd.matches > 0 and (kd.matches < num_a or num_a == 1)  # some matched, some not
    np.testing.assert_array_equal(nn.match_indices, kd.match_indices)


@pytest.mark.parametrize("matcher", MATCHERS)
@pytest.mark.parametrize("num_a, num_b, dim", [(10, 10, 8), (5, 40, 40), (40, 5, 128), (1, 1, 4)])
def test_match_shapes(matcher, num_a, num_b, dim):
    rng = np.random.default_rng(dim)
    desc_a, desc_b = random_unit(rng, num_a, dim), random_unit(rng, num_b, dim)
    pairs = match_descriptors(desc_a, desc_b, matcher=matcher, match_threshold=1.4)
    assert pairs.ndim == 2 and pairs.shape[1] == 2 and pairs.dtype == np.int64
    assert len(pairs) <= num_a
    assert ((pairs[:, 0] >= 0) & (pairs[:, 0] < num_a) & (pairs[:, 1] >= 0) & (pairs[:, 1] < num_b)).all()
    if matcher == "mutual":
        assert len(pairs) <= min(num_a, num_b) and len(set(pairs[:, 1])) == len(pairs)


# ---------------------------------------------------------------- verify_pair


@pytest.mark.parametrize("verifier", VERIFIERS)
@pytest.mark.parametrize("matcher", MATCHERS)
@pytest.mark.parametrize("num_a, num_b", [(0, 10), (10, 0), (0, 0)])
def test_empty_nocrash(num_a, num_b, matcher, verifier):
    rng = np.random.default_rng(0)
    result = verify(
        np.zeros((num_a, 2), np.float32), random_unit(rng, num_a, 16),
        np.zeros((num_b, 2), np.float32), random_unit(rng, num_b, 16),
        matcher=matcher, verifier=verifier, min_matches=0,
    )
    assert (result.matches, result.inliers, result.status, result.model) == (0, 0, "too_few_matches", None)
    assert result.match_indices.shape == (0, 2) and result.inlier_mask.shape == (0,)


@pytest.mark.parametrize("mode", list(MODES))
def test_fewer_than_min_matches_gives_zero(mode):
    loc_a, desc_a, loc_b, desc_b, _ = synthetic_pair(np.random.default_rng(1), n=12, true_fraction=1.0)
    result = verify(loc_a, desc_a, loc_b, desc_b, mode=mode, min_matches=13)
    assert (result.matches, result.inliers, result.status) == (12, 0, "too_few_matches")
    assert verify(loc_a, desc_a, loc_b, desc_b, mode=mode, min_matches=12).inliers == 12


@pytest.mark.parametrize("verifier", MAPPING_VERIFIERS)
def test_recovers_known_affine_with_outliers(verifier):
    loc_a, desc_a, loc_b, desc_b, true = synthetic_pair(np.random.default_rng(2), n=200, true_fraction=0.7)
    result = verify(loc_a, desc_a, loc_b, desc_b, verifier=verifier, residual_threshold=4.0)
    assert result.status == "ok" and result.matches == 200
    truth = result.match_indices[:, 0] < true  # row i of a matches row i of b
    assert (result.match_indices[:, 0] == result.match_indices[:, 1]).all()
    assert result.inlier_mask[truth].mean() >= 0.95
    assert (result.inlier_mask & ~truth).sum() <= 3
    expected = np.array([[0.9, -0.2, 40.0], [0.25, 1.05, -30.0], [0.0, 0.0, 1.0]])
    corners = np.array([[0, 0, 1], [800, 0, 1], [0, 800, 1], [800, 800, 1.0]])
    assert np.abs(project(result.model, corners) - project(expected, corners)).max() < 3.0


@pytest.mark.parametrize("verifier", ["magsac", pytest.param("degensac", marks=needs_degensac)])
def test_recovers_known_homography(verifier):
    homography = np.array([[1.1, 0.05, 20.0], [-0.1, 0.95, 10.0], [3e-4, -2e-4, 1.0]])
    loc_a, desc_a, loc_b, desc_b, true = synthetic_pair(np.random.default_rng(3), 300, 0.7, homography)
    result = verify(loc_a, desc_a, loc_b, desc_b, verifier=verifier, residual_threshold=3.0)
    grid = np.c_[np.random.default_rng(4).uniform(0, 800, (50, 2)), np.ones(50)]
    assert np.abs(project(result.model, grid) - project(homography, grid)).max() < 3.0
    assert result.inlier_mask[:true].mean() >= 0.95


def project(model: np.ndarray, xy1: np.ndarray) -> np.ndarray:
    mapped = xy1 @ model.T
    return mapped[:, :2] / mapped[:, 2:]


@pytest.mark.parametrize("verifier", MAPPING_VERIFIERS)
def test_model_maps_a_xy_to_b_xy(verifier):
    # b is a shifted 50 px right (x) and 10 px down (y): the model's translation is (50, 10)
    rng = np.random.default_rng(5)
    loc_a = rng.uniform(0, 500, (40, 2)).astype(np.float32)
    desc = random_unit(rng, 40, 16)
    result = verify(loc_a, desc, loc_a + np.float32([10, 50]), desc, verifier=verifier)
    assert result.inliers == 40
    np.testing.assert_allclose(result.model[:2, 2], [50, 10], atol=1e-2)
    np.testing.assert_allclose(result.model[:2, :2], np.eye(2), atol=1e-4)


@pytest.mark.parametrize("verifier", RUNNABLE_VERIFIERS)
def test_same_seed_same_result(verifier):
    loc_a, desc_a, loc_b, desc_b, _ = synthetic_pair(np.random.default_rng(6), n=300, true_fraction=0.25)
    runs = [verify(loc_a, desc_a, loc_b, desc_b, verifier=verifier, max_trials=300, seed=7) for _ in range(3)]
    assert len({r.inliers for r in runs}) == 1
    for other in runs[1:]:
        np.testing.assert_array_equal(other.inlier_mask, runs[0].inlier_mask)
        np.testing.assert_array_equal(other.model, runs[0].model)


def test_degenerate_points_report_status():
    # every match at the same place: no model can be fitted
    rng = np.random.default_rng(8)
    desc = random_unit(rng, 10, 16)
    same = np.full((10, 2), 5.0, np.float32)
    for verifier in (v for v in VERIFIERS if v != "degensac"):
        result = verify(same, desc, same, desc, verifier=verifier, max_trials=50)
        assert (result.matches, result.inliers, result.status, result.model) == (10, 0, "degenerate", None)
        assert not result.inlier_mask.any()


def test_magsac_seed_zero_is_opencv_usac_magsac():
    import cv2

    loc_a, desc_a, loc_b, desc_b, _ = synthetic_pair(np.random.default_rng(12), n=300, true_fraction=0.3)
    result = verify(loc_a, desc_a, loc_b, desc_b, verifier="magsac", max_trials=500, residual_threshold=5.0)
    xy_a, xy_b = loc_a[:, ::-1].copy(), loc_b[:, ::-1].copy()  # all 300 rows match in order
    model, mask = cv2.findHomography(xy_a, xy_b, cv2.USAC_MAGSAC, 5.0, maxIters=500, confidence=0.99)
    np.testing.assert_array_equal(result.match_indices, np.stack([np.arange(300)] * 2, axis=1))
    np.testing.assert_array_equal(result.inlier_mask, mask.ravel().astype(bool))
    np.testing.assert_allclose(result.model, model)


def two_view_scene(rng, n: int = 300, true_fraction: float = 0.6):
    """(y, x) locations of a 3D scene seen by two cameras, the first T = true_fraction * n rows
    matching (0.3 px noise), the rest random; and the true fundamental matrix (x_b^T F x_a = 0)."""
    points = np.c_[rng.uniform(-2, 2, (n, 2)), rng.uniform(4, 8, n)]  # depths 4-8: not a plane
    k = np.array([[500.0, 0, 400], [0, 500, 300], [0, 0, 1]])
    angle = np.deg2rad(15)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    shift = np.array([-1.0, 0.1, 0.2])

    def project(world):
        pixels = world @ k.T
        return pixels[:, :2] / pixels[:, 2:]

    xy_a, xy_b = project(points), project(points @ rotation.T + shift) + rng.normal(0, 0.3, (n, 2))
    true = int(true_fraction * n)
    xy_b[true:] = rng.uniform(0, 800, (n - true, 2))
    cross = np.array([[0, -shift[2], shift[1]], [shift[2], 0, -shift[0]], [-shift[1], shift[0], 0]])
    fundamental = np.linalg.inv(k).T @ cross @ rotation @ np.linalg.inv(k)
    return xy_a[:, ::-1].astype(np.float32), xy_b[:, ::-1].astype(np.float32), fundamental, true


def test_fundamental_verifier_finds_a_3d_scene():
    loc_a, loc_b, fundamental, true = two_view_scene(np.random.default_rng(13))
    pairs = np.stack([np.arange(len(loc_a))] * 2, axis=1)
    result = verify_matches(loc_a, loc_b, pairs, verifier="magsac_fundamental", residual_threshold=2.0)
    assert result.status == "ok"
    assert result.inlier_mask[:true].mean() >= 0.95 and result.inlier_mask[true:].mean() <= 0.05
    np.testing.assert_allclose(np.linalg.norm(result.model), 1.0)
    expected = fundamental / np.linalg.norm(fundamental)
    assert min(np.abs(result.model - expected).max(), np.abs(result.model + expected).max()) < 0.05
    # an affine model cannot hold a 3D scene seen from two places: it keeps far fewer of the true matches
    affine = verify_matches(loc_a, loc_b, pairs, verifier="msac_affine", residual_threshold=2.0)
    assert affine.inliers < 0.8 * result.inliers


def test_fundamental_seed_zero_is_opencv_usac_magsac():
    import cv2

    loc_a, loc_b, _, _ = two_view_scene(np.random.default_rng(14), true_fraction=0.4)
    pairs = np.stack([np.arange(len(loc_a))] * 2, axis=1)
    result = verify_matches(loc_a, loc_b, pairs, verifier="magsac_fundamental", residual_threshold=2.0, max_trials=500)
    model, mask = cv2.findFundamentalMat(loc_a[:, ::-1].copy(), loc_b[:, ::-1].copy(), cv2.USAC_MAGSAC, 2.0, 0.99, 500)
    np.testing.assert_array_equal(result.inlier_mask, mask.ravel().astype(bool))
    np.testing.assert_allclose(result.model, model / np.linalg.norm(model), atol=1e-9)


def test_fundamental_needs_eight_matches():
    loc_a, loc_b, _, _ = two_view_scene(np.random.default_rng(15), n=7, true_fraction=1.0)
    pairs = np.stack([np.arange(7)] * 2, axis=1)
    result = verify_matches(loc_a, loc_b, pairs, verifier="magsac_fundamental", min_matches=4)
    assert (result.status, result.inliers) == ("too_few_matches", 0)


def test_degensac_model_is_the_least_squares_fit_of_its_inliers(monkeypatch):
    # pydegensac returns the model of its last local-optimisation sample, which differs between
    # builds: CI's returned all 140 true inliers with a corner 3.8 px off. A stand-in returns the
    # true inliers with a model off by 4 px; the verifier's model is the fit of those inliers.
    import types

    loc_a, desc_a, loc_b, desc_b, true = synthetic_pair(np.random.default_rng(2), n=200, true_fraction=0.7)
    expected = np.array([[0.9, -0.2, 40.0], [0.25, 1.05, -30.0], [0.0, 0.0, 1.0]])

    def find_homography(src, dst, threshold, confidence, max_trials):
        return expected + np.array([[0, 0, 4.0], [0, 0, 0], [0, 0, 0]]), np.arange(len(src)) < true

    monkeypatch.setitem(sys.modules, "pydegensac", types.SimpleNamespace(findHomography=find_homography))
    result = verify(loc_a, desc_a, loc_b, desc_b, verifier="degensac", residual_threshold=4.0)
    assert result.inliers == true
    corners = np.array([[0, 0, 1], [800, 0, 1], [0, 800, 1], [800, 800, 1.0]])
    assert np.abs(project(result.model, corners) - project(expected, corners)).max() < 1.0


def test_degensac_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydegensac", None)  # import now raises ImportError
    loc_a, desc_a, loc_b, desc_b, _ = synthetic_pair(np.random.default_rng(9), n=20)
    with pytest.raises(ImportError, match=r"pip install delf_pipeline\[degensac\]"):
        verify(loc_a, desc_a, loc_b, desc_b, verifier="degensac")


# ---------------------------------------------------------------- options and validation


def test_mismatched_dims_names_both():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"desc_a is \[5, 40\].*desc_b is \[6, 128\]"):
        verify(np.zeros((5, 2)), random_unit(rng, 5, 40), np.zeros((6, 2)), random_unit(rng, 6, 128))


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"inlier_threshold": 3}, TypeError, "unknown verification option"),
        ({"matcher": "flann"}, ValueError, "rerank.matcher must be one of .*, got 'flann'"),
        ({"verifier": "lmeds"}, ValueError, "rerank.verifier must be one of .*, got 'lmeds'"),
        ({"mode": "slow"}, TypeError, "unknown verification option"),
        ({"ratio": 1.5}, ValueError, r"rerank.ratio must be a number in \[0, 1\)"),
        ({"match_threshold": 0}, ValueError, r"rerank.match_threshold must be a number in \(0, 2\]"),
        ({"confidence": 1.0}, ValueError, r"rerank.confidence must be a number in \(0, 1\)"),
    ],
)
def test_bad_options(options, error, message):
    rng = np.random.default_rng(0)
    with pytest.raises(error, match=message):
        verify_pair(np.zeros((3, 2)), random_unit(rng, 3, 8), np.zeros((3, 2)), random_unit(rng, 3, 8), **options)


def test_bad_location_shape():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"loc_b must be \[3, 2\]"):
        verify(np.zeros((3, 2)), random_unit(rng, 3, 8), np.zeros((3, 3)), random_unit(rng, 3, 8))


def test_verify_options_from_config_section():
    options = verify_options(DEFAULTS.rerank)
    assert set(options) == set(OPTION_KEYS) | {"seed"}
    assert {k: options[k] for k in OPTION_KEYS} == {k: DEFAULTS.rerank[k] for k in OPTION_KEYS}
    loc_a, desc_a, loc_b, desc_b, _ = synthetic_pair(np.random.default_rng(10), n=40, true_fraction=1.0)
    assert verify(loc_a, desc_a, loc_b, desc_b, **options).inliers == 40


# ---------------------------------------------------------------- EVD ground truth
# Measured (RootSIFT, 1000 features): on the original extreme-viewpoint pairs almost no
# putative match is geometrically right (0-22 per pair under the true homography), so
# neither mode solves any of the 15 pairs. Pairs made by warping EVD image 1 with a
# known moderate homography carry the ground-truth checks; the original pairs check
# that an unsolvable pair scores like a false pair.
EVD_NAMES = ["adam", "cat", "fox", "graf", "mag", "vin"]
SOLVED_PX = 5.0  # median reprojection error (px) of a solved pair; measured <= 3.1 when solved


def moderate_homography(k: int, width: int, height: int) -> np.ndarray:
    """Rotation -15..15 deg, scale 0.8-1.05 and slight perspective about the image centre."""
    angle, scale = np.deg2rad(-15 + 6 * k), 0.8 + 0.05 * k
    centre = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1.0]])
    warp = np.array([
        [scale * np.cos(angle), -scale * np.sin(angle), 0],
        [scale * np.sin(angle), scale * np.cos(angle), 0],
        [5e-5 * (k % 3 - 1), 5e-5, 1],
    ])
    return np.linalg.inv(centre) @ warp @ centre


@pytest.fixture(scope="module")
def evd():
    """Per EVD name: features of image 1, of image 1 warped by a known homography, and of image 2."""
    if not EVD.is_dir():
        pytest.skip(f"EVD test data not found at {EVD}")
    import cv2

    from delf_pipeline.extractors.rootsift import extract_rootsift

    def read(path):
        return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)

    data = {}
    for k, name in enumerate(EVD_NAMES):
        image = read(EVD / "1" / f"{name}.png")
        height, width = image.shape[:2]
        warp = moderate_homography(k, width, height)
        data[name] = {
            "one": extract_rootsift(image, 1000),
            "warped": extract_rootsift(cv2.warpPerspective(image, warp, (width, height)), 1000),
            "warp": warp,
            "two": extract_rootsift(read(EVD / "2" / f"{name}.png"), 1000),
            "truth": np.loadtxt(EVD / "h" / f"{name}.txt"),
        }
    return data


def run(features_a, features_b, mode):
    return verify(features_a.locations, features_a.descriptors, features_b.locations, features_b.descriptors,
                       mode=mode)


def median_error(result, features_a, truth: np.ndarray) -> float:
    """Median distance (px) between the model's and the truth's images of a's inlier points."""
    if result.model is None or result.inliers == 0:
        return np.inf
    xy = features_a.locations[result.match_indices[result.inlier_mask, 0], ::-1].astype(np.float64)
    xy1 = np.c_[xy, np.ones(len(xy))]
    return float(np.median(np.linalg.norm(project(result.model, xy1) - project(truth, xy1), axis=1)))


@pytest.fixture(scope="module")
def evd_results(evd):
    """Per mode: results on warped (true) pairs and false-pair inlier counts; fast mode on original pairs."""
    names = EVD_NAMES
    ring = [(names[i], names[(i + 1) % len(names)]) for i in range(len(names))]
    false_pairs = {"official": ring[:3], "fast": [(a, b) for a in names for b in names if a != b]}
    results = {
        mode: {
            "warped": {n: run(evd[n]["one"], evd[n]["warped"], mode) for n in names},
            "false": [run(evd[a]["one"], evd[b]["warped"], mode).inliers for a, b in false_pairs[mode]],
        }
        for mode in ("official", "fast")
    }
    results["fast"]["original"] = {n: run(evd[n]["one"], evd[n]["two"], "fast") for n in names}
    return results


def test_evd_fast_solves_what_official_solves(evd, evd_results):
    errors = {
        mode: {n: median_error(r, evd[n]["one"], evd[n]["warp"]) for n, r in evd_results[mode]["warped"].items()}
        for mode in ("official", "fast")
    }
    solved = [n for n, e in errors["official"].items() if e < SOLVED_PX]
    assert len(solved) == len(EVD_NAMES), errors  # measured: all 6, errors 0.4-3.1 px
    for name in solved:
        assert errors["fast"][name] < SOLVED_PX, (name, errors)


@pytest.mark.parametrize("mode", ["official", "fast"])
def test_evd_true_pairs_stand_far_above_false_pairs(evd_results, mode):
    true = [r.inliers for r in evd_results[mode]["warped"].values()]
    false = evd_results[mode]["false"]
    # measured: official true 245-733 vs false <= 31; fast true 216-688 vs false <= 24
    assert np.median(true) > 5 * max(false)
    assert min(true) > 3 * max(false)


def test_evd_original_pairs_score_like_false_pairs(evd, evd_results):
    # extreme viewpoints defeat RootSIFT descriptors (measured: no pair solved by either
    # mode; fast inliers 6-19 on all 15, false pairs 8-24): an unsolved pair must not look matched
    false_max = max(evd_results["fast"]["false"])
    for name, result in evd_results["fast"]["original"].items():
        assert result.status == "ok"
        if median_error(result, evd[name]["one"], evd[name]["truth"]) >= SOLVED_PX:
            assert result.inliers <= 2 * false_max, (name, result.inliers, false_max)


# ---------------------------------------------------------------- EVD original pairs, view synthesis
# With affine view synthesis (extract.affine_tilts = [1, 2, 4]) RootSIFT matches some of the
# original extreme-viewpoint pairs. Measured at 640 px, 300 features per view: official
# solves adam, graf, index (median error 1.8, 5.7, 10.8 px: its affine model only
# approximates these homographies); the default's fast verification solves those (1.2,
# 5.4, 7.2 px) and mag, shop, there (2.3-2.9 px), with 34-225 inliers; the other pairs
# stay unsolved by both.
SYNTH_SIDE, SYNTH_PX = 640, 15.0


@pytest.fixture(scope="module")
def evd_synthesis():
    """Per EVD name: view-synthesis RootSIFT of images 1 and 2 (original pixels), and the truth."""
    if not EVD.is_dir():
        pytest.skip(f"EVD test data not found at {EVD}")
    import cv2

    from delf_pipeline.extractors.rootsift import extract_rootsift

    def features(path):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        scale = min(1.0, SYNTH_SIDE / max(image.shape[:2]))
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        found = extract_rootsift(small, 300, tilts=(1, 2, 4))
        found.locations /= scale
        return found

    names = sorted(p.stem for p in (EVD / "h").glob("*.txt"))
    return {n: {"one": features(EVD / "1" / f"{n}.png"), "two": features(EVD / "2" / f"{n}.png"),
                "truth": np.loadtxt(EVD / "h" / f"{n}.txt")} for n in names}


@pytest.mark.slow
def test_evd_original_pairs_with_view_synthesis(evd_synthesis):
    """Official mode vs the embedded default's fast verification (sift_default: ratio test, MSAC affine)."""
    from delf_pipeline.config import load_config

    default = verify_options(load_config("sift_default").rerank)
    data, names = evd_synthesis, sorted(evd_synthesis)

    def check(a, b, mode):
        options = default if mode == "fast" else MODES["official"]
        return verify_pair(a.locations, a.descriptors, b.locations, b.descriptors, **options)

    results = {mode: {n: check(data[n]["one"], data[n]["two"], mode) for n in names} for mode in ("official", "fast")}
    errors = {mode: {n: median_error(r, data[n]["one"], data[n]["truth"]) for n, r in results[mode].items()}
              for mode in results}
    solved = [n for n in names if errors["official"][n] < SYNTH_PX]
    assert len(solved) >= 3, errors["official"]
    assert all(errors["fast"][n] < SYNTH_PX for n in solved), errors
    swapped = [check(data[a]["one"], data[b]["two"], "fast").inliers for a, b in zip(names, names[1:] + names[:1])]
    true = {n: results["fast"][n].inliers for n in names if errors["fast"][n] < SYNTH_PX}
    assert min(true.values()) > 3 * max(swapped), (true, swapped)


def test_view_synthesis_maps_keypoints_back_into_the_image():
    import skimage.data

    from delf_pipeline.extractors.rootsift import extract_rootsift
    from delf_pipeline.extractors.views import view_angles

    image = skimage.data.astronaut()[:200, :300]
    plain, synth = extract_rootsift(image, 100), extract_rootsift(image, 100, tilts=(1, 2))
    assert view_angles((1, 2)) == [(1.0, 0.0), (2.0, 0.0), (2.0, 36.0), (2.0, 72.0), (2.0, 108.0), (2.0, 144.0)]
    assert synth.num_features > plain.num_features
    np.testing.assert_array_equal(synth.locations[: plain.num_features], plain.locations)  # tilt 1 comes first
    assert (synth.locations >= 0).all() and (synth.locations < [200, 300]).all()
    with pytest.raises(ValueError, match="affine_tilts must be >= 1"):
        extract_rootsift(image, 100, tilts=(0.5,))
