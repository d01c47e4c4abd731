"""A model's global descriptor with RootSIFT local features in one store (extract.local_backend)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from delf_pipeline import extract
from delf_pipeline.config import load_config
from delf_pipeline.formats.store import FeatureStore


def write_photos(folder, count=3, side=200):
    import skimage.data

    folder.mkdir(parents=True)
    for i, name in enumerate(("astronaut", "coffee", "chelsea")[:count]):
        Image.fromarray(getattr(skimage.data, name)()[:side, :side]).save(folder / f"p{i}.jpg")


def hybrid_config(model) -> dict:
    config = load_config("efficientnet_lite0_rootsift", overrides=[f'extract.model="{model}"'])
    config.extract.update(image_scales=[1.0], global_scale_indices=[], max_features=200)
    return config


def test_global_from_the_model_local_from_rootsift(delf_test_models, tmp_path):
    write_photos(tmp_path / "photos")
    model = delf_test_models["tf2_delg"]
    store = FeatureStore(extract.run(hybrid_config(model), tmp_path / "photos", tmp_path / "hybrid"))
    plain = load_config("efficientnet_lite0", overrides=[f'extract.model="{model}"', 'extract.backend="savedmodel"',
                                                         "extract.image_scales=[1.0]", "extract.global_scale_indices=[]"])
    plain.extract.max_image_size = 1024
    model_store = FeatureStore(extract.run(plain, tmp_path / "photos", tmp_path / "model"))
    for image_id in store.ids:
        features = store.features(image_id)
        assert 0 < features.num_features <= 200 and features.descriptors.shape[1] == 128  # RootSIFT
        np.testing.assert_allclose(features.global_descriptor, model_store.features(image_id).global_descriptor,
                                   atol=2e-3)  # the model's (float16 store)


def test_global_from_the_model_local_from_xfeat(delf_test_models, xfeat_weights_file, tmp_path):
    write_photos(tmp_path / "photos", count=2)
    config = hybrid_config(delf_test_models["tf2_delg"])
    config.extract.update(local_backend="xfeat", xfeat_weights=str(xfeat_weights_file.parent))
    store = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "hybrid"))
    for image_id in store.ids:
        features = store.features(image_id)
        assert 0 < features.num_features <= 200 and features.descriptors.shape[1] == 64  # XFeat
        assert features.global_descriptor.shape == (2048,)  # the DELG test model's


def test_unknown_local_backend_is_a_clear_error(delf_test_models):
    config = hybrid_config(delf_test_models["tf2_delg"])
    with pytest.raises(ValueError, match='extract.local_backend must be one of "", "rootsift", "xfeat", got .orb.'):
        config.extract.local_backend = "orb"


def test_fused_global_model_and_reduced_vlad_of_the_locals(delf_test_models, tmp_path):
    from delf_pipeline.extractors.vlad import vlad_global

    write_photos(tmp_path / "photos")
    model = delf_test_models["tf2_delg"]
    config = hybrid_config(model)
    config.extract.update(vlad_weight=0.4, vlad_words=4, vlad_dim=8, codebook_images=3, descriptor_dtype="float32")
    store = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "fused"))
    codebook = np.load(tmp_path / "fused" / "codebook.npy")
    assert codebook.shape == (4 + (1 + 2) * 4, 128)  # words, mean, 2 axes (3 sample images)
    plain = FeatureStore(extract.run(hybrid_config(model), tmp_path / "photos", tmp_path / "hybrid"))
    for image_id in store.ids:
        features = store.features(image_id)
        model_part, vlad_part = features.global_descriptor[:-2], features.global_descriptor[-2:]
        expected_model = plain.features(image_id).global_descriptor
        np.testing.assert_allclose(model_part, np.sqrt(0.6) * expected_model / np.linalg.norm(expected_model),
                                   atol=2e-3)
        np.testing.assert_allclose(vlad_part, np.sqrt(0.4) * vlad_global(features.descriptors, codebook, 4), atol=1e-5)
        assert abs(np.linalg.norm(features.global_descriptor) - 1) < 1e-3
    queries = extract.run(config, tmp_path / "photos", tmp_path / "queries", codebook=tmp_path / "fused" / "codebook.npy")
    np.testing.assert_allclose(FeatureStore(queries).global_matrix(), store.global_matrix(), atol=1e-5)


def test_fused_global_beside_the_models_own_local_features(delf_test_models, tmp_path):
    """extract.vlad_backend with no local_backend: the VLAD of RootSIFT features goes into the
    global descriptor; the local features stored are the model's."""
    from delf_pipeline.extractors.rootsift import extract_rootsift
    from delf_pipeline.extractors.vlad import vlad_global
    from delf_pipeline.formats.images import load_image

    write_photos(tmp_path / "photos")
    model = delf_test_models["tf2_delg"]
    config = load_config("efficientnet_lite0", overrides=[f'extract.model="{model}"', "extract.image_scales=[1.0]",
                                                          "extract.global_scale_indices=[]", "extract.max_features=200"])
    own = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "model"))
    config.extract.update(vlad_weight=0.4, vlad_backend="rootsift", vlad_words=4, vlad_dim=8, codebook_images=3)
    store = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "fused"))
    codebook = np.load(tmp_path / "fused" / "codebook.npy")
    for image_id in store.ids:
        features, plain = store.features(image_id), own.features(image_id)
        np.testing.assert_array_equal(features.descriptors, plain.descriptors)  # the model's locals
        np.testing.assert_array_equal(features.locations, plain.locations)
        model_part, vlad_part = features.global_descriptor[:-2], features.global_descriptor[-2:]
        expected = plain.global_descriptor / np.linalg.norm(plain.global_descriptor)
        np.testing.assert_allclose(model_part, np.sqrt(0.6) * expected, atol=2e-3)
        image, _ = load_image(tmp_path / "photos" / f"{image_id}.jpg", 1024, "RGB")
        sift = extract_rootsift(image, 200)
        np.testing.assert_allclose(vlad_part, np.sqrt(0.4) * vlad_global(sift.descriptors, codebook, 4), atol=2e-3)


