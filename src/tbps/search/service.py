"""HTTP service over one index: JSON API, thumbnails, explanations and the web page.

Images are addressed by their integer id in the index only, never by a path from the client.
Every input is bounded (query length, k, upload size, type and pixel count) and malformed
requests get a 4xx with a message. Exposure is closed by default:

* **Host check**: requests whose ``Host`` header is not an allowed name get 400 (default: the
  loopback names ``localhost``, ``127.0.0.1``, ``::1``), so a web page on another site cannot
  reach the service through DNS rebinding.
* **Token** (optional; ``tbps serve`` requires it off loopback): every request needs
  ``Authorization: Bearer <token>`` or the session cookie that ``/?token=<token>`` (or the login
  form at ``/``) sets: HttpOnly, SameSite=Strict, so other sites' pages cannot use it. The page
  itself needs no change: its requests and ``<img>`` loads carry the cookie.
* **CORS** is off unless origins are listed (``cors_origins``).
* **Image files** are served only while they are regular files inside the index's image roots,
  checked on the opened file at request time (:func:`tbps.search.images.open_inside_roots`).
* **Uploads** are counted while they stream in (``Content-Length`` first): nothing beyond the
  limit is read, and nothing is spooled to disk. Images over ``max_pixels`` are refused from
  their header, and at most ``max_decodes`` decodes run at once.
* **/docs** and **/redoc** load Swagger UI / ReDoc from files shipped with the
  ``fastapi-offline`` package, so they work offline and contact no CDN.

The served index follows the index on disk: API requests stat its manifest (at most once per
``reload_check_seconds``) and, when ``tbps index add`` or a rebuild has replaced it, the
request that notices re-opens it and swaps the new version in as one object (searcher,
summary, thumbnail caches), so a request is answered from one version, never a mix.
``POST /api/reload`` re-opens it on demand. A version that cannot be served (damaged, or
made by another model) is logged and the previous one stays.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import io
import ipaddress
import logging
import mimetypes
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Sequence
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Receive, Scope, Send

from tbps.data.records import ImageLoadError
from tbps.evaluation.evaluator import RERANK_MODES
from tbps.search.images import ImageAccessError, ImageTooLargeError, check_max_pixels, decode_image, iter_file, real_roots
from tbps.search.index import IndexCompatibilityError, SearchIndexError, index_summary, manifest_signature, parse_timestamp
from tbps.search.searcher import Hit, Searcher

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MAX_QUERY_CHARS = 500
MAX_K = 100
MAX_UPLOAD_BYTES = 5 * 1024 * 1024
# Multipart framing around the uploaded file (boundaries, part headers, the file name).
MULTIPART_OVERHEAD = 16 * 1024
UPLOAD_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp"}
THUMBNAIL_HEIGHTS = (64, 128, 256)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# One decode of a 40 Mpx image adds about 180 MB of peak memory (measured on an 8000 x 5000
# JPEG), so two at a time stay under 0.4 GB however many requests arrive.
DEFAULT_MAX_DECODES = 2
MIN_TOKEN_CHARS = 16
SESSION_COOKIE = "tbps_session"
# The only paths reachable without the token: the login page and its form.
PUBLIC_PATHS = ("/", "/login")
# Seconds between checks of the index on disk: a stat each, so the cost is nil; a second keeps
# a change visible almost at once without stating on every thumbnail of a page of results.
RELOAD_CHECK_SECONDS = 1.0


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


@dataclass(frozen=True)
class _Version:
    """One version of the served index and everything that depends on its image ids."""

    searcher: Searcher
    summary: dict[str, Any]
    thumbnails: _LRU
    explanations: _LRU

    @classmethod
    def of(cls, searcher: Searcher) -> "_Version":
        return cls(searcher, index_summary(searcher.index.path, searcher.index), _LRU(4096), _LRU(256))


class LiveIndex:
    """The index being served, swapped for a new version when the index on disk changes.

    ``check_seconds``: how often requests look at the manifest (None: never; :meth:`reload`
    still works). Readers take :attr:`current` once per request; a swap is one assignment.
    """

    def __init__(self, searcher: Searcher, check_seconds: float | None = RELOAD_CHECK_SECONDS) -> None:
        if check_seconds is not None and not check_seconds >= 0:
            raise ValueError(f"reload_check_seconds must be >= 0 or None, got {check_seconds!r}")
        self.check_seconds = check_seconds
        self.current = _Version.of(searcher)
        self.reloads = 0
        self._lock = threading.Lock()  # one reload at a time
        self._next_check = 0.0
        self._failed: tuple | None = None  # a signature that could not be served: not retried until it changes

    def changed(self) -> bool:
        """Whether a check is due and finds a new manifest (cheap: a clock read, at most one stat)."""
        if self.check_seconds is None:
            return False
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.check_seconds
        signature = manifest_signature(self.current.searcher.index.path)
        # None: between the two renames of a swap, or removed; keep serving what is open.
        return signature is not None and signature not in (self.current.searcher.index.signature, self._failed)

    def refresh(self) -> None:
        """Re-open the index if it changed; on failure keep serving the current version (logged).
        A request that finds another one reloading does not wait: the current version answers it."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._reopen()
        except (SearchIndexError, OSError) as error:
            log.warning("the index on disk changed but cannot be served; still serving the previous version: %s", error)
        finally:
            self._lock.release()

    def reload(self) -> _Version:
        """Re-open the index now (waiting for a reload in progress); raises what prevents it."""
        with self._lock:
            return self._reopen()

    def _reopen(self) -> _Version:
        path = self.current.searcher.index.path
        before = manifest_signature(path)
        try:
            fresh = self.current.searcher.reopen()
        except (SearchIndexError, OSError):
            if manifest_signature(path) == before:  # a stable index that cannot be served
                self._failed = before
            else:  # it was being replaced while we read it: look again at the next request
                self._next_check = 0.0
            raise
        if manifest_signature(path) != fresh.index.signature:
            self._next_check = 0.0
            raise SearchIndexError("the index was replaced again while it was being opened; try again")
        version = _Version.of(fresh)
        self.current = version
        self._failed = None
        self.reloads += 1
        log.info("serving the index as updated %s: %d images", version.summary.get("updated"), len(fresh))
        return version


