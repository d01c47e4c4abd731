"""The run folder: its record (run.json) and what ``delf-pipeline run`` refuses as --data.

The end-to-end uses of the record (report, show-matches, evaluate with only ``--run OUT``)
are in tests/test_pipeline.py, on a real run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from delf_pipeline import __version__
from delf_pipeline.cli import main as cli_main
from delf_pipeline.config import load_config
from delf_pipeline.formats.images import kaggle_path
from delf_pipeline.formats.run_record import read_run_record, recorded_path, run_record, write_run_record


def test_record_holds_absolute_paths_and_every_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    config = load_config("sift_default", overrides=["predict.top_k=7"])
    record = run_record(config, "data", solution="data/solution.csv", overrides=["predict.top_k=7"])
    assert record["data"] == str(tmp_path / "data") and record["solution"] == str(tmp_path / "data" / "solution.csv")
    assert record["preset"] == "sift_default" and record["overrides"] == ["predict.top_k=7"]
    assert record["version"] == __version__ and record["config_file"] is None and record["model"] == ""
    assert record["config"]["predict"]["top_k"] == 7
    assert recorded_path(record, "data") == tmp_path / "data" and recorded_path(record, "config_file") is None


def test_record_keeps_a_model_handle_and_resolves_a_model_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "delg").mkdir(parents=True)
    for model, expected in (("models/delg", str(tmp_path / "models" / "delg")),
                            ("https://tfhub.dev/google/delf/1", "https://tfhub.dev/google/delf/1")):
        config = load_config("delg_gldv2", overrides=[f'extract.model="{model}"'])
        assert run_record(config, tmp_path)["model"] == expected


def test_record_round_trip(tmp_path):
    record = run_record(load_config(), tmp_path / "data")
    path = write_run_record(tmp_path / "out", record)
    assert path == tmp_path / "out" / "run.json"
    assert read_run_record(tmp_path / "out") == json.loads(json.dumps(record))
    assert not list((tmp_path / "out").glob(".*.tmp"))  # written atomically: no temporary left


@pytest.mark.parametrize("text, message", [
    (None, "run.json not found"),
    ("{not json", "not valid JSON"),
    ('{"data": "/x"}', r"not a run record, missing key\(s\) format_version, version, solution,"),
    ("[1, 2]", "not a run record"),
])
def test_bad_record_is_refused_naming_the_file(tmp_path, text, message):
    if text is not None:
        (tmp_path / "run.json").write_text(text)
    with pytest.raises((FileNotFoundError, ValueError), match=message) as caught:
        read_run_record(tmp_path)
    assert str(tmp_path / "run.json") in str(caught.value)


def test_newer_record_format_is_refused(tmp_path):
    record = run_record(load_config(), tmp_path)
    write_run_record(tmp_path, {**record, "format_version": 99})
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        read_run_record(tmp_path)


# ---------------------------------------------------------------- `run --data` checks the Kaggle layout


def jpeg(path: Path) -> None:
    import cv2
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((32, 32, 3), 128, np.uint8))


def empty_folder(root: Path) -> Path:
    (root / "data").mkdir()
    return root / "data"


def no_train_csv(root: Path) -> Path:
    jpeg(kaggle_path(root / "data", "train", "0123456789abcdef"))
    jpeg(kaggle_path(root / "data", "test", "fedcba9876543210"))
    return root / "data"


def photo_folder(root: Path) -> Path:
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        jpeg(root / "photos" / name)
    return root / "photos"


def csv_file(root: Path) -> Path:
    (root / "train.csv").write_text("id,landmark_id\n0123456789abcdef,1\n")
    return root / "train.csv"


def no_test_images(root: Path) -> Path:
    jpeg(kaggle_path(root / "data", "train", "0123456789abcdef"))
    (root / "data" / "train.csv").write_text("id,landmark_id\n0123456789abcdef,1\n")
    (root / "data" / "test").mkdir()
    return root / "data"


def missing(root: Path) -> Path:
    return root / "nowhere"


@pytest.mark.parametrize("make, message", [
    (empty_folder, "is not a Kaggle-layout folder: it has no train.csv, train/, test/"),
    (no_train_csv, "is not a Kaggle-layout folder: it has no train.csv ("),
    (photo_folder, "it has no train.csv, train/, test/ (wanted: train.csv with id,landmark_id"),
    (csv_file, "is a file; `run` needs the Kaggle-layout folder"),
    (no_test_images, "test/ holds no .jpg image, so there is no query"),
    (missing, "folder not found"),
], ids=lambda value: getattr(value, "__name__", ""))
def test_run_says_what_the_data_folder_lacks(tmp_path, caplog, capfd, make, message):
    data = make(tmp_path)
    code = cli_main(["run", "--data", str(data), "--out", str(tmp_path / "out")])
    assert code == 2
    assert message in caplog.text and str(data) in caplog.text
    assert "Traceback" not in capfd.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_run_opens_each_store_once_after_extracting_it(tmp_path, monkeypatch):
    """pipeline.run reads a store's parts once: the stages after extraction share one opened store."""
    from collections import Counter

    from support.synthetic_images import FAST, write_kaggle

    from delf_pipeline import extract, pipeline
    from delf_pipeline.formats import store as store_module

    write_kaggle(tmp_path / "data")
    overrides = [item for item in FAST if "=" in item]  # the section.key=value items of --set
    opened, extracting = Counter(), []
    real_init, real_extract = store_module.FeatureStore.__init__, extract.run

    def counting_init(self, path):
        if not extracting:
            opened[Path(path).name] += 1
        real_init(self, path)

    def flagged_extract(*args, **kwargs):
        extracting.append(1)
        try:
            return real_extract(*args, **kwargs)
        finally:
            extracting.pop()

    monkeypatch.setattr(store_module.FeatureStore, "__init__", counting_init)
    monkeypatch.setattr(extract, "run", flagged_extract)
    pipeline.run(load_config("sift_default", overrides=overrides), tmp_path / "data", tmp_path / "out")
    assert opened and max(opened.values()) == 1, opened
