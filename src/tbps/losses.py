"""Shared, method-independent training losses for text-based person search.

Everything here works on one mini-batch, is pure torch and differentiable. Methods compose
these blocks with their own weights; no method-specific composition lives here.

Conventions used throughout:

* ``B`` is the batch size, ``D`` the embedding size, ``C`` the number of identity classes.
* Similarity matrices are laid out **images in rows, texts in columns** unless a docstring says
  otherwise: ``similarity[i, j] = S(I_i, T_j)``.
* "Identity-match targets" are the matrix ``q_ij = y_ij / sum_k y_ik`` with ``y_ij = 1`` when
  row ``i`` and column ``j`` show the same person (L1 normalisation per row), as in CMPM
  (Zhang & Lu, ECCV 2018, eq. 2), NAFS (CSAL, the equation above eq. 7) and ACSA (eq. 13).

Papers (see ``/work/shared/papers`` in the project notes): CMPM/CMPC (Zhang & Lu, ECCV 2018),
NAFS (Gao et al. 2021), ACSA (Ji et al. 2022), ISANet (Yan et al. 2022), LAIP (after ALBEF,
Li et al., NeurIPS 2021).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CMPCLoss",
    "IdentityLoss",
    "bidirectional_ranking_loss",
    "cmpm_loss",
    "identity_aware_contrastive_loss",
    "identity_mask",
    "identity_match_targets",
    "sample_semi_hard_negatives",
    "sdm_loss",
    "similarity_kl_alignment",
    "soft_target_cross_entropy",
    "triplet_ranking_loss",
]

Reduction = Literal["mean", "sum"]


# --------------------------------------------------------------------------------------------
# Identity bookkeeping
# --------------------------------------------------------------------------------------------


def identity_mask(row_ids: Tensor, column_ids: Tensor | None = None) -> Tensor:
    """Boolean ``[R, C]`` matrix, True where ``row_ids[i] == column_ids[j]``.

    Args:
        row_ids: ``[R]`` integer person ids of the rows.
        column_ids: ``[C]`` person ids of the columns; ``None`` means the same as ``row_ids``.
    """
    if column_ids is None:
        column_ids = row_ids
    return row_ids.reshape(-1, 1) == column_ids.reshape(1, -1)


def identity_match_targets(
    row_ids: Tensor, column_ids: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Identity-match distribution ``q_ij = y_ij / sum_k y_ik`` per row, shape ``[R, C]``.

    This is the **L1** normalisation of CMPM eq. 2 (also NAFS CSAL, ACSA eq. 13): each row sums
    to 1 over the columns that share the row's person id. The often copied PyTorch port divides
    by the L2 norm instead, which is not a distribution once an id repeats in the batch.
    A row whose id matches no column is left all zero (no target mass) instead of dividing by 0.
    """
    matches = identity_mask(row_ids, column_ids).to(dtype)
    return matches / matches.sum(dim=1, keepdim=True).clamp(min=1.0)


