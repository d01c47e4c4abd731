"""The service's limits, apart from the app so the command line reads them without FastAPI."""
from __future__ import annotations

from dataclasses import dataclass

from ..search.searcher import MAX_PIXELS


@dataclass(frozen=True)
class Limits:
    """How much the service takes on.

    workers: photos searched at once (threads; one per core is best for the CPU-bound steps).
    queue: requests admitted to wait beyond ``workers``; more are answered 503 at once.
    max_bytes: largest upload; max_pixels: largest width x height, checked before decoding.
    """

    workers: int = 2
    queue: int = 16
    max_bytes: int = 20_000_000
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("workers", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve limit {name} must be >= 1, got {getattr(self, name)}")
        if self.queue < 0:
            raise ValueError(f"serve limit queue must be >= 0, got {self.queue}")
