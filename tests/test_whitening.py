"""Golden tests of descriptors.whitening on hand-made 2-D and small examples."""
from __future__ import annotations

import numpy as np
import pytest

from delf_pipeline.descriptors.whitening import (
    Whitening,
    learn_pca_whitening,
    learn_supervised_whitening,
    pair_scatter,
)


def known_covariance_points() -> np.ndarray:
    """Four points with mean (1, 2) and covariance [[8/3, 0], [0, 2/3]] (divisor N - 1 = 3)."""
    return np.array([[3.0, 2.0], [-1.0, 2.0], [1.0, 3.0], [1.0, 1.0]])


def test_pca_whitening_makes_known_covariance_identity():
    x = known_covariance_points()
    w = learn_pca_whitening(x)
    np.testing.assert_allclose(w.mean, [1.0, 2.0])
    # axes are x then y (larger variance first), scaled by 1/sqrt(8/3) and 1/sqrt(2/3)
    np.testing.assert_allclose(np.abs(w.projection), [[np.sqrt(3 / 8), 0.0], [0.0, np.sqrt(3 / 2)]], atol=1e-6)
    covariance = np.cov(x, rowvar=False)
    np.testing.assert_allclose(w.projection @ covariance @ w.projection.T, np.eye(2), atol=1e-6)


def test_pca_whitening_rotated_covariance():
    """A covariance with correlated axes: R diag(4, 1) R^T, R a 30 degree rotation."""
    angle = np.pi / 6
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    covariance = rotation @ np.diag([4.0, 1.0]) @ rotation.T
    # points whose sample covariance is exactly `covariance`: +-sqrt(3/2) * columns of its square root
    root = rotation @ np.diag([2.0, 1.0])
    x = np.concatenate([root.T, -root.T]) * np.sqrt(3 / 2)
    np.testing.assert_allclose(np.cov(x, rowvar=False), covariance, atol=1e-12)
    w = learn_pca_whitening(x)
    np.testing.assert_allclose(w.projection @ covariance @ w.projection.T, np.eye(2), atol=1e-6)
    np.testing.assert_allclose(np.abs(w.projection[0]), np.abs(rotation[:, 0]) / 2, atol=1e-6)


def test_shrinkage_whitens_the_shrunk_covariance():
    """Eigenvalues 8/3 and 2/3, mean 5/3: shrinkage 0.5 divides by sqrt(13/6) and sqrt(7/6)."""
    x = known_covariance_points()
    w = learn_pca_whitening(x, shrinkage=0.5)
    np.testing.assert_allclose(np.abs(np.diag(w.projection)), [np.sqrt(6 / 13), np.sqrt(6 / 7)], atol=1e-6)
    # shrinkage 1: a rotation scaled by 1/sqrt(mean eigenvalue), no whitening
    w = learn_pca_whitening(x, shrinkage=1.0)
    np.testing.assert_allclose(np.abs(np.diag(w.projection)), [np.sqrt(3 / 5)] * 2, atol=1e-6)


def test_apply_centres_projects_and_normalises():
    w = learn_pca_whitening(known_covariance_points(), dim=1)
    out = w.apply(np.array([[3.0, 2.0], [1.0, 5.0]]))
    assert out.shape == (2, 1) and out.dtype == np.float32
    np.testing.assert_allclose(np.abs(out), [[1.0], [0.0]])  # (1, 5) - mean lies on the dropped axis


def test_more_dims_than_images_uses_the_gram_matrix():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 50))
    w = learn_pca_whitening(x)
    assert w.projection.shape == (5, 50)  # rank N - 1
    covariance = np.cov(x, rowvar=False)
    np.testing.assert_allclose(w.projection @ covariance @ w.projection.T, np.eye(5), atol=1e-4)


def test_pair_scatter_by_hand():
    """Class a: (0,0), (2,0) -> one pair, difference (2,0); class b: (0,1), (0,2), (0,4):
    differences (0,1), (0,3), (0,2) -> scatter diag(4, 1 + 9 + 4) over 4 pairs."""
    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]])
    labels = np.array(["a", "a", "b", "b", "b", ""], dtype=object)
    np.testing.assert_allclose(pair_scatter(x, labels), np.diag([4.0, 14.0]) / 4)


def test_supervised_whitening_makes_pair_scatter_identity():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((5, 3)) * 5
    labels = np.repeat(np.arange(5), 4).astype(str).astype(object)
    x = centres[np.repeat(np.arange(5), 4)] + rng.standard_normal((20, 3)) * [0.1, 1.0, 3.0]
    w = learn_supervised_whitening(x, labels)
    scatter = pair_scatter(x, labels)
    np.testing.assert_allclose(w.projection @ scatter @ w.projection.T, np.eye(3), atol=1e-6)
    # the second step is a rotation onto the principal axes: whitened data have diagonal covariance
    whitened = (x - w.mean) @ w.projection.T
    covariance = np.cov(whitened, rowvar=False)
    np.testing.assert_allclose(covariance - np.diag(np.diag(covariance)), 0, atol=1e-6)
    assert np.all(np.diff(np.diag(covariance)) <= 1e-9)


def test_supervised_needs_shrinkage_when_pairs_do_not_span():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5))
    labels = np.array(["a", "a", "b", "c", "d", "e"], dtype=object)  # one pair: scatter of rank 1
    with pytest.raises(ValueError, match="whitening_shrinkage"):
        learn_supervised_whitening(x, labels)
    w = learn_supervised_whitening(x, labels, shrinkage=0.1)
    assert w.projection.shape == (5, 5)


def test_save_load_round_trip(tmp_path):
    w = learn_pca_whitening(known_covariance_points())
    w.save(tmp_path / "w.npz")
    back = Whitening.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(back.projection, w.projection)
    np.testing.assert_array_equal(back.mean, w.mean)


@pytest.mark.parametrize("shape", [(0, 3), (1, 3), (3,)])
def test_too_few_descriptors(shape):
    with pytest.raises(ValueError, match="N >= 2"):
        learn_pca_whitening(np.zeros(shape))


def test_errors_name_the_problem():
    x = known_covariance_points()
    with pytest.raises(ValueError, match="shrinkage"):
        learn_pca_whitening(x, shrinkage=1.5)
    with pytest.raises(ValueError, match="span only 2"):
        learn_pca_whitening(x, dim=3)
    with pytest.raises(ValueError, match="not all equal"):
        learn_pca_whitening(np.ones((3, 2)))
    with pytest.raises(ValueError, match="one label per descriptor"):
        learn_supervised_whitening(x, np.array(["a"]))
    with pytest.raises(ValueError, match="at least one pair"):
        learn_supervised_whitening(x, np.array(["a", "b", "c", "d"], dtype=object))
    with pytest.raises(ValueError, match="learned on 2-d"):
        learn_pca_whitening(x).apply(np.zeros((1, 3)))
