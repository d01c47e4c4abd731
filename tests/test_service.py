"""The HTTP service on a real index: landmarks_mini without one photo, searched for that photo.

API tests use FastAPI's test client; the page is opened in headless Chromium and a photo
chosen in its file input; a bounded load test runs a real uvicorn server on loopback.
"""
from __future__ import annotations

import base64
import csv
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'delf_pipeline[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from support import SHARED_DATA

from delf_pipeline import calibrate, index  # noqa: E402
from delf_pipeline.config import DEFAULT_PRESET, load_config  # noqa: E402
from delf_pipeline.search.searcher import Searcher  # noqa: E402
from delf_pipeline.service.app import create_app  # noqa: E402
from delf_pipeline.service.limits import Limits  # noqa: E402
from delf_pipeline.service.serve import running  # noqa: E402

DATA = SHARED_DATA / "landmarks_mini"
HELD_OUT = "sacre_coeur/02928139_3448003521.jpg"  # the query; every other photo is in the index
FAST = ["extract.max_image_size=512", "extract.max_features=500", "extract.vlad_words=32"]
LIMITS = Limits(workers=2, queue=8, max_bytes=2_000_000, max_pixels=30_000_000)


@pytest.fixture(scope="module")
def mini_index(tmp_path_factory) -> Path:
    """An index of landmarks_mini without HELD_OUT (the default preset at 512 px, 32 words), built
    from its place folders (symlinks; the folder names are the labels) and calibrated at build
    (the time limit lifted: test_calibrate tests it)."""
    if not (DATA / "labels.csv").is_file():
        pytest.skip(f"landmarks_mini is not at {DATA} (the shared data folder beside the repository)")
    root = tmp_path_factory.mktemp("mini")
    with open(DATA / "labels.csv", newline="") as handle:
        images = [r["image"] for r in csv.DictReader(handle) if r["image"] != HELD_OUT]
    for image in images:
        (root / "photos" / image).parent.mkdir(parents=True, exist_ok=True)
        (root / "photos" / image).symlink_to(DATA / image)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(calibrate, "AUTO_SHARE", 1000.0)
        return index.build(load_config(overrides=FAST), root / "photos", root / "index", previews=256)


@pytest.fixture(scope="module")
def searcher(mini_index) -> Searcher:
    return Searcher(mini_index, max_pixels=LIMITS.max_pixels)


@pytest.fixture(scope="module")
def client(mini_index, searcher) -> TestClient:
    return TestClient(create_app(mini_index, LIMITS, searcher=searcher), base_url="http://localhost")


def upload(client: TestClient, data: bytes, name: str = "photo.jpg", path: str = "/query"):
    return client.post(path, files={"photo": (name, data, "application/octet-stream")})


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_health(client, mini_index):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["images"] == 78 and body["landmarks"] == 11
    assert body["preset"] == DEFAULT_PRESET and body["capacity"] == LIMITS.workers + LIMITS.queue
    assert body["calibrated"] is True


