"""Search index and Searcher: build, verify, corrupt images, resume, add, compatibility, filters, re-ranking."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from search_fixtures import (
    camera_of,
    checkpoint_with_embed_dim,
    checkpoint_with_other_weights,
    synthetic_records,
)

from tbps.search.index import (
    GalleryIndex,
    IndexCompatibilityError,
    SearchIndexError,
    add_images,
    build_index,
    choose_index_kind,
    index_summary,
    make_faiss_index,
    scan_folder,
    verify_index,
)
from tbps.search.searcher import Searcher, SearchFilters

pytestmark = pytest.mark.slow


def _copy_images(data_root: Path, target: Path, count: int, start: int = 0) -> list[Path]:
    files = sorted((data_root / "imgs").rglob("*.jpg"))[start : start + count]
    target.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, target / f.name)) for f in files]


def test_build_writes_complete_index_and_verifies(search_index: Path, search_checkpoint: Path, tiny_synthetic: Path) -> None:
    manifest = json.loads((search_index / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["method"] == "baseline"
    assert manifest["image_count"] == len(synthetic_records(tiny_synthetic)) == 120
    assert manifest["feature_dim"] == 64 and manifest["faiss"]["kind"] == "flat"
    assert set(manifest["files"]) >= {"global.faiss", "global.npy", "metadata.json"}
    assert manifest["build_report"]["skipped_count"] == 0
    assert verify_index(search_index, search_checkpoint) == []
    summary = index_summary(search_index)
    assert summary["cameras"] == ["c1", "c2", "c3"]
    assert summary["time_range"] == ["2024-05-01T08:00:00", "2024-05-01T09:59:00"]
    index = GalleryIndex.open(search_index)
    norms = np.linalg.norm(np.asarray(index.vectors), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    # Leftover working directories would mean a build that did not clean up.
    assert not list(search_index.parent.glob(".index.*"))


def test_verify_reports_damage(search_index: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(search_index, tmp_path / "index"))
    vectors = np.load(copy / "global.npy")
    vectors[0, 0] += 1.0
    np.save(copy / "global.npy", vectors)
    problems = verify_index(copy)
    assert problems == ["global.npy: checksum mismatch (modified or damaged)"]
    (copy / "metadata.json").unlink()
    assert "metadata.json: missing" in verify_index(copy)
    assert verify_index(tmp_path / "nothing")[0].endswith("is not a tbps index (no manifest.json)")


def test_corrupt_images_are_skipped_and_listed(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    good = _copy_images(tiny_synthetic, folder / "a", 5)
    (folder / "b").mkdir()
    (folder / "b" / "truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    (folder / "b" / "text.png").write_text("not an image")
    (folder / "b" / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    report = build_index(search_checkpoint, scan_folder(folder), tmp_path / "index", batch_size=3)
    assert report.indexed == 5
    assert sorted(Path(s["path"]).name for s in report.skipped) == ["empty.jpg", "text.png", "truncated.jpg"]
    assert all(s["reason"] for s in report.skipped)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["build_report"]["skipped_count"] == 3
    rows = json.loads((tmp_path / "index" / "metadata.json").read_text())
    assert [r["relative_path"] for r in rows] == [f"a/{p.name}" for p in good]
    with pytest.raises(FileExistsError):
        build_index(search_checkpoint, scan_folder(folder), tmp_path / "index")


class _Interrupt(Exception):
    pass


def test_interrupted_build_leaves_nothing_and_resumes(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    _copy_images(tiny_synthetic, folder, 14)
    sources = scan_folder(folder)
    out = tmp_path / "index"

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        build_index(search_checkpoint, sources, out, batch_size=4, on_batch=stop_after_two)
    assert not out.exists()  # no half-written index in place
    progress = json.loads((tmp_path / ".index.building" / "progress.json").read_text())
    assert progress["completed_batches"] == 2 and progress["total_batches"] == 4

    seen: list[int] = []
    resumed = build_index(search_checkpoint, sources, out, batch_size=4, resume=True, on_batch=lambda d, t: seen.append(d))
    assert resumed.resumed_from_batch == 2 and seen == [3, 4] and resumed.indexed == 14
    straight = build_index(search_checkpoint, sources, tmp_path / "straight", batch_size=4)
    assert straight.resumed_from_batch == 0
    np.testing.assert_allclose(np.load(out / "global.npy"), np.load(tmp_path / "straight" / "global.npy"), atol=1e-6)
    assert json.loads((out / "metadata.json").read_text()) == json.loads((tmp_path / "straight" / "metadata.json").read_text())
    assert not (tmp_path / ".index.building").exists()


def test_resume_refuses_a_different_build(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    _copy_images(tiny_synthetic, folder, 8)
    sources = scan_folder(folder)

    def stop(done: int, total: int) -> None:
        raise _Interrupt

    with pytest.raises(_Interrupt):
        build_index(search_checkpoint, sources, tmp_path / "index", batch_size=4, on_batch=stop)
    with pytest.raises(SearchIndexError, match="cannot resume"):
        build_index(search_checkpoint, sources[:5], tmp_path / "index", batch_size=4, resume=True)


def test_add_appends_without_rebuild(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    second = tmp_path / "second"
    _copy_images(tiny_synthetic, first, 6)
    _copy_images(tiny_synthetic, second, 4, start=6)
    out = tmp_path / "index"
    build_index(search_checkpoint, scan_folder(first), out, batch_size=4)
    old_vectors = np.load(out / "global.npy")
    report = add_images(out, scan_folder(second), batch_size=4)
    assert report.indexed == 4 and report.skipped == []
    index = GalleryIndex.open(out)
    assert len(index) == index.faiss_index.ntotal == 10
    np.testing.assert_array_equal(np.asarray(index.vectors[:6]), old_vectors)  # old rows untouched
    assert [Path(r["path"]).parent.name for r in index.metadata] == ["first"] * 6 + ["second"] * 4
    assert verify_index(out, search_checkpoint) == []
    # The appended images are searchable: each finds itself first by image similarity.
    searcher = Searcher.open(out)
    for row_id in (6, 9):
        assert searcher.search_by_image(index.metadata[row_id]["path"], k=1)[0].id == row_id
    again = add_images(out, scan_folder(second))
    assert again.indexed == 0 and {s["reason"] for s in again.skipped} == {"already indexed"}


def test_incompatible_checkpoints_are_refused(search_index: Path, search_checkpoint: Path, tmp_path: Path) -> None:
    smaller = checkpoint_with_embed_dim(search_checkpoint, tmp_path / "dim32.ckpt", 32)
    with pytest.raises(IndexCompatibilityError, match="64-d features, the checkpoint produces 32-d"):
        Searcher.open(search_index, smaller)
    other = checkpoint_with_other_weights(search_checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(IndexCompatibilityError, match="differs from the one the index was built with"):
        Searcher.open(search_index, other)
    assert len(Searcher.open(search_index, other, strict=False)) == 120
    assert any("32-d" in p for p in verify_index(search_index, smaller))
    # An index that claims another method.
    copy = Path(shutil.copytree(search_index, tmp_path / "index"))
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "method": "nafs"}))
    with pytest.raises(IndexCompatibilityError, match="built with method 'nafs', the checkpoint holds 'baseline'"):
        Searcher.open(copy, search_checkpoint)


def test_search_filters(search_index: Path, tiny_synthetic: Path) -> None:
    searcher = Searcher.open(search_index)
    records = synthetic_records(tiny_synthetic)
    camera_by_name = {Path(r["file_path"]).name: camera_of(r["id"]) for r in records}
    text = records[0]["captions"][0]
    unfiltered = searcher.search(text, k=120)
    assert [h.rank for h in unfiltered] == list(range(1, 121))
    assert all(a.score >= b.score for a, b in zip(unfiltered, unfiltered[1:]))
    hits = searcher.search(text, k=120, filters={"camera": "c2"})
    assert len(hits) == sum(c == "c2" for c in camera_by_name.values())
    assert all(h.metadata["camera"] == "c2" == camera_by_name[Path(h.path).name] for h in hits)
    # Filtering keeps the unfiltered order of the images it keeps.
    assert [h.id for h in hits] == [h.id for h in unfiltered if h.metadata["camera"] == "c2"]
    window = searcher.search(text, k=50, filters={"camera": ["c1", "c3"], "time_from": "2024-05-01T08:10", "time_to": "2024-05-01 08:29:00"})
    assert window and all(h.metadata["camera"] in ("c1", "c3") for h in window)
    assert all("2024-05-01T08:10:00" <= h.metadata["timestamp"] <= "2024-05-01T08:29:00" for h in window)
    assert searcher.search(text, k=5, filters={"camera": "no-such-camera"}) == []
    with pytest.raises(ValueError, match="unknown filter"):
        searcher.search(text, filters={"colour": "red"})
    with pytest.raises(ValueError, match="cannot parse timestamp"):
        SearchFilters.from_value({"time_from": "yesterday"})


def test_query_validation(search_index: Path) -> None:
    searcher = Searcher.open(search_index)
    with pytest.raises(ValueError, match="empty"):
        searcher.search("   ")
    for bad_k in (0, -1, 1001, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            searcher.search("a man", k=bad_k)
    with pytest.raises(ValueError, match="rerank must be one of"):
        searcher.search("a man", rerank="magic")
    with pytest.raises(KeyError, match="no image with id 120"):
        searcher.search_by_id(120)


def test_two_stage_equals_full_scoring_on_kept_candidates(search_index: Path, tiny_synthetic: Path) -> None:
    searcher = Searcher.open(search_index)
    text = synthetic_records(tiny_synthetic)[7]["captions"][0]
    candidates = 30
    stage_one = searcher.search(text, k=candidates)
    reranked = searcher.search(text, k=candidates, rerank="two-stage", candidates=candidates)
    assert {h.id for h in reranked} == {h.id for h in stage_one}  # same kept candidates
    # Full scoring: the method's own similarity against every kept candidate, from its features.
    ids = [h.id for h in stage_one]
    text_features = searcher.encode_text([text])
    full = searcher.method.similarity(text_features, searcher.index.image_features(ids))[0]
    expected = sorted(zip(ids, full.tolist()), key=lambda pair: -pair[1])
    assert [h.id for h in reranked] == [i for i, _ in expected]
    np.testing.assert_allclose([h.score for h in reranked], [s for _, s in expected], atol=1e-5)
    # Stage 1 itself is the method's global cosine.
    np.testing.assert_allclose([h.score for h in stage_one], [s for _, s in expected], atol=1e-5)


def test_rvn_rescoring_matches_shared_route(search_index: Path, tiny_synthetic: Path) -> None:
    from tbps.evaluation.rerank import rvn_rerank

    searcher = Searcher.open(search_index)
    text = synthetic_records(tiny_synthetic)[3]["captions"][0]
    stage_one = searcher.search(text, k=40)
    hits = searcher.search(text, k=10, rerank="rvn", candidates=40)
    vectors = searcher.index.image_features([h.id for h in stage_one])["global"]
    coarse = torch.tensor([[h.score for h in stage_one]])
    expected = rvn_rerank(coarse, vectors @ vectors.t(), neighbours=10)[0]
    order = torch.sort(expected, descending=True, stable=True).indices[:10]
    assert [h.id for h in hits] == [stage_one[i].id for i in order.tolist()]


def test_search_by_image_finds_same_person(search_index: Path, tiny_synthetic: Path) -> None:
    searcher = Searcher.open(search_index)
    index = searcher.index
    hits = searcher.search_by_image(index.metadata[10]["path"], k=3)
    assert hits[0].id == 10 and hits[0].score == pytest.approx(1.0, abs=1e-4)
    by_id = searcher.search_by_id(10, k=3)
    assert [h.id for h in by_id] == [h.id for h in hits]


def test_explain_maps_phrases_to_regions(search_index: Path) -> None:
    from PIL import Image
    import io

    searcher = Searcher.open(search_index)
    text = "a man in a blue jacket with a black backpack"
    hit = searcher.search(text, k=1)[0]
    explanation = searcher.explain(hit, text, grid=(6, 3))
    assert explanation.phrases[0] == text and "a black backpack" in explanation.phrases
    assert explanation.maps.shape == (len(explanation.phrases), 6, 3)
    assert explanation.maps.min() >= 0 and explanation.maps.max() == pytest.approx(1.0)
    image = Image.open(io.BytesIO(explanation.png))
    assert image.format == "PNG" and image.width > image.height


def test_explain_uses_the_methods_own_attention_when_it_has_one(search_index: Path, monkeypatch) -> None:
    import torch

    searcher = Searcher.open(search_index)
    text = "a man in a blue jacket with a black backpack"
    hit = searcher.search(text, k=1)[0]
    calls = []

    def attention(image, query):
        calls.append((tuple(image.shape), query))
        return ["a blue jacket", "a black backpack"], torch.tensor([[[0.0, 2.0], [1.0, 0.0]], [[0.5, 0.5], [0.0, 0.0]]])

    monkeypatch.setattr(searcher.method, "explain", attention)
    explanation = searcher.explain(hit, text)
    assert calls and calls[0][1] == text and len(calls[0][0]) == 3  # one normalised image
    assert explanation.phrases == ["a blue jacket", "a black backpack"]
    np.testing.assert_allclose(explanation.maps, [[[0.0, 1.0], [0.5, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    np.testing.assert_allclose(explanation.drops[0], [[0.0, 2.0], [1.0, 0.0]])


def test_faiss_kinds_by_size_and_approximate_recall() -> None:
    assert choose_index_kind(1_000) == "flat"
    assert choose_index_kind(500_000) == "hnsw"
    assert choose_index_kind(5_000_000) == "ivfpq"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:50] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    exact, _ = make_faiss_index(vectors, "flat")
    _, truth = exact.search(queries, 10)
    for kind in ("ivf", "hnsw"):
        index, params = make_faiss_index(vectors, kind)
        if "nprobe" in params:
            import faiss

            faiss.extract_index_ivf(index).nprobe = params["nprobe"]
        _, found = index.search(queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)])
        assert recall > 0.8, (kind, recall)


@pytest.fixture(scope="module")
def isanet_index(tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of 24 images built with a tiny, untrained ISANet (global and local features)."""
    from tbps.config import load_config
    from tbps.engine.module import PersonSearchModule

    work = tmp_path_factory.mktemp("isanet-index")
    config = load_config(
        "isanet/synthetic",
        ["data.image_size=[64,64]", "model.text_backbone.hidden_size=32", "model.text_backbone.embedding_dim=16",
         "model.image_backbone.pretrained=false", "model.text_backbone.min_count=1"],
    )
    torch.manual_seed(0)
    module = PersonSearchModule(config, num_classes=4)
    module.method.fit_text(["a man in a red shirt", "a woman with a black bag and blue jeans"])
    checkpoint = work / "isanet.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "epoch": 0,
         "tbps": {"format": 1, "method": "isanet", "config": module.config, "num_classes": 4, "label_map": {}}},
        checkpoint,
    )
    images = work / "gallery"
    shutil.copytree(tiny_synthetic / "imgs", images)
    build_index(checkpoint, scan_folder(images)[:24], work / "isanet.idx")
    return work / "isanet.idx"