class _WatchIndex:
    """ASGI middleware: before an API request, reload the index if it changed on disk (the
    reload runs in a worker thread; the request then sees the new version)."""

    def __init__(self, app: ASGIApp, live: LiveIndex) -> None:
        self.app = app
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/") and self.live.changed():
            await run_in_threadpool(self.live.refresh)
        await self.app(scope, receive, send)


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


# --------------------------------------------------------------------------- hosts and tokens
def normalise_host(host: str) -> str:
    """``Host`` header or allowed name -> bare lower-case name: port, IPv6 brackets and a
    trailing dot removed (``[::1]:8000`` -> ``::1``, ``Example.org.:80`` -> ``example.org``)."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_loopback(host: str) -> bool:
    """Whether a bind address or host name only reaches this machine."""
    name = normalise_host(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> str | None:
    if token is None:
        return None
    if len(token) < MIN_TOKEN_CHARS or token != token.strip():
        raise ValueError(
            f"the access token must be at least {MIN_TOKEN_CHARS} characters without surrounding spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


class _Guard:
    """ASGI middleware: Host allow-list, then (with a token) authentication, and protective
    response headers on everything."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], token: str | None) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = {normalise_host(h) for h in allowed_hosts if h != "*"}
        self.token = token.encode() if token is not None else None
        self.session = session_value(token) if token is not None else None

    def authenticated(self, headers: dict[bytes, bytes]) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode("latin-1"), self.token):
            return True
        for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == SESSION_COOKIE and hmac.compare_digest(value.encode("latin-1"), self.session.encode()):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = normalise_host(headers.get(b"host", b"").decode("latin-1"))
        if not self.any_host and host not in self.allowed_hosts:
            response = JSONResponse(
                {"detail": f"host {host!r} is not allowed; start tbps serve with --allow-host {host or 'NAME'} to serve it"},
                status_code=400,
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["authenticated"] = self.authenticated(headers)
        if self.token is not None and scope["path"] not in PUBLIC_PATHS and not scope["state"]["authenticated"]:
            response = JSONResponse(
                {"detail": "authentication required: send 'Authorization: Bearer <token>', or open /?token=<token> in a browser"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                         (b"referrer-policy", b"no-referrer")]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


def session_value(token: str) -> str:
    """The session cookie's value: derived from the token, so the cookie never holds the token."""
    return hmac.new(token.encode(), b"tbps-session-v1", hashlib.sha256).hexdigest()


def _login_page(message: str = "") -> str:
    note = f'<p class="error">{html.escape(message)}</p>' if message else ""
    return (
        "<!doctype html><meta charset='utf-8'><meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>tbps search: sign in</title><style>body{font:15px system-ui;margin:15vh auto;max-width:26em}"
        "input{font:inherit;padding:.4em;width:100%;box-sizing:border-box;margin:.5em 0}.error{color:#b00}</style>"
        "<h1>tbps search</h1><p>This server needs its access token (the one <code>tbps serve</code> was started with).</p>"
        f"{note}<form method='post' action='/login'><input name='token' type='password' autocomplete='current-password' "
        "placeholder='access token' required autofocus><button type='submit'>Sign in</button></form>"
    )


# --------------------------------------------------------------------------- uploads
async def read_body_limited(request: Request, limit: int, label: str | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes:
    from ``Content-Length`` before reading anything, else while counting the streamed chunks.
    Never holds more than ``limit`` bytes plus one chunk."""
    label = label or f"the {limit:,}-byte limit"
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, f"invalid Content-Length {declared!r}") from None
        if size > limit:
            raise HTTPException(413, f"request body of {size:,} bytes is larger than {label}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body larger than {label}")
    return bytes(body)


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def parse_upload(request: Request, max_upload_bytes: int) -> UploadFile:
    """The ``file`` part of a multipart upload, kept in memory (the body is already bounded)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPException(422, "file: send the picture as multipart/form-data with a 'file' part")
    body = await read_body_limited(
        request, max_upload_bytes + MULTIPART_OVERHEAD,
        f"the upload limit ({max_upload_bytes:,} bytes, plus {MULTIPART_OVERHEAD:,} for the multipart framing)",
    )
    parser = MultiPartParser(request.headers, _one_chunk(body), max_files=1, max_fields=8, max_part_size=4096)
    parser.spool_max_size = len(body) + 1  # the whole (bounded) body fits: never roll over to disk
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise HTTPException(400, f"malformed upload: {error.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise HTTPException(422, "file: the upload has no 'file' part")
    return upload


UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "a JPEG, PNG, WebP or BMP picture of a person"}},
                }
            }
        },
    }
}


