"""Staleness checks cannot miss a key: every key of every artifact-making section, changed
alone, makes the stage refuse the existing artifact naming that key, unless the settings table
marks it runtime-only (it changes how the artifact is computed, not what it holds).

The keys are read from the settings table, so a key added later is covered without touching
this file.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.synthetic_stores import local_features, random_unit_rows, shortlist_frame, write_store

from delf_pipeline import extract, rerank, shortlist
from delf_pipeline.config import SETTINGS, fingerprinted, load_config, parse_value
from delf_pipeline.utils.artifacts import check_manifest, settings_manifest

# the sections whose stage writes a resumable artifact; predict and calibrate rewrite their
# output on every run (nothing is reused), so they have no staleness check to miss
STAGES = ("extract", "shortlist", "rerank")
KEYS = [(section, key) for section in STAGES for key in SETTINGS[section]]


def other_value(section: str, key: str, value):
    """A different value the table accepts, of the same type as ``value``."""
    spec = SETTINGS[section][key]
    if spec.choices:
        return next(name for name in spec.choices if name != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        step = 1 if isinstance(value, int) else (spec.high - value) / 2
        return parse_value(section, key, value + step if value + step <= spec.high else value - step)
    if isinstance(value, str):
        return value + "x"
    return [*value, 2.0] if spec.item_kind is float else [*value, 1]


def test_the_runtime_keys_are_few_and_known():
    runtime = {(s, k) for s, keys in SETTINGS.items() for k, spec in keys.items() if spec.runtime}
    assert runtime == {("extract", "part_size"), ("shortlist", "chunk_rows"), ("shortlist", "device")}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """One finished artifact per stage, and a function rerunning that stage with a config."""
    root = tmp_path_factory.mktemp("made")
    # xfeat: a store in seconds (the default preset exports its model on first use)
    config = load_config("xfeat", overrides=["extract.vlad_words=4", "extract.max_image_size=128",
                                             "rerank.num_to_rerank=2"])
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (96, 96), np.uint8)).save(photos / f"p{i}.png")
    features = {f"i{n}": local_features(random_unit_rows(6, 2, n) * 50 + 60, random_unit_rows(6, 8, n + 9),
                                        random_unit_rows(1, 4, n)[0]) for n in range(4)}
    queries = write_store(root / "q", dict(list(features.items())[:2]), part_size=2, local_dim=8)
    index = write_store(root / "i", features, part_size=2, local_dim=8)
    shortlist_frame({"i0": [("i1", 0.5), ("i2", 0.4)], "i1": [("i0", 0.5), ("i3", 0.1)]}).to_csv(
        root / "short.csv", index=False)
    reruns = {
        "extract": lambda c: extract.run(c, photos, root / "store"),
        "shortlist": lambda c: shortlist.run(c, index, queries, root / "shortlist.csv"),
        "rerank": lambda c: rerank.run(c, root / "short.csv", queries, index, root / "rerank.csv", index_labels={},
                                       query_images=photos),  # what a cascade needs, so its keys reach the check
    }
    for run in reruns.values():
        run(config)
    return {"config": config, "reruns": reruns, "root": root}


@pytest.mark.parametrize("section, key", KEYS, ids=[f"{s}.{k}" for s, k in KEYS])
def test_a_changed_key_is_refused_naming_it_unless_runtime_only(made, section, key):
    config = copy.deepcopy(made["config"])
    config[section][key] = other_value(section, key, config[section][key])
    if SETTINGS[section][key].runtime:
        made["reruns"][section](config)  # reused as it is
        return
    with pytest.raises(ValueError, match=rf"settings\.{key}: was .*--overwrite"):
        made["reruns"][section](config)


def test_rerank_fingerprints_every_shortlist_row_not_the_head():
    candidates = {f"q{q:04d}": [(f"i{i}", 0.5 - i / 10) for i in range(3)] for q in range(1000)}
    table = shortlist_frame(candidates)
    changed = table.copy()
    changed.loc[len(changed) - 1, "score"] = 0.0  # the last of 3000 rows
    conf = load_config().rerank
    assert rerank.rerank_manifest(conf, table) != rerank.rerank_manifest(conf, changed)
    assert rerank.rerank_manifest(conf, table) == rerank.rerank_manifest(conf, table.copy())


def test_rerank_refuses_a_shortlist_with_another_row(made, tmp_path):
    root = made["root"]
    changed = tmp_path / "short.csv"
    changed.write_text((root / "short.csv").read_text().replace("i3,2,0.1", "i3,2,0.2"))
    with pytest.raises(ValueError, match="shortlist_content: was .*--overwrite"):
        rerank.run(made["config"], changed, root / "q", root / "i", root / "rerank.csv")


def test_a_fingerprint_covers_the_whole_section_minus_its_runtime_keys():
    config = load_config()
    manifest = settings_manifest(fingerprinted(config.shortlist))
    assert set(manifest["settings"]) == set(SETTINGS["shortlist"]) - {"chunk_rows", "device"}
    config.shortlist.chunk_rows = 7
    assert settings_manifest(fingerprinted(config.shortlist)) == manifest
    config.shortlist.top_k = 7
    assert settings_manifest(fingerprinted(config.shortlist))["fingerprint"] != manifest["fingerprint"]


def test_a_manifest_of_an_older_version_is_refused_saying_so(tmp_path: Path):
    old = {"top_k": 100, "index_images": 3}
    check_manifest(tmp_path / "manifest.json", old, what="shortlist")
    with pytest.raises(ValueError) as error:
        check_manifest(tmp_path / "manifest.json", {"settings": {"top_k": 100}, "index_images": 3}, "shortlist")
    assert "settings: not recorded (older manifest), now {'top_k': 100}" in str(error.value)
