"""Tests for tbps.losses: hand-computed tiny cases, edge cases and gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tbps.losses import (
    CMPCLoss,
    IdentityLoss,
    bidirectional_ranking_loss,
    cmpm_loss,
    identity_aware_contrastive_loss,
    identity_mask,
    identity_match_targets,
    sample_semi_hard_negatives,
    similarity_kl_alignment,
    soft_target_cross_entropy,
    triplet_ranking_loss,
)

DOUBLE = torch.float64


def t(values: object) -> torch.Tensor:
    """Small float64 tensor, so hand-computed values can be compared tightly."""
    return torch.tensor(values, dtype=DOUBLE)


def ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def softmax_row(logits: list[float]) -> list[float]:
    """Scalar softmax, written out so the expectation does not reuse torch."""
    exps = [math.exp(v) for v in logits]
    total = sum(exps)
    return [e / total for e in exps]


def kl_row(p: list[float], q: list[float], eps: float) -> float:
    """sum_j p_j (log p_j - log(q_j + eps)), one row of CMPM eq. 3 / ACSA eq. 14."""
    return sum(pj * (math.log(pj) - math.log(qj + eps)) for pj, qj in zip(p, q))


def assert_finite_grads(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        assert tensor.grad is not None
        assert torch.isfinite(tensor.grad).all()
        assert tensor.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ targets


def test_identity_match_targets_are_l1_rows_and_zero_without_match() -> None:
    targets = identity_match_targets(ids([0, 0, 1, 5]), ids([0, 1, 0, 0]))
    expected = torch.tensor(
        [[1 / 3, 0, 1 / 3, 1 / 3], [1 / 3, 0, 1 / 3, 1 / 3], [0, 1, 0, 0], [0, 0, 0, 0]]
    )
    assert_close(targets, expected)
    assert identity_mask(ids([1, 2])).tolist() == [[True, False], [False, True]]


# ------------------------------------------------------------------------------ CMPM


def test_cmpm_hand_computed_unique_ids() -> None:
    # x1 = (1, 0), x2 = (0, 2); z1 = (3, 0), z2 = (0, 1); ids (0, 1) -> q = identity.
    # zhat = ((1, 0), (0, 1)), xhat = ((1, 0), (0, 1)).
    # image->text logits x_i^T zhat_j: row 1 (1, 0), row 2 (0, 2)
    #   row 1: p = (0.731059, 0.268941); KL = 0.731059*(log 0.731059 - log(1+1e-8))
    #          + 0.268941*(log 0.268941 - log 1e-8) = -0.229013 + 4.600894 = 4.371881
    #   row 2: p = (0.119203, 0.880797); KL = 1.942263 - 0.111798 = 1.830465
    #   L_i2t = (4.371881 + 1.830465) / 2 = 3.101173
    # text->image logits z_j^T xhat_i: row 1 (3, 0), row 2 (0, 1)
    #   row 1: p = (0.952574, 0.047426); KL = -0.046283 + 0.729035 = 0.682752
    #   row 2: p = (0.268941, 0.731059); KL = 4.371881
    #   L_t2i = (0.682752 + 4.371881) / 2 = 2.527316
    # CMPM = 3.101173 + 2.527316 = 5.628489
    eps = 1e-8
    l_i2t = (kl_row(softmax_row([1, 0]), [1, 0], eps) + kl_row(softmax_row([0, 2]), [0, 1], eps)) / 2
    l_t2i = (kl_row(softmax_row([3, 0]), [1, 0], eps) + kl_row(softmax_row([0, 1]), [0, 1], eps)) / 2
    expected = l_i2t + l_t2i
    assert abs(expected - 5.628489) < 1e-5
    loss = cmpm_loss(t([[1.0, 0.0], [0.0, 2.0]]), t([[3.0, 0.0], [0.0, 1.0]]), ids([0, 1]), eps)
    assert_close(loss, t(expected))


def cmpm_with_l2_targets(x: torch.Tensor, z: torch.Tensor, pids: torch.Tensor, eps: float) -> torch.Tensor:
    """The widely copied port: q = y / ||y||_2 per row instead of y / ||y||_1."""
    mask = (pids[:, None] == pids[None, :]).to(x.dtype)
    q = mask / mask.norm(dim=1, keepdim=True)
    total = x.new_zeros(())
    for logits in (x @ F.normalize(z, dim=1).t(), z @ F.normalize(x, dim=1).t()):
        log_p = F.log_softmax(logits, dim=1)
        total = total + (log_p.exp() * (log_p - torch.log(q + eps))).sum(1).mean()
    return total


def test_cmpm_repeated_id_hand_computed_and_differs_from_l2_targets() -> None:
    # Two pairs of the same person, every embedding (1, 0): all logits are 1, p = (0.5, 0.5).
    # L1 target q = (0.5, 0.5) = p, so each row's KL is log(0.5 / (0.5 + eps)) ~ 0 and CMPM ~ 0.
    # L2 target q = (1/sqrt2, 1/sqrt2): each row gives log(0.5 / 0.707107) = -0.346574, and the
    # sum over two directions is -log 2 = -0.693147 (a negative "KL": q is not a distribution).
    eps = 1e-8
    x = t([[1.0, 0.0], [1.0, 0.0]])
    z = t([[1.0, 0.0], [1.0, 0.0]])
    pids = ids([4, 4])
    assert_close(cmpm_loss(x, z, pids, eps), t(2 * math.log(0.5 / (0.5 + eps))))
    assert_close(cmpm_with_l2_targets(x, z, pids, eps), t(-math.log(2.0)))


def test_cmpm_matches_l2_variant_only_when_ids_are_unique() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, generator=generator, dtype=DOUBLE)
    z = torch.randn(3, 2, generator=generator, dtype=DOUBLE)
    unique = ids([0, 1, 2])
    repeated = ids([0, 0, 1])
    assert_close(cmpm_loss(x, z, unique), cmpm_with_l2_targets(x, z, unique, 1e-8))
    difference = cmpm_loss(x, z, repeated) - cmpm_with_l2_targets(x, z, repeated, 1e-8)
    assert difference.abs() > 1e-3


def test_cmpm_is_kl_alignment_of_projection_matrices() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, generator=generator, dtype=DOUBLE)
    z = torch.randn(3, 2, generator=generator, dtype=DOUBLE)
    pids = ids([2, 7, 2])
    image_on_text = x @ F.normalize(z, dim=1).t()
    text_on_image = z @ F.normalize(x, dim=1).t()  # texts in rows
    via_alignment = similarity_kl_alignment(image_on_text, pids, similarity_t2i=text_on_image.t())
    assert_close(cmpm_loss(x, z, pids), via_alignment)


def test_cmpm_gradients_and_large_logits_stay_finite() -> None:
    x = (torch.randn(3, 2, dtype=DOUBLE) * 100).requires_grad_()
    z = torch.randn(3, 2, dtype=DOUBLE).requires_grad_()
    loss = cmpm_loss(x, z, ids([0, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert_finite_grads(x, z)


# ------------------------------------------------------------------------------ CMPC


def make_cmpc() -> CMPCLoss:
    module = CMPCLoss(embed_dim=2, num_classes=2).to(DOUBLE)
    with torch.no_grad():
        # Columns (one per class) (2, 0) and (0, 3): normalised they are the identity.
        module.weight.copy_(t([[2.0, 0.0], [0.0, 3.0]]))
    return module


def test_cmpc_hand_computed() -> None:
    # x1 = (1, 1), z1 = (2, 0), id 0;  x2 = (0, 2), z2 = (1, 1), id 1; W normalised = I.
    # image on text: zhat1 = (1, 0), x1.zhat1 = 1 -> (1, 0), logits (1, 0), CE = log(1 + e^-1)
    #                zhat2 = (1, 1)/sqrt2, x2.zhat2 = sqrt2 -> (1, 1), logits (1, 1), CE = log 2
    # text on image: xhat1 = (1, 1)/sqrt2, z1.xhat1 = sqrt2 -> (1, 1), CE = log 2
    #                xhat2 = (0, 1), z2.xhat2 = 1 -> (0, 1), logits (0, 1), id 1: CE = log(1 + e^-1)
    # CMPC = mean(0.313262, 0.693147) + mean(0.693147, 0.313262) = 1.006409
    expected = math.log(1 + math.exp(-1)) + math.log(2)
    module = make_cmpc()
    x = t([[1.0, 1.0], [0.0, 2.0]])
    z = t([[2.0, 0.0], [1.0, 1.0]])
    assert_close(module(x, z, ids([0, 1])), t(expected))
    image_logits, text_logits = module.logits(x, z)
    assert_close(image_logits, t([[1.0, 0.0], [1.0, 1.0]]))
    assert_close(text_logits, t([[1.0, 1.0], [0.0, 1.0]]))


def test_cmpc_scaling_classifier_columns_does_not_change_loss() -> None:
    module = make_cmpc()
    x = torch.randn(3, 2, dtype=DOUBLE)
    z = torch.randn(3, 2, dtype=DOUBLE)
    labels = ids([0, 1, 1])
    before = module(x, z, labels)
    with torch.no_grad():
        module.weight.mul_(t([[5.0, 0.1]]))  # scale column 0 by 5, column 1 by 0.1
    assert_close(module(x, z, labels), before)
    assert_close(module.normalized_weight().norm(dim=0), t([1.0, 1.0]))


def test_cmpc_gradients_flow() -> None:
    module = CMPCLoss(embed_dim=4, num_classes=3)
    x = torch.randn(5, 4, requires_grad=True)
    z = torch.randn(5, 4, requires_grad=True)
    module(x, z, ids([0, 1, 2, 2, 0])).backward()
    assert_finite_grads(x, z, module.weight)


# ------------------------------------------------------------------------------ ID loss


def test_identity_loss_hand_computed_without_and_with_bias() -> None:
    # W = I; f1 = (2, 0) -> logits (2, 0), id 0: CE = log(1 + e^-2) = 0.126928
    #        f2 = (1, 1) -> logits (1, 1), id 0: CE = log 2 = 0.693147; mean = 0.410038
    module = IdentityLoss(in_features=2, num_classes=2).to(DOUBLE)
    assert module.classifier.bias is None
    with torch.no_grad():
        module.classifier.weight.copy_(torch.eye(2, dtype=DOUBLE))
    features = t([[2.0, 0.0], [1.0, 1.0]])
    labels = ids([0, 0])
    assert_close(module(features, labels), t((math.log(1 + math.exp(-2)) + math.log(2)) / 2))

    # With bias (0, 1): logits (2, 1) -> log(1 + e^-1); logits (1, 2) -> log(1 + e^1).
    biased = IdentityLoss(in_features=2, num_classes=2, bias=True).to(DOUBLE)
    with torch.no_grad():
        biased.classifier.weight.copy_(torch.eye(2, dtype=DOUBLE))
        biased.classifier.bias.copy_(t([0.0, 1.0]))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert_close(biased(features, labels), t(expected))


def test_identity_loss_shared_classifier_gradients() -> None:
    module = IdentityLoss(in_features=3, num_classes=4)
    image = torch.randn(2, 3, requires_grad=True)
    text = torch.randn(2, 3, requires_grad=True)
    labels = ids([1, 3])
    # One classifier for two feature sets (ISANet eq. 17 style sum).
    (module(image, labels) + module(text, labels)).backward()
    assert_finite_grads(image, text, module.classifier.weight)


# ------------------------------------------------------------------------------ ranking

RANKING_S = [[0.8, 0.7, 0.65], [0.2, 0.5, 0.4], [0.6, 0.3, 0.9]]


def test_bidirectional_ranking_hand_computed_hardest_and_sum() -> None:
    # margin 0.2, positives on the diagonal (0.8, 0.5, 0.9).
    # image rows:  i0: 0.2-0.8+0.7 = 0.1, 0.2-0.8+0.65 = 0.05 -> hardest 0.1, sum 0.15
    #              i1: 0.2-0.5+0.2 < 0,  0.2-0.5+0.4 = 0.1   -> hardest 0.1, sum 0.1
    #              i2: 0.2-0.9+0.6 < 0,  0.2-0.9+0.3 < 0     -> 0
    # text cols:   t0: 0.2-0.8+0.2 < 0,  0.2-0.8+0.6 = 0     -> 0
    #              t1: 0.2-0.5+0.7 = 0.4, 0.2-0.5+0.3 = 0    -> hardest 0.4, sum 0.4
    #              t2: 0.2-0.9+0.65 < 0, 0.2-0.9+0.4 < 0     -> 0
    # hardest: (0.1+0.1+0)/3 + (0+0.4+0)/3 = 0.2;  sum: (0.15+0.1)/3 + 0.4/3 = 0.65/3
    similarity = t(RANKING_S)
    assert_close(bidirectional_ranking_loss(similarity, margin=0.2), t(0.2))
    assert_close(bidirectional_ranking_loss(similarity, margin=0.2, sampling="all"), t(0.65 / 3))
    assert_close(bidirectional_ranking_loss(similarity, margin=0.2, reduction="sum"), t(0.6))


def test_bidirectional_ranking_positive_mask_excludes_same_id_negatives() -> None:
    # ids (0, 0, 1): pairs (0,1) and (1,0) are the same person and may not be negatives.
    # i0: only S[0,2]: 0.2-0.8+0.65 = 0.05; i1: only S[1,2]: 0.2-0.5+0.4 = 0.1; i2: 0
    # t0: only S[2,0]: 0.2-0.8+0.6 = 0; t1: only S[2,1]: < 0; t2: S[0,2], S[1,2]: < 0
    # total = (0.05 + 0.1) / 3 = 0.05
    mask = identity_mask(ids([0, 0, 1]))
    loss = bidirectional_ranking_loss(t(RANKING_S), positive_mask=mask, margin=0.2)
    assert_close(loss, t(0.05))


def test_bidirectional_ranking_zero_when_positives_win_by_margin() -> None:
    similarity = torch.full((3, 3), 0.1, dtype=DOUBLE) + 0.5 * torch.eye(3, dtype=DOUBLE)
    assert bidirectional_ranking_loss(similarity, margin=0.2).item() == 0.0
    assert bidirectional_ranking_loss(similarity, margin=0.2, sampling="all").item() == 0.0
    assert bidirectional_ranking_loss(similarity, margin=0.6).item() > 0.0


def test_bidirectional_ranking_rejects_non_square() -> None:
    with pytest.raises(ValueError):
        bidirectional_ranking_loss(torch.zeros(2, 3))


def test_bidirectional_ranking_gradients_flow() -> None:
    image = torch.randn(4, 2, requires_grad=True)
    text = torch.randn(4, 2, requires_grad=True)
    similarity = F.normalize(image, dim=1) @ F.normalize(text, dim=1).t()
    loss = bidirectional_ranking_loss(similarity, margin=5.0)  # large margin: every hinge active
    loss.backward()
    assert_finite_grads(image, text)


def test_triplet_ranking_single_negative_and_per_anchor_margin() -> None:
    # LAIP fusion triplet form: one negative per anchor, margin 0.6.
    # anchor 0: 0.6-0.9+0.5 = 0.2; anchor 1: 0.6-0.4+0.3 = 0.5; mean 0.35
    positive = t([0.9, 0.4])
    negative = t([0.5, 0.3])
    assert_close(triplet_ranking_loss(positive, negative, margin=0.6), t(0.35))
    # Per-anchor margins (0.1, 0.2): 0.1-0.9+0.5 < 0; 0.2-0.4+0.3 = 0.1; mean 0.05
    assert_close(triplet_ranking_loss(positive, negative, margin=t([0.1, 0.2])), t(0.05))


def test_triplet_ranking_without_valid_negatives_is_zero_with_finite_grads() -> None:
    positive = torch.tensor([0.1, 0.2], requires_grad=True)
    negative = torch.tensor([[0.9, 0.8], [0.7, 0.9]], requires_grad=True)
    valid = torch.tensor([[False, False], [False, True]])
    # anchor 0 has no negative -> 0; anchor 1: 0.2-0.2+0.9 = 0.9; mean 0.45
    loss = triplet_ranking_loss(positive, negative, margin=0.2, valid_negatives=valid)
    assert_close(loss, torch.tensor(0.45))
    loss.backward()
    assert torch.isfinite(positive.grad).all() and torch.isfinite(negative.grad).all()
    assert_close(negative.grad, torch.tensor([[0.0, 0.0], [0.0, 0.5]]))


def test_triplet_ranking_weak_supervision_composition() -> None:
    # ISANet eq. 18 weak terms from the docstring recipe, B = 2, ids distinct, alpha2 = 0.3.
    # S = S(v_i, t_j); Sbar = S(v_i, tbar_j), tbar another caption of the same person.
    # Image anchors: pos diag(Sbar) = (0.5, 0.6), hardest text negative S[0,1]=0.4, S[1,0]=0.2
    #   -> 0.3-0.5+0.4 = 0.2, 0.3-0.6+0.2 < 0 -> mean 0.1
    # tbar anchors: pos (0.5, 0.6), image negatives Sbar[1,0]=0.35, Sbar[0,1]=0.1
    #   -> 0.3-0.5+0.35 = 0.15, 0.3-0.6+0.1 < 0 -> mean 0.075
    s = t([[0.9, 0.4], [0.2, 0.8]])
    s_bar = t([[0.5, 0.1], [0.35, 0.6]])
    negatives = ~identity_mask(ids([0, 1]))
    image_term = triplet_ranking_loss(s_bar.diagonal(), s, 0.3, negatives)
    text_term = triplet_ranking_loss(s_bar.diagonal(), s_bar.t(), 0.3, negatives.t())
    assert_close(image_term + text_term, t(0.175))


# SSAN's semi-hard sampling (ISANet eq. 18 follows SSAN's CRLoss). Four identities, margin 0.2,
# positives on the diagonal (0.8, 0.5, 0.9, 0.4). A negative is semi-hard when 0 < hinge < margin,
# i.e. pos - margin < neg < pos.
#   image rows   i0: j1 0.1, j2 0.06 (both semi-hard)  j3 < 0
#                i1: j2 0.15 (semi-hard)               j3 0.45 hard (neg > pos): left out;  j0 < 0
#                i2: every hinge < 0                   -> skipped
#                i3: j2 0.05 (semi-hard)               j1 0.22 hard: left out;  j0 < 0
#   text columns t0: none; t1: i2 0.01, i3 0.12 (semi-hard), i0 0.4 hard; t2: none; t3: i0 0.1, i1 0.55 hard
SEMI_HARD_S = [
    [0.80, 0.70, 0.66, 0.30],
    [0.20, 0.50, 0.45, 0.75],
    [0.58, 0.31, 0.90, 0.10],
    [0.10, 0.42, 0.25, 0.40],
]


def test_semi_hard_sampler_draws_uniformly_from_the_semi_hard_set_only() -> None:
    similarity = t(SEMI_HARD_S)
    hinges = 0.2 - similarity.diagonal().unsqueeze(1) + similarity
    valid = ~torch.eye(4, dtype=torch.bool)
    torch.manual_seed(0)
    counts = torch.zeros(4, 4)
    for _ in range(2000):
        index, found = sample_semi_hard_negatives(hinges, t([0.2] * 4), valid)
        assert found.tolist() == [True, True, False, True]
        counts[torch.arange(4)[found], index[found]] += 1
    assert counts[0, 1] + counts[0, 2] == 2000 and abs(counts[0, 1].item() - 1000) < 120  # uniform over {j1, j2}
    assert counts[1, 2] == 2000 and counts[3, 2] == 2000  # the hard negatives (i1 j3, i3 j1) are never drawn
    # torch's global generator decides (the engine re-seeds it per batch), numpy's does not
    torch.manual_seed(7)
    first = sample_semi_hard_negatives(hinges, t([0.2] * 4), valid)[0]
    torch.manual_seed(7)
    import numpy as np

    np.random.seed(123)
    assert torch.equal(sample_semi_hard_negatives(hinges, t([0.2] * 4), valid)[0], first)


def test_semi_hard_ranking_sums_one_drawn_triplet_per_anchor_and_skips_the_rest() -> None:
    similarity = t(SEMI_HARD_S)
    # image anchors: i0 in {0.1, 0.06}, i1 0.15, i2 skipped, i3 0.05; text anchors: t1 in {0.01, 0.12}, t3 0.1
    possible = {round(a + 0.15 + 0.05 + b + 0.1, 6) for a in (0.1, 0.06) for b in (0.01, 0.12)}
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        loss = bidirectional_ranking_loss(similarity, margin=0.2, sampling="semi-hard-random", reduction="sum")
        seen.add(round(loss.item(), 6))
    assert seen == possible  # every combination of draws occurs, and nothing else
    # the hardest negative gives another loss: i1 and t1, t3 would take their hard negatives
    assert bidirectional_ranking_loss(similarity, margin=0.2, reduction="sum").item() == pytest.approx(0.1 + 0.45 + 0.22 + 0.4 + 0.55)
    # mean divides each direction by its number of anchors (4), skipped anchors included
    torch.manual_seed(3)
    total = bidirectional_ranking_loss(similarity, margin=0.2, sampling="semi-hard-random", reduction="sum")
    torch.manual_seed(3)
    mean = bidirectional_ranking_loss(similarity, margin=0.2, sampling="semi-hard-random", reduction="mean")
    assert_close(mean, total / 4)


def test_semi_hard_ranking_per_anchor_margin_and_gradient_on_the_drawn_triplets_only() -> None:
    similarity = t(SEMI_HARD_S).requires_grad_(True)
    valid = ~torch.eye(4, dtype=torch.bool)
    # anchor i2 with margin 0.4: j0 (0.58 > 0.9 - 0.4) becomes semi-hard (hinge 0.08)
    torch.manual_seed(0)
    loss = triplet_ranking_loss(similarity.diagonal(), similarity, t([0.2, 0.2, 0.4, 0.2]), valid, "semi-hard-random", "sum")
    assert round(loss.item(), 6) in {round(0.1 + 0.15 + 0.08 + 0.05, 6), round(0.06 + 0.15 + 0.08 + 0.05, 6)}
    loss.backward()
    grad = similarity.grad
    assert grad[1, 2] == 1 and grad[1, 3] == 0 and grad[2, 0] == 1 and grad[3, 2] == 1 and grad[3, 1] == 0
    assert grad[0, 1] + grad[0, 2] == 1  # one of i0's two semi-hard negatives
    assert_close(grad.diagonal(), t([-1.0, -1.0, -1.0, -1.0]))


def test_semi_hard_ranking_without_any_semi_hard_negative_is_zero_and_differentiable() -> None:
    # positives win by more than the margin everywhere: SSAN would score its last anchor; we give 0
    similarity = (torch.full((3, 3), 0.1, dtype=DOUBLE) + 0.5 * torch.eye(3, dtype=DOUBLE)).requires_grad_(True)
    loss = bidirectional_ranking_loss(similarity, margin=0.2, sampling="semi-hard-random", reduction="sum")
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert_close(similarity.grad, torch.zeros_like(similarity))
    with pytest.raises(ValueError, match="sampling"):
        bidirectional_ranking_loss(similarity, sampling="semi-hard")  # type: ignore[arg-type]


def test_triplet_ranking_rejects_bad_reduction_and_shape() -> None:
    with pytest.raises(ValueError):
        triplet_ranking_loss(torch.zeros(2), torch.zeros(2, 3), reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        triplet_ranking_loss(torch.zeros(2), torch.zeros(3, 3))


# ------------------------------------------------------------------------------ KL alignment


def test_kl_alignment_hand_computed() -> None:
    # S = [[1, 0], [0.5, 0.5]], scale 2, ids (0, 1) -> q = identity in both directions.
    # i2t rows of 2S: (2, 0) with q (1, 0); (1, 1) with q (0, 1)
    #   row 1: p = (0.880797, 0.119203): KL = -0.111798 + 1.942263 = 1.830465
    #   row 2: p = (0.5, 0.5): KL = 0.5*(log 0.5 - log 1e-8) + 0.5*(log 0.5 - log(1 + 1e-8))
    #          = 8.863767 - 0.346574 = 8.517193
    #   L_i2t = (1.830465 + 8.517193) / 2 = 5.173829
    # t2i columns of 2S: (2, 1) with q (1, 0); (0, 1) with q (0, 1)
    #   col 1: p = (0.731059, 0.268941): KL = 4.371881; col 2: p = (0.268941, 0.731059): 4.371881
    #   L_t2i = 4.371881;  total = 9.545710
    eps = 1e-8
    l_i2t = (kl_row(softmax_row([2, 0]), [1, 0], eps) + kl_row(softmax_row([1, 1]), [0, 1], eps)) / 2
    l_t2i = (kl_row(softmax_row([2, 1]), [1, 0], eps) + kl_row(softmax_row([0, 1]), [0, 1], eps)) / 2
    assert abs(l_i2t + l_t2i - 9.545710) < 1e-5
    similarity = t([[1.0, 0.0], [0.5, 0.5]])
    pids = ids([0, 1])
    assert_close(similarity_kl_alignment(similarity, pids, scale=2.0), t(l_i2t + l_t2i))
    assert_close(similarity_kl_alignment(similarity, pids, scale=2.0, bidirectional=False), t(l_i2t))


def test_kl_alignment_zero_when_prediction_equals_target() -> None:
    # ids (3, 3): q = (0.5, 0.5) per row; equal similarities give p = (0.5, 0.5) = q.
    # With eps = 0 every row is 0.5*log(0.5/0.5)*2 = 0 exactly.
    # With eps = 0.1 every row is log(0.5 / 0.6); 2 rows averaged, 2 directions: 2*log(5/6).
    similarity = torch.full((2, 2), 0.3, dtype=DOUBLE)
    pids = ids([3, 3])
    assert similarity_kl_alignment(similarity, pids, epsilon=0.0).item() == 0.0
    assert_close(similarity_kl_alignment(similarity, pids, epsilon=0.1), t(2 * math.log(5 / 6)))


def test_kl_alignment_separate_t2i_matrix_and_rectangular_batch() -> None:
    # 2 images (ids 0, 1) x 3 texts (ids 0, 0, 1); S' differs from S.
    # i2t rows: S row 1 (1, 0, 0) with q (0.5, 0.5, 0); row 2 (0, 0, 1) with q (0, 0, 1)
    # t2i: for each text, S' column over images: (0, 1) q (1, 0); (2, 0) q (1, 0); (0, 0) q (0, 1)
    # L = mean of the two i2t rows + mean of the three t2i rows.
    eps = 1e-8
    similarity = t([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    similarity_t2i = t([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    l_i2t = (
        kl_row(softmax_row([1, 0, 0]), [0.5, 0.5, 0], eps) + kl_row(softmax_row([0, 0, 1]), [0, 0, 1], eps)
    ) / 2
    l_t2i = (
        kl_row(softmax_row([0, 1]), [1, 0], eps)
        + kl_row(softmax_row([2, 0]), [1, 0], eps)
        + kl_row(softmax_row([0, 0]), [0, 1], eps)
    ) / 3
    loss = similarity_kl_alignment(similarity, ids([0, 1]), ids([0, 0, 1]), similarity_t2i=similarity_t2i)
    assert_close(loss, t(l_i2t + l_t2i))
    with pytest.raises(ValueError):
        similarity_kl_alignment(similarity, ids([0, 1]))  # columns need their own ids


def test_kl_alignment_gradients_flow() -> None:
    similarity = torch.randn(3, 3, requires_grad=True)
    similarity_t2i = torch.randn(3, 3, requires_grad=True)
    loss = similarity_kl_alignment(similarity, ids([0, 1, 1]), scale=20.0, similarity_t2i=similarity_t2i)
    loss.backward()
    assert torch.isfinite(loss)
    assert_finite_grads(similarity, similarity_t2i)


# ------------------------------------------------------------------------------ ITC


def test_identity_aware_contrastive_hand_computed_with_queue() -> None:
    # Images ids (0, 1); text columns ids (0, 1, 0): 2 batch texts + 1 queue text; tau = 0.5.
    # i2t logits = S / 0.5: row 1 (4, 0, 2), targets (0.5, 0, 0.5)
    #   -> -(0.5 log p(4) + 0.5 log p(2)) with p = softmax(4, 0, 2) = (0.867, 0.016, 0.117)
    #   row 2 (0, 2, 0), targets (0, 1, 0) -> -log softmax(0, 2, 0)[1] = -log 0.787 = 0.240
    # t2i: batch texts (ids 0, 1) against images (ids 0, 1, 1: 2 batch + 1 queue):
    #   row 1 S'/0.5 = (2, 0, 1), targets (1, 0, 0)   -> -log softmax(2, 0, 1)[0]
    #   row 2 S'/0.5 = (0, 1, 2), targets (0, .5, .5) -> -(0.5 log p(1) + 0.5 log p(2))
    # loss = (mean i2t + mean t2i) / 2
    p1 = softmax_row([4, 0, 2])
    p2 = softmax_row([0, 2, 0])
    l_i2t = (-(0.5 * math.log(p1[0]) + 0.5 * math.log(p1[2])) - math.log(p2[1])) / 2
    p3 = softmax_row([2, 0, 1])
    p4 = softmax_row([0, 1, 2])
    l_t2i = (-math.log(p3[0]) - (0.5 * math.log(p4[1]) + 0.5 * math.log(p4[2]))) / 2
    loss = identity_aware_contrastive_loss(
        t([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        ids([0, 1]),
        ids([0, 1, 0]),
        temperature=0.5,
        similarity_t2i=t([[1.0, 0.0, 0.5], [0.0, 0.5, 1.0]]),
        person_ids_image_columns=ids([0, 1, 1]),
    )
    assert_close(loss, t((l_i2t + l_t2i) / 2))


def test_identity_aware_contrastive_reduces_to_albef_itc_for_unique_ids() -> None:
    logits = torch.randn(3, 3, dtype=DOUBLE)
    diagonal = torch.arange(3)
    albef = (F.cross_entropy(logits, diagonal) + F.cross_entropy(logits.t(), diagonal)) / 2
    assert_close(identity_aware_contrastive_loss(logits, ids([0, 1, 2]), ids([0, 1, 2])), albef)
    # Temperature divides the logits.
    assert_close(
        identity_aware_contrastive_loss(logits, ids([0, 1, 2]), ids([0, 1, 2]), temperature=0.1),
        identity_aware_contrastive_loss(logits / 0.1, ids([0, 1, 2]), ids([0, 1, 2])),
    )


def test_identity_aware_contrastive_repeated_id_splits_target_mass() -> None:
    # ids (5, 5): every row's target is (0.5, 0.5); logits (0, ln 3) -> p = (0.25, 0.75)
    # each row: -(0.5 log 0.25 + 0.5 log 0.75) = 0.836988; t2i sees columns (0, 0), (ln3, ln3)
    # -> p = (0.5, 0.5), each row log 2 = 0.693147; loss = (0.836988 + 0.693147) / 2
    logits = t([[0.0, math.log(3)], [0.0, math.log(3)]])
    expected = (-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) + math.log(2)) / 2
    assert_close(identity_aware_contrastive_loss(logits, ids([5, 5]), ids([5, 5])), t(expected))


def test_soft_target_cross_entropy_and_contrastive_gradients() -> None:
    logits = torch.randn(2, 4, requires_grad=True)
    targets = torch.tensor([[0.25, 0.25, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]])
    loss = soft_target_cross_entropy(logits, targets)
    expected = -(targets * torch.log_softmax(logits, dim=1)).sum() / 2
    assert_close(loss, expected)
    similarity = torch.randn(3, 5, requires_grad=True)
    similarity_t2i = torch.randn(3, 4, requires_grad=True)
    itc = identity_aware_contrastive_loss(
        similarity,
        ids([0, 1, 1]),
        ids([0, 1, 1, 2, 0]),
        temperature=0.07,
        similarity_t2i=similarity_t2i,
        person_ids_image_columns=ids([0, 1, 1, 3]),
    )
    itc.backward()
    assert_finite_grads(similarity, similarity_t2i)


def test_half_precision_inputs_give_finite_losses() -> None:
    # eps = 1e-8 underflows to 0 in float16; the KL must still be computed without log(0).
    x = torch.randn(3, 4).half()
    z = torch.randn(3, 4).half()
    pids = ids([0, 1, 1])
    assert torch.isfinite(cmpm_loss(x, z, pids))
    assert torch.isfinite(similarity_kl_alignment(x @ z.t(), pids, scale=10.0))
    assert torch.isfinite(identity_aware_contrastive_loss(x @ z.t(), pids, pids, temperature=0.07))
