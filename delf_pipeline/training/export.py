"""Export a trained network as a DELG SavedModel, with its record and model card beside it.

The model folder then loads like any DELG export (``extract --model``, ``index build``,
``query``, ``serve``, the Kaggle kernel): the global descriptor is the trained head's (L2,
``dim`` wide), the local features are the backbone's stride-16 tap with the feature norm as
attention, reduced by a PCA learned here from training images, exactly as the ImageNet
EfficientNet-Lite0 backend makes them (:mod:`delf_pipeline.extractors.efficientnet_lite_export`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..extractors.delg_export import export_delg
from ..extractors.efficientnet_lite_export import PCA_DIM, RECORD_NAME, learn_projection
from ..extractors import efficientnet_lite as lite
from ..utils.artifacts import write_json_atomic
from .model import Network, delg_backbone

MODEL_CARD = "model_card.json"
PRESET = "efficientnet_lite0"  # the preset whose extract and rerank settings suit a trained Lite model
SAVED_MODEL_PARTS = ("variables", "assets", "fingerprint.pb", "saved_model.pb")  # saved_model.pb last


def export(network: Network, out: Path, *, pca_images: Iterable[np.ndarray], scales: Sequence[float],
           max_features: int, record: dict, card: dict) -> Path:
    """Write the SavedModel of ``network`` into the folder ``out`` (other files there are kept),
    then ``delf_pipeline_export.json`` (``record`` + geometry, PCA summary, preset) and ``model_card.json``.

    pca_images: RGB uint8 images [H, W, 3] (sized as extract will size them) whose local
    descriptors, taken at ``scales`` (``max_features`` per image), the PCA is learned from.
    """
    out = Path(out)
    projection, summary = learn_projection(network.backbone_weights(), pca_images, local_layer=network.local_layer,
                                           dim=PCA_DIM, whiten=False, scales=list(scales), max_features=max_features,
                                           variant=network.variant)
    staging = out / ".export"
    export_delg(staging, delg_backbone(network), local_projection=projection, overwrite=True,
                **lite.geometry(network.local_layer, network.variant))
    for name in SAVED_MODEL_PARTS:  # saved_model.pb arrives last: a loader never sees half a model
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        if (staging / name).exists():
            os.replace(staging / name, target)
    shutil.rmtree(staging)
    geometry = lite.geometry(network.local_layer, network.variant)
    full_record = {"model": f"efficientnet_{network.variant} trained by delf-pipeline train",
                   "local_layer": network.local_layer, "stride": geometry["stride"],
                   "receptive_field": geometry["receptive_field"], "preset": PRESET,
                   "global": f"GeM (learned p) -> linear -> BatchNorm -> L2, {network.dense.units}-d",
                   **summary, **record}
    write_json_atomic(out / RECORD_NAME, full_record)
    write_json_atomic(out / MODEL_CARD, {**card, "local_pca": summary})
    return out
