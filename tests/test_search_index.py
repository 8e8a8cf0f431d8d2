"""Search index and Searcher: build, verify, corrupt images, resume, add, compatibility, filters, re-ranking."""

from __future__ import annotations

import json
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


def test_local_features_are_stored_fp16_memory_mapped_and_used_for_two_stage(tmp_path: Path, tiny_synthetic: Path) -> None:
    """A method with local features (ISANet): they go to fp16 memory-mapped files and two-stage
    search re-scores candidates with them, as the method's own similarity does."""
    from tbps.config import load_config
    from tbps.engine.module import PersonSearchModule
    from tbps.search.index import scan_folder

    config = load_config(
        "isanet/synthetic",
        ["data.image_size=[64,64]", "model.text_backbone.hidden_size=32", "model.text_backbone.embedding_dim=16",
         "model.image_backbone.pretrained=false", "model.text_backbone.min_count=1"],
    )
    torch.manual_seed(0)
    module = PersonSearchModule(config, num_classes=4)
    module.method.fit_text(["a man in a red shirt", "a woman with a black bag and blue jeans"])
    checkpoint = tmp_path / "isanet.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "epoch": 0,
         "tbps": {"format": 1, "method": "isanet", "config": module.config, "num_classes": 4, "label_map": {}}},
        checkpoint,
    )
    images = tmp_path / "gallery"
    shutil.copytree(tiny_synthetic / "imgs", images)
    sources = scan_folder(images)[:24]
    build_index(checkpoint, sources, tmp_path / "isanet.idx")

    searcher = Searcher.open(tmp_path / "isanet.idx")
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
