"""``tbps serve`` exposed safely (issue 15): image files confined to the index's roots at request
time, Host allow-list, token and browser session, CORS off by default, decompression bombs
refused undecoded, bounded concurrent decodes, uploads bounded while they stream, offline docs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from search_fixtures import write_png_bomb
from typer.testing import CliRunner

from tbps.search.index import build_index, scan_folder
from tbps.search.searcher import Searcher
from tbps.search.service import SESSION_COOKIE, create_app, session_value

pytestmark = pytest.mark.slow

TOKEN = "correct-horse-battery-staple-42"


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def searcher(search_index: Path) -> Searcher:
    return Searcher.open(search_index)


def _build_small_index(checkpoint: Path, data_root: Path, work: Path) -> Path:
    """Four images in work/photos (indexed) and a private file in work/elsewhere (not indexed)."""
    files = sorted((data_root / "imgs").rglob("*.jpg"))
    (work / "photos").mkdir(parents=True)
    (work / "elsewhere").mkdir()
    for f in files[:4]:
        shutil.copy(f, work / "photos" / f.name)
    shutil.copy(files[10], work / "elsewhere" / "private.jpg")
    build_index(checkpoint, scan_folder(work / "photos"), work / "index", batch_size=4)
    return work / "index"


@pytest.fixture(scope="module")
def small_index(search_checkpoint: Path, tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index tests must not modify (see :func:`_build_small_index`)."""
    return _build_small_index(search_checkpoint, tiny_synthetic, tmp_path_factory.mktemp("small-index"))


def _client(app, host: str = "localhost", **kwargs) -> TestClient:
    return TestClient(app, base_url=f"http://{host}", raise_server_exceptions=False, **kwargs)


