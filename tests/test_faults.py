"""Fault injection (issue 12): kill -9 at seeded random points of every stage, then resume;
concurrent writers of one store and of one run folder; corrupted parts, blocks, manifests and
ids.txt. Every case must end in the bytes of a clean run or a one-line refusal naming the file
with the documented exit code, never exit 0 with a different result.

Stages run in forked children of the test process (no interpreter start-up per run); a kill
point is "the N-th call of a delf_pipeline function in the main thread", drawn with a seed.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from delf_pipeline import cli
from delf_pipeline.formats.blocks import block_path
from delf_pipeline.utils.artifacts import output_lock, shard_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.synthetic_images import FAST, write_csv, write_kaggle, write_photos  # noqa: E402

KILLS_PER_STAGE = 8


def forked(argv: list[str], cwd: Path, kill_at: int | None = None) -> tuple[int, int, str]:
    """Run ``delf-pipeline ARGV`` in a forked child (in ``cwd``). With ``kill_at`` the child sends
    itself SIGKILL at its kill_at-th delf_pipeline call. Returns (exit code, or -9 when killed;
    calls counted; stderr)."""
    err = tempfile.TemporaryFile()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        os.dup2(err.fileno(), 2)
        os.dup2(err.fileno(), 1)
        code, calls = 99, 0
        logging.getLogger().handlers.clear()  # pytest's capture: let the command log to this stderr
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        try:
            os.chdir(cwd)

            def profile(frame, event, _arg):
                nonlocal calls
                if event == "call" and frame.f_globals.get("__name__", "").startswith("delf_pipeline"):
                    calls += 1
                    if calls == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)

            sys.setprofile(profile)
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
        finally:
            sys.setprofile(None)
            os.write(write_end, str(calls).encode())
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(code)
    os.close(write_end)
    calls = os.read(read_end, 64)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    err.seek(0)
    return code, int(calls or 0), err.read().decode("utf-8", "replace")


def stage_commands(data: Path) -> list[list[str]]:
    """The five stages on the Kaggle folder ``data``, then a rerank with a verification cascade,
    outputs relative to the working folder."""
    return [
        ["extract", "--images", str(data), "--split", "train", "--out", "index", *FAST],
        ["extract", "--images", str(data), "--split", "test", "--out", "query", "--codebook", "index/codebook.npy",
         *FAST],
        ["shortlist", "--index", "index", "--queries", "query", "--out", "shortlist.csv", *FAST],
        ["rerank", "--shortlist", "shortlist.csv", "--queries", "query", "--index", "index", "--out", "rerank.csv",
         *FAST],
        ["predict", "--shortlist", "shortlist.csv", "--rerank", "rerank.csv", "--index-labels",
         str(data / "train.csv"), "--queries", str(data / "sample_submission.csv"), "--out", "submission.csv", *FAST],
        # the verification cascade: views of the selected queries extracted from their images at rerank time
        ["rerank", "--shortlist", "shortlist.csv", "--queries", "query", "--index", "index", "--out", "cascade.csv",
         "--index-labels", str(data / "train.csv"), "--query-images", str(data), *FAST, "--set", "rerank.cascade=views",
         "--set", "rerank.cascade_tilts=[1, 2]", "--set", "rerank.cascade_pairs=2",
         "--set", "rerank.cascade_inliers=1000"],
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file, without lock files and the temporaries of a kill."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".lock-") and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Kaggle data and the folders after each stage of a clean run: {"data", "after": [Path] * 6}."""
    root = tmp_path_factory.mktemp("faults")
    write_kaggle(root / "data")
    commands = stage_commands(root / "data")
    after = [root / "after0"]
    after[0].mkdir()
    for number, argv in enumerate(commands, start=1):
        shutil.copytree(after[-1], root / f"after{number}")
        after.append(root / f"after{number}")
        code, _, stderr = forked(argv, after[-1])
        assert code == 0, stderr
    assert (after[-1] / "submission.csv").read_text().count("\n") == 4
    return {"root": root, "data": root / "data", "after": after, "commands": commands}


def rel(work: Path, path: Path) -> str:
    """``path`` as the commands, run in ``work`` with relative paths, name it."""
    return str(path.relative_to(work))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def assert_refused(code: int, stderr: str, expected_code: int, names: str) -> None:
    """A one-line refusal: the documented exit code, one ERROR line naming ``names``, no traceback."""
    assert code == expected_code, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and names in lines[0], stderr
    assert "Traceback" not in stderr


