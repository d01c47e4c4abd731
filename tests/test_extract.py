"""Tests of the extract stage (delf_pipeline.extract), through the CLI and through ``run``.

Real photos: ``../shared/data/landmarks_mini`` (79 photos; those tests skip without it) and
skimage's sample photos (crops and rotations written to tmp_path). The embedded default
(RootSIFT-VLAD) is run with a small codebook and 512 px images to keep the suite fast.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import SHARED_DATA

from delf_pipeline import extract
from delf_pipeline.cli import main as cli_main
from delf_pipeline.config import load_config
from delf_pipeline.extractors.build import local_extractor
from delf_pipeline.formats.images import list_images
from delf_pipeline.formats.store import FeatureStore, read_errors

REPO = Path(__file__).resolve().parents[1]
MINI = SHARED_DATA / "landmarks_mini"
FAST = {"max_image_size": 512, "vlad_words": 16, "codebook_images": 20}
FAST_SETS = [arg for key, value in FAST.items() for arg in ("--set", f"extract.{key}={value}")]
# the CLI runs: XFeat (a VLAD codebook and its sample; the default preset exports a model on first use)
FAST_ARGS = ["--preset", "xfeat", *FAST_SETS]
SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
BROKEN = {"empty", "truncated", "text", "tiny"}  # the files make_broken writes
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"real photos not found at {MINI}")


def cli(*args) -> subprocess.CompletedProcess:
    """``python -m delf_pipeline ARGS`` in a fresh process (the user's path), output captured."""
    return subprocess.run(command(*args), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)


def command(*args) -> list[str]:
    return [sys.executable, "-m", "delf_pipeline", *map(str, args)]


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def config(**extract_settings) -> dict:
    """RootSIFT settings (the mechanics tested here: grey decoding, codebook sample, resume) made small."""
    conf = load_config("sift_default")
    conf.extract.update({**FAST, **extract_settings})
    return conf


def write_photos(folder: Path, count: int, side: int = 320) -> list[Path]:
    """``count`` distinct JPEG photos (skimage samples, rotated and cropped) of at most side x side."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name = SOURCES[i % len(SOURCES)]
        turn = i // len(SOURCES)
        photo = np.rot90(getattr(skimage.data, name)(), turn % 4)[7 * turn :, 11 * turn :][:side, :side]
        paths.append(folder / f"{name}_{i:02d}.jpg")
        Image.fromarray(np.ascontiguousarray(photo)).save(paths[-1], quality=90)
    return paths


def make_broken(folder: Path, donor: Path) -> None:
    """The BROKEN files: zero bytes, truncated JPEG (half of ``donor``), text named .jpg, 1x1 PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    data = donor.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("id,landmark_id\nnot,an image\n")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "tiny.png")


