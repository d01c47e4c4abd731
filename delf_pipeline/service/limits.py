"""The service's limits, and the guard that enforces them before the app sees a request.

Apart from the app so the command line reads :class:`Limits` without FastAPI: :class:`Guard` is
plain ASGI, and python-multipart is imported only when an upload is parsed.

The guard, in order: the Host header must name an allowed host (DNS rebinding: a page of
another site whose name resolves to 127.0.0.1 is refused); a POST that carries an Origin must
come from the page's own origin (another site's page cannot post to the API); a ``POST /query``
is admitted (or answered 503 at once, before its body is read), its Content-Length checked,
then its body read into memory while counting, refused (413) at the limit, chunked or not: no
byte of an upload goes to disk, and the app gets the body only once it is whole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urlsplit

from ..search.searcher import MAX_PIXELS

UPLOAD_OVERHEAD = 64 * 1024  # multipart headers around the file, allowed above max_bytes
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class Limits:
    """How much the service takes on.

    workers: photos searched at once (threads; one per core is best for the CPU-bound steps).
    queue: requests admitted to wait beyond ``workers``; more are answered 503 at once.
    max_bytes: largest upload; max_pixels: largest width x height, checked before decoding.
    upload_seconds: longest time a client may take to send its upload (a slow sender holds a place).
    """

    workers: int = 2
    queue: int = 16
    max_bytes: int = 20_000_000
    max_pixels: int = MAX_PIXELS
    upload_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name in ("workers", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve limit {name} must be >= 1, got {getattr(self, name)}")
        if self.queue < 0:
            raise ValueError(f"serve limit queue must be >= 0, got {self.queue}")
        if not self.upload_seconds > 0:
            raise ValueError(f"serve limit upload_seconds must be > 0, got {self.upload_seconds}")

    @property
    def capacity(self) -> int:
        return self.workers + self.queue

    def too_big(self) -> str:
        return f"upload too large: the limit is {self.max_bytes / 1e6:g} MB"


def allowed_hosts(bound: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The Host names a service bound to ``bound`` answers: ``bound`` itself, ``localhost`` (and
    the loopback addresses when bound to one) and ``extra`` (``--allow-host``)."""
    hosts = [bound, "localhost", *(LOCAL_HOSTS if bound in LOCAL_HOSTS else ()), *extra]
    return tuple(dict.fromkeys(_bare(h) for h in hosts))


def _bare(host: str) -> str:
    """A host name or address without brackets, lower case."""
    return host.strip().strip("[]").lower()


def host_of(netloc: str) -> str:
    """``"[::1]:8000"`` -> ``"::1"``; ``"Example.org:80"`` -> ``"example.org"``; ``""`` when malformed."""
    try:
        return _bare(urlsplit("//" + netloc).hostname or "")
    except ValueError:
        return ""


class Admission:
    """How many ``POST /query`` requests are in progress (reading, waiting or searching), at
    most ``capacity``. The event loop is one thread, so the count needs no lock."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.admitted = 0


class Guard:
    """ASGI middleware in front of the app (see the module docstring)."""

    def __init__(self, app, limits: Limits, hosts: Sequence[str], admission: Admission):
        self.app, self.limits, self.admission = app, limits, admission
        self.hosts = {_bare(h) for h in hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        refusal = self.refusal(scope["method"], headers)
        if refusal:
            return await respond(send, *refusal)
        if scope["method"] != "POST" or scope["path"] != "/query":
            return await self.app(scope, receive, send)
        if self.admission.admitted >= self.admission.capacity:
            return await respond(send, 503, f"busy: {self.admission.admitted} photos in progress or waiting; try "
                                            "again shortly", [(b"retry-after", b"1")])
        self.admission.admitted += 1
        try:
            body = await self.read_body(headers, receive)
            if isinstance(body, tuple):
                return await respond(send, *body)
            await self.app(scope, replay(body), send)
        finally:
            self.admission.admitted -= 1

    def refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """(status, reason) of a request from where it should not come, else None."""
        host = headers.get("host", "")
        if host_of(host) not in self.hosts:
            return 400, (f"Host {host!r} is not served here (DNS rebinding?); start the service with "
                         "--allow-host NAME to answer that name")
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return 403, f"cross-origin {method} from {origin!r} refused: the API answers its own page only"
        return None

    async def read_body(self, headers: dict[str, str], receive) -> bytes | tuple[int, str]:
        """The whole body, or (413, reason) as soon as it is over the limit (Content-Length first)."""
        import anyio

        limit = self.limits.max_bytes + UPLOAD_OVERHEAD
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return 413, self.limits.too_big()
        chunks, size = [], 0
        with anyio.move_on_after(self.limits.upload_seconds) as timer:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return 400, "the client went away before the upload was complete"
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return 413, self.limits.too_big()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        assert timer.cancel_called
        return 408, f"upload not complete after {self.limits.upload_seconds:g} s"


def replay(body: bytes):
    """An ASGI ``receive`` that gives ``body`` in one message, then waits for the disconnect."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def respond(send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """A JSON ``{"detail": ...}`` answer sent straight through ASGI."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def form_file(body: bytes, content_type: str, field: str) -> tuple[bytes, str | None] | None:
    """(data, file name) of the multipart/form-data field ``field`` of ``body`` (held in memory),
    or None when the body has no such field; ValueError for a malformed body."""
    try:
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # python-multipart before 0.0.13
        from multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in options:
        return None
    parts: list[dict] = []
    header: list[bytes] = [b"", b""]

    def on_header_end() -> None:
        parts[-1]["headers"][header[0].decode("latin-1").lower()] = header[1]
        header[:] = [b"", b""]

    callbacks = {
        "on_part_begin": lambda: parts.append({"headers": {}, "data": []}),
        "on_header_field": lambda data, start, end: header.__setitem__(0, header[0] + data[start:end]),
        "on_header_value": lambda data, start, end: header.__setitem__(1, header[1] + data[start:end]),
        "on_header_end": on_header_end,
        "on_part_data": lambda data, start, end: parts[-1]["data"].append(data[start:end]),
    }
    parser = MultipartParser(options[b"boundary"], callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except Exception as error:  # noqa: BLE001 - python-multipart's errors differ between versions
        raise ValueError(f"malformed multipart body ({type(error).__name__})") from None
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get("content-disposition", b""))
        if disposition.get(b"name", b"").decode("utf-8", "replace") == field:
            name = disposition.get(b"filename")
            return b"".join(part["data"]), None if name is None else name.decode("utf-8", "replace")
    return None
