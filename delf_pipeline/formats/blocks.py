"""Query-side work in numbered blocks: each block is its own atomically written CSV.

A stage that works per query (shortlist, rerank) splits the sorted query ids into blocks
of ``block_size``. Block ``k`` belongs to shard ``k % N + 1`` of ``--shard I/N``. Finished
blocks are skipped, so a killed run resumes where it stopped, and N processes (or
machines sharing a folder) can each take a shard. When every block exists, they are
concatenated in order into the stage's CSV, which is therefore the same however the
work was split or interrupted.

Layout: ``OUT.csv`` (final) and ``OUT.csv.blocks/block-000012.csv`` (work in progress).
A block's first line records what it holds, ``# delf-block rows=N sha256=HEX`` (the digest
of the CSV text after that line, computed from the text in memory before it is written, in
the same atomic write). A block that fails the check is recomputed when it is this shard's
and refused, by name, when it is another shard's.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd

from ..utils.artifacts import (
    DamagedArtifact,
    ForeignContent,
    Layout,
    atomic_path,
    check_manifest,
    output_lock,
    remove_owned,
    remove_unfinished,
    shard_name,
)
from .tables import read_csv_frame

log = logging.getLogger("delf_pipeline.formats.blocks")


def blocks_dir(out_csv: Path) -> Path:
    return out_csv.with_name(out_csv.name + ".blocks")


BLOCK_HEADER = re.compile(rb"# delf-block rows=(\d+) sha256=([0-9a-f]{64})")
ID_COLUMNS = ("query_id", "index_id")
BLOCKS_LAYOUT = Layout("stage's blocks folder", ("manifest.json", "block-*.csv"))  # what --overwrite deletes


def remove_outputs(out_csv: Path) -> None:
    """Delete a stage CSV and its blocks, but not the lock files (``--overwrite``); ForeignContent,
    nothing deleted, when the CSV or the blocks folder holds what a stage did not write."""
    refuse_foreign_csv(out_csv)
    remove_owned(blocks_dir(out_csv), BLOCKS_LAYOUT)
    out_csv.unlink(missing_ok=True)


def refuse_foreign_csv(out_csv: Path) -> None:
    """ForeignContent when ``out_csv`` exists and is not a stage's table (its header starts with
    ``query_id,index_id,``): a user's file that the merge would replace."""
    if out_csv.is_symlink() or out_csv.exists() and not _stage_table(out_csv):
        raise ForeignContent(f"{out_csv} exists and was not made by delf_pipeline (not a shortlist or rerank "
                             "table): nothing is deleted or written; move it away or choose another --out")


