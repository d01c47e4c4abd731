"""Derived index stores: the index's global descriptors whitened (PCA or supervised by the
labels) or augmented (DBA, plain or supervised), each written once as a new global-only store
under ``INDEX_STORE/derived/NAME-FINGERPRINT/`` (a whitening keeps ``whitening.npz`` there).

The index store's own descriptors are never changed. The fingerprint covers the settings, the
index ids, the descriptor space (:func:`global_space`) and the labels, so a changed input makes
a new folder; a store being made by another process is waited for (``made_once``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import ShortlistSettings
from ..formats.features import ImageFeatures
from ..formats.store import ExtractedImage, FeatureStore, write_part
from ..retrieval.search import MatMul, search_blocks
from ..utils.artifacts import atomic_path, fingerprint, load_array, made_once, write_json_atomic
from .expansion import augment_database, supervised_dba
from .whitening import Whitening, learn_pca_whitening, learn_supervised_whitening

log = logging.getLogger("delf_pipeline.descriptors.derived")

DERIVED_PART_ROWS = 65536  # index rows per part of a derived (whitened / augmented) store


def prepare_index(index: FeatureStore, conf: ShortlistSettings, labels: dict[str, str] | None,
                  matmul: MatMul) -> tuple[FeatureStore, Whitening | None]:
    """The store to search (the index itself, or its whitened / augmented copy, made once) and
    the whitening to apply to queries (None without whitening)."""
    searched, whitening = index, None
    if conf.whitening:
        settings = {key: value for key, value in conf.items() if key.startswith("whitening")}
        folder = _derived_folder(index, "whitened", settings, labels if conf.whitening == "supervised" else None)
        with made_once(folder) as to_make:
            if to_make:
                learned = learn_whitening(index, conf, labels)
                _write_derived(folder, settings, index.iter_global(DERIVED_PART_ROWS), learned.apply, learned)
        searched, whitening = FeatureStore(folder), Whitening.load(folder / "whitening.npz")
    if conf.dba:
        settings = {"source": searched.path.name, **{k: conf[k] for k in ("dba", "dba_top_n", "dba_alpha")}}
        folder = _derived_folder(index, "dba", settings, labels if conf.dba == "supervised" else None)
        with made_once(folder) as to_make:
            if to_make:
                _write_derived(folder, settings, augmented_chunks(searched, conf, labels, matmul), None, None)
        searched = FeatureStore(folder)
    return searched, whitening


def learn_whitening(index: FeatureStore, conf: ShortlistSettings, labels: dict[str, str] | None) -> Whitening:
    """Whitening learned on up to ``whitening_images`` index descriptors (sampled with seed 0)."""
    ids = index.ids
    if len(ids) > conf.whitening_images:
        rows = np.sort(np.random.default_rng(0).choice(len(ids), conf.whitening_images, replace=False))
        ids = [ids[r] for r in rows]
    matrix = index.global_matrix(ids)
    log.info("learning %s whitening on %d index descriptors", conf.whitening, len(ids))
    if conf.whitening == "pca":
        return learn_pca_whitening(matrix, conf.whitening_dim, conf.whitening_shrinkage)
    names = np.array([labels.get(i, "") for i in ids], dtype=object)
    return learn_supervised_whitening(matrix, names, conf.whitening_dim, conf.whitening_shrinkage)


def augmented_chunks(store: FeatureStore, conf: ShortlistSettings, labels: dict[str, str] | None,
                     matmul: MatMul) -> Iterator[tuple[list[str], np.ndarray]]:
    """DBA of every index descriptor, in store order, as (ids, [n, G]) chunks.

    Plain: each image's ``dba_top_n`` nearest index images (itself included) by the exact
    search. Supervised: nearest among the images of its own label (needs all descriptors in
    memory, [N, G] float32).
    """
    if conf.dba == "supervised":
        ids = store.ids
        names = np.array([labels.get(i, "") for i in ids], dtype=object)
        matrix = supervised_dba(store.global_matrix(), names, conf.dba_top_n, conf.dba_alpha)
        for start in range(0, len(ids), DERIVED_PART_ROWS):
            yield ids[start:start + DERIVED_PART_ROWS], matrix[start:start + DERIVED_PART_ROWS]
        return
    for ids, chunk in store.iter_global(DERIVED_PART_ROWS):
        all_ids, [(rows, sims)] = search_blocks([chunk], store, conf.dba_top_n, conf.chunk_rows, matmul)
        neighbours = store.global_matrix([all_ids[r] for r in rows.reshape(-1)]).reshape(*rows.shape, -1)
        yield ids, augment_database(neighbours, sims, conf.dba_alpha)


def _derived_folder(index: FeatureStore, kind: str, settings: dict, labels: dict[str, str] | None) -> Path:
    """INDEX/derived/KIND-FINGERPRINT of the settings, index ids, descriptor space and labels."""
    key = {"settings": settings, "ids": fingerprint({"ids": index.ids}), "space": global_space(index),
           "labels": labels_fingerprint(index, labels) if labels is not None else None}
    return index.path / "derived" / f"{kind}-{fingerprint(key)}"


def _write_derived(folder: Path, settings: dict, chunks, transform, whitening: Whitening | None) -> None:
    """A global-only store of ``transform(chunk)`` for each (ids, chunk), written atomically."""
    log.info("writing %s", folder)
    dtype = "float32"
    with atomic_path(folder, is_dir=True) as tmp:
        if whitening is not None:
            whitening.save(tmp / "whitening.npz")
        for number, (ids, chunk) in enumerate(chunks):
            vectors = transform(chunk) if transform else chunk
            images = [ExtractedImage(i, _global_only(v), (0, 0)) for i, v in zip(ids, vectors)]
            write_part(tmp / "parts" / f"p{number:06d}", images, [], dtype, 0)
        (tmp / "parts").mkdir(exist_ok=True)
        write_json_atomic(tmp / "manifest.json", {"derived": settings})


def _global_only(vector: np.ndarray) -> ImageFeatures:
    empty = np.zeros(0, np.float32)
    return ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32), empty, empty, vector)


def labels_fingerprint(index: FeatureStore, labels: dict[str, str] | None) -> str:
    return fingerprint({"labels": [(labels or {}).get(i, "") for i in index.ids]})


def global_space(store: FeatureStore) -> str:
    settings = dict(store.manifest()["settings"])
    settings.pop("local_features", None)  # whether local features are stored does not change the globals
    codebook = store.path / "codebook.npy"
    if codebook.exists():
        settings["codebook"] = fingerprint({"words": load_array(codebook).tobytes().hex()})
    return fingerprint(settings)
