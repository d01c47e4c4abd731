"""Helpers every stage shares: atomic writes, shard selection, manifests."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterator, Sequence, TypeVar

T = TypeVar("T")
log = logging.getLogger("delf_pipeline.utils.artifacts")


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


@contextmanager
def atomic_path(path: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
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


def read_json(path: Path) -> dict:
    with open(path) as handle:
        return json.load(handle)


def fingerprint(data) -> str:
    """A short stable hash of ``data`` (anything JSON-able), recorded in artifacts."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def settings_manifest(section: dict, ignored: Collection[str] = ()) -> dict:
    """``{"settings", "fingerprint"}`` of a WHOLE config section minus ``ignored``, the short
    explicit list of keys that cannot change the artifact (how it is computed, not what).

    Every other key, including one added later, is covered: an artifact made with any other
    value is refused by :func:`check_manifest`, which names the key.
    """
    unknown = sorted(set(ignored) - set(section))
    if unknown:
        raise ValueError(f"ignored keys {unknown} are not in the settings section {sorted(section)}")
    settings = {key: value for key, value in section.items() if key not in ignored}
    return {"settings": settings, "fingerprint": fingerprint(settings)}


def check_manifest(path: Path, expected: dict, what: str) -> None:
    """Write ``expected`` to ``path`` or raise if an existing manifest differs.

    This is what keeps an artifact made with other settings from being silently reused.
    """
    if path.exists():
        found = read_json(path)
        lines = "; ".join(_differences({k: found[k] for k in expected if k in found}, expected))
        if lines:
            raise ValueError(
                f"{what} at {path.parent} was made with other settings ({lines}). "
                "Use --overwrite to rebuild it or choose another output folder."
            )
    else:
        write_json_atomic(path, expected)


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
