"""Wrap a dense backbone into the official DELG TF2 SavedModel signature.

The exported model behaves like ``export_local_and_global_model.py`` of
tensorflow/models research/delf, so :func:`delf_pipeline.extractors.models.load_extractor` (and
the official ``extractor.py``) load it like any DELG export. Signature
``serving_default``::

    inputs   input_image              uint8   [H, W, 3]
             input_scales             float32 [S]    image pyramid scales
             input_max_feature_num    int32   []     local features kept (top by score)
             input_abs_thres          float32 []     attention threshold
             input_global_scales_ind  int32   [G]    scales that give a global descriptor
    outputs  boxes                    float32 [N, 4] receptive boxes (ymin, xmin, ymax, xmax)
                                                     in input-image pixels
             features                 float32 [N, D] local descriptors (L2, optional projection, L2)
             scales                   float32 [N]    1 / pyramid scale (official convention)
             scores                   float32 [N, 1] attention, sorted descending
             global_descriptors       float32 [G', global_dim] unnormalised, one row per
                                                     selected scale in ascending scale order

The backbone maps float32 pixels [1, h, w, 3] in 0..255 (it normalises them itself) to
``(feature_map [1, h', w', C], attention [1, h', w'] or [1, h', w', 1], global [1, global_dim])``.
TensorFlow is imported inside functions; this module is only used when exporting.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..utils.artifacts import atomic_path


@dataclass(frozen=True)
class Geometry:
    """Where a feature-map cell looks in the image it was computed from (pixels).

    Cell (i, j) covers the box ``[i*stride - padding, j*stride - padding,
    i*stride - padding + receptive_field - 1, j*stride - padding + receptive_field - 1]``.
    ResNet-50 block3 of the official DELF/DELG: stride 16, receptive_field 291, padding 145.
    """

    stride: float
    receptive_field: float
    padding: float

    def __post_init__(self) -> None:
        if self.stride <= 0 or self.receptive_field <= 0:
            raise ValueError(f"stride and receptive_field must be > 0, got {self.stride}, {self.receptive_field}")


def receptive_boxes(height, width, geometry: Geometry):
    """Boxes [height*width, 4] (ymin, xmin, ymax, xmax) of a feature map, row-major order."""
    import tensorflow as tf

    rows, cols = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
    cells = tf.cast(tf.reshape(tf.stack([rows, cols], axis=-1), [-1, 2]), tf.float32)
    top_left = cells * geometry.stride - geometry.padding
    return tf.concat([top_left, top_left + (geometry.receptive_field - 1.0)], axis=1)


def _one_scale(pixels, scale, abs_thres, backbone, geometry: Geometry):
    """Backbone at one pyramid scale; returns the cells with attention >= abs_thres.

    pixels: float32 [H, W, 3] in 0..255. Returns boxes [n, 4] in input pixels,
    features [n, C], scores [n] and the global descriptor [global_dim].
    """
    import tensorflow as tf

    size = tf.cast(tf.round(tf.cast(tf.shape(pixels)[:2], tf.float32) * scale), tf.int32)
    resized = tf.image.resize(pixels[tf.newaxis], tf.maximum(size, 1))
    feature_map, attention, global_descriptor = backbone(resized)
    height, width = tf.shape(feature_map)[1], tf.shape(feature_map)[2]
    depth = feature_map.shape[-1] if feature_map.shape[-1] is not None else -1
    features = tf.reshape(feature_map, [-1, depth])
    attention = tf.reshape(attention, [-1])
    keep = tf.reshape(tf.where(attention >= abs_thres), [-1])
    boxes = receptive_boxes(height, width, geometry) / scale
    return (tf.gather(boxes, keep), tf.gather(features, keep), tf.gather(attention, keep),
            tf.reshape(global_descriptor, [-1]))


def extract_multiscale(pixels, scales, abs_thres, backbone, geometry: Geometry):
    """Run the backbone over the image pyramid (graph- and tf.function-compatible).

    pixels: float32 [H, W, 3] in 0..255; scales: float32 [S]. Returns boxes [M, 4],
    features [M, C], feature scales [M] (1 / scale), scores [M] over all scales (before
    the top-k cut) and global descriptors [S, global_dim], unnormalised.
    """
    import tensorflow as tf

    count = tf.shape(scales)[0]
    arrays = [tf.TensorArray(tf.float32, size=count, infer_shape=False) for _ in range(4)]
    globals_ = tf.TensorArray(tf.float32, size=count)

    def body(i, boxes, features, inverse, scores, globals_):
        scale = scales[i]
        b, f, s, g = _one_scale(pixels, scale, abs_thres, backbone, geometry)
        inv = tf.fill(tf.shape(s), 1.0 / scale)
        return (i + 1, boxes.write(i, b), features.write(i, f), inverse.write(i, inv),
                scores.write(i, s), globals_.write(i, g))

    _, *out = tf.while_loop(lambda i, *_: i < count, body, [tf.constant(0), *arrays, globals_])
    return tuple(array.concat() for array in out[:4]) + (out[4].stack(),)


def select_top(boxes, features, inverse_scales, scores, max_feature_num):
    """Keep the ``max_feature_num`` highest scores over all scales, sorted descending."""
    import tensorflow as tf

    k = tf.minimum(tf.cast(max_feature_num, tf.int32), tf.shape(scores)[0])
    order = tf.math.top_k(scores, k=tf.maximum(k, 0)).indices
    return [tf.gather(x, order) for x in (boxes, features, inverse_scales, scores)]


def project_descriptors(features, projection):
    """L2, then optionally ``(x - mean) @ matrix.T`` and L2 again (official post-processing).

    features: [N, C]; projection: None or (mean [C], matrix [D, C]). Returns [N, D].
    """
    import tensorflow as tf

    features = tf.math.l2_normalize(features, axis=1)
    if projection is None:
        return features
    mean, matrix = projection
    return tf.math.l2_normalize(tf.matmul(features - mean, matrix, transpose_b=True), axis=1)


def select_global_scales(global_descriptors, global_scales_ind):
    """Rows [G', global_dim] of the scales whose index is in ``global_scales_ind``, ascending."""
    import tensorflow as tf

    index = tf.range(tf.shape(global_descriptors)[0])
    wanted = tf.reduce_any(tf.equal(index[:, tf.newaxis], global_scales_ind[tf.newaxis, :]), axis=1)
    return tf.boolean_mask(global_descriptors, wanted)


def official_outputs(pixels, scales, max_feature_num, abs_thres, backbone, geometry: Geometry,
                     projection=None, global_scales_ind=None) -> dict:
    """The official named outputs (see the module docstring) from float32 pixels [H, W, 3].

    global_scales_ind None keeps a global row for every scale (the TF1 exports' behaviour).
    Every output is also a tensor of the same name in a TF1 graph.
    """
    import tensorflow as tf

    *local, global_all = extract_multiscale(pixels, scales, abs_thres, backbone, geometry)
    boxes, features, inverse, scores = select_top(*local, max_feature_num)
    if global_scales_ind is not None:
        global_all = select_global_scales(global_all, global_scales_ind)
    outputs = {"boxes": boxes, "features": project_descriptors(features, projection), "scales": inverse,
               "scores": scores[:, tf.newaxis], "global_descriptors": global_all}
    return {name: tf.identity(value, name=name) for name, value in outputs.items()}


def _check_projection(local_projection) -> tuple[np.ndarray, np.ndarray] | None:
    if local_projection is None:
        return None
    mean, matrix = (np.asarray(a, dtype=np.float32) for a in local_projection)
    if mean.ndim != 1 or matrix.ndim != 2 or matrix.shape[1] != mean.shape[0]:
        raise ValueError(
            f"local_projection must be (mean [C], matrix [D, C]), got {mean.shape} and {matrix.shape}"
        )
    return mean, matrix


def make_delg_module(backbone: Callable, geometry: Geometry, local_projection=None):
    """A tf.Module whose ``serve`` tf.function has the official DELG TF2 signature."""
    import tensorflow as tf

    projection = _check_projection(local_projection)

    class DelgModule(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="delg")
            self.backbone = backbone
            self.projection = None if projection is None else [tf.constant(a) for a in projection]

        @tf.function(input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8, name="input_image"),
            tf.TensorSpec([None], tf.float32, name="input_scales"),
            tf.TensorSpec([], tf.int32, name="input_max_feature_num"),
            tf.TensorSpec([], tf.float32, name="input_abs_thres"),
            tf.TensorSpec([None], tf.int32, name="input_global_scales_ind"),
        ])
        def serve(self, input_image, input_scales, input_max_feature_num, input_abs_thres,
                  input_global_scales_ind):
            return official_outputs(tf.cast(input_image, tf.float32), input_scales, input_max_feature_num,
                                    input_abs_thres, self.backbone, geometry, self.projection,
                                    input_global_scales_ind)

    return DelgModule()


def export_delg(
    path: str | Path,
    backbone: Callable,
    *,
    stride: float,
    receptive_field: float,
    padding: float,
    local_projection: tuple[np.ndarray, np.ndarray] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``backbone`` as a DELG SavedModel with the official ``serving_default`` signature.

    backbone: a trackable callable (tf.Module or Keras model, so its variables are saved)
    mapping float32 [1, h, w, 3] pixels in 0..255 to (feature map [1, h', w', C],
    attention [1, h', w'], global descriptor [1, global_dim]).
    stride, receptive_field, padding: feature-map geometry in pixels (see :class:`Geometry`).
    local_projection: optional (mean [C], matrix [D, C]) applied to the L2-normalised local
    descriptors before a final L2 (PCA as in the official extractor).
    The folder is written atomically; an existing one is an error unless ``overwrite``.
    Returns ``path``.
    """
    import tensorflow as tf

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"export path {path} already exists; pass overwrite=True to replace it")
    module = make_delg_module(backbone, Geometry(stride, receptive_field, padding), local_projection)
    signature = module.serve.get_concrete_function()
    if path.is_dir():
        shutil.rmtree(path)
    with atomic_path(path, is_dir=True) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": signature})
    return path