# --------------------------------------------------------------------------- the application
def create_app(
    index_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    *,
    searcher: Searcher | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    allowed_hosts: Sequence[str] | None = None,
    token: str | None = None,
    cors_origins: Sequence[str] = (),
    image_roots: Sequence[str | os.PathLike] | None = None,
    max_pixels: int | None = None,
    max_decodes: int = DEFAULT_MAX_DECODES,
    prompt: str | None = None,
    reload_check_seconds: float | None = RELOAD_CHECK_SECONDS,
) -> FastAPI:
    """The FastAPI application serving ``index_dir`` (pass ``searcher`` to reuse an opened one).

    ``allowed_hosts``: accepted ``Host`` names (default: loopback names; ``"*"`` accepts any).
    ``token``: require it on every request (bearer header or the session cookie of ``/?token=``).
    ``cors_origins``: origins allowed to call the API from their pages (none by default).
    ``image_roots``: the only folders image files are served from (default: the index's own).
    ``max_pixels``: largest image decoded (default: the searcher's, 40 Mpx).
    ``max_decodes``: image decodes allowed to run at once (thumbnails, uploads, explanations).
    ``reload_check_seconds``: how often API requests check whether the index changed on disk
    (0: every request; None: never, ``POST /api/reload`` only).
    ``checkpoint`` may be CLIP weights (zero-shot index); ``prompt``: the query template
    (:meth:`Searcher.open`; default: the index's own).
    """
    token = check_token(token)
    if max_decodes < 1:
        raise ValueError(f"max_decodes must be >= 1, got {max_decodes}")
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")
    if searcher is not None and prompt is not None:
        raise ValueError("prompt is applied when the index is opened: pass it to Searcher.open, not with an opened searcher")
    searcher = searcher or Searcher.open(index_dir, checkpoint, prompt=prompt)
    if image_roots is not None:
        searcher.image_roots = real_roots(image_roots)
    if max_pixels is not None:
        searcher.max_pixels = check_max_pixels(max_pixels)
    decodes = threading.BoundedSemaphore(max_decodes)
    # Every request below takes live.current once and answers from that version only.
    live = LiveIndex(searcher, reload_check_seconds)
    app = FastAPI(
        title="tbps search",
        description="Find people in an indexed gallery by description or by example image.",
        version="1",
        docs_url=None,  # served below from local files instead of a CDN
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    docs_static = files("fastapi_offline") / "static"
    app.mount("/docs-static", StaticFiles(directory=str(docs_static)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="tbps search - API", swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css", swagger_favicon_url="/docs-static/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no request to the online validator
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="tbps search - API", redoc_js_url="/docs-static/redoc.standalone.js",
                              redoc_favicon_url="/docs-static/favicon.png", with_google_fonts=False)

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

    def image_row(searcher: Searcher, image_id: int) -> dict[str, Any]:
        if not 0 <= image_id < len(searcher):
            raise HTTPException(404, f"no image with id {image_id}")
        return searcher.index.metadata[image_id]

    def image_unavailable(searcher: Searcher, image_id: int, error: Exception) -> HTTPException:
        """410 for a file gone or unreadable, 403 for one no longer inside the image roots; the
        server path stays in the server log."""
        log.warning("image %d: %s", image_id, error)
        if isinstance(error, ImageAccessError):
            return HTTPException(403, f"image {image_id} is not a regular file inside the index's image roots; not served")
        if isinstance(error, ImageTooLargeError):
            return HTTPException(410, f"image {image_id} is over the {searcher.max_pixels}-pixel limit; not decoded")
        if isinstance(error, (FileNotFoundError, NotADirectoryError)):
            return HTTPException(410, f"image {image_id} is no longer on disk")
        return HTTPException(410, f"image {image_id} cannot be read")

    def decode_upload(searcher: Searcher, data: bytes) -> Any:
        try:
            return decode_image(data, max_pixels=searcher.max_pixels, semaphore=decodes)
        except ImageTooLargeError as error:
            raise HTTPException(413, f"the upload is too large to decode: {error.reason}") from None
        except ImageLoadError as error:
            raise HTTPException(400, f"the upload is not a readable image: {error.reason}") from None

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "images": len(live.current.searcher)}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """Index summary: method, counts, cameras and time range (for the page's filters)."""
        version = live.current
        searcher = version.searcher
        public = {k: v for k, v in version.summary.items() if k not in ("path", "checkpoint", "image_roots")}
        return {**public, "scoring": searcher.scoring,
                "limits": {"max_k": MAX_K, "max_query_chars": MAX_QUERY_CHARS, "max_upload_bytes": max_upload_bytes,
                           "max_pixels": searcher.max_pixels},
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
        hits = live.current.searcher.search(text, k=k, rerank=rerank, filters=filters(camera, time_from, time_to))
        return {"query": text, "k": k, "rerank": rerank, "hits": [_hit_json(h) for h in hits]}

    @app.post("/api/reload")
    def reload() -> dict[str, Any]:
        """Re-open the index from disk now and serve it (also done by itself when the index
        changes); 409, with the previous version still served, if it cannot be served."""
        try:
            version = live.reload()
        except IndexCompatibilityError as error:
            log.warning("reload refused: %s", error)
            raise HTTPException(409, "the index on disk was made by another model than the one being served; "
                                     "restart tbps serve with its checkpoint. Still serving the previous version") from None
        except (SearchIndexError, OSError) as error:
            log.warning("reload failed: %s", error)
            raise HTTPException(409, "the index on disk cannot be opened (damaged, incomplete or being replaced; "
                                     "details in the server log). Still serving the previous version") from None
        return {"images": len(version.searcher), "updated": version.summary.get("updated"), "reloads": live.reloads}

    @app.post("/api/search/image", openapi_extra=UPLOAD_OPENAPI)
    async def search_image(request: Request, k: int = Query(20, ge=1, le=MAX_K)) -> dict[str, Any]:
        """Search by an example picture (multipart ``file``: JPEG, PNG, WebP or BMP)."""
        upload = await parse_upload(request, max_upload_bytes)
        if upload.content_type not in UPLOAD_TYPES:
            raise HTTPException(415, f"unsupported upload type {upload.content_type!r}; send one of {sorted(UPLOAD_TYPES)}")
        data = await upload.read()
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
        searcher = live.current.searcher
        picture = await run_in_threadpool(decode_upload, searcher, data)
        hits = await run_in_threadpool(searcher.search_by_image, picture, k)
        return {"k": k, "hits": [_hit_json(h) for h in hits]}

    @app.get("/api/images/{image_id}")
    def image(image_id: int) -> StreamingResponse:
        searcher = live.current.searcher
        row = image_row(searcher, image_id)
        try:
            handle = searcher.open_image_file(image_id)
        except OSError as error:
            raise image_unavailable(searcher, image_id, error) from None
        size = os.fstat(handle.fileno()).st_size
        media_type = mimetypes.guess_type(row["path"])[0] or "application/octet-stream"
        return StreamingResponse(iter_file(handle), media_type=media_type, headers={"Content-Length": str(size)})

    @app.get("/api/images/{image_id}/meta")
    def image_meta(image_id: int) -> dict[str, Any]:
        row = image_row(live.current.searcher, image_id)
        return {"id": image_id, **{k: v for k, v in row.items() if k != "path"}}

    @app.get("/api/images/{image_id}/thumbnail")
    def thumbnail(image_id: int, h: int = Query(128)) -> Response:
        version = live.current
        searcher = version.searcher
        image_row(searcher, image_id)
        if h not in THUMBNAIL_HEIGHTS:
            raise HTTPException(422, f"h: thumbnail height must be one of {THUMBNAIL_HEIGHTS}")
        data = version.thumbnails.get((image_id, h))
        if data is None:
            try:
                picture = searcher.load_image(image_id, semaphore=decodes, exif_transpose=True)
            except OSError as error:
                raise image_unavailable(searcher, image_id, error) from None
            picture.thumbnail((4 * h, h), Image.Resampling.LANCZOS)  # shrinks only, keeps the aspect ratio
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=85)
            data = buffer.getvalue()
            version.thumbnails.put((image_id, h), data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/images/{image_id}/similar")
    def similar(image_id: int, k: int = Query(20, ge=1, le=MAX_K)) -> dict[str, Any]:
        searcher = live.current.searcher
        image_row(searcher, image_id)
        return {"id": image_id, "k": k, "hits": [_hit_json(h) for h in searcher.search_by_id(image_id, k=k)]}

    @app.get("/api/images/{image_id}/explain")
    def explain(image_id: int, q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS)) -> Response:
        version = live.current
        searcher = version.searcher
        image_row(searcher, image_id)
        text = check_query(q)
        key = (image_id, text)
        data = version.explanations.get(key)
        if data is None:
            try:
                with decodes:
                    data = searcher.explain(image_id, text).png
            except OSError as error:
                raise image_unavailable(searcher, image_id, error) from None
            version.explanations.put(key, data)
        return Response(data, media_type="image/png")

    def login_response(request: Request, candidate: str) -> Response:
        if token is None:
            return RedirectResponse("/", status_code=303)
        if not hmac.compare_digest(candidate.encode(), token.encode()):
            return HTMLResponse(_login_page("That token is not right."), status_code=401)
        response = RedirectResponse("/", status_code=303)  # drops the token from the address bar
        response.set_cookie(SESSION_COOKIE, session_value(token), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    @app.get("/", include_in_schema=False)
    def page(request: Request, token_param: Optional[str] = Query(None, alias="token", max_length=512)) -> Response:
        if token_param is not None:
            return login_response(request, token_param)
        if token is not None and not request.scope["state"].get("authenticated"):
            return HTMLResponse(_login_page(), status_code=401)
        return FileResponse(STATIC_DIR / "index.html")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
            raise HTTPException(415, "send the login form as application/x-www-form-urlencoded")
        body = await read_body_limited(request, 2048)
        candidate = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
        return login_response(request, candidate)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Starlette runs the middleware added last first: CORS (which answers preflight requests,
    # which carry no credentials) wraps the guard.
    # The index watch runs inside the guard: requests that are refused never stat or reload.
    app.add_middleware(_WatchIndex, live=live)
    app.add_middleware(_Guard, allowed_hosts=list(allowed_hosts) if allowed_hosts is not None else list(LOOPBACK_HOSTS), token=token)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization"], allow_credentials=False)
    app.state.live = live  # live.current.searcher: the searcher now being served
    app.state.searcher = searcher  # the one opened at start
    app.state.decodes = decodes
    return app