def test_local_features_are_stored_fp16_memory_mapped_and_used_for_two_stage(isanet_index: Path) -> None:
    """A method with local features (ISANet): they go to fp16 memory-mapped files and two-stage
    search re-scores candidates with them, as the method's own similarity does."""
    searcher = Searcher.open(isanet_index)
    assert searcher.index.local, "ISANet's local features were not stored"
    for values in searcher.index.local.values():
        assert values.dtype == np.float16 and isinstance(values, np.memmap)
    text = "a woman with a black bag"
    hits = searcher.search(text, k=5, rerank="two-stage", candidates=10)
    # The re-scored order equals the method's own similarity on the (fp16-stored) features.
    text_features = searcher.encode_text([text])
    image_features = {key: torch.from_numpy(np.asarray(v[[h.id for h in hits]], dtype=np.float32))
                      for key, v in {"global": searcher.index.vectors, **searcher.index.local}.items()}
    direct = searcher.method.similarity(text_features, image_features)[0]
    np.testing.assert_allclose([h.score for h in hits], direct.numpy(), rtol=1e-4, atol=1e-4)


def test_search_ranks_by_the_methods_own_similarity(isanet_index: Path) -> None:
    """Issue 14: without re-ranking, an ISANet index ranked by the global cosine alone (S_local
    was ignored). The searcher now ranks every image by ``similarity`` = S_global + S_local,
    exactly as ``tbps eval`` does, filtered or not, whatever the tile size."""
    searcher = Searcher.open(isanet_index)
    assert searcher.scoring == "method"
    text = "a woman with a black bag and blue jeans"
    text_features = searcher.encode_text([text])
    every = np.arange(len(searcher))
    full = searcher.method.similarity(text_features, searcher.index.image_features(every))[0].numpy()
    expected = np.argsort(-full, kind="stable")
    global_only = np.argsort(-searcher.method.global_similarity(text_features, searcher.index.image_features(every))[0].numpy(), kind="stable")
    assert not np.array_equal(expected[:10], global_only[:10]), "S_local changes nothing here: the test would prove nothing"
    for tile_bytes in (64 * 1024 * 1024, 5 * 4 * (searcher.index.vectors.shape[1] + 1)):  # one tile; tiles of a few images
        searcher.score_tile_bytes = tile_bytes
        hits = searcher.search(text, k=10)
        assert [h.id for h in hits] == expected[:10].tolist()
        np.testing.assert_allclose([h.score for h in hits], full[expected[:10]], rtol=1e-5, atol=1e-5)
    assert searcher._score_tile() < 10  # the second pass really merged several tiles
    # A filtered subset (what filters pass on) keeps the unfiltered order of the images it keeps.
    odd = [i for i in expected.tolist() if i % 2]
    allowed = searcher._method_top(text_features, 5, np.array(sorted(odd), dtype=np.int64))[0]
    assert allowed.tolist() == odd[:5]
    # RVN starts from the method's own top candidates too.
    pool = searcher.search(text, k=24)
    rvn = searcher.search(text, k=24, rerank="rvn", candidates=24)
    assert {h.id for h in rvn} == {h.id for h in pool}


