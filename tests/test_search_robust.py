"""Search robustness (issue 15 items 7, 8, 10, 11, 13, 15): `--overwrite` never deletes what is
not an index, index writers take a lock, `tbps serve` follows the index on disk, user text is
printed literally, damaged manifests and files give clear errors, and the folder scan reports
everything it passes over."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from search_fixtures import checkpoint_with_other_weights
from typer.testing import CliRunner

from tbps.search.index import (
    GalleryIndex,
    IndexLockedError,
    SearchIndexError,
    add_images,
    build_index,
    index_summary,
    index_write_lock,
    lock_path,
    scan_folder,
    verify_index,
)
from tbps.search.searcher import Searcher
from tbps.search.service import create_app

pytestmark = pytest.mark.slow

TOKEN = "correct-horse-battery-staple-42"


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def _unwrapped(text: str) -> str:
    return text.replace("\n", "")  # for needles without spaces: rich may fold a long path anywhere


def _copy_images(data_root: Path, target: Path, count: int, start: int = 0) -> list[Path]:
    files = sorted((data_root / "imgs").rglob("*.jpg"))[start : start + count]
    target.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, target / f.name)) for f in files]


def _small_index(checkpoint: Path, data_root: Path, work: Path, count: int = 4) -> Path:
    _copy_images(data_root, work / "photos", count)
    build_index(checkpoint, scan_folder(work / "photos"), work / "index", batch_size=8)
    return work / "index"


def _client(app, **kwargs) -> TestClient:
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False, **kwargs)


# --------------------------------------------------------------------------- item 7: --overwrite
def test_overwrite_replaces_only_a_folder_holding_an_index(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    """`--overwrite --out` pointed at the image folder deleted the images (it was replaced by the index)."""
    from tbps.cli.main import app

    photos = tmp_path / "photos"
    images = _copy_images(tiny_synthetic, photos, 3)
    before = sorted(p.name for p in photos.iterdir())
    with pytest.raises(FileExistsError, match="holds the images being indexed"):
        build_index(search_checkpoint, scan_folder(photos), photos, overwrite=True)
    result = CliRunner().invoke(app, ["index", "build", "--checkpoint", str(search_checkpoint), "--images", str(photos),
                                      "--out", str(photos), "--overwrite", "--workers", "0"])
    assert result.exit_code == 2 and "holds the images being indexed" in _flat(result.output)
    assert sorted(p.name for p in photos.iterdir()) == before and all(p.read_bytes() for p in images)

    # A folder of other things (no manifest): refused, untouched.
    other = tmp_path / "documents"
    other.mkdir()
    (other / "thesis.txt").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"is not a tbps index \(no manifest.json\)"):
        build_index(search_checkpoint, scan_folder(photos), other, overwrite=True)
    assert (other / "thesis.txt").read_text() == "years of work"
    # A manifest.json does not make a folder an index if it holds anything else.
    (other / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"holds files that are not part of a tbps index \('thesis.txt'\)"):
        build_index(search_checkpoint, scan_folder(photos), other, overwrite=True)
    assert (other / "thesis.txt").read_text() == "years of work"

    # A real index is replaced; one that someone put a picture into is not.
    out = tmp_path / "index"
    build_index(search_checkpoint, scan_folder(photos), out, batch_size=8)
    _copy_images(tiny_synthetic, photos, 2, start=3)
    report = build_index(search_checkpoint, scan_folder(photos), out, overwrite=True, batch_size=8)
    assert report.indexed == 5 and len(GalleryIndex.open(out)) == 5
    shutil.copy(images[0], out / "keep-me.jpg")
    with pytest.raises(FileExistsError, match=r"not part of a tbps index \('keep-me.jpg'\)"):
        build_index(search_checkpoint, scan_folder(photos), out, overwrite=True)
    assert (out / "keep-me.jpg").is_file()
    # An add replaces the index folder too: it refuses before encoding anything.
    extra = tmp_path / "extra"
    _copy_images(tiny_synthetic, extra, 1, start=9)
    with pytest.raises(FileExistsError, match="an add replaces the index folder"):
        add_images(out, scan_folder(extra))
    assert (out / "keep-me.jpg").is_file() and len(GalleryIndex.open(out)) == 5
    assert not lock_path(out).exists()  # the lock file goes with its holder
    # A link to an index: an add updates the folder it names, --overwrite refuses to replace the link.
    (out / "keep-me.jpg").unlink()
    (tmp_path / "current").symlink_to(out, target_is_directory=True)
    assert add_images(tmp_path / "current", scan_folder(extra)).indexed == 1
    assert (tmp_path / "current").is_symlink() and len(GalleryIndex.open(out)) == 6
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        build_index(search_checkpoint, scan_folder(photos), tmp_path / "current", overwrite=True)


# --------------------------------------------------------------------------- item 8: write lock
def _add_in_child(index: str, folder: str, wait: float, barrier, results) -> None:
    import torch

    torch.set_num_threads(1)  # a forked child never enters the parent's OpenMP pool
    try:
        barrier.wait(60)
        # A pause per one-image batch keeps both adds running at the same time.
        report = add_images(index, scan_folder(folder), batch_size=1, wait=wait, on_batch=lambda done, total: time.sleep(0.2))
        results.put((os.getpid(), "ok", report.indexed))
    except Exception as error:  # reported to the test, which checks the message
        results.put((os.getpid(), type(error).__name__, str(error)))


def _run_two_adds(index: Path, folders: list[Path], wait: float) -> list[tuple]:
    context = multiprocessing.get_context("fork")  # the children reuse the loaded modules: no import time
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_add_in_child, args=(str(index), str(f), wait, barrier, results)) for f in folders]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    return sorted(outcomes, key=lambda item: item[1] != "ok")


def test_two_adds_at_once_are_serialised_or_refused_and_lose_nothing(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    """Two `tbps index add` at once shared the working folders: one's images were lost."""
    index = _small_index(search_checkpoint, tiny_synthetic, tmp_path)
    first, second = tmp_path / "new-a", tmp_path / "new-b"
    _copy_images(tiny_synthetic, first, 3, start=10)
    _copy_images(tiny_synthetic, second, 3, start=20)
    outcomes = _run_two_adds(index, [first, second], wait=60)
    assert [outcome[1:] for outcome in outcomes] == [("ok", 3), ("ok", 3)]  # one waited for the other
    gallery = GalleryIndex.open(index)
    names = sorted(Path(row["path"]).name for row in gallery.metadata)
    assert len(gallery) == 10 and names == sorted(p.name for p in [*(tmp_path / "photos").iterdir(), *first.iterdir(), *second.iterdir()])
    assert verify_index(index) == []

    # Without waiting, the second fails at once and says who holds the index.
    third, fourth = tmp_path / "new-c", tmp_path / "new-d"
    _copy_images(tiny_synthetic, third, 3, start=30)
    _copy_images(tiny_synthetic, fourth, 3, start=40)
    (winner, status, indexed), (_, error, message) = _run_two_adds(index, [third, fourth], wait=0)
    assert (status, indexed, error) == ("ok", 3, "IndexLockedError")
    assert f"is being written by pid {winner}" in message
    assert len(GalleryIndex.open(index)) == 13 and verify_index(index) == []


