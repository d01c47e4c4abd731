"""Tests of settings: presets, inheritance, overrides, errors, the printed config."""
from __future__ import annotations

import re

import pytest

from delf_pipeline.cli import main as cli_main
from delf_pipeline.config import (
    CHECKS,
    COMMENTS,
    DEFAULT_PRESET,
    DEFAULTS,
    ConfigError,
    list_presets,
    load_config,
    parse_override,
    to_toml,
    tomllib,
)
from delf_pipeline.verification.pairs import MODES


def test_every_preset_loads_and_names_every_section():
    for name in list_presets():
        config = load_config(name)
        assert set(DEFAULTS) <= set(config) and config["preset"] == name


def test_reference_presets_hold_the_official_values():
    # values from docs/design.md's table of reference defaults
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
    assert keys[0] == 'preset = "kaggle2020_baseline"'
    assert len(keys[1:]) == sum(len(section) for section in DEFAULTS.values())
    assert all(" # " in line for line in keys[1:])  # every key has its comment
    assert to_toml(load_config()).startswith(f'preset = "{DEFAULT_PRESET}"')


def test_comments_are_data_for_every_key():
    assert set(COMMENTS) == {(s, k) for s, keys in DEFAULTS.items() for k in keys}
    assert all(COMMENTS.values())


def test_printed_config_loads_back_to_the_same_settings(tmp_path):
    config = load_config("kaggle2020_baseline", overrides=["rerank.num_to_rerank=3"])
    (tmp_path / "saved.toml").write_text(to_toml(config))
    assert load_config(config_file=tmp_path / "saved.toml") == config


def test_a_config_file_is_layered_over_the_default_preset(tmp_path, capsys):
    (tmp_path / "f.toml").write_text("[predict]\ntop_k = 7\n")
    assert cli_main(["config", "--config", str(tmp_path / "f.toml")]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    default = load_config()
    assert printed["preset"] == DEFAULT_PRESET and printed["predict"]["top_k"] == 7
    assert printed["rerank"] == default["rerank"]  # mutual + msac_affine, 20 candidates: not kdtree/skimage
    assert printed["extract"] == default["extract"]


def test_a_config_file_may_name_its_preset(tmp_path):
    (tmp_path / "f.toml").write_text('preset = "kaggle2020_baseline"\n[predict]\ntop_k = 7\n')
    config = load_config(config_file=tmp_path / "f.toml")
    assert config["preset"] == "kaggle2020_baseline" and config["predict"]["top_k"] == 7
    assert config["rerank"] == load_config("kaggle2020_baseline")["rerank"]
    assert load_config("delg_gldv2", tmp_path / "f.toml")["preset"] == "delg_gldv2"  # --preset wins


def test_the_default_rerank_settings_are_the_official_mode():
    assert {key: DEFAULTS["rerank"][key] for key in MODES["official"]} == MODES["official"]


INVALID = [
    ("extract.backend=nope", "extract.backend"),
    ("extract.local_backend=hub", "extract.local_backend"),
    ("extract.descriptor_dtype=int8", "extract.descriptor_dtype"),
    ("extract.image_scales=[]", "extract.image_scales"),
    ("extract.image_scales=[0.5, -1.0]", "extract.image_scales"),
    ("extract.global_scale_indices=[-1]", "extract.global_scale_indices"),
    ("extract.max_image_size=-1", "extract.max_image_size"),
    ("extract.max_features=0", "extract.max_features"),
    ("extract.affine_tilts=[0.5]", "extract.affine_tilts"),
    ("extract.vlad_words=0", "extract.vlad_words"),
    ("extract.codebook_images=0", "extract.codebook_images"),
    ("extract.part_size=0", "extract.part_size"),
    ("extract.batch_size=0", "extract.batch_size"),
    ("extract.xfeat_threshold=1.0", "extract.xfeat_threshold"),
    ("extract.xfeat_scales=[0.0]", "extract.xfeat_scales"),
    ("shortlist.top_k=0", "shortlist.top_k"),
    ("shortlist.chunk_rows=0", "shortlist.chunk_rows"),
    ("shortlist.device=tpu", "shortlist.device"),
    ("shortlist.whitening=zca", "shortlist.whitening"),
    ("shortlist.whitening_dim=-1", "shortlist.whitening_dim"),
    ("shortlist.whitening_shrinkage=1.5", "shortlist.whitening_shrinkage"),
    ("shortlist.whitening_images=1", "shortlist.whitening_images"),
    ("shortlist.dba=yes", "shortlist.dba"),
    ("shortlist.dba_top_n=0", "shortlist.dba_top_n"),
    ("shortlist.dba_alpha=-1.0", "shortlist.dba_alpha"),
    ("shortlist.qe_top_n=-1", "shortlist.qe_top_n"),
    ("shortlist.qe_alpha=-0.5", "shortlist.qe_alpha"),
    ("rerank.num_to_rerank=-1", "rerank.num_to_rerank"),
    ("rerank.matcher=flann", "rerank.matcher"),
    ("rerank.match_threshold=0", "rerank.match_threshold"),
    ("rerank.ratio=1.0", "rerank.ratio"),
    ("rerank.verifier=nope", "rerank.verifier"),
    ("rerank.residual_threshold=0", "rerank.residual_threshold"),
    ("rerank.max_trials=0", "rerank.max_trials"),
    ("rerank.confidence=1.0", "rerank.confidence"),
    ("rerank.min_matches=-1", "rerank.min_matches"),
    ("rerank.min_inliers=-1", "rerank.min_inliers"),
    ("rerank.scoring=best", "rerank.scoring"),
    ("rerank.max_inlier_score=0", "rerank.max_inlier_score"),
    ("predict.top_k=0", "predict.top_k"),
    ("predict.aggregation=mean", "predict.aggregation"),
    ("predict.abstain=-0.1", "predict.abstain"),
    ("predict.max_share=1.5", "predict.max_share"),
    ("calibrate.sample=-1", "calibrate.sample"),
    ("calibrate.l2=-1.0", "calibrate.l2"),
]


def test_every_checked_key_has_an_invalid_example():
    assert {key for _, key in INVALID} == {f"{section}.{key}" for section, key in CHECKS}


@pytest.mark.parametrize("override, key", INVALID)
def test_an_invalid_value_fails_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must"):
        load_config(overrides=[override])


def test_every_checked_key_is_a_setting_and_every_preset_passes_the_checks():
    assert set(CHECKS) <= set(COMMENTS)
    for name in list_presets():
        load_config(name)  # validates


def test_config_list(capsys):
    assert cli_main(["config", "--list"]) == 0
    assert capsys.readouterr().out.split() == list_presets()

