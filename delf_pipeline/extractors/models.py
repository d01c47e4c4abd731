"""Load real DELF/DELG models (the ``savedmodel`` and ``hub`` backends) behind one call.

:func:`load_extractor` loads a model once and returns ``extract(image) -> ImageFeatures``.
Three export styles are recognised from what the folder holds, not from a flag:

* ``tf1``: official TF1 exports (and the Kaggle 2020 ``delg-saved-models/local_and_global``),
  read through ``.prune`` on the tensors ``input_image:0``, ``input_scales:0``,
  ``input_max_feature_num:0``, ``input_abs_thres:0`` -> ``boxes:0``, ``features:0``,
  ``scales:0``, ``scores:0`` and, for DELG, ``global_descriptors:0`` (one row per scale,
  or per selected scale when the graph also has ``input_global_scales_ind:0``).
* ``tf2``: official TF2 exports (``export_local_and_global_model.py``, and
  :mod:`delf_pipeline.extractors.delg_export`): signature ``serving_default`` with the same input
  names plus ``input_global_scales_ind``.
* ``hub``: TF Hub DELF v1 (``google/delf/1``): signature ``default`` taking ``image``
  float [0, 1], ``image_scales``, ``score_threshold``, ``max_feature_num`` and giving
  ``locations`` (y, x) and ``descriptors`` [N, 40]. It gives no scales, attention or
  global descriptor: ``scales`` and ``scores`` are NaN and ``global_descriptor`` is None.

Post-processing follows the official ``extractor.py``: keypoint = centre of the receptive
box, local descriptors L2-normalised, global descriptor = L2 per scale, summed over the
configured scales, L2. The models' ``scales`` output is 1 / pyramid scale (official
convention); :class:`ImageFeatures` reports the pyramid scale itself.
TensorFlow is imported only when a model is loaded; no device is pinned (GPU when seen).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import ExtractSettings
from ..formats.features import ImageFeatures, l2_normalize

MIN_IMAGE_SIDE = 10  # official extractor: smaller images give no features
BACKENDS = ("savedmodel", "hub")
TF1_FEEDS = ("input_image:0", "input_scales:0", "input_max_feature_num:0", "input_abs_thres:0")
TF1_FETCHES = ("boxes:0", "features:0", "scales:0", "scores:0")
TF1_GLOBAL_FEED, TF1_GLOBAL_FETCH = "input_global_scales_ind:0", "global_descriptors:0"
TF2_INPUTS = ("input_image", "input_scales", "input_max_feature_num", "input_abs_thres")
TF2_OUTPUTS = ("boxes", "features", "scales", "scores")
HUB_INPUTS = ("image", "image_scales", "score_threshold", "max_feature_num")
HUB_OUTPUTS = ("locations", "descriptors")

# What one run of a model gives: (locations [N, 2] (y, x), descriptors [N, D],
# pyramid scales [N], scores [N], per-scale global rows [G, 2048] or None).
Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"]


def load_extractor(conf: ExtractSettings) -> Callable[[np.ndarray], ImageFeatures]:
    """Load the model named by ``conf`` once; return ``extract(image)``.

    conf: the ``extract`` settings (backend, model, image_scales, global_scale_indices,
    score_threshold, max_features; their ranges are checked when they are loaded). ``image``: RGB uint8
    [H, W, 3], already resized by the caller, at least 10 px per side. Returns
    ImageFeatures with locations (y, x) in that image's pixels. The returned function
    has an attribute ``style`` ("tf1" | "tf2" | "hub").
    """
    settings = _model_inputs(conf)
    path = _resolve(conf.model, conf.backend)
    model = _load_saved_model(path)
    style = _detect_style(model, path)
    run = {"tf1": _tf1_runner, "tf2": _tf2_runner, "hub": _hub_runner}[style](model, settings)

    def extract(image: np.ndarray) -> ImageFeatures:
        _check_image(image)
        return _to_features(*run(image))

    extract.style = style
    return extract


def _model_inputs(conf: ExtractSettings) -> dict[str, Any]:
    """The model's inputs: scales [S], global indices [G], threshold, max features."""
    if conf.backend not in BACKENDS:
        raise ValueError(f"extract.backend {conf.backend!r} does not load a DELF/DELG model; use one of {BACKENDS}")
    scales = [float(s) for s in conf.image_scales]
    return {"scales": scales, "global_indices": _global_indices(conf, len(scales)),
            "threshold": float(conf.score_threshold), "max_features": int(conf.max_features)}