def test_a_locked_index_fails_clearly_or_waits(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    from tbps.cli.main import app

    index = _small_index(search_checkpoint, tiny_synthetic, tmp_path)
    new = tmp_path / "new"
    _copy_images(tiny_synthetic, new, 2, start=10)
    with index_write_lock(index):
        assert lock_path(index).read_text().strip() == str(os.getpid())
        with pytest.raises(IndexLockedError, match=f"is being written by pid {os.getpid()}"):
            add_images(index, scan_folder(new))
        started = time.monotonic()
        with pytest.raises(IndexLockedError, match="after waiting 0.5 s"):
            add_images(index, scan_folder(new), wait=0.5)
        assert time.monotonic() - started >= 0.5
        with pytest.raises(IndexLockedError):
            build_index(search_checkpoint, scan_folder(new), index, overwrite=True)
        result = CliRunner().invoke(app, ["index", "add", str(index), "--images", str(new), "--workers", "0"])
        assert result.exit_code == 2 and f"is being written by pid {os.getpid()}" in _flat(result.output)
        built = CliRunner().invoke(app, ["index", "build", "--checkpoint", str(search_checkpoint), "--images", str(new),
                                         "--out", str(index), "--overwrite", "--wait", "0.3", "--workers", "0"])
        assert built.exit_code == 2 and "after waiting 0.3 s" in _flat(built.output)
    assert not lock_path(index).exists()
    assert add_images(index, scan_folder(new), wait=0.5).indexed == 2  # free again


# --------------------------------------------------------------------------- item 10: serve follows the index
def test_serve_follows_index_add_and_reloads_on_request(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    """`tbps serve` kept serving the old gallery after `tbps index add` until restarted."""
    index = _small_index(search_checkpoint, tiny_synthetic, tmp_path)
    auto = create_app(index, reload_check_seconds=0)
    manual = create_app(index, reload_check_seconds=None, token=TOKEN)
    client, manual_client = _client(auto), _client(manual, headers={"Authorization": f"Bearer {TOKEN}"})
    assert client.get("/api/health").json()["images"] == 4
    assert manual_client.get("/api/health").json()["images"] == 4
    before = auto.state.live.current

    elsewhere = tmp_path / "later"  # a new folder: it becomes an image root of the index
    _copy_images(tiny_synthetic, elsewhere, 2, start=10)
    add_images(index, scan_folder(elsewhere))
    assert client.get("/api/health").json()["images"] == 6  # the next request sees the new version
    info = client.get("/api/info").json()
    assert info["images"] == 6 and auto.state.live.reloads == 1
    assert client.get("/api/images/5").content == (elsewhere / sorted(p.name for p in elsewhere.iterdir())[1]).read_bytes()
    assert client.get("/api/images/5/thumbnail").status_code == 200
    assert client.get("/api/images/5/similar", params={"k": 1}).json()["hits"][0]["id"] == 5
    # A request that began on the old version finishes on it: its memory maps outlive the old files.
    assert len(before.searcher) == 4 and len(before.searcher.search("a man", k=10)) == 4

    # Without automatic reloads, POST /api/reload (token-protected like the rest) swaps it in.
    assert manual_client.get("/api/health").json()["images"] == 4
    assert _client(manual).post("/api/reload").status_code == 401
    reloaded = manual_client.post("/api/reload")
    assert reloaded.status_code == 200 and reloaded.json()["images"] == 6
    assert manual_client.get("/api/health").json()["images"] == 6


def test_serve_keeps_the_old_version_when_the_new_one_cannot_be_served(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    index = _small_index(search_checkpoint, tiny_synthetic, tmp_path)
    app = create_app(index, reload_check_seconds=0)
    client = _client(app)
    assert client.get("/api/health").json()["images"] == 4
    # Rebuilt with other weights: its embeddings are not comparable with the served model's queries.
    other = checkpoint_with_other_weights(search_checkpoint, tmp_path / "other.ckpt")
    _copy_images(tiny_synthetic, tmp_path / "photos", 1, start=10)
    build_index(other, scan_folder(tmp_path / "photos"), index, overwrite=True, batch_size=8)
    assert client.get("/api/health").json()["images"] == 4  # still the old version
    refused = client.post("/api/reload")
    assert refused.status_code == 409 and "made by another model" in refused.json()["detail"]
    # Damaged files: refused the same way (and the server path stays in the log).
    data = bytearray((index / "metadata.json").read_bytes())
    data[5] ^= 0x20
    (index / "metadata.json").write_bytes(bytes(data))
    damaged = client.post("/api/reload")
    assert damaged.status_code == 409 and "cannot be opened" in damaged.json()["detail"] and str(tmp_path) not in damaged.text
    assert client.get("/api/search", params={"q": "a man", "k": 10}).status_code == 200
    assert app.state.live.reloads == 0


def test_serve_reload_options(search_index: Path, monkeypatch) -> None:
    import uvicorn

    from tbps.cli.main import app

    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda application, **kwargs: started.append(application))
    runner = CliRunner()
    for options, seconds in (([], 1.0), (["--reload-check", "0"], 0.0), (["--no-auto-reload"], None)):
        result = runner.invoke(app, ["serve", str(search_index), *options])
        assert result.exit_code == 0, result.output
        assert started[-1].state.live.check_seconds == seconds
    both = runner.invoke(app, ["serve", str(search_index), "--no-auto-reload", "--reload-check", "5"])
    assert both.exit_code == 2 and "no effect with --no-auto-reload" in _flat(both.output)
    with pytest.raises(ValueError, match="reload_check_seconds must be >= 0"):
        create_app(search_index, reload_check_seconds=-1)


# --------------------------------------------------------------------------- item 11: literal user text
def test_rich_markup_in_queries_and_paths_is_printed_literally(search_index: Path, search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    """A query or path holding "[/]" crashed the CLI with a MarkupError."""
    from tbps.cli.main import app

    runner = CliRunner()
    query = "a man [/] in a [bold]red[/bold] coat :smile:"
    result = runner.invoke(app, ["search", str(search_index), query, "-k", "2"])
    assert result.exit_code == 0, result.output
    assert "[/] in a [bold]red[/bold] coat :smile:" in _flat(result.output)
    odd = tmp_path / "a[" / "]b"  # the path a[/]b/
    odd.parent.mkdir()
    shutil.copytree(search_index, odd)
    info = runner.invoke(app, ["index", "info", str(odd) + "/"])
    assert info.exit_code == 0, info.output
    assert "a[/]b" in _unwrapped(info.output)
    assert runner.invoke(app, ["index", "verify", str(odd)]).exit_code == 0
    missing = runner.invoke(app, ["index", "info", str(tmp_path / "x[/]y")])
    assert missing.exit_code == 2 and "x[/]y'" in _unwrapped(missing.output) and "is not a tbps index" in _flat(missing.output)
    problems = runner.invoke(app, ["index", "verify", str(tmp_path / "[red]z[/]")])
    assert problems.exit_code == 1 and "[red]z[/]'" in _unwrapped(problems.output) and "is not a tbps index" in _flat(problems.output)
    photos = tmp_path / "p[/]hotos"
    _copy_images(tiny_synthetic, photos, 2)
    (photos / "[bold]broken.jpg").write_bytes(b"not a picture")
    built = runner.invoke(app, ["index", "build", "--checkpoint", str(search_checkpoint), "--images", str(photos),
                                "--out", str(tmp_path / "i[/]x"), "--workers", "0"])
    assert built.exit_code == 0, built.output
    assert "[bold]broken.jpg" in _unwrapped(built.output) and "i[/]x" in _unwrapped(built.output)


# --------------------------------------------------------------------------- item 13: damaged manifests and files
def test_a_manifest_missing_keys_gives_clear_errors(search_index: Path, tmp_path: Path) -> None:
    """A manifest missing a key gave KeyError tracebacks in `index verify` and `index info`."""
    from tbps.cli.main import app

    runner = CliRunner()
    copy = Path(shutil.copytree(search_index, tmp_path / "index"))
    manifest = json.loads((copy / "manifest.json").read_text())
    assert set(manifest["file_sizes"]) == set(manifest["files"])
    for key in ("files", "method", "image_count"):
        (copy / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != key}))
        (problem,) = verify_index(copy)
        assert f"damaged manifest.json (missing {key})" in problem
        for command, code in ((["index", "verify", str(copy)], 1), (["index", "info", str(copy)], 2), (["search", str(copy), "a man"], 2)):
            result = runner.invoke(app, command)
            assert result.exit_code == code and f"missing {key}" in _flat(result.output), (command, result.output)
            assert not isinstance(result.exception, KeyError)
    broken = {**manifest, "image_count": "many", "files": {**manifest["files"], "../../etc/passwd": "0"}}
    (copy / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(SearchIndexError, match=r"malformed image_count \(expected a count\), files"):
        GalleryIndex.open(copy)
    (copy / "manifest.json").write_text(json.dumps([1, 2]))
    assert "not a JSON object" in verify_index(copy)[0]
    # Descriptive keys may be missing: info still works.
    (copy / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("created", "updated", "build_report")}))
    assert index_summary(copy)["created"] is None and runner.invoke(app, ["index", "info", str(copy)]).exit_code == 0


