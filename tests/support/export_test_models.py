"""Tiny DELF/DELG models with random (seeded) weights and the official signatures.

They exist to test the loading contract (names, shapes, coordinate order, scales,
thresholds), never to measure quality: their descriptors mean nothing.

* ``tf1_delg``: a TF1 SavedModel built in a ``tf.compat.v1`` graph and saved with the v1
  builder, tensors ``input_image:0`` ... ``global_descriptors:0`` [S, 2048] (like the
  Kaggle 2020 ``delg-saved-models/local_and_global``: no ``input_global_scales_ind``).
* ``tf2_delg``: a TF2 SavedModel written by :func:`delf_pipeline.extractors.delg_export.export_delg`.
* ``hub_delf``: a TF2 SavedModel with the TF Hub DELF v1 ``default`` signature
  (``image`` float [0, 1], ``image_scales``, ``score_threshold``, ``max_feature_num`` ->
  ``locations`` (y, x), ``descriptors`` [N, 40]).

The backbone is one seeded 3x3 convolution averaged over 8x8 cells (stride 8, receptive
field 8, padding 0, so a keypoint sits at the centre of its cell); the attention of a
cell is ``1000 x`` the standard deviation of its normalised grey levels, so keypoints land
on texture and a blank image has none.

Run ``python tests/support/export_test_models.py OUT`` to write all three in OUT.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from delf_pipeline.extractors.delg_export import (
    Geometry,
    export_delg,
    extract_multiscale,
    official_outputs,
    project_descriptors,
    select_top,
)

CELL = 8  # stride = receptive field of the test backbone, in pixels
LOCAL_DIM = 32  # channels of the test feature map (tf1_delg / tf2_delg descriptor size)
HUB_DIM = 40  # DELF v1 descriptor size after PCA
GLOBAL_DIM = 2048
GEOMETRY = Geometry(stride=CELL, receptive_field=CELL, padding=0)
MODEL_NAMES = ("tf1_delg", "tf2_delg", "hub_delf")


def make_backbone(seed: int = 0, depth: int = LOCAL_DIM, global_dim: int = GLOBAL_DIM):
    """A seeded tf.Module: float32 [1, h, w, 3] pixels in 0..255 ->
    (feature map [1, h//8, w//8, depth], attention [1, h//8, w//8], global [1, global_dim])."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    kernel = rng.normal(0.0, 0.3, size=(3, 3, 3, depth)).astype(np.float32)
    whitening = rng.normal(0.0, depth**-0.5, size=(depth, global_dim)).astype(np.float32)

    class TinyBackbone(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="tiny_backbone")
            self.kernel = tf.Variable(kernel, name="kernel")
            self.whitening = tf.Variable(whitening, name="whitening")

        def __call__(self, pixels):
            x = (pixels - 128.0) / 128.0
            dense = tf.nn.relu(tf.nn.conv2d(x, self.kernel, 1, "SAME"))
            feature_map = tf.nn.avg_pool2d(dense, CELL, CELL, "VALID")
            grey = tf.reduce_mean(x, axis=-1, keepdims=True)
            mean = tf.nn.avg_pool2d(grey, CELL, CELL, "VALID")
            mean_sq = tf.nn.avg_pool2d(grey * grey, CELL, CELL, "VALID")
            attention = 1000.0 * tf.sqrt(tf.maximum(mean_sq - mean * mean, 0.0))[..., 0]
            pooled = tf.reduce_mean(dense, axis=[1, 2])
            return feature_map, attention, tf.matmul(pooled, self.whitening)

    return TinyBackbone()


def random_projection(seed: int, in_dim: int, out_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (mean [in_dim], matrix [out_dim, in_dim]) standing in for a PCA."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0.0, 0.05, size=in_dim).astype(np.float32)
    matrix = rng.normal(0.0, in_dim**-0.5, size=(out_dim, in_dim)).astype(np.float32)
    return mean, matrix


def export_tf2_delg(path: Path, seed: int = 0) -> Path:
    """The TF2 DELG export (serving_default with input_global_scales_ind)."""
    return export_delg(path, make_backbone(seed), stride=CELL, receptive_field=CELL, padding=0)


def export_tf1_delg(path: Path, seed: int = 0) -> Path:
    """A TF1 graph with the official tensor names, saved with the v1 SavedModel builder."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default() as graph:
        feeds = {
            "input_image": v1.placeholder(tf.uint8, [None, None, 3], name="input_image"),
            "input_scales": v1.placeholder(tf.float32, [None], name="input_scales"),
            "input_max_feature_num": v1.placeholder(tf.int32, [], name="input_max_feature_num"),
            "input_abs_thres": v1.placeholder(tf.float32, [], name="input_abs_thres"),
        }
        fetches = official_outputs(tf.cast(feeds["input_image"], tf.float32), feeds["input_scales"],
                                   feeds["input_max_feature_num"], feeds["input_abs_thres"],
                                   make_backbone(seed), GEOMETRY)
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(path))
            signature = v1.saved_model.predict_signature_def(feeds, fetches)
            builder.add_meta_graph_and_variables(
                session, [tf.saved_model.SERVING], signature_def_map={"serving_default": signature}
            )
            builder.save()
    return path


def export_hub_delf(path: Path, seed: int = 0) -> Path:
    """A TF2 SavedModel with the TF Hub DELF v1 ``default`` signature (no global output)."""
    import tensorflow as tf

    backbone = make_backbone(seed, depth=2 * HUB_DIM)
    projection = [tf.constant(a) for a in random_projection(seed + 1, 2 * HUB_DIM, HUB_DIM)]

    class HubDelf(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="hub_delf")
            self.backbone = backbone

        @tf.function(input_signature=[
            tf.TensorSpec([None, None, 3], tf.float32, name="image"),
            tf.TensorSpec([None], tf.float32, name="image_scales"),
            tf.TensorSpec([], tf.float32, name="score_threshold"),
            tf.TensorSpec([], tf.int32, name="max_feature_num"),
        ])
        def default(self, image, image_scales, score_threshold, max_feature_num):
            *local, _ = extract_multiscale(image * 255.0, image_scales, score_threshold,
                                           self.backbone, GEOMETRY)
            boxes, features, _, _ = select_top(*local, max_feature_num)
            locations = (boxes[:, :2] + boxes[:, 2:]) / 2.0
            return {"locations": locations, "descriptors": project_descriptors(features, projection)}

    module = HubDelf()
    tf.saved_model.save(module, str(path), signatures={"default": module.default.get_concrete_function()})
    return path


EXPORTERS = {"tf1_delg": export_tf1_delg, "tf2_delg": export_tf2_delg, "hub_delf": export_hub_delf}


def export_all(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the three test models under ``out_dir``; returns {name: folder}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: export(out_dir / name, seed) for name, export in EXPORTERS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder that receives tf1_delg/, tf2_delg/ and hub_delf/")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    args = parser.parse_args(argv)
    for name, path in export_all(args.out, args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
