"""Read PyTorch checkpoints (legacy and zip formats) without PyTorch, by a restricted unpickler.

Only the containers and tensor records a ``state_dict`` holds are allowed; any other global
in the pickle is refused, so a checkpoint cannot run code. Also: the weights cache folder.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "LongStorage": "i8",
    "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "b1",
}


@dataclass
class _Storage:
    """One flat typed buffer of a checkpoint; ``data`` is filled once its bytes are read."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    """A strided view into a storage, materialised only after all storages are read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise ValueError(f"storage {self.storage.key} was never read from the file")
        extent = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
        if 0 not in self.shape and extent > len(data):
            raise ValueError(f"tensor of shape {self.shape} overruns storage {self.storage.key}")
        strides = tuple(s * data.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(data[self.offset:], self.shape, strides)
        return np.array(view, dtype=data.dtype.newbyteorder("="))


def _rebuild_tensor(storage, offset, shape, stride, *_ignored) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(shape), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict, refusing every class but tensors, storages and OrderedDict."""

    def __init__(self, handle: IO[bytes], byteorder: str = "<"):
        super().__init__(handle)
        self.byteorder = byteorder
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if storage_type not in STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        dtype = np.dtype(self.byteorder + STORAGE_DTYPES[storage_type])
        return self.storages.setdefault(str(key), _Storage(str(key), dtype, int(numel)))


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a PyTorch checkpoint (legacy or zip format) as ``name -> numpy array``.

    Only plain state dicts are accepted; any other class in the pickle is refused.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        state = _read_zip(path)
    else:
        with open(path, "rb") as handle:
            state = _read_legacy(handle)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {name: ref.array() for name, ref in state.items() if isinstance(ref, _TensorRef)}


def _read_legacy(handle: IO[bytes]) -> Any:
    """Legacy format: magic, protocol, sys info, the object, storage keys, raw storages."""
    header = _RestrictedUnpickler(handle)
    if header.load() != LEGACY_MAGIC:
        raise ValueError("not a PyTorch checkpoint (bad magic number)")
    if header.load() != LEGACY_PROTOCOL:
        raise ValueError("unsupported PyTorch legacy protocol version")
    sys_info = header.load()
    unpickler = _RestrictedUnpickler(handle, "<" if sys_info.get("little_endian", True) else ">")
    state = unpickler.load()
    for key in _RestrictedUnpickler(handle).load():
        _read_legacy_storage(handle, unpickler.storages[str(key)])
    return state


def _read_legacy_storage(handle: IO[bytes], storage: _Storage) -> None:
    count = int.from_bytes(handle.read(8), "big" if storage.dtype.byteorder == ">" else "little")
    if count != storage.numel:
        raise ValueError(f"storage {storage.key}: header says {count} elements, pickle says {storage.numel}")
    raw = handle.read(count * storage.dtype.itemsize)
    if len(raw) != count * storage.dtype.itemsize:
        raise ValueError(f"storage {storage.key} is truncated")
    storage.data = np.frombuffer(raw, storage.dtype)


def _read_zip(path: Path) -> Any:
    """Zip format: ``<prefix>/data.pkl`` plus one ``<prefix>/data/<key>`` entry per storage."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in archive.namelist() else "little"
        with archive.open(pickles[0]) as handle:
            unpickler = _RestrictedUnpickler(handle, ">" if order == "big" else "<")
            state = unpickler.load()
        for storage in unpickler.storages.values():
            storage.data = np.frombuffer(archive.read(f"{prefix}data/{storage.key}"), storage.dtype)
    return state


def default_cache_dir() -> Path:
    """``$DELF_PIPELINE_CACHE`` if set, else ``$XDG_CACHE_HOME/delf_pipeline`` (~/.cache)."""
    if os.environ.get("DELF_PIPELINE_CACHE"):
        return Path(os.environ["DELF_PIPELINE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "delf_pipeline"
