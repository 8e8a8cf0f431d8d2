"""Cross-modal attention blocks shared by methods.

:class:`ContextualNonLocalAttention` is NAFS's contextual non-local attention (Gao et al. 2021,
Sec. 3.3, eqs. 2-5 and the text-to-image counterpart): every feature of one modality attends,
through a focal-filtered softmax, to *all* features of the other modality (every scale at once),
and the pair similarity is the mean cosine between each feature and its attended context. It is a
set-to-set similarity, so any method that scores an image against a caption from two sets of
local features (regions/phrases, stripes/words) can reuse it. ``lambda_scaling="counts"`` (the
module's default) takes out of the softmax the factor by which the focal-filtered score of
eqs. 2-3 grows with the numbers of queries and keys (see :func:`non_local_attention_weights`).

All functions here are batched over every (query item, key item) pair of two batches: a chunk of
``A`` items (e.g. images) against ``B`` items (e.g. captions) is one set of tensor operations
of shape ``[A, B, m, n]``; :func:`chunked_non_local_similarity` tiles large galleries so memory
stays bounded. There is no Python loop over pairs.

The ``fast_*`` functions (section "Evaluation kernels") give the same scores without autograd,
at a cost close to their two (NAFS) or one (ACSA) GEMM per tile: the methods score the test
gallery with them; training uses the differentiable functions above.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ContextualNonLocalAttention",
    "bidirectional_non_local_similarity",
    "candidate_bidirectional_non_local_similarity",
    "candidate_non_local_similarity",
    "chunked_non_local_similarity",
    "focal_filter",
    "non_local_attention_weights",
    "non_local_similarity",
    "attention_selectivity",
    "LAMBDA_SCALINGS",
    "NON_LOCAL_LAMBDA_IMAGE",
    "NON_LOCAL_LAMBDA_TEXT",
]

# How lambda multiplies the focal-filtered score in eq. 3 (see non_local_attention_weights).
LAMBDA_SCALINGS = ("counts", "none")
# Default inverse temperatures of ContextualNonLocalAttention under lambda_scaling="counts"
# (lambda_1 image-to-text, lambda_2 text-to-image); derived in its __init__.
NON_LOCAL_LAMBDA_IMAGE = 4.0
NON_LOCAL_LAMBDA_TEXT = 4.0


def focal_filter(normalized: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """NAFS's focal attention trick: ``s~_ab = [sum_c (s^_ab - s^_ac)]_+ * s^_ab`` (Sec. 3.3).

    ``normalized`` holds ``s^`` with the key axis last (``[..., n]``). The sum runs over the ``c``
    valid keys only (``key_mask`` broadcastable to ``normalized``, its last axis the keys), so it equals
    ``n_valid * s^_ab - sum_c s^_ac``: keys weighted below their row's mean are zeroed, which
    filters out irrelevant fragments before the softmax of eq. 3 (after BFAN, the paper's [15]).
    Masked keys come out as 0.
    """
    if key_mask is None:
        key_mask = normalized.new_ones(normalized.shape[-1])
    key_mask = key_mask.to(normalized.dtype)
    valid = normalized * key_mask
    count = key_mask.sum(dim=-1, keepdim=True)  # summed on the (small) mask, broadcast after
    gate = (count * valid - valid.sum(dim=-1, keepdim=True)).clamp(min=0)
    return gate * valid


def non_local_attention_weights(
    cosine: Tensor,
    query_mask: Tensor,
    key_mask: Tensor,
    inverse_temperature: float,
    focal: bool = True,
    epsilon: float = 1e-8,
    lambda_scaling: str = "none",
) -> Tensor:
    """Attention weights ``alpha_ab`` of eqs. 2-3 from raw cosines ``[..., m, n]``.

    ``cosine[..., a, b]`` is the cosine between query ``a`` and key ``b`` of one pair. Eq. 2 clips
    it at 0; it is then normalised over the *queries* (``s^_ab = s_ab / sum_a s_ab``, as the
    paper writes it), focal-filtered, and turned into a softmax over the valid keys with inverse
    temperature ``lambda`` (eq. 3). ``query_mask`` ``[..., m]`` and ``key_mask`` ``[..., n]``
    (broadcastable to the pair dimensions, 1 for real features).

    ``lambda_scaling``: ``"none"`` is eq. 3 as printed, ``lambda * s~_ab``. ``"counts"``
    multiplies lambda by ``Q^2 / K`` per pair (``Q`` valid queries, ``K`` valid keys; ``Q``
    without the focal filter), which is exact count removal: with ``r_ab = Q s^_ab = s_ab /
    mean_a s_ab`` (the cosine over its column mean, free of counts),
    ``s~_ab = [K (s^_ab - mean_c s^_ac)]_+ s^_ab = (K / Q^2) [r_ab - mean_c r_ac]_+ r_ab``, so
    the logit becomes ``lambda [r_ab - mean_c r_ac]_+ r_ab``. As printed, the image-to-text logits
    (Q = 6 image features, K = 34 text features) carry K / Q^2 = 0.94 and the text-to-image ones
    (Q = 34, K = 6) 6 / 34^2 = 0.0052, a factor (n / m)^3 ~ 180 apart; and the text-to-image
    factor moves with every caption's length.
    """
    if lambda_scaling not in LAMBDA_SCALINGS:
        raise ValueError(f"lambda_scaling must be one of {LAMBDA_SCALINGS}, got {lambda_scaling!r}")
    query_valid = query_mask.to(cosine.dtype).unsqueeze(-1)  # [..., m, 1]
    key_valid = key_mask.to(cosine.dtype).unsqueeze(-2)  # [..., 1, n]
    clipped = cosine.clamp(min=0) * query_valid * key_valid  # eq. 2, [x]_+
    normalized = clipped / (clipped.sum(dim=-2, keepdim=True) + epsilon)  # s^: sum over queries a
    filtered = focal_filter(normalized, key_valid) if focal else normalized
    temperature: Tensor | float = inverse_temperature
    if lambda_scaling == "counts":
        num_queries = query_valid.sum(dim=-2, keepdim=True)  # [..., 1, 1] Q of each pair
        scale = num_queries
        if focal:
            scale = num_queries.square() / key_valid.sum(dim=-1, keepdim=True).clamp(min=1.0)  # Q^2 / K
        temperature = inverse_temperature * scale
    logits = (temperature * filtered).masked_fill(key_valid == 0, float("-inf"))
    return logits.softmax(dim=-1)  # eq. 3, over the keys b


def attention_selectivity(alpha: Tensor, query_mask: Tensor, key_mask: Tensor) -> dict[str, float]:
    """How selective softmax attention ``alpha`` ``[..., q, k]`` (rows sum to 1 over valid keys) is.

    Averaged over the valid queries (``query_mask`` ``[..., q]`` and ``key_mask`` ``[..., 1, k]``
    or ``[..., q, k]``, broadcastable to ``alpha``): ``max_weight`` (1 = one-hot), ``uniform`` (the
    max weight of a uniform row, ``1 / K``), ``max_over_uniform`` (``max_weight * K`` per row: 1 =
    uniform, ``K`` = one-hot) and ``entropy`` (``H / log K``: 0 = one-hot, 1 = uniform; rows with
    one key count as 0).
    """
    query_valid = query_mask.to(alpha.dtype).expand(alpha.shape[:-1])
    keys = key_mask.to(alpha.dtype).sum(dim=-1).expand(alpha.shape[:-1])  # K of each row
    entropy = -(alpha * alpha.clamp(min=1e-30).log()).sum(dim=-1) / keys.clamp(min=2.0).log()
    top = alpha.amax(dim=-1)
    count = query_valid.sum().clamp(min=1.0)

    def mean(values: Tensor) -> float:
        return float((values * query_valid).sum() / count)

    return {
        "max_weight": mean(top),
        "uniform": mean(1.0 / keys.clamp(min=1.0)),
        "max_over_uniform": mean(top * keys),
        "entropy": mean(entropy),
    }


def _similarity_from_scores(
    cosine: Tensor,
    value_dots: Tensor,
    gram_product: Callable[[Tensor], Tensor],
    query_value_norm: Tensor,
    query_mask: Tensor,
    key_mask: Tensor,
    inverse_temperature: float,
    focal: bool,
    epsilon: float,
    lambda_scaling: str = "none",
) -> tuple[Tensor, Tensor]:
    """Eqs. 3-5 from the pair tensors ``[..., m, n]``; returns ``(S [...], alpha [..., m, n])``.

    ``value_dots[..., a, b] = v_a . u_b`` (query value with key value) and ``gram_product(alpha)``
    is ``alpha @ G`` with ``G`` the key item's value Gram matrix, so that
    ``v_a . r_a = sum_b alpha_ab v_a . u_b`` and ``||r_a||^2 = alpha_a^T G alpha_a``:
    ``r_a = sum_b alpha_ab u_b`` (eq. 3) is never built as a ``[..., m, D]`` tensor.
    """
    alpha = non_local_attention_weights(
        cosine, query_mask, key_mask, inverse_temperature, focal, epsilon, lambda_scaling
    )
    numerator = (alpha * value_dots).sum(dim=-1)  # v_a . r_a
    context_norm_sq = (gram_product(alpha) * alpha).sum(dim=-1)  # ||r_a||^2
    relevance = numerator / (query_value_norm * context_norm_sq.clamp(min=0).sqrt()).clamp(min=epsilon)  # eq. 4
    weights = query_mask.to(relevance.dtype)
    similarity = (relevance * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1.0)  # eq. 5
    return similarity, alpha


def non_local_similarity(
    query_queries: Tensor,
    query_values: Tensor,
    query_mask: Tensor | None,
    key_keys: Tensor,
    key_values: Tensor,
    key_mask: Tensor | None,
    inverse_temperature: float,
    focal: bool = True,
    epsilon: float = 1e-8,
    return_attention: bool = False,
    lambda_scaling: str = "none",
) -> Tensor | tuple[Tensor, Tensor]:
    """Contextual non-local similarity of every query item with every key item, ``[A, B]``.

    For image-to-text (eqs. 2-5) the *query side* is the image (``I_Q``, ``I_V``; ``m`` features
    per image) and the *key side* the caption (``T_K``, ``T_V``; ``n`` features); for
    text-to-image the roles swap (the caption's keys act as queries), exactly as in the paper.

    * eq. 3: ``r_va = sum_b alpha_ab t_vb``;
    * eq. 4: ``R(i_va, r_va) = cos(i_va, r_va)``;
    * eq. 5: ``S(I, T) = mean_a R(i_va, r_va)`` over the valid query features.

    Shapes: ``query_queries``/``query_values`` ``[A, m, D]``, ``key_keys``/``key_values``
    ``[B, n, D]``, masks ``[A, m]`` / ``[B, n]`` or None (all valid). Returns ``[A, B]`` (and the
    ``[A, B, m, n]`` attention weights if ``return_attention``). ``lambda_scaling``: see
    :func:`non_local_attention_weights` (here and in the functions below, ``"none"`` = eq. 3 as
    printed).
    """
    num_queries, m = query_queries.shape[:2]
    num_keys, n = key_keys.shape[:2]
    if query_mask is None:
        query_mask = query_queries.new_ones(num_queries, m)
    if key_mask is None:
        key_mask = key_keys.new_ones(num_keys, n)
    cosine = torch.einsum("amd,bnd->abmn", F.normalize(query_queries, dim=-1), F.normalize(key_keys, dim=-1))
    value_dots = torch.einsum("amd,bnd->abmn", query_values, key_values)
    gram = key_values @ key_values.transpose(1, 2)  # [B, n, n]
    similarity, alpha = _similarity_from_scores(
        cosine,
        value_dots,
        lambda weights: torch.einsum("abmn,bnl->abml", weights, gram),
        query_values.norm(dim=-1).unsqueeze(1),  # [A, 1, m]
        query_mask.unsqueeze(1),
        key_mask.unsqueeze(0),
        inverse_temperature,
        focal,
        epsilon,
        lambda_scaling,
    )
    if return_attention:
        return similarity, alpha
    return similarity


def candidate_non_local_similarity(
    query_queries: Tensor,
    query_values: Tensor,
    query_mask: Tensor | None,
    key_keys: Tensor,
    key_values: Tensor,
    key_mask: Tensor | None,
    inverse_temperature: float,
    focal: bool = True,
    epsilon: float = 1e-8,
    lambda_scaling: str = "none",
) -> Tensor:
    """The same similarity for ``T`` rows, each against its own ``K`` candidates, ``[T, K]``.

    One side is per row (``[T, m, D]``), the other per candidate (``[T, K, n, D]``): image-to-text
    two-stage scoring passes the candidate images as the query side (``[T, K, m, D]``) and the
    texts as the key side (``[T, n, D]``); text-to-image the other way round. Masks follow the
    features' leading shape (``[T, m]`` / ``[T, K, n]``) or are None.
    """
    per_candidate_queries = query_queries.dim() == 4
    if per_candidate_queries == (key_keys.dim() == 4):
        raise ValueError("exactly one side must be per candidate ([T, K, *, D]), the other per row ([T, *, D])")
    if query_mask is None:
        query_mask = query_queries.new_ones(query_queries.shape[:-1])
    if key_mask is None:
        key_mask = key_keys.new_ones(key_keys.shape[:-1])
    query_unit, key_unit = F.normalize(query_queries, dim=-1), F.normalize(key_keys, dim=-1)
    if per_candidate_queries:
        cosine = torch.einsum("tkmd,tnd->tkmn", query_unit, key_unit)
        value_dots = torch.einsum("tkmd,tnd->tkmn", query_values, key_values)
        gram = key_values @ key_values.transpose(1, 2)  # [T, n, n]
        gram_product = lambda weights: torch.einsum("tkmn,tnl->tkml", weights, gram)  # noqa: E731
        query_norm, key_mask = query_values.norm(dim=-1), key_mask.unsqueeze(1)
    else:
        cosine = torch.einsum("tmd,tknd->tkmn", query_unit, key_unit)
        value_dots = torch.einsum("tmd,tknd->tkmn", query_values, key_values)
        gram = key_values @ key_values.transpose(-1, -2)  # [T, K, n, n]
        gram_product = lambda weights: weights @ gram  # noqa: E731
        query_norm, query_mask = query_values.norm(dim=-1).unsqueeze(1), query_mask.unsqueeze(1)
    similarity, _ = _similarity_from_scores(
        cosine, value_dots, gram_product, query_norm, query_mask, key_mask, inverse_temperature, focal, epsilon,
        lambda_scaling,
    )
    return similarity


def chunked_non_local_similarity(
    query_queries: Tensor,
    query_values: Tensor,
    query_mask: Tensor | None,
    key_keys: Tensor,
    key_values: Tensor,
    key_mask: Tensor | None,
    inverse_temperature: float,
    focal: bool = True,
    max_elements: int = 1 << 23,
    lambda_scaling: str = "none",
) -> Tensor:
    """:func:`non_local_similarity` over tiles of the ``[A, B]`` pair grid.

    Each tile holds at most ``max_elements`` entries per ``[a, b, m, n]`` intermediate (the
    default, 8M floats = 32 MB each, keeps the peak to a few hundred MB), so a CUHK-PEDES test
    gallery (6,156 x 3,074 pairs) runs in bounded memory.
    """
    num_queries, m = query_queries.shape[:2]
    num_keys, n = key_keys.shape[:2]
    per_pair = max(1, m * n)
    key_block = max(1, min(num_keys, max_elements // per_pair))
    query_block = max(1, max_elements // (per_pair * key_block))
    rows = []
    for q_start in range(0, num_queries, query_block):
        q_slice = slice(q_start, q_start + query_block)
        columns = []
        for k_start in range(0, num_keys, key_block):
            k_slice = slice(k_start, k_start + key_block)
            columns.append(
                non_local_similarity(
                    query_queries[q_slice],
                    query_values[q_slice],
                    None if query_mask is None else query_mask[q_slice],
                    key_keys[k_slice],
                    key_values[k_slice],
                    None if key_mask is None else key_mask[k_slice],
                    inverse_temperature,
                    focal,
                    lambda_scaling=lambda_scaling,
                )
            )
        rows.append(torch.cat(columns, dim=1))
    if not rows:
        return query_queries.new_zeros(num_queries, num_keys)
    return torch.cat(rows, dim=0)


def bidirectional_non_local_similarity(
    image_queries: Tensor,
    image_values: Tensor,
    image_mask: Tensor | None,
    text_keys: Tensor,
    text_values: Tensor,
    text_mask: Tensor | None,
    image_inverse_temperature: float,
    text_inverse_temperature: float,
    focal: bool = True,
    image_to_text: bool = True,
    text_to_image: bool = True,
    max_elements: int | None = None,
    epsilon: float = 1e-8,
    lambda_scaling: str = "none",
) -> tuple[Tensor | None, Tensor | None]:
    """``(S, S')`` for every image x text, both ``[images x texts]``, sharing the pair products.

    Text-to-image attention compares the same vectors as image-to-text (``s'_ab = cos(t_ka,
    i_qb)`` is ``s_ba``, and ``t_va . i_vb`` is the transposed value product), so both directions
    are computed from one ``[I, T, m, n]`` cosine and one value-product tensor per tile: half the
    cost of two :func:`non_local_similarity` calls, with identical results. ``max_elements``
    bounds the entries of each ``[i, t, m, n]`` tile (None: one tile).
    """
    num_images, m = image_queries.shape[:2]
    num_texts, n = text_keys.shape[:2]
    if image_mask is None:
        image_mask = image_queries.new_ones(num_images, m)
    if text_mask is None:
        text_mask = text_keys.new_ones(num_texts, n)
    image_unit, text_unit = F.normalize(image_queries, dim=-1), F.normalize(text_keys, dim=-1)
    image_norm, text_norm = image_values.norm(dim=-1), text_values.norm(dim=-1)
    text_gram = text_values @ text_values.transpose(1, 2)  # [T, n, n]
    image_gram = image_values @ image_values.transpose(1, 2)  # [I, m, m]

    per_pair = max(1, m * n)
    budget = max_elements if max_elements is not None else num_images * num_texts * per_pair
    text_block = max(1, min(num_texts, budget // per_pair))
    image_block = max(1, budget // (per_pair * text_block))
    rows_i2t: list[Tensor] = []
    rows_t2i: list[Tensor] = []
    for i_start in range(0, num_images, image_block):
        i = slice(i_start, i_start + image_block)
        cols_i2t: list[Tensor] = []
        cols_t2i: list[Tensor] = []
        for t_start in range(0, num_texts, text_block):
            t = slice(t_start, t_start + text_block)
            cosine = torch.einsum("imd,tnd->itmn", image_unit[i], text_unit[t])
            value_dots = torch.einsum("imd,tnd->itmn", image_values[i], text_values[t])
            if image_to_text:
                gram = text_gram[t]
                similarity, _ = _similarity_from_scores(
                    cosine, value_dots, lambda w: torch.einsum("itmn,tnl->itml", w, gram),
                    image_norm[i].unsqueeze(1), image_mask[i].unsqueeze(1), text_mask[t].unsqueeze(0),
                    image_inverse_temperature, focal, epsilon, lambda_scaling,
                )
                cols_i2t.append(similarity)
            if text_to_image:
                gram = image_gram[i]
                similarity, _ = _similarity_from_scores(
                    cosine.transpose(-1, -2), value_dots.transpose(-1, -2),
                    lambda w: torch.einsum("itnm,iml->itnl", w, gram),
                    text_norm[t].unsqueeze(0), text_mask[t].unsqueeze(0), image_mask[i].unsqueeze(1),
                    text_inverse_temperature, focal, epsilon, lambda_scaling,
                )
                cols_t2i.append(similarity)
        if cols_i2t:
            rows_i2t.append(torch.cat(cols_i2t, dim=1))
        if cols_t2i:
            rows_t2i.append(torch.cat(cols_t2i, dim=1))
    empty = image_queries.new_zeros(num_images, num_texts)
    result_i2t = (torch.cat(rows_i2t) if rows_i2t else empty) if image_to_text else None
    result_t2i = (torch.cat(rows_t2i) if rows_t2i else empty) if text_to_image else None
    return result_i2t, result_t2i


def candidate_bidirectional_non_local_similarity(
    image_queries: Tensor,
    image_values: Tensor,
    text_keys: Tensor,
    text_values: Tensor,
    text_mask: Tensor | None,
    image_inverse_temperature: float,
    text_inverse_temperature: float,
    focal: bool = True,
    image_to_text: bool = True,
    text_to_image: bool = True,
    epsilon: float = 1e-8,
    lambda_scaling: str = "none",
) -> tuple[Tensor | None, Tensor | None]:
    """``(S, S')`` of each text ``t`` with its own candidate images, ``[T, K]`` each.

    ``image_queries``/``image_values`` ``[T, K, m, D]`` (the candidates' features),
    ``text_keys``/``text_values`` ``[T, n, D]``, ``text_mask`` ``[T, n]``. Shares the pair
    products between directions like :func:`bidirectional_non_local_similarity`.
    """
    num_texts, n = text_keys.shape[:2]
    if text_mask is None:
        text_mask = text_keys.new_ones(num_texts, n)
    image_mask = image_queries.new_ones(image_queries.shape[:3])  # [T, K, m]
    cosine = torch.einsum("tkmd,tnd->tkmn", F.normalize(image_queries, dim=-1), F.normalize(text_keys, dim=-1))
    value_dots = torch.einsum("tkmd,tnd->tkmn", image_values, text_values)
    result_i2t = result_t2i = None
    if image_to_text:
        text_gram = text_values @ text_values.transpose(1, 2)  # [T, n, n]
        result_i2t, _ = _similarity_from_scores(
            cosine, value_dots, lambda w: torch.einsum("tkmn,tnl->tkml", w, text_gram),
            image_values.norm(dim=-1), image_mask, text_mask.unsqueeze(1),
            image_inverse_temperature, focal, epsilon, lambda_scaling,
        )
    if text_to_image:
        image_gram = image_values @ image_values.transpose(-1, -2)  # [T, K, m, m]
        result_t2i, _ = _similarity_from_scores(
            cosine.transpose(-1, -2), value_dots.transpose(-1, -2), lambda w: w @ image_gram,
            text_values.norm(dim=-1).unsqueeze(1), text_mask.unsqueeze(1), image_mask,
            text_inverse_temperature, focal, epsilon, lambda_scaling,
        )
    return result_i2t, result_t2i


class ContextualNonLocalAttention(nn.Module):
    """NAFS's contextual non-local attention with its four learned projections (Sec. 3.3, Fig. 3).

    Images: ``I -> I_Q`` (queries) and ``I -> I_V`` (values); captions: ``T -> T_K`` (keys) and
    ``T -> T_V`` (values). Image-to-text (eqs. 2-5) gives ``S(I, T)``; text-to-image uses
    ``T_K`` as queries against ``I_Q`` as keys and gives ``S'(T, I)``; both are returned in the
    same ``[images x texts]`` layout so they can be fed to CSAL together.

    ``lambda_scaling`` (``"counts"`` by default, or ``"none"`` for eq. 3 as printed) and the two
    inverse temperatures: see ``__init__``.
    """

    def __init__(
        self,
        dim: int,
        image_inverse_temperature: float = NON_LOCAL_LAMBDA_IMAGE,
        text_inverse_temperature: float = NON_LOCAL_LAMBDA_TEXT,
        focal: bool = True,
        directions: str = "both",
        lambda_scaling: str = "counts",
    ) -> None:
        super().__init__()
        if directions not in ("both", "image-to-text", "text-to-image"):
            raise ValueError(f"directions must be both, image-to-text or text-to-image, got {directions!r}")
        if lambda_scaling not in LAMBDA_SCALINGS:
            raise ValueError(f"lambda_scaling must be one of {LAMBDA_SCALINGS}, got {lambda_scaling!r}")
        if image_inverse_temperature < 0 or text_inverse_temperature < 0:
            # A negative lambda would attend to the *least* similar features; the evaluation
            # kernels (fast_bidirectional_non_local_similarity) take the largest logit as s' grows.
            raise ValueError(
                f"inverse temperatures must be >= 0, got {image_inverse_temperature} / {text_inverse_temperature}"
            )
        self.image_query = nn.Linear(dim, dim)
        self.image_value = nn.Linear(dim, dim)
        self.text_key = nn.Linear(dim, dim)
        self.text_value = nn.Linear(dim, dim)
        # lambda_1 (eq. 3) and lambda_2 (its text-to-image twin); the paper gives no values.
        # Eq. 2 normalises the cosines over the queries and the focal filter sums over the keys,
        # so the printed logit lambda * s~ carries K / Q^2 (non_local_attention_weights): with
        # Q = 6 image features and K = 34 text features (sentence, 3 sub-sentences, 30 words)
        # that is 0.94 image-to-text and 0.0052 text-to-image. One lambda for both (the old
        # default, 20) therefore made image-to-text nearly one-hot and text-to-image nearly
        # uniform, and no change of the features can fix it: both directions read the same
        # cosines. "counts" divides the factor out per pair, exactly, so lambda acts on
        # [r - mean r]_+ r with r = cosine / its mean over the queries, whatever the caption
        # length. Measured with every valid query counted (tests/test_nafs.py,
        # structured_pairs: D = 256, 6 image features against 1 + 3 + 20-30 text features,
        # body parts shared as "a word = an image part + noise", a common offset as in
        # pretrained features, matched cosines 0.41), one count-free lambda gives both
        # directions about the same normalised entropy (0 one-hot, 1 uniform): 0.74 / 0.61 at
        # lambda = 4, 0.61 / 0.56 at 6, 0.53 / 0.53 at 8. The default 4 for both gives max
        # weights of 0.25 (7.2x uniform over ~29 keys) image-to-text and 0.55 (3.3x over 6)
        # text-to-image, against 0.61 (17x) and 0.18 (1.1x, entropy 1.00) for 20/20 as printed.
        # Of 1, 2, 3, 4, 6 and 8 it is the largest that keeps a freshly built synthetic-config
        # NAFS (pretrained EfficientNet-Lite0 + MiniLM, new projections, rendered synthetic
        # people) below a max weight of 0.9 in both directions: 0.88 / 0.85 (6: 0.91 / 0.89;
        # 20/20 as printed: 0.94 / 0.28). As printed (lambda_scaling="none") lambda = 4 is lambda_1 = 4 * 6^2 / 34 = 4.2
        # and lambda_2 = 4 * 34^2 / 6 = 771 at 34 text features.
        self.image_inverse_temperature = float(image_inverse_temperature)  # lambda_1 (eq. 3)
        self.text_inverse_temperature = float(text_inverse_temperature)  # lambda_2
        self.focal = bool(focal)
        self.directions = directions
        self.lambda_scaling = lambda_scaling

    @property
    def uses_image_to_text(self) -> bool:
        return self.directions in ("both", "image-to-text")

    @property
    def uses_text_to_image(self) -> bool:
        return self.directions in ("both", "text-to-image")

    def project(
        self, image_features: Tensor, text_features: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(I_Q, I_V, T_K, T_V)`` for ``[*, m, D]`` image and ``[*, n, D]`` text features."""
        return (
            self.image_query(image_features),
            self.image_value(image_features),
            self.text_key(text_features),
            self.text_value(text_features),
        )

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        image_mask: Tensor | None = None,
        text_mask: Tensor | None = None,
        max_elements: int | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(S, S')``, each ``[images x texts]`` (None for a direction switched off).

        ``S[i, j] = S(I_i, T_j)`` (image-to-text, eq. 5), ``S'[i, j] = S'(T_j, I_i)``.
        ``max_elements`` tiles the pair grid (evaluation); None computes it in one go (training).
        """
        image_queries, image_values, text_keys, text_values = self.project(image_features, text_features)
        return self.similarities_from_projections(
            image_queries, image_values, image_mask, text_keys, text_values, text_mask, max_elements
        )

    def similarities_from_projections(
        self,
        image_queries: Tensor,
        image_values: Tensor,
        image_mask: Tensor | None,
        text_keys: Tensor,
        text_values: Tensor,
        text_mask: Tensor | None,
        max_elements: int | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Both directions from already projected features (see :meth:`forward`).

        With autograd (training) this is :func:`bidirectional_non_local_similarity`; without
        (evaluation, ``torch.no_grad()``) the same numbers come from
        :func:`fast_bidirectional_non_local_similarity`, ``max_elements`` capping its tiles.
        """
        score = bidirectional_non_local_similarity
        if not requires_autograd(image_queries, image_values, text_keys, text_values):
            score = fast_bidirectional_non_local_similarity
        return score(
            image_queries, image_values, image_mask, text_keys, text_values, text_mask,
            self.image_inverse_temperature, self.text_inverse_temperature, self.focal,
            image_to_text=self.uses_image_to_text, text_to_image=self.uses_text_to_image, max_elements=max_elements,
            lambda_scaling=self.lambda_scaling,
        )

    def project_for_evaluation(
        self, image_features: Tensor, text_features: Tensor, text_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`project` without gradients, for scoring: text features are projected only where
        ``text_mask`` is 1 (padding comes out 0, which the evaluation kernels ignore), float32
        CPU products through oneDNN (:func:`linear_for_evaluation`)."""
        with torch.no_grad():
            layers = (self.image_query, self.image_value)
            image_queries, image_values = _PROJECTED_GALLERY.get(  # the same gallery for every chunk of captions
                (image_features, *(tensor for layer in layers for tensor in (layer.weight, layer.bias))),
                None,
                lambda: linear_for_evaluation(image_features, layers),
            )
            return (image_queries, image_values, *linear_for_evaluation(text_features, (self.text_key, self.text_value), text_mask))

    def matched_attention(
        self, image_queries: Tensor, text_keys: Tensor, image_mask: Tensor | None = None, text_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Attention weights of the pairs (image ``i``, text ``i``): ``(alpha [B, m, n], alpha' [B, n, m])``.

        ``alpha`` is eq. 3's (each image query over the text keys, lambda_1), ``alpha'`` the
        text-to-image one (each text key over the image queries, lambda_2), from projected
        ``image_queries`` ``[B, m, D]`` and ``text_keys`` ``[B, n, D]`` (masks ``[B, m]`` /
        ``[B, n]`` or None). Both are computed whatever ``directions`` says: they are what
        Fig. 4 shows and what :func:`attention_selectivity` measures.
        """
        if image_mask is None:
            image_mask = image_queries.new_ones(image_queries.shape[:2])
        if text_mask is None:
            text_mask = text_keys.new_ones(text_keys.shape[:2])
        cosine = torch.einsum("bmd,bnd->bmn", F.normalize(image_queries, dim=-1), F.normalize(text_keys, dim=-1))
        alpha = non_local_attention_weights(
            cosine, image_mask, text_mask, self.image_inverse_temperature, self.focal, lambda_scaling=self.lambda_scaling
        )
        alpha_t2i = non_local_attention_weights(
            cosine.transpose(1, 2), text_mask, image_mask, self.text_inverse_temperature, self.focal,
            lambda_scaling=self.lambda_scaling,
        )
        return alpha, alpha_t2i


# =============================================================================================
# Stacked cross attention (SCAN, Lee et al. ECCV 2018), as ACSA's asymmetric cross-attention
# module uses it (Ji et al. 2022, eqs. 1-11): no learned projections, the clipped cosines are
# L2-normalised over the *other* modality's axis before a temperature softmax.
# =============================================================================================


def cross_attention_scores(
    cosine: Tensor,
    visual_norm: Tensor,
    text_norm: Tensor,
    text_mask: Tensor,
    visual_gram: Tensor,
    text_gram: Tensor,
    inverse_temperature_i2t: float,
    inverse_temperature_t2i: float,
    image_to_text: bool = True,
    text_to_image: bool = True,
    epsilon: float = 1e-8,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Both directions of the cross attention from the pair cosines; ``(S, S', alpha, alpha')``.

    ``cosine[..., i, j] = cos(v_i, t_j)`` (eqs. 1 and 7) for ``m`` visual entities and ``n`` text
    entities of every pair in the leading dims. The other inputs broadcast against it:
    ``visual_norm`` ``[..., m]`` (``||v_i||``), ``text_norm`` / ``text_mask`` ``[..., n]``
    (``||t_j||``; 1 for real phrases), ``visual_gram`` ``[..., m, m]`` (``v_i . v_k``) and
    ``text_gram`` ``[..., n, n]`` (``t_j . t_l``).

    Image-to-text (eqs. 2-6): ``s~_ij = [s_ij]_+ / sqrt(sum_i [s_ij]_+^2)`` (over the visual
    entities), ``alpha_ij = softmax_j(lambda s~_ij)`` over the real phrases, ``T_vi = sum_j
    alpha_ij t_j``, ``S = mean_i cos(v_i, T_vi)``.

    Text-to-image (eqs. 7-11): ``s~'_ij = [s_ij]_+ / sqrt(sum_j [s_ij]_+^2)`` (over the real
    phrases), ``alpha'_ij = softmax_i(lambda' s~'_ij)``, ``V_tj = sum_i alpha'_ij v_i``,
    ``S' = mean_j cos(t_j, V_tj)`` over the real phrases. Eq. 9 as printed sums
    ``alpha'_ij t_j`` over ``j`` with a softmax over ``j``, which would rebuild the image-to-text
    context; the text ("a weighted visual representation related to the phrase") and SCAN's
    text-to-image attention say ``V_tj = sum_i alpha'_ij v_i`` with the softmax over ``i``.

    Padded phrases get zero weight everywhere (excluded from eq. 2's clip, eq. 4's softmax,
    eq. 8's norm and eq. 11's mean), so adding padding never changes a score. A caption
    without any phrase scores 0 in both directions. ``T_vi`` / ``V_tj`` are never built as
    ``[..., m, D]`` tensors: ``v_i . T_vi = ||v_i|| sum_j alpha_ij ||t_j|| s_ij`` and
    ``||T_vi||^2 = alpha_i^T G_t alpha_i`` (likewise for ``V_tj``).

    Returns ``S``, ``S'`` (``[...]``, None for a direction switched off) and the attention
    weights ``alpha`` (softmax over ``j``) and ``alpha'`` (softmax over ``i``), both
    ``[..., m, n]``.
    """
    valid = text_mask.to(cosine.dtype).unsqueeze(-2)  # [..., 1, n]
    clipped = cosine.clamp(min=0) * valid  # [s_ij]_+ of eqs. 2 and 8, padding removed
    lowest = torch.finfo(cosine.dtype).min
    similarity = similarity_t2i = alpha = alpha_t2i = None
    if image_to_text:
        normalized = clipped / clipped.pow(2).sum(dim=-2, keepdim=True).clamp(min=epsilon).sqrt()  # eq. 2
        # eq. 4; a finite fill (not -inf) keeps a caption with no phrase free of NaN, and the
        # product with ``valid`` then zeroes its (uniform) weights.
        logits = (inverse_temperature_i2t * normalized).masked_fill(valid == 0, lowest)
        alpha = logits.softmax(dim=-1) * valid
        numerator = (alpha * cosine * text_norm.unsqueeze(-2)).sum(dim=-1)  # v_i . T_vi / ||v_i||
        context_norm = ((alpha @ text_gram) * alpha).sum(dim=-1).clamp(min=0).sqrt()  # ||T_vi|| (eq. 3)
        relevance = numerator / context_norm.clamp(min=epsilon)  # eq. 5
        similarity = relevance.mean(dim=-1)  # eq. 6, over the k + 1 visual entities
    if text_to_image:
        normalized = clipped / clipped.pow(2).sum(dim=-1, keepdim=True).clamp(min=epsilon).sqrt()  # eq. 8
        alpha_t2i = (inverse_temperature_t2i * normalized).softmax(dim=-2)  # over the visual entities i
        numerator = (alpha_t2i * cosine * visual_norm.unsqueeze(-1)).sum(dim=-2)  # t_j . V_tj / ||t_j||
        context_norm = ((visual_gram @ alpha_t2i) * alpha_t2i).sum(dim=-2).clamp(min=0).sqrt()  # ||V_tj|| (eq. 9)
        relevance = numerator / context_norm.clamp(min=epsilon)  # eq. 10
        phrase_weights = text_mask.to(cosine.dtype)
        similarity_t2i = (relevance * phrase_weights).sum(dim=-1) / phrase_weights.sum(dim=-1).clamp(min=1.0)  # eq. 11
    return similarity, similarity_t2i, alpha, alpha_t2i


def cross_attention_similarity(
    visual: Tensor,
    text: Tensor,
    text_mask: Tensor | None,
    inverse_temperature_i2t: float,
    inverse_temperature_t2i: float,
    image_to_text: bool = True,
    text_to_image: bool = True,
    max_elements: int | None = None,
    epsilon: float = 1e-8,
) -> tuple[Tensor | None, Tensor | None]:
    """``(S, S')`` of every image with every caption, ``[images x texts]`` each (ACSA eqs. 1-11).

    ``visual`` ``[A, m, D]`` (visual entities per image), ``text`` ``[B, n, D]`` (phrases per
    caption), ``text_mask`` ``[B, n]`` (None: all real). One set of tensor operations per tile
    of the pair grid; ``max_elements`` bounds the entries of a tile's ``[a, b, m, n]``
    intermediates (None: one tile, as in training).
    """
    num_images, m = visual.shape[:2]
    num_texts, n = text.shape[:2]
    if text_mask is None:
        text_mask = text.new_ones(num_texts, n)
    visual_unit, text_unit = F.normalize(visual, dim=-1), F.normalize(text, dim=-1)
    visual_norm, text_norm = visual.norm(dim=-1), text.norm(dim=-1)
    visual_gram = visual @ visual.transpose(1, 2)  # [A, m, m]
    text_gram = text @ text.transpose(1, 2)  # [B, n, n]
    per_pair = max(1, m * max(n, m))
    budget = max_elements if max_elements is not None else max(1, num_images * num_texts * per_pair)
    text_block = max(1, min(num_texts, budget // per_pair))
    image_block = max(1, budget // (per_pair * text_block))
    rows: tuple[list[Tensor], list[Tensor]] = ([], [])
    for i_start in range(0, num_images, image_block):
        i = slice(i_start, i_start + image_block)
        columns: tuple[list[Tensor], list[Tensor]] = ([], [])
        for t_start in range(0, num_texts, text_block):
            t = slice(t_start, t_start + text_block)
            cosine = torch.einsum("amd,bnd->abmn", visual_unit[i], text_unit[t])
            scores = cross_attention_scores(
                cosine,
                visual_norm[i].unsqueeze(1),
                text_norm[t].unsqueeze(0),
                text_mask[t].unsqueeze(0),
                visual_gram[i].unsqueeze(1),
                text_gram[t].unsqueeze(0),
                inverse_temperature_i2t,
                inverse_temperature_t2i,
                image_to_text,
                text_to_image,
                epsilon,
            )[:2]
            for store, score in zip(columns, scores):
                if score is not None:
                    store.append(score)
        for store, parts in zip(rows, columns):
            if parts:
                store.append(torch.cat(parts, dim=1))
    empty = visual.new_zeros(num_images, num_texts)
    return (
        (torch.cat(rows[0]) if rows[0] else empty) if image_to_text else None,
        (torch.cat(rows[1]) if rows[1] else empty) if text_to_image else None,
    )


def candidate_cross_attention_similarity(
    visual: Tensor,
    text: Tensor,
    text_mask: Tensor | None,
    inverse_temperature_i2t: float,
    inverse_temperature_t2i: float,
    image_to_text: bool = True,
    text_to_image: bool = True,
    epsilon: float = 1e-8,
) -> tuple[Tensor | None, Tensor | None]:
    """``(S, S')`` of each caption ``t`` with its own ``K`` candidate images, ``[T, K]`` each.

    ``visual`` ``[T, K, m, D]`` (the candidates' visual entities), ``text`` ``[T, n, D]``,
    ``text_mask`` ``[T, n]``. Same numbers as :func:`cross_attention_similarity` on those pairs.
    """
    num_texts, n = text.shape[:2]
    if text_mask is None:
        text_mask = text.new_ones(num_texts, n)
    cosine = torch.einsum("tkmd,tnd->tkmn", F.normalize(visual, dim=-1), F.normalize(text, dim=-1))
    similarity, similarity_t2i, _, _ = cross_attention_scores(
        cosine,
        visual.norm(dim=-1),
        text.norm(dim=-1).unsqueeze(1),
        text_mask.unsqueeze(1),
        visual @ visual.transpose(-1, -2),
        (text @ text.transpose(1, 2)).unsqueeze(1),
        inverse_temperature_i2t,
        inverse_temperature_t2i,
        image_to_text,
        text_to_image,
        epsilon,
    )
    return similarity, similarity_t2i


__all__ += ["candidate_cross_attention_similarity", "cross_attention_scores", "cross_attention_similarity"]


# =============================================================================================
# Evaluation kernels: the same scores as the functions above, computed near the GEMM bound
# =============================================================================================
#
# At test time every caption is scored against every gallery image (CUHK-PEDES: 6,156 x 3,074
# pairs), without gradients. The functions above build every ``[pairs, m, n]`` intermediate with
# autograd-friendly out-of-place ops; the ``fast_*`` kernels below give the same numbers
# (same softmax, focal filter, masks, lambda scaling, both directions) with only the
# arithmetic that cannot be avoided.
#
# Cheapest exact formulation, per (image, caption) pair with m image features, n *valid* text
# features and dimension D (multiply-adds):
#
# * NAFS: the pair's cosine matrix ``I_Q^ T_K^T`` and value-product matrix ``I_V T_V^T``,
#   2 m n D. The attended vectors ``r_a = sum_b alpha_ab t_vb`` are never formed: eq. 4's
#   cosine needs ``v_a . r_a = sum_b alpha_ab (v_a . t_vb)`` (the value products again) and
#   ``||r_a||^2 = alpha_a^T G_T alpha_a`` with the caption's Gram matrix ``G_T`` (n x n,
#   computed once per caption): m n^2; the text-to-image direction reads the same two
#   matrices and the image's Gram matrix: n m^2. Everything else (clip, normalisations,
#   focal filter, exponentials, sums) is O(m n). With D = 768, m = 6 and n = 33 that is
#   304,128 + 6,534 + 1,188 multiply-adds per pair, 97.5 % of it in the two products.
#   The projections (I_Q, I_V of each image, T_K, T_V of each valid text feature, D^2 each)
#   are per feature, not per pair.
# * ACSA: one cosine matrix, m n D; ``G_t`` (n^2 m) and ``G_v`` (m^2 n) as above. With m = 5
#   and n = 5.4 phrases: 20,736 + 146 + 135, 98.6 % in the product.
#
# The products are one GEMM each over a tile of images x captions, ``[a m, D] @ [D, t n]``,
# so the bound is that GEMM's rate (benchmarks/bench_eval_cost.py measures both against it;
# the figures are in benchmarks/README.md). What keeps the rest small:
#
# * captions are sorted by their number of valid features and tiled in that order with their
#   valid features packed first, so padding (a 100-token word slot range, 8 sub-sentence
#   slots) is never multiplied; padding is zero, which makes it drop out of every sum below;
# * NAFS skips the softmax normalisation: eq. 4's cosine is unchanged when a query's weights
#   are all multiplied by one positive number, so ``exp(logit - c)`` with ``c`` the query's
#   largest logit gives the softmax's relevance; ``c`` comes from the largest normalised
#   cosine (``[s - mu]_+ s`` grows with ``s``), not from a pass over the logits. The largest
#   weight is 1, so eq. 4's ``max(., eps)`` acts where it did (the weights sum to 1..n instead
#   of 1: only a context norm under 1e-8 can tell). Exponents below -40 are raised to -40
#   (weights under e^-40 = 4e-18 of the largest, far below float32 resolution) because ``exp``
#   of very negative arguments is ten times slower on CPUs;
# * ACSA folds each attended vector's norm into its weight (``log ||u||`` added to the
#   softmax's input: the weights become ``alpha ||u||`` up to one factor per query), so
#   numerators and context norms use the unit vectors' cosines and Gram matrices directly, and
#   padded phrases (norm 0) get weight exactly 0; its tiles are laid out ``[a, m, n, t]``
#   (captions innermost: ~6 phrases would make every inner loop 6 long), so both softmaxes run
#   along a non-innermost axis, where PyTorch's fused softmax is fast;
# * NAFS folds lambda and the count scaling into the normalised cosine:
#   ``lambda f [K (s^ - mean s^)]_+ s^ = [s' - mean s']_+ s'`` with ``s' = sqrt(lambda f K) s^``;
# * every intermediate lives in per-worker buffers reused from tile to tile, ops write in
#   place (``out=``), and the gallery side (unit vectors, Gram matrices, NAFS's projections,
#   ACSA's visual entities) is computed once for all chunks of captions (EvaluationCache);
# * on a CPU, ``workers`` threads (default: ``torch.get_num_threads()``) each score their own
#   text blocks with one intra-op thread: a tile's ops are ~0.1 ms, and an OpenMP fork/join per
#   op costs milliseconds whenever another process holds one of the cores;
# * float32 GEMMs go through oneDNN on CPUs that have it (``mkldnn._linear_pointwise``, the
#   kernel behind ``torch.compile``'s CPU linear): twice MKL's rate on this AMD machine, same
#   float32 arithmetic. bf16 products are not used: rounding the inputs to bf16 alone moves
#   NAFS scores by up to 2e-2 and ACSA's by 2e-4 at CUHK-PEDES size (bench_eval_cost.py).
#
# Results equal the reference functions to float32 rounding: tests/test_attention_eval.py
# checks every kernel against a literal per-pair loop to 1e-5; bench_eval_cost.py checks 48
# captions x the whole CUHK-PEDES-size gallery against the reference to 1e-4. NAFS's eq. 2 is
# ill-conditioned where every image feature's cosine with a text feature is ~0: ``s / (sum_a s
# + 1e-8)`` then turns float32 rounding of the cosines (~1e-8) into O(1) changes of s^, so two
# float32 implementations (this one and the reference, each with its own GEMM) can differ by
# up to ~1e-3 on such rare pairs, each about as far from a float64 computation. The two-stage
# kernels compute their products with the same oneDNN GEMM as the full grid, whose every output
# element has the same bits at any matrix size (N >= 2), so two-stage scores equal the full
# scores on the kept candidates. One difference on degenerate input: a caption with no valid
# feature scores 0 in both directions (the reference NAFS functions give NaN image-to-text;
# ACSA's give 0).

import functools as _functools
import math as _math
import threading as _threading
import weakref as _weakref
from concurrent.futures import ThreadPoolExecutor as _ThreadPoolExecutor

# Exponents below this are raised to it before exp (see above).
_EXP_FLOOR = -40.0
# Entries of one [a, m, t, n] tile: 1 MB per float32 intermediate on a CPU (a worker's half
# dozen of them stay in cache); on a GPU, enough to fill it.
EVAL_TILE_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
# Rows of one gallery GEMM call (several CPU tiles).
_GEMM_ROWS = 2048


def requires_autograd(*tensors: Tensor | None) -> bool:
    """Whether an op on ``tensors`` would be recorded by autograd (grad mode on and one of them
    requires grad): the methods score with the evaluation kernels when it would not."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _refuse_autograd(name: str, *tensors: Tensor | None) -> None:
    if requires_autograd(*tensors):
        raise RuntimeError(
            f"{name} is an evaluation kernel without gradients; call it under torch.no_grad() "
            "or use the differentiable function it mirrors"
        )


def _evaluation_kernel(function: Callable) -> Callable:
    """Refuse inputs that autograd would track (a silently missing gradient is worse than an
    error), then run ``function`` under ``torch.no_grad()`` with autocast off: the kernels
    compute in float32 (float64 inputs stay float64) also inside a bf16-mixed validation loop,
    where autocast would otherwise run their products in bf16 (see the section comment)."""

    @_functools.wraps(function)
    def kernel(*args, **kwargs):
        tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, Tensor)]
        _refuse_autograd(function.__name__, *tensors)
        with torch.no_grad(), torch.autocast(tensors[0].device.type, enabled=False):
            return function(*args, **kwargs)

    return kernel


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 stays float64 (exact tests), anything else is computed in float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _matmul_nt(left: Tensor, right: Tensor, relu: bool = False) -> Tensor:
    """``left [M, D] @ right [N, D]^T`` (optionally clipped at 0), oneDNN on a CPU for float32."""
    if left.device.type == "cpu" and left.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(left, right, None, "relu" if relu else "none", [], "")
    product = left @ right.t()
    return product.clamp_(min=0) if relu else product


def linear_for_evaluation(
    features: Tensor, layers: nn.Linear | tuple[nn.Linear, ...], mask: Tensor | None = None
) -> Tensor | tuple[Tensor, ...]:
    """``layer(features)`` for each layer, without gradients, float32 CPU products through oneDNN
    (as :func:`_matmul_nt`); with ``mask`` (``features.shape[:-1]``, 1 = real) only the real rows
    are projected (gathered once for all layers) and the others come out 0 (padding, which the
    evaluation kernels ignore). One layer in, one tensor out; a tuple in, a tuple out."""
    single = isinstance(layers, nn.Linear)
    layers = (layers,) if single else tuple(layers)
    _refuse_autograd("linear_for_evaluation", features, *(layer.weight for layer in layers))
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        rows = features.reshape(-1, features.shape[-1])
        index = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
        picked = rows if index is None else rows.index_select(0, index)
        results = []
        for layer in layers:
            if picked.device.type == "cpu" and picked.dtype == layer.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
                projected = torch.ops.mkldnn._linear_pointwise(picked.contiguous(), layer.weight, layer.bias, "none", [], "")
            else:
                projected = layer(picked)
            if index is not None:
                projected = projected.new_zeros(rows.shape[0], projected.shape[-1]).index_copy_(0, index, projected)
            results.append(projected.view(*features.shape[:-1], projected.shape[-1]))
    return results[0] if single else tuple(results)


class EvaluationCache:
    """Values derived from a gallery, kept while the same tensors come back unmodified.

    The evaluator scores every chunk of captions against one gallery; the gallery side of the
    kernels (unit vectors, Gram matrices, projections) is computed once and reused while the
    inputs are the *same tensors* (the same objects, or the same views of the same base tensor)
    unchanged: with the same version counters (in-place changes bump them) or, for inference
    tensors (made under ``torch.inference_mode``, which have no version counter), equal to a copy
    kept with the entry (one comparison pass, exact). Tensors are held through weak references,
    so a dead gallery never matches (its memory can't be mistaken for a new tensor's); the
    ``size`` latest entries are kept.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        # (references, signature, snapshots of the inference inputs, value), latest first
        self._entries: list[tuple[tuple, tuple, tuple, Any]] = []
        self._lock = _threading.Lock()

    @staticmethod
    def _describe(tensor: Tensor | None) -> tuple[Any, tuple]:
        if tensor is None:
            return None, (None,)
        base = tensor if tensor._base is None else tensor._base
        geometry = (tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)
        # An inference tensor's ._version raises ("Inference tensors do not track version counter").
        version = "inference" if base.is_inference() else base._version
        return base, (version, geometry)

    @staticmethod
    def _unchanged(inputs: tuple[Tensor | None, ...], snapshots: tuple[Tensor | None, ...]) -> bool:
        return all(kept is None or torch.equal(tensor, kept) for tensor, kept in zip(inputs, snapshots))

    def get(self, inputs: tuple[Tensor | None, ...], extra: Any, compute: Callable[[], Any]) -> Any:
        described = [self._describe(t) for t in inputs]
        bases = tuple(base for base, _ in described)
        signature = (tuple(part for _, part in described), extra)
        with self._lock:
            for index, (references, cached_signature, snapshots, value) in enumerate(self._entries):
                if cached_signature == signature and all(
                    (r is None and b is None) or (r is not None and r() is b) for r, b in zip(references, bases)
                ) and self._unchanged(inputs, snapshots):
                    self._entries.insert(0, self._entries.pop(index))
                    return value
        value = compute()
        references = tuple(None if b is None else _weakref.ref(b) for b in bases)
        snapshots = tuple(t.clone() if t is not None and t.is_inference() else None for t in inputs)
        with self._lock:
            self._entries = [(references, signature, snapshots, value)] + [
                entry for entry in self._entries[: self.size - 1] if all(r is None or r() is not None for r in entry[0])
            ]
        return value


def _text_major_results(num_texts: int, columns: int, empty: int, like: Tensor, wanted: bool) -> Tensor | None:
    """``[texts (sorted), columns]`` results; the ``empty`` first rows (captions without a valid
    feature: no block scores them) are 0."""
    if not wanted:
        return None
    result = torch.empty(num_texts, columns, dtype=like.dtype, device=like.device)
    result[:empty] = 0
    return result


def _unsort(results: Tensor | None, order: Tensor, transpose: bool) -> Tensor | None:
    """Rows back in the captions' order (a row scatter); ``transpose``: as ``[images, texts]``
    (a view)."""
    if results is None:
        return None
    unsorted = torch.empty_like(results)
    unsorted[order] = results
    return unsorted.t() if transpose else unsorted


class _Buffers:
    """Named scratch tensors of one worker, grown on demand and reused from tile to tile."""

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.store: dict[str, Tensor] = {}

    def __call__(self, name: str, *shape: int) -> Tensor:
        size = _math.prod(shape)
        flat = self.store.get(name)
        if flat is None or flat.numel() < size:
            flat = torch.empty(max(size, 1), dtype=self.like.dtype, device=self.like.device)
            self.store[name] = flat
        return flat[:size].view(shape)


def _eval_workers(device: torch.device, workers: int | None) -> int:
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return workers
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


def _parallel_map(function: Callable, items: list, workers: int) -> None:
    """``function(item)`` for every item, on ``workers`` threads with one intra-op thread each."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            function(item)
        return
    previous = torch.get_num_threads()
    # Grad and inference modes are thread-local: the workers take the caller's, or results
    # allocated under inference mode could not be written from a worker (in-place update to an
    # inference tensor outside InferenceMode).
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(item) -> None:
        # Per thread: OpenMP's thread count is a per-thread setting (torch restores the
        # process default below, which new threads copy).
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            function(item)

    try:
        with _ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            for _ in pool.map(run, items):
                pass
    finally:
        torch.set_num_threads(previous)


def _tile_budget(device: torch.device, max_elements: int | None) -> int:
    preferred = EVAL_TILE_ELEMENTS.get(device.type, EVAL_TILE_ELEMENTS["cuda"])
    return max(1, preferred if max_elements is None else min(preferred, int(max_elements)))


def _gather(gallery: Tensor, picked: Tensor) -> Tensor:
    """``gallery[picked]`` as whole-row copies (``index_select``; advanced indexing is several
    times slower on large rows)."""
    flat = gallery.reshape(gallery.shape[0], -1).index_select(0, picked.reshape(-1))
    return flat.view(*picked.shape, *gallery.shape[1:])


def _per_text_products(gallery: Tensor, picked: Tensor, features: Tensor, relu: bool = False) -> Tensor:
    """``[t, K rows, n]``: each text's candidate rows of ``gallery`` times its own features,
    ``gallery[picked[j]] @ features[j]^T``, one :func:`_matmul_nt` per text.

    The full-grid kernels multiply the same rows and columns inside larger GEMMs; oneDNN gives
    every output element the same bits at any M and N >= 2 (checked on this machine), so the
    two-stage scores equal the full scores even where eq. 2's normalisation turns rounding of a
    near-zero cosine into a visible change (NAFS: s / (sum + 1e-8) with every s of a key ~1e-8).
    A single feature is padded with a zero row (N = 1 takes another kernel)."""
    t, n = features.shape[:2]
    rows = _gather(gallery, picked).reshape(t, -1, gallery.shape[-1])
    right = features if n > 1 else torch.cat([features, torch.zeros_like(features)], dim=1)
    return torch.stack([_matmul_nt(rows[j], right[j], relu=relu)[:, :n] for j in range(t)])


def _gallery_work(
    blocks: list[tuple[int, int, int]], num_images: int, m: int, budget: int
) -> list[tuple[tuple[int, int, int], int, int, int]]:
    """Work items ``(text block, first image, stop image, images per tile)``: each text block
    against groups of ``_GEMM_ROWS // m`` images (one GEMM per product and group: a GEMM call
    repacks its operands, which small calls would pay per tile), so that even a few text blocks
    keep every worker busy."""
    items = []
    for block in blocks:
        start, stop, n = block
        image_block = max(1, min(num_images, budget // (m * (stop - start) * n)))
        group = max(image_block, (_GEMM_ROWS // m) // image_block * image_block)
        items += [(block, g, min(num_images, g + group), image_block) for g in range(0, num_images, group)]
    return items


def _image_tiles(first: int, stop: int, m: int, image_block: int, *products: Callable[[int, int], Tensor]):
    """``(a_start, a_stop, tiles)`` over images ``[first, stop)``, ``tiles[i]`` the rows
    ``[a_start m, a_stop m)`` of ``products[i](first m, stop m)`` (computed once)."""
    outputs = [product(first * m, stop * m) for product in products]
    for a_start in range(first, stop, image_block):
        a_stop = min(stop, a_start + image_block)
        rows = slice((a_start - first) * m, (a_stop - first) * m)
        yield a_start, a_stop, [output[rows] for output in outputs]


def _per_thread(local: _threading.local, block: tuple, prepare: Callable[[tuple], Any]) -> Any:
    """``prepare(block)``, kept by this thread while its work items share the block."""
    cached = getattr(local, "block", None)
    if cached is None or cached[0] != block:
        local.block = cached = (block, prepare(block))
    return cached[1]


def _text_blocks(counts: Tensor, columns: int) -> tuple[Tensor, list[tuple[int, int, int]]]:
    """Texts sorted by valid-feature count, cut into blocks of about ``columns`` features.

    Returns the order and ``(start, stop, n)`` per block (positions in the order, the block's
    largest count). Texts without a valid feature form no block (their scores stay 0).
    """
    order = torch.argsort(counts, stable=True)
    sorted_counts = counts[order].tolist()
    blocks = []
    start = next((i for i, c in enumerate(sorted_counts) if c > 0), len(sorted_counts))
    while start < len(sorted_counts):
        stop = start + 1
        while stop < len(sorted_counts) and (stop + 1 - start) * sorted_counts[stop] <= columns:
            stop += 1
        blocks.append((start, stop, int(sorted_counts[stop - 1])))
        start = stop
    return order, blocks


def _pack_valid(mask: Tensor, rows: Tensor, n: int, *features: Tensor) -> tuple[Tensor, ...]:
    """Rows ``rows`` of ``[T, N, D]`` features with their valid slots first, cut to ``n`` slots,
    invalid slots zeroed. Returns the packed mask ``[t, n]`` then the packed features."""
    row_mask = mask[rows]
    slots = torch.argsort((row_mask == 0).to(torch.int8), dim=1, stable=True)[:, :n]
    packed_mask = row_mask.gather(1, slots)
    flat = (rows.unsqueeze(1) * mask.shape[1] + slots).reshape(-1)
    valid = packed_mask.unsqueeze(-1)
    packed = [f.reshape(-1, f.shape[-1]).index_select(0, flat).view(*slots.shape, -1) * valid for f in features]
    return (packed_mask, *packed)


class _DirectionConstants(NamedTuple):
    """Per-pair constants of one attention direction (broadcast over a tile)."""

    root_weight: Tensor  # sqrt(w) with the focal filter, w without: logit = w [s^ - mu]_+ s^ or w s^
    inverse_keys: Tensor  # 1 / K, for the focal filter's mean over the valid keys
    floor: bool  # whether exponents can fall below _EXP_FLOOR (logits span [0, w])


def _direction_constants(
    inverse_temperature: float, focal: bool, lambda_scaling: str, query_count: Tensor, key_count: Tensor
) -> _DirectionConstants:
    """``w = lambda f K`` (focal) or ``lambda f`` with ``f`` the count scaling of
    :func:`non_local_attention_weights` (``Q^2 / K`` focal, ``Q`` without; 1 for ``"none"``):
    eq. 3's ``lambda f [K (s^ - mean s^)]_+ s^ = w [s^ - mean s^]_+ s^``."""
    keys = key_count.clamp(min=1.0)
    if lambda_scaling == "counts":
        factor = query_count.square() / keys if focal else query_count
    else:
        factor = torch.ones_like(query_count)
    weight = inverse_temperature * factor * (key_count if focal else 1.0)
    return _DirectionConstants(weight.sqrt() if focal else weight, keys.reciprocal(), float(weight.max()) > -_EXP_FLOOR)


def _non_local_weights(
    scores: Tensor,
    query_dim: int,
    key_dim: int,
    constants: _DirectionConstants,
    focal: bool,
    epsilon: float,
    out: Tensor,
    scratch: Tensor,
    buffers: _Buffers,
    prefix: str,
) -> Tensor:
    """Unnormalised attention weights ``exp(logit - max logit)`` of eqs. 2-3, into ``out``.

    ``scores`` holds the clipped cosines ``s = [cos]_+`` (zero for padded features), queries
    along ``query_dim``, keys along ``key_dim``; ``s^ = s / (sum over queries + eps)``.
    """
    column_shape, row_shape = list(scores.shape), list(scores.shape)
    column_shape[query_dim] = row_shape[key_dim] = 1
    column = buffers(prefix + "column", *column_shape)
    torch.sum(scores, query_dim, keepdim=True, out=column)
    scale = column.add_(epsilon).reciprocal_().mul_(constants.root_weight)  # sqrt(w) / (sum_a s + eps)
    top = buffers(prefix + "top", *row_shape)
    if focal:
        torch.mul(scores, scale, out=scratch)  # s' = sqrt(w) s^
        mean = buffers(prefix + "mean", *row_shape)
        torch.sum(scratch, key_dim, keepdim=True, out=mean).mul_(constants.inverse_keys)  # padding is 0
        torch.amax(scratch, key_dim, keepdim=True, out=top)
        shift = buffers(prefix + "shift", *row_shape)
        torch.sub(top, mean, out=shift).clamp_(min=0).mul_(top).neg_()  # -max logit: [s - mu]_+ s grows with s
        # [s' - mu]_+ s' - max = max((s' - mu) s' - max, -max) as s' >= 0: one clamp (with the floor)
        lowest = shift.clamp(min=_EXP_FLOOR) if constants.floor else shift
        torch.sub(scratch, mean, out=out)
        torch.addcmul(shift, out, scratch, out=out).clamp_(min=lowest)
    else:
        torch.mul(scores, scale, out=out)  # w s^
        torch.amax(out, key_dim, keepdim=True, out=top)
        out.sub_(top)
        if constants.floor:
            out.clamp_(min=_EXP_FLOOR)
    return out.exp_()


def _non_local_pair_scores(
    scores: Tensor,
    values: Tensor,
    image_dim: int,
    image_to_text: _DirectionConstants | None,
    text_to_image: _DirectionConstants | None,
    inverse_image_count: Tensor,
    inverse_text_count: Tensor,
    image_value_norm_sq: Tensor,
    text_value_norm_sq: Tensor,
    quadratic_i2t: Callable[[Tensor, Tensor], Tensor],
    quadratic_t2i: Callable[[Tensor, Tensor], Tensor],
    focal: bool,
    epsilon: float,
    buffers: _Buffers,
) -> tuple[Tensor | None, Tensor | None]:
    """NAFS's ``(S, S')`` of a tile (None for a direction switched off).

    ``scores`` (clipped cosines) and ``values`` (value products) are 4-D with the image features
    along ``image_dim`` and the text features last, padding zero. The per-pair results keep the
    image and text axes as size-1 dims. ``quadratic_*(weights, scratch)`` return ``alpha^T G
    alpha`` per query (``G`` the key side's value Gram matrix), reduced over the keys (keepdim).
    """
    weights = buffers("weights", *scores.shape)
    scratch = buffers("scratch", *scores.shape)
    similarity = similarity_t2i = None
    if image_to_text is not None:  # queries: image features, keys: text features (eqs. 2-5)
        alpha = _non_local_weights(scores, image_dim, -1, image_to_text, focal, epsilon, weights, scratch, buffers, "i2t_")
        numerator = torch.sum(torch.mul(alpha, values, out=scratch), -1, keepdim=True)  # v_a . r_a
        # eq. 4: v_a . r_a / max(||v_a|| ||r_a||, eps), as rsqrt(max(||v_a||^2 ||r_a||^2, eps^2))
        inverse = quadratic_i2t(alpha, scratch).clamp_(min=0).mul_(image_value_norm_sq).clamp_(min=epsilon * epsilon).rsqrt_()
        relevance = numerator.mul_(inverse)
        similarity = relevance.sum(image_dim, keepdim=True).mul_(inverse_image_count)  # eq. 5; masked rows are 0
    if text_to_image is not None:  # queries: text features, keys: image features
        alpha = _non_local_weights(scores, -1, image_dim, text_to_image, focal, epsilon, weights, scratch, buffers, "t2i_")
        numerator = torch.sum(torch.mul(alpha, values, out=scratch), image_dim, keepdim=True)
        inverse = quadratic_t2i(alpha, scratch).clamp_(min=0).mul_(text_value_norm_sq).clamp_(min=epsilon * epsilon).rsqrt_()
        relevance = numerator.mul_(inverse)
        similarity_t2i = relevance.sum(-1, keepdim=True).mul_(inverse_text_count)  # padded rows are 0
    return similarity, similarity_t2i


def _check_eval_options(lambda_scaling: str, *inverse_temperatures: float) -> None:
    if lambda_scaling not in LAMBDA_SCALINGS:
        raise ValueError(f"lambda_scaling must be one of {LAMBDA_SCALINGS}, got {lambda_scaling!r}")
    if any(value < 0 for value in inverse_temperatures):
        raise ValueError(f"inverse temperatures must be >= 0, got {inverse_temperatures}")


def _unit(vectors: Tensor) -> Tensor:
    """``F.normalize(vectors, dim=-1)`` (``x / max(||x||, 1e-12)``) in fewer passes."""
    return vectors * vectors.square().sum(-1, keepdim=True).clamp_(min=1e-24).rsqrt_()


_IMAGE_SIDE = EvaluationCache()
_PROJECTED_GALLERY = EvaluationCache()


def _image_side(queries: Tensor, values: Tensor, mask: Tensor | None, dtype: torch.dtype):
    """NAFS's gallery side, cached (:class:`EvaluationCache`): unit queries and values with
    masked features zeroed, valid counts ``[A]``, squared value norms ``[A, m]`` and value Gram
    matrices ``[A, m, m]``."""

    def compute():
        unit, vals = _unit(queries.to(dtype)), values.to(dtype)
        if mask is None:
            counts = queries.new_full(queries.shape[:1], float(queries.shape[1]), dtype=dtype)
        else:
            valid = mask.to(dtype).unsqueeze(-1)
            unit, vals, counts = unit * valid, vals * valid, valid.sum((1, 2))
        return unit, vals, counts, vals.square().sum(-1), vals @ vals.transpose(1, 2)

    return _IMAGE_SIDE.get((queries, values, mask), dtype, compute)


def _float_mask(mask: Tensor | None, features: Tensor, dtype: torch.dtype) -> Tensor:
    return features.new_ones(features.shape[:2], dtype=dtype) if mask is None else mask.to(dtype)


@_evaluation_kernel
def fast_bidirectional_non_local_similarity(
    image_queries: Tensor,
    image_values: Tensor,
    image_mask: Tensor | None,
    text_keys: Tensor,
    text_values: Tensor,
    text_mask: Tensor | None,
    image_inverse_temperature: float,
    text_inverse_temperature: float,
    focal: bool = True,
    image_to_text: bool = True,
    text_to_image: bool = True,
    max_elements: int | None = None,
    epsilon: float = 1e-8,
    lambda_scaling: str = "none",
    workers: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`bidirectional_non_local_similarity` for evaluation: same ``(S, S')``, no gradients.

    ``max_elements`` caps the entries of one ``[a, m, t, n]`` tile (a worker holds about six
    such buffers); the kernel's own tile is ``EVAL_TILE_ELEMENTS`` (2^18 on a CPU). ``workers``:
    threads scoring text blocks concurrently (default ``torch.get_num_threads()`` on a CPU, 1 on
    a GPU). How it is computed: the section comment above.
    """
    _check_eval_options(lambda_scaling, image_inverse_temperature, text_inverse_temperature)
    if not (image_to_text or text_to_image):
        return None, None
    num_images, m, dim = image_queries.shape
    num_texts = text_keys.shape[0]
    dtype = _compute_dtype(image_queries, image_values, text_keys, text_values)
    device = image_queries.device
    image_unit, image_vals, image_count, image_norm_sq, image_gram = _image_side(image_queries, image_values, image_mask, dtype)
    image_unit, image_vals = image_unit.reshape(num_images * m, dim), image_vals.reshape(num_images * m, dim)
    text_mask = _float_mask(text_mask, text_keys, dtype)
    text_keys, text_vals = text_keys.to(dtype), text_values.to(dtype)
    budget = _tile_budget(device, max_elements)
    order, blocks = _text_blocks(text_mask.sum(1), max(1, int(_math.sqrt(budget))))
    empty = blocks[0][0] if blocks else num_texts
    sorted_i2t = _text_major_results(num_texts, num_images, empty, image_vals, image_to_text)  # [texts, images]
    sorted_t2i = _text_major_results(num_texts, num_images, empty, image_vals, text_to_image)
    local = _threading.local()

    def constants(image_counts: Tensor, text_counts: Tensor):
        return (
            _direction_constants(image_inverse_temperature, focal, lambda_scaling, image_counts, text_counts)
            if image_to_text else None,
            _direction_constants(text_inverse_temperature, focal, lambda_scaling, text_counts, image_counts)
            if text_to_image else None,
            image_counts.clamp(min=1.0).reciprocal(),
        )

    def prepare_block(block: tuple[int, int, int]) -> tuple:
        start, stop, n = block
        t = stop - start
        mask, keys, vals = _pack_valid(text_mask, order[start:stop], n, text_keys, text_vals)
        keys = _unit(keys)  # padding stays 0
        text_count = mask.sum(1).view(1, 1, t, 1)
        text_norm_sq = vals.square().sum(-1).view(1, 1, t, n)
        text_gram = vals @ vals.transpose(1, 2)  # [t, n, n]
        # m valid features per image: the direction constants depend on the text only
        shared = constants(image_count[:1].view(1, 1, 1, 1), text_count) if image_mask is None else None
        return keys.reshape(t * n, dim), vals.reshape(t * n, dim), text_count, text_norm_sq, text_gram, shared

    def score_item(item: tuple) -> None:
        block, first, last, image_block = item
        start, stop, n = block
        t = stop - start
        keys, vals, text_count, text_norm_sq, text_gram, shared = _per_thread(local, block, prepare_block)
        inverse_text_count = text_count.clamp(min=1.0).reciprocal()
        buffers = getattr(local, "buffers", None)
        if buffers is None:
            buffers = local.buffers = _Buffers(text_vals)
        tiles = _image_tiles(
            first, last, m, image_block,
            lambda begin, end: _matmul_nt(image_unit[begin:end], keys, relu=True),  # [cos]_+ (eq. 2)
            lambda begin, end: _matmul_nt(image_vals[begin:end], vals),  # v_a . t_vb
        )
        for a_start, a_stop, (scores, values) in tiles:
            a = a_stop - a_start
            scores, values = scores.view(a, m, t, n), values.view(a, m, t, n)
            gram = image_gram[a_start:a_stop]
            i2t, t2i, inverse_image_count = (
                shared if shared is not None else constants(image_count[a_start:a_stop].view(a, 1, 1, 1), text_count)
            )

            def quadratic_i2t(alpha: Tensor, scratch: Tensor) -> Tensor:
                per_text = alpha.view(a * m, t, n).transpose(0, 1)  # [t, a m, n]
                product = torch.bmm(per_text, text_gram, out=scratch.view(t, a * m, n)).mul_(per_text)
                return product.sum(-1).t().reshape(a, m, t, 1)

            def quadratic_t2i(alpha: Tensor, scratch: Tensor) -> Tensor:
                flat = alpha.view(a, m, t * n)
                product = torch.bmm(gram, flat, out=scratch.view(a, m, t * n)).mul_(flat)
                return product.sum(1, keepdim=True).view(a, 1, t, n)

            s_i2t, s_t2i = _non_local_pair_scores(
                scores, values, 1, i2t, t2i, inverse_image_count, inverse_text_count,
                image_norm_sq[a_start:a_stop].view(a, m, 1, 1), text_norm_sq, quadratic_i2t, quadratic_t2i,
                focal, epsilon, buffers,
            )
            if s_i2t is not None:
                sorted_i2t[start:stop, a_start:a_stop] = s_i2t.view(a, t).t()
            if s_t2i is not None:
                sorted_t2i[start:stop, a_start:a_stop] = s_t2i.view(a, t).t()

    _parallel_map(score_item, _gallery_work(blocks, num_images, m, budget), _eval_workers(device, workers))
    return _unsort(sorted_i2t, order, True), _unsort(sorted_t2i, order, True)


@_evaluation_kernel
def fast_candidate_bidirectional_non_local_similarity(
    image_queries: Tensor,
    image_values: Tensor,
    text_keys: Tensor,
    text_values: Tensor,
    text_mask: Tensor | None,
    candidates: Tensor,
    image_inverse_temperature: float,
    text_inverse_temperature: float,
    focal: bool = True,
    image_to_text: bool = True,
    text_to_image: bool = True,
    max_elements: int | None = None,
    epsilon: float = 1e-8,
    lambda_scaling: str = "none",
    workers: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``(S, S')`` of text ``t`` with its own gallery images ``candidates[t]``, ``[T, K]`` each.

    The two-stage route of :func:`fast_bidirectional_non_local_similarity` (the same numbers on
    those pairs): ``image_queries`` / ``image_values`` are the whole gallery ``[I, m, D]`` (every
    feature valid), ``candidates`` ``[T, K]`` indexes it; each text block gathers its own.
    """
    _check_eval_options(lambda_scaling, image_inverse_temperature, text_inverse_temperature)
    if not (image_to_text or text_to_image):
        return None, None
    m, dim = image_queries.shape[1:]
    num_texts, k = candidates.shape
    dtype = _compute_dtype(image_queries, image_values, text_keys, text_values)
    device = image_queries.device
    image_unit, image_vals, _, image_norm_sq, image_gram = _image_side(image_queries, image_values, None, dtype)
    text_mask = _float_mask(text_mask, text_keys, dtype)
    text_keys, text_vals = text_keys.to(dtype), text_values.to(dtype)
    budget = _tile_budget(device, max_elements)
    order, blocks = _text_blocks(text_mask.sum(1), max(1, budget // max(1, k * m)))
    empty = blocks[0][0] if blocks else num_texts
    sorted_i2t = _text_major_results(num_texts, k, empty, text_vals, image_to_text)
    sorted_t2i = _text_major_results(num_texts, k, empty, text_vals, text_to_image)
    image_count = torch.full((1, 1, 1, 1), float(m), dtype=dtype, device=device)
    local = _threading.local()

    def score_block(block: tuple[int, int, int]) -> None:
        start, stop, n = block
        rows = order[start:stop]
        t = rows.numel()
        mask, keys, vals = _pack_valid(text_mask, rows, n, text_keys, text_vals)
        keys = _unit(keys)  # padding stays 0
        text_count = mask.sum(1).view(t, 1, 1, 1)
        picked = candidates[rows]  # [t, K]
        buffers = getattr(local, "buffers", None)
        if buffers is None:
            buffers = local.buffers = _Buffers(text_vals)
        scores = _per_text_products(image_unit, picked, keys, relu=True).view(t, k, m, n)
        values = _per_text_products(image_vals, picked, vals).view(t, k, m, n)
        text_gram = vals @ vals.transpose(1, 2)  # [t, n, n]
        gram = _gather(image_gram, picked).view(t * k, m, m)

        def quadratic_i2t(alpha: Tensor, scratch: Tensor) -> Tensor:
            flat = alpha.view(t, k * m, n)
            product = torch.bmm(flat, text_gram, out=scratch.view(t, k * m, n)).mul_(flat)
            return product.sum(-1, keepdim=True).view(t, k, m, 1)

        def quadratic_t2i(alpha: Tensor, scratch: Tensor) -> Tensor:
            flat = alpha.view(t * k, m, n)
            product = torch.bmm(gram, flat, out=scratch.view(t * k, m, n)).mul_(flat)
            return product.sum(1, keepdim=True).view(t, k, 1, n)

        s_i2t, s_t2i = _non_local_pair_scores(
            scores, values, 2,
            _direction_constants(image_inverse_temperature, focal, lambda_scaling, image_count, text_count)
            if image_to_text else None,
            _direction_constants(text_inverse_temperature, focal, lambda_scaling, text_count, image_count)
            if text_to_image else None,
            image_count.reciprocal(), text_count.clamp(min=1.0).reciprocal(),
            _gather(image_norm_sq, picked).view(t, k, m, 1), vals.square().sum(-1).view(t, 1, 1, n), quadratic_i2t, quadratic_t2i,
            focal, epsilon, buffers,
        )
        if s_i2t is not None:
            sorted_i2t[start:stop] = s_i2t.view(t, k)
        if s_t2i is not None:
            sorted_t2i[start:stop] = s_t2i.view(t, k)

    _parallel_map(score_block, blocks, _eval_workers(device, workers))
    return _unsort(sorted_i2t, order, False), _unsort(sorted_t2i, order, False)


def _cross_attention_weights(
    clipped: Tensor,
    squared_norm: Tensor,
    softmax_dim: int,
    log_norm: Tensor,
    inverse_temperature: float,
    epsilon: float,
    out: Tensor,
) -> Tensor:
    """``softmax(lambda s~ + log ||u||)`` into ``out``: ACSA's attention weights (eqs. 2-4 /
    8-9) times the attended vectors' norms, up to one positive factor per query.

    ``s~ = [s]_+ / sqrt(max(squared_norm, eps))`` (``squared_norm``: the sum of ``[s]_+^2`` over
    the other modality's axis, eqs. 2 and 8); ``log_norm`` is ``log ||u||`` of the attended
    vectors, broadcast along ``softmax_dim`` (-inf for padding: weight 0). One fused softmax
    (max, exp, sum) along a non-innermost axis is cheaper than its parts.
    """
    scale = squared_norm.clamp(min=epsilon).rsqrt_().mul_(inverse_temperature)
    torch.addcmul(log_norm, clipped, scale, out=out)  # lambda s~ + log ||u||
    return torch.ops.aten._softmax.out(out, softmax_dim % out.dim(), False, out=out)


def _cross_attention_pair_scores(
    cosine: Tensor,
    image_dim: int,
    phrase_dim: int,
    log_visual_norm: Tensor,
    log_text_norm: Tensor,
    inverse_text_count: Tensor,
    quadratic_i2t: Callable[[Tensor, Tensor], Tensor],
    quadratic_t2i: Callable[[Tensor, Tensor], Tensor],
    inverse_temperature_i2t: float | None,
    inverse_temperature_t2i: float | None,
    epsilon: float,
    buffers: _Buffers,
) -> tuple[Tensor | None, Tensor | None]:
    """ACSA's ``(S, S')`` of a tile from the unit vectors' cosines (4-D, visual entities along
    ``image_dim``, phrases along ``phrase_dim``, padded phrases zero); None for a direction
    switched off (its inverse temperature None). The quadratic forms use the *unit* vectors'
    Gram matrices: the norms are in the weights."""
    clipped = torch.clamp(cosine, min=0, out=buffers("clipped", *cosine.shape))  # [s_ij]_+
    weights = buffers("weights", *cosine.shape)
    scratch = torch.mul(clipped, clipped, out=buffers("scratch", *cosine.shape))
    over_visual = torch.sum(scratch, image_dim, keepdim=True) if inverse_temperature_i2t is not None else None  # eq. 2
    over_phrases = torch.sum(scratch, phrase_dim, keepdim=True) if inverse_temperature_t2i is not None else None  # eq. 8
    similarity = similarity_t2i = None
    if over_visual is not None:  # eqs. 2-6: each visual entity attends over the phrases
        alpha = _cross_attention_weights(
            clipped, over_visual, phrase_dim, log_text_norm, inverse_temperature_i2t, epsilon, weights
        )
        numerator = torch.sum(torch.mul(alpha, cosine, out=scratch), phrase_dim, keepdim=True)  # v_i . T_vi / ||v_i||
        inverse_context = quadratic_i2t(alpha, scratch).clamp_(min=epsilon * epsilon).rsqrt_()  # 1 / max(||T_vi||, eps)
        similarity = numerator.mul_(inverse_context).mean(image_dim, keepdim=True)  # eqs. 5-6
    if over_phrases is not None:  # eqs. 7-11: each phrase attends over the visual entities
        alpha = _cross_attention_weights(
            clipped, over_phrases, image_dim, log_visual_norm, inverse_temperature_t2i, epsilon, weights
        )
        numerator = torch.sum(torch.mul(alpha, cosine, out=scratch), image_dim, keepdim=True)  # t_j . V_tj / ||t_j||
        inverse_context = quadratic_t2i(alpha, scratch).clamp_(min=epsilon * epsilon).rsqrt_()  # 1 / max(||V_tj||, eps)
        relevance = numerator.mul_(inverse_context)  # eq. 10; padded phrases give 0
        similarity_t2i = relevance.sum(phrase_dim, keepdim=True).mul_(inverse_text_count)  # eq. 11
    return similarity, similarity_t2i


_VISUAL_SIDE = EvaluationCache()


def _visual_side(visual: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Unit vectors, ``log`` norms and unit Gram matrices of ``[A, m, D]`` visual entities,
    cached (:class:`EvaluationCache`)."""

    def compute():
        vectors = visual.to(dtype)
        squared = vectors.square().sum(-1, keepdim=True)
        unit = vectors * squared.clamp(min=1e-24).rsqrt()
        return unit, squared.squeeze(-1).log().mul_(0.5), unit @ unit.transpose(1, 2)

    return _VISUAL_SIDE.get((visual,), dtype, compute)


def _phrase_side(phrases: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit vectors, ``log`` norms (-inf for zero padding: weight 0) and unit Gram matrices."""
    squared = phrases.square().sum(-1, keepdim=True)
    unit = phrases * squared.clamp(min=1e-24).rsqrt()
    return unit, squared.squeeze(-1).log().mul_(0.5), unit @ unit.transpose(1, 2)


@_evaluation_kernel
def fast_cross_attention_similarity(
    visual: Tensor,
    text: Tensor,
    text_mask: Tensor | None,
    inverse_temperature_i2t: float,
    inverse_temperature_t2i: float,
    image_to_text: bool = True,
    text_to_image: bool = True,
    max_elements: int | None = None,
    epsilon: float = 1e-8,
    workers: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`cross_attention_similarity` for evaluation: same ``(S, S')``, no gradients.

    ``max_elements`` caps the entries of one ``[a, m, t, n]`` tile; ``workers`` as in
    :func:`fast_bidirectional_non_local_similarity`.
    """
    _check_eval_options("none", inverse_temperature_i2t, inverse_temperature_t2i)
    if not (image_to_text or text_to_image):
        return None, None
    num_images, m, dim = visual.shape
    num_texts = text.shape[0]
    dtype = _compute_dtype(visual, text)
    device = visual.device
    visual_unit, log_visual, visual_gram = _visual_side(visual, dtype)
    visual_unit = visual_unit.reshape(num_images * m, dim)
    text_mask, text = _float_mask(text_mask, text, dtype), text.to(dtype)
    budget = _tile_budget(device, max_elements)
    order, blocks = _text_blocks(text_mask.sum(1), max(1, int(_math.sqrt(budget))))
    empty = blocks[0][0] if blocks else num_texts
    sorted_i2t = _text_major_results(num_texts, num_images, empty, text, image_to_text)  # [texts, images]
    sorted_t2i = _text_major_results(num_texts, num_images, empty, text, text_to_image)
    lambdas = (inverse_temperature_i2t if image_to_text else None, inverse_temperature_t2i if text_to_image else None)
    local = _threading.local()

    def prepare_block(block: tuple[int, int, int]) -> tuple:
        start, stop, n = block
        t = stop - start
        mask, phrases = _pack_valid(text_mask, order[start:stop], n, text)
        phrase_unit, log_text, text_gram = _phrase_side(phrases)
        # Tiles are laid out [a, m, n, t], captions innermost: with a handful of phrases per
        # caption, an innermost phrase axis would make every broadcast and reduction a loop of
        # ~6 elements.
        return (
            phrase_unit.transpose(0, 1).reshape(n * t, dim),
            log_text.t().reshape(1, 1, n, t),
            text_gram.permute(1, 2, 0).contiguous(),  # [n, n, t]
            mask.sum(1).clamp(min=1.0).reciprocal().view(1, 1, 1, t),
        )

    def score_item(item: tuple) -> None:
        block, first, last, image_block = item
        start, stop, n = block
        t = stop - start
        phrase_unit, log_text, text_gram, inverse_text_count = _per_thread(local, block, prepare_block)
        buffers = getattr(local, "buffers", None)
        if buffers is None:
            buffers = local.buffers = _Buffers(text)
        tiles = _image_tiles(first, last, m, image_block, lambda begin, end: _matmul_nt(visual_unit[begin:end], phrase_unit))
        for a_start, a_stop, (cosine,) in tiles:
            a = a_stop - a_start
            cosine = cosine.view(a, m, n, t)  # eqs. 1, 7
            gram = visual_gram[a_start:a_stop]

            def quadratic_i2t(alpha: Tensor, scratch: Tensor) -> Tensor:
                # sum_jl alpha_j G_jl alpha_l with G per caption: one broadcast multiply-add per phrase j
                torch.mul(alpha[:, :, :1], text_gram[0], out=scratch)
                for j in range(1, n):
                    scratch.addcmul_(alpha[:, :, j : j + 1], text_gram[j])
                return scratch.mul_(alpha).sum(2, keepdim=True)

            def quadratic_t2i(alpha: Tensor, scratch: Tensor) -> Tensor:
                flat = alpha.view(a, m, n * t)
                product = torch.bmm(gram, flat, out=scratch.view(a, m, n * t)).mul_(flat)
                return product.sum(1, keepdim=True).view(a, 1, n, t)

            s_i2t, s_t2i = _cross_attention_pair_scores(
                cosine, 1, 2, log_visual[a_start:a_stop].view(a, m, 1, 1), log_text, inverse_text_count,
                quadratic_i2t, quadratic_t2i, *lambdas, epsilon, buffers,
            )
            if s_i2t is not None:
                sorted_i2t[start:stop, a_start:a_stop] = s_i2t.view(a, t).t()
            if s_t2i is not None:
                sorted_t2i[start:stop, a_start:a_stop] = s_t2i.view(a, t).t()

    _parallel_map(score_item, _gallery_work(blocks, num_images, m, budget), _eval_workers(device, workers))
    return _unsort(sorted_i2t, order, True), _unsort(sorted_t2i, order, True)


@_evaluation_kernel
def fast_candidate_cross_attention_similarity(
    visual: Tensor,
    text: Tensor,
    text_mask: Tensor | None,
    candidates: Tensor,
    inverse_temperature_i2t: float,
    inverse_temperature_t2i: float,
    image_to_text: bool = True,
    text_to_image: bool = True,
    max_elements: int | None = None,
    epsilon: float = 1e-8,
    workers: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``(S, S')`` of caption ``t`` with gallery images ``candidates[t]``, ``[T, K]`` each.

    ``visual`` is the whole gallery ``[I, m, D]``; the same numbers as
    :func:`fast_cross_attention_similarity` on those pairs.
    """
    _check_eval_options("none", inverse_temperature_i2t, inverse_temperature_t2i)
    if not (image_to_text or text_to_image):
        return None, None
    m, dim = visual.shape[1:]
    num_texts, k = candidates.shape
    dtype = _compute_dtype(visual, text)
    device = visual.device
    visual_unit, log_visual, visual_gram = _visual_side(visual, dtype)
    text_mask, text = _float_mask(text_mask, text, dtype), text.to(dtype)
    budget = _tile_budget(device, max_elements)
    order, blocks = _text_blocks(text_mask.sum(1), max(1, budget // max(1, k * m)))
    empty = blocks[0][0] if blocks else num_texts
    sorted_i2t = _text_major_results(num_texts, k, empty, text, image_to_text)
    sorted_t2i = _text_major_results(num_texts, k, empty, text, text_to_image)
    lambdas = (inverse_temperature_i2t if image_to_text else None, inverse_temperature_t2i if text_to_image else None)
    local = _threading.local()

    def score_block(block: tuple[int, int, int]) -> None:
        start, stop, n = block
        rows = order[start:stop]
        t = rows.numel()
        mask, phrases = _pack_valid(text_mask, rows, n, text)
        phrase_unit, log_text, text_gram = _phrase_side(phrases)
        picked = candidates[rows]  # [t, K]
        buffers = getattr(local, "buffers", None)
        if buffers is None:
            buffers = local.buffers = _Buffers(text)
        cosine = _per_text_products(visual_unit, picked, phrase_unit).view(t, k, m, n)
        gram = _gather(visual_gram, picked).view(t * k, m, m)

        def quadratic_i2t(alpha: Tensor, scratch: Tensor) -> Tensor:
            flat = alpha.view(t, k * m, n)
            product = torch.bmm(flat, text_gram, out=scratch.view(t, k * m, n)).mul_(flat)
            return product.sum(-1, keepdim=True).view(t, k, m, 1)

        def quadratic_t2i(alpha: Tensor, scratch: Tensor) -> Tensor:
            flat = alpha.view(t * k, m, n)
            product = torch.bmm(gram, flat, out=scratch.view(t * k, m, n)).mul_(flat)
            return product.sum(1, keepdim=True).view(t, k, 1, n)

        s_i2t, s_t2i = _cross_attention_pair_scores(
            cosine, 2, 3, _gather(log_visual, picked).view(t, k, m, 1), log_text.view(t, 1, 1, n),
            mask.sum(1).clamp(min=1.0).reciprocal().view(t, 1, 1, 1), quadratic_i2t, quadratic_t2i,
            *lambdas, epsilon, buffers,
        )
        if s_i2t is not None:
            sorted_i2t[start:stop] = s_i2t.view(t, k)
        if s_t2i is not None:
            sorted_t2i[start:stop] = s_t2i.view(t, k)

    _parallel_map(score_block, blocks, _eval_workers(device, workers))
    return _unsort(sorted_i2t, order, False), _unsort(sorted_t2i, order, False)


__all__ += [
    "EVAL_TILE_ELEMENTS",
    "EvaluationCache",
    "linear_for_evaluation",
    "requires_autograd",
    "fast_bidirectional_non_local_similarity",
    "fast_candidate_bidirectional_non_local_similarity",
    "fast_candidate_cross_attention_similarity",
    "fast_cross_attention_similarity",
]


# --------------------------------------------------------------------------------------------
# Single-modality blocks on CNN feature maps (ISANet's CAF and its Table IV ablation; generic)
# --------------------------------------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation channel weights (Hu et al., CVPR 2018): ``sigmoid(W2 ReLU(W1 GAP(x)))``.

    Returns the weights ``[B, C, 1, 1]`` (not the re-weighted map), so a caller can apply them to
    another tensor than the one they were computed from (ISANet eq. 8 weights the IN residual).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // max(1, reduction))
        self.reduce = nn.Linear(channels, hidden)
        self.expand = nn.Linear(hidden, channels)

    def forward(self, feature_map: Tensor) -> Tensor:
        squeezed = feature_map.mean(dim=(2, 3))  # [B, C] global average pooling
        weights = torch.sigmoid(self.expand(F.relu(self.reduce(squeezed))))
        return weights[:, :, None, None]


class NonLocalBlock2d(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., CVPR 2018) with a residual connection.

    ``y_i = x_i + W_z sum_j softmax_j(theta(x_i) . phi(x_j)) g(x_j)`` over all positions of a
    ``[B, C, H, W]`` map. ``W_z`` ends in a batch norm initialised to zero, so the block starts as
    the identity (the paper's recommendation) and can be dropped into a pretrained network.
    """

    def __init__(self, channels: int, inter_channels: int | None = None) -> None:
        super().__init__()
        inter = inter_channels or max(1, channels // 2)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.output = nn.Sequential(nn.Conv2d(inter, channels, 1, bias=False), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.output[1].weight)
        nn.init.zeros_(self.output[1].bias)

    def forward(self, feature_map: Tensor) -> Tensor:
        batch, _, height, width = feature_map.shape
        queries = self.theta(feature_map).flatten(2).transpose(1, 2)  # [B, N, C']
        keys = self.phi(feature_map).flatten(2)  # [B, C', N]
        values = self.g(feature_map).flatten(2).transpose(1, 2)  # [B, N, C']
        attention = torch.softmax(queries @ keys, dim=-1)  # [B, N, N]
        context = (attention @ values).transpose(1, 2).reshape(batch, -1, height, width)
        return feature_map + self.output(context)


__all__ += ["NonLocalBlock2d", "SqueezeExcitation"]


# =============================================================================================
# Cross-attention fusion layer (ALBEF / LAIP fusion encoder: text queries, image keys/values)
# =============================================================================================


class CrossAttentionBlock(nn.Module):
    """Multi-head cross-attention of text tokens to image tokens, BERT style (ALBEF's fusion layer).

    ``queries`` ``[B, Lq, H]`` attend to ``keys_values`` ``[B, Lk, C]`` (C may differ from H: the
    key/value projections map C to H); the result goes through an output projection, dropout and
    a residual LayerNorm, as BERT's ``BertSelfOutput``. ``key_mask`` ``[B, Lk]`` (1/True = real)
    gives padded keys exactly zero attention. With ``return_attention`` the post-softmax
    attention probabilities ``[B, heads, Lq, Lk]`` are returned as they sit in the autograd graph
    (before attention dropout), so a caller can take gradients with respect to them (LAIP's
    backward attention, Grad-CAM on ALBEF).
    """

    def __init__(
        self,
        hidden_size: int,
        key_value_size: int | None = None,
        num_heads: int = 12,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        key_value_size = hidden_size if key_value_size is None else key_value_size
        self.num_heads = num_heads
        self.head_size = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(key_value_size, hidden_size)
        self.value = nn.Linear(key_value_size, hidden_size)
        self.attention_dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.output_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def _heads(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:2], self.num_heads, self.head_size).transpose(1, 2)

    def forward(
        self,
        queries: Tensor,
        keys_values: Tensor,
        key_mask: Tensor | None = None,
        return_attention: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        q, k, v = self._heads(self.query(queries)), self._heads(self.key(keys_values)), self._heads(self.value(keys_values))
        scores = (q @ k.transpose(-1, -2)) * self.head_size**-0.5  # [B, heads, Lq, Lk]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
        probabilities = scores.softmax(dim=-1)
        context = self.attention_dropout(probabilities) @ v
        context = context.transpose(1, 2).reshape(queries.shape)
        output = self.norm(self.output_dropout(self.output(context)) + queries)
        return output, (probabilities if return_attention else None)


__all__ += ["CrossAttentionBlock"]
