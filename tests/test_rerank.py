"""Tests for tbps.evaluation.rerank: RVN re-ranking and two-stage similarity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbps.evaluation import rank, rvn_rerank, two_stage_similarity
from tbps.evaluation.rerank import _stable_top

# Images 0/1 and 2/3 are mutual nearest neighbours; with l = 2 and self included:
# N_i2i(0) = {0, 1}, N_i2i(1) = {1, 0}, N_i2i(2) = {2, 3}, N_i2i(3) = {3, 2}.
IMAGE_SIM = torch.tensor(
    [
        [1.0, 0.9, 0.1, 0.2],
        [0.9, 1.0, 0.3, 0.1],
        [0.1, 0.3, 1.0, 0.8],
        [0.2, 0.1, 0.8, 1.0],
    ]
)
TEXT_SIM = torch.tensor(
    [
        [0.9, 0.8, 0.2, 0.1],  # N_t2i = {0, 1}
        [0.2, 0.1, 0.6, 0.5],  # N_t2i = {2, 3}
        [0.3, 0.1, 0.7, 0.2],  # N_t2i = {2, 0}
    ]
)


def stable_order(row: np.ndarray) -> np.ndarray:
    return np.argsort(-row, kind="stable")


def reference_rvn(text_sim: np.ndarray, image_sim: np.ndarray, size: int) -> np.ndarray:
    """Double loop over (text, image) with Python sets, straight from the definition (7), (8)."""
    num_texts, num_images = text_sim.shape
    image_neighbours = []
    for i in range(num_images):
        others = [j for j in stable_order(image_sim[i]) if j != i]
        image_neighbours.append({i, *others[: size - 1]})  # image i is its own neighbour
    out = np.empty_like(text_sim, dtype=np.float64)
    for t in range(num_texts):
        text_neighbours = set(stable_order(text_sim[t])[:size].tolist())
        low, high = min(text_sim[t]), max(text_sim[t])
        for i in range(num_images):
            inter = len(text_neighbours & image_neighbours[i])
            union = len(text_neighbours | image_neighbours[i])
            normalised = (text_sim[t, i] - low) / (high - low) if high > low else 0.0  # (8)
            out[t, i] = 0.5 * (normalised + inter / union)
    return out


@pytest.mark.parametrize("count", [1, 3, 10, 40, 124, 125, 499, 500])
def test_stable_top_matches_stable_sort(count: int) -> None:
    # Few distinct values (ties everywhere) plus -0.0/0.0 and infinities; rows long enough that
    # torch.topk returns tied entries out of index order.
    generator = torch.Generator().manual_seed(count)
    scores = torch.randint(-3, 4, (64, 500), generator=generator).float()
    scores[scores == 3] = float("inf")
    scores[:, ::7] = -0.0
    expected = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]
    assert torch.equal(_stable_top(scores, count), expected)


def test_rvn_hand_example() -> None:
    # Each row is min-max normalised first (8): [.9, .8, .2, .1] -> [1, 7/8, 1/8, 0], etc.
    # Text 0: Jaccard with images = [2/2, 2/2, 0, 0] -> S' = 0.5 * ([1, 7/8, 1/8, 0] + [1, 1, 0, 0]).
    # Text 1: Jaccard = [0, 0, 1, 1]                 -> S' = 0.5 * ([.2, 0, 1, .8] + [0, 0, 1, 1]).
    # Text 2: {2, 0} meets every N_i2i in one image, union 3 -> Jaccard 1/3 everywhere.
    expected = torch.tensor(
        [
            [1.0, 15 / 16, 1 / 16, 0.0],
            [0.1, 0.0, 1.0, 0.9],
            [0.5 * (1 / 3 + 1 / 3), 0.5 * (0 + 1 / 3), 0.5 * (1 + 1 / 3), 0.5 * (1 / 6 + 1 / 3)],
        ]
    )
    out = rvn_rerank(TEXT_SIM, IMAGE_SIM, neighbours=2)
    torch.testing.assert_close(out, expected)
    assert out.shape == TEXT_SIM.shape and out.dtype == TEXT_SIM.dtype


def test_rvn_counts_image_as_its_own_neighbour() -> None:
    # Zero diagonal (e.g. raw scores where self is not the maximum); self must still be included:
    # N_i2i = 0:{0,1}, 1:{1,0}, 2:{2,0}, 3:{3,2}.  Without self, N_i2i(0) would be {1, 2}.
    image_sim = torch.tensor(
        [
            [0.0, 0.9, 0.8, 0.0],
            [0.9, 0.0, 0.1, 0.2],
            [0.8, 0.1, 0.0, 0.3],
            [0.0, 0.2, 0.3, 0.0],
        ]
    )
    text_sim = torch.tensor([[0.9, 0.8, 0.2, 0.1]])  # N_t2i = {0, 1}; normalised [1, 7/8, 1/8, 0]
    # Jaccard = [1, 1, 1/3, 0] -> S' = [1, 15/16, 1/16 + 1/6, 0].
    out = rvn_rerank(text_sim, image_sim, neighbours=2)
    torch.testing.assert_close(out, torch.tensor([[1.0, 15 / 16, 1 / 16 + 1 / 6, 0.0]]))


@pytest.mark.parametrize("neighbours,chunk_size", [(1, 4), (4, 5), (6, 100), (50, 3)])
def test_rvn_matches_double_loop_reference(neighbours: int, chunk_size: int) -> None:
    generator = np.random.default_rng(neighbours)
    text_sim = np.round(generator.random((13, 17)), 1)  # ties exercise the stable selection
    features = generator.normal(size=(17, 5))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    image_sim = np.round(features @ features.T, 1)
    out = rvn_rerank(torch.from_numpy(text_sim), torch.from_numpy(image_sim), neighbours, chunk_size=chunk_size)
    expected = reference_rvn(text_sim, image_sim, min(neighbours, 17))
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


def test_rvn_rerank_top_rescores_only_candidates() -> None:
    generator = torch.Generator().manual_seed(0)
    text_sim = torch.rand(9, 12, generator=generator)
    image_sim = torch.rand(12, 12, generator=generator)
    image_sim = (image_sim + image_sim.T) / 2
    full = rvn_rerank(text_sim, image_sim, neighbours=3)
    partial = rvn_rerank(text_sim, image_sim, neighbours=3, rerank_top=4, chunk_size=2)
    for t in range(9):
        candidates = stable_order(text_sim[t].numpy())[:4]
        rest = stable_order(text_sim[t].numpy())[4:]
        # The same Jaccard term; the scores are normalised (8) over the candidates only.
        scores = text_sim[t, candidates]
        jaccard = 2 * full[t, candidates] - (text_sim[t, candidates] - text_sim[t].min()) / (text_sim[t].max() - text_sim[t].min())
        expected = 0.5 * ((scores - scores.min()) / (scores.max() - scores.min()) + jaccard)
        np.testing.assert_allclose(partial[t, candidates].numpy(), expected.numpy(), atol=1e-6)
        assert partial[t, candidates].min() > partial[t, rest].max()
        expected_order = np.concatenate([candidates[stable_order(expected.numpy())], rest])
        np.testing.assert_array_equal(stable_order(partial[t].numpy()), expected_order)


@pytest.mark.parametrize("rerank_top", [None, 8])
@pytest.mark.parametrize("scale,shift", [(100.0, -30.0), (0.01, 2.0), (7.0, 0.0)])
def test_rvn_is_invariant_to_an_affine_rescaling_of_the_scores(rerank_top, scale: float, shift: float) -> None:
    """S' depends on each query's scores only up to a * S + b (a > 0): cosine scores, NAFS's
    global + local sums and ITM log-odds get the same re-ranking. Without the per-row
    normalisation (8), x100 scores would drown the Jaccard term and x0.01 would let it decide alone."""
    generator = torch.Generator().manual_seed(5)
    # float64, so that the rescaling itself loses no precision (0.01 * S + 2 in float32 keeps ~4 digits)
    features = torch.nn.functional.normalize(torch.randn(16, 6, generator=generator, dtype=torch.float64), dim=1)
    image_sim = features @ features.t()
    text_sim = torch.rand(11, 16, generator=generator, dtype=torch.float64) * 0.4 + 0.3
    text_sim[3] = 0.5  # a constant row: normalised to 0, the Jaccard term decides
    base = rvn_rerank(text_sim, image_sim, neighbours=4, rerank_top=rerank_top)
    rescaled = rvn_rerank(text_sim * scale + shift, image_sim, neighbours=4, rerank_top=rerank_top)
    orders = [[stable_order(m[t].numpy()).tolist() for t in range(11)] for m in (base, rescaled)]
    assert orders[0] == orders[1]
    if rerank_top is None:
        torch.testing.assert_close(rescaled, base, atol=1e-9, rtol=0)
    else:  # candidates carry S'; the others only keep their order below them
        for t in range(11):
            top = stable_order(text_sim[t].numpy())[:rerank_top]
            torch.testing.assert_close(rescaled[t, top], base[t, top], atol=1e-9, rtol=0)
    # The Jaccard term does change this ranking (so the test can tell a scale-dependent RVN apart).
    plain = [stable_order(text_sim[t].numpy()).tolist() for t in range(11)]
    assert plain != orders[0]


def test_rvn_keeps_infinite_scores_out_of_the_normalisation() -> None:
    text_sim = torch.tensor([[0.2, float("-inf"), 0.6, 0.4]])
    out = rvn_rerank(text_sim, IMAGE_SIM, neighbours=2)
    assert not torch.isnan(out).any() and out[0, 1] == float("-inf")
    assert stable_order(out[0].numpy())[-1] == 1


def test_rvn_validates_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(3, 3\)"):
        rvn_rerank(TEXT_SIM, IMAGE_SIM[:3, :3])
    with pytest.raises(ValueError, match="neighbours"):
        rvn_rerank(TEXT_SIM, IMAGE_SIM, neighbours=0)
    with pytest.raises(ValueError, match="NaN"):
        rvn_rerank(TEXT_SIM * float("nan"), IMAGE_SIM)


def _coarse_case(seed: int, num_texts: int = 20, num_images: int = 15) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.round(torch.rand(num_texts, num_images, generator=generator), decimals=1)  # many ties


def _lookup(matrix: torch.Tensor):
    def scorer(query_indices: torch.Tensor, candidate_indices: torch.Tensor) -> torch.Tensor:
        return matrix[query_indices.unsqueeze(1), candidate_indices]

    return scorer


@pytest.mark.parametrize("top_k", [1, 3, 8, 15, 40])
def test_two_stage_with_coarse_as_fine_keeps_ranking(top_k: int) -> None:
    coarse = _coarse_case(0)
    out = two_stage_similarity(coarse, _lookup(coarse), top_k, chunk_size=6)
    for t in range(coarse.shape[0]):
        np.testing.assert_array_equal(stable_order(out[t].numpy()), stable_order(coarse[t].numpy()))


@pytest.mark.parametrize("top_k", [1, 4, 14])
@pytest.mark.parametrize("coarse_scale,fine_scale", [(1.0, 1e3), (100.0, 1e-2)])
def test_two_stage_orders_candidates_by_fine_then_rest_by_coarse(
    top_k: int, coarse_scale: float, fine_scale: float
) -> None:
    # Fine scores far larger, then far smaller, than the coarse ones: the offsets must handle both.
    coarse = _coarse_case(1) * coarse_scale
    fine = torch.randn(coarse.shape, generator=torch.Generator().manual_seed(2)) * fine_scale
    out = two_stage_similarity(coarse, _lookup(fine), top_k, chunk_size=4)
    for t in range(coarse.shape[0]):
        stage_one = stable_order(coarse[t].numpy())
        candidates, rest = stage_one[:top_k], stage_one[top_k:]
        by_fine = candidates[stable_order(fine[t, candidates].numpy())]
        np.testing.assert_array_equal(stable_order(out[t].numpy()), np.concatenate([by_fine, rest]))
        np.testing.assert_array_equal(out[t, candidates].numpy(), fine[t, candidates].numpy())
        if len(rest):
            assert out[t, rest].max() < out[t, candidates].min()


def test_two_stage_passes_global_indices_and_checks_shape() -> None:
    coarse = _coarse_case(3, num_texts=10)
    seen: list[tuple[list[int], tuple[int, ...]]] = []

    def recording_scorer(query_indices: torch.Tensor, candidate_indices: torch.Tensor) -> torch.Tensor:
        seen.append((query_indices.tolist(), tuple(candidate_indices.shape)))
        return torch.zeros(candidate_indices.shape)

    two_stage_similarity(coarse, recording_scorer, 5, chunk_size=4)
    assert seen == [([0, 1, 2, 3], (4, 5)), ([4, 5, 6, 7], (4, 5)), ([8, 9], (2, 5))]
    with pytest.raises(ValueError, match="fine_scorer returned shape"):
        two_stage_similarity(coarse, lambda q, c: torch.zeros(len(q), 2), 5)
    with pytest.raises(ValueError, match="top_k"):
        two_stage_similarity(coarse, recording_scorer, 0)
    with pytest.raises(ValueError, match="infinite"):
        two_stage_similarity(coarse, lambda q, c: torch.full(c.shape, float("inf")), 5)


def test_two_stage_keeps_masked_coarse_scores_last() -> None:
    # -inf marks pairs excluded from retrieval; they must not turn into NaN and must rank last.
    coarse = torch.tensor([[0.3, float("-inf"), 0.9, 0.1, float("-inf"), 0.5]])
    out = two_stage_similarity(coarse, lambda q, c: torch.tensor([[2.0, 1.0]]), 2)
    assert not torch.isnan(out).any()
    # Candidates 2 (fine 2.0) and 5 (fine 1.0), then 0 and 3 by coarse, then the masked 1 and 4.
    np.testing.assert_array_equal(stable_order(out[0].numpy()), [2, 5, 0, 3, 1, 4])


def test_two_stage_equals_full_fine_scoring_on_kept_candidates() -> None:
    generator = torch.Generator().manual_seed(4)
    image_ids = torch.arange(30) // 3  # 10 persons x 3 images
    caption_ids = torch.randint(0, 10, (40,), generator=generator)
    relevant = (caption_ids[:, None] == image_ids[None, :]).float()
    coarse = torch.rand(40, 30, generator=generator) + 2 * relevant  # stage 1 keeps every relevant image
    fine = torch.rand(40, 30, generator=generator)
    top_k = 8

    out = two_stage_similarity(coarse, _lookup(fine), top_k, chunk_size=16)
    result = rank(out, caption_ids, image_ids, return_per_query=True)

    # Full fine scoring restricted to each query's kept candidates: everything else at -inf.
    candidates = torch.sort(coarse, dim=1, descending=True, stable=True).indices[:, :top_k]
    restricted = torch.full_like(fine, float("-inf")).scatter(1, candidates, fine.gather(1, candidates))
    expected = rank(restricted, caption_ids, image_ids, return_per_query=True)
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert result[key] == pytest.approx(expected[key])
    # Per query, the same as ranking the candidate sub-gallery alone.
    for q in range(40):
        kept = candidates[q]
        alone = rank(fine[q, kept][None], caption_ids[q : q + 1], image_ids[kept], return_per_query=True)
        for key in ("first_hit_rank", "average_precision", "inverse_negative_penalty"):
            assert result["per_query"][key][q] == pytest.approx(alone["per_query"][key][0])

    # top_k >= num_images is full fine scoring.
    full = two_stage_similarity(coarse, _lookup(fine), 30)
    torch.testing.assert_close(full, fine)
    assert rank(full, caption_ids, image_ids) == rank(fine, caption_ids, image_ids)


# --------------------------------------------------------------------------- evaluator: image-to-text


def test_image_to_text_ranks_the_plain_similarity_whatever_the_rerank(tmp_path) -> None:
    """RVN / two-stage scores are normalised and shifted per text row, so a column of them (what the
    image-to-text direction ranks) mixes scales: i2t must come from the method's plain similarity."""
    from PIL import Image

    from tbps.config import load_config, to_container
    from tbps.data.records import ImageRecord
    from tbps.evaluation.evaluator import evaluate_split, score_features
    from tbps.models.registry import create_method

    torch.manual_seed(0)
    model = to_container(load_config("baseline/synthetic", [
        "model.embed_dim=16", "model.image_backbone.pretrained=false", "model.text_backbone.name=bilstm", "model.text_backbone.pretrained=null", "model.text_backbone.freeze_layers=null",
        "model.text_backbone.min_count=1", "model.text_backbone.embedding_dim=8", "model.text_backbone.hidden_size=8",
    ]))["model"]
    method = create_method("baseline", model, num_classes=4, image_size=(64, 32))
    colours = ["red", "blue", "green", "black"]
    records = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 64), (40 * (i % 4), 17 * i, 200 - 15 * i)).save(path)
        captions = (f"a person in {colours[i % 4]} number {i}", f"someone wearing {colours[(i + 1) % 4]}")
        records.append(ImageRecord(image_path=path, person_id=i % 4, captions=captions, split="test"))
    method.fit_text([c for r in records for c in r.captions])

    plain = evaluate_split(method, records, (64, 32), batch_size=8, return_similarity=True, image_to_text=True)
    expected = rank(plain["similarity"].t(), plain["gallery_ids"], plain["query_ids"])
    for rerank in ("none", "rvn", "two-stage+rvn"):
        result = evaluate_split(method, records, (64, 32), batch_size=8, rerank=rerank, top_k=5, rvn_neighbours=3,
                                return_similarity=True, image_to_text=True)
        for key in ("R1", "R5", "R10", "mAP", "mINP"):
            assert result["i2t"][key] == pytest.approx(expected[key]), (rerank, key)
    # Ranking the columns of the re-ranked matrix (what `tbps eval --i2t` used to do) gives other numbers.
    reranked = rank(result["similarity"].t(), result["gallery_ids"], result["query_ids"])
    assert any(reranked[key] != pytest.approx(expected[key]) for key in ("R1", "mAP", "mINP"))
