"""Tests for tbps.evaluation.rank: hand-worked metrics, ties, exclusions, chunking, input types."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tbps.evaluation import rank, rank_both

# Two queries (person ids 1 and 2) against five images with ids [1, 2, 1, 3, 2].
HAND_SIM = torch.tensor(
    [
        [0.2, 0.9, 0.8, 0.1, 0.5],  # query A (id 1): order 1,2,4,0,3 -> relevant (0, 2) at ranks 2 and 4
        [0.1, 0.7, 0.3, 0.2, 0.9],  # query B (id 2): order 4,1,2,3,0 -> relevant (1, 4) at ranks 1 and 2
    ]
)
HAND_QUERY_IDS = [1, 2]
HAND_GALLERY_IDS = [1, 2, 1, 3, 2]


def reference_metrics(sim: np.ndarray, query_ids: np.ndarray, gallery_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Straightforward per-query loop implementing the definitions directly."""
    first, ap, inp, scored = [], [], [], []
    for row, query_id in zip(sim, query_ids):
        order = np.argsort(-row, kind="stable")  # stable: ties keep gallery order
        relevant = gallery_ids[order] == query_id
        if not relevant.any():
            first.append(-1), ap.append(np.nan), inp.append(np.nan), scored.append(False)
            continue
        ranks = np.flatnonzero(relevant) + 1
        precision_at_k = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
        first.append(ranks[0])
        ap.append(float(np.sum(precision_at_k * relevant) / relevant.sum()))
        inp.append(relevant.sum() / ranks[-1])
        scored.append(True)
    return {
        "first_hit_rank": np.array(first),
        "average_precision": np.array(ap),
        "inverse_negative_penalty": np.array(inp),
        "scored": np.array(scored),
    }


def trapezoidal_ap(ranks: list[int], num_relevant: int) -> float:
    """The Market-1501 evaluation code's AP: trapezoid between the precisions before and at each hit."""
    ap = 0.0
    for i, r in enumerate(ranks):  # r is 1-based
        precision = (i + 1) / r
        old_precision = i / (r - 1) if r > 1 else 1.0
        ap += (1.0 / num_relevant) * (old_precision + precision) / 2
    return ap


def test_hand_worked_example() -> None:
    result = rank(HAND_SIM, HAND_QUERY_IDS, HAND_GALLERY_IDS, max_rank=5, return_per_query=True)
    # R@1: only B has a hit at rank 1 -> 1/2 = 50 %.  R@5: both have a hit in the top 5 -> 100 %.
    # AP_A = (1/2 + 2/4) / 2 = 0.5; AP_B = (1/1 + 2/2) / 2 = 1.0 -> mAP = 75 %.
    # INP_A = 2 / 4 = 0.5 (last hit at rank 4); INP_B = 2 / 2 = 1.0 -> mINP = 75 %.
    assert set(result) == {"R1", "R5", "mAP", "mINP", "num_queries", "num_excluded", "per_query"}
    assert result["R1"] == pytest.approx(50.0)
    assert result["R5"] == pytest.approx(100.0)
    assert result["mAP"] == pytest.approx(75.0)
    assert result["mINP"] == pytest.approx(75.0)
    assert result["num_queries"] == 2 and result["num_excluded"] == 0
    assert all(isinstance(result[key], float) for key in ("R1", "R5", "mAP", "mINP"))
    per_query = result["per_query"]
    np.testing.assert_array_equal(per_query["first_hit_rank"], [2, 1])
    np.testing.assert_allclose(per_query["average_precision"], [0.5, 1.0])
    np.testing.assert_allclose(per_query["inverse_negative_penalty"], [0.5, 1.0])
    np.testing.assert_array_equal(per_query["top_indices"], [[1, 2, 4, 0, 3], [4, 1, 2, 3, 0]])
    np.testing.assert_array_equal(per_query["scored"], [True, True])


def test_default_max_rank_reports_r1_r5_r10_and_clips_top_indices() -> None:
    result = rank(HAND_SIM, HAND_QUERY_IDS, HAND_GALLERY_IDS, return_per_query=True)
    assert (result["R1"], result["R5"], result["R10"]) == (50.0, 100.0, 100.0)
    # Only 5 gallery images exist, so the top list has 5 columns, not 10.
    assert result["per_query"]["top_indices"].shape == (2, 5)
    assert set(rank(HAND_SIM, HAND_QUERY_IDS, HAND_GALLERY_IDS, max_rank=3)) == {
        "R1", "mAP", "mINP", "num_queries", "num_excluded",
    }


