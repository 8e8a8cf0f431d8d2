"""``tbps index build|add|info|verify``, ``tbps search`` and ``tbps serve``."""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from tbps.search.images import DEFAULT_MAX_PIXELS

index_app = typer.Typer(help="Build and inspect search indexes over image folders.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


# User text (queries, paths, captions, error messages) is printed as rich Text, never as a
# markup string: "[/]" in a query or a folder named "a[/]b" would otherwise be parsed as markup
# (a MarkupError traceback) and ":smile:" replaced by an emoji.
def _fail(message: str, code: int = 2) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", message))
    raise typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    from tbps.engine.checkpoint import CheckpointError

    return (FileNotFoundError, FileExistsError, ValueError, KeyError, OSError, CheckpointError)


WAIT_HELP = ("seconds to wait while another tbps process writes this index (it holds the index's lock); "
             "0: fail at once, naming its pid")
MAX_PIXELS_HELP = "largest image decoded, in pixels (width x height); larger ones are skipped undecoded (decompression bombs)"
MODEL_HELP = ("a tbps checkpoint (.ckpt), or CLIP weights for zero-shot search with no training: a Hugging Face CLIP "
              "folder or OpenAI's ViT-B-16.pt (with bpe_simple_vocab_16e6.txt.gz beside it)")
PROMPT_HELP = ("CLIP models only: a template the query text is put into before tokenising, with {} exactly once, "
               "e.g. 'a photo of {}'")


def _sources(images: Optional[Path], dataset: Optional[str], root: Optional[Path], split: str, pattern: Optional[str],
             sidecar: Optional[Path], follow_symlinks: bool = False, link_roots: Optional[list[Path]] = None):
    from tbps.search.index import dataset_sources, scan_folder

    if (images is None) == (dataset is None):
        _fail("give either --images DIR or --dataset NAME --root DIR")
    if dataset is not None:
        if root is None:
            _fail("--dataset needs --root")
        if follow_symlinks or link_roots:
            _fail("--follow-symlinks and --link-root apply to --images folders only")
        return dataset_sources(dataset, root, split)
    return scan_folder(images, pattern=pattern, sidecar=sidecar, follow_symlinks=follow_symlinks, link_roots=link_roots or ())


class _BatchProgress:
    """A rich progress bar fed by the index builder's per-batch callback."""

    def __init__(self, description: str) -> None:
        self.progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=err_console, disable=not sys.stderr.isatty())
        self.task = self.progress.add_task(description, total=None)

    def __call__(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def __enter__(self) -> "_BatchProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _print_report(report, verb: str) -> None:
    console.print(f"{verb} {report.indexed} images in {report.seconds:.1f} s"
                  + (f" (resumed after batch {report.resumed_from_batch})" if report.resumed_from_batch else ""))
    if report.skipped:
        console.print(Text(f"skipped {len(report.skipped)} (images that cannot be read, links, unreadable folders):", style="yellow"))
        for item in report.skipped[:20]:
            console.print(Text(f"  {item['path']}: {item['reason']}"))
        if len(report.skipped) > 20:
            console.print(f"  ... and {len(report.skipped) - 20} more (all listed in manifest.json)")


@index_app.command("build")
def build_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="index directory to create"),
    images: Optional[Path] = typer.Option(None, "--images", help="folder of images, walked recursively"),
    dataset: Optional[str] = typer.Option(None, help="index a benchmark split instead: dataset name"),
    root: Optional[Path] = typer.Option(None, help="benchmark root (with --dataset)"),
    split: str = typer.Option("test", help="benchmark split (with --dataset)"),
    pattern: Optional[str] = typer.Option(None, help=r"regex on the relative path with named groups camera / timestamp, e.g. 'c(?P<camera>\d+)_(?P<timestamp>\d{8}T\d{6})'"),
    sidecar: Optional[Path] = typer.Option(None, help="CSV with columns path,camera,timestamp (path relative to --images)"),
    kind: str = typer.Option("auto", help="FAISS index: auto | flat | ivf | hnsw | ivfpq (auto: exact up to 100k images)"),
    batch_size: int = typer.Option(64, min=1),
    workers: int = typer.Option(2, min=0, help="image decoding worker processes"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted build from its last completed batch"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing index (only a folder holding a tbps index and nothing else)"),
    wait: float = typer.Option(0.0, "--wait", min=0.0, help=WAIT_HELP),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="follow symbolic links whose target lies inside --images or a --link-root (others are skipped and listed)"),
    link_root: Optional[list[Path]] = typer.Option(None, "--link-root", help="with --follow-symlinks: a folder outside --images that links may point into; it becomes an image root of the index (repeatable)"),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help=MAX_PIXELS_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", help=PROMPT_HELP + "; recorded as the index's default for searches"),
) -> None:
    """Embed a folder of person images (or a benchmark split) into a searchable index."""
    from tbps.search.index import build_index

    try:
        sources = _sources(images, dataset, root, split, pattern, sidecar, follow_symlinks, link_root)
        with _BatchProgress("embedding") as progress:
            report = build_index(checkpoint, sources, out, kind=kind, batch_size=batch_size, num_workers=workers,
                                 resume=resume, overwrite=overwrite, device=device, on_batch=progress, max_pixels=max_pixels, wait=wait,
                                 prompt=prompt)
    except _user_errors() as error:
        _fail(str(error))
    _print_report(report, "indexed")
    console.print(Text(f"index: {out}"))


