"""``tbps data``: dataset statistics, health checks, synthetic data and contact sheets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

app = typer.Typer(help="Dataset tools", no_args_is_help=True)

EXIT_UNUSABLE = 1
EXIT_BAD_INPUT = 2


def _stdout() -> Console:
    # Created per call so that output goes to whatever sys.stdout is at that moment (tests swap it).
    return Console(soft_wrap=True)


def _fail(message: str) -> NoReturn:
    """One red line on stderr, exit code 2, no traceback."""
    Console(stderr=True, soft_wrap=True).print(Text(f"error: {message}", style="bold red"))
    raise typer.Exit(EXIT_BAD_INPUT)


@contextmanager
def _bad_input() -> Iterator[None]:
    """Turn the errors users cause (bad names, paths, files) into ``_fail``."""
    try:
        yield
    except FileNotFoundError as error:
        _fail(str(error) or f"file not found: {error.filename}")
    except (ValueError, KeyError, OSError, ImportError) as error:
        # KeyError's str() wraps the message in quotes; args[0] is the message itself.
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        _fail(f"{message}" if message else type(error).__name__)


def _load(dataset: str, root: Path):  # -> PersonSearchDataset
    from tbps.data.readers import load_dataset

    return load_dataset(dataset, root)


def _stats_table(stats: dict[str, dict[str, int]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("split")
    for column in ("images", "identities", "captions"):
        table.add_column(column, justify="right")
    for split, counts in stats.items():
        table.add_row(split, *(f"{counts.get(column, 0):,}" for column in ("images", "identities", "captions")))
    return table


@app.command()
def stats(
    dataset: str = typer.Option(..., "--dataset", "-d", help="cuhk-pedes, icfg-pedes, rstpreid or generic"),
    root: Path = typer.Option(..., "--root", "-r", help="dataset folder (or the generic annotation file)"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON object keyed by split"),
) -> None:
    """Images, identities and captions per split, counted from the annotations (images are not opened)."""
    from tbps.data.checks import dataset_stats

    with _bad_input():
        ds = _load(dataset, root)
    counts = dataset_stats(ds)
    if as_json:
        typer.echo(json.dumps(counts))
        return
    console = _stdout()
    console.print(_stats_table(counts, f"{ds.name} ({ds.root})"))
    for note in ds.notes:
        console.print(Text(f"note: {note}", style="dim"))


@app.command()
def check(
    dataset: str = typer.Option(..., "--dataset", "-d", help="cuhk-pedes, icfg-pedes, rstpreid or generic"),
    root: Path = typer.Option(..., "--root", "-r", help="dataset folder (or the generic annotation file)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    no_images: bool = typer.Option(False, "--no-images", help="skip opening image files"),
    max_examples: int = typer.Option(5, "--max-examples", min=0, help="examples shown per issue"),
    workers: int = typer.Option(2, "--workers", min=1, help="threads used to read images"),
) -> None:
    """Report problems (missing/corrupt images, duplicates, identity leaks, ...); exit 1 when unusable."""
    from tbps.data.checks import check_dataset

    with _bad_input():
        ds = _load(dataset, root)
    report = check_dataset(ds, check_images=not no_images, max_examples=max_examples, workers=workers)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(ds.name, report, ds.notes)
    if not report.usable:
        raise typer.Exit(EXIT_UNUSABLE)


def _print_report(name: str, report: Any, notes: list[str]) -> None:
    console = _stdout()
    console.print(_stats_table(report.stats, name))
    if not report.images_checked:
        console.print(Text("images were not opened (--no-images)", style="dim"))
    if report.issues:
        table = Table(title="issues")
        table.add_column("issue")
        table.add_column("count", justify="right")
        table.add_column("examples")
        for kind, count in sorted(report.issues.items()):
            table.add_row(kind, f"{count:,}", Text("\n".join(report.examples.get(kind, []))))
        console.print(table)
    else:
        console.print("no issues found")
    for note in notes:
        console.print(Text(f"note: {note}", style="dim"))
    for error in report.errors:
        console.print(Text(f"error: {error}", style="bold red"))
    verdict = Text("usable", style="bold green") if report.usable else Text("UNUSABLE", style="bold red")
    console.print(Text("verdict: ") + verdict)


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="folder to write the synthetic dataset to"),
    identities: int = typer.Option(..., "--identities", min=1, help="number of synthetic people"),
    seed: int = typer.Option(0, "--seed", help="random seed (same seed, same dataset)"),
    image_height: int = typer.Option(256, "--image-height", min=8),
    image_width: int = typer.Option(112, "--image-width", min=8),
    workers: int = typer.Option(2, "--workers", min=1, help="processes used to draw images"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing dataset in --out"),
) -> None:
    """Render the synthetic person-search benchmark (CUHK-PEDES format: reid_raw.json + imgs/)."""
    with _bad_input():
        from tbps.data.synth import generate

        summary = generate(
            out,
            identities=identities,
            seed=seed,
            image_size=(image_height, image_width),
            workers=workers,
            overwrite=overwrite,
        )
    _print_summary(summary, f"synthetic dataset in {out}")


def _print_summary(summary: dict[str, Any], title: str) -> None:
    """Nested dicts of numbers become tables; everything else a ``key: value`` line."""
    console = _stdout()
    console.print(Text(title, style="bold"))
    for key, value in summary.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            columns = sorted({column for row in value.values() for column in row})
            table = Table(title=str(key))
            table.add_column("")
            for column in columns:
                table.add_column(str(column), justify="right")
            for row_name, row in value.items():
                table.add_row(str(row_name), *(str(row.get(column, "")) for column in columns))
            console.print(table)
        elif isinstance(value, float):
            console.print(Text(f"{key}: {value:.2f}"))
        else:
            console.print(Text(f"{key}: {value}"))


@app.command()
def sheet(
    root: Path = typer.Option(..., "--root", "-r", help="dataset folder"),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write"),
    n: int = typer.Option(12, "-n", "--n", min=1, help="number of images on the sheet"),
) -> None:
    """Write a contact sheet of sample images with their captions."""
    with _bad_input():
        if not root.exists():
            raise FileNotFoundError(f"dataset root {root} does not exist")
        from tbps.data.synth import contact_sheet

        result = contact_sheet(root, out, n=n)
    _stdout().print(Text(f"wrote {result if isinstance(result, (str, Path)) else out}"))