def test_ap_is_non_interpolated_not_trapezoidal() -> None:
    # Query A has hits at ranks 2 and 4 (two relevant images).
    # Ours:       (1/2 + 2/4) / 2 = 0.5.
    # Trapezoid:  0.5 * (0/1 + 1/2) / 2 + 0.5 * (1/3 + 2/4) / 2 = 0.125 + 0.2083 = 0.3333.
    result = rank(HAND_SIM[:1], [1], HAND_GALLERY_IDS, return_per_query=True)
    assert trapezoidal_ap([2, 4], 2) == pytest.approx(1 / 3)
    assert result["per_query"]["average_precision"][0] == pytest.approx(0.5)
    assert result["mAP"] == pytest.approx(50.0)
    assert result["mAP"] != pytest.approx(100 * trapezoidal_ap([2, 4], 2))


def test_ties_keep_gallery_order() -> None:
    # Images 0 and 1 tie at 0.5; the stable sort puts the lower gallery index first.
    sim = torch.tensor([[0.5, 0.5, 0.1, 0.0]])
    # Irrelevant image first in gallery order: the relevant one (index 1) is ranked 2nd.
    tied_late = rank(sim, [7], [3, 7, 3, 3], return_per_query=True)
    assert tied_late["R1"] == 0.0 and tied_late["per_query"]["first_hit_rank"][0] == 2
    assert tied_late["mAP"] == pytest.approx(50.0)  # AP = 1/2
    # Relevant image first in gallery order: it wins the tie and is ranked 1st.
    tied_early = rank(sim, [7], [7, 3, 3, 3], return_per_query=True)
    assert tied_early["R1"] == 100.0 and tied_early["mAP"] == pytest.approx(100.0)
    np.testing.assert_array_equal(tied_early["per_query"]["top_indices"], [[0, 1, 2, 3]])
    # An all-equal row ranks purely by gallery index.
    flat = rank(torch.zeros(1, 6), [1], [0, 0, 0, 1, 0, 1], return_per_query=True)
    np.testing.assert_array_equal(flat["per_query"]["top_indices"], [[0, 1, 2, 3, 4, 5]])
    assert flat["per_query"]["first_hit_rank"][0] == 4  # AP = (1/4 + 2/6) / 2
    assert flat["per_query"]["average_precision"][0] == pytest.approx((1 / 4 + 2 / 6) / 2)


def test_query_without_relevant_image_is_warned_and_excluded() -> None:
    sim = torch.cat([HAND_SIM, torch.tensor([[0.3, 0.2, 0.9, 0.4, 0.6]])])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = rank(sim, [1, 2, 99], HAND_GALLERY_IDS, max_rank=5, return_per_query=True)
    # Exactly one warning (no divide-by-zero RuntimeWarning), carrying the count.
    assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)
    assert "1 of 3 queries" in str(caught[0].message)
    # Metrics are those of the two scorable queries alone.
    assert (result["R1"], result["R5"], result["mAP"], result["mINP"]) == pytest.approx((50.0, 100.0, 75.0, 75.0))
    assert result["num_queries"] == 2 and result["num_excluded"] == 1
    per_query = result["per_query"]
    np.testing.assert_array_equal(per_query["scored"], [True, True, False])
    assert per_query["first_hit_rank"][2] == -1
    assert np.isnan(per_query["average_precision"][2]) and np.isnan(per_query["inverse_negative_penalty"][2])


def test_all_queries_excluded_raises() -> None:
    with pytest.raises(ValueError, match="no query can be scored"):
        rank(HAND_SIM, [8, 9], HAND_GALLERY_IDS)


def test_nan_and_shape_errors() -> None:
    bad = HAND_SIM.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN.*row 1"):
        rank(bad, HAND_QUERY_IDS, HAND_GALLERY_IDS)
    with pytest.raises(ValueError, match=r"\(2, 5\).*length 3"):
        rank(HAND_SIM, [1, 2, 3], HAND_GALLERY_IDS)
    with pytest.raises(ValueError, match=r"\(2, 5\).*gallery_ids has length 4"):
        rank(HAND_SIM, HAND_QUERY_IDS, HAND_GALLERY_IDS[:4])
    with pytest.raises(ValueError, match="2-D"):
        rank(HAND_SIM[0], [1], HAND_GALLERY_IDS)
    with pytest.raises(ValueError, match="1-D"):
        rank(HAND_SIM, [[1, 2]], HAND_GALLERY_IDS)
    with pytest.raises(ValueError, match="chunk_size"):
        rank(HAND_SIM, HAND_QUERY_IDS, HAND_GALLERY_IDS, chunk_size=0)


