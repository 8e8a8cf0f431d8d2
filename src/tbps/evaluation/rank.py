"""Retrieval metrics for text-based person search: R@k, mAP and mINP.

Protocol (shared by every text-based person search paper, e.g. CUHK-PEDES, ICFG-PEDES, RSTPReid):
every caption is a query, the gallery holds every image once, and a gallery image is relevant to
a query when both carry the same person id.  For one query with ``n`` relevant images whose
1-based ranks are ``r_1 < r_2 < ... < r_n``:

* (1) R@k  = 1 if ``r_1 <= k`` else 0 (averaged over queries: share of queries with a hit in the top k)
* (2) AP   = (1 / n) * sum_k P@k * rel_k = (1 / n) * sum_i i / r_i, with P@k = hits in top k / k
        (non-interpolated AP; *not* the trapezoidal rule of the Market-1501 evaluation code)
* (3) INP  = n / r_n (inverse negative penalty, Ye et al., "Deep Learning for Person Re-id", 2021)

mAP and mINP are the means of (2) and (3) over the scored queries.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["rank", "rank_both", "RECALL_RANKS"]

#: Ranks reported as ``R{k}`` (those not larger than ``max_rank``).
RECALL_RANKS: tuple[int, ...] = (1, 5, 10)

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]


def _as_similarity(similarity: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Return ``similarity`` as a 2-D tensor without copying when possible."""
    if isinstance(similarity, torch.Tensor):
        sim = similarity.detach()
    else:
        array = np.asarray(similarity)
        if any(stride < 0 for stride in array.strides):
            array = np.ascontiguousarray(array)  # torch cannot view negative strides
        with warnings.catch_warnings():
            # A read-only array (e.g. a memory map) is only read here, never written.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            sim = torch.as_tensor(array)
    if sim.dim() != 2:
        raise ValueError(f"similarity must be a 2-D [num_queries x num_gallery] matrix, got shape {tuple(sim.shape)}")
    return sim