def _global_indices(conf: ExtractSettings, num_scales: int) -> list[int]:
    """Sorted unique indices into image_scales; empty means every scale (official default)."""
    indices = sorted(set(conf.global_scale_indices)) or list(range(num_scales))
    bad = [i for i in indices if not 0 <= i < num_scales]
    if bad:
        raise ValueError(f"extract.global_scale_indices {bad} out of range for {num_scales} image_scales")
    return indices


def _resolve(handle: str, backend: str) -> Path:
    """A local model folder from a path, or from a TF Hub handle (backend ``hub``)."""
    handle = handle.strip()
    if not handle:
        raise ValueError("extract.model is empty: give the model folder with --set extract.model=PATH")
    if "://" in handle:
        if backend != "hub":
            raise ValueError(f"extract.model {handle!r} is a URL; URLs need extract.backend = 'hub'")
        return _fetch_hub(handle)
    path = Path(handle).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; a SavedModel is a folder holding saved_model.pb")
    if not any((path / name).is_file() for name in ("saved_model.pb", "saved_model.pbtxt")):
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise ValueError(f"{path} is not a SavedModel: no saved_model.pb (found: {found})")
    return path


def _fetch_hub(handle: str) -> Path:
    """Download (or find in the TF Hub cache) a hub handle; a clear error without network."""
    import tensorflow as tf

    try:
        import tensorflow_hub as hub
    except ImportError:
        raise ValueError(f"{handle!r} is a TF Hub handle but tensorflow_hub is not installed; "
                         "download the model and set extract.model to its folder") from None
    try:
        return Path(hub.resolve(handle))
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise ValueError(
            f"cannot fetch TF Hub model {handle!r} ({type(error).__name__}: {error}). This machine may have "
            "no network: download and unpack the model where there is one, then set extract.model to "
            "that folder"
        ) from None


def _load_saved_model(path: Path):
    """tf.saved_model.load with the tags TF Hub TF1 modules need (none)."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    tags = [] if (path / "tfhub_module.pb").is_file() else None
    try:
        return tf.saved_model.load(str(path), tags=tags)
    except (OSError, ValueError, RuntimeError, DecodeError, tf.errors.OpError) as error:
        raise ValueError(f"{path}: cannot load SavedModel ({type(error).__name__}: {error})") from None


def _detect_style(model, path: Path) -> str:
    """"hub", "tf1" or "tf2" from the signatures and tensors found; ValueError otherwise."""
    signatures = dict(getattr(model, "signatures", {}))
    if "default" in signatures and "image" in _input_specs(signatures["default"]):
        _require(path, "hub signature 'default'", _input_specs(signatures["default"]), HUB_INPUTS,
                 signatures["default"].structured_outputs, HUB_OUTPUTS)
        return "hub"
    if hasattr(model, "prune") and _has_tensor(model.graph, TF1_FEEDS[0]):
        names = [n for n in TF1_FEEDS + TF1_FETCHES if _has_tensor(model.graph, n)]
        _require(path, "TF1 graph", names, TF1_FEEDS, names, TF1_FETCHES)
        return "tf1"
    if "serving_default" in signatures and "input_image" in _input_specs(signatures["serving_default"]):
        serving = signatures["serving_default"]
        _require(path, "signature 'serving_default'", _input_specs(serving), TF2_INPUTS,
                 serving.structured_outputs, TF2_OUTPUTS)
        return "tf2"
    found = {name: sorted(_input_specs(fn)) for name, fn in signatures.items()}
    raise ValueError(
        f"{path} is a SavedModel but not a DELF/DELG export: signatures {found or 'none'}; expected a "
        f"TF1 graph with {TF1_FEEDS[0]}, 'serving_default' with inputs {list(TF2_INPUTS)}, or a hub "
        f"'default' signature with inputs {list(HUB_INPUTS)}"
    )


def _require(path: Path, what: str, inputs, want_inputs, outputs, want_outputs) -> None:
    missing = [n for n in want_inputs if n not in inputs] + [n for n in want_outputs if n not in outputs]
    if missing:
        raise ValueError(f"{path}: {what} lacks {missing} (has inputs {sorted(inputs)}, outputs {sorted(outputs)})")


def _input_specs(function) -> dict:
    """{name: TensorSpec} of a signature's keyword inputs."""
    return dict(function.structured_input_signature[1])


def _has_tensor(graph, name: str) -> bool:
    try:
        graph.get_tensor_by_name(name)
    except (KeyError, ValueError):
        return False
    return True


