"""Tests of settings: the one table, presets, inheritance, the strict parser, the printed config."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from delf_pipeline.cli import main as cli_main
from delf_pipeline.config import (
    DEFAULT_PRESET,
    DEFAULTS,
    SETTINGS,
    ConfigError,
    config_from_dict,
    list_presets,
    load_config,
    make_section,
    parse_value,
    presets_dir,
    to_toml,
    tomllib,
)
from delf_pipeline.verification.matching import LEARNED_MATCHERS, MATCHERS
from delf_pipeline.verification.ransac import VERIFIERS


def test_every_preset_loads():
    for name in list_presets():
        assert load_config(name).preset == name


def test_the_defaults_are_the_default_preset():
    assert load_config(DEFAULT_PRESET).to_dict() == {**DEFAULTS.to_dict(), "preset": DEFAULT_PRESET}


def test_the_default_preset_file_sets_only_the_defaults():
    data = tomllib.loads((presets_dir() / f"{DEFAULT_PRESET}.toml").read_text())
    assert "base" not in data
    for section, values in data.items():
        for key, value in values.items():
            assert parse_value(section, key, value) == getattr(DEFAULTS[section], key), f"{section}.{key}"


def test_xfeat_keeps_the_values_it_had_as_the_default():
    """xfeat, the default preset until efficientnet_lite0, sets explicitly what the defaults gave it."""
    xfeat = load_config("xfeat")
    assert (xfeat.extract.backend, xfeat.extract.model, xfeat.extract.image_scales, xfeat.extract.global_scale_indices,
            xfeat.extract.score_threshold) == ("xfeat", "", [0.7071, 1.0, 1.4142], [0, 1, 2], 175.0)
    assert (xfeat.rerank.num_to_rerank, xfeat.rerank.matcher, xfeat.rerank.match_threshold, xfeat.rerank.ratio,
            xfeat.rerank.verifier, xfeat.rerank.max_trials, xfeat.rerank.min_matches,
            xfeat.rerank.max_inlier_score) == (20, "mutual", 0.9, 0.9, "msac_affine", 2000, 5, 30)


def test_reference_presets_hold_the_official_values():
    # values from docs/design.md's table of reference defaults
    delf = load_config("delf_v1_hub")
    assert delf.extract.image_scales == [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0]
    assert delf.extract.score_threshold == 100.0
    assert (delf.rerank.matcher, delf.rerank.match_threshold, delf.rerank.ratio) == ("kdtree", 0.8, 0.0)
    assert (delf.rerank.verifier, delf.rerank.residual_threshold, delf.rerank.max_trials) == ("skimage_affine", 20.0, 1000)
    assert (delf.rerank.min_matches, delf.rerank.scoring) == (4, "official")
    assert load_config("delg_gldv1").extract.global_scale_indices == [3, 4, 5]
    assert load_config("delg_gldv2").extract.score_threshold == 454.6
    kaggle = load_config("kaggle2020_baseline")
    assert kaggle.rerank.verifier == "degensac" and kaggle.rerank.residual_threshold == 4.0
    assert (kaggle.rerank.max_inlier_score, kaggle.predict.top_k) == (70, 5)


def test_base_preset_is_merged_first():
    hybrid, sift = load_config("efficientnet_lite0_rootsift"), load_config("sift_default")
    assert hybrid.rerank == sift.rerank  # inherited
    assert hybrid.extract.backend == "savedmodel" and hybrid.extract.local_backend == "rootsift"


def test_inheritance_loop_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "a.toml").write_text('base = "b"\n')
    (tmp_path / "b.toml").write_text('base = "a"\n')
    monkeypatch.setattr("delf_pipeline.config.presets_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match="loop: a -> b -> a"):
        load_config("a")


def test_sections_are_typed_objects():
    config = load_config("sift_default", overrides=["rerank.num_to_rerank=7"])
    assert config.rerank.num_to_rerank == 7 and config.extract.backend == "rootsift"
    assert dataclasses.is_dataclass(config.rerank) and type(config.rerank).__name__ == "RerankSettings"
    assert config_from_dict(config.to_dict(), "a record") == config  # what run.json and an index keep


@pytest.mark.parametrize("text, section, key, expected", [
    ("rerank.max_trials=500", "rerank", "max_trials", 500),
    ("rerank.verifier=magsac", "rerank", "verifier", "magsac"),
    ('extract.model="/a b/c"', "extract", "model", "/a b/c"),
    ("extract.image_scales=[0.5, 1]", "extract", "image_scales", [0.5, 1.0]),
    ("shortlist.exclude_same_id=true", "shortlist", "exclude_same_id", True),
    ("rerank.residual_threshold=12", "rerank", "residual_threshold", 12.0),  # an integer for a number
])
def test_overrides_are_parsed_as_the_key_says(text, section, key, expected):
    value = getattr(load_config(overrides=[text])[section], key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("rerank.nope=1", "unknown key rerank.nope"),
    ("nope.key=1", "unknown section 'nope'"),
    ("rerank.max_trials=many", r"rerank.max_trials must be an integer in \[1, 1000000\], got 'many'"),
    ("max_trials=5", "must look like section.key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


# D3 of the second audit: values that were taken silently, each refused now naming key, value and range.
@pytest.mark.parametrize("override, message", [
    ("shortlist.exclude_same_id=False", "shortlist.exclude_same_id must be true or false, got 'False'"),
    ('shortlist.exclude_same_id="false"', "shortlist.exclude_same_id must be true or false, got 'false'"),
    ("extract.local_features=0", "extract.local_features must be true or false, got 0"),
    ("rerank.num_to_rerank=true", r"rerank.num_to_rerank must be an integer in \[0, 100000\], got True"),
    ("rerank.num_to_rerank=2.5", r"rerank.num_to_rerank must be an integer in \[0, 100000\], got 2.5"),
    ("extract.max_features=99999999999999", r"extract.max_features must be an integer in \[1, 100000\]"),
    ("rerank.max_trials=10000000000", r"rerank.max_trials must be an integer in \[1, 1000000\]"),
    ("rerank.residual_threshold=nan", r"rerank.residual_threshold must be a number in \(0, 10000\], got nan"),
    ("predict.abstain=inf", r"predict.abstain must be a number in \[0, 1000000\], got inf"),
    ("rerank.verifier=4", 'rerank.verifier must be one of "skimage_affine"'),
    ("extract.vlad_weight=1.0", r"extract.vlad_weight must be a number in \[0, 1\), got 1.0"),
    ("extract.vlad_dim=-1", r"extract.vlad_dim must be an integer in \[0, 1000000\], got -1"),
    ("shortlist.superglobal_depth=-1", r"shortlist.superglobal_depth must be an integer in \[0, 100000\]"),
    ("shortlist.superglobal_neighbours=0", r"shortlist.superglobal_neighbours must be an integer in \[1, 10000\]"),
])
def test_loose_values_are_refused_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_a_quoted_boolean_in_a_config_file_is_refused(tmp_path):
    (tmp_path / "f.toml").write_text('[shortlist]\nexclude_same_id = "false"\n')
    with pytest.raises(ConfigError, match=r"f.toml: shortlist.exclude_same_id must be true or false, got 'false'"):
        load_config(config_file=tmp_path / "f.toml")


def test_changing_a_range_in_the_table_changes_validation_and_the_printed_config(monkeypatch):
    assert "max_trials = 1000  # RANSAC iterations (an integer in [1, 1000000])" in to_toml(load_config())
    load_config(overrides=["rerank.max_trials=6000"])
    narrow = dataclasses.replace(SETTINGS["rerank"]["max_trials"], high=5000)
    monkeypatch.setitem(SETTINGS["rerank"], "max_trials", narrow)
    with pytest.raises(ConfigError, match=r"rerank.max_trials must be an integer in \[1, 5000\], got 6000"):
        load_config(overrides=["rerank.max_trials=6000"])
    assert "max_trials = 1000  # RANSAC iterations (an integer in [1, 5000])" in to_toml(load_config())


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="available: .*sift_default"):
        load_config("nope")


def test_config_command_prints_every_key_with_its_comment(capsys):
    assert cli_main(["config", "--preset", "kaggle2020_baseline", "--set", "rerank.num_to_rerank=3"]) == 0
    text = capsys.readouterr().out
    assert "num_to_rerank = 3  # shortlisted candidates verified per query (an integer in [0, 100000])" in text
    keys = [line for line in text.splitlines() if re.match(r"^\w+ = ", line)]
    assert keys[0] == 'preset = "kaggle2020_baseline"'
    assert len(keys[1:]) == sum(len(section) for section in SETTINGS.values())
    assert all(" # " in line for line in keys[1:])  # every key has its comment
    assert to_toml(load_config()).startswith(f'preset = "{DEFAULT_PRESET}"')


def test_config_marks_the_keys_that_do_not_apply():
    xfeat, delg = to_toml(load_config("xfeat")), to_toml(load_config("delg_gldv2"))
    marked = "[unused: only for the savedmodel / hub backends]"
    assert f"score_threshold = 175.0  # {marked}" in xfeat and "score_threshold = 454.6  # attention" in delg
    assert "vlad_words = 256  # VLAD" in xfeat and "vlad_words = 256  # [unused:" in delg
    assert "ratio = 0.9  # Lowe" in xfeat and "ratio = 0.0  # [unused: only for the nn / mutual matchers]" in delg
    assert "xfeat_threshold = 0.05  # keypoint" in to_toml(load_config("xfeat_lite0"))  # XFeat locals of a hybrid
    fused, lite0 = to_toml(load_config("xfeat_fused")), to_toml(load_config("xfeat_lite0"))
    assert "vlad_dim = 256  # VLAD reduced" in fused and "vlad_dim = 0  # [unused:" in lite0  # a fused hybrid's VLAD
    assert "vlad_weight = 0.0  # [unused:" in xfeat and "superglobal_neighbours = 9  # [unused:" in fused


def test_every_key_has_a_comment_and_a_range_or_choices():
    for section, keys in SETTINGS.items():
        for key, spec in keys.items():
            assert spec.comment, f"{section}.{key}"
            if spec.kind in (int, float, list):
                assert spec.low is not None and spec.high is not None, f"{section}.{key} has no range"
            parse_value(section, key, spec.default)  # the default passes its own checks


def test_the_table_names_every_matcher_and_verifier_the_code_has():
    assert SETTINGS["rerank"]["matcher"].choices == MATCHERS + LEARNED_MATCHERS
    assert SETTINGS["rerank"]["verifier"].choices == VERIFIERS


def test_printed_config_loads_back_to_the_same_settings(tmp_path):
    config = load_config("kaggle2020_baseline", overrides=["rerank.num_to_rerank=3"])
    (tmp_path / "saved.toml").write_text(to_toml(config))
    assert load_config(config_file=tmp_path / "saved.toml") == config


def test_a_config_file_is_layered_over_the_default_preset(tmp_path, capsys):
    (tmp_path / "f.toml").write_text("[predict]\ntop_k = 7\n")
    assert cli_main(["config", "--config", str(tmp_path / "f.toml")]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    default = load_config().to_dict()
    assert printed["preset"] == DEFAULT_PRESET and printed["predict"]["top_k"] == 7
    assert printed["rerank"] == default["rerank"] and printed["extract"] == default["extract"]


def test_a_config_file_may_name_its_preset(tmp_path):
    (tmp_path / "f.toml").write_text('preset = "kaggle2020_baseline"\n[predict]\ntop_k = 7\n')
    config = load_config(config_file=tmp_path / "f.toml")
    assert config.preset == "kaggle2020_baseline" and config.predict.top_k == 7
    assert config.rerank == load_config("kaggle2020_baseline").rerank
    assert load_config("delg_gldv2", tmp_path / "f.toml").preset == "delg_gldv2"  # --preset wins


def test_make_section_checks_each_value():
    assert make_section("extract", backend="savedmodel", model="m").backend == "savedmodel"
    with pytest.raises(ConfigError, match=r"extract.max_features must be an integer in \[1, 100000\], got 0"):
        make_section("extract", max_features=0)


def test_config_list(capsys):
    assert cli_main(["config", "--list"]) == 0
    assert capsys.readouterr().out.split() == list_presets()


# ---------------------------------------------------------------- property test of the one parser

KEYS = [(section, key) for section, keys in SETTINGS.items() for key in keys]
TOML_VALUES = st.one_of(
    st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.one_of(st.integers(-100, 100), st.floats(-100, 100), st.booleans()), max_size=20),
)
RAW_TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["true", "False", "nan", "-inf", "1e400", "[1, 2]",
                                                           '"x"', "[[]]", "{a = 1}", "0x10", "1_000"]))


def accepted(section: str, key: str, value) -> None:
    """``value`` is of the key's declared type and within its range (or one of its choices)."""
    spec = SETTINGS[section][key]
    assert type(value) is spec.kind
    if spec.kind is list:
        assert spec.items[0] <= len(value) <= spec.items[1]
        assert all(type(v) is spec.item_kind and spec.low <= v <= spec.high for v in value)
    elif spec.choices:
        assert value in spec.choices
    elif spec.kind in (int, float):
        assert spec.low <= value <= spec.high


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.sampled_from(KEYS), TOML_VALUES)
def test_any_value_is_a_clean_refusal_or_a_checked_value(key, value):
    section, name = key
    try:
        accepted(section, name, parse_value(section, name, value))
    except ConfigError as error:
        assert f"{section}.{name} must be" in str(error)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.sampled_from(KEYS), RAW_TEXT)
def test_any_override_text_is_a_clean_refusal_or_a_checked_value(key, raw):
    section, name = key
    try:
        config = load_config(overrides=[f"{section}.{name}={raw}"])
    except ConfigError as error:
        assert str(error).startswith("--set ") or "must look like" in str(error)
    else:
        accepted(section, name, getattr(config[section], name))


@settings(max_examples=150, derandomize=True, deadline=None)
@given(st.sampled_from(KEYS), TOML_VALUES)
def test_any_toml_file_value_is_a_clean_refusal_or_a_checked_value(tmp_path_factory, key, value):
    section, name = key
    path = tmp_path_factory.mktemp("toml") / "f.toml"
    try:
        text = f"[{section}]\n{name} = {json.dumps(value)}\n"
        tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError):
        return  # not TOML at all (JSON nan / Infinity): a file the TOML reader refuses
    path.write_text(text)
    try:
        config = load_config(config_file=path)
    except ConfigError as error:
        assert "must be" in str(error)
    else:
        accepted(section, name, getattr(config[section], name))