def test_query_gives_the_right_landmark_and_a_match_picture(client):
    response = upload(client, (DATA / HELD_OUT).read_bytes(), name="C:\\Users\\me\\my photo.jpg",
                      path="/query?picture=true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["photo"] == "my photo.jpg"  # the client's folder is not echoed back
    assert body["landmarks"][0]["landmark_id"] == "sacre_coeur"
    assert body["calibrated"] and 0.5 < body["landmarks"][0]["confidence"] <= 1 < body["landmarks"][0]["score"]
    best = body["candidates"][0]
    assert best["landmark_id"] == "sacre_coeur" and best["inliers"] > 15 and best["status"] == "ok"
    assert set(body["timings_ms"]) == {"decode", "extract", "shortlist", "rerank", "answer"}
    head, data = body["match_picture"].split(",", 1)
    picture = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
    assert head == "data:image/jpeg;base64" and picture.shape[0] > 360  # caption margin + 360 px images
    thumbnail = client.get(best["thumbnail"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"


def test_query_json_is_the_query_commands(client, searcher):
    photo = (DATA / HELD_OUT).read_bytes()
    api = upload(client, photo, name="x.jpg").json()
    direct = searcher.search(photo, "x.jpg").to_json()
    for answer in (api, direct):
        answer.pop("timings_ms")
    for candidate in api["candidates"]:
        assert candidate.pop("thumbnail").startswith("/thumbnails/")
    assert api == direct


def bomb() -> bytes:
    """A 6000 x 6000 PNG of one colour: 36 megapixels in a few tens of kilobytes."""
    return encoded(Image.new("L", (6000, 6000)), "PNG")


def truncated() -> bytes:
    data = (DATA / HELD_OUT).read_bytes()
    return data[: len(data) // 3]


@pytest.mark.parametrize("name, make, status, reason", [
    ("empty", lambda: b"", 400, "empty file (0 bytes)"),
    ("not an image", lambda: b"%PDF-1.4 not a photo", 415, "cannot decode image: cannot identify image file"),
    ("over the size limit", lambda: b"\xff" * 2_010_000, 413, "upload too large: the limit is 2 MB"),
    ("far over the size limit", lambda: b"\xff" * 3_000_000, 413, "upload too large: the limit is 2 MB"),
    ("image bomb", bomb, 413, "image too large: 6000x6000 pixels (limit 30 megapixels)"),
    ("truncated", truncated, 422, "cannot decode image: image file is truncated"),
    ("1x1", lambda: encoded(Image.new("RGB", (1, 1)), "PNG"), 422, "degenerate size 1x1"),
])
def test_bad_uploads_get_a_4xx_with_one_line(client, mini_index, name, make, status, reason):
    response = upload(client, make(), name=f"{name}.jpg")
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail.startswith(reason) and "\n" not in detail
    assert str(mini_index.parent) not in response.text and "/tmp" not in response.text
    assert client.get("/health").json()["status"] == "ok"


def test_a_request_without_a_photo(client):
    response = client.post("/query", data={"other": "x"})
    assert response.status_code == 422 and response.json() == {"detail": "photo: Field required"}


def test_landmark_photos_and_missing_things(client):
    body = client.get("/landmarks/sacre_coeur").json()
    assert len(body["images"]) == 14  # 15 photos, one held out
    assert all(client.get(im["thumbnail"]).status_code == 200 for im in body["images"][:3])
    assert client.get("/landmarks/atlantis").status_code == 404
    for path in ("/thumbnails/nope", "/thumbnails/../../etc/passwd", "/thumbnails/%2e%2e/labels.csv"):
        response = client.get(path)
        assert response.status_code == 404 and "root:" not in response.text, path


def test_landmarks_the_index_holds(client):
    """What the idle page shows: every landmark, most photographed first, each with a thumbnail."""
    body = client.get("/landmarks").json()
    assert body["landmarks"] == 11 and len(body["shown"]) == 11
    assert [(m["landmark_id"], m["images"]) for m in body["shown"][:3]] == [
        ("lund_street", 29), ("sacre_coeur", 14), ("sceaux_castle", 11)]
    assert all(client.get(m["thumbnail"]).status_code == 200 for m in body["shown"])
    assert [m["landmark_id"] for m in client.get("/landmarks?limit=2").json()["shown"]] == ["lund_street", "sacre_coeur"]
    assert client.get("/landmarks?limit=0").status_code == 422


def test_openapi_page_and_web_page(client):
    assert "/query" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="photo-input"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_busy_service_answers_503(mini_index, searcher, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    search = searcher.search

    def slow_search(*args):
        entered.set()
        release.wait(30)
        return search(*args)

    monkeypatch.setattr(searcher, "search", slow_search)
    app = create_app(mini_index, Limits(workers=1, queue=0), searcher=searcher)
    client = TestClient(app, base_url="http://localhost")
    photo = (DATA / HELD_OUT).read_bytes()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(upload, client, photo)
        assert entered.wait(30)
        second = upload(client, photo)
        release.set()
        assert first.result().status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert second.json()["detail"].startswith("busy: 1 photos in progress")


def chromium() -> str:
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return found


@pytest.mark.slow
def test_page_in_chromium_uploads_a_photo_and_shows_the_answer(mini_index, searcher, tmp_path):
    from support.browser import Browser

    with running(create_app(mini_index, LIMITS, searcher=searcher)) as url, Browser(chromium()) as page:
        page.navigate(url + "/")
        page.wait_for("document.getElementById('index-facts').textContent.includes('78 index photos')")
        page.wait_for("document.getElementById('status').dataset.holds === '11'")  # idle: what the index holds
        assert page.evaluate("document.querySelectorAll('#holds-list img').length") == 11
        assert page.evaluate("document.querySelector('footer').innerText.trim()") == "API (OpenAPI)"  # no dangling ·
        page.set_files("#photo-input", [DATA / HELD_OUT])
        page.wait_for("['done', 'error'].includes(document.getElementById('status').dataset.state)", timeout=120)
        state = page.evaluate("({...document.getElementById('status').dataset})")
        assert state == {"state": "done", "errors": "0", "landmark": "sacre_coeur", "holds": "11"}, page.evaluate(
            "document.getElementById('message').textContent")
        assert page.evaluate("document.querySelector('#landmarks li button').textContent") == "sacre_coeur"
        assert re.fullmatch(r"confidence (>99\.9|\d{2}\.\d)%",
                            page.evaluate("document.querySelector('#landmarks li .confidence').textContent"))
        assert page.evaluate("document.getElementById('holds').hidden")
        page.wait_for("document.getElementById('match').complete && document.querySelectorAll('#candidates img')"
                      ".length > 0 && [...document.images].every(i => i.complete)")
        assert page.evaluate("document.getElementById('match').naturalWidth") > 300
        assert page.evaluate("[...document.querySelectorAll('#candidates img')].every(i => i.naturalWidth > 0)")
        page.screenshot(tmp_path / "page.png")
        assert page.console_errors == []
    assert cv2.imread(str(tmp_path / "page.png")).shape[:2] == (900, 1280)


@pytest.mark.slow
def test_bounded_load_on_loopback(mini_index, searcher):
    """200 requests (photos 320 px wide) from 8 concurrent clients; the server stops itself after the last one."""
    import httpx

    requests, clients = 200, 8
    photos = [small_jpeg(path) for path in [DATA / HELD_OUT, *sorted(DATA.glob("*/*.jpg"))[:7]]]
    app = create_app(mini_index, Limits(workers=2, queue=clients), searcher=searcher)
    with running(app, limit_max_requests=requests) as url:
        def one(number: int) -> tuple[int, float]:
            start = time.perf_counter()
            with httpx.Client(base_url=url, timeout=120) as http:
                response = http.post("/query", files={"photo": ("p.jpg", photos[number % len(photos)])})
            return response.status_code, time.perf_counter() - start

        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(requests)))
        stopped = _wait_until_refused(url)
    codes = [code for code, _ in results]
    seconds = np.array([s for _, s in results])
    print(f"\nload: {requests} requests, {clients} clients: p50 {np.percentile(seconds, 50):.3f} s, "
          f"p95 {np.percentile(seconds, 95):.3f} s, errors {sum(c != 200 for c in codes)}")
    assert codes == [200] * requests
    assert stopped, "the server did not stop by itself after its request limit"


def small_jpeg(path: Path, width: int = 320) -> bytes:
    """The photo at ``width`` pixels wide: the load test measures the service, not SIFT on big photos."""
    with Image.open(path) as image:
        image.thumbnail((width, width))
        return encoded(image.convert("RGB"), "JPEG")


def _wait_until_refused(url: str, timeout: float = 30.0) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=2)
        except httpx.TransportError:
            return True
        time.sleep(0.2)
    return False
