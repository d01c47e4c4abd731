"""Tests of delf_pipeline.extractors.models (loading DELF/DELG exports) and delf_pipeline.extractors.delg_export.

The three tiny models of support.export_test_models (random seeded weights,
official signatures) are loaded through load_extractor, the path users take. Their
attention is 1000 x the std of the normalised grey levels of each 8 x 8 cell, which
gives hand-worked golden values; they say nothing about retrieval quality.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="loading DELF/DELG models needs TensorFlow")

from support.export_test_models import HUB_DIM, LOCAL_DIM, make_backbone  # noqa: E402

from delf_pipeline.config import ExtractSettings, make_section  # noqa: E402
from delf_pipeline.extractors.delg_export import (  # noqa: E402
    Geometry,
    export_delg,
    project_descriptors,
    receptive_boxes,
)
from delf_pipeline.extractors.models import (  # noqa: E402
    MIN_IMAGE_SIDE,
    _global_indices,
    load_extractor,
    pool_global,
)

MODELS = ("tf1_delg", "tf2_delg", "hub_delf")
DELG = ("tf1_delg", "tf2_delg")
DIM = {"tf1_delg": LOCAL_DIM, "tf2_delg": LOCAL_DIM, "hub_delf": HUB_DIM}
# A 0/255 checkerboard cell: grey levels -1 and 255/128 - 1, std (1 + 127/128) / 2.
CHECKER_SCORE = 1000.0 * (1.0 + 127.0 / 128.0) / 2.0
MULTI = {"image_scales": [0.5, 1.0, 2.0], "global_scale_indices": [1]}  # shared, so loaded once


def settings(**overrides) -> ExtractSettings:
    conf = {"backend": "savedmodel", "model": "", "image_scales": [1.0], "global_scale_indices": [0],
            "score_threshold": 175.0, "max_features": 1000}
    return make_section("extract", **{**conf, **overrides})


@pytest.fixture(scope="module")
def extractor(delf_test_models):
    """extractor(name, **settings) -> extract(image); loaded once per distinct setting."""

    @functools.lru_cache(maxsize=None)
    def cached(name: str, frozen: tuple):
        conf = {k: list(v) if isinstance(v, tuple) else v for k, v in frozen}
        return load_extractor(settings(model=str(delf_test_models[name]), **conf))

    def get(name: str, **overrides):
        frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()))
        return cached(name, frozen)

    return get


def grey(height: int, width: int, level: int = 128) -> np.ndarray:
    return np.full((height, width, 3), level, np.uint8)


def checker_cell(height: int, width: int, row: int, col: int) -> np.ndarray:
    """A grey image with one 8 x 8 checkerboard cell at cell (row, col)."""
    image = grey(height, width)
    checker = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image[8 * row: 8 * row + 8, 8 * col: 8 * col + 8] = checker[..., None]
    return image


def textured_corner(height: int, width: int, size: int = 32) -> np.ndarray:
    """Noise in the top-right size x size corner, grey elsewhere."""
    image = grey(height, width)
    image[:size, width - size:] = np.random.default_rng(1).integers(0, 256, (size, size, 3))
    return image


# --- golden values ---------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape, cell", [((40, 64), (1, 6)), ((64, 40), (6, 1)), ((32, 32), (2, 0))])
def test_one_textured_cell_gives_one_keypoint_at_its_centre(extractor, name, shape, cell):
    features = extractor(name)(checker_cell(*shape, *cell))
    assert features.num_features == 1
    np.testing.assert_allclose(features.locations, [[8 * cell[0] + 3.5, 8 * cell[1] + 3.5]])
    assert features.locations.dtype == np.float32
    assert features.descriptors.shape == (1, DIM[name]) and features.descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, rtol=1e-5)
    if name == "hub_delf":  # the hub signature gives no scales or attention
        assert np.isnan(features.scales).all() and np.isnan(features.scores).all()
    else:
        np.testing.assert_allclose(features.scales, [1.0])
        np.testing.assert_allclose(features.scores, [CHECKER_SCORE], rtol=1e-5)


def test_pool_global_golden():
    rows = np.array([[3.0, 4.0], [0.0, 2.0]])  # L2 rows (.6, .8), (0, 1); sum (.6, 1.8)
    np.testing.assert_allclose(pool_global(rows), np.array([0.6, 1.8]) / np.sqrt(3.6), rtol=1e-6)


@pytest.mark.parametrize("rows", [np.zeros((0, 4)), np.zeros(4)])
def test_pool_global_rejects_bad_shapes(rows):
    with pytest.raises(ValueError, match="global descriptors must be"):
        pool_global(rows)


def test_receptive_boxes_official_resnet_geometry():
    boxes = receptive_boxes(2, 3, Geometry(stride=16.0, receptive_field=291.0, padding=145.0)).numpy()
    assert boxes.shape == (6, 4)
    np.testing.assert_allclose(boxes[0], [-145, -145, 145, 145])  # centre (0, 0)
    np.testing.assert_allclose(boxes[5], [16 - 145, 32 - 145, 16 + 145, 32 + 145])  # row 1, col 2


def test_project_descriptors_l2_then_projection_then_l2():
    features = np.array([[3.0, 4.0, 0.0]], np.float32)
    mean, matrix = np.array([0.6, 0.0, 0.0], np.float32), np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    np.testing.assert_allclose(project_descriptors(features, (mean, matrix)).numpy(), [[0.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(project_descriptors(features, None).numpy(), [[0.6, 0.8, 0.0]], rtol=1e-6)


# --- coordinates, scales, limits --------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("height, width", [(96, 160), (160, 96)])
def test_keypoints_land_on_the_textured_corner_in_y_x_order(extractor, name, height, width):
    features = extractor(name, **MULTI)(textured_corner(height, width))
    assert features.num_features > 10
    y, x = features.locations.T
    assert y.max() < 32 + 4 and x.min() > width - 32 - 4, "keypoints outside the textured corner"


@pytest.mark.parametrize("name", DELG)
@pytest.mark.parametrize("conf", [{}, MULTI])
def test_reported_scales_are_input_scales(extractor, name, conf):
    scales = conf.get("image_scales", [1.0])
    features = extractor(name, **conf)(textured_corner(96, 160))
    assert features.num_features > 0
    assert set(np.round(features.scales, 4)) <= set(np.round(np.float32(scales), 4))
    assert features.global_descriptor.shape == (2048,)


@pytest.mark.parametrize("name", MODELS)
def test_max_features_keeps_the_top_scores(extractor, name):
    image = textured_corner(96, 160)
    everything = extractor(name, **MULTI)(image)
    top = extractor(name, **MULTI, max_features=5)(image)
    assert everything.num_features > 5 and top.num_features == 5
    np.testing.assert_array_equal(top.locations, everything.locations[:5])
    if name != "hub_delf":
        assert np.all(np.diff(everything.scores) <= 0), "scores are not sorted descending"
        np.testing.assert_array_equal(top.scores, np.sort(everything.scores)[::-1][:5])


@pytest.mark.parametrize("name", DELG)
def test_score_threshold_is_respected(extractor, name):
    features = extractor(name, **MULTI, score_threshold=300.0)(textured_corner(96, 160))
    assert features.num_features > 0 and features.scores.min() >= 300.0


@pytest.mark.parametrize("name", MODELS)
def test_threshold_above_every_score_gives_no_keypoints(extractor, name):
    features = extractor(name, score_threshold=5000.0)(textured_corner(96, 160))
    assert features.num_features == 0 and features.descriptors.shape == (0, DIM[name])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), (48, 80)])
def test_blank_image_gives_zero_keypoints_not_an_error(extractor, name, shape):
    # Level 200, not 128: the test backbone's global descriptor of mid-grey is exactly zero.
    features = extractor(name, **MULTI)(grey(*shape, level=200))
    assert features.num_features == 0
    assert features.locations.shape == (0, 2) and features.descriptors.shape == (0, DIM[name])
    assert features.scales.shape == (0,) and features.scores.shape == (0,)
    if name in DELG:
        np.testing.assert_allclose(np.linalg.norm(features.global_descriptor), 1.0, rtol=1e-5)


# --- global descriptor ------------------------------------------------------------------


@pytest.mark.parametrize("name", DELG)
def test_global_descriptor_pools_the_configured_scales(extractor, name):
    image = textured_corner(96, 160)
    scales = [0.5, 1.0, 2.0]
    first, last = (extractor(name, image_scales=scales, global_scale_indices=[i])(image).global_descriptor
                   for i in (0, 2))
    pooled = extractor(name, image_scales=scales, global_scale_indices=[2, 0, 2])(image).global_descriptor
    assert pooled.dtype == np.float32 and pooled.shape == (2048,)
    np.testing.assert_allclose(np.linalg.norm(pooled), 1.0, rtol=1e-5)
    np.testing.assert_allclose(pooled, pool_global(np.stack([first, last])), atol=1e-6)
    assert not np.allclose(first, last, atol=1e-3), "the scale index has no effect"


@pytest.mark.parametrize("indices, expected", [([], [0, 1, 2]), ([2, 0, 2], [0, 2]), ([1], [1])])
def test_global_scale_indices_default_to_all_and_are_deduplicated(indices, expected):
    assert _global_indices(make_section("extract", global_scale_indices=indices), 3) == expected


def test_hub_model_has_no_global_descriptor(extractor):
    assert extractor("hub_delf")(textured_corner(96, 160)).global_descriptor is None


def test_tf1_and_tf2_exports_of_the_same_weights_agree(extractor):
    image = textured_corner(96, 160)
    one, two = (extractor(n, **MULTI)(image) for n in DELG)
    for field in ("locations", "descriptors", "scales", "scores", "global_descriptor"):
        np.testing.assert_allclose(getattr(one, field), getattr(two, field), atol=1e-5, err_msg=field)


@pytest.mark.parametrize("name", MODELS)
def test_two_calls_are_identical(extractor, name):
    extract = extractor(name, **MULTI)
    image = textured_corner(64, 96)
    first, second = extract(image), extract(image)
    for field in ("locations", "descriptors", "scales", "scores"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))


# --- errors -----------------------------------------------------------------------------


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_extractor(settings(model=str(tmp_path / "nowhere")))


def test_folder_without_saved_model_is_a_clear_error(tmp_path):
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a SavedModel: no saved_model.pb \(found: weights.h5\)"):
        load_extractor(settings(model=str(tmp_path)))


def test_corrupt_saved_model_is_a_clear_error(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="cannot load SavedModel"):
        load_extractor(settings(model=str(tmp_path)))


def test_saved_model_with_other_signature_names_what_it_found(tmp_path):
    import tensorflow as tf

    class Other(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def predict(self, x):
            return {"y": 2.0 * x}

    module = Other()
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.predict})
    with pytest.raises(ValueError, match=r"not a DELF/DELG export: signatures \{'serving_default': \['x'\]\}"):
        load_extractor(settings(model=str(tmp_path)))


def test_hub_url_without_network_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_hub", reason="hub handles need tensorflow_hub")
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    # Port 9 on the loopback refuses at once: the same path as a machine without network.
    with pytest.raises(ValueError, match="cannot fetch TF Hub model .*no network"):
        load_extractor(settings(backend="hub", model="http://127.0.0.1:9/google/delf/1"))


@pytest.mark.parametrize("overrides, message", [
    ({"backend": "savedmodel", "model": "https://tfhub.dev/google/delf/1"}, "URLs need extract.backend"),
    ({"model": "  "}, "extract.model is empty"),
    ({"backend": "rootsift", "model": "x"}, "does not load a DELF/DELG model"),
    ({"model": "x", "global_scale_indices": [0, 3]}, r"global_scale_indices \[3\] out of range"),
])
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_extractor(settings(**overrides))


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32, 3), np.float32), "RGB uint8"),
    (np.zeros((32, 32), np.uint8), "RGB uint8"),
    (np.zeros((32, 32, 4), np.uint8), "RGB uint8"),
    (np.zeros((9, 64, 3), np.uint8), "at least 10 px"),
])
def test_bad_images_are_clear_errors(extractor, image, message):
    with pytest.raises(ValueError, match=message):
        extractor("tf2_delg")(image)


# --- exporter ---------------------------------------------------------------------------


def test_export_refuses_an_existing_path(tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        export_delg(tmp_path, make_backbone(), stride=8, receptive_field=8, padding=0)


@pytest.mark.parametrize("projection", [(np.zeros(3), np.zeros((2, 4))), (np.zeros((1, 4)), np.zeros((2, 4)))])
def test_export_rejects_a_malformed_projection(tmp_path, projection):
    with pytest.raises(ValueError, match=r"local_projection must be \(mean \[C\], matrix \[D, C\]\)"):
        export_delg(tmp_path / "m", make_backbone(), stride=8, receptive_field=8, padding=0,
                    local_projection=projection)


@pytest.mark.parametrize("geometry", [(0, 8, 0), (8, 0, 0)])
def test_geometry_must_be_positive(geometry):
    with pytest.raises(ValueError, match="must be > 0"):
        Geometry(*geometry)


def test_export_with_projection_loads_with_the_projected_dimension(tmp_path):
    rng = np.random.default_rng(3)
    projection = (rng.normal(size=LOCAL_DIM).astype(np.float32), rng.normal(size=(12, LOCAL_DIM)).astype(np.float32))
    path = export_delg(tmp_path / "m", make_backbone(), stride=8, receptive_field=8, padding=0,
                       local_projection=projection)
    features = load_extractor(settings(model=str(path)))(checker_cell(40, 64, 1, 6))
    assert features.descriptors.shape == (1, 12)
    np.testing.assert_allclose(features.locations, [[11.5, 51.5]])
