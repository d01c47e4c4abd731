"""What an extractor is: a call ``image -> ImageFeatures``, on one image or
(:class:`BatchExtractor`) on a batch of images of one shape."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..formats.features import ImageFeatures

Extractor = Callable[[np.ndarray], ImageFeatures]  # one image [H, W(, 3)] uint8 -> its features
BatchCall = Callable[[Sequence[np.ndarray]], list[ImageFeatures]]


class BatchExtractor:
    """An extractor defined by its batch call ``batch(images) -> [features, ...]`` (images of
    one shape, [H, W(, 3)] uint8 each); ``extractor(image)`` is ``batch([image])[0]``."""

    def __init__(self, batch: BatchCall):
        self.batch = batch

    def __call__(self, image: np.ndarray) -> ImageFeatures:
        return self.batch([image])[0]


def extract_batch(extractor: Extractor, images: Sequence[np.ndarray]) -> list[ImageFeatures]:
    """Features of ``images`` (each [H, W(, 3)] uint8, all of one shape), in order: one call of
    ``extractor.batch`` when it has one, else one call of ``extractor`` per image."""
    batch = getattr(extractor, "batch", None)
    if batch is None or not len(images):
        return [extractor(image) for image in images]
    return list(batch(images))


def mapped(extractor: Extractor, then: Callable[[ImageFeatures], ImageFeatures]) -> BatchExtractor:
    """``extractor`` with ``then`` applied to each image's features; batched as ``extractor`` is."""
    return BatchExtractor(lambda images: [then(features) for features in extract_batch(extractor, images)])
