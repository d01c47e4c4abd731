"""Helpers every stage shares: atomic writes, one writer per output shard, shard selection,
manifests, and the errors that name a damaged artifact or a busy output."""
from __future__ import annotations

import contextvars
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
log = logging.getLogger("delf_pipeline.utils.artifacts")
# How messages name the way to rebuild an output: a command without --overwrite of its own
# (`index add`) names its own way with :func:`rebuild_advice`.
_REBUILD = contextvars.ContextVar("rebuild", default="--overwrite")


@contextmanager
def rebuild_advice(text: str) -> Iterator[None]:
    """Within the block, refusals advise ``text`` (e.g. "`delf-pipeline index build --overwrite`")
    where they would advise ``--overwrite``."""
    token = _REBUILD.set(text)
    try:
        yield
    finally:
        _REBUILD.reset(token)


def rebuild_with() -> str:
    """What refusals advise to rebuild an output: ``--overwrite``, or the one of :func:`rebuild_advice`."""
    return _REBUILD.get()


class DamagedArtifact(ValueError):
    """An output of an earlier run fails its checks (missing manifest, checksum, row count,
    truncated or unreadable file); the message names its path."""


class OutputBusy(RuntimeError):
    """Another process holds the lock of the output shard this process wants to write."""


class ForeignContent(ValueError):
    """An output folder holds something this project did not make there: it is not deleted
    (``--overwrite``) nor written into; the message names the first such path."""


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)`` (1-based shard index, shard count); None -> ``(1, 1)``."""
    if not text:
        return 1, 1
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 1/4), got {text!r}") from None
    if not sep or n < 1 or not 1 <= i <= n:
        raise ValueError(f"--shard must satisfy 1 <= I <= N, got {text!r}")
    return i, n


def select_shard(items: Sequence[T], shard: tuple[int, int]) -> list[T]:
    """Every N-th item starting at I-1: shards are disjoint and cover ``items``."""
    i, n = shard
    return list(items[i - 1 :: n])


def shard_name(shard: tuple[int, int]) -> str:
    """``(2, 4)`` -> ``"s002of004"``: how part names and lock files name a shard."""
    return f"s{shard[0]:03d}of{shard[1]:03d}"


@contextmanager
def made_once(folder: Path) -> Iterator[bool]:
    """Serialise the making of a shared, deterministic output ``folder`` (e.g. a whitened copy
    of an index that several shard processes need): wait for the lock ``.lock-NAME`` beside
    it, then yield whether it still has to be made (no ``manifest.json`` yet). A process that
    waited finds the first one's result and reuses it. The lock dies with its process."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".lock-{folder.name}", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the maker holding it is done
        yield not (folder / "manifest.json").exists()


@contextmanager
def output_lock(folder: Path, name: str, what: str) -> Iterator[None]:
    """Hold the exclusive lock ``folder/.lock-NAME`` while this process writes that shard of an output.

    ``fcntl.flock``: the kernel releases it when the process ends, however it ends (kill -9
    included), so a killed run never leaves a stale lock. A second writer of the same shard
    stops at once with :class:`OutputBusy`. Lock files are left in place (deleting one while
    another process waits on it would let two writers in).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".lock-{name}"
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutputBusy(f"{what} {folder} (shard {name}) is being written by another process (it holds {path}); "
                         "wait for it to finish, or write to another output") from None
    try:
        yield
    finally:
        handle.close()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; it replaces ``path`` only if the block succeeds.

    The temporary gets the permissions of a plainly created file or folder (0666 / 0777 less
    the umask), not the 0600 / 0700 of ``tempfile``. An OSError of the block or the rename is
    raised again naming ``path`` (a full disk, say, otherwise names no file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    finally:
        if tmp.is_dir():
            _remove_tree(tmp)
        elif tmp.exists():
            tmp.unlink()


def remove_unfinished(folder: Path, name_prefix: str) -> None:
    """Delete the temporaries of :func:`atomic_path` (``.NAME.*.tmp``) that a killed run left in
    ``folder`` for outputs whose name starts with ``name_prefix``."""
    for stale in sorted(Path(folder).glob(f".{name_prefix}*.tmp")):
        log.info("removing %s, left unfinished by an interrupted run", stale)
        _remove_tree(stale) if stale.is_dir() else stale.unlink()


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        _remove_tree(child) if child.is_dir() else child.unlink()
    path.rmdir()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path):
    """The JSON value in ``path``; :class:`DamagedArtifact` naming it if it is not JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedArtifact(f"{path} is not valid JSON ({error}); rebuild it with {rebuild_with()}") from None


