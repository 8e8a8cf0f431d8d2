"""Generic re-ranking of text-to-image similarity matrices.

* :func:`rvn_rerank` - reciprocal-view-neighbour re-ranking (NAFS, Gao et al. 2021), corrected, with
  each query's scores min-max normalised before the Jaccard term is added (scale-free).
* :func:`two_stage_similarity` - coarse retrieval of the top-k candidates, then a fine scorer on them.

Both return a new [num_texts x num_images] matrix to feed :func:`tbps.evaluation.rank`.  Every
top-l / top-k selection uses the same rule as ``rank``: a stable descending sort, so tied scores
keep gallery order (the lower image index comes first).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["rvn_rerank", "two_stage_similarity"]


def _check_matrix(name: str, matrix: torch.Tensor) -> torch.Tensor:
    matrix = torch.as_tensor(matrix)
    if matrix.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(matrix.shape)}")
    if torch.isnan(matrix).any():
        raise ValueError(f"{name} contains NaN")
    return matrix


def _stable_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` best entries per row, best first, ties broken by lower index.

    Same result as the first ``count`` columns of a stable descending sort, without sorting whole
    rows when ``count`` is small: ``torch.topk`` (whose tie order is unspecified) finds the count-th
    value; rows where that value is tied beyond the top set pick the lowest-index ties; finally the
    ``count`` chosen entries are stably sorted by score after ordering them by index.
    """
    num_rows, num_cols = scores.shape
    if 4 * count >= num_cols:
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]
    top = torch.topk(scores, count, dim=1)
    chosen = top.indices
    threshold = top.values[:, -1:]  # count-th largest value per row
    ambiguous = ((scores >= threshold).sum(dim=1) > count).nonzero(as_tuple=True)[0]
    if ambiguous.numel():
        # More entries tie at the threshold than slots remain: keep the lowest-index ties.
        rows = scores[ambiguous]
        above = rows > threshold[ambiguous]
        tied = rows == threshold[ambiguous]
        slots_left = count - above.sum(dim=1, keepdim=True)
        selected = above | (tied & (torch.cumsum(tied, dim=1) <= slots_left))  # exactly count per row
        chosen = chosen.clone()
        chosen[ambiguous] = selected.nonzero(as_tuple=True)[1].view(-1, count)
    chosen = torch.sort(chosen, dim=1).values  # index order, so the stable sort below breaks ties by index
    best_first = torch.sort(scores.gather(1, chosen), dim=1, descending=True, stable=True).indices
    return chosen.gather(1, best_first)


def _place_candidates_first(
    coarse: torch.Tensor, candidates: torch.Tensor, candidate_scores: torch.Tensor
) -> torch.Tensor:
    """Rows whose ``candidates`` carry ``candidate_scores`` and all other entries rank strictly below them.

    Per row, non-candidates are shifted by a constant offset (4):
        out = coarse - max(coarse) + (min(fine) - margin),  margin = 2 + 0.01 * |min(fine)|
    with fine = ``candidate_scores``.  The shift is the same for the whole row, so non-candidates keep
    their coarse order and score gaps, and the largest of them is ``margin`` below the weakest
    candidate; its relative part keeps the gap representable for large fine scores.  (A later RVN
    pass must re-score the candidates only, ``rvn_rerank(..., rerank_top=k)``: min-max normalising
    (8) a whole row would shrink this gap below the Jaccard term's range.)  Offsets are computed in float64 and cast to the output dtype, so non-candidate order is
    exact unless coarse gaps are finer than that dtype's resolution at the fine scores' magnitude.
    """
    out_dtype = torch.promote_types(coarse.dtype, candidate_scores.dtype)
    if not out_dtype.is_floating_point:
        out_dtype = torch.get_default_dtype()
    coarse64 = coarse.double()
    fine64 = candidate_scores.double()
    fine_min = fine64.min(dim=1, keepdim=True).values
    floor = fine_min - (2.0 + 0.01 * fine_min.abs())
    # max(coarse) over finite entries, so -inf (masked) scores stay -inf instead of turning into NaN.
    finite_max = torch.where(coarse64.isfinite(), coarse64, float("-inf")).max(dim=1, keepdim=True).values
    finite_max = torch.where(finite_max.isfinite(), finite_max, 0.0)
    shifted = coarse64 - finite_max + floor  # (4)
    shifted = torch.minimum(shifted, floor)  # only +inf coarse scores left over from stage 1 are affected
    shifted.scatter_(1, candidates, fine64)
    return shifted.to(out_dtype)