# ------------------------------------------------------------------ kill -9 at random points, resume


SLOW = pytest.mark.slow  # ~10 s on 2 busy cores: 17 extractions


@pytest.mark.parametrize("stage", [pytest.param(0, id="extract-index", marks=SLOW),
                                   pytest.param(1, id="extract-query", marks=SLOW),
                                   pytest.param(2, id="shortlist"), pytest.param(3, id="rerank"),
                                   pytest.param(4, id="predict"), pytest.param(5, id="rerank-cascade")])
def test_kill_at_seeded_random_points_then_resume_gives_the_clean_bytes(reference, tmp_path, stage):
    before, expected = reference["after"][stage], snapshot(reference["after"][stage + 1])
    argv = reference["commands"][stage]
    probe = tmp_path / "probe"
    shutil.copytree(before, probe)
    code, calls, stderr = forked(argv, probe)
    assert code == 0 and calls > KILLS_PER_STAGE, stderr
    points = sorted(random.Random(12 + stage).sample(range(1, calls + 1), KILLS_PER_STAGE))
    for point in points:
        work = tmp_path / f"kill{point}"
        shutil.copytree(before, work)
        killed, _, _ = forked(argv, work, kill_at=point)
        assert killed == -signal.SIGKILL, f"no kill at call {point} of {calls}"
        code, _, stderr = forked(argv, work)
        assert code == 0, f"resume after a kill at call {point}: {stderr}"
        assert snapshot(work) == expected, f"kill at call {point} of {calls}"


