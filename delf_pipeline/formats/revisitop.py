"""Revisited Oxford / Paris ground truth (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``).

The official files (Radenovic et al. 2018, revisitop) are Python pickles of a dict::

    imlist   [N] index image names (no extension)
    qimlist  [Q] query image names
    gnd      [Q] per query a dict: bbx (x1, y1, x2, y2) query box in pixels of the full
             image; easy, hard, junk: indices into imlist

A pickle can run any code when loaded, so :func:`read_ground_truth` uses an unpickler that
allows only what these files hold: built-in containers, bytes and scalars and NumPy arrays /
scalars (``_reconstruct``, ``_frombuffer``, ``ndarray``, ``dtype``, ``scalar``). Any
other global is refused with a ValueError naming it.
"""
from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

_NUMPY_GLOBALS = {
    "_reconstruct": np.ndarray.__reduce__(np.zeros(0))[0],  # numpy's own array rebuild function
    "ndarray": np.ndarray,
    "dtype": np.dtype,
    "scalar": np.int64(0).__reduce__()[0],  # numpy's scalar rebuild function
    "_frombuffer": np.zeros(1).__reduce_ex__(5)[0],  # protocol 5's array rebuild function
}
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric",
                  "numpy")
# plain containers and bytes: older pickle protocols name their constructors as globals
_BUILTINS = {cls.__name__: cls for cls in (bytes, bytearray, set, frozenset, list, dict, tuple)}


@dataclass(frozen=True)
class QueryTruth:
    """One query: box (x1, y1, x2, y2) and easy / hard / junk index rows."""

    bbx: tuple[float, float, float, float]
    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


@dataclass(frozen=True)
class GroundTruth:
    """A revisitop ground-truth file: index names [N], query names [Q], truths [Q]."""

    imlist: list[str]
    qimlist: list[str]
    queries: list[QueryTruth]

    def as_ids(self, query: int) -> dict[str, list[str]]:
        """easy / hard / junk of one query as index image names (for ``revisited_map``)."""
        truth = self.queries[query]
        return {key: [self.imlist[i] for i in getattr(truth, key)] for key in ("easy", "hard", "junk")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _NUMPY_MODULES and name in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[name]
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return _BUILTINS[name]
        if module == "_codecs" and name == "encode":  # protocol-2 pickles store array bytes as latin-1 text
            return codecs.encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a ground-truth file")


def load_restricted(handle: IO[bytes]) -> Any:
    """Unpickle containers, scalars and NumPy arrays only; anything else raises UnpicklingError."""
    return _RestrictedUnpickler(handle, encoding="latin1").load()


def read_ground_truth(path: str | Path) -> GroundTruth:
    """Read and check a ``gnd_*.pkl`` file; ValueError names the file and what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = load_restricted(handle)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a readable revisitop ground-truth pickle ({error})") from None
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise ValueError(f"{path}: a revisitop ground truth is a dict with imlist, qimlist and gnd")
    imlist, qimlist = [str(n) for n in data["imlist"]], [str(n) for n in data["qimlist"]]
    if len(data["gnd"]) != len(qimlist):
        raise ValueError(f"{path}: gnd has {len(data['gnd'])} entries for {len(qimlist)} queries in qimlist")
    queries = [_query_truth(entry, len(imlist), f"{path}: gnd[{i}]") for i, entry in enumerate(data["gnd"])]
    return GroundTruth(imlist, qimlist, queries)


def _query_truth(entry: Any, num_images: int, where: str) -> QueryTruth:
    if not isinstance(entry, dict) or "bbx" not in entry:
        raise ValueError(f"{where} must be a dict with bbx, easy, hard, junk")
    bbx = np.asarray(entry["bbx"], np.float64).reshape(-1)
    if bbx.shape != (4,) or not (bbx[2] > bbx[0] and bbx[3] > bbx[1]):
        raise ValueError(f"{where}: bbx must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1, got {entry['bbx']!r}")
    rows = {}
    for key in ("easy", "hard", "junk"):
        values = np.asarray(entry.get(key, ()), np.int64).reshape(-1)
        if values.size and (values.min() < 0 or values.max() >= num_images):
            raise ValueError(f"{where}: {key} holds an index outside 0..{num_images - 1}")
        rows[key] = values
    return QueryTruth((float(bbx[0]), float(bbx[1]), float(bbx[2]), float(bbx[3])), **rows)


def crop_box(bbx: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of a query ``bbx`` in a width x height image.

    As the official evaluation crops queries (PIL ``Image.crop`` of the box): coordinates
    rounded to whole pixels, here also clipped to the image so a box that overhangs it by a
    rounding error keeps the image's edge.
    """
    left, top, right, bottom = (int(round(v)) for v in bbx)
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    right, bottom = min(max(right, left + 1), width), min(max(bottom, top + 1), height)
    return left, top, right, bottom
