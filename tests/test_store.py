"""Tests of delf_pipeline.formats.store: part round trips, chunked global reads, errors, atomicity."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from delf_pipeline.formats.features import ImageFeatures, l2_normalize
from delf_pipeline.formats.images import ErrorRecord
from delf_pipeline.formats.store import (
    ExtractedImage,
    FeatureStore,
    read_errors,
    remove_store,
    write_part,
)
from delf_pipeline.utils.artifacts import DamagedArtifact

DIM, GLOBAL = 8, 6


def features(n: int, seed: int, with_global: bool = True) -> ImageFeatures:
    """n random local features [n, DIM] and a global descriptor [GLOBAL]."""
    rng = np.random.default_rng(seed)
    return ImageFeatures(
        locations=rng.uniform(0, 500, (n, 2)).astype(np.float32),
        descriptors=l2_normalize(rng.normal(size=(n, DIM))),
        scales=rng.uniform(1, 4, n).astype(np.float32),
        scores=rng.uniform(0, 1, n).astype(np.float32),
        global_descriptor=l2_normalize(rng.normal(size=GLOBAL)) if with_global else None,
    )


def image(image_id: str, n: int, seed: int, **kwargs) -> ExtractedImage:
    return ExtractedImage(image_id, features(n, seed, **kwargs), (100 + seed, 200 + seed))


def make_store(tmp_path, layout: dict[str, list[int]], dtype: str = "float32") -> tuple[FeatureStore, dict]:
    """A store whose part NAME holds one image per count in layout[NAME]; returns (store, {id: image})."""
    written, seed = {}, 0
    for name, counts in layout.items():
        images = []
        for n in counts:
            images.append(image(f"img{seed:02d}", n, seed))
            seed += 1
        write_part(tmp_path / "parts" / name, images, [], dtype, DIM)
        written.update({im.id: im for im in images})
    return FeatureStore(tmp_path), written


LAYOUT = {"p0": [3, 0, 5], "p1": [], "p2": [1, 4, 0, 2], "p3": [6, 7]}


def test_round_trip_float32_is_exact_including_zero_keypoint_images(tmp_path):
    store, written = make_store(tmp_path, LAYOUT)
    assert store.ids == sorted(written) and len(store) == 9
    for image_id, expected in written.items():
        got = store.features(image_id)
        for name in ("locations", "descriptors", "scales", "scores", "global_descriptor"):
            assert np.array_equal(getattr(got, name), getattr(expected.features, name)), name
        assert got.descriptors.shape == (expected.features.num_features, DIM)
        assert store.size(image_id) == expected.size
    assert store.features("img01").num_features == 0


def test_float16_halves_descriptors_and_stays_within_rounding(tmp_path):
    store, written = make_store(tmp_path, LAYOUT, dtype="float16")
    part = store.parts[0]
    assert part.array("descriptors").dtype == np.float16 and part.array("global").dtype == np.float16
    assert part.array("locations").dtype == np.float32
    got = store.features("img02")
    assert got.descriptors.dtype == np.float32
    assert np.allclose(got.descriptors, written["img02"].features.descriptors, atol=1e-3)
    assert np.array_equal(got.locations, written["img02"].features.locations)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 4, 5, 9, 100])
def test_iter_global_chunks_across_parts(tmp_path, chunk_rows):
    store, written = make_store(tmp_path, LAYOUT)
    chunks = list(store.iter_global(chunk_rows))
    assert all(len(ids) == chunk_rows for ids, _ in chunks[:-1])
    assert 0 < len(chunks[-1][0]) <= chunk_rows
    assert [i for ids, _ in chunks for i in ids] == store.ids
    matrix = np.concatenate([block for _, block in chunks])
    assert matrix.dtype == np.float32 and matrix.shape == (9, GLOBAL)
    assert np.array_equal(matrix, np.stack([written[i].features.global_descriptor for i in store.ids]))
    assert np.array_equal(matrix, store.global_matrix())


def test_global_matrix_of_chosen_ids_follows_their_order(tmp_path):
    store, written = make_store(tmp_path, LAYOUT, dtype="float16")
    matrix = store.global_matrix(["img07", "img00"])
    expected = np.stack([written[i].features.global_descriptor for i in ("img07", "img00")])
    assert matrix.shape == (2, GLOBAL) and np.allclose(matrix, expected, atol=1e-3)


def test_missing_id_names_the_id_and_the_store(tmp_path):
    store, _ = make_store(tmp_path, LAYOUT)
    assert "img03" in store and "nope" not in store
    with pytest.raises(KeyError, match=r"image id 'nope' is not in the feature store .*"):
        store.features("nope")


def test_errors_round_trip_and_count_as_finished(tmp_path):
    errors = [ErrorRecord("bad,1", "/x/bad,1.jpg", 'cannot decode image: "quoted", comma')]
    write_part(tmp_path / "parts" / "p0", [image("ok", 2, 0)], errors, "float32", DIM)
    write_part(tmp_path / "parts" / "p1", [], [ErrorRecord("gone", "/x/gone.jpg", "missing file")], "float32", DIM)
    store = FeatureStore(tmp_path)
    assert store.errors() == errors + [ErrorRecord("gone", "/x/gone.jpg", "missing file")]
    assert read_errors(tmp_path / "parts" / "p0" / "errors.csv") == errors
    assert store.finished_ids() == {"ok", "bad,1", "gone"}
    assert store.ids == ["ok"]


def test_part_of_only_failures_is_empty_but_valid(tmp_path):
    write_part(tmp_path / "parts" / "p0", [], [ErrorRecord("a", "a.jpg", "missing file")], "float16", DIM)
    store = FeatureStore(tmp_path)
    assert len(store) == 0 and store.ids == []
    assert list(store.iter_global(4)) == []
    assert store.global_matrix().shape == (0, 0)


def test_empty_store_reads_as_empty(tmp_path):
    (tmp_path / "parts").mkdir()
    store = FeatureStore(tmp_path)
    assert (len(store), store.ids, store.errors(), store.finished_ids()) == (0, [], [], set())
    assert list(store.iter_global()) == []


def test_no_store_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `delf-pipeline extract` first"):
        FeatureStore(tmp_path / "none")


def test_unfinished_temporary_parts_are_not_read(tmp_path):
    store, _ = make_store(tmp_path, {"p0": [2]})
    (tmp_path / "parts" / ".p1.abc.tmp").mkdir()  # what a killed writer leaves behind
    assert [p.path.name for p in FeatureStore(tmp_path).parts] == ["p0"]


def test_mixed_global_descriptors_fail_and_leave_no_part(tmp_path):
    images = [image("a", 2, 0), image("b", 2, 1, with_global=False)]
    with pytest.raises(ValueError, match="every image of a part has a global descriptor or none"):
        write_part(tmp_path / "parts" / "p0", images, [], "float32", DIM)
    assert not (tmp_path / "parts").exists() or list((tmp_path / "parts").iterdir()) == []


def test_store_without_global_descriptors_refuses_iter_global(tmp_path):
    write_part(tmp_path / "parts" / "p0", [image("a", 2, 0, with_global=False)], [], "float32", DIM)
    store = FeatureStore(tmp_path)
    assert store.features("a").global_descriptor is None
    with pytest.raises(ValueError, match="has no global descriptors"):
        list(store.iter_global())


def test_remove_store_keeps_lock_files_else_deletes_the_folder_and_tolerates_absence(tmp_path):
    make_store(tmp_path / "s", {"p0": [1]})
    (tmp_path / "s" / ".lock-s001of001").touch()  # held, maybe, by the process that is overwriting
    remove_store(tmp_path / "s")
    remove_store(tmp_path / "s")
    assert [p.name for p in (tmp_path / "s").iterdir()] == [".lock-s001of001"]
    make_store(tmp_path / "t", {"p0": [1]})
    remove_store(tmp_path / "t")  # no lock file: the folder goes too (a codebook sample store)
    remove_store(tmp_path / "absent")
    assert not (tmp_path / "t").exists()


def rss_file_kb() -> int:
    """Resident file-backed memory of this process (RssFile of /proc/self/status), kB."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status (not Linux)")