def test_three_kills_in_a_row_then_resume(reference, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(reference["after"][0], work)
    argv = reference["commands"][0]
    for point in (40, 400, 900):
        forked(argv, work, kill_at=point)
    code, _, stderr = forked(argv, work)
    assert code == 0, stderr
    assert snapshot(work) == snapshot(reference["after"][1])


# ------------------------------------------------------------------ two writers of one output


def test_a_second_writer_of_a_store_shard_is_refused_while_the_first_holds_it(reference, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(reference["after"][0], work)
    with output_lock(work / "index", shard_name((1, 1)), "feature store"):
        code, _, stderr = forked(reference["commands"][0], work)
    assert_refused(code, stderr, cli.EXIT_BUSY, rel(work, work / "index"))
    assert "another process" in stderr
    code, _, stderr = forked(reference["commands"][0], work)  # the lock died with its holder
    assert code == 0, stderr
    assert snapshot(work) == snapshot(reference["after"][1])


def test_a_second_writer_of_a_block_shard_is_refused(reference, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(reference["after"][2], work)
    with output_lock(work / "shortlist.csv.blocks", shard_name((1, 1)), "shortlist"):
        code, _, stderr = forked(reference["commands"][2], work)
    assert_refused(code, stderr, cli.EXIT_BUSY, "shortlist.csv.blocks")


def race(argv: list[str], cwd: Path) -> list[int]:
    """Exit codes of two forked runs of ``argv`` started together."""
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            code = 99
            try:
                os.chdir(cwd)
                code = cli.main(argv)
            finally:
                os._exit(code)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


@pytest.mark.parametrize("round_", range(3))
def test_two_concurrent_extracts_of_one_store_store_every_image_once(reference, tmp_path, round_):
    work = tmp_path / "work"
    shutil.copytree(reference["after"][0], work)
    codes = race(reference["commands"][0], work)
    assert sorted(codes) in ([0, 0], [0, cli.EXIT_BUSY]), codes
    assert snapshot(work) == snapshot(reference["after"][1])


def test_two_concurrent_runs_into_one_folder_give_the_single_run_files(reference, tmp_path):
    data = reference["data"]
    argv = ["run", "--data", str(data), "--out", "out", *FAST]
    alone = tmp_path / "alone"
    alone.mkdir()
    assert forked(argv, alone)[0] == 0
    both = tmp_path / "both"
    both.mkdir()
    codes = race(argv, both)
    assert sorted(codes) in ([0, 0], [0, cli.EXIT_BUSY]), codes
    assert snapshot(both) == snapshot(alone)


# ------------------------------------------------------------------ corrupted artifacts


def first_part(store: Path) -> Path:
    return sorted((store / "parts").iterdir())[0]


def copy_of(reference, tmp_path, stage: int = 5) -> Path:
    work = tmp_path / "work"
    shutil.copytree(reference["after"][stage], work)
    return work


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPT_PART = {
    "truncated descriptors": lambda part: truncate(part / "descriptors.npy"),
    "empty descriptors": lambda part: (part / "descriptors.npy").write_bytes(b""),
    "random global": lambda part: (part / "global.npy").write_bytes(
        np.random.default_rng(0).bytes((part / "global.npy").stat().st_size)),
    "appended id": lambda part: (part / "ids.txt").write_text((part / "ids.txt").read_text() + "ghost\n"),
    "swapped ids": lambda part: (part / "ids.txt").write_text(
        "".join(reversed((part / "ids.txt").read_text().splitlines(keepends=True)))),
    "no checksums": lambda part: (part / "part.json").unlink(),
}


@pytest.mark.parametrize("damage", list(CORRUPT_PART))
def test_a_damaged_part_is_refused_by_name_at_every_stage_that_reads_it(reference, tmp_path, damage):
    work = copy_of(reference, tmp_path)
    part = first_part(work / "index")
    CORRUPT_PART[damage](part)
    (work / "rerank.csv").unlink()
    shutil.rmtree(work / "rerank.csv.blocks")
    for stage in (0, 3):  # extract (resume) and rerank read the index store
        code, _, stderr = forked(reference["commands"][stage], work)
        assert_refused(code, stderr, cli.EXIT_DAMAGED, rel(work, part))


def test_a_store_holding_an_id_twice_is_refused(reference, tmp_path):
    work = copy_of(reference, tmp_path)
    part = first_part(work / "index")
    shutil.copytree(part, part.with_name(part.name.replace("-p", "-q")))  # what two writers used to leave
    code, _, stderr = forked(reference["commands"][2], work)
    assert_refused(code, stderr, cli.EXIT_DAMAGED, rel(work, work / "index"))
    assert "twice" in stderr


CORRUPT_BLOCK = {
    "cut in half": truncate,
    "text garbage": lambda path: path.write_text("query_id,index_id\nnot,a block\n"),
    "binary garbage": lambda path: path.write_bytes(np.random.default_rng(1).bytes(300)),
    "rows dropped": lambda path: path.write_text("".join(path.read_text().splitlines(keepends=True)[:-2])),
    "empty": lambda path: path.write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(CORRUPT_BLOCK))
@pytest.mark.parametrize("stage,name", [(2, "shortlist.csv"), (3, "rerank.csv")])
def test_a_damaged_block_is_recomputed_and_the_result_is_the_clean_one(reference, tmp_path, damage, stage, name):
    work = copy_of(reference, tmp_path, stage + 1)
    CORRUPT_BLOCK[damage](block_path(work / name, 0))
    code, _, stderr = forked(reference["commands"][stage], work)
    assert code == 0, stderr
    assert "recomputing" in stderr
    assert snapshot(work) == snapshot(reference["after"][stage + 1])


def test_a_block_of_another_shard_that_is_damaged_is_refused_by_name(reference, tmp_path):
    work = copy_of(reference, tmp_path, 3)
    path = block_path(work / "shortlist.csv", 0)
    truncate(path)
    code, _, stderr = forked([*reference["commands"][2], "--shard", "2/2"], work)
    assert_refused(code, stderr, cli.EXIT_DAMAGED, rel(work, path))


@pytest.mark.parametrize("stage,manifest", [(0, "index/manifest.json"), (2, "shortlist.csv.blocks/manifest.json"),
                                            (3, "rerank.csv.blocks/manifest.json")])
def test_artifacts_without_their_manifest_are_refused_and_rebuilt_with_overwrite(reference, tmp_path, stage,
                                                                                 manifest):
    work = copy_of(reference, tmp_path, stage + 1)
    (work / manifest).unlink()
    code, _, stderr = forked(reference["commands"][stage], work)
    assert_refused(code, stderr, cli.EXIT_DAMAGED, rel(work, work / manifest))
    code, _, stderr = forked([*reference["commands"][stage], "--overwrite"], work)
    assert code == 0, stderr
    assert snapshot(work) == snapshot(reference["after"][stage + 1])


def test_a_manifest_that_is_not_json_is_refused_by_name(reference, tmp_path):
    work = copy_of(reference, tmp_path, 1)
    (work / "index/manifest.json").write_text('{"settings": ')
    code, _, stderr = forked(reference["commands"][0], work)
    assert_refused(code, stderr, cli.EXIT_DAMAGED, rel(work, work / "index/manifest.json"))


def test_a_codebook_of_random_bytes_is_refused_by_name_never_unpickled(reference, tmp_path):
    work = copy_of(reference, tmp_path, 1)
    (work / "index/codebook.npy").write_bytes(np.random.default_rng(2).bytes(600))
    code, _, stderr = forked(reference["commands"][1], work)
    assert_refused(code, stderr, cli.EXIT_DAMAGED, "codebook.npy")
    assert "pickle" not in stderr


# ------------------------------------------------------------------ issue 22 D2: --overwrite under the output's lock


def test_index_build_overwrite_waits_for_no_one_and_deletes_nothing_while_another_writer_holds_the_index(tmp_path):
    ids = write_photos(tmp_path / "photos", places=2)
    write_csv(tmp_path / "labels.csv", ("id", "landmark_id"), [(i, i[:2]) for i in ids])
    argv = ["index", "build", "--images", "photos", "--labels", "labels.csv", "--out", "idx", *FAST]
    code, _, stderr = forked(argv, tmp_path)
    assert code == 0, stderr
    before = snapshot(tmp_path / "idx")
    with output_lock(tmp_path / "idx", "index", "index"):  # what `index add` holds while it writes
        code, _, stderr = forked([*argv, "--overwrite"], tmp_path)
    assert_refused(code, stderr, cli.EXIT_BUSY, "idx")
    assert snapshot(tmp_path / "idx") == before


# ------------------------------------------------------------------ issue 22 D1: `index add` finishes what a run left


def views_settings() -> list[str]:
    """test_index's SMALL settings on the RootSIFT preset. A forked child must not run a TensorFlow
    model (XFeat, the default preset) once one has run in this process, as earlier test files do:
    TensorFlow's thread pool does not survive the fork and the child hangs."""
    from test_index import SMALL

    return ["--preset", "sift_default", *[arg for key in SMALL for arg in ("--set", key)]]


@pytest.fixture(scope="module")
def views_index(tmp_path_factory) -> Path:
    """An index of three scikit-image photos (three views each), views of a fourth to add
    (``more/``, labels in more.csv) and a query view of it, on the RootSIFT preset
    (:func:`views_settings`). Extractions run in forked children only (a model's threads in this
    process would deadlock the next fork)."""
    from test_index import PHOTOS, labels_csv, write_views

    root = tmp_path_factory.mktemp("views_index")
    first = write_views(root / "first", PHOTOS[:3], 3, seed=1)
    labels_csv(write_views(root / "more", PHOTOS[3:], 3, seed=2), root / "more.csv")
    write_views(root / "queries", PHOTOS[3:], 1, seed=3)
    code, _, stderr = forked(["index", "build", "--images", str(first), "--labels", str(labels_csv(first, root / "first.csv")),
                              "--out", str(root / "idx"), "--previews", "64", *views_settings()], root)
    assert code == 0, stderr
    return root


def in_child(function, *args) -> str:
    """Run ``function(*args)`` in a forked child; returns "" or the text of what it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        message = ""
        try:
            function(*args)
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            message = f"{type(error).__name__}: {error}" or "failed"
        os.write(write_end, message.encode()[:60000])
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def added_and_found(idx: Path, root: Path) -> None:
    """Every stored image labelled and with its preview; the added place found by a query."""
    from delf_pipeline.formats.index_folder import open_index
    from delf_pipeline.search.searcher import Searcher

    opened = open_index(idx)
    assert len(opened.store) == 12, len(opened.store)
    labels = {i: opened.labels.get(i) for i in opened.store.ids if i.startswith("rocket/")}
    assert labels == {f"rocket/v{k}": "rocket" for k in range(3)}, labels
    assert all(opened.preview(i) is not None for i in opened.store.ids), "a stored image has no preview"
    answer = Searcher(idx).search_file(root / "queries" / "rocket" / "v0.jpg")
    assert answer.landmarks and answer.landmarks[0]["landmark_id"] == "rocket", answer.landmarks


def assert_added_and_found(idx: Path, root: Path) -> None:
    failure = in_child(added_and_found, idx, root)
    assert not failure, failure


def test_a_failed_index_add_then_a_corrected_one_gives_labelled_photos_that_query_finds(views_index, tmp_path):
    from delf_pipeline.formats.store import FeatureStore

    idx = shutil.copytree(views_index / "idx", tmp_path / "idx")
    add = ["index", "add", str(idx), "--images", str(views_index / "more")]
    code, _, stderr = forked([*add, "--labels", str(views_index / "first.csv")], tmp_path)  # labels of other photos
    assert_refused(code, stderr, cli.EXIT_USAGE, "first.csv")
    assert len(FeatureStore(idx / "store")) == 9, "a part was stored without its labels"
    code, _, stderr = forked([*add, "--labels", str(views_index / "more.csv")], tmp_path)
    assert code == 0, stderr
    assert_added_and_found(idx, views_index)


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _refused(*_args, **_kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def _kill_after(function):
    def run(*args, **kwargs):
        function(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return run


@pytest.mark.parametrize("failure", ["disk full while writing previews", "labels.csv write refused",
                                     "kill -9 after the part"])
def test_an_index_add_that_failed_after_its_part_is_finished_by_the_next_add(views_index, tmp_path, monkeypatch,
                                                                             failure):
    from PIL import Image

    from delf_pipeline import extract, index

    idx = shutil.copytree(views_index / "idx", tmp_path / "idx")
    add = ["index", "add", str(idx), "--images", str(views_index / "more"), "--labels",
           str(views_index / "more.csv")]
    with monkeypatch.context() as patch:  # in the forked child only
        if failure == "disk full while writing previews":
            patch.setattr(Image.Image, "save", _disk_full)
        elif failure == "labels.csv write refused":
            patch.setattr(index, "write_text_atomic", _refused)
        else:
            patch.setattr(extract, "run", _kill_after(extract.run))
        code, _, stderr = forked(add, tmp_path)
    assert code in (cli.EXIT_OS, -signal.SIGKILL), stderr
    code, _, stderr = forked(add, tmp_path)
    assert code == 0, stderr
    assert_added_and_found(idx, views_index)


@SLOW
def test_an_index_build_killed_while_it_calibrates_itself_is_rebuilt_by_overwrite(tmp_path, monkeypatch):
    """The build's own calibration (calibrate.automatic) leaves its leave-one-out work in
    INDEX/calibrating/ when killed: the index's own files, which --overwrite deletes (not a
    user's, which it would refuse)."""
    from test_index import PHOTOS, write_views

    from delf_pipeline import calibrate
    from delf_pipeline.formats.index_folder import INDEX_LAYOUT
    from delf_pipeline.utils.artifacts import foreign_entries

    write_views(tmp_path / "photos", PHOTOS, 3, seed=5)  # as test_index's calibrated index: 14 labelled photos,
    write_views(tmp_path / "photos", ("hubble_deep_field", "camera"), 1, seed=6)  # two places of one (a wrong answer)
    argv = ["index", "build", "--images", "photos", "--out", "idx", "--previews", "0", *views_settings()]
    monkeypatch.setattr(calibrate, "AUTO_SHARE", 1000.0)  # no time limit: the calibration runs
    with monkeypatch.context() as patch:  # in the forked child only
        patch.setattr(calibrate, "automatic", _kill_after(calibrate.automatic))
        code, _, stderr = forked(argv, tmp_path)
    assert code == -signal.SIGKILL, stderr
    assert (tmp_path / "idx" / "calibrating" / "automatic.json").is_file()
    assert list((tmp_path / "idx" / "calibrating").glob("loo-*/rerank.csv.blocks/block-*.csv"))
    assert foreign_entries(tmp_path / "idx", INDEX_LAYOUT) == []
    code, _, stderr = forked([*argv, "--overwrite"], tmp_path)
    assert code == 0, stderr
    assert not (tmp_path / "idx" / "calibrating").exists()
    assert (tmp_path / "idx" / "calibration.json").is_file()


def test_a_kill_while_the_codebook_sample_is_removed_then_resume_gives_the_clean_bytes(reference, tmp_path,
                                                                                      monkeypatch):
    from delf_pipeline.extractors import codebook

    def remove_one_file_then_die(path: Path) -> None:
        next(p for p in sorted(path.rglob("*")) if p.is_file()).unlink()
        os.kill(os.getpid(), signal.SIGKILL)

    work = tmp_path / "work"
    shutil.copytree(reference["after"][0], work)
    with monkeypatch.context() as patch:  # in the forked child only
        patch.setattr(codebook, "remove_store", remove_one_file_then_die)
        code, _, _ = forked(reference["commands"][0], work)
    assert code == -signal.SIGKILL
    code, _, stderr = forked(reference["commands"][0], work)
    assert code == 0, stderr
    assert snapshot(work) == snapshot(reference["after"][1])
