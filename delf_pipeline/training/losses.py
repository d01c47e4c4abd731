"""ArcFace losses on L2-normalised embeddings (formulas and values: docs/training.md).

- sub-center ArcFace (Deng et al., ECCV 2020): each class has ``k`` centres; a sample's cosine
  to a class is its largest cosine to any of them, so a class may hold a few distinct views
  (a facade, a night view, an aerial one) and a mislabelled photo pulls on a minor centre only;
- dynamic margins (Henkel and Singer 2020, Google Landmark Recognition 2020, 1st place):
  m_c = a * n_c ** (-1/4) + b, with a and b chosen so that the margins run from
  ``margin_min`` (the class with the most images) to ``margin_max`` (the one with the fewest);
- plain ArcFace (Deng et al., CVPR 2019): k = 1 and one margin for every class.
"""
from __future__ import annotations

import math

import numpy as np

MARGIN_EXPONENT = -0.25  # Henkel and Singer 2020: margins follow n ** (-1/4)


def dynamic_margins(counts: np.ndarray, low: float, high: float) -> np.ndarray:
    """[C] margins of classes with ``counts`` [C] images: a * n ** (-1/4) + b, from ``low`` for
    the most frequent class to ``high`` for the rarest; every class gets ``high`` when all
    counts are equal (nothing to scale by)."""
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 1 or not len(counts) or counts.min() < 1:
        raise ValueError(f"class counts must be a non-empty list of counts >= 1, got {counts}")
    if low > high:
        raise ValueError(f"train.margin_min must be <= train.margin_max, got {low} > {high}")
    x = counts**MARGIN_EXPONENT
    if x.max() == x.min():
        return np.full(len(counts), high, np.float32)
    a = (high - low) / (x.max() - x.min())
    return (a * x + (low - a * x.min())).astype(np.float32)


def centres_initializer(seed: int):
    """Initial class centres: normal, seeded (only their direction matters)."""
    import keras

    return keras.initializers.RandomNormal(stddev=0.01, seed=seed)


def make_centres(classes: int, subcenters: int, dim: int, seed: int):
    """The class centres: a float32 layer whose ``kernel`` is [dim, classes * subcenters]
    (centre j of class c is column c * subcenters + j) and which maps embeddings [B, dim]
    to cosines [B, classes] (the best of each class's centres)."""
    import keras
    import tensorflow as tf

    class Centres(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__(name="class_centres", dtype="float32")
            self.kernel = self.add_weight(shape=(dim, classes * subcenters), initializer=centres_initializer(seed),
                                          name="kernel")

        def call(self, embeddings):
            cosines = tf.matmul(tf.math.l2_normalize(embeddings, axis=1), tf.math.l2_normalize(self.kernel, axis=0))
            return tf.reduce_max(tf.reshape(cosines, [-1, classes, subcenters]), axis=2)

    return Centres()


def arcface_loss(cosines, labels, margins, scale: float):
    """Mean softmax cross-entropy of ``scale`` x the cosines [B, C] (float32) whose true-class
    entry cos(theta) is replaced by cos(theta + m) with m = margins[label] (margins: [C]).

    Where theta + m would pass pi, cos(theta) - m sin(m) keeps the target falling as theta
    grows (the usual ArcFace continuation). labels: [B] int.
    """
    import tensorflow as tf

    labels = tf.cast(labels, tf.int32)
    m = tf.gather(margins, labels)
    cos_y = tf.gather(cosines, labels, axis=1, batch_dims=1)
    sin_y = tf.sqrt(tf.maximum(1.0 - cos_y * cos_y, 1e-7))
    target = tf.where(cos_y > tf.cos(math.pi - m), cos_y * tf.cos(m) - sin_y * tf.sin(m), cos_y - m * tf.sin(m))
    logits = cosines + tf.one_hot(labels, tf.shape(cosines)[1]) * (target - cos_y)[:, None]
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scale * logits))
