"""HTTP service over one index: JSON API, thumbnails, explanations and the web page.

Images are addressed by their integer id in the index only, never by a path from the client,
so no request can read a file outside the index. Every input is bounded (query length, k,
upload size and type) and malformed requests get a 4xx with a message.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps, UnidentifiedImageError

from tbps.data.records import ImageLoadError
from tbps.evaluation.evaluator import RERANK_MODES
from tbps.search.index import index_summary, parse_timestamp
from tbps.search.searcher import Hit, Searcher

STATIC_DIR = Path(__file__).parent / "static"
MAX_QUERY_CHARS = 500
MAX_K = 100
MAX_UPLOAD_BYTES = 5 * 1024 * 1024
UPLOAD_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp"}
THUMBNAIL_HEIGHTS = (64, 128, 256)


class _LRU:
    """A small thread-safe LRU cache of bytes (thumbnails and explanation PNGs)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def _hit_json(hit: Hit) -> dict[str, Any]:
    return {
        "id": hit.id,
        "rank": hit.rank,
        "score": round(hit.score, 5),
        "name": hit.metadata.get("relative_path") or Path(hit.path).name,
        "camera": hit.metadata.get("camera"),
        "timestamp": hit.metadata.get("timestamp"),
        "person_id": hit.metadata.get("person_id"),
        "width": hit.metadata.get("width"),
        "height": hit.metadata.get("height"),
        "thumbnail": f"/api/images/{hit.id}/thumbnail",
        "image": f"/api/images/{hit.id}",
    }


def create_app(
    index_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    *,
    searcher: Searcher | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> FastAPI:
    """The FastAPI application serving ``index_dir`` (pass ``searcher`` to reuse an opened one)."""
    searcher = searcher or Searcher.open(index_dir, checkpoint)
    summary = index_summary(index_dir)
    thumbnails = _LRU(4096)
    explanations = _LRU(256)
    app = FastAPI(
        title="tbps search",
        description="Find people in an indexed gallery by description or by example image.",
        version="1",
    )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # One readable line per problem instead of FastAPI's nested structure.
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in error.errors()]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    def check_query(q: str) -> str:
        text = q.strip()
        if not text:
            raise HTTPException(422, "q: the query is empty")
        return text

    def filters(camera: list[str] | None, time_from: str | None, time_to: str | None) -> dict[str, Any]:
        try:
            return {"camera": camera or None, "time_from": parse_timestamp(time_from), "time_to": parse_timestamp(time_to)}
        except ValueError as error:
            raise HTTPException(422, str(error)) from None

    def image_row(image_id: int) -> dict[str, Any]:
        if not 0 <= image_id < len(searcher):
            raise HTTPException(404, f"no image with id {image_id}")
        return searcher.index.metadata[image_id]

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "images": len(searcher)}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """Index summary: method, counts, cameras and time range (for the page's filters)."""
        public = {k: v for k, v in summary.items() if k not in ("path", "checkpoint")}
        return {**public, "limits": {"max_k": MAX_K, "max_query_chars": MAX_QUERY_CHARS, "max_upload_bytes": max_upload_bytes},
                "rerank_modes": list(RERANK_MODES)}

    @app.get("/api/search")
    def search(
        q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS, description="the description to search for"),
        k: int = Query(20, ge=1, le=MAX_K),
        rerank: str = Query("none", pattern="^(" + "|".join(RERANK_MODES).replace("+", r"\+") + ")$"),
        camera: Optional[list[str]] = Query(None, max_length=64),
        time_from: Optional[str] = Query(None, max_length=40),
        time_to: Optional[str] = Query(None, max_length=40),
    ) -> dict[str, Any]:
        text = check_query(q)
        hits = searcher.search(text, k=k, rerank=rerank, filters=filters(camera, time_from, time_to))
        return {"query": text, "k": k, "rerank": rerank, "hits": [_hit_json(h) for h in hits]}

    @app.post("/api/search/image")
    def search_image(
        file: UploadFile = File(..., description="a JPEG, PNG, WebP or BMP picture of a person"),
        k: int = Query(20, ge=1, le=MAX_K),
    ) -> dict[str, Any]:
        if file.content_type not in UPLOAD_TYPES:
            raise HTTPException(415, f"unsupported upload type {file.content_type!r}; send one of {sorted(UPLOAD_TYPES)}")
        data = file.file.read(max_upload_bytes + 1)  # never read more than the limit
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                picture = image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise HTTPException(400, f"the upload is not a readable image: {error}") from None
        return {"k": k, "hits": [_hit_json(h) for h in searcher.search_by_image(picture, k=k)]}

    @app.get("/api/images/{image_id}")
    def image(image_id: int) -> FileResponse:
        row = image_row(image_id)
        if not Path(row["path"]).is_file():
            raise HTTPException(410, f"image {image_id} is no longer on disk")
        return FileResponse(row["path"])

    @app.get("/api/images/{image_id}/meta")
    def image_meta(image_id: int) -> dict[str, Any]:
        row = image_row(image_id)
        return {"id": image_id, **{k: v for k, v in row.items() if k != "path"}}

    @app.get("/api/images/{image_id}/thumbnail")
    def thumbnail(image_id: int, h: int = Query(128)) -> Response:
        row = image_row(image_id)
        if h not in THUMBNAIL_HEIGHTS:
            raise HTTPException(422, f"h: thumbnail height must be one of {THUMBNAIL_HEIGHTS}")
        data = thumbnails.get((image_id, h))
        if data is None:
            try:
                with Image.open(row["path"]) as source:
                    picture = ImageOps.exif_transpose(source).convert("RGB")
            except (OSError, SyntaxError, ValueError) as error:
                raise HTTPException(410, f"image {image_id} cannot be read: {error}") from None
            picture.thumbnail((4 * h, h), Image.Resampling.LANCZOS)  # shrinks only, keeps the aspect ratio
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=85)
            data = buffer.getvalue()
            thumbnails.put((image_id, h), data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/images/{image_id}/similar")
    def similar(image_id: int, k: int = Query(20, ge=1, le=MAX_K)) -> dict[str, Any]:
        image_row(image_id)
        return {"id": image_id, "k": k, "hits": [_hit_json(h) for h in searcher.search_by_id(image_id, k=k)]}

    @app.get("/api/images/{image_id}/explain")
    def explain(image_id: int, q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS)) -> Response:
        image_row(image_id)
        text = check_query(q)
        key = (image_id, text)
        data = explanations.get(key)
        if data is None:
            try:
                data = searcher.explain(image_id, text).png
            except ImageLoadError as error:
                raise HTTPException(410, str(error)) from None
            explanations.put(key, data)
        return Response(data, media_type="image/png")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