def test_global_methods_still_rank_through_faiss(search_index: Path, monkeypatch) -> None:
    searcher = Searcher.open(search_index)
    assert searcher.scoring == "global"
    monkeypatch.setattr(searcher, "_method_top", lambda *a, **k: pytest.fail("a global-only method needs no exhaustive scoring"))
    assert len(searcher.search("a man in a blue jacket", k=5)) == 5


# --------------------------------------------------------------------------- security
def test_an_index_naming_a_code_running_checkpoint_is_refused(search_index: Path, tmp_path: Path) -> None:
    """Issue 15 item 1: the manifest names the checkpoint `tbps search` / `tbps serve` load."""
    from typer.testing import CliRunner

    from tbps.cli.main import app
    from tbps.engine.checkpoint import UnsafeCheckpointError, read_checkpoint
    from tbps.utils import sha256_file

    from search_fixtures import write_code_running_checkpoint

    marker = tmp_path / "code-ran"
    copy = Path(shutil.copytree(search_index, tmp_path / "index"))
    manifest = json.loads((copy / "manifest.json").read_text())
    evil = write_code_running_checkpoint(tmp_path / "evil.ckpt", marker, like=read_checkpoint(manifest["checkpoint"]))
    (copy / "manifest.json").write_text(json.dumps({**manifest, "checkpoint": str(evil), "checkpoint_sha256": sha256_file(evil)}))
    with pytest.raises(UnsafeCheckpointError, match="was refused"):
        Searcher.open(copy)
    result = CliRunner().invoke(app, ["search", str(copy), "a man"])
    assert result.exit_code == 2 and "was refused" in " ".join(result.output.split())
    assert not marker.exists()