def _stage_table(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.readline(256).startswith(",".join(ID_COLUMNS).encode() + b",")


@contextmanager
def claim_blocks(out_csv: Path, shard: tuple[int, int], what: str, manifest: dict, overwrite: bool) -> Iterator[None]:
    """Hold the lock of this shard of ``out_csv``'s blocks (one writer per shard, see
    :func:`output_lock`); inside it, ``overwrite`` starts from nothing and ``manifest`` is
    checked against the blocks' manifest (or written). A CSV or blocks folder holding what a
    stage did not write is refused (ForeignContent) with or without ``overwrite``."""
    with output_lock(blocks_dir(out_csv), shard_name(shard), what):
        if overwrite:
            remove_outputs(out_csv)
        refuse_foreign_csv(out_csv)
        check_manifest(blocks_dir(out_csv) / "manifest.json", manifest, what=what, layout=BLOCKS_LAYOUT)
        yield


def plan_blocks(queries: Sequence[str], block_size: int) -> list[list[str]]:
    """Sorted query ids cut into consecutive blocks of ``block_size``."""
    ordered = sorted(queries)
    return [ordered[i : i + block_size] for i in range(0, len(ordered), block_size)]


def block_path(out_csv: Path, number: int) -> Path:
    return blocks_dir(out_csv) / f"block-{number:06d}.csv"


def pending_blocks(out_csv: Path, blocks: list[list[str]], shard: tuple[int, int]) -> list[int]:
    """Numbers of this shard's blocks that are not written yet, or fail their check (those
    are deleted, with a warning, to be recomputed)."""
    index, count = shard
    return [k for k in range(len(blocks)) if k % count == index - 1 and not _usable(block_path(out_csv, k))]


def _usable(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        read_block(path)
    except DamagedArtifact as error:
        log.warning("%s; recomputing it", error)
        path.unlink()
        return False
    return True


def write_block(out_csv: Path, number: int, frame: pd.DataFrame) -> None:
    """Write one block atomically, its first line recording its row count and checksum."""
    body = frame.to_csv(index=False).encode("utf-8")
    header = f"# delf-block rows={len(frame)} sha256={hashlib.sha256(body).hexdigest()}\n".encode()
    with atomic_path(block_path(out_csv, number)) as tmp:
        tmp.write_bytes(header + body)


def read_block(path: Path) -> pd.DataFrame:
    """A block's rows, once its checksum and row count match its first line; else
    :class:`DamagedArtifact` naming ``path``."""
    head, _, body = path.read_bytes().partition(b"\n")
    found = BLOCK_HEADER.fullmatch(head)
    if found is None:
        raise DamagedArtifact(f"block {path} is damaged (no '# delf-block rows=N sha256=...' first line)")
    if hashlib.sha256(body).hexdigest().encode() != found[2]:
        raise DamagedArtifact(f"block {path} is damaged (its checksum does not match: cut short or changed)")
    frame = pd.read_csv(io.BytesIO(body), dtype={c: str for c in ID_COLUMNS}, keep_default_na=False)
    if len(frame) != int(found[1]):
        raise DamagedArtifact(f"block {path} is damaged ({len(frame)} rows, its first line says {int(found[1])})")
    return frame


def merge_blocks(out_csv: Path, num_blocks: int, columns: Sequence[str]) -> bool:
    """Concatenate all blocks into ``out_csv`` once every block exists; True when done.

    Every block is checked first: a damaged one (another shard's) is refused by name.
    """
    paths = [block_path(out_csv, k) for k in range(num_blocks)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        log.info("%s: %d of %d blocks still to do (other shards?)", out_csv.name, len(missing), num_blocks)
        return False
    try:
        frames = [read_block(p) for p in paths]
    except DamagedArtifact as error:
        raise DamagedArtifact(f"{error}: rerun the shard it belongs to, which recomputes it") from None
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))
    with atomic_path(out_csv) as tmp:
        merged.to_csv(tmp, index=False, columns=list(columns))
    return True


def run_blocks(
    out_csv: Path,
    queries: Sequence[str],
    block_size: int,
    shard: tuple[int, int],
    columns: Sequence[str],
    compute: Callable[[list[tuple[int, list[str]]]], None],
) -> Path:
    """Run ``compute`` on this shard's pending (number, query ids) blocks, then merge.

    ``compute`` must call :func:`write_block` for every block it is given.
    """
    blocks = plan_blocks(queries, block_size)
    todo = pending_blocks(out_csv, blocks, shard)
    if not todo:
        log.info("Skipping %s: all blocks of shard %d/%d are done", out_csv.name, *shard)
    else:
        _remove_unfinished_blocks(out_csv, todo)  # temporaries a killed run left for these blocks
        compute([(k, blocks[k]) for k in todo])
        _remove_unfinished_blocks(out_csv, todo)  # of cluster workers killed mid-write (their task ran again)
    merge_blocks(out_csv, len(blocks), columns)
    return out_csv


def _remove_unfinished_blocks(out_csv: Path, numbers: list[int]) -> None:
    for number in numbers:
        remove_unfinished(blocks_dir(out_csv), block_path(out_csv, number).name)


def read_table(path: Path, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read a stage CSV with string ids (ids such as ``0001`` keep their zeros); ValueError
    naming ``path`` when it cannot be parsed or lacks a ``required`` column."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found (is the stage that writes it finished for every shard?)")
    return read_csv_frame(path, (*ID_COLUMNS, "id"), required)
