"""ISANet (Yan et al. 2022): RGL (eqs. 2-5), CAF (eqs. 6-8), ILA (eqs. 9-14), GA (eqs. 15-16),
losses (eqs. 17-21), weak-supervision pairing, similarity / two-stage scoring, ablation switches.

Tiny randomly initialised models (EfficientNet-Lite0 with ``pretrained: false`` at 64x64, a small
Bi-LSTM), data made here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tbps.methods.isanet import (
    ChannelAttentionFiltration,
    ConvolutionalBlockAttention,
    ImplicitLocalAlignment,
    PairwiseRelation,
    RelationAwareSpatialAttention,
    RelationGuidedLocalization,
    adaptive_weak_margins,
    pair_difference_statistics,
    retrieval_vector,
    same_identity_partners,
    weak_supervision_ranking_loss,
)
from tbps.models.registry import create_method, list_methods

IMAGE_SIZE = (64, 64)  # EfficientNet-Lite0 -> a 2 x 2 map
CAPTIONS = [
    "a man in a red shirt and blue jeans",
    "the man wears a red shirt, jeans and black shoes",
    "a woman in a long white dress",
    "she wears a white dress and carries a bag",
    "a boy with a green backpack",
    "a boy in green carrying a backpack",
]
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


# Tensors here are tiny: intra-op threads only add synchronisation (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_config(**overrides):
    config = {
        "global_dim": 24,
        "local_dim": 16,
        "max_text_length": 16,
        "image_backbone": {"name": "efficientnet_lite0", "pretrained": False},
        "text_backbone": {"name": "bilstm", "embedding_dim": 12, "hidden_size": 20, "min_count": 1, "combine": "mean"},
        "rgl": {"mode": "relation", "chunk_size": 3, "theta_reduction": 32},
        "ila": {"num_centres": 3, "reduction": 4, "assignment": "relation"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def build(num_classes: int = 3, **overrides):
    torch.manual_seed(0)
    method = create_method("isanet", tiny_config(**overrides), num_classes=num_classes, image_size=IMAGE_SIZE)
    method.fit_text(CAPTIONS)
    return method


def make_batch(method, captions=CAPTIONS, labels=LABELS):
    generator = torch.Generator().manual_seed(1)
    return {
        "images": torch.randn(len(captions), 3, *IMAGE_SIZE, generator=generator),
        "text": method.build_text_processor()(captions),
        "captions": list(captions),
        "labels": labels,
        "person_ids": labels + 100,
    }


@pytest.fixture(scope="module")
def isanet():
    return build()


@pytest.fixture(scope="module")
def batch(isanet):
    return make_batch(isanet)


# ------------------------------------------------------------------------------ registry, configs


def test_registry_lists_isanet():
    assert "isanet" in list_methods()


@pytest.mark.parametrize("dataset", ["synthetic", "cuhk-pedes", "icfg-pedes", "rstpreid"])
def test_configs_load_with_paper_hyper_parameters(dataset):
    from tbps.config import load_config

    config = load_config(f"isanet/{dataset}")
    model = config.model
    assert config.method == "isanet" and config.data.sampler == "identity"
    losses = model.losses
    assert (losses.weak, losses.consistency) == (0.1, 1.0)  # lambda_1, lambda_2 (eq. 21)
    assert losses.rank_margin == losses.consistency_margin == 0.2  # alpha_1, alpha_3
    # eq. 18 as SSAN: a random semi-hard negative per anchor, summed; alpha_2 adaptive (>= 0.16)
    assert (losses.negative_sampling, losses.reduction, losses.weak_min_margin) == ("semi-hard-random", "sum", 0.16)
    assert losses.weak_margin_start_epoch == (1 if dataset == "synthetic" else 5)  # SSAN's epoch_begin
    assert "weak_margin" not in losses  # retired (refused by the method): alpha_2 is SSAN's adaptive margin
    assert "relation_reduction" not in model.rgl and "relation_dim" not in model.rgl  # C/r1 entries (eqs. 3, 5)
    assert model.feature_norm == "layernorm"
    assert model.ila.num_centres == 6 and model.ila.reduction == 4  # K, r3
    assert model.rgl.theta_reduction == 32  # r1: C/r1 entries per relation vector (eqs. 3, 5)
    assert model.text_backbone.name == "bilstm" and model.text_backbone.combine == "mean"
    if dataset == "synthetic":
        assert model.image_backbone.name == "efficientnet_lite0"
    else:
        assert list(config.data.image_size) == [384, 128] and config.data.batch_size == 64
        assert model.image_backbone.name == "resnet50" and model.image_backbone.last_stride == 1
        assert (model.global_dim, model.local_dim, model.max_text_length) == (2048, 512, 100)
        assert model.text_backbone.hidden_size == 2048 and model.text_backbone.embedding_dim == 512
        assert config.optim.optimizer == "adam" and config.optim.lr == pytest.approx(1e-2)
        assert config.optim.lr * config.optim.backbone_lr_mult == pytest.approx(1e-3)
        assert list(config.optim.milestones) == [30, 50] and config.optim.warmup_epochs == 10
        assert config.trainer.max_epochs == 70
    if dataset == "cuhk-pedes":
        assert model.vocabulary_size == 5000
    if dataset == "icfg-pedes":
        assert model.vocabulary_size == 3000


# ------------------------------------------------------------------------------ shapes


def test_feature_shapes(isanet, batch):
    isanet.train()
    with torch.no_grad():
        image = isanet.encode_image(batch["images"])
        text = isanet.encode_text(batch["text"])
    assert isanet.feature_map_size == (2, 2)
    assert image["global"].shape == text["global"].shape == (6, 24)  # d_g
    assert image["local"].shape == text["local"].shape == (6, 3 * 16)  # K d_c
    maps = isanet.image_maps(batch["images"])
    assert maps["backbone"].shape == maps["localized"].shape == maps["filtered"].shape == (6, 1280, 2, 2)
    explained = isanet.explain_image(batch["images"])
    assert explained["rgl_attention"].shape == (6, 2, 2)
    assert explained["topic_assignment"].shape == (6, 3, 2, 2)
    assert isanet.explain_text(batch["text"])["topic_assignment"].shape == (6, 3, 16)


def test_text_encoder_averages_directions_and_vocabulary_is_capped():
    method = build(vocabulary_size=6)
    assert len(method.text_backbone.vocabulary) == 6  # <pad>, <unk> and the 4 most frequent words
    assert method.text_backbone.combine == "mean" and method.text_backbone.hidden_size == 20
    # parameter groups: only the image backbone gets the backbone rate; the random-init Bi-LSTM is "new"
    groups = method.parameter_groups()
    backbone_ids = {id(p) for p in groups["backbone"]}
    assert all(id(p) in backbone_ids for p in method.image_backbone.parameters())
    assert not any(id(p) in backbone_ids for p in method.text_backbone.parameters())


def test_vocabulary_cap_is_refused_for_a_pretrained_text_encoder():
    # A fixed (pretrained) vocabulary cannot be capped: the option is refused, not ignored.
    def with_minilm(vocabulary_size):
        return {**tiny_config(vocabulary_size=vocabulary_size), "text_backbone": {"name": "minilm", "pretrained": False}}

    with pytest.raises(ValueError, match="model.vocabulary_size"):
        create_method("isanet", with_minilm(6), num_classes=3, image_size=IMAGE_SIZE)
    method = create_method("isanet", with_minilm(None), num_classes=3, image_size=IMAGE_SIZE)
    method.fit_text(CAPTIONS)  # nothing to build
    with pytest.raises(ValueError, match="fixed vocabulary"):
        method.text_backbone.fit(CAPTIONS, max_vocabulary=6)


# ------------------------------------------------------------------------------ RGL (eqs. 2-5)


def test_pair_statistics_closed_form_matches_explicit_pairs():
    torch.manual_seed(0)
    u, w = torch.randn(3, 5, 4), torch.randn(3, 7, 4) * 2 + 1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    mean, variance, count = pair_difference_statistics(u, w, mask)
    pairs = (u.unsqueeze(2) - w.unsqueeze(1))[mask.bool()].reshape(-1, 4)  # [valid i x 7, 4]
    assert count == pairs.shape[0] == 9 * 7
    torch.testing.assert_close(mean, pairs.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(variance, pairs.var(0, unbiased=False), atol=1e-5, rtol=1e-5)
    shared_mean, shared_variance, _ = pair_difference_statistics(u, w[0])  # [M, R]: shared by the batch
    shared_pairs = (u.unsqueeze(2) - w[0]).reshape(-1, 4)
    torch.testing.assert_close(shared_mean, shared_pairs.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_variance, shared_pairs.var(0, unbiased=False), atol=1e-5, rtol=1e-5)


def _rgl_pair(chunk_size: int):
    torch.manual_seed(3)
    module = RelationGuidedLocalization(channels=16, num_positions=12, theta_reduction=4, relation_dim=3, chunk_size=chunk_size)
    return module


def test_rgl_memory_bounded_path_equals_direct_path():
    direct, chunked = _rgl_pair(0), _rgl_pair(5)
    chunked.load_state_dict(direct.state_dict())
    feature_map = torch.randn(2, 16, 4, 3)
    outputs, grads = [], []
    for module in (direct, chunked):
        x = feature_map.clone().requires_grad_(True)
        out = module(x)  # training mode: batch statistics over all B N N pairs
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outputs.append(out.detach())
        grads.append((x.grad, [p.grad for p in module.parameters()]))
    assert outputs[0].shape == feature_map.shape  # F~ = A (.) F
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # nn.BatchNorm1d's running averages, updated the same way on both paths
    pair_norm_direct = direct.relation.pair_norm["default"]
    pair_norm_chunked = chunked.relation.pair_norm["default"]
    torch.testing.assert_close(pair_norm_direct.running_mean, pair_norm_chunked.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pair_norm_direct.running_var, pair_norm_chunked.running_var, atol=1e-6, rtol=1e-5)
    direct.eval(), chunked.eval()
    with torch.no_grad():
        torch.testing.assert_close(direct(feature_map), chunked(feature_map), atol=1e-5, rtol=1e-4)


def test_rgl_attention_is_per_position_and_channel_and_uses_relations():
    module = _rgl_pair(4).eval()
    feature_map = torch.randn(2, 16, 4, 3)
    attention = module.attention(feature_map)
    assert attention.shape == feature_map.shape and bool(((attention > 0) & (attention < 1)).all())  # sigmoid
    torch.testing.assert_close(module(feature_map), feature_map * attention)
    # W_a in R^{C x (C + N R)}: the relation block is position-specific, so moving one other
    # position's feature changes the attention at position 0 through r_0.
    changed = feature_map.clone()
    changed[:, :, 3, 2] += 5.0
    assert not torch.allclose(module.attention(changed)[:, :, 0, 0], attention[:, :, 0, 0])
    with pytest.raises(ValueError, match="positions"):
        module(torch.randn(1, 16, 5, 3))


def test_rgl_relation_vectors_have_c_over_r1_entries_as_eqs_3_and_5(isanet):
    # Eq. 3: r_i in R^{N C / r1}; eq. 5: W_a in R^{C x (N/r1 + 1) C}. Both give C/r1 entries per pair.
    rgl = isanet.localization
    channels, positions, reduced = 1280, 4, 1280 // 32  # EfficientNet-Lite0 at 64x64: a 2 x 2 map; C / r1 = 40
    assert rgl.relation_dim == reduced  # not C / r2 = 5
    assert rgl.attention_projection.weight.shape == (channels, channels + positions * reduced)  # [f_i, r_i]
    assert rgl.relation.theta.weight.shape == (reduced, channels)  # W_theta in R^{d/r1 x d}
    assert rgl.relation.relation.weight.shape == (reduced, reduced)  # W: a C/r1 relation vector per pair
    assert RelationGuidedLocalization(16, 12, theta_reduction=4, relation_dim=3).relation_dim == 3  # explicit override
    assert build(rgl={"relation_reduction": 256}).localization.relation_dim == channels // 256  # eq. 2's r2 as a divider
    with pytest.raises(ValueError, match="relation_reduction"):
        build(rgl={"relation_reduction": 256, "relation_dim": 8})


# ------------------------------------------------------------------------------ Table IV: CBAM, RGA


@pytest.mark.parametrize("size", [(4, 1), (8, 3), (2, 2)])  # EfficientNet-Lite0 at 128x48, last stride 1 / 2
def test_cbam_channel_then_spatial_attention(size):
    torch.manual_seed(0)
    cbam = ConvolutionalBlockAttention(channels=32, reduction=16)
    feature_map = torch.randn(3, 32, *size)
    attention = cbam.attention(feature_map)
    assert attention.shape == feature_map.shape and bool(((attention > 0) & (attention < 1)).all())
    torch.testing.assert_close(cbam(feature_map), feature_map * attention)
    # CBAM eq. 2: one MLP shared by the average- and max-pooled descriptors
    mlp = cbam.channel_mlp
    channel = torch.sigmoid(mlp(feature_map.mean(dim=(2, 3))) + mlp(feature_map.amax(dim=(2, 3))))[:, :, None, None]
    refined = feature_map * channel
    # CBAM eq. 3: a 7x7 convolution over the channel-wise average and max maps of F'
    pooled = torch.stack([refined.mean(dim=1), refined.amax(dim=1)], dim=1)
    spatial = torch.sigmoid(F.conv2d(pooled, cbam.spatial_conv.weight, padding=3))
    assert cbam.spatial_conv.weight.shape == (1, 2, 7, 7)
    torch.testing.assert_close(cbam(feature_map), refined * spatial, atol=1e-6, rtol=1e-5)


def test_rga_spatial_weights_come_from_relations_to_other_positions():
    torch.manual_seed(0)
    rga = RelationAwareSpatialAttention(channels=16, num_positions=12, spatial_reduction=2, score_reduction=2)
    rga.train()
    rga(torch.randn(8, 16, 4, 3))  # settle the batch-norm running averages a little
    rga.eval()
    feature_map = torch.randn(2, 16, 4, 3)
    attention = rga.attention(feature_map)
    assert attention.shape == (2, 1, 4, 3) and bool(((attention > 0) & (attention < 1)).all())  # one weight per position
    torch.testing.assert_close(rga(feature_map), feature_map * attention)
    assert rga.relation_embedding[0].weight.shape == (12 // 2, 2 * 12)  # [r_{i,:}, r_{:,i}] in R^{2N} -> N/s1
    # In eval mode (no batch statistics) position 0's weight depends on position (3, 2) only
    # through the relations r_{0,j}, r_{j,0}: change that position, the weight at 0 moves ...
    changed = feature_map.clone()
    changed[:, :, 3, 2] += 3.0
    assert not torch.allclose(rga.attention(changed)[:, 0, 0, 0], attention[:, 0, 0, 0])
    # ... and without the relation embedding it does not.
    with torch.no_grad():
        rga.relation_embedding[0].weight.zero_()
    torch.testing.assert_close(rga.attention(changed)[:, 0, 0, 0], rga.attention(feature_map)[:, 0, 0, 0])
    with pytest.raises(ValueError, match="positions"):
        rga(torch.randn(1, 16, 5, 3))


# ------------------------------------------------------------------------------ CAF (eqs. 6-8)


def test_caf_matches_its_equations_on_a_hand_built_tensor():
    caf = ChannelAttentionFiltration(channels=2, se_reduction=2)
    with torch.no_grad():
        caf.instance_norm.weight.copy_(torch.tensor([2.0, 1.0]))  # gamma
        caf.instance_norm.bias.copy_(torch.tensor([0.5, 0.0]))  # beta
        caf.channel_attention.reduce.weight.copy_(torch.tensor([[1.0, 0.0]]))
        caf.channel_attention.reduce.bias.zero_()
        caf.channel_attention.expand.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        caf.channel_attention.expand.bias.zero_()
    values = [[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 4.0]]
    feature_map = torch.tensor(values).reshape(1, 2, 2, 2)
    gamma, beta, eps = [2.0, 1.0], [0.5, 0.0], 1e-5
    expected_in, removed = [], []
    for c, channel in enumerate(values):
        mu = sum(channel) / 4
        sigma = math.sqrt(sum((v - mu) ** 2 for v in channel) / 4 + eps)
        normalized = [gamma[c] * (v - mu) / sigma + beta[c] for v in channel]  # eq. 6
        expected_in.append(normalized)
        removed.append([v - n for v, n in zip(channel, normalized)])  # eq. 7
    hidden = max(0.0, sum(removed[0]) / 4)  # ReLU(W1 GAP(R)), W1 = [1, 0]
    weights = [1 / (1 + math.exp(-hidden)), 1 / (1 + math.exp(hidden))]  # sigmoid(W2 h), W2 = [1, -1]
    expected = [
        [expected_in[c][k] + weights[c] * removed[c][k] + values[c][k] for k in range(4)] for c in range(2)
    ]  # eq. 8: F^ = IN(F~) + w_C (.) R + F~
    torch.testing.assert_close(caf(feature_map), torch.tensor(expected).reshape(1, 2, 2, 2), atol=1e-5, rtol=1e-5)
    instance_only = ChannelAttentionFiltration(2, mode="instance_norm")
    instance_only.instance_norm.load_state_dict(caf.instance_norm.state_dict())
    torch.testing.assert_close(instance_only(feature_map), torch.tensor(expected_in).reshape(1, 2, 2, 2), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ ILA (eqs. 9-14)


@pytest.mark.parametrize("assignment", ["relation", "inner_product", "netvlad"])
def test_ila_assignments_and_aggregation(assignment):
    torch.manual_seed(0)
    ila = ImplicitLocalAlignment(channels=10, dim=8, num_centres=4, reduction=2, assignment=assignment)
    image_positions = torch.randn(3, 6, 10)
    words, mask = torch.randn(3, 5, 10), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    image_local, image_assignment = ila(image_positions, "image")
    text_local, text_assignment = ila(words, "text", mask)
    assert image_local.shape == text_local.shape == (3, 4, 8)
    assert image_assignment.shape[:3] == (3, 6, 4) and text_assignment.shape[:3] == (3, 5, 4)
    assert image_assignment.shape[3] == (8 if assignment == "relation" else 1)  # a vector per pair for the relation
    sums = text_assignment.sum(dim=2)
    assert bool((sums[~mask.bool()] == 0).all())  # padding words are assigned nowhere
    projected = ila.project(image_positions)  # eq. 9: W_s Normalize(F)
    torch.testing.assert_close(projected, ila.projection(F.normalize(image_positions, dim=-1)))
    if assignment == "relation":
        # eq. 10 as printed: a_ij = r(z_i, c_j) = ReLU(BN(W (z_theta_i - c_phi_j))), no softmax over the centres
        relation = ila.relation
        u, w = relation.embed(projected, ila.centres, "image")
        norm = relation.pair_norm["image"]
        pairs = (u.unsqueeze(2) - w).reshape(-1, 8)  # every (position, centre) pair of the batch
        expected = F.relu((pairs - pairs.mean(0)) / torch.sqrt(pairs.var(0, unbiased=False) + norm.eps) * norm.weight + norm.bias)
        torch.testing.assert_close(image_assignment, expected.reshape(3, 6, 4, 8), atol=1e-5, rtol=1e-4)
        assert bool((image_assignment >= 0).all()) and bool((image_assignment == 0).any())  # rectified: selective
        assert not torch.allclose(image_assignment.sum(dim=2), torch.ones(3, 6, 8))  # not a distribution over K
    else:  # inner product and NetVLAD: a softmax over the K centres
        torch.testing.assert_close(image_assignment.sum(dim=2), torch.ones_like(image_assignment.sum(dim=2)))
        torch.testing.assert_close(sums[mask.bool()], torch.ones_like(sums[mask.bool()]))
    if assignment != "netvlad":  # eqs. 11 / 14: v_j = sum_i a_ij (.) z_i
        torch.testing.assert_close(image_local, (image_assignment * projected.unsqueeze(2)).sum(1), atol=1e-6, rtol=1e-5)


def test_ila_centres_are_normalised_the_same_in_training_and_at_test():
    # The K centres are parameters, the same in every batch: their batch norm (c_phi of eq. 10) uses
    # their own statistics in both modes, so eval gives what training gave (running averages with
    # the unbiased K/(K-1) variance would scale c_phi by sqrt((K-1)/K) and lag behind).
    torch.manual_seed(0)
    ila = ImplicitLocalAlignment(channels=10, dim=8, num_centres=4, reduction=2)
    positions = torch.randn(3, 6, 10)
    ila.train()
    for _ in range(3):
        ila(positions, "image")
    projected = ila.project(positions)
    _, train_centres = ila.relation.embed(projected, ila.centres, "image")
    ila.eval()
    _, eval_centres = ila.relation.embed(projected, ila.centres, "image")
    torch.testing.assert_close(eval_centres, train_centres)
    phi = ila.relation.phi(ila.centres)
    expected = F.relu((phi - phi.mean(0)) / torch.sqrt(phi.var(0, unbiased=False) + 1e-5))  # gamma = 1, beta = 0
    torch.testing.assert_close(eval_centres, ila.relation.relation(expected), atol=1e-5, rtol=1e-4)
    assert not ila.relation.phi_norm["image"].track_running_stats


def test_ila_centres_and_relation_are_shared_by_both_modalities(isanet, batch):
    ila = isanet.local_alignment
    centres = [name for name, _ in isanet.named_parameters() if name.endswith("centres")]
    assert centres == ["local_alignment.centres"]  # one set of K centres, used by images and captions
    isanet.train()
    isanet.zero_grad()
    isanet.encode_image(batch["images"])["local"].square().sum().backward()
    image_grads = {name: p.grad.clone() for name, p in ila.named_parameters() if p.grad is not None}
    isanet.zero_grad()
    isanet.encode_text(batch["text"])["local"].square().sum().backward()
    text_grads = {name: p.grad.clone() for name, p in ila.named_parameters() if p.grad is not None}
    shared = ["centres", "projection.weight", "relation.theta.weight", "relation.phi.weight", "relation.relation.weight"]
    for name in shared:
        assert image_grads[name].abs().sum() > 0 and text_grads[name].abs().sum() > 0, name
    isanet.zero_grad()


def test_ila_with_one_centre_is_a_global_sum():
    ila = ImplicitLocalAlignment(channels=6, dim=5, num_centres=1)
    positions = torch.randn(2, 4, 6)
    local, assignment = ila(positions, "image")
    torch.testing.assert_close(assignment, torch.ones_like(assignment))
    torch.testing.assert_close(local[:, 0], ila.project(positions).sum(1))


# ------------------------------------------------------------------------------ GA (eqs. 15-16)


def test_global_alignment_pooling_order(isanet, batch):
    isanet.train()
    torch.manual_seed(0)
    filtered = torch.randn(6, 1280, 2, 2)
    image_global, _, _ = isanet._image_features(filtered)
    positions = filtered.flatten(2).transpose(1, 2)
    fc_then_max = isanet.image_global(positions).amax(dim=1)  # eq. 15
    max_then_fc = isanet.image_global(positions.amax(dim=1))
    torch.testing.assert_close(image_global, fc_then_max)
    assert not torch.allclose(image_global, max_then_fc, atol=1e-3)
    tokens, mask = isanet.text_tokens(batch["text"])
    text_global, _, _ = isanet._text_features(tokens, mask)
    real_max = torch.stack([tokens[b, : int(mask[b].sum())].amax(0) for b in range(len(tokens))])
    torch.testing.assert_close(text_global, isanet.text_global(real_max))  # eq. 16: GMP over real words, then FC
    assert not torch.allclose(text_global, isanet.text_global(tokens).masked_fill(~mask.bool()[..., None], -1e9).amax(1), atol=1e-3)


# ------------------------------------------------------------------------------ losses (eqs. 17-21)


def test_partners_share_identity_and_differ_from_the_paired_caption():
    ids = torch.tensor([7, 7, 7, 3, 3, 9, 5, 5])
    captions = ["a", "b", "c", "d", "  D ", "e", "f", "g"]
    partners = same_identity_partners(ids, captions)
    assert partners.tolist() == [1, 2, 0, -1, -1, -1, 7, 6]  # 3/4: same text; 5: alone
    for i, j in enumerate(partners.tolist()):
        if j >= 0:
            assert j != i and ids[j] == ids[i] and captions[j] != captions[i]
    # with image ids, a caption of another image of the same person is preferred
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5])
    assert same_identity_partners(ids, captions, image_ids).tolist()[:2] == [2, 2]


def _reference_terms(positive, negatives, margins, valid, sampling, keys=None):
    """Per-anchor hinge terms by explicit loops: the hardest valid negative, or SSAN's semi-hard draw.

    For the draw, ``keys[a][k]`` are the uniform keys the code draws with ``torch.rand``; the
    drawn negative is the semi-hard candidate (0 < hinge < margin) with the largest key.
    """
    terms = []
    for a, (pos, row, margin) in enumerate(zip(positive, negatives, margins)):
        hinges = {k: margin - pos + s for k, s in enumerate(row) if valid[a][k]}
        if sampling == "hardest":
            terms.append(max([0.0] + [max(h, 0.0) for h in hinges.values()]))
            continue
        candidates = [k for k, h in hinges.items() if 0.0 < h < margin]
        terms.append(hinges[max(candidates, key=lambda k: keys[a][k])] if candidates else 0.0)
    return terms


def _reduce(terms, count, reduction):
    return sum(terms) if reduction == "sum" else (sum(terms) / count if count else 0.0)


def _reference_eq18(similarity, labels, partners, margin1, weak_margins, sampling, reduction, min_margin=None):
    """Eq. 18 term by term (rows images, columns texts), drawing keys in the code's order.

    Returns ``(strong, weak)``: terms 1 + 2, and terms 3 + 4 before lambda_1. ``weak_margins[p]``
    is alpha_2 of sample p; anchors of the weak terms have a partner (and alpha_2 >= min_margin).
    """
    size = len(labels)
    valid = [[labels[n] != labels[p] for n in range(size)] for p in range(size)]
    draw = (lambda rows: torch.rand(rows, size).tolist()) if sampling == "semi-hard-random" else (lambda rows: None)
    keys = draw(size)
    image = _reference_terms([similarity[p][p] for p in range(size)], similarity, [margin1] * size, valid, sampling, keys)
    keys = draw(size)
    columns = [[similarity[n][p] for n in range(size)] for p in range(size)]
    text = _reference_terms([similarity[p][p] for p in range(size)], columns, [margin1] * size, valid, sampling, keys)
    strong = _reduce(image, size, reduction) + _reduce(text, size, reduction)
    anchors = [p for p in range(size) if partners[p] >= 0 and (min_margin is None or weak_margins[p] >= min_margin)]
    if not anchors:
        return strong, 0.0
    positive = [similarity[p][partners[p]] for p in anchors]  # S(v_p, t_bar_p)
    margins = [weak_margins[p] for p in anchors]
    weak_valid = [valid[p] for p in anchors]
    keys = draw(len(anchors))
    term3 = _reference_terms(positive, [similarity[p] for p in anchors], margins, weak_valid, sampling, keys)  # S(v_p, t_n)
    keys = draw(len(anchors))
    term4 = _reference_terms(positive, [columns[partners[p]] for p in anchors], margins, weak_valid, sampling, keys)  # S(v_n, t_bar_p)
    return strong, _reduce(term3, len(anchors), reduction) + _reduce(term4, len(anchors), reduction)


def _ssan_margins(similarity, partners, margin1):
    """alpha_2 = (1 + min(|S(v, t_bar)| / |S(v, t)|, 1)) alpha_1 / 2, per sample (SSAN's auto margin)."""
    margins = []
    for p, q in enumerate(partners):
        ratio = min(abs(similarity[p][q]) / abs(similarity[p][p]), 1.0) if q >= 0 else 0.0
        margins.append((1 + ratio) * margin1 / 2)
    return margins


def test_adaptive_weak_margins_follow_ssan():
    similarity = torch.tensor([[0.8, 0.6, 0.1], [0.2, 0.5, 0.3], [0.4, 0.9, -0.25]])
    partners = torch.tensor([1, 2, -1])
    # sample 0: 0.6 / 0.8 = 0.75 -> (1.75) 0.2 / 2 = 0.175; sample 1: 0.3 / 0.5 = 0.6 -> 0.16;
    # sample 2 has no partner -> alpha_1 / 2 (never used)
    torch.testing.assert_close(adaptive_weak_margins(similarity, partners, 0.2), torch.tensor([0.175, 0.16, 0.1]))
    torch.testing.assert_close(adaptive_weak_margins(similarity, torch.tensor([2, 0, 1]), 0.2)[2], torch.tensor(0.2))  # |0.9| / |-0.25| -> 1
    s = similarity.clone().requires_grad_(True)
    assert not adaptive_weak_margins(s, partners, 0.2).requires_grad  # detached, as SSAN's


@pytest.mark.parametrize("sampling, reduction", [("hardest", "mean"), ("semi-hard-random", "sum"), ("semi-hard-random", "mean")])
def test_weak_supervision_loss_against_eq18(sampling, reduction):
    torch.manual_seed(0)
    similarity = torch.rand(6, 6) * 0.6 + 0.2
    labels = LABELS.tolist()
    partners = same_identity_partners(LABELS, CAPTIONS)
    assert partners.tolist() == [1, 0, 3, 2, 5, 4]
    margins = adaptive_weak_margins(similarity, partners, 0.2)
    expected_margins = _ssan_margins(similarity.tolist(), partners.tolist(), 0.2)
    torch.testing.assert_close(margins, torch.tensor(expected_margins))
    for min_margin in (None, 0.16, 0.19):
        torch.manual_seed(11)
        torch.rand(6, 6), torch.rand(6, 6)  # the reference draws the strong terms' keys first
        loss = weak_supervision_ranking_loss(similarity, partners, LABELS, margins, sampling, reduction, min_margin)
        torch.manual_seed(11)
        _, expected = _reference_eq18(similarity.tolist(), labels, partners.tolist(), 0.2, expected_margins, sampling, reduction, min_margin)
        assert loss.item() == pytest.approx(expected, abs=1e-6), min_margin
    # a constant alpha_2 (before the adaptive margin starts) and no partner at all
    torch.manual_seed(11)
    torch.rand(6, 6), torch.rand(6, 6)
    constant = weak_supervision_ranking_loss(similarity, partners, LABELS, 0.1, sampling, reduction)
    torch.manual_seed(11)
    _, expected = _reference_eq18(similarity.tolist(), labels, partners.tolist(), 0.2, [0.1] * 6, sampling, reduction)
    assert constant.item() == pytest.approx(expected, abs=1e-6)
    none = torch.full((6,), -1)
    assert weak_supervision_ranking_loss(similarity, none, LABELS, margins, sampling, reduction).item() == 0.0
    # SSAN's skip: every anchor under the floor -> nothing left
    assert weak_supervision_ranking_loss(similarity, partners, LABELS, margins, sampling, reduction, min_margin=0.2001).item() == 0.0


def _features(method, batch, seed):
    """The forward pass's features, drawn with the same random stream (EfficientNet drop-connect)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        maps = method.image_maps(batch["images"])
        image_global, image_local, _ = method._image_features(maps["filtered"])
        text_global, text_local, _ = method._text_features(*method.text_tokens(batch["text"]))
    return maps, image_global, image_local, text_global, text_local


def _cosine(a, b):
    return (F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()).tolist()


def _reference_consistency(before, after, labels, margin, reduction):
    """Eq. 20 by loops: hardest negatives of other identities, S(f~, f^_n) and S(f~_n, f^)."""
    cos = _cosine(before, after)
    size = len(labels)
    first = [max(max(margin - cos[i][i] + cos[i][n], 0.0) for n in range(size) if labels[n] != labels[i]) for i in range(size)]
    second = [max(max(margin - cos[i][i] + cos[n][i], 0.0) for n in range(size) if labels[n] != labels[i]) for i in range(size)]
    return _reduce(first, size, reduction) + _reduce(second, size, reduction)


@pytest.mark.parametrize(
    "sampling, reduction, start_epoch, epoch",
    [
        ("hardest", "mean", None, 0),  # VSE++-style, alpha_2 = alpha_1 / 2 throughout
        ("semi-hard-random", "sum", 2, 1),  # SSAN before its epoch_begin: alpha_2 = alpha_1 / 2
        ("semi-hard-random", "sum", 2, 2),  # SSAN from epoch_begin on: adaptive alpha_2, anchors under 0.16 skipped
    ],
)
def test_forward_losses_are_named_weighted_and_follow_their_equations(sampling, reduction, start_epoch, epoch):
    weights = {
        "id": 2.0, "rank": 3.0, "weak": 0.5, "consistency": 0.7, "rank_margin": 0.3, "consistency_margin": 0.2,
        "negative_sampling": sampling, "reduction": reduction, "weak_margin_start_epoch": start_epoch, "weak_min_margin": 0.25,
    }
    method = build(losses=weights)
    batch = make_batch(method)
    method.train()
    method.set_epoch(epoch)
    assert method.weak_margin_adaptive() == (start_epoch is not None and epoch >= start_epoch)
    torch.manual_seed(5)
    losses = method(batch)
    assert set(losses) == {"id_global", "id_local", "rank_global", "rank_global_weak", "rank_local", "rank_local_weak", "consistency"}
    maps, image_global, image_local, text_global, text_local = _features(method, batch, 5)  # leaves the stream where the losses draw
    labels = LABELS.tolist()
    necks = [method.global_identity_norm, *method.local_identity_norm]
    id_global = F.cross_entropy(method.global_identity.logits(necks[0](image_global)), LABELS) + F.cross_entropy(
        method.global_identity.logits(necks[0](text_global)), LABELS
    )
    id_local = sum(
        F.cross_entropy(c.logits(necks[k + 1](image_local[:, k])), LABELS) + F.cross_entropy(c.logits(necks[k + 1](text_local[:, k])), LABELS)
        for k, c in enumerate(method.local_identity)
    )  # eq. 17: global + sum over the K local features, each through its neck
    assert losses["id_global"].item() == pytest.approx(2.0 * id_global.item(), rel=1e-4)
    assert losses["id_local"].item() == pytest.approx(2.0 * id_local.item(), rel=1e-4)
    partners = same_identity_partners(batch["person_ids"], batch["captions"]).tolist()
    for name, image, text in (("global", image_global, text_global), ("local", image_local.flatten(1), text_local.flatten(1))):
        similarity = _cosine(image, text)
        if method.weak_margin_adaptive():
            weak_margins, min_margin = _ssan_margins(similarity, partners, 0.3), 0.25
        else:
            weak_margins, min_margin = [0.15] * 6, None
        strong, weak = _reference_eq18(similarity, labels, partners, 0.3, weak_margins, sampling, reduction, min_margin)
        assert losses[f"rank_{name}"].item() == pytest.approx(3.0 * strong, rel=1e-4, abs=1e-6)
        assert losses[f"rank_{name}_weak"].item() == pytest.approx(3.0 * 0.5 * weak, rel=1e-4, abs=1e-6)
    # eq. 20 on the global image feature computed from F~ and from F^ (consistency_features: global)
    before = method._image_global_feature(maps["localized"]).detach()
    expected = _reference_consistency(before, image_global, labels, 0.2, reduction)
    assert losses["consistency"].item() == pytest.approx(0.7 * expected, rel=1e-4, abs=1e-6)


def test_consistency_loss_is_active_at_the_papers_margin_and_reaches_caf():
    # As printed (f = GAP): GAP(IN(F~)) = beta, so GAP(F^) = (1 + w) GAP(F~) + (1 - w) beta exactly, the
    # positive's cosine is ~1 and no hinge opens at alpha_3 = 0.2. On the global image feature it does.
    method = build()
    batch = make_batch(method)
    method.train()
    maps, *_ = _features(method, batch, 0)
    caf = method.filtration
    removed = maps["localized"] - caf.instance_norm(maps["localized"])
    w = caf.channel_attention(removed).flatten(1)
    f_before, f_after = maps["localized"].mean(dim=(2, 3)), maps["filtered"].mean(dim=(2, 3))
    torch.testing.assert_close(f_after, (1 + w) * f_before + (1 - w) * caf.instance_norm.bias, atol=1e-4, rtol=1e-4)
    assert min(_cosine(f_before, f_after)[i][i] for i in range(6)) > 0.999
    gap = build(losses={"consistency_features": "gap"})
    torch.manual_seed(0)
    assert gap(make_batch(gap))["consistency"].item() == 0.0
    method.zero_grad()
    torch.manual_seed(0)
    consistency = method(batch)["consistency"]
    assert consistency.item() > 0
    consistency.backward()
    for module in (method.filtration, method.image_global, method.localization):
        assert sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None) > 0, module
    assert float(method.filtration.channel_attention.expand.weight.grad.abs().sum()) > 0  # w_C of eq. 8
    assert float(method.filtration.instance_norm.weight.grad.abs().sum()) > 0  # gamma of eq. 6 (invisible to GAP)
    with pytest.raises(ValueError, match="consistency_features"):
        build(losses={"consistency_features": "gmp"})


def test_identity_classifiers_see_both_modalities_at_the_same_norm():
    # The image global vector (FC, then max over positions) and the caption's (max over Bi-LSTM
    # states, then FC) differ in norm; one classifier shared by both needs them on one scale.
    def classifier_input_norms(method):
        batch = make_batch(method)
        method.train()
        seen = []
        hook = method.global_identity.classifier.register_forward_pre_hook(lambda _, args: seen.append(args[0].norm(dim=1).mean().item()))
        torch.manual_seed(0)
        method(batch)
        hook.remove()
        return seen  # [image, text]

    for feature_norm in ("layernorm", "batchnorm"):
        image, text = classifier_input_norms(build(feature_norm=feature_norm))
        assert 0.9 < image / text < 1.1, (feature_norm, image, text)
    image, text = classifier_input_norms(build(feature_norm="none"))
    assert image / text > 2 or text / image > 2  # without the neck (the issue: 6.9 vs 1.1 on the synthetic benchmark)
    method = build()
    assert isinstance(method.global_identity_norm, torch.nn.LayerNorm) and len(method.local_identity_norm) == 3
    with pytest.raises(ValueError, match="feature_norm"):
        build(feature_norm="l2")


def test_retired_options_are_refused():
    with pytest.raises(ValueError, match="weak_margin"):
        build(losses={"weak_margin": 0.2})
    with pytest.raises(ValueError, match="weak_min_margin"):
        build(losses={"weak_min_margin": 0.3})  # above alpha_1 = 0.2: every adaptive anchor skipped
    with pytest.raises(ValueError, match="negative_sampling"):
        build(losses={"negative_sampling": "semi-hard"})
    with pytest.raises(ValueError, match="reduction"):
        build(losses={"reduction": "max"})


def test_gradients_reach_every_module(isanet, batch):
    isanet.train()
    isanet.zero_grad()
    torch.manual_seed(0)
    losses = isanet(batch)
    torch.stack(list(losses.values())).sum().backward()
    missing = [name for name, p in isanet.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    for module_name in ("image_backbone", "text_backbone", "text_to_channels", "localization", "filtration", "image_global", "text_global", "local_alignment", "global_identity", "local_identity"):
        module = getattr(isanet, module_name)
        total = sum(float(p.grad.abs().sum()) for p in module.parameters())
        assert total > 0, module_name
    isanet.zero_grad()


def test_a_few_training_steps_reduce_the_loss():
    method = build()
    batch = make_batch(method)
    method.train()
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    history = []
    for _ in range(5):
        torch.manual_seed(0)  # the same drop-connect draw each step: only the weights change
        total = torch.stack(list(method(batch).values())).sum()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < history[0]


# ------------------------------------------------------------------------------ similarity


def test_similarity_equals_score_candidates_and_retrieval_vector(isanet):
    torch.manual_seed(0)
    texts = {"global": torch.randn(5, 24), "local": torch.randn(5, 48)}
    images = {"global": torch.randn(7, 24), "local": torch.randn(7, 48)}
    full = isanet.similarity(texts, images)
    expected = F.normalize(texts["global"], dim=1) @ F.normalize(images["global"], dim=1).t() + F.normalize(
        texts["local"], dim=1
    ) @ F.normalize(images["local"], dim=1).t()  # S = S_g + S_l
    torch.testing.assert_close(full, expected)
    candidates = torch.tensor([[0, 3, 6], [1, 1, 2], [6, 5, 4], [2, 0, 1], [3, 4, 5]])
    torch.testing.assert_close(isanet.score_candidates(texts, images, candidates), full.gather(1, candidates))
    torch.testing.assert_close(retrieval_vector(texts) @ retrieval_vector(images).t(), full)


# ------------------------------------------------------------------------------ ablations


@pytest.mark.parametrize(
    "overrides, absent",
    [
        ({"rgl": {"mode": "non_local"}}, set()),
        ({"rgl": {"mode": "cbam"}}, set()),
        ({"rgl": {"mode": "rga"}}, set()),
        ({"rgl": {"mode": "none"}, "caf": {"mode": "none"}}, {"consistency"}),
        ({"caf": {"mode": "instance_norm"}}, {"consistency"}),
        ({"losses": {"consistency": 0.0}}, {"consistency"}),
        ({"ila": {"assignment": "inner_product"}}, set()),
        ({"ila": {"assignment": "netvlad"}}, set()),
        ({"global_alignment": False}, set()),
        ({"local_alignment": False}, {"id_local", "rank_local", "rank_local_weak"}),
        ({"losses": {"consistency_features": "gap"}}, set()),
        ({"feature_norm": "batchnorm"}, set()),
        ({"feature_norm": "none"}, set()),
        ({"losses": {"negative_sampling": "all", "reduction": "mean"}}, set()),
    ],
)
def test_ablation_switches_run(overrides, absent):
    method = build(**overrides)
    batch = make_batch(method)
    method.train()
    losses = method(batch)
    expected = {"id_global", "id_local", "rank_global", "rank_global_weak", "rank_local", "rank_local_weak", "consistency"} - absent
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        features = method.encode_image(batch["images"])
    assert ("local" in features) == (method.local_alignment is not None)


def test_table_iii_baseline_is_ssan_without_its_part_branch():
    # Table III row 1: SSAN's global branch (GMP, then one projection shared by both modalities),
    # no GA, no ILA, no RGL, no CAF; trained with SSAN's losses.
    method = build(global_alignment=False, local_alignment=False, rgl={"mode": "none"}, caf={"mode": "none"})
    assert method.local_alignment is None and not hasattr(method, "image_global") and not hasattr(method, "text_global")
    assert isinstance(method.localization, torch.nn.Identity) and isinstance(method.filtration, torch.nn.Identity)
    batch = make_batch(method)
    method.train()
    torch.manual_seed(0)
    losses = method(batch)
    assert set(losses) == {"id_global", "rank_global", "rank_global_weak"}
    assert all(torch.isfinite(v) for v in losses.values())
    method.eval()  # deterministic encoders (no drop-connect, running statistics)
    with torch.no_grad():
        image, text = method.encode_image(batch["images"]), method.encode_text(batch["text"])
    assert set(image) == set(text) == {"global"}
    with torch.no_grad():  # one projection for both: W(GMP(F)) and W(GMP(E))
        backbone = method.image_backbone(batch["images"]).feature_maps[-1]
        torch.testing.assert_close(image["global"], method.shared_global(backbone.amax(dim=(2, 3))), atol=1e-5, rtol=1e-4)
        tokens, mask = method.text_tokens(batch["text"])
        real_max = torch.stack([tokens[b, : int(mask[b].sum())].amax(0) for b in range(len(tokens))])
        torch.testing.assert_close(text["global"], method.shared_global(real_max), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["relation", "rga", "cbam"])
def test_no_module_assumes_a_map_size(mode):
    # 96x32 gives EfficientNet-Lite0 a 3 x 1 map (last stride 1 would give 6 x 2): the position-
    # specific modules are sized from the backbone's answer, the rest works on any map.
    torch.manual_seed(0)
    size = (96, 32)
    method = create_method("isanet", tiny_config(rgl={"mode": mode}), num_classes=3, image_size=size)
    method.fit_text(CAPTIONS)
    batch = make_batch(method)
    batch["images"] = torch.randn(6, 3, *size)
    method.train()
    losses = method(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    height, width = method.feature_map_size
    assert (height, width) == tuple(method.image_backbone(batch["images"][:1]).feature_maps[-1].shape[2:])
    assert method.explain_image(batch["images"])["rgl_attention"].shape == (6, height, width)


def test_invalid_switches_are_rejected():
    with pytest.raises(ValueError, match="rgl.mode"):
        build(rgl={"mode": "se"})
    with pytest.raises(ValueError, match="caf.mode"):
        build(caf={"mode": "snr"})


def test_explain_mixes_topic_maps_by_each_phrases_topics(isanet):
    caption = CAPTIONS[0]
    isanet.train()
    phrases, maps = isanet.explain(torch.randn(3, *IMAGE_SIZE), caption)
    assert phrases[0] == caption and len(phrases) >= 2
    grid = isanet.explain_image(torch.randn(1, 3, *IMAGE_SIZE))["rgl_attention"].shape[-2:]
    assert maps.shape == (len(phrases), *grid)
    assert (maps >= 0).all() and torch.isfinite(maps).all()
    assert isanet.training  # the caller's mode is restored