# --------------------------------------------------------------------------- item 2: files
def test_files_swapped_after_indexing_are_not_served(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    """A file replaced by a symbolic link to a file outside the image roots (reproduced with
    /etc/shadow), by a FIFO, or removed: 403 / 410, never the other file's bytes."""
    index = _build_small_index(search_checkpoint, tiny_synthetic, tmp_path / "work")
    work = index.parent
    rows = json.loads((index / "metadata.json").read_text())
    secret = (work / "elsewhere" / "private.jpg").read_bytes()
    client = _client(create_app(index))
    assert client.get("/api/images/0").content == Path(rows[0]["path"]).read_bytes()  # served as usual

    for image_id in (0, 1):
        Path(rows[image_id]["path"]).unlink()
    Path(rows[0]["path"]).symlink_to(work / "elsewhere" / "private.jpg")
    os.mkfifo(rows[1]["path"])  # opening a FIFO for reading would block a naive server
    Path(rows[2]["path"]).unlink()
    for image_id, status in ((0, 403), (1, 403), (2, 410)):
        for suffix in ("", "/thumbnail", "/explain?q=a%20man"):
            response = client.get(f"/api/images/{image_id}{suffix}")
            assert response.status_code == status, (image_id, suffix, response.text)
            assert secret not in response.content and "elsewhere" not in response.text
    assert "not a regular file inside the index's image roots" in client.get("/api/images/0").json()["detail"]
    # A link that stays inside the roots is an ordinary file there.
    Path(rows[2]["path"]).symlink_to(rows[3]["path"])
    assert client.get("/api/images/2").content == Path(rows[3]["path"]).read_bytes()


def test_image_roots_can_be_narrowed_for_an_index_from_elsewhere(small_index: Path, tmp_path: Path) -> None:
    """``--image-root`` replaces the roots an index claims (an index someone sent you)."""
    narrowed = _client(create_app(small_index, image_roots=[tmp_path]))
    assert narrowed.get("/api/images/0").status_code == 403
    assert narrowed.get("/api/images/0/thumbnail").status_code == 403
    assert _client(create_app(small_index)).get("/api/images/0").status_code == 200


def test_older_indexes_without_recorded_roots_serve_only_their_images_folders(small_index: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(small_index, tmp_path / "index"))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["image_roots"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    searcher = Searcher.open(copy)
    assert searcher.image_roots == (small_index.parent.resolve() / "photos",)


# --------------------------------------------------------------------------- item 3: hosts, token, CORS
def test_requests_for_other_host_names_are_refused(search_index: Path, searcher: Searcher) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    app = create_app(search_index, searcher=searcher)
    assert _client(app, "evil.example").get("/api/health").status_code == 400
    assert "--allow-host evil.example" in _client(app, "evil.example:8000").get("/api/info").json()["detail"]
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
        assert _client(app, host).get("/api/health").status_code == 200, host
    named = create_app(search_index, searcher=searcher, allowed_hosts=["search.example.org"])
    assert _client(named, "Search.Example.org:443").get("/api/health").status_code == 200
    assert _client(named, "localhost").get("/api/health").status_code == 400
    assert _client(create_app(search_index, searcher=searcher, allowed_hosts=["*"]), "anything").get("/api/health").status_code == 200


def test_token_protects_every_route_and_the_page_signs_in_with_a_cookie(search_index: Path, searcher: Searcher) -> None:
    app = create_app(search_index, searcher=searcher, token=TOKEN)
    client = _client(app)
    for url in ("/api/health", "/api/search?q=a%20man", "/api/images/1", "/api/images/1/thumbnail", "/openapi.json", "/docs", "/static/app.js"):
        response = client.get(url)
        assert response.status_code == 401, url
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/health", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
    assert client.get("/api/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()["images"] == 120
    # The page: a sign-in form, then /?token= (what tbps serve prints) or the form sets the cookie.
    login = client.get("/")
    assert login.status_code == 401 and "<form method='post' action='/login'>" in login.text
    assert client.get("/", params={"token": "wrong-token-wrong-token"}).status_code == 401
    signed = client.get("/", params={"token": TOKEN}, follow_redirects=False)
    assert signed.status_code == 303 and signed.headers["location"] == "/"
    cookie = signed.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}={session_value(TOKEN)};") and TOKEN not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    browser = _client(app, cookies={SESSION_COOKIE: session_value(TOKEN)})
    assert 'id="search-form"' in browser.get("/").text
    hits = browser.get("/api/search", params={"q": "a man in a blue jacket", "k": 3}).json()["hits"]
    assert browser.get(hits[0]["thumbnail"]).status_code == 200  # <img> requests carry the cookie
    form = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert form.status_code == 303 and form.cookies.get(SESSION_COOKIE) == session_value(TOKEN)
    with pytest.raises(ValueError, match="at least 16 characters"):
        create_app(search_index, searcher=searcher, token="short")


def test_cors_is_off_unless_origins_are_listed(search_index: Path, searcher: Searcher) -> None:
    origin = {"Origin": "https://intranet.example"}
    closed = _client(create_app(search_index, searcher=searcher))
    assert "access-control-allow-origin" not in closed.get("/api/health", headers=origin).headers
    preflight = {**origin, "Access-Control-Request-Method": "GET"}
    assert "access-control-allow-origin" not in closed.options("/api/search", headers=preflight).headers
    opened = _client(create_app(search_index, searcher=searcher, cors_origins=["https://intranet.example"], token=TOKEN))
    answer = opened.options("/api/search", headers={**preflight, "Access-Control-Request-Headers": "authorization"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://intranet.example"
    call = opened.get("/api/health", headers={**origin, "Authorization": f"Bearer {TOKEN}"})
    assert call.status_code == 200 and call.headers["access-control-allow-origin"] == "https://intranet.example"
    other = opened.get("/api/health", headers={"Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"})
    assert "access-control-allow-origin" not in other.headers


def test_serve_requires_a_token_off_loopback(search_index: Path, monkeypatch) -> None:
    import uvicorn

    from tbps.cli.main import app

    started: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda application, **kwargs: started.append({"app": application, **kwargs}))
    monkeypatch.delenv("TBPS_TOKEN", raising=False)
    runner = CliRunner()
    refused = runner.invoke(app, ["serve", str(search_index), "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "refusing to serve 0.0.0.0 without an access token" in _flat(refused.output)
    assert started == []
    insecure = runner.invoke(app, ["serve", str(search_index), "--host", "0.0.0.0", "--insecure"])
    assert insecure.exit_code == 0 and "WITHOUT AUTHENTICATION" in _flat(insecure.output)
    assert _client(started[-1]["app"]).get("/api/health").status_code == 200
    short = runner.invoke(app, ["serve", str(search_index), "--host", "10.1.2.3"], env={"TBPS_TOKEN": "short"})
    assert short.exit_code == 2 and "at least 16 characters" in _flat(short.output)
    with_token = runner.invoke(app, ["serve", str(search_index), "--host", "10.1.2.3", "--port", "8123"], env={"TBPS_TOKEN": TOKEN})
    assert with_token.exit_code == 0, with_token.output
    assert started[-1]["host"] == "10.1.2.3" and started[-1]["port"] == 8123
    served = started[-1]["app"]
    assert _client(served, "10.1.2.3:8123").get("/api/health").status_code == 401  # the bind address is an allowed name
    assert _client(served, "10.1.2.3:8123").get("/api/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert _client(served, "other.example").get("/api/health").status_code == 400
    assert TOKEN not in with_token.output  # never printed
    local = runner.invoke(app, ["serve", str(search_index), "--allow-host", "search.example.org"])
    assert local.exit_code == 0 and started[-1]["host"] == "127.0.0.1"
    for name, status in (("search.example.org", 200), ("localhost:8000", 200), ("evil.example", 400)):
        assert _client(started[-1]["app"], name).get("/api/health").status_code == status, name


# --------------------------------------------------------------------------- item 4: decoding
def test_decompression_bomb_upload_is_refused_before_decoding(search_index: Path, searcher: Searcher, tmp_path: Path) -> None:
    bomb = write_png_bomb(tmp_path / "bomb.png", 13_000, 13_000).read_bytes()
    assert len(bomb) < 30_000
    client = _client(create_app(search_index, searcher=searcher))
    response = client.post("/api/search/image", files={"file": ("bomb.png", bomb, "image/png")})
    assert response.status_code == 413
    assert "13000 x 13000 = 169,000,000 pixels, over the limit of 40,000,000" in response.json()["detail"]
    # The limit is configurable: at 3,000 pixels an ordinary 96 x 40 crop is refused too.
    row = searcher.index.metadata[3]
    strict = _client(create_app(search_index, searcher=Searcher.open(search_index), max_pixels=3_000))
    refused = strict.post("/api/search/image", files={"file": ("p.jpg", Path(row["path"]).read_bytes(), "image/jpeg")})
    assert refused.status_code == 413 and "3,840 pixels, over the limit of 3,000" in refused.json()["detail"]
    assert strict.get("/api/images/3/thumbnail").status_code == 410
    assert strict.get("/api/info").json()["limits"]["max_pixels"] == 3_000


def test_concurrent_decodes_are_bounded(search_index: Path, searcher: Searcher) -> None:
    app = create_app(search_index, searcher=searcher, max_decodes=1)
    client = _client(app)
    semaphore = app.state.decodes
    semaphore.acquire()  # the one decode slot is busy
    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(client.get("/api/images/7/thumbnail", params={"h": 256}).status_code))
    worker.start()
    time.sleep(0.5)
    assert results == [] and worker.is_alive()  # waiting for the slot, not decoding
    semaphore.release()
    worker.join(timeout=30)
    assert results == [200]


# --------------------------------------------------------------------------- item 5: upload size
def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks: int, chunk_size: int = 64 * 1024) -> tuple[int, int]:
    """POST /api/search/image through the raw ASGI interface: a well-formed multipart upload
    whose file part streams in ``chunks`` chunks; returns (status, chunks the app pulled)."""
    pulled = 0
    part_header = b'--XYZ\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'

    async def receive() -> dict:
        nonlocal pulled
        if pulled >= chunks:
            return {"type": "http.disconnect"}
        pulled += 1
        body = (part_header if pulled == 1 else b"") + b"\0" * chunk_size + (b"\r\n--XYZ--\r\n" if pulled == chunks else b"")
        return {"type": "http.request", "body": body, "more_body": pulled < chunks}

    status = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/api/search/image", "raw_path": b"/api/search/image", "query_string": b"k=3", "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-type", b"multipart/form-data; boundary=XYZ"), *headers],
        "client": ("127.0.0.1", 5000), "server": ("localhost", 80),
    }
    asyncio.run(app(scope, receive, send))
    return status[0], pulled


def test_upload_limit_is_enforced_before_and_while_streaming(search_index: Path, searcher: Searcher) -> None:
    """300 MB used to land in /tmp before the 413; now nothing past the limit is read."""
    app = create_app(search_index, searcher=searcher, max_upload_bytes=200_000)
    status, pulled = _asgi_post(app, [(b"content-length", str(300 * 1024 * 1024).encode())], chunks=4800)
    assert status == 413 and pulled == 0  # refused from the header alone
    status, pulled = _asgi_post(app, [], chunks=80)  # 5 MB, chunked (no Content-Length)
    assert status == 413 and pulled * 64 * 1024 <= 200_000 + 16 * 1024 + 64 * 1024  # stopped at the limit


def test_uploads_are_never_spooled_to_disk(search_index: Path, searcher: Searcher, monkeypatch) -> None:
    """Starlette spools upload parts over 1 MB to a temporary file; within the limit tbps keeps
    the (already bounded) upload in memory."""
    rolled: list[int] = []
    original = tempfile.SpooledTemporaryFile.rollover
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: (rolled.append(1), original(self))[1])
    noise = Image.frombytes("RGB", (700, 700), os.urandom(700 * 700 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="BMP")
    assert buffer.tell() > 1024 * 1024
    client = _client(create_app(search_index, searcher=searcher, max_upload_bytes=2 * 1024 * 1024))
    response = client.post("/api/search/image", params={"k": 2}, files={"file": ("noise.bmp", buffer.getvalue(), "image/bmp")})
    assert response.status_code == 200 and len(response.json()["hits"]) == 2
    assert rolled == []


# --------------------------------------------------------------------------- item 6: docs offline
def test_docs_load_their_assets_locally(search_index: Path, searcher: Searcher) -> None:
    client = _client(create_app(search_index, searcher=searcher))
    for page, assets in (("/docs", ("/docs-static/swagger-ui-bundle.js", "/docs-static/swagger-ui.css")),
                         ("/redoc", ("/docs-static/redoc.standalone.js",))):
        text = client.get(page).text
        assert "http://" not in text and "https://" not in text, page  # no CDN, no font service
        for asset in assets:
            assert asset in text
            response = client.get(asset)
            assert response.status_code == 200 and len(response.content) > 100_000, asset
    schema = client.get("/openapi.json").json()
    upload = schema["paths"]["/api/search/image"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["properties"]["file"]["format"] == "binary"
