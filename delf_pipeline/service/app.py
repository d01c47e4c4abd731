"""The FastAPI app: search an index by photo over HTTP, and the web page that does it.

Routes: ``GET /`` (the page), ``POST /query`` (an image upload -> the JSON of
``delf-pipeline query --json``, plus ``match_picture`` with ``?picture=true``),
``GET /health``, ``GET /landmarks`` (the landmarks, most photographed first, each with a
thumbnail), ``GET /landmarks/{landmark_id}`` (the index photos of a landmark),
``GET /thumbnails/{image_id}`` (an index photo's preview), ``/docs`` (OpenAPI page).

The index is loaded once, when the app is made. Requests pass :class:`.limits.Guard` first
(Host allowlist, Origin check on POST, admission before the upload is read, the size limit
while it streams; see :mod:`.limits` and the threat model in docs/service.md). Searching is
CPU work: it runs in worker threads (``Limits.workers`` at once) off the event loop, and at
most ``Limits.queue`` more requests wait; beyond that the answer is 503 at once. A bad upload
gets a 4xx with a one-line reason; no answer names a path on the server.
"""
from __future__ import annotations

import base64
import logging
from collections import defaultdict
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import anyio
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..formats.images import ImageError
from ..search.searcher import Searcher
from .limits import Admission, Guard, Limits, allowed_hosts, form_file
from .pictures import match_picture

log = logging.getLogger("delf_pipeline.service")

STATIC = Path(__file__).resolve().parent / "static"
UPLOAD = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["photo"],
    "properties": {"photo": {"type": "string", "format": "binary", "description": "the photo (JPEG, PNG, WebP, ...)"}},
}}}}}  # the form of POST /query, for the OpenAPI page (the body is parsed in memory by limits.form_file)


def create_app(index: str | Path, limits: Limits = Limits(), searcher: Searcher | None = None,
               hosts: Sequence[str] = allowed_hosts("127.0.0.1")) -> FastAPI:
    """The app serving ``index`` (loaded here, once), or the given ``searcher``, answering
    requests whose Host header names one of ``hosts``."""
    searcher = searcher or Searcher(index, max_pixels=limits.max_pixels)
    threads = anyio.CapacityLimiter(limits.workers)
    admission = Admission(limits.capacity)
    app = FastAPI(title="delf_pipeline search by photo", version=__version__,
                  description="Which landmark is this photo? Upload one to `POST /query`.")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, limits=limits, hosts=hosts, admission=admission)
    _add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", summary="Is the service up, and what index does it serve")
    def health() -> dict:
        return {"status": "ok", "package_version": __version__, "preset": searcher.config.preset,
                "images": len(searcher.ids), "landmarks": len(set(searcher.labels.values())),
                "calibrated": searcher.calibration is not None,
                "in_progress": admission.admitted, "capacity": admission.capacity}

    @app.post("/query", summary="The best landmarks and candidates of one photo", openapi_extra=UPLOAD)
    async def query(request: Request,
                    picture: bool = Query(False, description="add the match picture of the best candidate "
                                                             "(a JPEG data URL)")) -> dict:
        try:  # the body is in memory, whole and within the limit (limits.Guard)
            upload = form_file(await request.body(), request.headers.get("content-type", ""), "photo")
        except ValueError as error:
            raise HTTPException(400, str(error)) from None
        if upload is None:
            raise HTTPException(422, "photo: Field required")
        data, filename = upload
        if len(data) > limits.max_bytes:
            raise HTTPException(413, limits.too_big())
        return await anyio.to_thread.run_sync(_answer, searcher, data, _display_name(filename), picture,
                                              limiter=threads)

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