def test_opening_a_damaged_index_checks_sizes_and_small_files(search_index: Path, tmp_path: Path) -> None:
    """`tbps search` on an index with flipped bytes gave no warning."""
    from tbps.cli.main import app

    copy = Path(shutil.copytree(search_index, tmp_path / "index"))
    vectors = bytearray((copy / "global.npy").read_bytes())
    vectors[-3] ^= 0x01  # one bit of one feature: the file still loads
    (copy / "global.npy").write_bytes(bytes(vectors))
    with pytest.raises(SearchIndexError, match="global.npy: checksum mismatch"):
        Searcher.open(copy)
    result = CliRunner().invoke(app, ["search", str(copy), "a man"])
    assert result.exit_code == 2 and "is damaged: global.npy: checksum mismatch" in _flat(result.output)
    assert len(GalleryIndex.open(copy, hash_limit=0)) == 120  # sizes only: a larger file's flip is for verify
    assert verify_index(copy) == ["global.npy: checksum mismatch (modified or damaged)"]
    (copy / "metadata.json").write_bytes((copy / "metadata.json").read_bytes()[:-10])
    with pytest.raises(SearchIndexError, match=r"metadata.json: [\d,]+ bytes, the manifest says [\d,]+ \(truncated or replaced\)"):
        GalleryIndex.open(copy, hash_limit=0)
    # Indexes written before sizes were recorded are still opened (and hashed).
    older = Path(shutil.copytree(search_index, tmp_path / "older"))
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["file_sizes"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert len(GalleryIndex.open(older)) == 120


# --------------------------------------------------------------------------- item 15: scan reports, ids, upload reasons
def test_folder_scan_reports_dangling_links_fifos_and_unreadable_folders(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path, monkeypatch) -> None:
    """The scan dropped dangling links, FIFOs and unreadable folders without a word."""
    photos = tmp_path / "photos"
    _copy_images(tiny_synthetic, photos, 2)
    _copy_images(tiny_synthetic, photos / "locked", 2, start=5)
    (photos / "cam3").symlink_to(tmp_path / "unmounted-share", target_is_directory=True)
    (photos / "gone.jpg").symlink_to(photos / "deleted.jpg")
    os.mkfifo(photos / "pipe.jpg")
    locked = photos / "locked"
    os.chmod(locked, 0)
    real_scandir = os.scandir

    def scandir(path="."):  # root reads any folder: refuse this one as the file system would
        if not isinstance(path, int) and os.path.realpath(path) == str(locked.resolve()):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    try:
        for follow in (False, True):
            scan = scan_folder(photos, follow_symlinks=follow)
            assert len(scan) == 2
            reasons = {Path(item["path"]).name: item["reason"] for item in scan.skipped}
            assert set(reasons) == {"cam3", "gone.jpg", "pipe.jpg", "locked"}, reasons
            assert "dangling symbolic link" in reasons["cam3"] and "unmounted-share does not exist" in reasons["cam3"]
            assert "dangling symbolic link" in reasons["gone.jpg"]
            assert reasons["pipe.jpg"] == "not a regular file"
            assert reasons["locked"] == "folder cannot be read (Permission denied); the images in it are not indexed"
        report = build_index(search_checkpoint, scan, tmp_path / "index", batch_size=8)
        assert report.indexed == 2 and report.to_dict()["skipped_count"] == 4
        # A folder that cannot be read at all: the error says why there is nothing to index.
        with pytest.raises(ValueError, match=r"no images to index \(1 entries passed over, first: .*locked: folder cannot be read"):
            build_index(search_checkpoint, scan_folder(locked), tmp_path / "empty")
    finally:
        os.chmod(locked, 0o755)


def test_image_ids_must_be_integers(search_index: Path) -> None:
    """`search_by_id("3")` raised a numpy IndexError."""
    searcher = Searcher.open(search_index)
    for bad in ("3", 3.0, True, None):
        with pytest.raises(TypeError, match="image id must be an integer"):
            searcher.search_by_id(bad)
    with pytest.raises(TypeError, match="image id must be an integer, got '3'"):
        searcher.explain("3", "a man")
    with pytest.raises(TypeError):
        searcher.load_image("3")
    with pytest.raises(KeyError, match="no image with id 120"):
        searcher.search_by_id(120)
    assert searcher.search_by_id(np.int64(3), k=1)[0].id == searcher.search_by_id(3, k=1)[0].id == 3


def test_image_errors_never_show_object_reprs(search_index: Path, monkeypatch) -> None:
    """Upload errors leaked object reprs (`<_io.BytesIO object at 0x...>`)."""
    from PIL import Image

    from tbps.data.records import ImageLoadError
    from tbps.search.images import decode_image

    client = _client(create_app(search_index))
    for body in (b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a" + b"\x00" * 10):
        response = client.post("/api/search/image", files={"file": ("p.png", body, "image/png")})
        assert response.status_code == 400 and "0x" not in response.text and "_io" not in response.text, response.text

    def broken_open(fp, *args, **kwargs):  # what several Pillow plugins do with a damaged stream
        raise OSError(f"broken data stream when reading {fp!r}")

    monkeypatch.setattr(Image, "open", broken_open)
    with pytest.raises(ImageLoadError) as caught:
        decode_image(b"\xff\xd8\xff")
    assert caught.value.reason == "broken data stream when reading <upload>"
    response = client.post("/api/search/image", files={"file": ("p.jpg", b"\xff\xd8\xff", "image/jpeg")})
    assert response.status_code == 400 and response.json()["detail"] == "the upload is not a readable image: broken data stream when reading <upload>"