def _ids_to_numpy(ids: ArrayLike, name: str) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        array = ids.detach().cpu().numpy()
    else:
        array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _encode_ids(
    query_ids: ArrayLike, gallery_ids: ArrayLike, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map both id lists to int64 tensors; non-integer ids (e.g. strings) are factorised jointly."""
    query = _ids_to_numpy(query_ids, "query_ids")
    gallery = _ids_to_numpy(gallery_ids, "gallery_ids")
    if query.dtype.kind in "iub" and gallery.dtype.kind in "iub":
        query_codes, gallery_codes = query.astype(np.int64), gallery.astype(np.int64)
    else:
        as_text = np.concatenate([query.astype(object), gallery.astype(object)]).astype(str)
        _, codes = np.unique(as_text, return_inverse=True)
        query_codes, gallery_codes = codes[: len(query)], codes[len(query) :]
    return (
        torch.as_tensor(query_codes, dtype=torch.int64, device=device),
        torch.as_tensor(gallery_codes, dtype=torch.int64, device=device),
    )


def _score_chunk(
    block: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Metrics of one chunk of queries.

    Returns (num_relevant [c], first_hit_rank [c], average_precision [c], inverse_negative_penalty [c],
    top_indices [c x top]); rows without a relevant image get rank -1 and NaN AP / INP.
    """
    rows_in_chunk = block.shape[0]
    # Stable descending sort: tied scores keep gallery order, so the lower gallery index ranks first.
    order = torch.sort(block, dim=1, descending=True, stable=True).indices
    relevant = gallery_ids.unsqueeze(0) == query_ids.unsqueeze(1)  # [c x G], gallery order
    num_relevant = relevant.sum(dim=1)
    hits = torch.gather(relevant, 1, order)  # [c x G], rank order
    del relevant
    # Only the hits matter for (2) and (3): list them row-major instead of cumsum-ing the dense
    # [c x G] matrix; the running hit count of a row is then a cumsum over the per-row counts.
    hit_rows, hit_cols = hits.nonzero(as_tuple=True)
    del hits
    hit_ranks = hit_cols + 1  # 1-based r_i
    row_start = torch.cumsum(num_relevant, 0) - num_relevant  # index of each row's first hit
    hit_ordinal = torch.arange(hit_rows.numel(), device=block.device) - row_start[hit_rows] + 1  # i in r_i
    precision_sum = torch.zeros(rows_in_chunk, dtype=torch.float64, device=block.device)
    precision_sum.index_add_(0, hit_rows, hit_ordinal.double() / hit_ranks.double())  # sum_i i / r_i

    scored = num_relevant > 0
    first_hit = torch.full((rows_in_chunk,), -1, dtype=torch.int64, device=block.device)
    last_hit = torch.full((rows_in_chunk,), -1, dtype=torch.int64, device=block.device)
    first_hit[scored] = hit_ranks[row_start[scored]]
    last_hit[scored] = hit_ranks[row_start[scored] + num_relevant[scored] - 1]
    nan = torch.full((rows_in_chunk,), float("nan"), dtype=torch.float64, device=block.device)
    denominator = num_relevant.clamp(min=1).double()  # the clamp only touches unscored rows, masked below
    average_precision = torch.where(scored, precision_sum / denominator, nan)  # (2)
    inverse_negative_penalty = torch.where(scored, num_relevant.double() / last_hit.clamp(min=1).double(), nan)  # (3)
    return num_relevant, first_hit, average_precision, inverse_negative_penalty, order[:, :top].clone()


def rank(
    similarity: torch.Tensor | np.ndarray,
    query_ids: ArrayLike,
    gallery_ids: ArrayLike,
    max_rank: int = 10,
    *,
    chunk_size: int = 1024,
    return_per_query: bool = False,
) -> dict[str, Any]:
    """Evaluate retrieval from a [num_queries x num_gallery] similarity matrix (higher = more similar).

    Returns ``R1``, ``R5``, ``R10`` (each ``R{k}`` with ``k <= max_rank``), ``mAP`` and ``mINP`` as
    Python floats in percent (definitions (1)-(3) in the module docstring), plus ``num_queries``
    (queries scored) and ``num_excluded``.

    Tie rule: each row is sorted by descending score with a *stable* sort, so images with equal
    scores keep gallery order - the lower gallery index ranks first.  NaN scores raise ValueError.

    A query without any relevant gallery image cannot be scored: it is excluded from every metric
    and one warning reports how many were excluded.  If no query can be scored, ValueError.

    Queries are processed ``chunk_size`` rows at a time, so memory stays O(chunk_size * num_gallery)
    on top of the input (measured: about 30 bytes per chunk element, mostly the sort's keys, indices
    and buffers; chunk_size 1024 with 20,000 images peaks near 0.7 GiB).  The input may live on any
    torch device; the sort runs there.

    With ``return_per_query=True`` the result also has ``per_query``, a dict of numpy arrays of
    length num_queries: ``first_hit_rank`` (1-based, -1 when unscored), ``average_precision`` and
    ``inverse_negative_penalty`` (fractions in [0, 1], NaN when unscored), ``scored`` (bool) and
    ``top_indices`` [num_queries x min(max_rank, num_gallery)] (gallery indices, best first).
    """
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    sim = _as_similarity(similarity)
    num_queries, num_gallery = sim.shape
    query_codes, gallery_codes = _encode_ids(query_ids, gallery_ids, sim.device)
    if query_codes.numel() != num_queries or gallery_codes.numel() != num_gallery:
        raise ValueError(
            f"similarity has shape {tuple(sim.shape)} but query_ids has length {query_codes.numel()} "
            f"and gallery_ids has length {gallery_codes.numel()}; expected ({num_queries},) and ({num_gallery},)"
        )
    if num_queries == 0 or num_gallery == 0:
        raise ValueError(f"no query can be scored: similarity has shape {tuple(sim.shape)}")

    top = min(max_rank, num_gallery)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, num_queries, chunk_size):
        block = sim[start : start + chunk_size]
        if not block.is_floating_point() or block.dtype in (torch.float16, torch.bfloat16):
            block = block.float()  # integer/half scores: sort in float32 (exact for half)
        if torch.isnan(block).any():
            bad_row = start + int(torch.isnan(block).any(dim=1).nonzero()[0])
            raise ValueError(f"similarity contains NaN (first in query row {bad_row}); NaN scores cannot be ranked")
        parts.append(_score_chunk(block, query_codes[start : start + chunk_size], gallery_codes, top))

    num_relevant, first_hit, average_precision, inverse_negative_penalty, top_indices = (
        torch.cat(column).cpu().numpy() for column in zip(*parts)
    )
    scored = num_relevant > 0
    num_scored = int(scored.sum())
    num_excluded = num_queries - num_scored
    if num_scored == 0:
        raise ValueError(f"no query can be scored: none of the {num_queries} queries has a relevant gallery image")
    if num_excluded:
        warnings.warn(
            f"{num_excluded} of {num_queries} queries have no relevant gallery image and are excluded from all metrics",
            UserWarning,
            stacklevel=2,
        )

    result: dict[str, Any] = {}
    for k in RECALL_RANKS:
        if k <= max_rank:
            result[f"R{k}"] = float(100.0 * np.mean(first_hit[scored] <= k))  # (1)
    result["mAP"] = float(100.0 * np.mean(average_precision[scored]))
    result["mINP"] = float(100.0 * np.mean(inverse_negative_penalty[scored]))
    result["num_queries"] = num_scored
    result["num_excluded"] = num_excluded
    if return_per_query:
        result["per_query"] = {
            "first_hit_rank": first_hit,
            "average_precision": average_precision,
            "inverse_negative_penalty": inverse_negative_penalty,
            "top_indices": top_indices,
            "scored": scored,
        }
    return result


def rank_both(
    similarity: torch.Tensor | np.ndarray,
    query_ids: ArrayLike,
    gallery_ids: ArrayLike,
    max_rank: int = 10,
    *,
    chunk_size: int = 1024,
    return_per_query: bool = False,
) -> dict[str, dict[str, Any]]:
    """Text-to-image and image-to-text evaluation of a [num_texts x num_images] similarity matrix.

    ``t2i`` is :func:`rank` as given; ``i2t`` ranks the transposed matrix, so every image is a query
    and the captions are its gallery.  ``query_ids`` are the caption ids, ``gallery_ids`` the image ids.

    ``i2t`` compares scores of different rows, so ``similarity`` must be a plain similarity: the
    output of two-stage or RVN re-ranking is shifted and normalised per text row (see
    :func:`tbps.evaluation.evaluator.evaluate_split`'s ``image_to_text``).
    """
    sim = _as_similarity(similarity)
    options: dict[str, Any] = {"chunk_size": chunk_size, "return_per_query": return_per_query}
    return {
        "t2i": rank(sim, query_ids, gallery_ids, max_rank, **options),
        "i2t": rank(sim.T, gallery_ids, query_ids, max_rank, **options),  # a view, no copy
    }