def _minmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """(8): each row rescaled to [0, 1] by its finite minimum and maximum; a constant row becomes 0,
    infinite entries stay infinite (they take no part in the minimum and maximum)."""
    finite = scores.isfinite()
    low = torch.where(finite, scores, float("inf")).amin(dim=1, keepdim=True)
    high = torch.where(finite, scores, float("-inf")).amax(dim=1, keepdim=True)
    has_finite = finite.any(dim=1, keepdim=True)
    low = torch.where(has_finite, low, 0.0)
    span = torch.where(has_finite & (high > low), high - low, 1.0)
    return (scores - low) / span


def rvn_rerank(
    text_image_sim: torch.Tensor,
    image_image_sim: torch.Tensor,
    neighbours: int = 10,
    *,
    chunk_size: int = 1024,
    rerank_top: int | None = None,
) -> torch.Tensor:
    """Reciprocal-view-neighbour re-ranking (NAFS, Gao et al., "Contextual Non-Local Alignment over
    Full-Scale Representation for Text-Based Person Search", 2021), with the published bug fixed.

    For a text T and image I, with l = ``neighbours``:

    * (5) N_t2i(T) = the top-l images for T by ``text_image_sim``
    * (6) N_i2i(I) = the top-l images for I by ``image_image_sim`` (global image-image cosine)
    * (7) S'(T, I) = 0.5 * (S~(T, I) + |N_t2i(T) & N_i2i(I)| / |N_t2i(T) | N_i2i(I)|)
    * (8) S~(T, I) = (S(T, I) - min_J S(T, J)) / (max_J S(T, J) - min_J S(T, J)), J over the images
      being re-scored for T (every image; the top ``rerank_top`` when given); 0 on a constant row

    Both neighbourhoods are sets of *image* indices (the published code intersected text indices
    with image indices).  Image I always counts as its own neighbour: the diagonal of
    ``image_image_sim`` is treated as +inf, so N_i2i(I) = {I} plus its l - 1 best other images.
    l is clipped to the number of images, so both sets have exactly l members and
    |union| = 2l - |intersection|.

    (8) departs from the paper, which averages a cosine similarity with the Jaccard term: the scores
    handed to RVN differ in scale by method (cosine in [-1, 1], NAFS's global + local sum, LAIP's
    ITM log-odds), so the raw average would give the Jaccard term a different weight for every
    method. Min-max per query row puts S~ in [0, 1], the Jaccard term's range, whatever the scale:
    the 0.5 / 0.5 average means the same for every method, and S' is invariant to any rescaling
    a * S + b (a > 0) of a query's scores. Infinite scores (masked pairs) stay infinite and are left
    out of the min and max.

    The intersection equals M_t2i @ M_i2i^T for the binary membership matrices [T x I] and [I x I];
    it is computed as l row gathers of a uint8 M_i2i^T (one per slot of N_t2i), O(T * I * l) work
    instead of the O(T * I^2) dense product.  Memory: I^2 bytes plus O(chunk_size * I).

    ``rerank_top``: if given, only the top ``rerank_top`` images per text (by ``text_image_sim``) are
    re-scored with (7), normalised (8) among themselves; all others rank after them in their
    original order (offsets as in :func:`two_stage_similarity`).  Returns a new float [T x I] matrix
    on the input's device.
    """
    sim = _check_matrix("text_image_sim", text_image_sim)
    image_sim = _check_matrix("image_image_sim", image_image_sim)
    num_texts, num_images = sim.shape
    if image_sim.shape != (num_images, num_images):
        raise ValueError(
            f"image_image_sim must have shape ({num_images}, {num_images}) to match text_image_sim "
            f"{tuple(sim.shape)}, got {tuple(image_sim.shape)}"
        )
    if not isinstance(neighbours, int) or neighbours < 1:
        raise ValueError(f"neighbours must be a positive integer, got {neighbours!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if rerank_top is not None and (not isinstance(rerank_top, int) or rerank_top < 1):
        raise ValueError(f"rerank_top must be a positive integer or None, got {rerank_top!r}")
    if not sim.is_floating_point():
        sim = sim.float()
    if num_images == 0:
        return sim.clone()
    num_neighbours = min(neighbours, num_images)

    # (6) with self forced in: +inf on the diagonal puts image I first among its own neighbours.
    image_scores = image_sim.to(device=sim.device, copy=True)
    if not image_scores.is_floating_point():
        image_scores = image_scores.float()
    image_scores.fill_diagonal_(float("inf"))
    image_neighbours = _stable_top(image_scores, num_neighbours)  # [I x l]
    del image_scores
    # Transposed membership of (6): neighbour_of[j, i] = 1 iff j is in N_i2i(i).  One byte per cell;
    # counts accumulate in uint8 (or int32 when l > 255, where they could overflow).
    neighbour_of = torch.zeros(num_images, num_images, dtype=torch.uint8, device=sim.device)
    image_index = torch.arange(num_images, device=sim.device).repeat_interleave(num_neighbours)
    neighbour_of[image_neighbours.reshape(-1), image_index] = 1
    del image_neighbours
    count_dtype = torch.uint8 if num_neighbours <= 255 else torch.int32

    out = torch.empty_like(sim)
    for start in range(0, num_texts, chunk_size):
        block = sim[start : start + chunk_size]
        text_neighbours = _stable_top(block, num_neighbours)  # (5), [c x l]
        # |N_t2i(t) & N_i2i(i)| = sum over j in N_t2i(t) of neighbour_of[j, i]: one row gather per slot
        # (the same as M_t2i @ M_i2i^T, but O(c * I * l) and contiguous in memory).
        intersection = torch.zeros(block.shape, dtype=count_dtype, device=sim.device)
        for slot in range(num_neighbours):
            intersection += neighbour_of.index_select(0, text_neighbours[:, slot])
        intersection = intersection.to(block.dtype)
        jaccard = intersection / (2 * num_neighbours - intersection)
        if rerank_top is not None and rerank_top < num_images:
            candidates = _stable_top(block, rerank_top)
            rescored = 0.5 * (_minmax_rows(block.gather(1, candidates)) + jaccard.gather(1, candidates))  # (7), (8)
            rescored = _place_candidates_first(block, candidates, rescored)
        else:
            rescored = 0.5 * (_minmax_rows(block) + jaccard)  # (7), (8)
        out[start : start + chunk_size] = rescored
    return out


def two_stage_similarity(
    coarse_sim: torch.Tensor,
    fine_scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    top_k: int,
    *,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Two-stage retrieval: keep the top ``top_k`` images per text by ``coarse_sim``, re-score them.

    ``fine_scorer(query_indices, candidate_indices)`` gets the (global) text indices [q] of a chunk
    and their candidate image indices [q x k] in stage-1 order (best first), and returns fine
    scores [q x k] (higher = better).

    The returned [T x I] matrix holds the fine scores at the candidates; every other image gets
    ``coarse - max(coarse) + min(fine) - margin`` per row (see (4) in ``_place_candidates_first``),
    which puts all non-candidates strictly below every candidate and in their stage-1 order.  So
    :func:`tbps.evaluation.rank` on the result sees the candidates ordered by fine score (ties by
    image index), then the rest by coarse score.  ``top_k >= num_images`` is full fine scoring.
    Fine scores must be finite; coarse scores may be -inf (e.g. masked pairs).  The output dtype is
    the promotion of the coarse and fine dtypes.
    """
    coarse = _check_matrix("coarse_sim", coarse_sim)
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    num_texts, num_images = coarse.shape
    if num_texts == 0 or num_images == 0:
        return coarse.to(torch.promote_types(coarse.dtype, torch.get_default_dtype()), copy=True)
    k = min(top_k, num_images)
    out: torch.Tensor | None = None  # allocated once the fine scores' dtype is known
    for start in range(0, num_texts, chunk_size):
        block = coarse[start : start + chunk_size]
        query_indices = torch.arange(start, start + block.shape[0], device=coarse.device)
        candidates = _stable_top(block, k)  # stage 1
        fine = torch.as_tensor(fine_scorer(query_indices, candidates)).to(coarse.device)
        if fine.shape != candidates.shape:
            raise ValueError(
                f"fine_scorer returned shape {tuple(fine.shape)} for candidates of shape {tuple(candidates.shape)}"
            )
        if not torch.isfinite(fine).all():
            raise ValueError(
                f"fine_scorer returned NaN or infinite scores for queries {start}..{start + block.shape[0] - 1}"
            )
        placed = _place_candidates_first(block, candidates, fine)
        if out is None:
            out = torch.empty(coarse.shape, dtype=placed.dtype, device=coarse.device)
        out[start : start + block.shape[0]] = placed
    assert out is not None  # num_texts > 0
    return out
