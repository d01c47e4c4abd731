"""The VLAD codebook of a feature store (rootsift and xfeat backends, and a model's global fused
with the VLAD of rootsift or xfeat locals: ``extract.vlad_weight``), learned once from a sample
of the index images as a resumable step that the extract stage takes before it extracts
(:func:`prepare_codebook`).

The step is an ordinary store writer: the sample's local features are extracted, in parts,
into ``OUT/codebook-sample-IofN`` (float32, as the extraction computes VLAD); the codebook is
learned from them (with ``extract.vlad_dim``, also the PCA that reduces their VLADs,
:func:`.vlad.learn_reduction`, packed after the words) and saved as ``OUT/codebook.npy``; then,
for a VLAD backend, this shard's sample images are written as ordinary parts of ``OUT`` with
their VLAD (the first parts: store order is part order), so the extraction that follows skips
them like any finished image (a fused hybrid extracts them again: its global needs the model),
and the sample store is removed. Every shard learns the same codebook.

The SHA-256 of ``codebook.npy`` is recorded in the store's manifest.json (``codebook_sha256``)
once it is saved, and checked whenever it is read: every global descriptor of the store
depends on it, so a codebook of the same shape but other values is refused by name. (A store
made before this record is read unchecked.)
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..config import ExtractSettings
from ..formats.images import ImageRecord
from ..formats.parts import pending_records, write_parts
from ..formats.store import ExtractedImage, FeatureStore, remove_store
from ..utils.artifacts import DamagedArtifact, atomic_path, load_array, read_json, rebuild_with, write_json_atomic
from .base import Extractor
from .build import LOCAL_BACKENDS, local_extractor, vlad_backend
from .stream import extract_records
from .vlad import learn_codebook, learn_reduction, pack_codebook, vlad, vlad_global

log = logging.getLogger("delf_pipeline.extractors.codebook")


def prepare_codebook(out: Path, records: Sequence[ImageRecord], conf: ExtractSettings, shard: tuple[int, int],
                     given: str | Path | None) -> tuple[np.ndarray | None, Extractor | None]:
    """(codebook [K, D] (and its reduction, :mod:`.vlad`), the loaded local extractor) of the store
    ``out``, or (None, None) for settings without a VLAD. The codebook is ``given`` (copied into
    ``out``), else ``out/codebook.npy``, else learned by :func:`learn_step` from ``records`` (all of
    the index); a killed run's step is finished first."""
    backend = vlad_backend(conf)
    if not backend:
        return None, None
    local = local_extractor(conf, backend)
    words = stored_codebook(out, given)
    if words is not None and _recorded_checksum(out) is None:
        _record_checksum(out)  # a run killed between saving the codebook and recording it
    if words is None or sample_store(out, shard).is_dir():  # to learn, or a killed run's step to finish
        words = learn_step(out, records, conf, shard, words, local)
    return words, local


def stored_codebook(out: Path, given: str | Path | None = None) -> np.ndarray | None:
    """The store's VLAD codebook [K, D], copied from ``given`` if set; None if it has none yet.
    DamagedArtifact when it does not match the checksum recorded in the store's manifest."""
    path = out / "codebook.npy"
    if path.exists():
        _check_checksum(out)
    if given is not None:
        given_words = load_array(Path(given))
        if path.exists() and not np.array_equal(load_array(path), given_words):
            raise ValueError(f"{out} was built with another codebook than {given}; use {rebuild_with()}")
        if not path.exists():
            _save_atomic(path, given_words)
            _record_checksum(out)
        return given_words
    return load_array(path) if path.exists() else None


CHECKSUM_KEY = "codebook_sha256"  # in the store's manifest.json


def _recorded_checksum(out: Path) -> str | None:
    manifest = read_json(out / "manifest.json") if (out / "manifest.json").is_file() else None
    return manifest.get(CHECKSUM_KEY) if isinstance(manifest, dict) else None


def _record_checksum(out: Path) -> None:
    """Record the SHA-256 of ``out/codebook.npy`` in ``out/manifest.json`` (a writer, under its lock)."""
    if (out / "manifest.json").is_file():
        manifest = read_json(out / "manifest.json")
        write_json_atomic(out / "manifest.json", {**manifest, CHECKSUM_KEY: _sha256(out / "codebook.npy")})


