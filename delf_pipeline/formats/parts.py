"""Writing a feature store part by part: ``parts/SHARD-pNNNNNN``, one atomic part per
``part_size`` results (see :mod:`.store` for what a part holds).

Shards write disjoint parts of one store. A resumed run numbers its parts after the ones
already there and removes its own unfinished temporaries, never another shard's (which may
be writing). Records already stored or recorded as failed are not pending.
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..utils.artifacts import remove_unfinished, select_shard, shard_name
from ..utils.progress import track
from .images import ErrorRecord, ImageError, ImageRecord
from .store import ExtractedImage, FeatureStore, write_part


def pending_records(out: Path, records: Sequence[ImageRecord], shard: tuple[int, int]) -> list[ImageRecord]:
    """Records of this shard that are neither stored in ``out`` nor recorded as failed."""
    finished = FeatureStore(out).finished_ids()
    return [r for r in select_shard(records, shard) if r.id not in finished]


def write_parts(out: Path, results: Iterator[ExtractedImage | ErrorRecord], count: int, *, part_size: int,
                dtype: str, shard: tuple[int, int], strict: bool, label: str) -> None:
    """Write ``count`` results in parts of ``part_size`` images, each written atomically, with
    a progress report named ``label``; descriptors stored as ``dtype``."""
    remove_unfinished(out / "parts", part_prefix(shard))  # this shard's only: others may be writing
    first = next_part_number(out, shard)
    results = track(results, count, f"{label} {shard[0]}/{shard[1]}")
    for number, start in enumerate(range(0, count, part_size), start=first):
        write_results(out, part_name(shard, number), islice(results, min(part_size, count - start)), dtype, strict)
    next(results, None)  # let the progress report finish (its last line comes after the last item)


def write_results(out: Path, name: str, results: Iterable[ExtractedImage | ErrorRecord], dtype: str,
                  strict: bool) -> None:
    """Write ``results`` as the part ``out/parts/name`` (atomically)."""
    extracted, errors = split_results(results, strict)
    write_part(out / "parts" / name, extracted, errors, dtype, local_dim(extracted))


def split_results(
    results: Iterable[ExtractedImage | ErrorRecord], strict: bool
) -> tuple[list[ExtractedImage], list[ErrorRecord]]:
    """(extracted images, errors) of ``results``; with ``strict`` the first error raises ImageError."""
    extracted, errors = [], []
    for result in results:
        if isinstance(result, ErrorRecord):
            if strict:
                raise ImageError(strict_failure(result))
            errors.append(result)
        else:
            extracted.append(result)
    return extracted, errors


def local_dim(extracted: list[ExtractedImage]) -> int:
    """The local descriptor dimension D shared by ``extracted`` (0 for none); ValueError if they differ."""
    dims = {im.features.descriptors.shape[1] for im in extracted}
    if len(dims) > 1:
        raise ValueError(f"local feature dimensionality is not consistent across images: {sorted(dims)}")
    return dims.pop() if dims else 0


def part_prefix(shard: tuple[int, int]) -> str:
    """The name every part of ``shard`` starts with: ``sIofN-p``."""
    return f"{shard_name(shard)}-p"


def part_name(shard: tuple[int, int], number: int) -> str:
    return f"{part_prefix(shard)}{number:06d}"


def next_part_number(out: Path, shard: tuple[int, int]) -> int:
    """One more than the highest part number of ``shard`` in ``out`` (0 for none)."""
    prefix = part_prefix(shard)
    numbers = [int(p.name[len(prefix):]) for p in (out / "parts").glob(f"{prefix}*") if p.is_dir()]
    return max(numbers, default=-1) + 1


def strict_failure(error: ErrorRecord) -> str:
    """The message of ``--strict`` stopping at the unusable image of ``error``."""
    return f"--strict: image {error.id!r} ({error.path}) failed: {error.reason}"
