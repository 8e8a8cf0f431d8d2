"""ISANet: image-specific information suppression and implicit local alignment (Yan et al. 2022).

Reads like the paper (``isanet.md``; equation numbers in brackets):

1. **Encoders** (Sec. III-A): an image backbone's last feature map ``F`` [C x H x W] (ResNet-50,
   last stride 1, 384x128 -> 24x8x2048 at paper scale; EfficientNet-Lite0 offline) and a Bi-LSTM
   over the training vocabulary with the two directions averaged [1] (``bilstm`` with
   ``combine: mean``; a BERT-family encoder is an option). Word features must live in the same
   ``C`` channels as the image (``W_s`` of eqs. 9 and 12 is shared): when the text encoder's
   width differs from ``C`` a linear map ``text_to_channels`` brings it there (identity when equal,
   as at paper scale with a 2048-wide Bi-LSTM). No module assumes a map size: the position-specific
   ones (RGL's ``W_a``, RGA's relation embedding) are built for the size the backbone gives at the
   configured image size (one dummy forward), whatever its stride.
2. **Relation-guided localization** (RGL, [2]-[5]): :class:`RelationGuidedLocalization`; Table
   IV's replacements :class:`ConvolutionalBlockAttention` (CBAM), :class:`RelationAwareSpatialAttention`
   (RGA-S) and the core's non-local block.
3. **Channel attention filtration** (CAF, [6]-[8]): :class:`ChannelAttentionFiltration`.
4. **Implicit local alignment** (ILA, [9]-[14]): :class:`ImplicitLocalAlignment`.
5. **Global alignment** (GA, [15]-[16]): FC then global max pooling for the image, global max
   pooling then FC for the text.
6. **Losses** [17]-[21]: identity loss on the global and each local feature (each through a
   normalising neck, ``feature_norm``), the bidirectional triplet ranking loss with the weak
   supervision of another caption of the same identity (SSAN's ranking loss, see below), and the
   identity-relevant content-consistency triplet around CAF.
7. **Test similarity**: ``S = S_global + S_local``, both cosine. Every feature is computed per
   image / per caption with no cross-modal interaction, so ``S`` is the inner product of the
   concatenated unit vectors ``[g/|g|, l/|l|]`` (:func:`retrieval_vector`) and ISANet searches a
   gallery as cheaply as a global model.

How the paper's RGL dimensions are read (they do not close as printed)
----------------------------------------------------------------------
Eq. 2 gives ``W in R^{r2 x d/r1}`` ("an r2-dimensional relation vector"), the text after eq. 3
``r_i in R^{NC/r1}`` and eq. 5 ``W_a in R^{C x (N/r1 + 1)C}``. Eqs. 3 and 5 agree with each other:
``r_i`` concatenates N relation vectors of ``C/r1`` entries (64 at C = 2048, r1 = 32), and ``W_a``
acts on ``[f_i, r_i]`` of ``C + N C/r1`` entries. Only eq. 2's wording ("r2-dimensional", 256 as
printed) disagrees, and no reading of r2 = 256 fits eq. 5, so we follow eqs. 3 and 5:

* ``x_theta = ReLU(BN(W_theta x))``, ``y_phi = ReLU(BN(W_phi y))`` in ``R^{C/r1}`` (64);
* ``r(x, y) = ReLU(BN(W (x_theta - y_phi)))`` with ``W in R^{(C/r1) x (C/r1)}``: a relation
  vector of ``R = C/r1`` entries per pair. ``rgl.relation_dim`` sets ``R`` explicitly and
  ``rgl.relation_reduction`` (r2) gives ``R = C/r2`` (8 at paper scale; this module's earlier
  reading, 8x smaller ``W_a``), neither is in the paper's configs;
* ``r_i = Concat_j r_{i,j} in R^{N R}`` (12,288), ``W_a in R^{C x (C + N R)}`` (29.4 M weights at
  24 x 8 x 2048); ``W_a`` is position-specific (block ``j`` weights the relation to position ``j``,
  as in RGA), so the module is built for one feature-map size.

Memory: ``W`` is linear, so ``W(x_theta_i - y_phi_j) = u_i - w_j`` with ``u = W x_theta``,
``w = W y_phi``: the ``N x N x C/r1`` difference tensor is never formed. The batch-norm statistics
over all ``B N N`` pairs have a closed form in ``u`` and ``w`` (:func:`pair_difference_statistics`),
so the ``N x N x R`` relation tensor is produced ``chunk_size`` query positions at a time and
immediately contracted with ``W_a`` (activation checkpointing keeps the backward pass bounded too:
64 x 32 x 192 x 64 floats = 101 MB per chunk at paper scale in float32). The direct path
(``chunk_size: 0``) materialises every pair and uses ``nn.BatchNorm1d``; the tests check the two
agree. The pair batch norm follows ``nn.BatchNorm1d``: biased variance of the batch in training,
running averages of the unbiased one at test; over ``B N N`` pairs the two differ by a factor
``n/(n-1)`` with ``n`` in the millions, which is nothing.

ILA reading: eq. 10's ``W^l in R^{d_c x d_c/r3}`` makes the assignment ``a_{i,j}`` a
``d_c``-vector (the "detailed correspondence" of Sec. IV-C-3 that an inner product lacks), so
eq. 11 is ``v_j = sum_i a_{i,j} (.) z_i`` channel-wise. The assignment is eq. 10 as printed, the
rectified relation vector itself; an earlier version added a softmax over the K centres, which
the paper does not have and which kept every assignment near 1/K. The centres' batch norm (``c_phi``)
uses the K centres' own mean and biased variance in training and at test (they are the whole
population; running averages would scale ``c_phi`` by ``sqrt((K-1)/K)`` at test, 0.91 at K = 6).
The relation function's linear maps and the centres are shared by both modalities (eqs. 10, 13);
its batch norms keep per-modality statistics because images and captions are encoded in separate
calls (one shared running average would mix two different distributions at test time).

Identity loss (eq. 17): one classifier per feature shared by images and captions. Un-normalised,
the image global vector (FC then GMP over positions) enters it at norm 22.7 and the caption's at
1.2 with RGL + CAF on the synthetic benchmark at initialisation (8x3 map; 12.2 vs 1.3 on the 4x1
map; the issue: 6.9 vs 1.1 without RGL and CAF), so it fits images only (the failure ACSA's ``feature_norm`` fixed). ``feature_norm`` puts a neck
before every classifier: ``layernorm`` (default; both at ``sqrt(d)`` before the affine),
``batchnorm`` (BNNeck, per-call statistics, i.e. per modality) or ``none``. Retrieval features and
the (cosine) ranking losses do not go through it.

Ranking loss (eq. 18), after SSAN (zifyloo/SSAN, ``src/loss/RankingLoss.py``), whose recipe ISANet
follows ("the setting strategy of alpha_2 keeps same with [15]"):

* per anchor, ONE negative drawn uniformly from its semi-hard set ``0 < hinge < margin``
  (``losses.negative_sampling: semi-hard-random``; ``hardest`` and ``all`` are the alternatives),
  anchors with an empty set skipped, hinges summed over the anchors (``losses.reduction: sum``;
  ``mean`` divides by the number of anchors). Draws come from torch's global generator, which the
  engine re-seeds per batch. Where no anchor of the batch has a semi-hard negative the loss is 0
  (SSAN's code then scores its last anchor against that anchor's first negative);
* ``alpha_2 = (1 + min(|S(v, t_bar)| / |S(v, t)|, 1)) alpha_1 / 2`` per pair, detached
  (:func:`adaptive_weak_margins`), from epoch ``losses.weak_margin_start_epoch`` on (SSAN's
  ``epoch_begin``, 5; the engine tells the method the epoch through :meth:`ISANet.set_epoch`);
  ``alpha_1 / 2`` before (and throughout when the start epoch is null). In the adaptive phase,
  weak-supervision anchors with ``alpha_2 < losses.weak_min_margin`` (SSAN: 0.16) are skipped.
  ``lambda_1`` weighs the two weak terms (SSAN's ``cr_beta``, 0.1 in both papers).

Weak supervision (eq. 18): the partner caption ``t_bar_i`` is another caption of the same person
in the batch (:func:`same_identity_partners`); use ``data.sampler: identity`` so one usually
exists. The third term's negatives are the batch's captions of other identities, ``S(v_p, t_n)``
as printed (SSAN's code uses the other partner captions). A sample without a partner contributes
nothing to the two weak terms, which are 0 when no sample has one. Losses are computed on the
local batch (not all-gathered): partners are found from the batch's caption strings.

Content consistency (eq. 20) and why it is not on GAP: ``GAP(IN(F~)) = beta`` for every input, so
``GAP(F^) = GAP(F~_IN + w (.) R + F~) = (1 + w) (.) GAP(F~) + (1 - w) (.) beta`` exactly: the
vector after CAF is the one before it, rescaled channel-wise by 1 + w in (1, 2), plus the shared
beta. On the synthetic benchmark (batch 64, 8x3 map) ``S(f~, f^)`` stays at 0.995-1.000 while the
hardest other identity is at 0.24-0.29, and no hinge opens at ``alpha_3 = 0.2`` (0 of 64 anchors
at each check over 40 training steps; 4x1 map: 0 of 64 over 50 steps): ``L_cons = 0``, and
"w/o L_cons" is the same model. Dropping the ``+ F~`` skip from ``f^`` or pooling with GMP does not
change that (0 of 64). The ``consistency_features: global`` default (ours) compares the image's
global feature computed from ``F~`` and from ``F^`` (eq. 15's GMP(W_g .), or the baseline's
projection without GA): the space the ranking hinges act in, where CAF's ``gamma``, ``beta`` and
``w`` all show. There the loss is 5.9 at step 0 and falls to 0.74, 0.60, 0.20, 0.13 at steps 10-40
(sum over the 2 x 64 anchor terms); without it (the GAP run, 4x1 map) the hinge had drifted open
for 42-77 % of the anchors by steps 10-50. ``consistency_features: gap`` is eq. 20 as printed.
``losses.reduction`` applies to eq. 20 too.

Ablation switches (Tables III-V), under ``model``:

* Table III: ``global_alignment`` (GA, or off = SSAN's shared projection after max pooling),
  ``local_alignment`` (ILA), ``rgl.mode`` and ``caf.mode`` below. Row "Baseline" (SSAN without
  its part branch) is ``global_alignment: false, local_alignment: false, rgl.mode: none,
  caf.mode: none``; "GA" adds ``global_alignment: true``; "ILA" is ``local_alignment: true`` with
  ``global_alignment: false``;
* ``rgl.mode``: ``relation`` (RGL), ``cbam`` (Table IV "RGL -> CBAM"), ``rga`` (Table IV
  "RGL -> RAG", RGA-S), ``non_local`` (Table IV "RGL -> Non-Local"), ``none``;
* ``caf.mode``: ``caf``, ``instance_norm`` (Table IV "CAF -> IN"), ``none``;
  ``losses.consistency: 0`` is Table IV "CAF (w/o L_cons)"; ``losses.consistency_features``:
  ``global`` (ours) or ``gap`` (as printed);
* ``ila.assignment``: ``relation`` (ours), ``inner_product`` (Table V "ILA (IP)"), ``netvlad``
  (Table V "NetVLAD"); ``ila.num_centres``: K (Fig. 5);
* not in the paper's tables: ``feature_norm`` (``layernorm`` | ``batchnorm`` | ``none``),
  ``losses.negative_sampling`` (``semi-hard-random`` | ``hardest`` | ``all``), ``losses.reduction``
  (``sum`` | ``mean``), ``losses.weak_margin_start_epoch`` (int or null), ``losses.weak_min_margin``,
  ``rgl.relation_dim`` / ``rgl.relation_reduction``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tbps.losses import (
    NEGATIVE_SAMPLINGS,
    REDUCTIONS,
    IdentityLoss,
    NegativeSampling,
    Reduction,
    bidirectional_ranking_loss,
    identity_mask,
    triplet_ranking_loss,
)
from tbps.models.attention import NonLocalBlock2d, SqueezeExcitation
from tbps.models.backbones import create_image_backbone, create_text_backbone
from tbps.models.backbones.common import option
from tbps.models.base import Features, PersonSearchMethod, TextProcessor
from tbps.models.registry import register_method

RGL_MODES = ("relation", "cbam", "rga", "non_local", "none")
CAF_MODES = ("caf", "instance_norm", "none")
FEATURE_NORMS = ("layernorm", "batchnorm", "none")
CONSISTENCY_FEATURES = ("global", "gap")
ASSIGNMENTS = ("relation", "inner_product", "netvlad")


# =============================================================================================
# The relation function (eq. 2) and batch norm over all pairs without forming them
# =============================================================================================


def pair_difference_statistics(u: Tensor, w: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """Mean and biased variance, per channel, of ``D[b, i, j] = u[b, i] - w[b, j]`` over all pairs.

    ``u`` ``[B, N, R]``, ``w`` ``[B, M, R]`` or ``[M, R]`` (shared by the batch, e.g. ILA's
    centres), ``mask`` ``[B, N]`` (1 for pairs whose ``i`` is real; padded words are left out).
    Closed form, ``O(B (N + M) R)``: with ``n_b = sum_i mask``, ``U_b = sum_i mask u``,
    ``Q_b = sum_i mask u^2`` and ``V_b``, ``P_b`` the sums of ``w`` and ``w^2`` over ``j``,
    ``sum D = sum_b (M U_b - n_b V_b)`` and ``sum D^2 = sum_b (M Q_b - 2 U_b V_b + n_b P_b)``.
    Returns ``(mean [R], variance [R], number of pairs)``; computed in float32 or wider.
    """
    u = u.float()
    w = w.float()
    if w.dim() == 2:
        w = w.unsqueeze(0)
    if mask is None:
        mask = u.new_ones(u.shape[:2])
    mask = mask.to(u.dtype).unsqueeze(-1)  # [B, N, 1]
    num_y = w.shape[1]
    count_x = mask.sum(dim=1)  # [B, 1]
    sum_u, sum_u2 = (mask * u).sum(dim=1), (mask * u * u).sum(dim=1)  # [B, R]
    sum_w, sum_w2 = w.sum(dim=1), (w * w).sum(dim=1)  # [B or 1, R]
    pairs = count_x.sum() * num_y
    total = (num_y * sum_u - count_x * sum_w).sum(dim=0)
    total_sq = (num_y * sum_u2 - 2 * sum_u * sum_w + count_x * sum_w2).sum(dim=0)
    mean = total / pairs.clamp(min=1)
    variance = (total_sq / pairs.clamp(min=1) - mean * mean).clamp(min=0)
    return mean, variance, int(pairs.item())


class PairwiseRelation(nn.Module):
    """Relation vector ``r(x, y) = ReLU(BN(W (x_theta - y_phi)))`` of eq. 2, for sets of pairs.

    ``x_theta = ReLU(BN(W_theta x))``, ``y_phi = ReLU(BN(W_phi y))`` reduce ``in_dim`` to
    ``reduced_dim``; ``W`` maps the difference to ``out_dim``. ``groups`` names independent sets
    of batch-norm statistics (ILA: one for images, one for captions) sharing every linear map.

    ``fixed_y``: ``y`` is a fixed set of parameters rather than data (ILA's K topic centres,
    eqs. 10/13). Its batch norm then always normalises with the set's own mean and biased
    variance, in training and at test alike (``track_running_stats=False``): the K centres are
    the whole population, not a sample of it. With running averages the test-time output would
    differ from the training one by the momentum lag and the unbiased ``K/(K-1)`` variance
    (6/5 at K = 6, i.e. ``y_phi`` scaled by ``sqrt(5/6) = 0.91`` before the ReLU).

    :meth:`embed` gives ``u = W x_theta`` and ``w = W y_phi`` (``W`` is linear, so
    ``W(x_theta - y_phi) = u - w``); :meth:`pair_statistics` the batch norm's mean and variance
    over all pairs (closed form in training, running averages in eval, updated like
    ``nn.BatchNorm1d``); :meth:`relation_vectors` the normalised, rectified vectors of a block of
    pairs. :meth:`direct` materialises every pair and applies ``nn.BatchNorm1d`` (the reference).
    """

    def __init__(
        self, in_dim: int, reduced_dim: int, out_dim: int, groups: Sequence[str] = ("default",), fixed_y: bool = False
    ) -> None:
        super().__init__()
        self.theta = nn.Linear(in_dim, reduced_dim, bias=False)
        self.phi = nn.Linear(in_dim, reduced_dim, bias=False)
        self.relation = nn.Linear(reduced_dim, out_dim, bias=False)  # W
        self.theta_norm = nn.ModuleDict({g: nn.BatchNorm1d(reduced_dim) for g in groups})
        self.phi_norm = nn.ModuleDict({g: nn.BatchNorm1d(reduced_dim, track_running_stats=not fixed_y) for g in groups})
        self.pair_norm = nn.ModuleDict({g: nn.BatchNorm1d(out_dim) for g in groups})
        self.out_dim = out_dim

    @staticmethod
    def _norm_rows(norm: nn.BatchNorm1d, rows: Tensor, mask: Tensor | None = None) -> Tensor:
        """Batch norm over the leading dims of ``[..., D]``; masked rows neither count nor change."""
        shape = rows.shape
        flat = rows.reshape(-1, shape[-1])
        if mask is None or not norm.training:
            return norm(flat).reshape(shape)
        keep = mask.reshape(-1).bool()
        out = flat.new_zeros(flat.shape)
        out[keep] = norm(flat[keep])
        return out.reshape(shape)

    def embed(self, x: Tensor, y: Tensor, group: str = "default", x_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(u = W x_theta, w = W y_phi)`` for ``x`` ``[B, N, in]`` and ``y`` ``[B, M, in]`` or ``[M, in]``."""
        x_theta = F.relu(self._norm_rows(self.theta_norm[group], self.theta(x), x_mask))
        y_phi = F.relu(self._norm_rows(self.phi_norm[group], self.phi(y)))
        return self.relation(x_theta), self.relation(y_phi)

    def pair_statistics(self, u: Tensor, w: Tensor, group: str = "default", mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The pair batch norm's ``(mean, variance)``: this batch's in training, running in eval."""
        norm = self.pair_norm[group]
        if not norm.training:
            return norm.running_mean, norm.running_var
        mean, variance, count = pair_difference_statistics(u, w, mask)
        with torch.no_grad():  # exactly nn.BatchNorm1d's running-average update
            momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked + 1)
            unbiased = variance * count / max(1, count - 1)
            norm.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            norm.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())
            norm.num_batches_tracked.add_(1)
        return mean, variance

    def relation_vectors(self, u: Tensor, w: Tensor, mean: Tensor, variance: Tensor, group: str = "default") -> Tensor:
        """``ReLU(BN(u_i - w_j))`` for every ``i`` of ``u`` [B, n, R] and ``j`` of ``w`` -> ``[B, n, M, R]``."""
        norm = self.pair_norm[group]
        if w.dim() == 2:
            w = w.unsqueeze(0)
        scale = norm.weight * torch.rsqrt(variance.to(u.dtype) + norm.eps)
        shift = norm.bias - mean.to(u.dtype) * scale
        # (u_i - w_j) * scale + shift = (u_i * scale + shift) - w_j * scale: one broadcast subtraction.
        return F.relu((u * scale + shift).unsqueeze(2) - (w * scale).unsqueeze(1))

    def direct(self, x: Tensor, y: Tensor, group: str = "default", x_mask: Tensor | None = None) -> Tensor:
        """Reference path: every ``x_theta_i - y_phi_j`` formed, then ``W``, ``nn.BatchNorm1d``, ReLU."""
        x_theta = F.relu(self._norm_rows(self.theta_norm[group], self.theta(x), x_mask))
        y_phi = F.relu(self._norm_rows(self.phi_norm[group], self.phi(y)))
        if y_phi.dim() == 2:
            y_phi = y_phi.unsqueeze(0).expand(x.shape[0], -1, -1)
        difference = x_theta.unsqueeze(2) - y_phi.unsqueeze(1)  # [B, N, M, reduced]
        pair_mask = None if x_mask is None else x_mask.unsqueeze(2).expand(-1, -1, y_phi.shape[1])
        return F.relu(self._norm_rows(self.pair_norm[group], self.relation(difference), pair_mask))


# =============================================================================================
# Relation-guided localization, eqs. 2-5
# =============================================================================================


class RelationGuidedLocalization(nn.Module):
    """RGL (eqs. 2-5, Fig. 3): per-position, per-channel attention from the feature and its global relation vector.

    For position ``i``: ``r_{i,j} = r(f_i, f_j)`` for every ``j`` (eq. 4), ``r_i = Concat_j r_{i,j}``
    (eq. 3), ``a_i = Sigmoid(BN(W_a [f_i, r_i]))`` in ``R^C`` (eq. 5), ``F~ = A (.) F``. See the
    module docstring for the dimension reading: ``r_{i,j}`` in ``R^{C/r1}`` (``relation_dim``
    overrides it), so ``r_i`` in ``R^{N C/r1}`` (eq. 3) and ``W_a`` in ``R^{C x (N/r1 + 1) C}`` (eq. 5).

    ``chunk_size`` query positions are processed at a time (0: the direct path over all pairs);
    ``use_checkpoint`` recomputes each chunk in the backward pass so only one chunk of the
    ``[B, chunk, N, R]`` relation tensor is alive at any time.
    """

    def __init__(
        self,
        channels: int,
        num_positions: int,
        theta_reduction: int = 32,
        relation_dim: int | None = None,
        chunk_size: int = 32,
        use_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        reduced = max(1, channels // theta_reduction)  # C / r1
        # Eqs. 3 and 5 agree on C/r1 entries per pair: r_i in R^{N C / r1}, W_a in R^{C x (N/r1 + 1) C}.
        relation_dim = reduced if relation_dim is None else int(relation_dim)
        self.channels, self.num_positions, self.relation_dim = channels, num_positions, relation_dim
        self.relation = PairwiseRelation(channels, reduced, relation_dim)
        # W_a in R^{C x (C + N R)}: columns [:C] act on f_i, column block j of [C:] on r_{i,j}.
        self.attention_projection = nn.Linear(channels + num_positions * relation_dim, channels, bias=False)
        self.attention_norm = nn.BatchNorm1d(channels)
        self.chunk_size = int(chunk_size)
        self.use_checkpoint = bool(use_checkpoint)

    def _relation_weight(self) -> Tensor:
        return self.attention_projection.weight[:, self.channels :].reshape(self.channels, self.num_positions, self.relation_dim)

    def _relation_term_direct(self, features: Tensor) -> Tensor:
        relations = self.relation.direct(features, features)  # [B, N, N, R]
        return torch.einsum("bijr,cjr->bic", relations, self._relation_weight())

    def _relation_term_chunked(self, features: Tensor) -> Tensor:
        u, w = self.relation.embed(features, features)
        mean, variance = self.relation.pair_statistics(u, w)
        weight = self._relation_weight()
        relation = self.relation

        def chunk_term(u_chunk: Tensor, w_all: Tensor, mean_: Tensor, variance_: Tensor, weight_: Tensor) -> Tensor:
            vectors = relation.relation_vectors(u_chunk, w_all, mean_, variance_)  # [B, c, N, R]
            return torch.einsum("bijr,cjr->bic", vectors, weight_)

        pieces = []
        for start in range(0, u.shape[1], self.chunk_size):
            args = (u[:, start : start + self.chunk_size], w, mean, variance, weight)
            if self.use_checkpoint and torch.is_grad_enabled():
                pieces.append(checkpoint(chunk_term, *args, use_reentrant=False))
            else:
                pieces.append(chunk_term(*args))
        return torch.cat(pieces, dim=1)

    def attention(self, feature_map: Tensor) -> Tensor:
        """The attention map ``A`` [B, C, H, W] of eq. 5."""
        batch, channels, height, width = feature_map.shape
        if height * width != self.num_positions or channels != self.channels:
            raise ValueError(
                f"RGL was built for {self.channels} channels x {self.num_positions} positions (W_a is position-specific), "
                f"got a {channels} x {height} x {width} map; build the method with the image size it is fed"
            )
        features = feature_map.flatten(2).transpose(1, 2)  # [B, N, C]
        if self.chunk_size > 0:
            relation_term = self._relation_term_chunked(features)
        else:
            relation_term = self._relation_term_direct(features)
        logits = F.linear(features, self.attention_projection.weight[:, : self.channels]) + relation_term
        attention = torch.sigmoid(self.attention_norm(logits.reshape(-1, channels)).reshape(batch, -1, channels))
        return attention.transpose(1, 2).reshape(batch, channels, height, width)

    def forward(self, feature_map: Tensor) -> Tensor:
        return feature_map * self.attention(feature_map)


# =============================================================================================
# Table IV's replacements for RGL: CBAM [48] and RGA [3] (Non-Local [49] is the core's block)
# =============================================================================================


class ConvolutionalBlockAttention(nn.Module):
    """CBAM (Woo et al., ECCV 2018; ISANet Table IV "RGL -> CBAM"): channel, then spatial attention.

    Channel attention ``M_c(F) = Sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))`` with one MLP
    ``C -> C/r -> C`` (ReLU) shared by the two pooled descriptors (CBAM eq. 2), ``F' = M_c (.) F``;
    spatial attention ``M_s(F') = Sigmoid(f^{7x7}([AvgPool_c(F'); MaxPool_c(F')]))``, a 7x7
    convolution over the channel-wise average and max maps (CBAM eq. 3), ``F'' = M_s (.) F'``.
    Works on any map size (the convolution pads by ``k // 2``). ``r = 16`` and ``k = 7`` are
    CBAM's.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel_mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def channel_attention(self, feature_map: Tensor) -> Tensor:
        """``M_c`` [B, C, 1, 1]."""
        logits = self.channel_mlp(feature_map.mean(dim=(2, 3))) + self.channel_mlp(feature_map.amax(dim=(2, 3)))
        return torch.sigmoid(logits)[:, :, None, None]

    def spatial_attention(self, feature_map: Tensor) -> Tensor:
        """``M_s`` [B, 1, H, W]."""
        pooled = torch.cat([feature_map.mean(dim=1, keepdim=True), feature_map.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial_conv(pooled))

    def attention(self, feature_map: Tensor) -> Tensor:
        """The effective multiplier ``M_c (.) M_s(M_c (.) F)`` [B, C, H, W]: ``forward(F) = F (.) attention(F)``."""
        channel = self.channel_attention(feature_map)
        return channel * self.spatial_attention(feature_map * channel)

    def forward(self, feature_map: Tensor) -> Tensor:
        return feature_map * self.attention(feature_map)


def _embedding(in_dim: int, out_dim: int) -> nn.Module:
    """A 1x1 convolution without bias, batch norm, ReLU, on ``[B, N, in]`` rows (RGA's embedding functions)."""
    return _RowSequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))


class _RowSequential(nn.Sequential):
    """``nn.Sequential`` over ``[..., D]`` rows: batch norms see the rows flattened (a 1x1 conv's BN2d)."""

    def forward(self, rows: Tensor) -> Tensor:  # type: ignore[override]
        shape = rows.shape
        out = rows.reshape(-1, shape[-1])
        for module in self:
            out = module(out)
        return out.reshape(*shape[:-1], out.shape[-1])


class RelationAwareSpatialAttention(nn.Module):
    """RGA-S (Zhang et al., CVPR 2020, "Relation-aware global attention"; ISANet Table IV "RGL -> RGA").

    For the ``N`` positions ``x_i`` of the map: pairwise relations ``r_{i,j} = theta(x_i)^T phi(x_j)``
    (``theta``, ``phi``: 1x1 conv + BN + ReLU to ``C/s1``); position ``i``'s relation feature is its
    row and column of the relation matrix, ``[r_{i,:}, r_{:,i}]`` in ``R^{2N}``, embedded by a 1x1
    conv + BN + ReLU to ``N/s1``; the original feature is embedded the same way to ``C/s1`` and
    averaged over channels to one value; the two are concatenated (``1 + N/s1``) and scored by
    1x1 conv (to ``(1 + N/s1)/s2``) + BN + ReLU, 1x1 conv (to 1) + BN, and a sigmoid: one weight
    per position, shared by all channels. Like RGL the relation feature is position-specific, so
    the module is built for one map size. ``s1 = s2 = 8`` as in RGA.
    """

    def __init__(self, channels: int, num_positions: int, channel_reduction: int = 8, spatial_reduction: int = 8, score_reduction: int = 8) -> None:
        super().__init__()
        self.channels, self.num_positions = channels, num_positions
        inter_channels = max(1, channels // channel_reduction)
        inter_positions = max(1, num_positions // spatial_reduction)
        self.theta = _embedding(channels, inter_channels)
        self.phi = _embedding(channels, inter_channels)
        self.feature_embedding = _embedding(channels, inter_channels)
        self.relation_embedding = _embedding(2 * num_positions, inter_positions)
        hidden = max(1, (1 + inter_positions) // score_reduction)
        self.score = _RowSequential(
            nn.Linear(1 + inter_positions, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 1, bias=False),
            nn.BatchNorm1d(1),
        )

    def attention(self, feature_map: Tensor) -> Tensor:
        """Spatial weights ``[B, 1, H, W]`` in (0, 1)."""
        batch, channels, height, width = feature_map.shape
        if height * width != self.num_positions or channels != self.channels:
            raise ValueError(
                f"RGA was built for {self.channels} channels x {self.num_positions} positions (its relation embedding is "
                f"position-specific), got a {channels} x {height} x {width} map; build the method with the image size it is fed"
            )
        positions = feature_map.flatten(2).transpose(1, 2)  # [B, N, C]
        relations = self.theta(positions) @ self.phi(positions).transpose(1, 2)  # [B, N, N]: r_{i,j}
        relation_feature = torch.cat([relations, relations.transpose(1, 2)], dim=-1)  # [B, N, 2N]: [r_{i,:}, r_{:,i}]
        embedded = torch.cat(
            [self.feature_embedding(positions).mean(dim=-1, keepdim=True), self.relation_embedding(relation_feature)], dim=-1
        )
        weights = torch.sigmoid(self.score(embedded))  # [B, N, 1]
        return weights.transpose(1, 2).reshape(batch, 1, height, width)

    def forward(self, feature_map: Tensor) -> Tensor:
        return feature_map * self.attention(feature_map)


# =============================================================================================
# Channel attention filtration, eqs. 6-8
# =============================================================================================


class ChannelAttentionFiltration(nn.Module):
    """CAF (eqs. 6-8, Fig. 4): instance norm, then restitution of identity-relevant removed information.

    ``F~_IN = IN(F~)`` with affine ``gamma, beta`` (eq. 6); ``R = F~ - F~_IN`` (eq. 7);
    ``w_C = SE(R)`` squeeze-and-excitation channel weights (as in [37]); ``F^ = F~_IN + w_C (.) R + F~``
    (eq. 8). ``mode="instance_norm"`` returns ``F~_IN`` (Table IV "CAF -> IN").
    """

    def __init__(self, channels: int, se_reduction: int = 16, mode: str = "caf") -> None:
        super().__init__()
        if mode not in ("caf", "instance_norm"):
            raise ValueError(f"CAF mode must be caf or instance_norm, got {mode!r}")
        self.mode = mode
        self.instance_norm = nn.InstanceNorm2d(channels, affine=True)
        self.channel_attention = SqueezeExcitation(channels, se_reduction) if mode == "caf" else None

    def forward(self, feature_map: Tensor) -> Tensor:
        normalized = self.instance_norm(feature_map)  # eq. 6
        if self.channel_attention is None:
            return normalized
        removed = feature_map - normalized  # eq. 7
        weights = self.channel_attention(removed)  # w_C [B, C, 1, 1]
        return normalized + weights * removed + feature_map  # eq. 8


# =============================================================================================
# Implicit local alignment, eqs. 9-14
# =============================================================================================


class ImplicitLocalAlignment(nn.Module):
    """ILA (eqs. 9-14): aggregate positions / words onto K learnable topic centres shared by both modalities.

    ``Z = W_s Normalize(X)`` (eqs. 9, 12; ``W_s`` shared), soft assignment of every ``z_i`` to
    every centre ``c_j`` (eqs. 10, 13), ``v_j = sum_i a_{i,j} (.) z_i`` (eqs. 11, 14).
    Assignments (Table V):

    * ``relation``: ``a_{i,j} = r(z_i, c_j) = ReLU(BN(W^l (z_theta_i - c_phi_j)))``, the relation
      function of eq. 2 with ``W^l in R^{d_c x d_c/r3}`` (a ``d_c``-vector per pair), used as printed
      in eq. 10: no softmax over the centres. (A softmax over K of these rectified, unit-variance
      relation vectors is nearly flat: channel means 0.145-0.186 around 1/6 at K = 6 at
      initialisation on the synthetic benchmark, every entry positive; as printed, half of the
      entries are exact zeros of the ReLU, so each channel of a position feeds only some topics.)
      The centres go through the batch norm with their own statistics in training and at test
      alike (``PairwiseRelation(fixed_y=True)``);
    * ``inner_product``: ``a_{i,j} = softmax_j(z_i . c_j)`` (a scalar per pair; Table V "ILA (IP)"
      gives no formula, the softmax makes it a soft assignment as NetVLAD's);
    * ``netvlad``: ``a_{i,j} = softmax_j(w_j . z_i + b_j)`` and ``v_j = sum_i a_{i,j} (z_i - c_j)``.

    Masked positions (padding words) get zero assignment.
    """

    def __init__(self, channels: int, dim: int, num_centres: int = 6, reduction: int = 4, assignment: str = "relation") -> None:
        super().__init__()
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"ILA assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        if num_centres < 1:
            raise ValueError(f"the number of topic centres must be >= 1, got {num_centres}")
        self.assignment = assignment
        self.num_centres = num_centres
        self.projection = nn.Linear(channels, dim)  # W_s, a 1x1 convolution
        self.centres = nn.Parameter(torch.randn(num_centres, dim) / math.sqrt(dim))  # c_1..c_K
        self.relation = (
            PairwiseRelation(dim, max(1, dim // reduction), dim, groups=("image", "text"), fixed_y=True)
            if assignment == "relation"
            else None
        )
        self.netvlad_logits = nn.Linear(dim, num_centres) if assignment == "netvlad" else None

    def project(self, features: Tensor) -> Tensor:
        """``Z = W_s Normalize(X)`` for ``[B, N, C]`` features (eqs. 9, 12)."""
        return self.projection(F.normalize(features, dim=-1))

    def soft_assignment(self, projected: Tensor, modality: str, mask: Tensor | None = None) -> Tensor:
        """``[B, N, K, d_c]`` (relation: eq. 10's rectified relation vectors, not normalised over K)
        or ``[B, N, K, 1]`` (inner product, NetVLAD: a softmax over K) assignments; 0 where masked."""
        if self.num_centres == 1:
            # K = 1 is "a global one" (Fig. 5): every position fully assigned. The relation is
            # skipped: a batch norm over a single centre is undefined (zero variance).
            assignment = projected.new_ones(*projected.shape[:2], 1, 1)
        elif self.assignment == "relation":
            u, w = self.relation.embed(projected, self.centres, modality, mask)
            mean, variance = self.relation.pair_statistics(u, w, modality, mask)
            assignment = self.relation.relation_vectors(u, w, mean, variance, modality)  # [B, N, K, d_c], eq. 10
        elif self.assignment == "inner_product":
            assignment = torch.softmax((projected @ self.centres.t()).unsqueeze(-1), dim=2)
        else:
            assignment = torch.softmax(self.netvlad_logits(projected).unsqueeze(-1), dim=2)
        if mask is not None:
            assignment = assignment * mask.to(assignment.dtype)[:, :, None, None]
        return assignment

    def forward(self, features: Tensor, modality: str, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(local features [B, K, d_c], assignment)`` for ``[B, N, C]`` features of one modality."""
        projected = self.project(features)
        assignment = self.soft_assignment(projected, modality, mask)
        if self.assignment == "netvlad":
            residuals = projected.unsqueeze(2) - self.centres  # [B, N, K, d_c]
            return (assignment * residuals).sum(dim=1), assignment
        return (assignment * projected.unsqueeze(2)).sum(dim=1), assignment


# =============================================================================================
# Weak supervision: another caption of the same identity (eq. 18)
# =============================================================================================


def same_identity_partners(person_ids: Tensor, captions: Sequence[str], image_ids: Tensor | None = None) -> Tensor:
    """``partner[i]`` = index of another caption of the same person in the batch, or -1.

    Candidates are samples ``j != i`` with the same person id and a different caption text
    (whitespace- and case-insensitive: a duplicate caption is no new supervision). With
    ``image_ids`` (when the batch carries them) a caption of another image is preferred, as the
    paper's "text of another image with the same identity"; otherwise the partner may be the
    second caption of the same image. Among candidates the first after ``i`` in cyclic batch order
    is taken, so the choice is deterministic and spreads over a P x K identity group.
    """
    ids = person_ids.tolist()
    images = image_ids.tolist() if image_ids is not None else None
    normalized = [" ".join(caption.lower().split()) for caption in captions]
    size = len(ids)
    partners = []
    for i in range(size):
        candidates = [
            (i + step) % size
            for step in range(1, size)
            if ids[(i + step) % size] == ids[i] and normalized[(i + step) % size] != normalized[i]
        ]
        if images is not None:
            other_image = [j for j in candidates if images[j] != images[i]]
            candidates = other_image or candidates
        partners.append(candidates[0] if candidates else -1)
    return torch.tensor(partners, dtype=torch.long, device=person_ids.device)


def adaptive_weak_margins(similarity: Tensor, partners: Tensor, margin: float) -> Tensor:
    """SSAN's adaptive margin ``alpha_2`` of eq. 18, one per sample: ``(1 + min(lambda, 1)) alpha_1 / 2``.

    ``lambda_i = |S(v_i, t_bar_i)| / |S(v_i, t_i)|`` (detached): the closer the other caption of the
    same person scores to the matched one, the closer ``alpha_2`` gets to ``alpha_1``; a partner
    caption that scores far lower (a vaguer or different description) gets a margin down to
    ``alpha_1 / 2``. ``similarity[i, j] = S(v_i, t_j)``, ``t_bar_i = t_{partners[i]}``; samples
    without a partner get ``alpha_1 / 2`` (their value is never used).
    """
    with torch.no_grad():
        matched = similarity.diagonal().abs()
        partner = similarity.gather(1, partners.clamp(min=0).unsqueeze(1)).squeeze(1).abs()
        ratio = (partner / matched.clamp(min=1e-8)).clamp(max=1.0)
        ratio = torch.where(partners >= 0, ratio, torch.zeros_like(ratio))
        return (1.0 + ratio) * margin / 2.0


def weak_supervision_ranking_loss(
    similarity: Tensor,
    partners: Tensor,
    labels: Tensor,
    margin: float | Tensor,
    sampling: NegativeSampling = "hardest",
    reduction: Reduction = "mean",
    min_margin: float | None = None,
) -> Tensor:
    """The two weak-supervision terms of eq. 18 (before ``lambda_1``).

    ``similarity[i, j] = S(v_i, t_j)``; ``t_bar_i = t_{partners[i]}``. For anchor ``i``:
    ``[a2 - S(v_i, t_bar_i) + S(v_i, t_n)]_+`` over texts ``t_n`` of other identities (term 3), and
    ``[a2 - S(v_i, t_bar_i) + S(v_n, t_bar_i)]_+`` over images ``v_n`` of other identities (term 4),
    each with the negative ``sampling`` of :func:`tbps.losses.triplet_ranking_loss` (term 3 draws
    first). ``margin`` is ``a2``: a number, or one per sample (:func:`adaptive_weak_margins`).

    Anchors are the samples with a partner and, when ``min_margin`` is given, with
    ``margin >= min_margin`` (SSAN skips adaptive-margin anchors below 0.16 = 0.8 alpha_1: a
    partner caption scoring under 60 % of the matched one is no supervision). ``reduction``:
    ``"sum"`` over the anchors (SSAN), or ``"mean"`` over them. 0 when there is no anchor.
    """
    margins = torch.as_tensor(margin, dtype=similarity.dtype, device=similarity.device)
    margins = margins.expand(similarity.shape[0]) if margins.dim() == 0 else margins
    keep = partners >= 0
    if min_margin is not None:
        keep = keep & (margins >= min_margin)
    anchors = keep.nonzero(as_tuple=True)[0]
    if anchors.numel() == 0:
        return similarity.sum() * 0.0
    partner = partners[anchors]
    anchor_margins = margins[anchors]
    positive = similarity[anchors, partner]  # S(v_p, t_bar_p)
    negatives = ~identity_mask(labels[anchors], labels)  # [A, B]
    image_anchor = triplet_ranking_loss(positive, similarity[anchors], anchor_margins, negatives, sampling, reduction)  # term 3
    partner_anchor = triplet_ranking_loss(
        positive, similarity[:, partner].t(), anchor_margins, negatives, sampling, reduction
    )  # term 4
    return image_anchor + partner_anchor


def cosine_matrix(rows: Tensor, columns: Tensor) -> Tensor:
    return F.normalize(rows, dim=-1) @ F.normalize(columns, dim=-1).t()


def retrieval_vector(features: Mapping[str, Tensor]) -> Tensor:
    """``[g/|g|, l/|l|]``: its inner product between a caption and an image is ``S = S_g + S_l``."""
    parts = [F.normalize(features["global"].float(), dim=-1)]
    if "local" in features:
        parts.append(F.normalize(features["local"].float(), dim=-1))
    return torch.cat(parts, dim=-1)


def _identity_neck(kind: str, dim: int) -> nn.Module:
    """The normalisation before an identity classifier shared by images and captions.

    ``layernorm``: each vector to zero mean and unit variance over its entries (a norm of
    ``sqrt(dim)`` before the affine), whatever its modality; ``batchnorm``: the BNNeck of re-id
    (Luo et al. 2019), batch statistics of the call, i.e. of one modality at a time in training.
    """
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "batchnorm":
        return nn.BatchNorm1d(dim)
    return nn.Identity()


def _topic_shares(assignment: Tensor) -> Tensor:
    """``[B, N, K]``: the channel mean of an assignment ``[B, N, K, D]``, divided by its sum over K.

    For drawing only. Eq. 10's relation assignment is not normalised over the centres (softmax
    modes are already), so the shares say which topic takes a position; 0 where none does.
    """
    weights = assignment.mean(dim=-1)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp(min=1e-12), torch.zeros_like(weights))


def _masked_max(tokens: Tensor, mask: Tensor) -> Tensor:
    return tokens.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(dim=1)


# =============================================================================================
# The method
# =============================================================================================


@register_method("isanet")
class ISANet(PersonSearchMethod):
    description = "ISANet: relation-guided localization, channel attention filtration, implicit local alignment on shared topic centres"
    has_fine_similarity = True  # S_global + S_local (still per-item vectors: see retrieval_vector)

    def __init__(self, config: Any, num_classes: int, image_size: tuple[int, int] | None = None) -> None:
        super().__init__(config, num_classes, image_size)
        self.global_dim = int(option(config, "global_dim", 2048))  # d_g
        self.local_dim = int(option(config, "local_dim", 512))  # d_c
        self.max_text_length = int(option(config, "max_text_length", 100))  # L
        vocabulary_size = option(config, "vocabulary_size", None)  # V (None: every word over min_count)
        self.vocabulary_size = int(vocabulary_size) if vocabulary_size else None
        self.use_global_alignment = bool(option(config, "global_alignment", True))
        self.use_local_alignment = bool(option(config, "local_alignment", True))
        rgl_config, caf_config, ila_config = (option(config, key, {}) or {} for key in ("rgl", "caf", "ila"))
        self.rgl_mode = str(option(rgl_config, "mode", "relation"))
        self.caf_mode = str(option(caf_config, "mode", "caf"))
        if self.rgl_mode not in RGL_MODES:
            raise ValueError(f"model.rgl.mode must be one of {RGL_MODES}, got {self.rgl_mode!r}")
        if self.caf_mode not in CAF_MODES:
            raise ValueError(f"model.caf.mode must be one of {CAF_MODES}, got {self.caf_mode!r}")
        self.feature_norm = str(option(config, "feature_norm", "layernorm"))
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"model.feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        losses = option(config, "losses", {}) or {}
        if option(losses, "weak_margin", None) is not None:
            raise ValueError(
                "model.losses.weak_margin is no longer read: alpha_2 is SSAN's adaptive margin (1 + min(lambda, 1)) alpha_1 / 2 "
                "from model.losses.weak_margin_start_epoch on, alpha_1 / 2 before (set the start epoch to null to keep alpha_1 / 2)"
            )
        self.id_weight = float(option(losses, "id", 1.0))
        self.rank_weight = float(option(losses, "rank", 1.0))
        self.weak_weight = float(option(losses, "weak", 0.1))  # lambda_1
        self.consistency_weight = float(option(losses, "consistency", 1.0))  # lambda_2
        self.rank_margin = float(option(losses, "rank_margin", 0.2))  # alpha_1
        self.consistency_margin = float(option(losses, "consistency_margin", 0.2))  # alpha_3
        self.consistency_features = str(option(losses, "consistency_features", "global"))
        if self.consistency_features not in CONSISTENCY_FEATURES:
            raise ValueError(
                f"model.losses.consistency_features must be one of {CONSISTENCY_FEATURES}, got {self.consistency_features!r}"
            )
        # eq. 18 after SSAN (zifyloo/SSAN, src/loss/RankingLoss.py): one random semi-hard negative
        # per anchor, hinges summed over the anchors; alpha_2 adaptive from epoch 5 on (SSAN's
        # epoch_begin), alpha_1 / 2 before; adaptive anchors with alpha_2 < 0.16 skipped.
        self.negative_sampling = str(option(losses, "negative_sampling", "semi-hard-random"))
        self.reduction = str(option(losses, "reduction", "sum"))
        if self.negative_sampling not in NEGATIVE_SAMPLINGS:
            raise ValueError(f"model.losses.negative_sampling must be one of {NEGATIVE_SAMPLINGS}, got {self.negative_sampling!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"model.losses.reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        start = option(losses, "weak_margin_start_epoch", 5)
        self.weak_margin_start_epoch = None if start is None else int(start)
        self.weak_min_margin = float(option(losses, "weak_min_margin", 0.16))
        if self.weak_min_margin > self.rank_margin:
            raise ValueError(
                f"model.losses.weak_min_margin ({self.weak_min_margin}) above rank_margin ({self.rank_margin}) would skip every "
                "adaptive weak-supervision anchor (alpha_2 <= alpha_1)"
            )
        self.register_buffer("current_epoch", torch.zeros((), dtype=torch.long))

        # ---- encoders
        self.image_backbone = create_image_backbone(option(config, "image_backbone"), image_size=image_size)
        self.text_backbone = create_text_backbone(option(config, "text_backbone"))
        if self.vocabulary_size and not self.text_backbone.builds_vocabulary:
            raise ValueError(
                f"model.vocabulary_size ({self.vocabulary_size}) caps a vocabulary built from the training captions; "
                f"the {option(config, 'text_backbone').get('name')!r} text encoder has a fixed one: set it to null"
            )
        channels = self.image_backbone.out_channels
        self.channels = channels
        text_width = self.text_backbone.hidden_size
        self.text_to_channels = nn.Identity() if text_width == channels else nn.Linear(text_width, channels)
        self.feature_map_size = self._feature_map_size(image_size)

        # ---- image-specific information suppression (RGL, or Table IV's replacements)
        num_positions = self.feature_map_size[0] * self.feature_map_size[1]
        if self.rgl_mode == "relation":
            relation_dim = option(rgl_config, "relation_dim", None)
            relation_reduction = option(rgl_config, "relation_reduction", None)
            if relation_dim is not None and relation_reduction is not None:
                raise ValueError("give model.rgl.relation_dim or model.rgl.relation_reduction, not both")
            if relation_reduction is not None:  # eq. 2's r2 read as a divider of C (smaller W_a), not the paper's eqs. 3/5
                relation_dim = max(1, channels // int(relation_reduction))
            self.localization: nn.Module = RelationGuidedLocalization(
                channels,
                num_positions,
                int(option(rgl_config, "theta_reduction", 32)),  # r1
                None if relation_dim is None else int(relation_dim),  # None: C / r1 (eqs. 3, 5)
                chunk_size=int(option(rgl_config, "chunk_size", 32)),
                use_checkpoint=bool(option(rgl_config, "checkpoint", True)),
            )
        elif self.rgl_mode == "cbam":
            self.localization = ConvolutionalBlockAttention(channels)
        elif self.rgl_mode == "rga":
            self.localization = RelationAwareSpatialAttention(channels, num_positions)
        elif self.rgl_mode == "non_local":
            self.localization = NonLocalBlock2d(channels)
        else:
            self.localization = nn.Identity()
        if self.caf_mode == "none":
            self.filtration: nn.Module = nn.Identity()
        else:
            self.filtration = ChannelAttentionFiltration(channels, int(option(caf_config, "se_reduction", 16)), self.caf_mode)

        # ---- global alignment (eqs. 15-16) or the baseline's shared projection (Table III: the
        # Baseline row is global_alignment and local_alignment off, rgl and caf none)
        if self.use_global_alignment:
            self.image_global = nn.Linear(channels, self.global_dim)  # W_g^image, a 1x1 conv before GMP
            self.text_global = nn.Linear(channels, self.global_dim)  # W_g^text, after GMP
        else:
            self.shared_global = nn.Linear(channels, self.global_dim)
        # ---- implicit local alignment (eqs. 9-14)
        self.num_centres = int(option(ila_config, "num_centres", 6))
        self.local_alignment = (
            ImplicitLocalAlignment(
                channels,
                self.local_dim,
                self.num_centres,
                int(option(ila_config, "reduction", 4)),  # r3
                str(option(ila_config, "assignment", "relation")),
            )
            if self.use_local_alignment
            else None
        )
        # ---- identity classifiers (eq. 17): one for the global feature, one per topic; each
        # shared by images and captions so both modalities are pulled to the same class centres.
        # A normalising neck before each (feature_norm): the image global vector (FC, then max over
        # the map's positions) enters at norm 22.7, the caption's (max over Bi-LSTM states, then FC)
        # at 1.2 on the synthetic benchmark at initialisation, so one un-normalised classifier would
        # fit the images and give the captions near-uniform logits. The retrieval features and
        # the ranking losses (cosine) are unchanged: the neck is only on the classifier's input.
        classes = max(self.num_classes, 1)
        self.global_identity = IdentityLoss(self.global_dim, classes)
        self.global_identity_norm = _identity_neck(self.feature_norm, self.global_dim)
        self.local_identity = (
            nn.ModuleList([IdentityLoss(self.local_dim, classes) for _ in range(self.num_centres)]) if self.use_local_alignment else None
        )
        self.local_identity_norm = (
            nn.ModuleList([_identity_neck(self.feature_norm, self.local_dim) for _ in range(self.num_centres)])
            if self.use_local_alignment
            else None
        )

    def _feature_map_size(self, image_size: tuple[int, int] | None) -> tuple[int, int]:
        """Height and width of the backbone's last map for this image size (one dummy forward)."""
        height, width = tuple(image_size) if image_size is not None else (384, 128)
        was_training = self.image_backbone.training
        self.image_backbone.eval()
        with torch.no_grad():
            feature_map = self.image_backbone(torch.zeros(1, 3, height, width)).feature_maps[-1]
        self.image_backbone.train(was_training)
        return int(feature_map.shape[2]), int(feature_map.shape[3])

    # ------------------------------------------------------------------ text input
    def fit_text(self, captions: Sequence[str]) -> None:
        # The paper keeps words seen more than twice, capped at V (5,000 / 3,000).
        self.text_backbone.fit(captions, max_vocabulary=self.vocabulary_size)

    def build_text_processor(self) -> TextProcessor:
        return self.text_backbone.build_processor(self.max_text_length)

    # ------------------------------------------------------------------ image branch
    def image_maps(self, images: Tensor) -> dict[str, Tensor]:
        """``F`` (backbone), ``F~`` (after RGL) and ``F^`` (after CAF), each ``[B, C, H, W]``."""
        backbone_map = self.image_backbone(images).feature_maps[-1]
        localized = self.localization(backbone_map)
        return {"backbone": backbone_map, "localized": localized, "filtered": self.filtration(localized)}

    def _image_global_feature(self, feature_map: Tensor) -> Tensor:
        """The global image feature of a ``[B, C, H, W]`` map: eq. 15 (FC, then GMP), or the baseline's GMP then shared FC."""
        positions = feature_map.flatten(2).transpose(1, 2)  # [B, N, C]
        if self.use_global_alignment:
            return self.image_global(positions).amax(dim=1)  # eq. 15: FC, then GMP
        return self.shared_global(positions.amax(dim=1))

    def _image_features(self, filtered: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        positions = filtered.flatten(2).transpose(1, 2)  # [B, N, C]
        global_feature = self._image_global_feature(filtered)
        if self.local_alignment is None:
            return global_feature, None, None
        local, assignment = self.local_alignment(positions, "image")
        return global_feature, local, assignment

    def encode_image(self, images: Tensor) -> Features:
        global_feature, local, _ = self._image_features(self.image_maps(images)["filtered"])
        features = {"global": global_feature}
        if local is not None:
            features["local"] = local.flatten(1)  # v^l in R^{K d_c}: the K topics concatenated
        return features

    # ------------------------------------------------------------------ text branch
    def text_tokens(self, text: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``E^`` as ``[B, L, C]`` word features and their mask."""
        output = self.text_backbone(text)
        return self.text_to_channels(output.tokens), output.mask

    def _text_features(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        pooled = _masked_max(tokens, mask)  # GMP over real words (padding is not a word)
        global_feature = self.text_global(pooled) if self.use_global_alignment else self.shared_global(pooled)  # eq. 16
        if self.local_alignment is None:
            return global_feature, None, None
        local, assignment = self.local_alignment(tokens, "text", mask)
        return global_feature, local, assignment

    def encode_text(self, text: Mapping[str, Tensor]) -> Features:
        global_feature, local, _ = self._text_features(*self.text_tokens(text))
        features = {"global": global_feature}
        if local is not None:
            features["local"] = local.flatten(1)
        return features

    # ------------------------------------------------------------------ visualisation
    @torch.no_grad()
    def explain_image(self, images: Tensor) -> dict[str, Tensor]:
        """What to draw over an image: the RGL attention (channel mean of ``A``, [B, H, W]; that of
        CBAM / RGA in their modes; ones without one) and each topic centre's share of every position
        ([B, K, H, W]: the channel mean of the assignment, divided by its sum over the K centres)."""
        maps = self.image_maps(images)
        backbone_map = maps["backbone"]
        batch, _, height, width = backbone_map.shape
        if hasattr(self.localization, "attention"):  # RGL, CBAM, RGA: F~ = F (.) attention(F)
            attention = self.localization.attention(backbone_map).mean(dim=1)
        else:  # Non-Local (additive) or none
            attention = backbone_map.new_ones(batch, height, width)
        result = {"rgl_attention": attention}
        if self.local_alignment is not None:
            _, _, assignment = self._image_features(maps["filtered"])
            result["topic_assignment"] = _topic_shares(assignment).transpose(1, 2).reshape(batch, -1, height, width)
        return result

    @torch.no_grad()
    def explain_text(self, text: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each topic centre's share of every word, ``[B, K, L]`` (as :meth:`explain_image`; 0 on padding)."""
        tokens, mask = self.text_tokens(text)
        if self.local_alignment is None:
            return {}
        _, _, assignment = self._text_features(tokens, mask)
        return {"topic_assignment": _topic_shares(assignment).transpose(1, 2)}

    def _explain_pair(
        self, image: Tensor, texts: Sequence[str], processor: TextProcessor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """:meth:`explain_image` of one image ``[3, H, W]`` (batch of 1), ``processor``'s output
        for ``texts`` and their :meth:`explain_text`, in eval mode (the caller's mode restored)."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            with torch.no_grad():
                image_result = self.explain_image(image.unsqueeze(0).to(device))
                text_batch = {k: v.to(device) for k, v in processor(list(texts)).items()}
                text_result = self.explain_text(text_batch)
        finally:
            self.train(was_training)
        return image_result, text_batch, text_result

    def explain(self, image: Tensor, text: str) -> tuple[list[str], Tensor] | None:
        """Where each noun phrase of ``text`` lands, through the shared topic centres of ILA:
        a phrase's words give weights over the K topics (eq. 10 assignments, averaged over its
        words), and the phrase map is the topic maps of the image mixed by those weights, times
        the RGL attention. Maps are [phrases x H x W] on the feature-map grid."""
        if self.local_alignment is None:
            return None
        from tbps.text.phrases import NounPhraseExtractor

        phrases = [text, *[p for p in NounPhraseExtractor().extract(text, max_phrases=6) if p != text]]
        image_result, _, text_result = self._explain_pair(image, phrases, self.build_text_processor())
        topic_weights = text_result["topic_assignment"].sum(dim=-1)  # [P, K]
        topic_weights = topic_weights / topic_weights.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        maps = torch.einsum("pk,khw->phw", topic_weights, image_result["topic_assignment"][0])
        return phrases, (maps * image_result["rgl_attention"][0]).float().cpu()

    def visualize(self, image: Tensor, text: str, top_words: int = 3) -> dict[str, tuple[list[str], Tensor]] | None:
        """The RGL attention ``A`` over the image (eq. 5, channel mean: low on suppressed
        background) and each topic centre's soft assignment over the image positions (eq. 10),
        labelled with the caption's words assigned to it most (eq. 13) and their weights."""
        with_rgl = hasattr(self.localization, "attention")
        if self.local_alignment is None and not with_rgl:
            return None
        processor = self.build_text_processor()
        image_result, text_batch, text_result = self._explain_pair(image, [text], processor)
        rows = {}
        if with_rgl:
            title = {"relation": "RGL", "cbam": "CBAM", "rga": "RGA"}[self.rgl_mode] + " attention"
            rows[title] = ([f"{title} (channel mean)"], image_result["rgl_attention"].float().cpu())
        if self.local_alignment is not None:
            from tbps.text.tokenizers import WordPieceTokenizer, token_strings

            words = token_strings(text, text_batch["input_ids"][0], processor if isinstance(processor, WordPieceTokenizer) else None)
            word_topics = text_result["topic_assignment"][0].float().cpu()  # [K, L]
            labels = []
            for k, weights in enumerate(word_topics):
                best: dict[str, float] = {}  # each word once, at its largest weight; punctuation left out
                for word, weight in zip(words, weights.tolist()):
                    if any(ch.isalnum() for ch in word):
                        best[word] = max(weight, best.get(word, 0.0))
                ranked = sorted(best.items(), key=lambda item: -item[1])[:top_words]
                labels.append(f"topic {k + 1}: " + ", ".join(f"{word} {weight:.2f}" for word, weight in ranked))
            rows["topic centres (image)"] = (labels, image_result["topic_assignment"][0].float().cpu())
        return rows

    # ------------------------------------------------------------------ losses, eqs. 17-21
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        labels = batch["labels"]
        maps = self.image_maps(batch["images"])
        image_global, image_local, _ = self._image_features(maps["filtered"])
        text_global, text_local, _ = self._text_features(*self.text_tokens(batch["text"]))
        person_ids = batch.get("person_ids", labels)
        partners = same_identity_partners(person_ids, batch["captions"], batch.get("image_ids"))
        same_identity = identity_mask(labels)

        losses: dict[str, Tensor] = {}
        if self.id_weight:
            # eq. 17: L_id = L_id^g + sum_k L_id^{l_k}, each on the image and the caption feature,
            # through the normalising neck (feature_norm), one call per modality.
            neck = self.global_identity_norm
            losses["id_global"] = self.id_weight * (
                self.global_identity(neck(image_global), labels) + self.global_identity(neck(text_global), labels)
            )
            if image_local is not None:
                losses["id_local"] = self.id_weight * sum(
                    classifier(neck(image_local[:, k]), labels) + classifier(neck(text_local[:, k]), labels)
                    for k, (classifier, neck) in enumerate(zip(self.local_identity, self.local_identity_norm))
                )
        # eqs. 18-19, for z = g and z = l (the concatenated topics), after SSAN's CRLoss.
        scales = [("global", image_global, text_global)]
        if image_local is not None:
            scales.append(("local", image_local.flatten(1), text_local.flatten(1)))
        for name, image_feature, text_feature in scales:
            similarity = cosine_matrix(image_feature, text_feature)  # S[i, j] = S(v_i, t_j)
            if self.rank_weight:
                losses[f"rank_{name}"] = self.rank_weight * bidirectional_ranking_loss(
                    similarity, same_identity, self.rank_margin, self.negative_sampling, self.reduction
                )
            if self.rank_weight and self.weak_weight:
                if self.weak_margin_adaptive():
                    weak_margin: float | Tensor = adaptive_weak_margins(similarity, partners, self.rank_margin)
                    min_margin: float | None = self.weak_min_margin
                else:
                    weak_margin, min_margin = self.rank_margin / 2.0, None
                losses[f"rank_{name}_weak"] = (
                    self.rank_weight
                    * self.weak_weight
                    * weak_supervision_ranking_loss(
                        similarity, partners, labels, weak_margin, self.negative_sampling, self.reduction, min_margin
                    )
                )
        # eq. 20: hardest in-batch negatives of another identity, both directions, on the image's
        # global feature computed from F~ and from F^ (consistency_features: global), or on
        # f~ = GAP(F~), f^ = GAP(F^) as printed (gap), where the hinge cannot open: see the module docstring.
        if self.consistency_weight and self.caf_mode == "caf":
            if self.consistency_features == "global":
                before, after = self._image_global_feature(maps["localized"]), image_global
            else:
                before, after = maps["localized"].mean(dim=(2, 3)), maps["filtered"].mean(dim=(2, 3))
            losses["consistency"] = self.consistency_weight * bidirectional_ranking_loss(
                cosine_matrix(before, after), same_identity, self.consistency_margin, "hardest", self.reduction
            )
        return losses

    # ------------------------------------------------------------------ schedule
    def set_epoch(self, epoch: int) -> None:
        """Tell the method the training epoch (SSAN's adaptive alpha_2 starts at ``weak_margin_start_epoch``)."""
        self.current_epoch.fill_(int(epoch))

    def weak_margin_adaptive(self, epoch: int | None = None) -> bool:
        """Whether eq. 18's alpha_2 is the adaptive margin at ``epoch`` (default: the current one)."""
        epoch = int(self.current_epoch) if epoch is None else int(epoch)
        return self.weak_margin_start_epoch is not None and epoch >= self.weak_margin_start_epoch

    # ------------------------------------------------------------------ test similarity
    def similarity(self, text_features: Mapping[str, Tensor], image_features: Mapping[str, Tensor]) -> Tensor:
        """``S = S_global + S_local`` by cosine, ``[texts x images]`` (S_global alone without ILA)."""
        score = self.global_similarity(text_features, image_features)
        if "local" in text_features and "local" in image_features:
            score = score + cosine_matrix(text_features["local"].float(), image_features["local"].float())
        return score

    def score_candidates(
        self, text_features: Mapping[str, Tensor], image_features: Mapping[str, Tensor], candidates: Tensor
    ) -> Tensor:
        """``S`` of text ``t`` with each of ``candidates[t]``, ``[texts x k]``, batched (no loop)."""
        keys = ["global"] + (["local"] if "local" in text_features and "local" in image_features else [])
        score = None
        for key in keys:
            text = F.normalize(text_features[key].float(), dim=-1)
            image = F.normalize(image_features[key].float(), dim=-1)[candidates]  # [T, k, D]
            part = torch.einsum("td,tkd->tk", text, image)
            score = part if score is None else score + part
        return score


__all__ = [
    "ChannelAttentionFiltration",
    "ISANet",
    "ImplicitLocalAlignment",
    "PairwiseRelation",
    "RelationGuidedLocalization",
    "pair_difference_statistics",
    "retrieval_vector",
    "same_identity_partners",
    "weak_supervision_ranking_loss",
]
