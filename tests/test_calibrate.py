"""Tests of delf_pipeline.calibrate: leave-one-out over the index through the real shortlist and
rerank, the fitted calibration.json, and the command line."""
from __future__ import annotations

import json

import pytest
from support.synthetic_stores import DIM, place_view, write_store

from delf_pipeline import calibrate
from delf_pipeline.cli import main as cli_main
from delf_pipeline.config import load_config as load_default_config
from delf_pipeline.evidence.calibration import Calibration

# places 0-2 have four views each (they verify one another); places 3-6 one photo each: as
# leave-one-out queries those can only be predicted wrong, like non-landmark queries.
VIEWS = {**{f"p{p}v{v}": (p, v) for p in range(3) for v in range(4)}, **{f"p{p}v0": (p, 0) for p in range(3, 7)}}
LABELS = {image_id: f"place{p}" for image_id, (p, _) in VIEWS.items()}


def load_config(overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """The xfeat preset's settings (its ratio test and affine verifier, which these synthetic views
    were made for), every shortlisted candidate verified (calibrate.depth = 0): the synthetic
    global descriptors are random, so only verification finds a photo's place."""
    return load_default_config("xfeat", overrides=["calibrate.depth=0", *overrides])


@pytest.fixture(scope="module")
def index_store(tmp_path_factory):
    images = {i: place_view(p, 30, seed=10 * p + v, global_seed=100 + 10 * p + v) for i, (p, v) in VIEWS.items()}
    return write_store(tmp_path_factory.mktemp("calib") / "index", images, part_size=5, local_dim=DIM)


def test_leave_one_out_evidence_marks_one_photo_places_wrong(index_store, tmp_path):
    evidence = calibrate.loo_evidence(load_config(), index_store, LABELS, tmp_path)
    right = dict(zip(evidence["query_id"], evidence["right"]))
    assert len(right) == 16 and right == {i: VIEWS[i][0] < 3 for i in VIEWS}
    assert (evidence.loc[evidence["right"], "best_inliers"] >= 20).all()
    assert (evidence.loc[~evidence["right"], "best_inliers"] == 0).all()


def test_calibration_file_beside_the_index_ranks_right_above_wrong(index_store, tmp_path, capsys):
    out = calibrate.run(load_config(), index_store, LABELS, tmp_path / "calibration.json", work=tmp_path / "w")
    fitted = Calibration.load(out)
    assert fitted.settings["sample"] == 16 and fitted.settings["right"] == 12
    assert fitted.settings["aggregation"] == "max" and fitted.settings["top_k"] == 3
    evidence = calibrate.loo_evidence(load_config(), index_store, LABELS, tmp_path / "w")
    probability = fitted.probability(evidence)
    assert probability[evidence["right"].to_numpy()].min() > 0.5 > probability[~evidence["right"].to_numpy()].max()
    printed = capsys.readouterr().out
    assert "| threshold | kept | precision | recall | F1 |" in printed and "suggested abstain threshold" in printed
    assert fitted.settings["thresholds"]["recall"] == 0.0  # recall is highest when nothing is left out


def test_sample_is_seeded_and_bounded():
    ids = [f"i{n:02d}" for n in range(20)]
    assert calibrate.sample_ids(ids, 5, seed=3) == calibrate.sample_ids(ids, 5, seed=3)
    assert len(calibrate.sample_ids(ids, 5, seed=3)) == 5 and calibrate.sample_ids(ids, 5, 3) != calibrate.sample_ids(ids, 5, 4)
    assert calibrate.sample_ids(ids, 0, seed=0) == ids == calibrate.sample_ids(ids, 50, seed=0)


def test_command_line_writes_calibration_json_beside_the_index(index_store, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,landmark_id\n" + "".join(f"{i},{label}\n" for i, label in LABELS.items()))
    store = tmp_path / "features" / "index"
    store.parent.mkdir()
    store.symlink_to(index_store)
    assert cli_main(["calibrate", "--index", str(store), "--index-labels", str(labels),
                     "--set", "calibrate.sample=10", "--set", 'rerank.cascade=""']) == 0  # no XFeat here
    data = json.loads((tmp_path / "features" / "calibration.json").read_text())
    assert data["settings"]["sample"] == 10 and data["features"] == list(Calibration.load(
        tmp_path / "features" / "calibration.json").features)


def test_an_index_where_every_prediction_is_right_cannot_calibrate(index_store, tmp_path):
    one_place = {i: "everywhere" for i in LABELS}
    with pytest.raises(ValueError, match="calibration needs right and wrong predictions; got 16 right of 16"):
        calibrate.run(load_config(), index_store, one_place, tmp_path / "c.json", work=tmp_path / "w")
    assert not (tmp_path / "c.json").exists()


def test_another_sample_in_the_same_work_folder_is_not_the_old_one(index_store, tmp_path):
    config = load_config()
    config.calibrate.sample = 8
    assert len(calibrate.loo_evidence(config, index_store, LABELS, tmp_path)) == 8
    config.calibrate.sample = 0
    assert len(calibrate.loo_evidence(config, index_store, LABELS, tmp_path)) == 16
    assert len(list(tmp_path.glob("loo-*/shortlist.csv"))) == 2


def test_leave_one_out_shortlist_searches_as_the_stage_does(index_store, tmp_path):
    """With supervised whitening and query expansion on, the calibration's leave-one-out global
    scores are those of the shortlist stage run over the whole index (the same space and scale)."""
    from delf_pipeline import shortlist
    from delf_pipeline.formats.blocks import read_table

    config = load_config(overrides=["shortlist.whitening=\"supervised\"", "shortlist.whitening_shrinkage=0.1",
                                    "shortlist.qe_top_n=2", "rerank.num_to_rerank=0", 'shortlist.device="cpu"'])
    config.calibrate.sample = len(VIEWS)
    candidates = calibrate.loo_candidates(config, index_store, tmp_path / "work", labels=LABELS)
    staged = config.copy()
    staged.shortlist.exclude_same_id = True
    table = read_table(shortlist.run(staged, index_store, index_store, tmp_path / "s.csv", index_labels=LABELS))
    expected = table.set_index(["query_id", "index_id"])["score"]
    found = candidates.set_index(["query_id", "index_id"])["global_score"]
    assert len(found) and found.sort_index().round(5).equals(expected.loc[found.index].sort_index().round(5))


def test_leave_one_out_rerank_gives_the_cascade_the_index_images(index_store, tmp_path, monkeypatch):
    """The calibration re-ranks index photos against the index: its cascade's views stage and asift
    fallback read them from the index images (the same folder on both sides, split train), as
    the run's rerank reads its queries' and index images."""
    from delf_pipeline import extract, rerank

    seen = {}

    def fake_rerank(config, shortlist_csv, queries, index, out, **options):
        seen.update(options)
        raise StopIteration  # what the calibration makes of the rows is not this test's subject

    monkeypatch.setattr(rerank, "run", fake_rerank)
    monkeypatch.setattr(extract, "candidate_local_store", lambda *args: index_store)
    with pytest.raises(StopIteration):
        calibrate.loo_candidates(load_config(), index_store, tmp_path / "work", labels=LABELS,
                                 index_images=tmp_path / "images")
    assert (seen["query_images"], seen["query_split"]) == (tmp_path / "images", "train")
    assert (seen["index_images"], seen["index_split"]) == (tmp_path / "images", "train")


# ---------------------------------------------------------------- automatic: what run and index build do


def automatic(index_store, tmp_path, labels=LABELS, seconds=1e6, **options):
    return calibrate.automatic(load_config(), index_store, labels, tmp_path / "calibration.json", seconds=seconds,
                               limit="a fifth of the build's time", work=tmp_path / "work", **options)


def test_automatic_calibration_fits_and_says_so_in_one_line(index_store, tmp_path, caplog):
    caplog.set_level("INFO")
    assert automatic(index_store, tmp_path) == tmp_path / "calibration.json"
    lines = [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"]
    assert len(lines) == 1, lines  # the inner leave-one-out rerank and its progress are held back
    assert lines[0].startswith("calibration: P(right) fitted by leave-one-out on 16 index photos (12 right, 4 wrong)")
    caplog.clear()
    assert automatic(index_store, tmp_path) == tmp_path / "calibration.json"  # fitted on this store: kept
    assert "calibration: kept" in caplog.text


@pytest.mark.parametrize("labels, reason", [
    ({i: LABELS[i] for i in list(LABELS)[:9]}, "the index has 9 labelled photos, fewer than the 10 a leave-one-out fit "
                                              "needs"),
    ({i: i for i in LABELS}, "every place in the index has a single photo"),
    ({i: "everywhere" for i in LABELS}, "all 16 leave-one-out answers were right, so there is no wrong one"),
])
def test_automatic_calibration_says_why_not(index_store, tmp_path, caplog, labels, reason):
    caplog.set_level("INFO")
    assert automatic(index_store, tmp_path, labels) is None
    assert f"no calibration: {reason}" in caplog.text and "confidences are scores" in caplog.text
    assert not (tmp_path / "calibration.json").exists()


def test_automatic_calibration_sample_fits_the_time_given(index_store, tmp_path, caplog, monkeypatch):
    """Timed at 0.1 s per verified pair (the probe, replaced), 12 leave-one-out queries of
    calibrate.depth pairs fit in 12 x depth x 0.1 s; 9 do not reach the minimum of 10."""
    caplog.set_level("INFO")
    monkeypatch.setattr(calibrate, "measure_pair_seconds", lambda *args, **kwargs: (0.1, 15))
    depth = calibrate.loo_depth(load_config())
    assert automatic(index_store, tmp_path / "a", seconds=12 * depth * 0.1 + 1e-9) is not None
    assert Calibration.load(tmp_path / "a" / "calibration.json").settings["sample"] == 12
    assert automatic(index_store, tmp_path / "b", seconds=9 * depth * 0.1 + 1e-9) is None
    assert (f"no calibration: a fifth of the build's time ({9 * depth * 0.1:.0f} s) fits 9 leave-one-out queries (at "
            f"{depth * 0.1:.2f} s "
            "each), fewer than the 10 a fit needs") in caplog.text
