"""Tests of delf_pipeline.extractors.views: simulated affine views and features mapped back."""
from __future__ import annotations

import numpy as np
import pytest

from delf_pipeline.extractors.views import back_to_image, extract_views, simulate_view, view_angles
from delf_pipeline.formats.features import ImageFeatures


def dot_image(shape=(120, 200), at=(30, 150)) -> np.ndarray:
    """A dark [H, W, 3] image with one bright 5 x 5 square centred at (y, x) ``at``."""
    image = np.zeros((*shape, 3), np.uint8)
    y, x = at
    image[y - 2:y + 3, x - 2:x + 3] = 255
    return image


def brightest(view: np.ndarray) -> ImageFeatures:
    """A fake extractor: one feature at the view's brightest pixel, descriptor = the view's width."""
    grey = view if view.ndim == 2 else view.mean(axis=2)
    y, x = np.unravel_index(np.argmax(grey), grey.shape)
    return ImageFeatures(np.array([[y, x]], np.float32), np.array([[view.shape[1], 0.0]], np.float32),
                         np.ones(1, np.float32), np.ones(1, np.float32), np.array([1.0], np.float32))


def test_view_angles_golden():
    # tilt 1: the image; tilt 2: 72 / 2 = 36 degrees apart in [0, 180)
    assert view_angles((1, 2)) == [(1.0, 0.0), (2.0, 0.0), (2.0, 36.0), (2.0, 72.0), (2.0, 108.0), (2.0, 144.0)]
    with pytest.raises(ValueError, match="affine_tilts must be >= 1"):
        view_angles((0.5,))


def test_stretch_views_take_tilts_below_one():
    # t < 1 (the cascade's query views only): 72 t degrees apart, 72 * 0.5 = 36
    assert view_angles((1, 0.5), stretch=True) == [(1.0, 0.0), (0.5, 0.0), (0.5, 36.0), (0.5, 72.0), (0.5, 108.0),
                                                   (0.5, 144.0)]
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            view_angles((bad,), stretch=True)


@pytest.mark.parametrize("angle", [0.0, 36.0])
def test_a_stretch_view_widens_the_image_and_its_affine_maps_points(angle):
    image = dot_image()
    view, affine = simulate_view(image, 0.5, angle)
    rotated, _ = simulate_view(image, 1.0, angle)
    assert view.shape[0] == rotated.shape[0] and abs(view.shape[1] - 2 * rotated.shape[1]) <= 1
    expected = affine @ np.array([150.0, 30.0, 1.0])
    assert np.abs(brightest(view).locations[0, ::-1] - expected).max() <= 3.5  # the square, stretched along x
    features, views = extract_views(brightest, image, (1.0, 0.5))
    assert views.tolist() == list(range(6)) and np.abs(features.locations - [30, 150]).max() <= 3.5


def test_tilt_one_is_the_image_itself():
    image = dot_image()
    view, affine = simulate_view(image, 1.0, 0.0)
    assert view is image
    np.testing.assert_array_equal(affine, np.eye(2, 3))


@pytest.mark.parametrize("tilt, angle", [(2.0, 0.0), (2.0, 36.0), (4.0, 108.0), (1.0, 90.0)])
def test_the_affine_maps_image_points_into_the_view(tilt, angle):
    image = dot_image()
    view, affine = simulate_view(image, tilt, angle)
    assert view.ndim == 3 and view.shape[2] == 3  # colour views for colour images
    expected = affine @ np.array([150.0, 30.0, 1.0])  # the dot's (x, y)
    found = brightest(view).locations[0, ::-1]
    assert np.abs(found - expected).max() <= 2.5 + tilt / 2  # the square, blurred and squeezed along x


def test_back_to_image_inverts_the_view_and_drops_the_corners():
    _, affine = simulate_view(dot_image(), 2.0, 36.0)
    points = np.array([[150.0, 30.0], [0.5, 0.5], [199.0, 119.0]])
    in_view = points @ affine[:, :2].T + affine[:, 2]
    back, inside = back_to_image(np.vstack([in_view, [[0.0, 0.0]]]), affine, (120, 200, 3))
    np.testing.assert_allclose(back[:3], points, atol=1e-9)
    assert inside.tolist() == [True, True, True, False]  # the view's corner (0, 0) is off the rotated image


def test_extract_views_maps_features_back_and_names_their_view():
    image = dot_image()
    features, views = extract_views(brightest, image, (1.0, 2.0))
    assert views.tolist() == list(range(6))  # one feature per view: the image and five tilt-2 views
    assert np.abs(features.locations - [30, 150]).max() <= 3.5
    assert features.descriptors[0, 0] == image.shape[1]  # view 0 is the image itself
    assert (features.descriptors[1:, 0] < image.shape[1] + 50).all()  # tilted views are squeezed
    np.testing.assert_array_equal(features.global_descriptor, [1.0])


def test_extract_views_needs_a_tilt():
    with pytest.raises(ValueError, match="at least one tilt"):
        extract_views(brightest, dot_image(), ())