def error_ids(store: Path) -> set[str]:
    return {e.id for e in read_errors(store / "errors.csv")}


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- command line


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["extract", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    parser = argparse.ArgumentParser()
    extract.add_arguments(parser)
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    names = {a.option_strings[0] for a in options}
    assert names >= {"--images", "--out", "--split", "--codebook", "--strict", "--shard", "--overwrite",
                     "--preset", "--config", "--set"}
    for action in options:
        assert action.help and len(action.help) > 20, action.option_strings
        assert action.option_strings[0] in text and " ".join(action.help.split()) in text


# ---------------------------------------------------------------- the 79 real photos, once


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """One CLI extraction of a folder of the 79 photos (symlinks) plus the BROKEN files in c_broken/."""
    if not MINI.is_dir():
        pytest.skip(f"real photos not found at {MINI}")
    root = tmp_path_factory.mktemp("mini")
    folder = root / "images"
    for record in list_images(MINI)[0]:
        link = folder / record.path.relative_to(MINI)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(record.path)
    make_broken(folder / "c_broken", donor=MINI / "lightglue_dsc" / "DSC_0410.jpg")
    store = root / "store"
    return cli("extract", "--images", folder, "--out", store, *FAST_ARGS), folder, store


@needs_mini
def test_xfeat_extraction_stores_all_79_photos(mini_run):
    result, folder, store = mini_run
    assert result.returncode == 0, result.stderr
    features = FeatureStore(store)
    assert sorted(features.ids) == sorted(r.id for r in list_images(MINI)[0]) and len(features) == 79
    records = list_images(folder)[0]
    sample = [r.id for r in records[:: len(records) // 20][:20] if r.id in features]
    assert features.ids[: len(sample)] == sample  # the codebook sample's parts come first
    with open(MINI / "labels.csv", newline="") as handle:
        sizes = {row["image"].rsplit(".", 1)[0]: (int(row["height"]), int(row["width"])) for row in csv.DictReader(handle)}
    for image_id in features.ids:
        one = features.features(image_id)
        assert 0 < one.num_features <= 1000 and one.descriptors.shape[1] == 64  # XFeat
        assert one.global_descriptor.shape == (16 * 64,)
        assert features.size(image_id) == sizes[image_id]
        assert (one.locations >= 0).all() and (one.locations < sizes[image_id]).all()


@needs_mini
def test_broken_files_are_recorded_not_fatal(mini_run):
    result, _, store = mini_run
    assert result.returncode == 0, result.stderr
    assert error_ids(store) == {f"c_broken/{name}" for name in BROKEN}
    reasons = {e.id: e.reason for e in read_errors(store / "errors.csv")}
    assert reasons["c_broken/empty"] == "empty file (0 bytes)"
    assert reasons["c_broken/tiny"].startswith("degenerate size 1x1")
    assert "79 images, 4 errors" in last_line(result.stderr)


@needs_mini
def test_csv_listing_errors_are_recorded_with_the_decode_errors(mini_run, tmp_path):
    _, folder, store = mini_run
    listing = tmp_path / "list.csv"
    listing.write_text(
        "id,path\n"
        f"dsc,{folder}/lightglue_dsc/DSC_0410.jpg\n"
        f"empty,{folder}/c_broken/empty.jpg\n"
        f"gone,{folder}/no_such_photo.jpg\n"
        f"dsc,{folder}/lightglue_dsc/DSC_0411.jpg\n"  # duplicate id
        "lonely\n",  # malformed: no path
        encoding="utf-8",
    )
    out = tmp_path / "store"
    result = cli("extract", "--images", listing, "--out", out, "--codebook", store / "codebook.npy", *FAST_ARGS)
    assert result.returncode == 0, result.stderr
    assert FeatureStore(out).ids == ["dsc"]
    assert error_ids(out) == {"empty", "gone", "dsc", "lonely"}
    assert "1 images, 4 errors" in last_line(result.stderr)


@needs_mini
def test_strict_stops_with_exit_code_1_at_the_first_failure(mini_run, tmp_path):
    _, folder, store = mini_run
    out = tmp_path / "strict"
    result = cli("extract", "--images", folder, "--out", out, "--strict", "--codebook", store / "codebook.npy",
                 "--set", "extract.part_size=1", *FAST_ARGS)
    assert result.returncode == 1
    assert "--strict: image 'c_broken/empty'" in last_line(result.stderr)
    # only the three berlin_opensfm photos sort before c_broken/empty
    assert FeatureStore(out).ids == ["berlin_opensfm/berlin_01", "berlin_opensfm/berlin_02", "berlin_opensfm/berlin_03"]


# ---------------------------------------------------------------- sizes and coordinates


def test_resized_extraction_maps_locations_to_original_pixels(tmp_path):
    import skimage.data

    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(skimage.data.astronaut()[:401, :500]).save(folder / "astronaut.png")
    full = FeatureStore(extract.run(config(max_image_size=0), folder, tmp_path / "full"))
    half = FeatureStore(extract.run(config(max_image_size=250), folder, tmp_path / "half"))
    assert full.size("astronaut") == half.size("astronaut") == (401, 500)
    big, small = full.features("astronaut").locations, half.features("astronaut").locations
    assert (small.max(axis=0) > [0.9 * 401, 0.9 * 500]).all() and (small.max(axis=0) < [401, 500]).all()
    nearest = np.linalg.norm(small[:, None, :] - big[None, :, :], axis=2).min(axis=1)
    assert np.median(nearest) < 2.0  # same corners found at half resolution land on the full-size ones


# ---------------------------------------------------------------- resume, kill, settings


def store_files(store: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every finished file of a store (no temporary folders)."""
    return {
        p.relative_to(store).as_posix(): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(store).parts)
    }


def test_store_resumed_after_kill_is_identical(tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 24, side=240)
    args = ["extract", "--images", photos, "--set", "extract.part_size=4", *FAST_ARGS]
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(*args, "--out", killed), cwd=REPO, env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(p.is_dir() and not p.name.startswith(".") for p in (killed / "parts").glob("*")):
        assert process.poll() is None and time.monotonic() < deadline, "extract ended before writing a part"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(FeatureStore(killed).parts)
    assert 1 <= done < 6, "the kill came too late to test resuming"
    resumed = cli(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    whole = cli(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert [p.path.name for p in FeatureStore(killed).parts] == [f"s001of001-p{i:06d}" for i in range(6)]
    assert FeatureStore(killed).ids == FeatureStore(tmp_path / "whole").ids
    assert store_files(killed) == store_files(tmp_path / "whole")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> tuple[Path, Path]:
    """(photos folder of 8 photos, finished store of them in parts of 4)."""
    root = tmp_path_factory.mktemp("small")
    write_photos(root / "photos", 8, side=200)
    return root / "photos", extract.run(config(part_size=4), root / "photos", root / "store")


def test_second_run_skips_without_loading_a_model(small_store, monkeypatch, caplog):
    photos, store = small_store
    before = store_files(store)
    monkeypatch.setattr(extract, "build", lambda *a: pytest.fail("a model was loaded"))
    monkeypatch.setattr(extract, "prepare_codebook", lambda *a: pytest.fail("a model was loaded"))
    with caplog.at_level(logging.INFO, logger="delf_pipeline"):
        extract.run(config(part_size=4), photos, store)
    assert any(r.getMessage().startswith("Skipping extraction: all 8 images") for r in caplog.records)
    assert store_files(store) == before


def test_other_settings_on_the_same_store_name_the_setting(small_store):
    photos, store = small_store
    with pytest.raises(ValueError) as error:
        extract.run(config(max_features=500), photos, store)
    message = str(error.value)
    assert "settings.max_features: was 1000, now 500" in message and "--overwrite" in message
    assert "vlad_words" not in message


def test_overwrite_rebuilds_with_the_new_settings(small_store, tmp_path):
    photos, store = small_store
    copy = shutil.copytree(store, tmp_path / "copy")
    extract.run(config(max_features=50), photos, copy, overwrite=True)
    rebuilt = FeatureStore(copy)
    assert len(rebuilt) == 8 and rebuilt.manifest()["settings"]["max_features"] == 50
    assert all(rebuilt.features(i).num_features <= 50 for i in rebuilt.ids)


def test_shards_into_one_store_equal_a_single_run(small_store, tmp_path):
    photos, single = small_store
    sharded = tmp_path / "sharded"
    for index in (1, 2):
        extract.run(config(part_size=4), photos, sharded, shard=(index, 2))
    assert [p.path.name for p in FeatureStore(sharded).parts] == ["s001of002-p000000", "s002of002-p000000"]
    assert_same_images(sharded, single)


def assert_same_images(store_path: Path, reference_path: Path) -> None:
    """Both stores hold the same images with identical features, however they are split into parts."""
    store, reference = FeatureStore(store_path), FeatureStore(reference_path)
    assert sorted(store.ids) == sorted(reference.ids) and len(store) == len(reference)
    for image_id in reference.ids:
        a, b = store.features(image_id), reference.features(image_id)
        for name in ("locations", "descriptors", "scales", "scores", "global_descriptor"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), (image_id, name)
        assert store.size(image_id) == reference.size(image_id)


def test_empty_folder_gives_an_empty_store(tmp_path):
    (tmp_path / "nothing").mkdir()
    store = FeatureStore(extract.run(config(), tmp_path / "nothing", tmp_path / "store"))
    assert len(store) == 0 and error_ids(tmp_path / "store") == set()


def test_broken_files_in_a_folder_without_the_real_photos(tmp_path):
    photos = write_photos(tmp_path / "images", 3, side=200)
    make_broken(tmp_path / "images" / "broken", donor=photos[0])
    store = FeatureStore(extract.run(config(), tmp_path / "images", tmp_path / "store"))
    assert sorted(store.ids) == sorted(p.stem for p in photos)
    assert error_ids(tmp_path / "store") == {f"broken/{name}" for name in BROKEN}


# ---------------------------------------------------------------- DELF / DELG model formats


@pytest.mark.parametrize("name, backend, dim, has_global", [
    ("tf1_delg", "savedmodel", 32, True),
    ("tf2_delg", "savedmodel", 32, True),
    ("hub_delf", "hub", 40, False),
])
def test_model_formats_through_the_stage(delf_test_models, tmp_path, name, backend, dim, has_global):
    photos = write_photos(tmp_path / "photos", 3, side=240)
    conf = config(backend=backend, model=str(delf_test_models[name]), image_scales=[0.5, 1.0],
                  global_scale_indices=[], max_image_size=120, max_features=100)
    store = FeatureStore(extract.run(conf, tmp_path / "photos", tmp_path / "store"))
    assert sorted(store.ids) == sorted(p.stem for p in photos)
    for image_id in store.ids:
        one = store.features(image_id)
        height, width = store.size(image_id)
        assert (height, width) == Image.open(tmp_path / "photos" / f"{image_id}.jpg").size[::-1]
        assert 0 < one.num_features <= 100 and one.descriptors.shape == (one.num_features, dim)
        assert np.allclose(np.linalg.norm(one.descriptors, axis=1), 1.0, atol=1e-2)
        assert (one.locations >= 0).all() and (one.locations < [height, width]).all()
        assert one.locations.max() > 60  # mapped back from the 120 px model input to the 240 px photo
        if has_global:
            assert one.global_descriptor.shape == (2048,)
            assert np.linalg.norm(one.global_descriptor) == pytest.approx(1.0, abs=1e-2)
        else:
            assert one.global_descriptor is None


def test_candidates_with_rootsift_needs_the_index_codebook(tmp_path, caplog):
    shortlist = tmp_path / "shortlist.csv"
    shortlist.write_text("query_id,index_id,rank,score\nq,a,1,0.5\n")
    code = cli_main(["extract", "--images", str(tmp_path), "--out", str(tmp_path / "store"),
                     "--candidates", str(shortlist), "--preset", "sift_default"])
    assert code == 2 and "needs --codebook" in caplog.text


def test_global_only_store_keeps_no_local_features(tmp_path):
    photos = write_photos(tmp_path / "photos", 3, side=200)
    full = FeatureStore(extract.run(config(), tmp_path / "photos", tmp_path / "full"))
    codebook = tmp_path / "full" / "codebook.npy"
    slim = FeatureStore(extract.run(config(local_features=False), tmp_path / "photos", tmp_path / "slim",
                                    codebook=codebook))
    assert sorted(slim.ids) == sorted(p.stem for p in photos)
    for image_id in slim.ids:
        kept, whole = slim.features(image_id), full.features(image_id)
        assert kept.num_features == 0 and kept.descriptors.shape == (0, 128) and whole.num_features > 0
        np.testing.assert_allclose(kept.global_descriptor, whole.global_descriptor, atol=2e-3)


def test_unknown_backend_is_a_clear_error(tmp_path):
    write_photos(tmp_path / "photos", 1, side=100)
    with pytest.raises(ValueError, match="extract.backend must be one of .* got 'delf3'"):
        extract.run(config(backend="delf3"), tmp_path / "photos", tmp_path / "store")


# ---------------------------------------------------------------- codebook sample, grey decoding, leftovers


def count_rootsift_calls(monkeypatch) -> list[int]:
    """Patch RootSIFT extraction to record the ndim of every image it is given."""
    from delf_pipeline.extractors import rootsift

    seen, real = [], rootsift.extract_rootsift
    monkeypatch.setattr(rootsift, "extract_rootsift", lambda image, *a: seen.append(image.ndim) or real(image, *a))
    return seen


def same_features(store: FeatureStore, other: FeatureStore) -> None:
    assert sorted(store.ids) == sorted(other.ids)
    for image_id in store.ids:
        mine, theirs = store.features(image_id), other.features(image_id)
        for name in ("locations", "descriptors", "scales", "scores", "global_descriptor"):
            np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name), err_msg=f"{image_id} {name}")
        assert store.size(image_id) == other.size(image_id)


def test_codebook_sample_is_extracted_once_into_ordinary_parts(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos", 8, side=200)
    seen = count_rootsift_calls(monkeypatch)
    learned = extract.run(config(codebook_images=5, part_size=3), tmp_path / "photos", tmp_path / "learned")
    assert seen == [2] * 8  # 5 sample images while learning + the 3 others; grey images only
    assert sorted(p.name for p in learned.iterdir() if not p.name.startswith(".lock-")) == [
        "codebook.npy", "errors.csv", "manifest.json", "parts"]
    given = extract.run(config(codebook_images=5, part_size=3), tmp_path / "photos", tmp_path / "given",
                        codebook=learned / "codebook.npy")
    assert len(seen) == 16  # with a codebook given, every image goes through the model
    same_features(FeatureStore(learned), FeatureStore(given))


def test_a_run_killed_after_the_codebook_sample_resumes_it_as_ordinary_parts(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos", 6, side=200)
    records = list_images(tmp_path / "photos")[0]
    store, conf = tmp_path / "store", config(codebook_images=4, part_size=2).extract
    (store / "parts").mkdir(parents=True)
    (store / "manifest.json").write_text(json.dumps(extract.store_manifest(conf)))  # a run writes it first
    sample = store / "codebook-sample-1of1"
    (sample / "parts").mkdir(parents=True)
    extract.extract_into(sample, records[:2], local_extractor(conf, "rootsift"), replace(conf, descriptor_dtype="float32"),
                         (1, 1), strict=False)  # half of the sample, then killed
    seen = count_rootsift_calls(monkeypatch)
    extract.run(config(codebook_images=4, part_size=2), tmp_path / "photos", store)
    assert len(seen) == 4  # the 2 other sample images, then the 2 images outside the sample
    fresh = extract.run(config(codebook_images=4, part_size=2), tmp_path / "photos", tmp_path / "fresh")
    same_features(FeatureStore(store), FeatureStore(fresh))


def test_a_run_killed_after_learning_the_codebook_finishes_the_step(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos", 6, side=200)
    fresh = extract.run(config(codebook_images=4, part_size=2), tmp_path / "photos", tmp_path / "fresh")
    records = list_images(tmp_path / "photos")[0]
    store, conf = tmp_path / "store", config(codebook_images=4, part_size=2).extract
    sample = store / "codebook-sample-1of1"
    (sample / "parts").mkdir(parents=True)
    (store / "parts").mkdir()
    (store / "manifest.json").write_text(json.dumps(extract.store_manifest(conf)))  # a run writes it first
    extract.extract_into(sample, records[:4], local_extractor(conf, "rootsift"), replace(conf, descriptor_dtype="float32"),
                         (1, 1), strict=False)  # the whole sample, the codebook saved, then killed
    shutil.copy(fresh / "codebook.npy", store / "codebook.npy")
    seen = count_rootsift_calls(monkeypatch)
    extract.run(config(codebook_images=4, part_size=2), tmp_path / "photos", store)
    assert len(seen) == 2 and not sample.exists()  # the sample's images come from its store
    same_features(FeatureStore(store), FeatureStore(fresh))
    assert FeatureStore(store).ids == FeatureStore(fresh).ids


def test_an_injected_extractor_replaces_the_backend(tmp_path, monkeypatch):
    from delf_pipeline.extractors.rootsift import empty_features

    write_photos(tmp_path / "photos", 3, side=100)
    monkeypatch.setattr(extract, "build", lambda *a: pytest.fail("a backend was loaded"))
    monkeypatch.setattr(extract, "prepare_codebook", lambda *a: pytest.fail("a backend was loaded"))
    shapes = []
    store = extract.run(config(), tmp_path / "photos", tmp_path / "store",
                        extractor=lambda image: shapes.append(image.shape) or replace(
                            empty_features(128), global_descriptor=np.ones(4, np.float32)))
    assert len(shapes) == 3 and all(len(shape) == 2 for shape in shapes)  # grey, as rootsift is given
    assert FeatureStore(store).global_matrix().shape == (3, 4) and not (store / "codebook.npy").exists()


def test_codebook_sample_of_a_global_only_store_keeps_no_local_features(tmp_path):
    write_photos(tmp_path / "photos", 4, side=200)
    slim = FeatureStore(extract.run(config(local_features=False), tmp_path / "photos", tmp_path / "slim"))
    full = FeatureStore(extract.run(config(), tmp_path / "photos", tmp_path / "full",
                                    codebook=tmp_path / "slim" / "codebook.npy"))
    assert len(slim) == 4 and all(slim.features(i).num_features == 0 for i in slim.ids)
    for image_id in slim.ids:
        np.testing.assert_array_equal(slim.features(image_id).global_descriptor,
                                      full.features(image_id).global_descriptor)


def test_a_shard_stores_only_its_own_images_of_the_codebook_sample(tmp_path):
    write_photos(tmp_path / "photos", 6, side=200)
    store = FeatureStore(extract.run(config(), tmp_path / "photos", tmp_path / "store", shard=(2, 3)))
    every = [r.id for r in list_images(tmp_path / "photos")[0]]
    assert store.ids == every[1::3]


def test_unfinished_parts_of_a_killed_run_are_removed_for_this_shard_only(tmp_path, caplog):
    write_photos(tmp_path / "photos", 2, side=200)
    parts = tmp_path / "store" / "parts"
    mine, theirs = parts / ".s001of002-p000000.x1y2.tmp", parts / ".s002of002-p000000.x3y4.tmp"
    for folder in (mine, theirs):
        folder.mkdir(parents=True)
        (folder / "ids.txt").write_text("half written\n")
    with caplog.at_level(logging.INFO, logger="delf_pipeline"):
        extract.run(config(), tmp_path / "photos", tmp_path / "store", shard=(1, 2))
    assert not mine.exists() and (theirs / "ids.txt").exists()
    assert f"removing {mine}" in caplog.text
    assert sorted(p.name for p in parts.iterdir()) == [".s002of002-p000000.x3y4.tmp", "s001of002-p000000"]


def test_a_rootsift_store_decoded_in_colour_is_not_resumed_in_grey(small_store, tmp_path):
    photos, store = small_store
    old = shutil.copytree(store, tmp_path / "old")  # as written before grey decoding: no "decode" setting
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["settings"].pop("decode") == "L"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"settings.decode: not recorded \(older manifest\), now 'L'"):
        extract.run(config(part_size=4), photos, old)
    assert "decode" not in extract.store_manifest(config(backend="savedmodel").extract)["settings"]


# ---------------------------------------------------------------- Dask cluster


def local_cluster(processes: bool):
    """A 2-worker, 1-thread-each ``LocalCluster`` (skips without dask.distributed)."""
    distributed = pytest.importorskip("dask.distributed", reason="the Dask run needs dask[distributed] (test extra)")
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=None)


def test_dask_cluster_writes_the_local_store_byte_for_byte(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos", 12, side=200)
    conf = config(codebook_images=4, part_size=3)  # the client learns the codebook; 3 parts of the others: tasks
    local = extract.run(conf, tmp_path / "photos", tmp_path / "local")
    seen = count_rootsift_calls(monkeypatch)
    prepared, builds, real_prepare, real_build = [], [], extract.prepare_codebook, extract.build
    monkeypatch.setattr(extract, "prepare_codebook", lambda out, records, *a: prepared.append(len(records))
                        or real_prepare(out, records, *a))
    monkeypatch.setattr(extract, "build", lambda *a: builds.append(1) or real_build(*a))
    with local_cluster(processes=False) as cluster:
        on_dask = extract.run(conf, tmp_path / "photos", tmp_path / "dask", dask_address=cluster.scheduler_address)
    assert store_files(on_dask) == store_files(local)
    assert [p.path.name for p in FeatureStore(on_dask).parts] == [f"s001of001-p{i:06d}" for i in range(5)]
    assert seen == [2] * 12  # the 4 sample images on the client, the 8 others on the workers: each once
    assert prepared == [12] and builds == [1]  # the client's codebook step over all 12, one load for the 3 tasks


def test_dask_run_resumes_a_killed_local_run_and_removes_its_leftovers(small_store, tmp_path):
    photos, single = small_store
    store = tmp_path / "store"
    shutil.copytree(single, store)
    shutil.rmtree(store / "parts" / "s001of001-p000001")  # the second part never finished
    leftover = store / "parts" / ".s001of001-p000001.abc.tmp"
    leftover.mkdir()
    with local_cluster(processes=False) as cluster:
        args = ["extract", "--images", photos, "--out", store, "--preset", "sift_default", "--set",
                "extract.part_size=4", *FAST_SETS, "--dask", cluster.scheduler_address]
        assert cli_main(list(map(str, args))) == 0
    assert not leftover.exists()
    assert store_files(store) == store_files(single)


def test_a_dask_task_run_again_finds_its_part_written_and_keeps_it(small_store, tmp_path):
    """Dask runs a finished task again when the worker holding its result dies (the result is
    lost; CI saw it in the test below: OSError "Directory not empty" from the second write ended
    the run). The task's part is the same work: the second run keeps the first's part."""
    photos, single = small_store
    store = tmp_path / "store"
    shutil.copytree(single, store)
    part = store / "parts" / "s001of001-p000001"
    before = {f.name: f.read_bytes() for f in part.iterdir()}
    conf = config(part_size=4)
    records = list_images(photos)[0][4:8]
    model = extract._model_key(store, conf.extract)
    assert extract._extract_part(str(store), part.name, records, conf.extract, False, model) == part.name
    assert {f.name: f.read_bytes() for f in part.iterdir()} == before
    assert store_files(store) == store_files(single)


@pytest.mark.slow
def test_worker_killed_mid_run_leaves_nothing_a_rerun_does_not_finish(tmp_path):
    import dask

    write_photos(tmp_path / "photos", 24, side=320)
    conf = config(part_size=2, codebook_images=2)  # the client's codebook-sample part, then 11 tasks of 2 photos
    local = extract.run(conf, tmp_path / "photos", tmp_path / "local")
    out, failures = tmp_path / "dask", []
    # a task whose worker dies fails the run at once instead of moving to another worker
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), local_cluster(processes=True) as cluster:
        from dask.distributed import Client

        with Client(cluster.scheduler_address) as client:
            pids = client.run(os.getpid)

        def first_run() -> None:
            try:
                extract.run(conf, tmp_path / "photos", out, dask_address=cluster.scheduler_address)
            except Exception as error:  # noqa: BLE001 - the test checks which error ended the run
                failures.append(error)

        run = threading.Thread(target=first_run)
        run.start()
        deadline = time.monotonic() + 300
        while len([p for p in (out / "parts").glob("s*") if p.is_dir()]) < 2:  # a task's part is written
            assert run.is_alive() and time.monotonic() < deadline, "extract ended before a task wrote a part"
            time.sleep(0.002)
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        done = len(FeatureStore(out).parts)
        run.join(timeout=300)
        assert not run.is_alive(), "the run did not end after its worker was killed"
        assert 2 <= done < 12, "the kill came too late to test resuming"
        assert [type(error).__name__ for error in failures] == ["KilledWorker"]
        assert len(FeatureStore(out).parts) < 12  # the killed worker's parts are missing
        extract.run(conf, tmp_path / "photos", out, dask_address=cluster.scheduler_address)
    assert_same_images(out, local)  # the parts the rerun wrote are numbered after the others
    assert (out / "errors.csv").read_bytes() == (local / "errors.csv").read_bytes()
    assert not [p for p in (out / "parts").iterdir() if p.name.startswith(".")]
