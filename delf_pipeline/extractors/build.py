"""The extractor an ``extract`` settings section asks for, assembled from the backends.

Backends (``extract.backend``):

* ``rootsift`` (no weights at all): OpenCV SIFT + RootSIFT local features and a RootSIFT-VLAD
  global descriptor over a codebook learned from the index images;
* ``xfeat``: XFeat learned local features (64-d, weights fetched once with
  ``delf-pipeline weights fetch xfeat``) and a VLAD of them over a codebook learned the same way;
* ``savedmodel``: a DELF/DELG SavedModel exported by the official code (TF1 tensors or the
  TF2 export), from the path in ``extract.model``;
* ``hub``: the TF Hub DELF v1 module (local folder or hub handle).

With ``local_backend`` set (rootsift or xfeat) and a model ``backend``, the global descriptor
comes from the model and the local features from ``local_backend`` (a hybrid). With
``vlad_weight`` w > 0, a model's global descriptor is fused with the VLAD of the local features
of ``vlad_backend`` (default: ``local_backend``): ``[sqrt(1 - w) m, sqrt(w) v]`` of the
L2-normalised parts, whose inner product is ``(1 - w) m.m' + w v.v'`` (score fusion, unit
length). The stored local features are ``local_backend``'s, or the model's own when it is ""
(``vlad_backend`` then feeds the VLAD, and its local features are kept beside the model's as
``vlad_locals`` with ``keep_vlad_locals``: the cascade's learned matcher matches XFeat's). The
VLAD backends and the fused models need their codebook (``vlad_dim`` > 0: with the PCA that
reduces the VLAD): learning it is a step of the extract stage, which then calls :func:`build`
with it.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import ExtractSettings
from ..formats.features import ImageFeatures
from ..formats.images import ImageRecord
from .base import BatchExtractor, Extractor, extract_batch, mapped
from .efficientnet_lite_export import BUILTIN, builtin_model
from .views import ViewExtractor

log = logging.getLogger("delf_pipeline.extractors.build")

LOCAL_BACKENDS = ("rootsift", "xfeat")  # backends with their own local features and a VLAD global


def vlad_backend(conf: ExtractSettings) -> str:
    """The local backend whose VLAD the settings' global descriptor holds: ``backend`` for the
    VLAD backends, ``vlad_backend`` or else ``local_backend`` for a fused model (``vlad_weight``
    > 0), else "". ValueError for a fused model with neither, or with two different ones."""
    if conf.backend in LOCAL_BACKENDS:
        return conf.backend
    if conf.vlad_weight <= 0:
        return ""
    if conf.vlad_backend and conf.local_backend and conf.vlad_backend != conf.local_backend:
        raise ValueError(f"extract.vlad_backend={conf.vlad_backend!r} differs from extract.local_backend="
                         f"{conf.local_backend!r}: the VLAD is made of the stored local features or, with "
                         'local_backend "", of vlad_backend\'s beside the model\'s own')
    backend = conf.vlad_backend or conf.local_backend
    if not backend:
        raise ValueError(f"extract.vlad_weight={conf.vlad_weight} fuses the model's global descriptor with a VLAD: "
                         "set extract.vlad_backend (rootsift or xfeat) to say of which local features")
    return backend


def build(conf: ExtractSettings, codebook: np.ndarray | None = None, local: Extractor | None = None) -> Extractor:
    """The configured backend, loaded once; it keeps only global descriptors when
    ``local_features`` is false.

    codebook: the VLAD words [K, D] of the rootsift / xfeat backends (required there).
    local: that backend's local extractor when the caller already loaded it (to learn the codebook).
    """
    extractor = _assemble(conf, codebook, local)
    if conf.local_features:
        return extractor
    return mapped(extractor, ImageFeatures.without_local)


def _assemble(conf: ExtractSettings, codebook: np.ndarray | None, local: Extractor | None) -> Extractor:
    backend, local_backend, vlad_locals = conf.backend, conf.local_backend, vlad_backend(conf)
    if vlad_locals and codebook is None:
        fused_with = f" fused with the VLAD of {vlad_locals}" if backend not in LOCAL_BACKENDS else ""
        raise ValueError(f"the {backend} backend{fused_with} needs its VLAD codebook (the index store's codebook.npy)")
    if backend in LOCAL_BACKENDS:
        return vlad_extractor(local or local_extractor(conf, backend), codebook, conf.vlad_words)
    from .models import load_extractor

    model = load_extractor(conf)
    if vlad_locals:
        return fused(model, local or local_extractor(conf, vlad_locals), codebook, conf.vlad_words,
                     conf.vlad_weight, keep_model_locals=not local_backend,
                     keep_vlad_locals=not local_backend and conf.keep_vlad_locals)
    if local_backend:
        return with_locals(model, local_extractor(conf, local_backend))
    return model


def local_extractor(conf: ExtractSettings, name: str) -> Extractor:
    """Local features only (no global descriptor) of the local backend ``name`` (rootsift or
    xfeat), as the config asks. XFeat's weights come from ``xfeat_weights`` or the cache."""
    if name == "rootsift":
        from .rootsift import extract_rootsift

        return lambda image: extract_rootsift(image, conf.max_features, conf.affine_tilts)
    from . import weights, xfeat

    path = weights.locate("xfeat", conf.xfeat_weights or None)
    return xfeat.XFeatExtractor(xfeat.load_weights(path), conf.max_features, conf.xfeat_threshold,
                                tuple(conf.xfeat_scales))