def test_verify_checks_the_checkpoint_hash_without_loading_it(search_index: Path, search_checkpoint: Path, tmp_path: Path) -> None:
    from search_fixtures import write_code_running_checkpoint

    from tbps.engine.checkpoint import read_checkpoint

    marker = tmp_path / "code-ran"
    copy = Path(shutil.copytree(search_index, tmp_path / "index"))
    swapped = tmp_path / "model.ckpt"
    shutil.copy(search_checkpoint, swapped)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "checkpoint": str(swapped)}))
    # (the manifest's checksum is not in its own file list, so editing it breaks nothing else)
    assert verify_index(copy) == []
    write_code_running_checkpoint(swapped, marker, like=read_checkpoint(search_checkpoint))
    problems = verify_index(copy)
    assert len(problems) == 1 and "has changed since the index was built" in problems[0]
    assert not marker.exists()


def _symlinked_folder(tiny_synthetic: Path, tmp_path: Path) -> tuple[Path, Path]:
    """photos/: two images, a link to an outside image, a link to an image inside, a link to an
    outside folder and a link back to photos/ itself; elsewhere/: the outside images."""
    folder, outside = tmp_path / "photos", tmp_path / "elsewhere"
    files = _copy_images(tiny_synthetic, folder / "people", 2)
    secret = _copy_images(tiny_synthetic, outside, 2, start=5)
    (folder / "secret.jpg").symlink_to(secret[0])
    (folder / "again.jpg").symlink_to(files[0])
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    (folder / "people" / "loop").symlink_to(folder, target_is_directory=True)
    return folder, outside


