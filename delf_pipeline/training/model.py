"""The trained network: EfficientNet-Lite -> GeM (learnable p) -> linear -> BatchNorm -> L2.

The backbone is :func:`delf_pipeline.extractors.efficientnet_lite.build_model` with its
ImageNet weights; its batch norms keep their ImageNet statistics (small batches on a CPU
would only add noise to them) and only the last ``train_blocks`` units are trained (units,
bottom up: the stem, each block, the 1280-d head convolution). The head layers compute in
float32 even under mixed precision. :func:`delg_backbone` wraps a network the way the DELG
exporter and the validation both call it, so validation measures the exported descriptor.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..extractors import efficientnet_lite as lite

BN_MOMENTUM = 0.9  # the head's batch norm: few steps per run, so a short memory


def units(variant: str) -> list[str]:
    """The backbone's trainable units, bottom up: stem, block0 .. blockN, head."""
    return ["stem"] + [f"block{spec.index}" for spec in lite.block_specs(variant)] + ["head"]


def unit_of(layer_name: str) -> str | None:
    """The unit a backbone layer belongs to (``block3_expand_conv`` -> ``block3``); None for the
    layers that are no unit's (input, normalisation, ImageNet classifier)."""
    head = layer_name.split("_")[0]
    return head if head in ("stem", "head") or head.startswith("block") else None


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under the Keras dtype policy ``name``; the previous one is restored after."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@dataclass
class Network:
    """The layers of a trained descriptor; :meth:`embed` maps pixels to L2-normalised [B, dim]."""

    backbone: Any  # keras.Model of efficientnet_lite.build_model: (local, head, ImageNet logits)
    gem: Any
    dense: Any
    norm: Any
    variant: str
    local_layer: str

    def embed(self, images, training: bool = False):
        """float32 pixels [B, S, S, 3] in 0..255 (S a multiple of 32) -> float32 [B, dim], L2-normalised."""
        import tensorflow as tf

        _, head, _ = self.backbone(images, training=training)
        pooled = self.gem(head)
        return tf.math.l2_normalize(self.norm(self.dense(pooled), training=training), axis=1)

    def head_layers(self) -> list:
        return [self.gem, self.dense, self.norm]

    def trainable_backbone(self) -> list:
        return list(self.backbone.trainable_weights)

    def trainable_head(self) -> list:
        return [w for layer in self.head_layers() for w in layer.trainable_weights]

    def variables(self) -> list:
        """Every variable (trainable or not), in a fixed order: what a checkpoint holds."""
        return list(self.backbone.weights) + [w for layer in self.head_layers() for w in layer.weights]

    def arrays(self) -> list[np.ndarray]:
        return [np.array(v.numpy()) for v in self.variables()]

    def assign(self, arrays: list[np.ndarray]) -> None:
        """Set every variable from :meth:`arrays` of a network of the same settings."""
        variables = self.variables()
        if len(arrays) != len(variables) or any(tuple(a.shape) != tuple(v.shape) for a, v in zip(arrays, variables)):
            raise ValueError("the weights do not fit this network (other backbone or dimension)")
        for variable, array in zip(variables, arrays):
            variable.assign(array)

    def backbone_weights(self) -> dict[str, list[np.ndarray]]:
        """{layer name: arrays} of the backbone, as efficientnet_lite.set_weights takes them."""
        return {layer.name: [np.array(w.numpy()) for w in layer.weights] for layer in self.backbone.layers if layer.weights}


def build(*, variant: str, dim: int, train_blocks: int, weights: dict | None, seed: int,
          local_layer: str = lite.DEFAULT_LOCAL_LAYER, mixed_precision: bool = False) -> Network:
    """A :class:`Network`: the backbone with ``weights`` (ImageNet, or None: random, tests only)
    and a new head of ``dim`` dimensions seeded by ``seed``; the last ``train_blocks`` units trainable."""
    import keras

    names = units(variant)
    if not 0 <= train_blocks <= len(names):
        raise ValueError(f"train.train_blocks must be 0..{len(names)} for {variant} (units {names[0]} .. "
                         f"{names[-1]}), got {train_blocks}")
    with dtype_policy("mixed_float16" if mixed_precision else "float32"):
        backbone = lite.build_model(local_layer, weights, variant)
    trained = set(names[len(names) - train_blocks:])
    for layer in backbone.layers:
        is_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not is_norm and unit_of(layer.name) in trained
    gem = _gem_layer()
    dense = keras.layers.Dense(dim, name="embedding", dtype="float32",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed))
    norm = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="embedding_bn", dtype="float32")
    network = Network(backbone, gem, dense, norm, variant, local_layer)
    network.embed(np.zeros((2, 32, 32, 3), np.float32))  # creates the head's variables
    return network


def _gem_layer():
    import keras

    class GeM(keras.layers.Layer):
        """Generalised-mean pooling [B, h, w, C] -> [B, C] with a learnable exponent p."""

        def __init__(self) -> None:
            super().__init__(name="gem", dtype="float32")
            self.p = self.add_weight(shape=(), initializer=keras.initializers.Constant(lite.GEM_P), name="p")

        def call(self, features):
            return lite.gem(features, self.p)

    return GeM()


def delg_backbone(network: Network):
    """A ``tf.Module`` for the DELG exporter: float32 pixels [1, h, w, 3] in 0..255 ->
    (local features, attention, global descriptor [1, dim]) exactly as the ImageNet Lite
    backend makes the first two (efficientnet_lite.backbone_outputs); the global one is the
    trained head's, L2-normalised."""
    import tensorflow as tf

    class TrainedBackbone(tf.Module):
        def __init__(self) -> None:
            super().__init__(name=f"trained_efficientnet_{network.variant}")
            self.model, self.gem, self.dense, self.norm = network.backbone, network.gem, network.dense, network.norm

        def __call__(self, images):
            local, attention, pooled = lite.backbone_outputs(self.model, images, gem_p=self.gem.p)
            descriptor = tf.math.l2_normalize(self.norm(self.dense(pooled), training=False), axis=1)
            return local, attention, descriptor

    return TrainedBackbone()