def view_extractor(conf: ExtractSettings, tilts: Sequence[float]) -> ViewExtractor:
    """The :class:`.views.ViewExtractor` of a query extracted with ``conf`` (its store's recorded
    settings): that store's local backend (``local_backend`` or ``backend``: rootsift or xfeat,
    ValueError otherwise) and decoding, ``max_features`` per view; rootsift's own
    ``affine_tilts`` are not applied on top of the views."""
    name = conf.local_backend or conf.backend
    if name not in LOCAL_BACKENDS:
        raise ValueError(f"rerank.cascade = 'views' extracts rootsift or xfeat local features on the query's views; "
                         f"the query store holds {name!r} ones (extract.backend / extract.local_backend)")
    local = replace(conf, affine_tilts=[1.0]) if name == "rootsift" else conf
    return ViewExtractor(lambda: local_extractor(local, name), tilts, conf.max_image_size, decode_mode(conf))


def with_locals(model: Extractor, local: Extractor) -> BatchExtractor:
    """``local``'s features with ``model``'s global descriptor; batched where each of them is."""
    def batch(images: Sequence[np.ndarray]) -> list[ImageFeatures]:
        wholes = extract_batch(model, images)
        return [replace(features, global_descriptor=whole.global_descriptor)
                for features, whole in zip(extract_batch(local, images), wholes)]

    return BatchExtractor(batch)


def fused(model: Extractor, local: Extractor, codebook: np.ndarray, words: int, weight: float,
          keep_model_locals: bool = False, keep_vlad_locals: bool = False) -> BatchExtractor:
    """``local``'s features (the model's with ``keep_model_locals``, then ``local``'s as their
    ``vlad_locals`` with ``keep_vlad_locals``) with the global
    ``[sqrt(1 - weight) m, sqrt(weight) v]``: ``m`` the model's global descriptor and ``v`` the
    VLAD of ``local``'s descriptors over ``codebook`` (its first ``words`` rows the words), both
    L2-normalised; batched where each of them is."""
    from ..formats.features import l2_normalize
    from .vlad import vlad_global

    def batch(images: Sequence[np.ndarray]) -> list[ImageFeatures]:
        wholes = extract_batch(model, images)
        out = []
        for features, whole in zip(extract_batch(local, images), wholes):
            parts = (np.sqrt(1.0 - weight) * l2_normalize(whole.global_descriptor),
                     np.sqrt(weight) * vlad_global(features.descriptors, codebook, words))
            kept = whole if keep_model_locals else features
            if keep_model_locals and keep_vlad_locals:
                kept = replace(kept, vlad_locals=replace(features, global_descriptor=None))
            out.append(replace(kept, global_descriptor=np.concatenate(parts).astype(np.float32)))
        return out

    return BatchExtractor(batch)


def vlad_extractor(local: Extractor, codebook: np.ndarray, words: int | None = None) -> BatchExtractor:
    """``local`` features + VLAD global over ``codebook`` (its first ``words`` rows the words [K, D],
    then its reduction if any; default: all rows are words); batched as ``local`` is."""
    from .vlad import vlad_global

    count = words or len(codebook)
    return mapped(local, lambda features: replace(features, global_descriptor=vlad_global(features.descriptors,
                                                                                         codebook, count)))


def decode_mode(conf: ExtractSettings) -> str:
    """How images are decoded for the configured backend: ``"L"`` (grey) for the pure
    RootSIFT backend, which uses no colour, else ``"RGB"`` (XFeat averages the three channels,
    which is not the luma that grey decoding gives)."""
    return "L" if conf.backend == "rootsift" else "RGB"


def resolve_model(conf: ExtractSettings, records: Sequence[ImageRecord]) -> ExtractSettings:
    """``conf`` with ``model = "builtin:efficientnet_lite0"`` replaced by the folder of its export,
    which is made on first use with the local PCA learned from ``records`` (the index images
    about to be extracted); any other model is left as it is."""
    if not conf.model.startswith("builtin:"):
        return conf
    if conf.model != BUILTIN:
        raise ValueError(f"unknown built-in model extract.model={conf.model!r}; the built-in one is {BUILTIN!r}")
    model = builtin_model(conf, records)
    log.info("%s is %s; extract the queries of these index images with --set extract.model=%s (its PCA was "
             "learned from them; `delf-pipeline run` does this itself)", BUILTIN, model, model)
    return replace(conf, model=str(model))


def recorded_model(conf: ExtractSettings, store_manifest: dict, copy: Path | None = None) -> ExtractSettings:
    """``conf`` with a built-in model replaced by the export that the feature store of
    ``store_manifest`` was made with (its local PCA learned from that store's images), for
    photos added to it or searched against it: the recorded folder, else ``copy`` (the export an
    index carries, for an index moved to another machine); any other model is left as it is."""
    if not conf.model.startswith("builtin:"):
        return conf
    model = Path(store_manifest["settings"]["model"])
    if not (model / "saved_model.pb").is_file() and copy is not None and (copy / "saved_model.pb").is_file():
        model = copy
    if not (model / "saved_model.pb").is_file():
        raise FileNotFoundError(f"{model}, the {conf.model} export the index store was made with (its PCA learned "
                                f"from the index images), is missing: rebuild the index on this machine")
    return replace(conf, model=str(model))