def test_folder_scan_does_not_follow_symlinks_unless_asked(tiny_synthetic: Path, tmp_path: Path) -> None:
    """Issue 15 item 2: the scan stored symlink targets outside the indexed folder."""
    folder, outside = _symlinked_folder(tiny_synthetic, tmp_path)
    scan = scan_folder(folder)
    assert [s.relative_path for s in scan] == sorted(f"people/{p.name}" for p in (folder / "people").glob("*.jpg"))
    assert all(s.path.is_relative_to(folder.resolve()) for s in scan)
    reasons = {Path(s["path"]).name: s["reason"] for s in scan.skipped}
    assert set(reasons) == {"secret.jpg", "again.jpg", "linked", "loop"}
    assert all("not followed" in reason for reason in reasons.values())

    followed = scan_folder(folder, follow_symlinks=True)
    assert {s.relative_path for s in followed} == {s.relative_path for s in scan}  # nothing outside, no duplicate
    reasons = {Path(s["path"]).name: s["reason"] for s in followed.skipped}
    assert "outside the indexed folder" in reasons["secret.jpg"] and "outside" in reasons["linked"]
    assert "same file as" in reasons["again.jpg"] and "already indexed" in reasons["loop"]

    # Links into a folder named with link_roots are followed, and that folder becomes a root.
    with_root = scan_folder(folder, follow_symlinks=True, link_roots=[outside])
    linked = sorted(f"linked/{p.name}" for p in outside.iterdir())
    assert [s.relative_path for s in with_root] == linked + [s.relative_path for s in scan]
    # secret.jpg is the same file as one reached through linked/: indexed once.
    assert "same file as" in {Path(s["path"]).name: s["reason"] for s in with_root.skipped}["secret.jpg"]
    assert with_root.roots == (folder.resolve(), outside.resolve())
    assert {s.root for s in with_root} == {folder.resolve(), outside.resolve()}
    with pytest.raises(ValueError, match="follow_symlinks"):
        scan_folder(folder, link_roots=[outside])


def test_oversized_images_are_skipped_undecoded_at_build(search_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    """Issue 15 item 4: a 21 KB PNG of 13,000 x 13,000 pixels is reported, never decoded."""
    from search_fixtures import write_png_bomb

    folder = tmp_path / "photos"
    _copy_images(tiny_synthetic, folder, 3)
    write_png_bomb(folder / "bomb.png", 13_000, 13_000)
    report = build_index(search_checkpoint, scan_folder(folder), tmp_path / "index", batch_size=4)
    assert report.indexed == 3
    (skip,) = report.skipped
    assert Path(skip["path"]).name == "bomb.png" and "13000 x 13000 = 169,000,000 pixels, over the limit of 40,000,000" in skip["reason"]
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["max_pixels"] == 40_000_000 and manifest["image_roots"] == [str(folder.resolve())]
    # The limit is the caller's: at 3,000 pixels every 96 x 40 image is over it.
    with pytest.raises(ValueError, match="none of the 4 images could be read"):
        build_index(search_checkpoint, scan_folder(folder), tmp_path / "small", max_pixels=3_000)