def _check_checksum(out: Path) -> None:
    recorded = _recorded_checksum(out)
    if recorded is not None and _sha256(out / "codebook.npy") != recorded:
        raise DamagedArtifact(f"{out / 'codebook.npy'} does not match the checksum recorded in {out / 'manifest.json'} "
                              "(changed after the store was made; its global descriptors were computed with the "
                              f"recorded one): put that one back, or rebuild the store with {rebuild_with()}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def learn_step(out: Path, records: Sequence[ImageRecord], conf: ExtractSettings, shard: tuple[int, int],
               words: np.ndarray | None, local: Extractor) -> np.ndarray:
    """Learn the VLAD codebook [K, D] of the store ``out`` with the local extractor ``local``
    (see the module docstring), unless a killed run already saved it (``words``)."""
    sample_out = sample_store(out, shard)
    sample = codebook_sample(records, conf)
    sample_conf = replace(conf, descriptor_dtype="float32")
    for folder in (out, sample_out):
        (folder / "parts").mkdir(parents=True, exist_ok=True)
    todo = pending_records(sample_out, sample, (1, 1))
    write_parts(sample_out, extract_records(todo, local, sample_conf), len(todo), part_size=conf.part_size,
                dtype="float32", shard=(1, 1), strict=False, label="codebook sample")
    store = FeatureStore(sample_out)
    words = _learn(store, conf, out) if words is None else words
    mine = [r for r in pending_records(out, records, shard) if r.id in store and conf.backend in LOCAL_BACKENDS]
    write_parts(out, _with_vlad(store, mine, words, conf), len(mine), part_size=conf.part_size,
                dtype=conf.descriptor_dtype, shard=shard, strict=False, label="codebook sample to the store")
    remove_store(sample_out)
    return words


def remove_finished_sample(out: Path, shard: tuple[int, int]) -> None:
    """Remove this shard's sample store when every image of the shard is in the store: what a run
    killed while removing it (the step's last act) left."""
    sample = sample_store(out, shard)
    if sample.is_dir():
        log.info("removing %s, left by an interrupted run", sample)
        remove_store(sample)


def sample_store(out: Path, shard: tuple[int, int]) -> Path:
    """The folder of this shard's codebook sample store."""
    return out / f"codebook-sample-{shard[0]}of{shard[1]}"


def codebook_sample(records: Sequence[ImageRecord], conf: ExtractSettings) -> list[ImageRecord]:
    """A fixed, evenly spaced subset of *all* records (not of one shard), so every shard
    process learns the identical codebook."""
    step = max(1, len(records) // max(1, conf.codebook_images))
    return list(records[::step])[: conf.codebook_images]


def _learn(sample: FeatureStore, conf: ExtractSettings, out: Path) -> np.ndarray:
    """k-means codebook [K, D] of the sample store's descriptors (and, with ``vlad_dim``, the PCA
    of the sample's VLADs packed after it), saved as ``out/codebook.npy``."""
    log.info("learning a %d-word VLAD codebook from %d images", conf.vlad_words, len(sample))
    descriptors = [sample.features(image_id).descriptors for image_id in sample.ids]
    if not any(len(d) for d in descriptors):
        errors = sample.errors()
        first = f" (first: {errors[0].path}: {errors[0].reason})" if errors else ""
        raise ValueError(f"no local features to learn the VLAD codebook of {out} from: none of the "
                         f"{len(sample) + len(errors)} sampled images could be used{first}")
    words = learn_codebook(np.concatenate(descriptors), conf.vlad_words, conf.seed)
    if conf.vlad_dim:
        mean, axes = learn_reduction(np.stack([vlad(d, words) for d in descriptors]), conf.vlad_dim)
        log.info("VLAD reduced from %d to %d dimensions by a PCA of the %d sample images", words.size, len(axes),
                 len(descriptors))
        words = pack_codebook(words, mean, axes)
    _save_atomic(out / "codebook.npy", words)
    _record_checksum(out)
    return words


def _with_vlad(sample: FeatureStore, records: Sequence[ImageRecord], words: np.ndarray,
               conf: ExtractSettings) -> Iterator[ExtractedImage]:
    """The sample store's images ``records`` as the extraction would store them: with their VLAD."""
    for record in records:
        features = sample.features(record.id)
        features = replace(features, global_descriptor=vlad_global(features.descriptors, words, conf.vlad_words))
        yield ExtractedImage(record.id, features if conf.local_features else features.without_local(),
                             sample.size(record.id))


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
