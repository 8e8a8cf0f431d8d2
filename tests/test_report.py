"""Tests for the static HTML run report (tbps.report)."""

from __future__ import annotations

import csv
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

from tbps.report import QueryRetrieval, RetrievedImage, write_report

CAPTION = 'A woman in a <red> coat & "blue" jeans carrying a bag'
METRICS = {
    "best-on-val (epoch 7)": {"R1": 63.246, "R5": 82.04, "R10": 88.95, "mAP": 55.55, "mINP": 40.0},
    "last (epoch 10)": {"R1": 61.0, "R5": 81.449, "R10": 87.5, "mAP": 54.3, "mINP": 39.96},
}


class _ReportParser(HTMLParser):
    """Collects query sections, their hit figures, image sources and placeholder tiles."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[dict] = []
        self.img_srcs: list[str] = []
        self.tags: set[str] = set()
        self._in_placeholder = False
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        classes = (a.get("class") or "").split()
        if tag == "section" and "query" in classes:
            self.queries.append({"hits": [], "caption": "", "text": ""})
        elif tag == "figure" and "hit" in classes:
            self.queries[-1]["hits"].append(
                {"rank": int(a["data-rank"]), "relevant": a["data-relevant"], "classes": classes,
                 "img": None, "placeholder": ""})
        elif tag == "img":
            self.img_srcs.append(a["src"] or "")
            if self.queries and self.queries[-1]["hits"]:
                self.queries[-1]["hits"][-1]["img"] = a["src"]
        elif tag == "div" and "placeholder" in classes:
            self._in_placeholder = True
        elif tag == "p" and "caption" in classes:
            self._in_caption = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._in_placeholder = False
        if tag == "p":
            self._in_caption = False

    def handle_data(self, data: str) -> None:
        if self.queries:
            self.queries[-1]["text"] += data
        if self._in_placeholder:
            self.queries[-1]["hits"][-1]["placeholder"] += data
        if self._in_caption:
            self.queries[-1]["caption"] += data


def _parse(index: Path) -> _ReportParser:
    parser = _ReportParser()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def _write_history(path: Path, rows: list[dict[str, object]], columns: list[str]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def _sparse_history(path: Path) -> Path:
    """Lightning-style sparse CSV: step rows with losses, epoch rows with val metrics and epoch loss."""
    columns = ["epoch", "step", "lr-AdamW", "train/loss_step", "train/itc", "train/loss_epoch",
               "val/R1", "val/mAP"]
    rows: list[dict[str, object]] = []
    step = 0
    for epoch in range(4):
        for _ in range(10):
            rows.append({"epoch": epoch, "step": step, "train/loss_step": 5.0 / (step + 1) + 0.1,
                         "train/itc": 2.0 / (step + 1)})
            rows.append({"step": step, "lr-AdamW": 1e-4})
            step += 1
        rows.append({"epoch": epoch, "step": step - 1, "val/R1": 20.0 + 10 * epoch, "val/mAP": 15.0 + 8 * epoch})
        rows.append({"epoch": epoch, "step": step - 1, "train/loss_epoch": 1.0 / (epoch + 1)})
    return _write_history(path, rows, columns)


def _make_gallery(tmp_path: Path) -> list[Path]:
    """Eleven small PNGs of different sizes/modes plus one corrupt file (index 3)."""
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    paths = []
    for i in range(12):
        path = gallery / f"img_{i:02d}.png"
        if i == 3:
            path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
        else:
            mode = {5: "RGBA", 6: "L", 7: "P"}.get(i, "RGB")
            size = (24 + 2 * i, 64) if i != 8 else (400, 40)  # index 8: very wide image
            colour = {"RGB": (20 * i, 100, 200 - 10 * i), "RGBA": (10, 200, 30, 128), "L": 90, "P": 3}[mode]
            Image.new(mode, size, colour).save(path)
        paths.append(path)
    return paths


def _retrievals(paths: list[Path]) -> list[QueryRetrieval]:
    """Two queries with 10 hits each; relevance patterns differ between the queries."""
    first = [RetrievedImage(paths[i], person_id=7 if i % 3 == 0 else 100 + i,
                            score=0.9 - 0.05 * i, relevant=i % 3 == 0) for i in range(10)]
    second = [RetrievedImage(paths[11 - i], person_id=42, score=0.8 - 0.01 * i, relevant=i in (1, 2))
              for i in range(10)]
    return [QueryRetrieval(CAPTION, 7, first), QueryRetrieval("man with backpack", 42, second)]


def test_full_report(tmp_path: Path) -> None:
    paths = _make_gallery(tmp_path)
    retrievals = _retrievals(paths)
    history = _sparse_history(tmp_path / "metrics.csv")
    out = tmp_path / "report"
    backend_before = matplotlib.get_backend()

    index = write_report(
        out, title="Demo <run> & results", metrics=METRICS, history_csv=history, retrievals=retrievals,
        summary={"dataset": "synthetic <tiny>", "device": "cpu"},
        config_yaml="model:\n  name: <baseline>\n  dim: 256 & more\n", thumbnail_height=64)

    assert index == out / "index.html"
    text = index.read_text(encoding="utf-8")
    assert matplotlib.get_backend() == backend_before

    # metrics: one decimal place, columns in the documented order
    for value in ("63.2", "82.0", "89.0", "55.5", "40.0", "61.0", "81.4", "87.5", "54.3"):
        assert f">{value}<" in text
    assert "63.246" not in text
    header_positions = [text.index(f"<th>{h}</th>") for h in ("R@1", "R@5", "R@10", "mAP", "mINP")]
    assert header_positions == sorted(header_positions)
    assert "best-on-val (epoch 7)" in text and "last (epoch 10)" in text

    # all user text escaped
    assert "&lt;red&gt; coat &amp; &quot;blue&quot; jeans" in text
    assert "<red>" not in text
    assert "Demo &lt;run&gt; &amp; results" in text
    assert "synthetic &lt;tiny&gt;" in text
    assert re.search(r"<details>.*name: &lt;baseline&gt;.*256 &amp; more.*</details>", text, re.S)

    parser = _parse(index)
    assert len(parser.queries) == 2
    assert parser.queries[0]["caption"].strip("“” ") == CAPTION
    for query, retrieval in zip(parser.queries, retrievals):
        hits = query["hits"]
        assert [h["rank"] for h in hits] == list(range(1, 11))
        for hit, source in zip(hits, retrieval.hits):
            expected = "correct" if source.relevant else "incorrect"
            assert expected in hit["classes"]
            assert hit["relevant"] == str(source.relevant).lower()
        assert f"person ID {retrieval.query_person_id}" in query["text"]
    assert "first match at rank 1" in parser.queries[0]["text"]
    assert "first match at rank 2" in parser.queries[1]["text"]
    assert "4/10 correct" in parser.queries[0]["text"]

    # the corrupt image (paths[3]) is a placeholder in both queries, everything else a real thumbnail
    q1_hits, q2_hits = parser.queries[0]["hits"], parser.queries[1]["hits"]
    assert q1_hits[3]["img"] is None and q1_hits[3]["placeholder"] == "unreadable"
    assert q2_hits[8]["img"] is None and q2_hits[8]["placeholder"] == "unreadable"
    assert sum(h["img"] is None for h in q1_hits + q2_hits) == 2

    # thumbnails: relative, inside out_dir/thumbs, JPEG, requested height, one file per source image
    thumbs = sorted((out / "thumbs").iterdir())
    assert len(thumbs) == 11  # 12 distinct sources minus the corrupt one
    assert all(re.fullmatch(r"[0-9a-f]{20}\.jpg", t.name) for t in thumbs)
    for thumb in thumbs:
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and img.height == 64 and img.width <= 128
    assert q1_hits[2]["img"] == q2_hits[-1]["img"]  # paths[2] shown in both queries, one file
    for src in parser.img_srcs:
        assert not src.startswith(("/", "http:", "https:", "file:"))
        assert (out / src).is_file()

    # curves
    with Image.open(out / "curves.png") as img:
        assert img.format == "PNG" and img.width > 400
    assert "curves.png" in text
    assert "no validation metrics logged" not in text.lower()

    # self-contained: no scripts, stylesheets links or remote resources; no temp files left behind
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "http://" not in text and "https://" not in text
    assert not list(out.glob(".*.tmp")) and not list((out / "thumbs").glob(".*.tmp"))


@pytest.mark.parametrize("history", [None, "does_not_exist.csv"])
def test_missing_history(tmp_path: Path, history: str | None) -> None:
    out = tmp_path / "report"
    (out).mkdir()
    (out / "curves.png").write_bytes(b"stale")  # a plot left from an earlier report must not be shown
    index = write_report(out, title="eval", metrics={"test": {"R1": 50, "R5": 70, "R10": 80, "mAP": 45,
                                                                "mINP": 30}},
                         history_csv=None if history is None else tmp_path / history)
    text = index.read_text(encoding="utf-8")
    assert ">50.0<" in text and ">30.0<" in text
    assert not (out / "curves.png").exists()
    assert "curves.png" not in text
    assert "training history" in text.lower()
    assert not (out / "thumbs").exists()


def test_history_without_validation(tmp_path: Path) -> None:
    history = _write_history(tmp_path / "metrics.csv",
                             [{"epoch": 0, "step": s, "train/loss": 3.0 - 0.1 * s} for s in range(5)],
                             ["epoch", "step", "train/loss", "val/R1"])
    index = write_report(tmp_path / "r", title="t", metrics={}, history_csv=history)
    text = index.read_text(encoding="utf-8")
    assert "No validation metrics logged" in text
    assert (tmp_path / "r" / "curves.png").is_file()
    assert "No metrics recorded" in text


def test_history_with_epoch_losses_only(tmp_path: Path) -> None:
    history = _write_history(tmp_path / "metrics.csv",
                             [{"epoch": e, "step": 10 * e + 9, "train/loss_epoch": 1.0 / (e + 1)} for e in range(3)]
                             + [{"epoch": e, "step": 10 * e + 9, "val/mAP": 10.0 * e} for e in range(3)],
                             ["epoch", "step", "train/loss_epoch", "val/mAP"])
    index = write_report(tmp_path / "r", title="t", metrics={}, history_csv=history)
    assert (tmp_path / "r" / "curves.png").is_file()
    assert "no validation metrics logged" not in index.read_text(encoding="utf-8").lower()


def test_history_with_nothing_to_plot(tmp_path: Path) -> None:
    history = _write_history(tmp_path / "metrics.csv", [{"epoch": 0, "step": 0, "lr-SGD": 0.1}],
                             ["epoch", "step", "lr-SGD"])
    index = write_report(tmp_path / "r", title="t", metrics={}, history_csv=history)
    text = index.read_text(encoding="utf-8")
    assert not (tmp_path / "r" / "curves.png").exists()
    assert "No training losses logged" in text and "No validation metrics logged" in text


def test_empty_history_file(tmp_path: Path) -> None:
    history = tmp_path / "metrics.csv"
    history.write_text("")
    index = write_report(tmp_path / "r", title="t", metrics={}, history_csv=history)
    assert "Could not read training history" in index.read_text(encoding="utf-8")


def test_missing_and_missing_metric_values(tmp_path: Path) -> None:
    img = tmp_path / "only.png"
    Image.new("RGB", (10, 30), (1, 2, 3)).save(img)
    hits = [RetrievedImage(tmp_path / "gone.jpg", 1, 0.5, False), RetrievedImage(img, 2, 0.4, True)]
    index = write_report(tmp_path / "r", title="t", metrics={"partial": {"R1": 12.34}},
                         retrievals=[QueryRetrieval("q", 2, hits)], thumbnail_height=30)
    parser = _parse(index)
    assert [h["placeholder"] for h in parser.queries[0]["hits"]] == ["unreadable", ""]
    text = index.read_text(encoding="utf-8")
    assert ">12.3<" in text and text.count("&ndash;") == 4
    assert "no match" not in text and "first match at rank 2" in text


def test_rejects_tiny_thumbnail_height(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_report(tmp_path, title="t", metrics={}, thumbnail_height=2)
