"""REST service: search, uploads, thumbnails, explanations, and input validation (4xx, never 500)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from search_fixtures import synthetic_records
from typer.testing import CliRunner

from tbps.search.searcher import Searcher
from tbps.search.service import create_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(search_index: Path) -> TestClient:
    # raise_server_exceptions=False: a server error must show up as a 500 response, which the
    # tests below assert never happens, instead of as an exception in the test.
    # base_url: the service only answers requests addressed to a loopback name by default.
    return TestClient(create_app(search_index, max_upload_bytes=200_000), base_url="http://localhost", raise_server_exceptions=False)


def _jpeg(path: str) -> bytes:
    return Path(path).read_bytes()


def test_health_info_and_docs(client: TestClient) -> None:
    assert client.get("/api/health").json() == {"status": "ok", "images": 120}
    info = client.get("/api/info").json()
    assert info["method"] == "baseline" and info["cameras"] == ["c1", "c2", "c3"]
    assert "checkpoint" not in info and "path" not in info  # no server paths leak to clients
    assert client.get("/openapi.json").json()["info"]["title"] == "tbps search"
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_search_returns_ranked_hits_with_filters(client: TestClient, tiny_synthetic: Path) -> None:
    text = synthetic_records(tiny_synthetic)[0]["captions"][0]
    body = client.get("/api/search", params={"q": text, "k": 7}).json()
    hits = body["hits"]
    assert len(hits) == 7 and [h["rank"] for h in hits] == list(range(1, 8))
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    assert all("path" not in h and h["thumbnail"] == f"/api/images/{h['id']}/thumbnail" for h in hits)
    filtered = client.get("/api/search", params=[("q", text), ("k", "100"), ("camera", "c1"), ("camera", "c3"), ("time_to", "2024-05-01T08:30:00")]).json()
    assert filtered["hits"] and all(h["camera"] in ("c1", "c3") and h["timestamp"] <= "2024-05-01T08:30:00" for h in filtered["hits"])
    reranked = client.get("/api/search", params={"q": text, "k": 5, "rerank": "two-stage+rvn"})
    assert reranked.status_code == 200 and len(reranked.json()["hits"]) == 5


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"q": "a man", "k": 0}, "k"),
        ({"q": "a man", "k": 101}, "k"),
        ({"q": "a man", "k": "ten"}, "k"),
        ({"q": ""}, "q"),
        ({"q": "    "}, "empty"),
        ({}, "q"),
        ({"q": "x" * 501}, "q"),
        ({"q": "a man", "rerank": "magic"}, "rerank"),
        ({"q": "a man", "time_from": "yesterday"}, "timestamp"),
    ],
)
def test_bad_search_requests_get_422(client: TestClient, params: dict, message: str) -> None:
    response = client.get("/api/search", params=params)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_images_by_id_only(client: TestClient, search_index: Path) -> None:
    full = client.get("/api/images/3")
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
    thumb = client.get("/api/images/3/thumbnail", params={"h": 64})
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).height <= 64
    assert client.get("/api/images/3/meta").json()["id"] == 3
    for url in ("/api/images/120", "/api/images/-1/thumbnail", "/api/images/999999/similar", "/api/images/120/explain?q=a"):
        response = client.get(url)
        assert response.status_code == 404 and "no image with id" in response.json()["detail"]
    # Paths are not ids: traversal attempts never reach the file system.
    traversal = client.get("/api/images/..%2F..%2Fetc%2Fpasswd")
    assert traversal.status_code in (404, 422) and b"root:" not in traversal.content
    assert client.get("/api/images/abc").status_code == 422
    assert client.get("/api/images/1/thumbnail", params={"h": 5000}).status_code == 422


def test_similar_and_explain(client: TestClient) -> None:
    similar = client.get("/api/images/5/similar", params={"k": 4}).json()
    assert similar["hits"][0]["id"] == 5 and len(similar["hits"]) == 4
    png = client.get("/api/images/5/explain", params={"q": "a woman with a red bag"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    assert client.get("/api/images/5/explain", params={"q": " "}).status_code == 422


def test_upload_search_and_limits(client: TestClient, search_index: Path) -> None:
    row = json.loads((search_index / "metadata.json").read_text())[12]
    ok = client.post("/api/search/image", params={"k": 3}, files={"file": ("p.jpg", _jpeg(row["path"]), "image/jpeg")})
    assert ok.status_code == 200 and ok.json()["hits"][0]["id"] == 12
    too_big = client.post("/api/search/image", files={"file": ("big.jpg", b"\xff" * 200_001, "image/jpeg")})
    assert too_big.status_code == 413
    wrong_type = client.post("/api/search/image", files={"file": ("a.txt", b"hello", "text/plain")})
    assert wrong_type.status_code == 415
    not_image = client.post("/api/search/image", files={"file": ("a.jpg", b"not really a jpeg", "image/jpeg")})
    assert not_image.status_code == 400 and "not a readable image" in not_image.json()["detail"]
    assert client.post("/api/search/image").status_code == 422
    assert client.post("/api/search/image", params={"k": 0}, files={"file": ("p.jpg", _jpeg(row["path"]), "image/jpeg")}).status_code == 422


def test_cli_index_info_verify_search(search_index: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    from tbps.cli.main import app

    runner = CliRunner()
    info = runner.invoke(app, ["index", "info", str(search_index), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["images"] == 120
    verify = runner.invoke(app, ["index", "verify", str(search_index)])
    assert verify.exit_code == 0 and "ok" in verify.stdout
    text = synthetic_records(tiny_synthetic)[0]["captions"][0]
    html_out = tmp_path / "hits.html"
    result = runner.invoke(app, ["search", str(search_index), text, "-k", "4", "--camera", "c2", "--json", "--html", str(html_out)])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["hits"]
    assert len(hits) == 4 and all(h["camera"] == "c2" for h in hits)
    assert hits == [h.to_dict() for h in Searcher.open(search_index).search(text, k=4, filters={"camera": "c2"})]
    assert html_out.read_text().count("<figure>") == 4
    bad = runner.invoke(app, ["search", str(tmp_path / "missing"), "a man"])
    assert bad.exit_code == 2 and "not a tbps index" in " ".join(bad.output.split())


def test_cli_build_and_add(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    import shutil

    from tbps.cli.main import app

    files = sorted((tiny_synthetic / "imgs").rglob("*.jpg"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for f in files[:4]:
        shutil.copy(f, tmp_path / "a" / f"cam1_20240501T0800{f.stem[-2:]}_{f.name}")
    for f in files[4:6]:
        shutil.copy(f, tmp_path / "b" / f"cam2_20240501T0900{f.stem[-2:]}_{f.name}")
    pattern = r"cam(?P<camera>\d+)_(?P<timestamp>\d{8}T\d{6})"
    runner = CliRunner()
    out = tmp_path / "index"
    built = runner.invoke(app, ["index", "build", "--checkpoint", str(search_checkpoint), "--images", str(tmp_path / "a"),
                                "--out", str(out), "--pattern", pattern, "--workers", "0", "--batch-size", "3"])
    assert built.exit_code == 0, built.output
    added = runner.invoke(app, ["index", "add", str(out), "--images", str(tmp_path / "b"), "--pattern", pattern, "--workers", "0"])
    assert added.exit_code == 0, added.output
    rows = json.loads((out / "metadata.json").read_text())
    assert [r["camera"] for r in rows] == ["1"] * 4 + ["2"] * 2
    assert all(r["timestamp"].startswith("2024-05-01T0") for r in rows)
    again = runner.invoke(app, ["index", "build", "--checkpoint", str(search_checkpoint), "--images", str(tmp_path / "a"), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in " ".join(again.output.split())  # rich wraps long lines