def _random_case(seed: int, num_queries: int = 300, num_gallery: int = 200, num_ids: int = 40):
    generator = np.random.default_rng(seed)
    gallery_ids = generator.integers(0, num_ids, size=num_gallery)
    query_ids = generator.choice(np.unique(gallery_ids), size=num_queries)  # every query is scorable
    # One decimal place: plenty of ties, so the tie rule is exercised everywhere.
    sim = np.round(generator.random((num_queries, num_gallery)), 1).astype(np.float32)
    return sim, query_ids, gallery_ids


def test_chunked_equals_unchunked_and_reference() -> None:
    sim, query_ids, gallery_ids = _random_case(0)
    chunked = rank(torch.from_numpy(sim), query_ids, gallery_ids, chunk_size=7, return_per_query=True)
    whole = rank(torch.from_numpy(sim), query_ids, gallery_ids, chunk_size=1024, return_per_query=True)
    for key in ("R1", "R5", "R10", "mAP", "mINP", "num_queries", "num_excluded"):
        assert chunked[key] == whole[key]
    for key, value in whole["per_query"].items():
        np.testing.assert_array_equal(chunked["per_query"][key], value)
    expected = reference_metrics(sim, query_ids, gallery_ids)
    for key, value in expected.items():
        np.testing.assert_allclose(whole["per_query"][key], value, rtol=1e-12)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(whole["per_query"]["top_indices"], order)


def test_numpy_torch_and_id_types_agree() -> None:
    sim, query_ids, gallery_ids = _random_case(1, 50, 30, 8)
    from_torch = rank(torch.from_numpy(sim), torch.from_numpy(query_ids), torch.from_numpy(gallery_ids))
    from_numpy = rank(sim.astype(np.float64), query_ids, gallery_ids)
    from_lists = rank(sim.tolist(), query_ids.tolist(), gallery_ids.tolist())
    as_strings = rank(sim, [f"p{i}" for i in query_ids], [f"p{i}" for i in gallery_ids])
    readonly = sim.copy()
    readonly.setflags(write=False)
    from_readonly = rank(readonly, query_ids, gallery_ids)
    assert from_torch == from_numpy == from_lists == as_strings == from_readonly


def test_per_query_arrays_match_aggregate() -> None:
    sim, query_ids, gallery_ids = _random_case(2, 120, 80, 20)
    query_ids[:5] = 1000  # five unscorable queries
    with pytest.warns(UserWarning, match="5 of 120"):
        result = rank(sim, query_ids, gallery_ids, return_per_query=True)
    per_query = result["per_query"]
    scored = per_query["scored"]
    assert result["num_queries"] == scored.sum() == 115 and result["num_excluded"] == 5
    for k in (1, 5, 10):
        assert result[f"R{k}"] == pytest.approx(100 * np.mean(per_query["first_hit_rank"][scored] <= k))
        # R@k agrees with the top-k list itself.
        in_top = (gallery_ids[per_query["top_indices"][:, :k]] == query_ids[:, None]).any(axis=1)
        assert result[f"R{k}"] == pytest.approx(100 * np.mean(in_top[scored]))
    assert result["mAP"] == pytest.approx(100 * per_query["average_precision"][scored].mean())
    assert result["mINP"] == pytest.approx(100 * per_query["inverse_negative_penalty"][scored].mean())
    scored_inp = per_query["inverse_negative_penalty"][scored]
    assert ((scored_inp > 0) & (scored_inp <= 1)).all()


def test_rank_both_transposes() -> None:
    sim, caption_ids, image_ids = _random_case(3, 60, 40, 10)
    image_ids[:3] = 500  # a person with images but no caption
    image_queries = np.isin(image_ids, caption_ids)  # images whose person has no caption are excluded
    assert not image_queries.all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = rank_both(sim, caption_ids, image_ids, return_per_query=True)
        i2t = rank(np.ascontiguousarray(sim.T), image_ids, caption_ids, return_per_query=True)
    t2i = rank(sim, caption_ids, image_ids, return_per_query=True)
    assert both["t2i"]["mAP"] == t2i["mAP"] and both["t2i"]["num_queries"] == 60
    assert both["i2t"]["num_queries"] == image_queries.sum() == i2t["num_queries"]
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert both["i2t"][key] == i2t[key]
    expected = reference_metrics(sim.T, image_ids, caption_ids)
    np.testing.assert_allclose(both["i2t"]["per_query"]["average_precision"], expected["average_precision"])