def load_array(path: Path) -> np.ndarray:
    """A ``.npy`` array (never a pickle); :class:`DamagedArtifact` naming ``path`` if it is none."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:
        reason = "truncated" if isinstance(error, EOFError) or "size" in str(error) else "not a .npy array"
        raise DamagedArtifact(f"{path} is damaged ({reason}); rebuild it") from None


def fingerprint(data) -> str:
    """A short stable hash of ``data`` (anything JSON-able), recorded in artifacts."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def settings_manifest(settings: dict) -> dict:
    """``{"settings", "fingerprint"}`` of the settings an artifact depends on (a config section
    minus its runtime keys: ``config.fingerprinted``). Every key is covered, one added later
    too: an artifact made with any other value is refused by :func:`check_manifest`, which
    names the key."""
    return {"settings": settings, "fingerprint": fingerprint(settings)}


def check_manifest(path: Path, expected: dict, what: str, layout: Layout | None = None) -> None:
    """Write ``expected`` to ``path`` or raise if an existing manifest differs.

    This is what keeps an artifact made with other settings from being silently reused. A
    folder that holds artifacts but no manifest is refused too (:class:`DamagedArtifact`):
    nothing says which settings made them. With the folder's ``layout``, a folder holding
    anything else is refused as :class:`ForeignContent`, and ``--overwrite`` is advised only
    where it would be accepted.
    """
    if not path.exists() and holds_artifacts(path.parent):
        if layout is not None:
            refuse_foreign(path.parent, layout)
        raise DamagedArtifact(
            f"{path} is missing, but {what} at {path.parent} holds artifacts made with unknown settings. "
            f"{overwrite_advice(path.parent, layout)}"
        )
    if path.exists():
        found = read_json(path)
        if not isinstance(found, dict):
            raise DamagedArtifact(f"{path} is not a manifest (a JSON object); {overwrite_advice(path.parent, layout)}")
        lines = "; ".join(_differences({k: found[k] for k in expected if k in found}, expected))
        if lines:
            raise ValueError(f"{what} at {path.parent} was made with other settings ({lines}). "
                             f"{overwrite_advice(path.parent, layout)}")
    else:
        write_json_atomic(path, expected)


def holds_artifacts(folder: Path) -> bool:
    """True when ``folder`` holds any file other than hidden ones (locks, temporaries of a kill)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(
        p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        for p in folder.rglob("*")
    )


@dataclass(frozen=True)
class Layout:
    """What an output folder of this project holds, to tell its own files from anything else:
    ``--overwrite`` deletes only these, and refuses a folder holding anything more.

    what: the output's name in messages ("feature store"). files: fnmatch patterns of its
    files. folders: (pattern, layout) of its sub-folders. owned: a check of the folder itself
    (e.g. "its manifest.json is ours"), for layouts whose names alone (labels.csv) could be a
    user's. Every layout also holds lock files (``.lock-*``, never deleted) and the
    temporaries of a killed atomic write (``.NAME.*.tmp``). Symbolic links are never ours.
    """

    what: str
    files: tuple[str, ...] = ()
    folders: tuple[tuple[str, "Layout"], ...] = ()
    owned: Callable[[Path], bool] | None = None


def _is_lock(path: Path) -> bool:
    return path.name.startswith(".lock-") and path.is_file() and not path.is_symlink()


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp") and not path.is_symlink()


def foreign_entries(folder: Path, layout: Layout) -> list[Path]:
    """Paths under ``folder`` that ``layout`` does not account for (the whole folder's entries when
    its ``owned`` check fails), sorted; [] for a missing folder."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    entries = sorted(p for p in folder.iterdir() if not _is_lock(p) and not _is_temporary(p))
    if entries and layout.owned is not None and not layout.owned(folder):
        return [p for p in entries if not _only_locks(p)]
    foreign: list[Path] = []
    for path in entries:
        if path.is_symlink():
            foreign.append(path)
        elif path.is_file() and any(fnmatch.fnmatchcase(path.name, p) for p in layout.files):
            continue
        elif path.is_dir() and (inner := _folder_layout(layout, path.name)) is not None:
            foreign += foreign_entries(path, inner)
        else:
            foreign.append(path)
    return foreign


