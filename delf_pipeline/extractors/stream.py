"""Image records -> their stored features, in order: decoded ahead in background threads
(overlapping the model), extracted in batches of one shape, locations mapped back to the
original image."""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator

import numpy as np

from ..config import ExtractSettings
from ..formats.features import ImageFeatures
from ..formats.images import ErrorRecord, ImageRecord, iter_decoded
from ..formats.store import ExtractedImage
from .base import Extractor, extract_batch
from .build import decode_mode


def extract_records(todo: list[ImageRecord], extractor: Extractor, conf: ExtractSettings) -> Iterator[ExtractedImage | ErrorRecord]:
    """Each record of ``todo`` in order: its stored form, or its error; decoded as the
    ``extract`` section ``conf`` says, extracted in the groups of :func:`batches` (one batch
    call each, see :func:`.base.extract_batch`)."""
    decoded = iter_decoded(todo, conf.max_image_size, lookahead=max(8, conf.batch_size), mode=decode_mode(conf))
    for group in batches(decoded, conf.batch_size, conf.part_size):
        found = iter(extract_batch(extractor, [image for _, image, _, error in group if error is None]))
        for record, image, factors, error in group:
            if error is not None:
                yield ErrorRecord(record.id, str(record.path), error)
            else:
                yield as_stored(record.id, next(found), image.shape, factors)


def batches(decoded: Iterable[tuple], batch_size: int, part_size: int) -> Iterator[list[tuple]]:
    """``decoded`` (record, image, factors, error) tuples, in order, cut into consecutive groups
    holding at most ``batch_size`` images, all of one shape, and never crossing a part boundary
    (every ``part_size`` records: a resumed run groups its images as the first run did). A
    failed record (image None) stays in the group it falls in."""
    group, shape, count = [], None, 0
    for position, item in enumerate(decoded):
        image = item[1]
        cut = image is not None and count > 0 and (image.shape != shape or count == batch_size)
        if group and (cut or position % part_size == 0):
            yield group
            group, count = [], 0
        group.append(item)
        if image is not None:
            shape, count = image.shape, count + 1
    if group:
        yield group


def as_stored(image_id: str, features: ImageFeatures, shape: tuple, factors: np.ndarray) -> ExtractedImage:
    """Features of a decoded image of ``shape`` [H, W(, 3)], with locations and size mapped back
    to the original image by ``factors`` [2] (y, x); the kept VLAD local features too."""
    scale = factors.astype(np.float32)
    kept = features.vlad_locals
    if kept is not None:
        features = replace(features, vlad_locals=replace(kept, locations=kept.locations * scale))
    features = replace(features, locations=features.locations * scale)
    height, width = round(shape[0] * factors[0]), round(shape[1] * factors[1])
    return ExtractedImage(image_id, features, (height, width))