def _at_least_float32(tensor: Tensor) -> Tensor:
    """Upcast half precision: ``eps = 1e-8`` is 0 in float16, and ``log(0 + eps)`` would be -inf."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _kl_to_targets(logits: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    """``mean_i sum_j p_ij (log p_ij - log(q_ij + eps))`` with ``p = softmax_j(logits)``.

    The shared core of CMPM eqs. 1-4, NAFS CSAL and ACSA eqs. 14-16. ``log p`` comes from
    ``log_softmax`` so that large logits neither overflow nor give ``log(0)``.
    Shapes: ``logits`` and ``targets`` ``[R, C]``; returns a scalar (float32 or wider).
    """
    logits = _at_least_float32(logits)
    targets = targets.to(logits.dtype)
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    per_row = (p * (log_p - torch.log(targets + epsilon))).sum(dim=1)
    return per_row.mean()


# --------------------------------------------------------------------------------------------
# CMPM / CMPC (Zhang & Lu, ECCV 2018)
# --------------------------------------------------------------------------------------------


def cmpm_loss(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    person_ids: Tensor,
    epsilon: float = 1e-8,
) -> Tensor:
    """Cross-Modal Projection Matching loss (Zhang & Lu 2018, eqs. 1-5), both directions summed.

    Image-to-text: ``p_ij = softmax_j(x_i^T zhat_j)`` with ``zhat_j = z_j / ||z_j||`` (no
    temperature: the projection length itself is the logit, eq. 1); ``q_ij`` the L1-normalised
    identity match (eq. 2); ``L_i2t = mean_i sum_j p_ij (log p_ij - log(q_ij + eps))``
    (eqs. 3-4). Text-to-image is the same with the roles swapped:
    ``p_ji = softmax_i(z_j^T xhat_i)``. Returns ``L_i2t + L_t2i`` (eq. 5).

    Args:
        image_embeddings: ``[B, D]`` image embeddings ``x``.
        text_embeddings: ``[B, D]`` text embeddings ``z``; row ``i`` is paired with image ``i``.
        person_ids: ``[B]`` person id of pair ``i`` (any integers; only equality matters).
        epsilon: the ``eps`` inside ``log(q + eps)`` that keeps ``q = 0`` entries finite.

    Returns:
        Scalar loss tensor.
    """
    image_unit = F.normalize(image_embeddings, dim=1)
    text_unit = F.normalize(text_embeddings, dim=1)
    image_on_text = image_embeddings @ text_unit.t()  # [B, B]: x_i^T zhat_j
    text_on_image = text_embeddings @ image_unit.t()  # [B, B]: z_j^T xhat_i, rows are texts
    targets = identity_match_targets(person_ids, dtype=image_on_text.dtype)
    # One id vector serves both directions because the batch is made of (image, text) pairs,
    # so q for texts-in-rows is the same matrix.
    return _kl_to_targets(image_on_text, targets, epsilon) + _kl_to_targets(
        text_on_image, targets, epsilon
    )


def sdm_loss(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    person_ids: Tensor,
    logit_scale: Tensor | float,
    image_ids: Tensor | None = None,
    same_identity_weight: float = 0.3,
    epsilon: float = 1e-8,
) -> Tensor:
    """Similarity Distribution Matching (IRRA, Jiang & Ye, CVPR 2023, eqs. 2-4), both directions summed.

    ``p_ij = softmax_j(logit_scale * cos(I_i, T_j))`` (eq. 2; IRRA fixes ``logit_scale = 1/0.02``),
    ``q_ij = y_ij / sum_k y_ik`` with ``y_ij = 1`` for a shared person id (eq. 3),
    ``L_i2t = mean_i KL(p_i || q_i)`` with ``log(q + eps)`` (eq. 4), plus ``L_t2i`` with the texts
    in rows. It is CMPM with cosine logits and a temperature. With ``image_ids`` (IRRA's optional
    form), same-image pairs get ``y = 1`` and other same-identity pairs ``same_identity_weight``.

    Args:
        image_embeddings, text_embeddings: ``[B, D]``; row ``i`` of each is pair ``i``.
        person_ids: ``[B]`` person id of pair ``i``.
        logit_scale: ``1 / tau``, a float or a (learnable) scalar tensor.
        image_ids: ``[B]`` which image pair ``i`` shows, or ``None``.
    """
    image_unit = F.normalize(image_embeddings, dim=1)
    text_unit = F.normalize(text_embeddings, dim=1)
    image_to_text = logit_scale * (image_unit @ text_unit.t())  # [B, B], images in rows
    matches = identity_mask(person_ids).to(image_to_text.dtype)
    if image_ids is not None:
        same_image = identity_mask(image_ids).to(matches.dtype)
        matches = same_image + same_identity_weight * (matches - same_image)
    targets = matches / matches.sum(dim=1, keepdim=True).clamp(min=1e-12)
    # y is symmetric, so q with texts in rows is the same matrix.
    return _kl_to_targets(image_to_text, targets, epsilon) + _kl_to_targets(image_to_text.t(), targets, epsilon)


class CMPCLoss(nn.Module):
    """Cross-Modal Projection Classification loss (Zhang & Lu 2018, Sec. 3.3).

    The image is projected on its own normalised text, ``x_tilde_i = (x_i^T zhat_i) zhat_i``,
    the text on its own normalised image, ``z_tilde_i = (z_i^T xhat_i) xhat_i``, and both are
    classified into person ids by one bias-free softmax classifier whose weight columns
    ``W_c`` are L2-normalised at every forward (the paper's norm-softmax, ``||W_j|| = 1``), so
    only the direction of a class weight matters. The loss is the sum of the two mean
    cross-entropies, ``L_ipt + L_tpi``.

    Person ids passed to :meth:`forward` must be contiguous class indices
    ``0 .. num_classes - 1`` (remap dataset ids first); they index the classifier columns.
    """

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        if embed_dim <= 0 or num_classes <= 0:
            raise ValueError("embed_dim and num_classes must be positive")
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        # Columns are classes, as in the paper's W in R^{D x C}.
        self.weight = nn.Parameter(torch.empty(embed_dim, num_classes))
        nn.init.xavier_uniform_(self.weight)

    def normalized_weight(self) -> Tensor:
        """``[D, C]`` classifier weight with unit-norm columns."""
        return F.normalize(self.weight, dim=0)

    def logits(self, image_embeddings: Tensor, text_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits ``([B, C], [B, C])`` of the image-on-text and text-on-image projections.

        Useful to report identity accuracy (``logits.argmax(1) == person_ids``).
        """
        image_unit = F.normalize(image_embeddings, dim=1)
        text_unit = F.normalize(text_embeddings, dim=1)
        # Paired projections only (row i with row i): x_tilde_i = (x_i^T zhat_i) zhat_i.
        image_projected = (image_embeddings * text_unit).sum(dim=1, keepdim=True) * text_unit
        text_projected = (text_embeddings * image_unit).sum(dim=1, keepdim=True) * image_unit
        weight = self.normalized_weight()
        return image_projected @ weight, text_projected @ weight

    def forward(self, image_embeddings: Tensor, text_embeddings: Tensor, person_ids: Tensor) -> Tensor:
        """Scalar CMPC loss for ``[B, D]`` paired embeddings and ``[B]`` class indices."""
        image_logits, text_logits = self.logits(image_embeddings, text_embeddings)
        return F.cross_entropy(image_logits, person_ids) + F.cross_entropy(text_logits, person_ids)


# --------------------------------------------------------------------------------------------
# Identity classification (ISANet eq. 17)
# --------------------------------------------------------------------------------------------


class IdentityLoss(nn.Module):
    """Identity (person id) classification loss: a linear classifier and cross-entropy.

    ISANet eq. 17 sums this over the global feature and each of the K local features. One
    instance holds one classifier; call it once per feature set (e.g. image global, text global,
    each local feature) to share the classifier, or build several instances to keep them
    separate, and sum the returned losses as the method needs.

    Labels must be contiguous class indices ``0 .. num_classes - 1``.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = False) -> None:
        super().__init__()
        self.classifier = nn.Linear(in_features, num_classes, bias=bias)

    def logits(self, features: Tensor) -> Tensor:
        """``[B, num_classes]`` logits for ``[B, in_features]`` features."""
        return self.classifier(features)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of ``[B, in_features]`` features against ``[B]`` class indices."""
        return F.cross_entropy(self.logits(features), labels)


# --------------------------------------------------------------------------------------------
# Triplet ranking losses (ISANet eqs. 18-20 after SSAN, VSE++, LAIP fusion triplet)
# --------------------------------------------------------------------------------------------

NegativeSampling = Literal["hardest", "semi-hard-random", "all"]
NEGATIVE_SAMPLINGS: tuple[str, ...] = ("hardest", "semi-hard-random", "all")
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


def _reduce(values: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def sample_semi_hard_negatives(hinges: Tensor, margin: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One negative per anchor, drawn uniformly from its semi-hard set (SSAN's ``CRLoss``).

    The semi-hard set of anchor ``a`` is ``{k : 0 < hinges[a, k] < margin[a]}`` among the valid
    candidates, with ``hinges[a, k] = margin[a] - s(a, p) + s(a, n_k)`` (before the ``[.]_+``):
    negatives less similar to the anchor than its positive, but by less than the margin.
    Negatives that already beat the positive (``hinge >= margin``) are left out, as in SSAN, so
    collapsed features (every similarity near one value) do not all pull on the same hardest
    pair. The draw uses torch's global generator (``torch.rand``: the engine re-seeds it per
    batch), one uniform key per candidate and the largest key among the semi-hard ones, so every
    member of the set is equally likely. Selection only: call it on detached values.

    Args:
        hinges: ``[A, K]`` hinge values before the ``[.]_+``.
        margin: ``[A]`` (or scalar) margin of each anchor.
        valid: ``[A, K]`` bool, candidates allowed as negatives; ``None`` means all.

    Returns:
        ``(index [A] long, found [A] bool)``: the drawn column per anchor (meaningless where
        ``found`` is False: the anchor has an empty semi-hard set and is skipped).
    """
    margin = torch.as_tensor(margin, dtype=hinges.dtype, device=hinges.device)
    margin_column = margin.reshape(-1, 1) if margin.dim() == 1 else margin
    semi_hard = (hinges > 0) & (hinges < margin_column)
    if valid is not None:
        semi_hard = semi_hard & valid.to(torch.bool)
    if hinges.shape[1] == 0:  # no candidate at all: nothing to draw
        return hinges.new_zeros(hinges.shape[0], dtype=torch.long), semi_hard.any(dim=1)
    keys = torch.rand(hinges.shape, device=hinges.device).masked_fill(~semi_hard, -1.0)
    return keys.argmax(dim=1), semi_hard.any(dim=1)


def triplet_ranking_loss(
    positive_similarity: Tensor,
    negative_similarity: Tensor,
    margin: float | Tensor = 0.2,
    valid_negatives: Tensor | None = None,
    sampling: NegativeSampling = "hardest",
    reduction: Reduction = "mean",
) -> Tensor:
    """Hinge triplet loss on similarity values: ``[margin - s(a, p) + s(a, n)]_+`` per anchor.

    The generic building block of ISANet eqs. 18 and 20 and LAIP's fusion triplet (its eq. 20).
    For anchor ``a`` the candidates ``n`` are the entries of ``negative_similarity[a]`` where
    ``valid_negatives`` is True. Which candidates make the anchor's term (``sampling``):

    * ``"hardest"``: the hinge of the most similar candidate (VSE++);
    * ``"semi-hard-random"``: the hinge of ONE candidate drawn uniformly from the anchor's
      semi-hard set ``0 < hinge < margin`` (:func:`sample_semi_hard_negatives`), SSAN's
      ``CRLoss`` (Ding et al. 2021, the ranking loss ISANet eq. 18 follows). The draw is made
      on detached values; the gradient flows through the drawn triplet only. An anchor with an
      empty semi-hard set contributes nothing. (When no anchor of the batch has one, SSAN's code
      scores its last anchor against that anchor's first negative; here the loss is then 0,
      still attached to the graph.)
    * ``"all"``: the sum of the hinges over every candidate.

    ``reduction`` is over anchors: ``"sum"`` (SSAN) or ``"mean"`` (divided by the number of
    anchors, those that contribute nothing included).

    Examples of composition (``S[i, j] = S(v_i, t_j)``, ``Sbar[i, j] = S(v_i, tbar_j)`` with
    ``tbar`` another caption of the same identity, ``neg = ~identity_mask(ids)``):

    * ISANet eq. 18 weak-supervision terms:
      ``triplet_ranking_loss(Sbar.diagonal(), S, alpha2, neg)`` (image anchor, negatives texts)
      ``+ triplet_ranking_loss(Sbar.diagonal(), Sbar.t(), alpha2, neg.t())`` (anchor ``tbar``).
    * LAIP fusion triplet with one sampled negative per anchor: ``negative_similarity`` ``[A]``.

    Args:
        positive_similarity: ``[A]`` similarity of each anchor with its positive.
        negative_similarity: ``[A, K]`` candidate negative similarities, or ``[A]`` (one each).
        margin: scalar margin, or ``[A]`` per-anchor margins (e.g. SSAN's adaptive margins).
        valid_negatives: ``[A, K]`` bool, True where the entry may serve as a negative;
            ``None`` means all. An anchor without any valid negative contributes 0.
        sampling: ``"hardest"``, ``"semi-hard-random"`` or ``"all"`` (see above).
        reduction: ``"mean"`` or ``"sum"`` over anchors.

    Returns:
        Scalar loss tensor.
    """
    if sampling not in NEGATIVE_SAMPLINGS:
        raise ValueError(f"sampling must be one of {NEGATIVE_SAMPLINGS}, got {sampling!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if negative_similarity.dim() == 1:
        negative_similarity = negative_similarity.unsqueeze(1)
        if valid_negatives is not None:
            valid_negatives = valid_negatives.reshape(-1, 1)
    if negative_similarity.dim() != 2 or negative_similarity.shape[0] != positive_similarity.shape[0]:
        raise ValueError(
            "negative_similarity must be [A] or [A, K] with A = len(positive_similarity), got "
            f"{tuple(negative_similarity.shape)} vs {tuple(positive_similarity.shape)}"
        )
    margin_tensor = torch.as_tensor(margin, dtype=negative_similarity.dtype, device=negative_similarity.device)
    margin_column = margin_tensor.unsqueeze(1) if margin_tensor.dim() == 1 else margin_tensor
    raw_hinges = margin_column - positive_similarity.unsqueeze(1) + negative_similarity
    if sampling == "semi-hard-random":
        with torch.no_grad():
            margins = margin_tensor.expand(positive_similarity.shape[0]) if margin_tensor.dim() == 0 else margin_tensor
            index, found = sample_semi_hard_negatives(raw_hinges.detach(), margins, valid_negatives)
        chosen = raw_hinges.gather(1, index.unsqueeze(1)).squeeze(1).clamp(min=0)
        # Multiplying by the 0/1 flag (not indexing) keeps the loss attached to the graph even
        # when no anchor has a semi-hard negative: then the loss is 0 with zero gradients.
        per_anchor = chosen * found.to(chosen.dtype)
        return _reduce(per_anchor, reduction)
    hinges = raw_hinges.clamp(min=0)
    if valid_negatives is not None:
        # Zeroing the hinge (rather than setting the similarity to -inf) keeps the graph free of
        # infinities; the hinge is monotone in s(a, n), so max over hinges = hinge of the hardest.
        hinges = hinges * valid_negatives.to(hinges.dtype)
    per_anchor = hinges.max(dim=1).values if sampling == "hardest" else hinges.sum(dim=1)
    return _reduce(per_anchor, reduction)


def bidirectional_ranking_loss(
    similarity: Tensor,
    positive_mask: Tensor | None = None,
    margin: float | Tensor = 0.2,
    sampling: NegativeSampling = "hardest",
    reduction: Reduction = "mean",
) -> Tensor:
    """Bidirectional triplet ranking loss over a square similarity matrix (ISANet eq. 18, VSE++, SSAN).

    ``similarity[i, j] = S(v_i, t_j)``; the diagonal holds the matched pairs. Image direction:
    for each image ``i``, ``[m - S(i, i) + S(i, j)]_+`` over negative texts ``j`` (first term of
    eq. 18, read with ``S(v_p, t_n)`` since eq. 18 as printed has ``S(v_n, t_n)``, a typo: the
    second term is the text anchor's). Text direction: for each text ``j``,
    ``[m - S(j, j) + S(i, j)]_+`` over negative images ``i`` (second term). Each direction is
    reduced over its anchors, and the two are summed. With ``sampling="semi-hard-random"`` and
    ``reduction="sum"`` this is SSAN's ``CRLoss`` on one similarity matrix: the image anchors
    draw first, then the text anchors, from torch's global generator.

    Also serves ISANet's content-consistency loss (eq. 20) with
    ``similarity[i, j] = S(f_before_i, f_after_j)``: the two terms are the two directions.

    Args:
        similarity: ``[B, B]`` similarity matrix, positives on the diagonal.
        positive_mask: ``[B, B]`` bool, True for pairs that must not be used as negatives
            (same identity, e.g. ``identity_mask(ids)``); the diagonal is always excluded.
        margin: margin ``alpha_1`` (scalar, or ``[B]`` per anchor, used in both directions).
        sampling: ``"hardest"``, ``"semi-hard-random"`` or ``"all"`` (:func:`triplet_ranking_loss`).
        reduction: ``"mean"`` or ``"sum"`` over anchors, per direction.

    Returns:
        Scalar loss tensor.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square [B, B], got {tuple(similarity.shape)}")
    size = similarity.shape[0]
    not_negative = torch.eye(size, dtype=torch.bool, device=similarity.device)
    if positive_mask is not None:
        if positive_mask.shape != similarity.shape:
            raise ValueError("positive_mask must have the shape of similarity")
        not_negative = not_negative | positive_mask.to(torch.bool)
    valid = ~not_negative
    positives = similarity.diagonal()
    image_anchor = triplet_ranking_loss(positives, similarity, margin, valid, sampling, reduction)
    text_anchor = triplet_ranking_loss(positives, similarity.t(), margin, valid.t(), sampling, reduction)
    return image_anchor + text_anchor


# --------------------------------------------------------------------------------------------
# KL alignment over similarity matrices (NAFS CSAL, ACSA eqs. 12-16)
# --------------------------------------------------------------------------------------------


def similarity_kl_alignment(
    similarity: Tensor,
    person_ids_rows: Tensor,
    person_ids_cols: Tensor | None = None,
    scale: float = 1.0,
    epsilon: float = 1e-8,
    bidirectional: bool = True,
    similarity_t2i: Tensor | None = None,
) -> Tensor:
    """KL alignment of a cross-modal similarity matrix with the identity-match distribution.

    Image-to-text (NAFS ``L_i``; ACSA eqs. 12-15): ``p_ij = softmax_j(scale * S(I_i, T_j))``,
    ``q_ij = y_ij / sum_k y_ik`` (ACSA eq. 13), ``L_i2t = mean_i sum_j p_ij log(p_ij / (q_ij +
    eps))`` (ACSA eqs. 14-15). Text-to-image (NAFS ``L_t``; ACSA eq. 16): the same for each text
    ``j`` over the images, ``p_ji = softmax_i(scale * S'(T_j, I_i))``. Returns ``L_i2t + L_t2i``
    (``L_CSAL`` / ``L_ACSA``), or ``L_i2t`` alone if ``bidirectional`` is False.

    Both papers feed similarities from their cross-attention modules, not embedding dot
    products: NAFS eq. 5 ``S(I, T)`` (image-to-text contextual non-local attention) and ``S'``
    (text-to-image), ACSA eq. 6 ``S(I, T)`` and eq. 11 ``S'(I, T)``. Those are different
    matrices, hence ``similarity_t2i``. NAFS writes ``S`` itself in place of ``p`` and ACSA eq. 12
    normalises ``S`` linearly; neither is a distribution for cosine similarities in [-1, 1], so
    ``p`` is a softmax of the scaled similarity, as in CMPM, from which both losses derive.

    Args:
        similarity: ``[R, C]`` ``S(I_i, T_j)``, images in rows, texts in columns.
        person_ids_rows: ``[R]`` person ids of the images (rows); ``y_ij`` of NAFS / ACSA.
        person_ids_cols: ``[C]`` person ids of the texts; ``None`` means ``person_ids_rows``
            (a batch of matched pairs, ``R == C``).
        scale: inverse temperature applied before the softmax (1.0 = plain CMPM-style).
        epsilon: the ``eps`` in ``log(p / (q + eps))`` (NAFS / ACSA ``epsilon``).
        bidirectional: also add the text-to-image term.
        similarity_t2i: optional ``[R, C]`` text-to-image similarity in the **same layout**
            (entry ``(i, j)`` is ``S'(T_j, I_i)``); ``None`` reuses ``similarity``.

    Returns:
        Scalar loss tensor.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [R, C], got {tuple(similarity.shape)}")
    if person_ids_cols is None:
        person_ids_cols = person_ids_rows
    if similarity.shape != (person_ids_rows.numel(), person_ids_cols.numel()):
        raise ValueError(
            f"similarity {tuple(similarity.shape)} does not match ids "
            f"({person_ids_rows.numel()}, {person_ids_cols.numel()})"
        )
    targets_i2t = identity_match_targets(person_ids_rows, person_ids_cols, dtype=similarity.dtype)
    loss = _kl_to_targets(scale * similarity, targets_i2t, epsilon)
    if bidirectional:
        t2i = similarity if similarity_t2i is None else similarity_t2i
        if t2i.shape != similarity.shape:
            raise ValueError("similarity_t2i must have the same [R, C] layout as similarity")
        targets_t2i = identity_match_targets(person_ids_cols, person_ids_rows, dtype=similarity.dtype)
        loss = loss + _kl_to_targets(scale * t2i.t(), targets_t2i, epsilon)
    return loss


# --------------------------------------------------------------------------------------------
# Identity-aware image-text contrastive loss (LAIP ITC, ALBEF eqs. adapted to person ids)
# --------------------------------------------------------------------------------------------


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_i -sum_j targets_ij log softmax_j(logits_i)`` for ``[R, C]`` logits and targets.

    Targets rows should sum to 1 (e.g. :func:`identity_match_targets`, possibly mixed with
    momentum-distillation targets by the caller, as in ALBEF).
    """
    logits = _at_least_float32(logits)
    return -(targets.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def identity_aware_contrastive_loss(
    similarity_i2t: Tensor,
    person_ids_images: Tensor,
    person_ids_texts: Tensor,
    temperature: float | Tensor | None = None,
    similarity_t2i: Tensor | None = None,
    person_ids_image_columns: Tensor | None = None,
) -> Tensor:
    """Identity-aware image-text contrastive loss (LAIP ITC, its eqs. 15-17 after ALBEF).

    Image-to-text: ``L_i2t = mean_i -sum_j q_ij log softmax_j(s_ij / tau)`` where ``q`` is the
    L1-normalised identity match (every same-id text is a positive, weights summing to 1).
    Text-to-image likewise; returns ``(L_i2t + L_t2i) / 2`` as in ALBEF.

    Queues are handled by the caller concatenating them as extra columns (batch first, then
    queue, as ALBEF does): ``similarity_i2t`` is ``[B_i, N_t]`` against batch texts + text queue,
    ``similarity_t2i`` is ``[B_t, N_i]`` (texts in rows) against batch images + image queue.
    Without queues, omit ``similarity_t2i`` and the transpose of ``similarity_i2t`` is used.

    Args:
        similarity_i2t: ``[B_i, N_t]`` image-to-text logits (already divided by tau when
            ``temperature`` is None).
        person_ids_images: ``[B_i]`` ids of the batch images (rows of ``similarity_i2t``).
        person_ids_texts: ``[N_t]`` ids of the columns of ``similarity_i2t``; its first ``B_t``
            entries are the batch texts, the rows of ``similarity_t2i``.
        temperature: tau to divide both similarity matrices by; None if already applied.
        similarity_t2i: optional ``[B_t, N_i]`` text-to-image logits, texts in rows.
        person_ids_image_columns: ``[N_i]`` ids of the columns of ``similarity_t2i``; defaults
            to ``person_ids_images``.

    Returns:
        Scalar loss tensor.
    """
    if similarity_i2t.shape != (person_ids_images.numel(), person_ids_texts.numel()):
        raise ValueError("similarity_i2t must be [len(person_ids_images), len(person_ids_texts)]")
    logits_i2t = similarity_i2t if temperature is None else similarity_i2t / temperature
    targets_i2t = identity_match_targets(person_ids_images, person_ids_texts, dtype=logits_i2t.dtype)
    loss_i2t = soft_target_cross_entropy(logits_i2t, targets_i2t)

    if similarity_t2i is None:
        logits_t2i = logits_i2t.t()
        row_ids, column_ids = person_ids_texts, person_ids_images
    else:
        logits_t2i = similarity_t2i if temperature is None else similarity_t2i / temperature
        row_ids = person_ids_texts[: similarity_t2i.shape[0]]
        column_ids = person_ids_images if person_ids_image_columns is None else person_ids_image_columns
        if similarity_t2i.shape[1] != column_ids.numel():
            raise ValueError("similarity_t2i columns must match person_ids_image_columns")
    targets_t2i = identity_match_targets(row_ids, column_ids, dtype=logits_t2i.dtype)
    loss_t2i = soft_target_cross_entropy(logits_t2i, targets_t2i)
    return (loss_i2t + loss_t2i) / 2