def _only_locks(path: Path) -> bool:
    """True for a folder holding nothing but lock files and temporaries (what an overwrite leaves)."""
    if not path.is_dir() or path.is_symlink():
        return False
    return all(_is_lock(p) or _is_temporary(p) or _only_locks(p) for p in path.iterdir())


def _folder_layout(layout: Layout, name: str) -> Layout | None:
    return next((inner for pattern, inner in layout.folders if fnmatch.fnmatchcase(name, pattern)), None)


def refuse_foreign(folder: Path, layout: Layout) -> None:
    """:class:`ForeignContent` naming the first path in ``folder`` that ``layout`` does not account for."""
    foreign = foreign_entries(folder, layout)
    if not foreign:
        return
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    if layout.owned is not None and not layout.owned(folder):
        why = f"it is no delf_pipeline {layout.what}: it has no manifest of one"
    else:
        why = f"in its {layout.what}"
    raise ForeignContent(f"{folder} holds {foreign[0]}{more}, not made by delf_pipeline ({why}): nothing there is "
                         "deleted or written; move it away, or choose a new or empty output folder")


def overwrite_advice(folder: Path, layout: Layout | None) -> str:
    """The advice that ends a refusal of an output made with other or unknown settings: --overwrite
    only where it would be accepted (no foreign content in ``folder``)."""
    if layout is not None and foreign_entries(folder, layout):
        return (f"Choose another output folder ({folder} also holds {foreign_entries(folder, layout)[0]}, "
                "not made by delf_pipeline)")
    return f"Use {rebuild_with()} to rebuild it or choose another output folder."


def remove_owned(folder: Path, layout: Layout) -> None:
    """``--overwrite``: delete what ``layout`` accounts for in ``folder``, lock files excepted (see
    :func:`output_lock`); :class:`ForeignContent` and nothing deleted when it holds anything else.
    Call it under the output's lock."""
    folder = Path(folder)
    refuse_foreign(folder, layout)
    if folder.is_dir():
        _remove_checked(folder)


def _remove_checked(folder: Path) -> None:
    """Delete everything in ``folder`` (checked by :func:`foreign_entries`) but lock files; a
    sub-folder is removed once empty."""
    for path in folder.iterdir():
        if _is_lock(path):
            continue
        if path.is_dir() and not path.is_symlink():
            _remove_checked(path)
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()


def _differences(found: dict, expected: dict, prefix: str = "") -> list[str]:
    """``key: was A, now B`` per differing key; nested dicts are compared key by key
    (``settings.max_features: was 1000, now 500``) so the message names the setting. A key
    only one side records (a manifest written by an older version) is named as such."""
    lines = []
    for key in sorted(set(found) | set(expected)):
        old, new = found.get(key, _MISSING), expected.get(key, _MISSING)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old is _MISSING:
            lines.append(f"{prefix}{key}: not recorded (older manifest), now {new!r}")
        elif new is _MISSING:
            lines.append(f"{prefix}{key}: was {old!r}, no longer a setting")
        elif old != new:
            lines.append(f"{prefix}{key}: was {old!r}, now {new!r}")
    return lines


_MISSING = object()