def test_release_unmaps_what_was_read_and_reads_go_on(tmp_path):
    store, written = make_store(tmp_path, {"p0": [40000] * 4}, "float16")  # descriptors: 4 x 40000 x 8 x 2 B
    before = rss_file_kb()
    read = {image_id: store.features(image_id).descriptors for image_id in written}  # float32 copies: touch every page
    mapped = rss_file_kb() - before
    store.release()
    assert mapped >= 2000 and rss_file_kb() - before <= mapped - 2000  # the descriptors' pages left RSS
    for image_id, descriptors in read.items():
        np.testing.assert_array_equal(store.features(image_id).descriptors, descriptors)


def with_kept(extracted: ExtractedImage, n: int, seed: int) -> ExtractedImage:
    """``extracted`` with n kept VLAD local features of 4 dimensions (XFeat's stand-in)."""
    rng = np.random.default_rng(100 + seed)
    kept = ImageFeatures(rng.uniform(0, 500, (n, 2)).astype(np.float32), l2_normalize(rng.normal(size=(n, 4))),
                         np.ones(n, np.float32), rng.uniform(0, 1, n).astype(np.float32))
    return ExtractedImage(extracted.id, replace(extracted.features, vlad_locals=kept), extracted.size)


def test_kept_vlad_local_features_round_trip_apart_from_the_main_ones(tmp_path):
    images = [with_kept(image("a", 3, 0), 5, 0), with_kept(image("b", 2, 1), 0, 1), with_kept(image("c", 0, 2), 4, 2)]
    write_part(tmp_path / "parts" / "p0", images, [], "float32", DIM)
    write_part(tmp_path / "parts" / "p1", [image("d", 2, 3)], [], "float32", DIM)  # a part without them
    store = FeatureStore(tmp_path)
    for extracted in images:
        main, kept = store.features(extracted.id), store.vlad_locals(extracted.id)
        assert main.vlad_locals is None, "the fast path's reads stay the main local features"
        assert np.array_equal(main.descriptors, extracted.features.descriptors)
        for name in ("locations", "descriptors", "scales", "scores"):
            assert np.array_equal(getattr(kept, name), getattr(extracted.features.vlad_locals, name)), name
    assert store.features("c").num_features == 0 and store.vlad_locals("c").descriptors.shape == (4, 4)
    assert store.vlad_locals("d") is None
    assert [part.has_vlad_locals for part in store.parts] == [True, False]
    with pytest.raises(KeyError, match="'e' is not in the feature store"):
        store.vlad_locals("e")


def test_kept_vlad_local_features_on_some_images_of_a_part_only_fail(tmp_path):
    with pytest.raises(ValueError, match="every image of a part has its VLAD's local features kept or none"):
        write_part(tmp_path / "parts" / "p0", [with_kept(image("a", 2, 0), 3, 0), image("b", 2, 1)], [],
                   "float32", DIM)


@pytest.mark.parametrize("damage", ["cut descriptors", "changed offsets"])
def test_damaged_kept_vlad_local_features_are_refused_by_part(tmp_path, damage):
    write_part(tmp_path / "parts" / "p0", [with_kept(image("a", 2, 0), 5, 0)], [], "float32", DIM)
    part = tmp_path / "parts" / "p0"
    if damage == "cut descriptors":
        data = (part / "vlad_descriptors.npy").read_bytes()
        (part / "vlad_descriptors.npy").write_bytes(data[:-8])
    else:
        np.save(part / "vlad_offsets.npy", np.array([0, 4], np.int64))  # same size, other content
    with pytest.raises(DamagedArtifact, match="store part .*p0 is damaged"):
        FeatureStore(tmp_path).vlad_locals("a")
