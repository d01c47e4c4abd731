"""The FastAPI app: search an index by photo over HTTP, and the web page that does it.

Routes: ``GET /`` (the page), ``POST /query`` (an image upload -> the JSON of
``delf-pipeline query --json``, plus ``match_picture`` with ``?picture=true``),
``GET /health``, ``GET /landmarks`` (the landmarks, most photographed first, each with a
thumbnail), ``GET /landmarks/{landmark_id}`` (the index photos of a landmark),
``GET /thumbnails/{image_id}`` (an index photo's preview), ``/docs`` (OpenAPI page).

The index is loaded once, when the app is made. Searching is CPU work: it runs in worker
threads (``Limits.workers`` at once) off the event loop, and at most ``Limits.queue`` more
requests wait; beyond that the answer is 503 at once. A bad upload gets a 4xx with a
one-line reason; no answer names a path on the server.
"""
from __future__ import annotations

import base64
import logging
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

import anyio
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..formats.images import ImageError
from ..search.searcher import Searcher
from .limits import Limits
from .pictures import match_picture

log = logging.getLogger("delf_pipeline.service")

STATIC = Path(__file__).resolve().parent / "static"
UPLOAD_OVERHEAD = 64 * 1024  # multipart headers around the file, allowed above max_bytes


class Gate:
    """Runs blocking calls in at most ``workers`` threads, with at most ``queue`` waiting.

    The event loop is one thread, so the admission count needs no lock.
    """

    def __init__(self, limits: Limits):
        self.limiter = anyio.CapacityLimiter(limits.workers)
        self.capacity = limits.workers + limits.queue
        self.admitted = 0

    async def run(self, function, *args):
        if self.admitted >= self.capacity:
            raise HTTPException(503, f"busy: {self.admitted} photos in progress or waiting; try again shortly",
                                headers={"Retry-After": "1"})
        self.admitted += 1
        try:
            return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)
        finally:
            self.admitted -= 1


def create_app(index: str | Path, limits: Limits = Limits(), searcher: Searcher | None = None) -> FastAPI:
    """The app serving ``index`` (loaded here, once), or the given ``searcher``."""
    searcher = searcher or Searcher(index, max_pixels=limits.max_pixels)
    gate = Gate(limits)
    app = FastAPI(title="delf_pipeline search by photo", version=__version__,
                  description="Which landmark is this photo? Upload one to `POST /query`.")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_error_handlers(app)

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        """Refuse an upload by its Content-Length before reading it."""
        length = request.headers.get("content-length", "")
        if request.url.path == "/query" and length.isdigit() and int(length) > limits.max_bytes + UPLOAD_OVERHEAD:
            return JSONResponse({"detail": _too_big(limits)}, status_code=413)
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", summary="Is the service up, and what index does it serve")
    def health() -> dict:
        return {"status": "ok", "package_version": __version__, "preset": searcher.config.preset,
                "images": len(searcher.ids), "landmarks": len(set(searcher.labels.values())),
                "calibrated": searcher.calibration is not None,
                "in_progress": gate.admitted, "capacity": gate.capacity}

    @app.post("/query", summary="The best landmarks and candidates of one photo")
    async def query(photo: UploadFile = File(..., description="the photo (JPEG, PNG, WebP, ...)"),
                    picture: bool = Query(False, description="add the match picture of the best candidate "
                                                             "(a JPEG data URL)")) -> dict:
        data = await photo.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise HTTPException(413, _too_big(limits))
        return await gate.run(_answer, searcher, data, _display_name(photo.filename), picture)

    @app.get("/landmarks", summary="The landmarks of the index, most photographed first, each with a thumbnail")
    def landmarks(limit: int = Query(60, ge=1, le=1000, description="landmarks listed at most")) -> dict:
        groups: dict[str, list[str]] = defaultdict(list)
        for image_id, label in searcher.labels.items():
            groups[label].append(image_id)
        top = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))[:limit]
        return {"landmarks": len(groups), "shown": [
            {"landmark_id": label, "images": len(ids), "thumbnail": next(
                (thumbnail_url(i) for i in sorted(ids) if searcher.index.preview(i)), None)} for label, ids in top]}

    @app.get("/landmarks/{landmark_id}", summary="The index photos of a landmark")
    def landmark(landmark_id: str) -> dict:
        ids = searcher.index.images_of(landmark_id)
        if not ids:
            raise HTTPException(404, f"no landmark {landmark_id!r} in the index")
        return {"landmark_id": landmark_id, "images": [{"id": i, "thumbnail": thumbnail_url(i)} for i in ids]}

    @app.get("/thumbnails/{image_id:path}", summary="The preview JPEG of an index photo",
             response_class=FileResponse)
    def thumbnail(image_id: str) -> FileResponse:
        path = searcher.index.preview(image_id) if image_id in searcher.index.store else None
        if path is None:
            raise HTTPException(404, f"no preview of index image {image_id!r}")
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def _answer(searcher: Searcher, data: bytes, name: str, picture: bool) -> dict:
    """The JSON answer (worker thread); an unusable image becomes a 4xx with its reason."""
    try:
        answer = searcher.search(data, name)
    except ImageError as error:
        raise HTTPException(_status_of(str(error)), str(error).splitlines()[0]) from None
    result = answer.to_json()
    for candidate in result["candidates"]:
        candidate["thumbnail"] = thumbnail_url(candidate["index_id"])
    if picture:
        jpeg = match_picture(searcher, answer, data)
        result["match_picture"] = f"data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}" if jpeg else None
    return result


def _status_of(reason: str) -> int:
    """HTTP status of an ImageError reason: 400 empty, 413 too large, 415 not an image, 422 otherwise
    (truncated or corrupt data, degenerate size)."""
    if reason.startswith("empty file"):
        return 400
    if reason.startswith("image too large"):
        return 413
    if "cannot identify image file" in reason:
        return 415
    return 422


def _too_big(limits: Limits) -> str:
    return f"upload too large: the limit is {limits.max_bytes / 1e6:g} MB"


def _display_name(filename: str | None) -> str:
    """The upload's file name without any folder part (never echo a client path back)."""
    return Path((filename or "photo").replace("\\", "/")).name or "photo"


def thumbnail_url(image_id: str) -> str:
    return "/thumbnails/" + quote(image_id)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def one_line(request: Request, error: RequestValidationError) -> JSONResponse:
        """A missing or malformed field as one line instead of FastAPI's list of dicts."""
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "request"
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)