@index_app.command("add")
def add_command(
    index: Path = typer.Argument(..., help="an existing index directory"),
    images: Path = typer.Option(..., "--images", help="folder of new images (already indexed paths are skipped)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="defaults to the index's own checkpoint"),
    pattern: Optional[str] = typer.Option(None, help="as for build"),
    sidecar: Optional[Path] = typer.Option(None, help="as for build"),
    batch_size: int = typer.Option(64, min=1),
    workers: int = typer.Option(2, min=0),
    device: str = typer.Option("cpu"),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="as for build"),
    link_root: Optional[list[Path]] = typer.Option(None, "--link-root", help="as for build"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1, help=MAX_PIXELS_HELP + " (default: the index's own)"),
    wait: float = typer.Option(0.0, "--wait", min=0.0, help=WAIT_HELP),
) -> None:
    """Append images to an index without rebuilding it (a running tbps serve picks them up)."""
    from tbps.search.index import SearchIndexError, add_images, scan_folder

    try:
        sources = scan_folder(images, pattern=pattern, sidecar=sidecar, follow_symlinks=follow_symlinks, link_roots=link_root or ())
        with _BatchProgress("embedding") as progress:
            report = add_images(index, sources, checkpoint=checkpoint, batch_size=batch_size, num_workers=workers,
                                device=device, on_batch=progress, max_pixels=max_pixels, wait=wait)
    except (*_user_errors(), SearchIndexError) as error:
        _fail(str(error))
    _print_report(report, "added")