def _tf1_runner(model, settings: dict) -> Callable[[np.ndarray], Raw]:
    """Prune the TF1 graph once (positional feeds in TF1_FEEDS order)."""
    import tensorflow as tf

    graph = model.graph
    has_global = _has_tensor(graph, TF1_GLOBAL_FETCH)
    selects = has_global and _has_tensor(graph, TF1_GLOBAL_FEED)
    feeds = list(TF1_FEEDS) + [TF1_GLOBAL_FEED] * selects
    values = [settings["scales"], settings["max_features"], settings["threshold"], settings["global_indices"]]
    constants = [tf.constant(v, graph.get_tensor_by_name(n).dtype) for n, v in zip(feeds[1:], values)]
    function = model.prune(feeds, list(TF1_FETCHES) + [TF1_GLOBAL_FETCH] * has_global)

    def run(image: np.ndarray) -> Raw:
        out = [t.numpy() for t in function(tf.constant(image), *constants)]
        if not has_global:
            return (*_official_local(*out), None)
        rows = out[4] if selects else out[4][settings["global_indices"]]  # else one row per scale
        return (*_official_local(*out[:4]), rows)

    return run


def _tf2_runner(model, settings: dict) -> Callable[[np.ndarray], Raw]:
    """Call ``serving_default`` with the inputs it declares."""
    import tensorflow as tf

    serving = model.signatures["serving_default"]
    specs = _input_specs(serving)
    values = {"input_scales": settings["scales"], "input_max_feature_num": settings["max_features"],
              "input_abs_thres": settings["threshold"], "input_global_scales_ind": settings["global_indices"]}
    kwargs = {n: tf.constant(values[n], specs[n].dtype) for n in specs if n != "input_image"}

    def run(image: np.ndarray) -> Raw:
        out = {k: v.numpy() for k, v in serving(input_image=tf.constant(image), **kwargs).items()}
        local = _official_local(*(out[k] for k in TF2_OUTPUTS))
        return (*local, out.get("global_descriptors"))

    return run


def _hub_runner(model, settings: dict) -> Callable[[np.ndarray], Raw]:
    """Call the hub ``default`` signature; the image goes in as float in [0, 1]."""
    import tensorflow as tf

    default = model.signatures["default"]
    specs = _input_specs(default)
    values = {"image_scales": settings["scales"], "score_threshold": settings["threshold"],
              "max_feature_num": settings["max_features"]}
    kwargs = {n: tf.constant(values[n], specs[n].dtype) for n in HUB_INPUTS[1:]}

    def run(image: np.ndarray) -> Raw:
        out = default(image=tf.constant(image, tf.float32) / 255.0, **kwargs)
        locations = out["locations"].numpy().astype(np.float32)
        unknown = np.full(len(locations), np.nan, np.float32)
        return locations, out["descriptors"].numpy(), unknown, unknown.copy(), None

    return run


def _official_local(boxes, features, inverse_scales, scores) -> tuple:
    """boxes [N, 4] -> centres [N, 2] (y, x); 1/scale -> scale; scores [N, 1] -> [N]."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    scales = 1.0 / np.asarray(inverse_scales, np.float32).reshape(-1)
    return centres, features, scales, np.asarray(scores, np.float32).reshape(-1)


def _to_features(locations, descriptors, scales, scores, global_rows) -> ImageFeatures:
    """ImageFeatures with L2 local rows and the pooled global descriptor (or None)."""
    descriptors = np.asarray(descriptors, np.float32)
    return ImageFeatures(
        locations=np.asarray(locations, np.float32),
        descriptors=l2_normalize(descriptors),
        scales=np.asarray(scales, np.float32),
        scores=np.asarray(scores, np.float32),
        global_descriptor=None if global_rows is None else pool_global(global_rows),
    )


def pool_global(rows: np.ndarray) -> np.ndarray:
    """Official multi-scale global descriptor: rows [G, D] -> L2 each, sum, L2 -> [D]."""
    rows = np.asarray(rows, np.float32)
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"global descriptors must be [G >= 1, D], got {rows.shape}")
    return l2_normalize(l2_normalize(rows, axis=1).sum(axis=0))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be an RGB uint8 array [H, W, 3], got {type(image).__name__} {shape}")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(f"image is {image.shape[0]}x{image.shape[1]} px; DELF/DELG need at least "
                         f"{MIN_IMAGE_SIDE} px per side")
