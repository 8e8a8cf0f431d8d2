"""Self-contained static HTML report for training/evaluation runs.

``write_report`` produces a portable folder::

    out_dir/
        index.html      # inline CSS, no scripts, no external resources
        curves.png      # training losses + validation R@1/mAP (when a history CSV exists)
        thumbs/*.jpg    # resized copies of the retrieved gallery images

The folder can be zipped, copied or opened from any machine: every link inside
``index.html`` is relative.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tbps.utils import atomic_write, atomic_write_bytes

__all__ = ["METRIC_COLUMNS", "QueryRetrieval", "RetrievedImage", "write_report"]

#: Metric keys rendered in the metrics table, in display order, with their column headers.
METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("R1", "R@1"),
    ("R5", "R@5"),
    ("R10", "R@10"),
    ("mAP", "mAP"),
    ("mINP", "mINP"),
)

CURVES_FILENAME = "curves.png"
THUMBS_DIRNAME = "thumbs"
_JPEG_QUALITY = 88
_MAX_ASPECT = 2.0  # widest thumbnail allowed, as a multiple of its height


@dataclass
class RetrievedImage:
    """One gallery image returned for a query."""

    image_path: Path
    person_id: int
    score: float
    relevant: bool


@dataclass
class QueryRetrieval:
    """A text query and its ranked gallery hits (best first, usually top-10)."""

    query: str
    query_person_id: int
    hits: list[RetrievedImage] = field(default_factory=list)


# --------------------------------------------------------------------------- history CSV


@dataclass
class _History:
    """Columns of a Lightning ``metrics.csv`` as ``name -> [(x, value), ...]`` series."""

    step_losses: dict[str, list[tuple[float, float]]]
    epoch_losses: dict[str, list[tuple[float, float]]]
    val: dict[str, list[tuple[float, float]]]
    step_axis: str = "step"  # x unit of ``step_losses``: "step", "epoch" or "row"


def _to_float(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _read_history(path: Path) -> _History:
    """Parse a sparse Lightning CSVLogger file; raises ``OSError``/``ValueError`` if unreadable."""
    step_losses: dict[str, list[tuple[float, float]]] = {}
    epoch_losses: dict[str, list[tuple[float, float]]] = {}
    val: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise ValueError("empty history file")
        columns = set(reader.fieldnames)
        step_axis = "step" if "step" in columns else "epoch" if "epoch" in columns else "row"
        for index, row in enumerate(reader):
            step = _to_float(row.get("step"))
            epoch = _to_float(row.get("epoch"))
            for name, raw in row.items():
                if not name:
                    continue
                value = _to_float(raw)
                if value is None:
                    continue
                if name.startswith("train/"):
                    label = name[len("train/"):]
                    if label.endswith("_epoch"):
                        x = epoch if epoch is not None else float(index)
                        epoch_losses.setdefault(label[: -len("_epoch")], []).append((x, value))
                    else:
                        x = {"step": step, "epoch": epoch}.get(step_axis)
                        x = float(index) if x is None else x
                        label = label[: -len("_step")] if label.endswith("_step") else label
                        step_losses.setdefault(label, []).append((x, value))
                elif name in ("val/R1", "val/mAP"):
                    x = epoch if epoch is not None else float(index)
                    val.setdefault(name[len("val/"):], []).append((x, value))
    return _History(step_losses, epoch_losses, val, step_axis)


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _plot_curves(history: _History, out_path: Path) -> bool:
    """Draw the loss and validation panels that have data; return False when none has."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import MaxNLocator

    per_step = bool(history.step_losses)
    losses = history.step_losses if per_step else history.epoch_losses
    panels = [p for p, has in (("loss", bool(losses)), ("val", bool(history.val))) if has]
    if not panels:
        return False

    fig = Figure(figsize=(5.6 * len(panels), 3.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
    for ax, panel in zip(axes, panels):
        ax.grid(True, color="#e5e7eb", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.tick_params(labelsize=8)
        if panel == "loss":
            for colour, (name, series) in zip(itertools.cycle(palette), sorted(losses.items())):
                series.sort()
                xs, ys = [p[0] for p in series], [p[1] for p in series]
                if per_step and len(ys) >= 20:
                    ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
                    ax.plot(xs, _smooth(ys), color=colour, linewidth=1.6, label=name)
                else:
                    ax.plot(xs, ys, color=colour, linewidth=1.6, marker="o" if len(ys) < 30 else None,
                            markersize=3, label=name)
            x_unit = history.step_axis if per_step else "epoch"
            ax.set_title("Training losses" + ("" if x_unit == "step" else f" (per {x_unit})"), fontsize=10)
            ax.set_xlabel(x_unit, fontsize=9)
            if x_unit == "epoch":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            styles = {"R1": ("#1f77b4", "R@1"), "mAP": ("#d62728", "mAP")}
            for name, series in sorted(history.val.items()):
                series.sort()
                xs, ys = [p[0] for p in series], [p[1] for p in series]
                colour, label = styles.get(name, ("#7f7f7f", name))
                ax.plot(xs, ys, color=colour, linewidth=1.6, marker="o", markersize=3.5, label=label)
                best = max(range(len(ys)), key=ys.__getitem__)
                ax.annotate(f"{ys[best]:.1f}", (xs[best], ys[best]), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7.5, color=colour)
            ax.set_title("Validation retrieval", fontsize=10)
            ax.set_xlabel("epoch", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, frameon=False)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(out_path, buffer.getvalue())
    return True


# --------------------------------------------------------------------------- thumbnails


@dataclass
class _Thumb:
    """A thumbnail written under ``thumbs/`` (``rel_path`` set) or a placeholder (``None``)."""

    rel_path: str | None
    width: int
    height: int


def _thumb_name(source: Path, height: int) -> str:
    key = f"{os.path.abspath(source)}|{height}".encode("utf-8", "surrogateescape")
    return hashlib.sha1(key).hexdigest()[:20] + ".jpg"


def _stretch_to_l(img: Any) -> Any:
    """Min-max scale a high-bit-depth greyscale image into 8-bit ``L`` mode."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(scaled.round().astype(np.uint8), mode="L")


def _make_thumbnail(source: Path, thumbs_dir: Path, height: int) -> _Thumb:
    """Resize ``source`` to ``height`` pixels tall as a JPEG; a placeholder if it cannot be read."""
    from PIL import Image, ImageOps

    placeholder = _Thumb(None, max(1, height // 2), height)
    try:
        with Image.open(source) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode == "P":
                img = img.convert("RGBA")
            if "A" in img.getbands():  # flatten transparency onto white
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            elif img.mode.startswith(("I", "F")):  # 16/32-bit or float greyscale: stretch to 8 bit
                img = _stretch_to_l(img)
            img = img.convert("RGB")
            w, h = img.size
            if w <= 0 or h <= 0:
                return placeholder
            width = max(1, min(round(w * height / h), round(_MAX_ASPECT * height)))
            img = img.resize((width, height), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    except Exception:  # any decode failure (truncated, not an image, bomb, missing) -> placeholder
        return placeholder
    name = _thumb_name(source, height)
    atomic_write_bytes(thumbs_dir / name, buffer.getvalue())
    return _Thumb(f"{THUMBS_DIRNAME}/{name}", width, height)


# --------------------------------------------------------------------------- HTML


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt_metric(value: object) -> str:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "&ndash;"
    return f"{number:.1f}" if math.isfinite(number) else "n/a"


def _metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    if not metrics:
        return '<p class="note">No metrics recorded.</p>'
    best: dict[str, float] = {}
    if len(metrics) > 1:
        for key, _ in METRIC_COLUMNS:
            values = [float(v[key]) for v in metrics.values()
                      if isinstance(v.get(key), (int, float)) and math.isfinite(float(v[key]))]
            if values:
                best[key] = max(values)
    head = "".join(f"<th>{_esc(header)}</th>" for _, header in METRIC_COLUMNS)
    rows = []
    for label, values in metrics.items():
        cells = []
        for key, _ in METRIC_COLUMNS:
            value = values.get(key)
            text = _fmt_metric(value)
            is_best = key in best and isinstance(value, (int, float)) and float(value) == best[key]
            cells.append(f'<td class="num{" best" if is_best else ""}">{text}</td>')
        rows.append(f'<tr><th scope="row">{_esc(label)}</th>{"".join(cells)}</tr>')
    return (f'<table class="metrics"><thead><tr><th></th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>'
            '<p class="note">All values in percent.</p>')


def _summary_block(summary: dict[str, str] | None) -> str:
    if not summary:
        return ""
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in summary.items())
    return f'<dl class="summary">{rows}</dl>'


def _hit_html(rank: int, hit: RetrievedImage, thumb: _Thumb) -> str:
    status = "correct" if hit.relevant else "incorrect"
    mark = "&#10003;" if hit.relevant else "&#10007;"
    name = _esc(Path(hit.image_path).name)
    if thumb.rel_path is not None:
        visual = (f'<img src="{_esc(thumb.rel_path)}" width="{thumb.width}" height="{thumb.height}" '
                  f'alt="rank {rank}, person {_esc(hit.person_id)}" title="{name}" loading="lazy">')
    else:
        shape = " tall" if thumb.height > 1.5 * thumb.width else ""
        visual = (f'<div class="placeholder{shape}" style="width:{thumb.width}px;height:{thumb.height}px" '
                  f'title="{name}">unreadable</div>')
    try:
        score = f"{float(hit.score):.3f}"
    except (TypeError, ValueError):
        score = _esc(hit.score)
    return (f'<figure class="hit {status}" data-rank="{rank}" data-relevant="{str(bool(hit.relevant)).lower()}">'
            f"{visual}"
            f'<figcaption><span class="rank">#{rank}</span> <span class="mark">{mark}</span>'
            f'<br><span class="score">{score}</span> <span class="pid">ID {_esc(hit.person_id)}</span>'
            f"</figcaption></figure>")


def _retrieval_block(retrievals: Sequence[QueryRetrieval], out_dir: Path, thumbnail_height: int) -> str:
    if not retrievals:
        return ""
    thumbs_dir = out_dir / THUMBS_DIRNAME
    thumbs_dir.mkdir(parents=True, exist_ok=True)
    cache: dict[str, _Thumb] = {}
    for item in retrievals:
        for hit in item.hits:
            key = os.path.abspath(hit.image_path)
            if key not in cache:
                cache[key] = _make_thumbnail(Path(hit.image_path), thumbs_dir, thumbnail_height)
    # placeholders take the typical width of the real thumbnails so rows stay aligned
    widths = sorted(t.width for t in cache.values() if t.rel_path is not None)
    if widths:
        for thumb in cache.values():
            if thumb.rel_path is None:
                thumb.width = widths[len(widths) // 2]
    sections = []
    for number, item in enumerate(retrievals, start=1):
        figures = [_hit_html(rank, hit, cache[os.path.abspath(hit.image_path)])
                   for rank, hit in enumerate(item.hits, start=1)]
        first = next((r for r, h in enumerate(item.hits, start=1) if h.relevant), None)
        n_correct = sum(1 for h in item.hits if h.relevant)
        verdict = (f'<span class="badge ok">first match at rank {first}</span>' if first is not None
                   else '<span class="badge bad">no match in top-' f"{len(item.hits)}</span>")
        sections.append(
            f'<section class="query" data-query-index="{number}">'
            f'<div class="qhead"><span class="qnum">Query {number}</span>'
            f'<span class="qpid">person ID {_esc(item.query_person_id)}</span>{verdict}'
            f'<span class="qcount">{n_correct}/{len(item.hits)} correct</span></div>'
            f'<p class="caption">&ldquo;{_esc(item.query)}&rdquo;</p>'
            f'<div class="hits">{"".join(figures)}</div></section>'
        )
    legend = ('<p class="note legend"><span class="swatch correct"></span> correct identity '
              '<span class="swatch incorrect"></span> wrong identity &middot; '
              "score = similarity to the query text</p>")
    return f"<h2>Retrieval examples</h2>{legend}{''.join(sections)}"


_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1f2933;font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1220px;margin:0 auto;padding:24px 28px 40px}
header{border-bottom:1px solid #d9dde3;margin-bottom:20px;padding-bottom:12px}
h1{font-size:24px;margin:0 0 4px;font-weight:650}
h2{font-size:17px;margin:28px 0 10px;font-weight:650}
.generated{color:#6b7280;font-size:12px}
.card{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:16px 18px}
dl.summary{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:0}
dl.summary dt{color:#6b7280;font-weight:600}
dl.summary dd{margin:0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;
word-break:break-all}
table.metrics{border-collapse:collapse;background:#fff;border:1px solid #e1e4e8;border-radius:8px;
overflow:hidden;min-width:560px}
table.metrics th,table.metrics td{padding:8px 16px;border-bottom:1px solid #eef0f3;text-align:right}
table.metrics thead th{background:#f8f9fb;font-weight:600;color:#4b5563}
table.metrics tbody th{text-align:left;font-weight:600}
table.metrics tr:last-child th,table.metrics tr:last-child td{border-bottom:none}
td.num{font-variant-numeric:tabular-nums}
td.best{font-weight:700}
.note{color:#6b7280;font-size:12.5px;margin:6px 0}
img.curves{max-width:100%;height:auto;display:block}
section.query{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:12px 14px;margin:0 0 14px}
.qhead{display:flex;gap:12px;align-items:center;flex-wrap:wrap;font-size:12.5px}
.qnum{font-weight:700;font-size:13px}
.qpid{background:#eef2ff;color:#3730a3;border-radius:10px;padding:1px 9px;font-weight:600}
.qcount{color:#6b7280;margin-left:auto}
.badge{border-radius:10px;padding:1px 9px;font-weight:600}
.badge.ok{background:#e7f5ea;color:#1e6b34}
.badge.bad{background:#fdecec;color:#a12622}
p.caption{margin:6px 0 10px;font-size:14.5px;color:#111827;font-style:italic}
.hits{display:flex;gap:8px;overflow-x:auto;padding-bottom:4px}
figure.hit{margin:0;flex:0 0 auto;text-align:center;min-width:68px}
figure.hit img,figure.hit .placeholder{display:block;box-sizing:content-box;border:3px solid;border-radius:4px;
margin:0 auto}
figure.hit.correct img,figure.hit.correct .placeholder{border-color:#2e9e4f}
figure.hit.incorrect img,figure.hit.incorrect .placeholder{border-color:#d93b36}
.placeholder{background:#c7cbd1;color:#4b5563;display:flex!important;align-items:center;
justify-content:center;font-size:11px;font-weight:600;letter-spacing:.04em;overflow:hidden}
.placeholder.tall{writing-mode:vertical-rl;transform:rotate(180deg)}
figcaption{font-size:11px;line-height:1.35;margin-top:3px;color:#4b5563}
figcaption .rank{font-weight:700;color:#111827}
figure.correct .mark{color:#2e9e4f;font-weight:700}
figure.incorrect .mark{color:#d93b36;font-weight:700}
figcaption .score{font-variant-numeric:tabular-nums}
figcaption .pid{color:#9ca3af}
.swatch{display:inline-block;width:11px;height:11px;border:3px solid;border-radius:2px;vertical-align:-1px;
margin-left:6px}
.swatch.correct{border-color:#2e9e4f}.swatch.incorrect{border-color:#d93b36}
details{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:10px 14px}
details summary{cursor:pointer;font-weight:600}
details pre{margin:10px 0 0;font-size:12.5px;overflow-x:auto;background:#f8f9fb;padding:10px;border-radius:6px}
footer{margin-top:30px;color:#9ca3af;font-size:12px}
"""


def _curves_block(history_csv: str | Path | None, out_dir: Path) -> str:
    curves_path = out_dir / CURVES_FILENAME
    if curves_path.exists():  # never show a stale plot from an earlier report in this folder
        curves_path.unlink()
    if history_csv is None:
        return '<p class="note">No training history available.</p>'
    path = Path(history_csv)
    if not path.is_file():
        return f'<p class="note">Training history not found: {_esc(path.name)}</p>'
    try:
        history = _read_history(path)
    except (OSError, ValueError, csv.Error, UnicodeDecodeError) as exc:
        return f'<p class="note">Could not read training history ({_esc(type(exc).__name__)}).</p>'
    notes = []
    if not (history.step_losses or history.epoch_losses):
        notes.append("no training losses logged")
    if not history.val:
        notes.append("no validation metrics logged")
    note_html = "".join(f'<p class="note">{_esc(n[0].upper() + n[1:])}.</p>' for n in notes)
    if not _plot_curves(history, curves_path):
        return note_html
    return (f'<div class="card"><img class="curves" src="{CURVES_FILENAME}" '
            f'alt="training curves">{note_html}</div>')


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    metrics: dict[str, dict[str, float]],
    history_csv: str | Path | None = None,
    retrievals: Sequence[QueryRetrieval] = (),
    summary: dict[str, str] | None = None,
    config_yaml: str | None = None,
    thumbnail_height: int = 128,
) -> Path:
    """Write ``out_dir/index.html`` (plus ``curves.png`` and ``thumbs/``) and return its path.

    ``metrics`` maps a row label to ``{"R1","R5","R10","mAP","mINP"}`` in percent;
    ``history_csv`` is a Lightning CSVLogger ``metrics.csv`` (may be missing);
    ``retrievals`` are ranked results per text query, shown as thumbnail rows.
    """
    if thumbnail_height < 8:
        raise ValueError(f"thumbnail_height must be at least 8 pixels, got {thumbnail_height}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f'<header><h1>{_esc(title)}</h1><div class="generated">Generated '
        f'{datetime.now().strftime("%Y-%m-%d %H:%M")} by tbps</div></header>',
    ]
    summary_html = _summary_block(summary)
    if summary_html:
        parts.append(f'<h2>Run summary</h2><div class="card">{summary_html}</div>')
    parts.append("<h2>Retrieval metrics</h2>")
    parts.append(_metrics_table(metrics))
    parts.append("<h2>Training curves</h2>")
    parts.append(_curves_block(history_csv, out))
    parts.append(_retrieval_block(retrievals, out, thumbnail_height))
    if config_yaml is not None:
        parts.append("<h2>Configuration</h2>")
        parts.append(f"<details><summary>Resolved configuration (YAML)</summary>"
                     f"<pre>{_esc(config_yaml)}</pre></details>")
    parts.append("<footer>Static report &middot; self-contained folder, safe to copy or archive.</footer>")
    parts.append("</main></body></html>\n")

    index = out / "index.html"
    with atomic_write(index) as handle:
        handle.write("\n".join(parts))
    return index