@index_app.command("info")
def info_command(index: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show what an index holds."""
    from tbps.search.index import SearchIndexError, index_summary

    try:
        summary = index_summary(index)
    except (SearchIndexError, OSError) as error:
        _fail(str(error))
    if as_json:
        console.print_json(json.dumps(summary))
        return
    table = Table(show_header=False, title=Text(str(index)))
    for key, value in summary.items():
        table.add_row(key, Text(json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
    console.print(table)


@index_app.command("verify")
def verify_command(
    index: Path = typer.Argument(...),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="also check this checkpoint is compatible"),
) -> None:
    """Check file checksums, counts, image roots, the checkpoint's hash (without loading it) and,
    with --checkpoint, model compatibility; exit code 1 on any problem."""
    from tbps.search.index import verify_index

    problems = verify_index(index, checkpoint)
    if problems:
        for problem in problems:
            err_console.print(Text.assemble(("problem:", "bold red"), " ", problem))
        raise typer.Exit(1)
    console.print(Text.assemble(("ok", "green"), f": {index} is complete and consistent"))


def search_command(
    index: Path = typer.Argument(..., help="index directory"),
    query: str = typer.Argument(..., help="a description, e.g. 'a man in a blue jacket with a black backpack'"),
    k: int = typer.Option(20, "-k", min=1, max=1000, help="results to show"),
    rerank: str = typer.Option("none", help="none | two-stage | rvn | two-stage+rvn"),
    camera: Optional[list[str]] = typer.Option(None, "--camera", help="only these cameras (repeatable)"),
    time_from: Optional[str] = typer.Option(None, "--from", help="only images at or after this ISO time"),
    time_to: Optional[str] = typer.Option(None, "--to", help="only images at or before this ISO time"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="defaults to the index's own checkpoint (or CLIP weights)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help=PROMPT_HELP + " (default: the index's own; '{}': none)"),
    as_json: bool = typer.Option(False, "--json", help="print hits as JSON"),
    html_out: Optional[Path] = typer.Option(None, "--html", help="write an HTML page of the hits"),
    image_root: Optional[list[Path]] = typer.Option(None, "--image-root", help="read images for --html only inside these folders (repeatable; default: the index's own)"),
) -> None:
    """Search an index by description (ranked by the method's own test score; see --rerank)."""
    from tbps.search.index import SearchIndexError
    from tbps.search.searcher import Searcher

    try:
        searcher = Searcher.open(index, checkpoint, image_roots=image_root, prompt=prompt)
        hits = searcher.search(query, k=k, rerank=rerank, filters={"camera": camera, "time_from": time_from, "time_to": time_to})
    except (*_user_errors(), SearchIndexError) as error:
        _fail(str(error))
    if as_json:
        print(json.dumps({"query": query, "rerank": rerank, "hits": [hit.to_dict() for hit in hits]}))
    else:
        table = Table(title=Text(f"{query!r} ({len(hits)} of {len(searcher)} images)"))
        for column in ("rank", "score", "camera", "time", "path"):
            table.add_column(column, justify="right" if column in ("rank", "score") else "left")
        for hit in hits:
            table.add_row(str(hit.rank), f"{hit.score:.4f}", Text(str(hit.metadata.get("camera") or "")),
                          Text(str(hit.metadata.get("timestamp") or "")), Text(hit.path))
        console.print(table)
    if html_out is not None:
        _write_hits_html(html_out, query, hits, searcher)
        err_console.print(Text(f"wrote {html_out}"))


def _write_hits_html(out: Path, query: str, hits, searcher) -> None:
    """A self-contained page of thumbnails (embedded as data URIs, so it can be moved or mailed).
    Images are read as the server reads them: inside the image roots, at most max_pixels."""
    import base64
    import io

    from tbps.utils import atomic_write

    cards = []
    for hit in hits:
        try:
            picture = searcher.load_image(hit.id)
            picture.thumbnail((256, 160))
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=85)
            src = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        except OSError:
            src = ""
        cards.append(
            f'<figure><img src="{src}" alt=""><figcaption>#{hit.rank} {hit.score:.3f}<br>'
            f"{html.escape(hit.metadata.get('relative_path') or hit.path)}</figcaption></figure>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>tbps search</title><style>body{font:14px system-ui;margin:16px}"
        "main{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:120px;text-align:center;font-size:12px;"
        "word-break:break-all}img{height:160px;max-width:120px;object-fit:contain;background:#eee}</style>"
        f"<h1>{html.escape(query)}</h1><main>{''.join(cards)}</main>"
    )
    with atomic_write(out) as handle:
        handle.write(page)


def serve_command(
    index: Path = typer.Argument(..., help="index directory"),
    host: str = typer.Option("127.0.0.1", help="bind address (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000, min=0, max=65535),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="defaults to the index's own checkpoint (or CLIP weights)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help=PROMPT_HELP + " (default: the index's own; '{}': none)"),
    workers_threads: int = typer.Option(0, "--torch-threads", min=0, help="torch intra-op threads (0: torch default)"),
    token: Optional[str] = typer.Option(None, "--token", envvar="TBPS_TOKEN", show_envvar=True,
                                        help="access token required on every request (prefer the TBPS_TOKEN variable: "
                                             "a command line is visible to other users); required off loopback"),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", help="also accept requests for this Host name, e.g. "
                                                   "the public name of a reverse proxy (repeatable; always accepted: localhost, "
                                                   "127.0.0.1, ::1 and a specific --host; '*': any)"),
    cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", help="let pages of this origin call the API "
                                                    "(repeatable, e.g. https://intranet.example; default: none)"),
    insecure: bool = typer.Option(False, "--insecure", help="serve a non-loopback address without a token (anyone who "
                                  "reaches the port can search and read every indexed image)"),
    image_root: Optional[list[Path]] = typer.Option(None, "--image-root", help="serve image files only inside these folders "
                                                    "(repeatable; default: the folders recorded in the index)"),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help=MAX_PIXELS_HELP),
    max_decodes: int = typer.Option(2, "--max-decodes", min=1, help="image decodes run at once (uploads, thumbnails, explanations)"),
    reload_check: Optional[float] = typer.Option(None, "--reload-check", min=0.0, help="seconds between checks whether the index "
                                                 "changed on disk (tbps index add, a rebuild), a stat each; a change is served from "
                                                 "the next request (default 1; 0: check on every request)"),
    auto_reload: bool = typer.Option(True, "--auto-reload/--no-auto-reload", help="serve the index as it changes on disk; "
                                     "without it, only POST /api/reload re-opens it"),
) -> None:
    """Serve the web page and JSON API (OpenAPI docs at /docs) for an index.

    On loopback (the default) no token is needed. On any other address a token is required
    (--token or TBPS_TOKEN) unless --insecure; browsers sign in once at /?token=TOKEN.

    The server follows the index on disk: after `tbps index add` (or a rebuild with the same
    model) the next request is answered from the new version; POST /api/reload re-reads it now.
    """
    from tbps.search.service import RELOAD_CHECK_SECONDS, check_token, is_loopback

    if reload_check is not None and not auto_reload:
        _fail("--reload-check sets how often the index is checked for changes; it has no effect with --no-auto-reload")
    loopback = is_loopback(host)
    try:
        token = check_token(token)
    except ValueError as error:
        _fail(str(error))
    if not loopback and token is None:
        if not insecure:
            _fail(
                f"refusing to serve {host} without an access token: anyone who can reach the port could search the "
                "gallery and read every indexed image. Set TBPS_TOKEN (or --token), bind to 127.0.0.1 behind a "
                "reverse proxy, or pass --insecure to do it anyway"
            )
        err_console.print(Text.assemble(
            ("WARNING:", "bold red"), f" serving {host}:{port} WITHOUT AUTHENTICATION (--insecure): anyone who can reach "
            "this port can search the gallery and download every indexed image"
        ))
    if not loopback and token is not None:
        err_console.print("[yellow]note:[/] the token and the images travel unencrypted over plain HTTP; "
                          "put a TLS reverse proxy in front of tbps serve on an untrusted network")
    hosts = list(dict.fromkeys([*_default_hosts(host), *(allow_host or ())]))

    import torch
    import uvicorn

    from tbps.search.index import SearchIndexError
    from tbps.search.service import create_app

    if workers_threads:
        torch.set_num_threads(workers_threads)
    try:
        app = create_app(index, checkpoint, token=token, allowed_hosts=hosts, cors_origins=cors_origin or (),
                         image_roots=image_root, max_pixels=max_pixels, max_decodes=max_decodes, prompt=prompt,
                         reload_check_seconds=(RELOAD_CHECK_SECONDS if reload_check is None else reload_check) if auto_reload else None)
    except (*_user_errors(), SearchIndexError) as error:
        _fail(str(error))
    roots = ", ".join(str(root) for root in app.state.searcher.image_roots)
    console.print(Text(f"serving {index} on http://{host}:{port}/  (API docs: /docs)"))
    console.print(Text(f"image files are served only from: {roots}"))
    console.print(Text(f"accepted Host names: {', '.join(hosts)}" + (f"; CORS origins: {', '.join(cors_origin)}" if cors_origin else "")))
    if token is not None:
        console.print(Text(f"access token required: open http://{host}:{port}/?token=<your token> once in the browser, "
                           "or send 'Authorization: Bearer <token>'"))
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _default_hosts(host: str) -> tuple[str, ...]:
    """Loopback names, plus the bind address itself when it is a specific one (not 0.0.0.0 / ::)."""
    from tbps.search.service import LOOPBACK_HOSTS, normalise_host

    name = normalise_host(host)
    extra = () if name in ("0.0.0.0", "::", "") or name in LOOPBACK_HOSTS else (name,)
    return (*LOOPBACK_HOSTS, *extra)
