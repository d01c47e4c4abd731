"""Tests of delf_pipeline.formats.blocks: numbered query blocks, shards, resuming, leftovers of a kill."""
from __future__ import annotations

import logging

import pandas as pd

from delf_pipeline.formats.blocks import (
    block_path,
    blocks_dir,
    read_table,
    run_blocks,
    write_block,
)

QUERIES = [f"q{i}" for i in range(7)]
COLUMNS = ("query_id", "rank")


def compute_into(out_csv, done: list[int]):
    """A stand-in for a stage: each block's queries with rank 1; block numbers recorded in ``done``."""
    def compute(blocks):
        for number, queries in blocks:
            done.append(number)
            write_block(out_csv, number, pd.DataFrame({"query_id": queries, "rank": 1}))
    return compute


def test_shards_cover_every_block_once_and_merge_in_order(tmp_path):
    out, done = tmp_path / "stage.csv", []
    run_blocks(out, QUERIES, 3, (1, 2), COLUMNS, compute_into(out, done))
    assert done == [0, 2] and not out.exists()  # block 1 belongs to shard 2/2
    run_blocks(out, QUERIES, 3, (2, 2), COLUMNS, compute_into(out, done))
    assert done == [0, 2, 1]
    assert read_table(out)["query_id"].tolist() == QUERIES


def test_temporary_files_a_kill_left_for_pending_blocks_are_removed(tmp_path, caplog):
    out, done = tmp_path / "stage.csv", []
    blocks_dir(out).mkdir()
    mine = blocks_dir(out) / f".{block_path(out, 0).name}.abc123.tmp"
    theirs = blocks_dir(out) / f".{block_path(out, 1).name}.def456.tmp"  # block 1: shard 2/2's
    for stale in (mine, theirs):
        stale.write_text("query_id,ra")
    with caplog.at_level(logging.INFO, logger="delf_pipeline"):
        run_blocks(out, QUERIES, 3, (1, 2), COLUMNS, compute_into(out, done))
    assert not mine.exists() and theirs.exists()
    assert f"removing {mine}" in caplog.text
    assert sorted(p.name for p in blocks_dir(out).iterdir()) == [
        theirs.name, block_path(out, 0).name, block_path(out, 2).name]
