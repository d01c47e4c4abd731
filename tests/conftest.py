"""Shared fixtures: the tiny DELF/DELG test models are exported once per session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def delf_test_models(tmp_path_factory) -> dict[str, Path]:
    """{"tf1_delg" | "tf2_delg" | "hub_delf": SavedModel folder}, random seeded weights."""
    pytest.importorskip("tensorflow", reason="the DELF/DELG test models need TensorFlow")
    from delf_pipeline.testing.export_test_models import export_all

    return export_all(tmp_path_factory.mktemp("models"))
