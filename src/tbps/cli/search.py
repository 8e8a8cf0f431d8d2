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

index_app = typer.Typer(help="Build and inspect search indexes over image folders.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    from tbps.engine.checkpoint import CheckpointError

    return (FileNotFoundError, FileExistsError, ValueError, KeyError, OSError, CheckpointError)


def _sources(images: Optional[Path], dataset: Optional[str], root: Optional[Path], split: str, pattern: Optional[str], sidecar: Optional[Path]):
    from tbps.search.index import dataset_sources, scan_folder

    if (images is None) == (dataset is None):
        _fail("give either --images DIR or --dataset NAME --root DIR")
    if dataset is not None:
        if root is None:
            _fail("--dataset needs --root")
        return dataset_sources(dataset, root, split)
    return scan_folder(images, pattern=pattern, sidecar=sidecar)


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
        console.print(f"[yellow]skipped {len(report.skipped)} images:[/]")
        for item in report.skipped[:20]:
            console.print(f"  {item['path']}: {item['reason']}")
        if len(report.skipped) > 20:
            console.print(f"  ... and {len(report.skipped) - 20} more (all listed in manifest.json)")


@index_app.command("build")
def build_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="a tbps checkpoint (.ckpt)"),
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
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing index"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
) -> None:
    """Embed a folder of person images (or a benchmark split) into a searchable index."""
    from tbps.search.index import build_index

    try:
        sources = _sources(images, dataset, root, split, pattern, sidecar)
        with _BatchProgress("embedding") as progress:
            report = build_index(checkpoint, sources, out, kind=kind, batch_size=batch_size, num_workers=workers,
                                 resume=resume, overwrite=overwrite, device=device, on_batch=progress)
    except _user_errors() as error:
        _fail(str(error))
    _print_report(report, "indexed")
    console.print(f"index: {out}")


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
) -> None:
    """Append images to an index without rebuilding it."""
    from tbps.search.index import SearchIndexError, add_images, scan_folder

    try:
        sources = scan_folder(images, pattern=pattern, sidecar=sidecar)
        with _BatchProgress("embedding") as progress:
            report = add_images(index, sources, checkpoint=checkpoint, batch_size=batch_size, num_workers=workers,
                                device=device, on_batch=progress)
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
    table = Table(show_header=False, title=str(index))
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


@index_app.command("verify")
def verify_command(
    index: Path = typer.Argument(...),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="also check this checkpoint is compatible"),
) -> None:
    """Check file checksums, counts and model compatibility; exit code 1 on any problem."""
    from tbps.search.index import verify_index

    problems = verify_index(index, checkpoint)
    if problems:
        for problem in problems:
            err_console.print(f"[bold red]problem:[/] {problem}")
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {index} is complete and consistent")


def search_command(
    index: Path = typer.Argument(..., help="index directory"),
    query: str = typer.Argument(..., help="a description, e.g. 'a man in a blue jacket with a black backpack'"),
    k: int = typer.Option(20, "-k", min=1, max=1000, help="results to show"),
    rerank: str = typer.Option("none", help="none | two-stage | rvn | two-stage+rvn"),
    camera: Optional[list[str]] = typer.Option(None, "--camera", help="only these cameras (repeatable)"),
    time_from: Optional[str] = typer.Option(None, "--from", help="only images at or after this ISO time"),
    time_to: Optional[str] = typer.Option(None, "--to", help="only images at or before this ISO time"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="defaults to the index's own checkpoint"),
    as_json: bool = typer.Option(False, "--json", help="print hits as JSON"),
    html_out: Optional[Path] = typer.Option(None, "--html", help="write an HTML page of the hits"),
) -> None:
    """Search an index by description."""
    from tbps.search.index import SearchIndexError
    from tbps.search.searcher import Searcher

    try:
        searcher = Searcher.open(index, checkpoint)
        hits = searcher.search(query, k=k, rerank=rerank, filters={"camera": camera, "time_from": time_from, "time_to": time_to})
    except (*_user_errors(), SearchIndexError) as error:
        _fail(str(error))
    if as_json:
        print(json.dumps({"query": query, "rerank": rerank, "hits": [hit.to_dict() for hit in hits]}))
    else:
        table = Table(title=f"{query!r} ({len(hits)} of {len(searcher)} images)")
        for column in ("rank", "score", "camera", "time", "path"):
            table.add_column(column, justify="right" if column in ("rank", "score") else "left")
        for hit in hits:
            table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.metadata.get("camera") or "", hit.metadata.get("timestamp") or "", hit.path)
        console.print(table)
    if html_out is not None:
        _write_hits_html(html_out, query, hits)
        err_console.print(f"wrote {html_out}")


def _write_hits_html(out: Path, query: str, hits) -> None:
    """A self-contained page of thumbnails (embedded as data URIs, so it can be moved or mailed)."""
    import base64
    import io

    from PIL import Image

    from tbps.utils import atomic_write

    cards = []
    for hit in hits:
        try:
            with Image.open(hit.path) as image:
                picture = image.convert("RGB")
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
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="defaults to the index's own checkpoint"),
    workers_threads: int = typer.Option(0, "--torch-threads", min=0, help="torch intra-op threads (0: torch default)"),
) -> None:
    """Serve the web page and JSON API (OpenAPI docs at /docs) for an index."""
    import torch
    import uvicorn

    from tbps.search.index import SearchIndexError
    from tbps.search.service import create_app

    if workers_threads:
        torch.set_num_threads(workers_threads)
    try:
        app = create_app(index, checkpoint)
    except (*_user_errors(), SearchIndexError) as error:
        _fail(str(error))
    console.print(f"serving {index} on http://{host}:{port}/  (API docs: /docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
