"""Tests of settings: presets, inheritance, overrides, errors, the printed config."""
from __future__ import annotations

import re

import pytest

from delf_pipeline.cli import main as cli_main
from delf_pipeline.config import (
    DEFAULTS,
    ConfigError,
    list_presets,
    load_config,
    parse_override,
    to_toml,
)


def test_every_preset_loads_and_names_every_section():
    for name in list_presets():
        config = load_config(name)
        assert set(DEFAULTS) <= set(config) and config["preset"] == name


def test_reference_presets_hold_the_official_values():
    # values from DESIGN.md's table of official defaults
    delf = load_config("delf_v1_hub")
    assert delf["extract"]["image_scales"] == [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0]
    assert delf["extract"]["score_threshold"] == 100.0
    assert (delf["rerank"]["matcher"], delf["rerank"]["match_threshold"]) == ("kdtree", 0.8)
    assert (delf["rerank"]["residual_threshold"], delf["rerank"]["max_trials"]) == (20.0, 1000)
    assert load_config("delg_gldv1")["extract"]["global_scale_indices"] == [3, 4, 5]
    assert load_config("delg_gldv2")["extract"]["score_threshold"] == 454.6
    kaggle = load_config("kaggle2020_baseline")
    assert kaggle["rerank"]["verifier"] == "degensac" and kaggle["rerank"]["residual_threshold"] == 4.0
    assert (kaggle["rerank"]["max_inlier_score"], kaggle["predict"]["top_k"]) == (70, 5)


def test_base_preset_is_merged_first():
    hybrid, sift = load_config("efficientnet_lite0_rootsift"), load_config("sift_default")
    assert hybrid["rerank"] == sift["rerank"]  # inherited
    assert hybrid["extract"]["backend"] == "savedmodel" and hybrid["extract"]["local_backend"] == "rootsift"


def test_inheritance_loop_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "a.toml").write_text('base = "b"\n')
    (tmp_path / "b.toml").write_text('base = "a"\n')
    monkeypatch.setattr("delf_pipeline.config.presets_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match="loop: a -> b -> a"):
        load_config("a")


@pytest.mark.parametrize("text, expected", [
    ("rerank.max_trials=500", {"rerank": {"max_trials": 500}}),
    ("rerank.verifier=magsac", {"rerank": {"verifier": "magsac"}}),
    ('extract.model="/a b/c"', {"extract": {"model": "/a b/c"}}),
    ("extract.image_scales=[0.5, 1.0]", {"extract": {"image_scales": [0.5, 1.0]}}),
    ("shortlist.exclude_same_id=true", {"shortlist": {"exclude_same_id": True}}),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("override, message", [
    ("rerank.nope=1", "unknown key rerank.nope"),
    ("nope.key=1", "unknown section 'nope'"),
    ("rerank.max_trials=many", "max_trials must be int"),
    ("max_trials=5", "must look like section.key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_int_given_for_a_float_key_is_accepted():
    assert load_config(overrides=["rerank.residual_threshold=12"])["rerank"]["residual_threshold"] == 12.0


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="available: .*sift_default"):
        load_config("nope")


def test_config_command_prints_every_key_with_its_comment(capsys):
    assert cli_main(["config", "--preset", "kaggle2020_baseline", "--set", "rerank.num_to_rerank=3"]) == 0
    text = capsys.readouterr().out
    assert "num_to_rerank = 3  # shortlisted candidates verified per query" in text
    keys = [line for line in text.splitlines() if re.match(r"^\w+ = ", line)]
    assert len(keys) == sum(len(section) for section in DEFAULTS.values())
    assert all(" # " in line for line in keys)  # every key has its comment
    assert to_toml(load_config()).startswith("# preset: sift_default")


def test_config_list(capsys):
    assert cli_main(["config", "--list"]) == 0
    assert capsys.readouterr().out.split() == list_presets()