def test_a_fused_model_without_local_features_to_fuse_is_a_clear_error(delf_test_models, tmp_path):
    write_photos(tmp_path / "photos", count=1)
    config = load_config("efficientnet_lite0", overrides=[f'extract.model="{delf_test_models["tf2_delg"]}"',
                                                          "extract.vlad_weight=0.4"])
    with pytest.raises(ValueError, match="set extract.vlad_backend"):
        extract.run(config, tmp_path / "photos", tmp_path / "fused")
    config.extract.update(local_backend="rootsift", vlad_backend="xfeat")
    with pytest.raises(ValueError, match="differs from extract.local_backend"):
        extract.run(config, tmp_path / "photos", tmp_path / "fused2")


def test_the_default_without_its_codebook_names_what_it_fuses():
    from delf_pipeline.extractors.build import build

    with pytest.raises(ValueError, match="savedmodel backend fused with the VLAD of xfeat needs its VLAD codebook"):
        build(load_config().extract)


def fused_xfeat_config(model, weights_folder, *more: str):
    """The default's layout on the DELG test model: its own local features stored, its global
    fused with the VLAD of XFeat features (4 words), those XFeat features kept."""
    return load_config(None, overrides=[f'extract.model="{model}"', "extract.image_scales=[1.0]",
                                        "extract.global_scale_indices=[]", "extract.max_features=200",
                                        "extract.vlad_words=4", "extract.vlad_dim=8", "extract.codebook_images=3",
                                        f'extract.xfeat_weights="{weights_folder}"', "extract.keep_vlad_locals=true",
                                        *more])


def test_the_fused_xfeat_features_are_kept_beside_the_models_own(delf_test_models, xfeat_weights_file, tmp_path):
    """keep_vlad_locals: the XFeat features the VLAD is made of, stored as vlad_locals in
    original-image pixels (the photos are scaled down by max_image_size), apart from the model's."""
    from delf_pipeline.extractors.build import local_extractor
    from delf_pipeline.formats.images import load_image

    write_photos(tmp_path / "photos", count=2)
    config = fused_xfeat_config(delf_test_models["tf2_delg"], xfeat_weights_file.parent, "extract.max_image_size=150",
                                "extract.descriptor_dtype=float32")
    store = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "fused"))
    xfeat = local_extractor(config.extract, "xfeat")
    for image_id in store.ids:
        image, factors = load_image(tmp_path / "photos" / f"{image_id}.jpg", 150, "RGB")
        expected = xfeat(image)
        kept, own = store.vlad_locals(image_id), store.features(image_id)
        assert kept.descriptors.shape[1] == 64 and own.descriptors.shape[1] == 32  # XFeat's beside the test model's
        np.testing.assert_array_equal(kept.descriptors, expected.descriptors)
        np.testing.assert_allclose(kept.locations, expected.locations * factors.astype(np.float32), rtol=1e-6)
        assert factors[0] > 1, "the photo was scaled down: locations are mapped back"
    config.extract.keep_vlad_locals = False
    plain = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "plain"))
    assert all(plain.vlad_locals(i) is None for i in plain.ids)
    np.testing.assert_array_equal(plain.global_matrix(), store.global_matrix())  # the same global descriptor
