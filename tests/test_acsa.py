"""ACSA (Ji et al. 2022): spatial body-region partition, noun-phrase text side, asymmetric
cross-attention module (eqs. 1-11), ACSA loss (eqs. 12-16) + CMPM + CMPC (eq. 17), similarity /
two-stage scoring, Table IV/V ablation switches.

Tiny randomly initialised models (EfficientNet-Lite0 with ``pretrained: false``, the bundled
MiniLM's architecture cut to two layers), 64x32 images, data made here.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from tbps.losses import cmpm_loss, similarity_kl_alignment
from tbps.methods.acsa import (
    BODY_REGIONS,
    AcsaTextProcessor,
    channel_regions,
    format_phrase_attention,
    pool_regions,
    region_row_weights,
)
from tbps.models.attention import (
    candidate_cross_attention_similarity,
    cross_attention_scores,
    cross_attention_similarity,
)
from tbps.models.registry import create_method, list_methods

CAPTIONS = [
    "a man in a red shirt, blue jeans and black shoes.",
    "a woman wearing a white dress",
    "he carries a bag, wears glasses, and has short hair",
    "girl with a yellow umbrella",
]
LABELS = torch.tensor([0, 1, 0, 2])
IMAGE_SIZE = (64, 32)
BODY_GROUPS = [parts for _, parts in BODY_REGIONS]


def tiny_config(**overrides):
    config = {
        "embed_dim": 32,
        "max_text_length": 24,
        "image_backbone": {"name": "efficientnet_lite0", "pretrained": False},
        "text_backbone": {"name": "minilm", "pretrained": False},
        "phrases": {"max_phrases": 4, "max_length": 8},
    }
    config.update(overrides)
    return config


def build(num_classes: int = 3, **overrides):
    torch.manual_seed(0)
    method = create_method("acsa", tiny_config(**overrides), num_classes=num_classes, image_size=IMAGE_SIZE)
    # Two transformer layers are enough to exercise every code path and keep tests fast.
    method.text_backbone.model.encoder.layer = method.text_backbone.model.encoder.layer[:2]
    return method


def make_batch(method, captions=CAPTIONS, labels=LABELS, processor=None):
    torch.manual_seed(1)
    processor = processor if processor is not None else method.build_text_processor()
    return {
        "images": torch.randn(len(captions), 3, *IMAGE_SIZE),
        "text": processor(captions),
        "captions": list(captions),
        "labels": labels,
        "person_ids": labels + 100,
    }


# Tensors here are tiny: intra-op threads only add synchronisation (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def acsa():
    return build()


@pytest.fixture(scope="module")
def processor(acsa):
    return acsa.build_text_processor()


@pytest.fixture(scope="module")
def batch(acsa, processor):
    return make_batch(acsa, processor=processor)


def random_features(num_images=5, num_texts=4, regions=4, phrases=3, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = {
        "global": torch.randn(num_images, dim, generator=generator),
        "regions": torch.randn(num_images, regions, dim, generator=generator),
    }
    mask = torch.ones(num_texts, phrases)
    mask[1, 2:] = 0
    mask[2, 1:] = 0
    text = {
        "global": torch.randn(num_texts, dim, generator=generator),
        "phrases": torch.randn(num_texts, phrases, dim, generator=generator) * mask.unsqueeze(-1),
        "phrase_mask": mask,
    }
    return text, image


# ------------------------------------------------------------------------------ registry, configs


def test_registry_lists_acsa():
    assert "acsa" in list_methods()


@pytest.mark.parametrize("dataset", ["synthetic", "cuhk-pedes", "icfg-pedes", "rstpreid"])
def test_configs_load_with_paper_hyper_parameters(dataset):
    from tbps.config import load_config

    config = load_config(f"acsa/{dataset}")
    assert config.method == "acsa"
    model = config.model
    assert (model.losses.cmpm, model.losses.cmpc, model.losses.acsa) == (1.0, 4.0, 0.1)  # eq. 17
    assert model.phrases.max_phrases == 10 and model.attention.lambda_i2t == 20.0
    assert model.relations == "I-III" and model.local_features == "partition" and model.region_source == "spatial"
    assert config.optim.optimizer == "adamw"
    if dataset != "synthetic":
        assert list(config.data.image_size) == [224, 224] and config.data.batch_size == 16
        assert model.image_backbone.name == "swin_t" and model.embed_dim == 768 and model.max_text_length == 100
        assert config.optim.lr == pytest.approx(1e-4)
        assert config.optim.lr * config.optim.min_lr_ratio == pytest.approx(5e-6)
        assert (config.optim.warmup_epochs, config.trainer.max_epochs) == (5, 30)
    else:
        assert model.image_backbone.name == "efficientnet_lite0" and model.text_backbone.name == "minilm"


# ------------------------------------------------------------------------------ body regions


def test_region_partition_rows_when_height_is_a_multiple_of_six():
    weights = region_row_weights(12, BODY_GROUPS)  # part p = rows 2p, 2p + 1
    expected_rows = [[0, 1, 2, 3], [2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]
    for region, rows in zip(weights, expected_rows):
        assert region.nonzero().flatten().tolist() == rows
        assert torch.allclose(region[rows], torch.full((len(rows),), 1.0 / len(rows)))
    # Head and upper body overlap exactly on part 2 (rows 2-3); feet is the sixth part alone.
    shared = ((weights[0] > 0) & (weights[1] > 0)).nonzero().flatten().tolist()
    assert shared == [2, 3]
    assert not ((weights[1] > 0) & (weights[2] > 0)).any() and not ((weights[2] > 0) & (weights[3] > 0)).any()


def test_region_partition_is_exact_sixths_for_other_heights():
    weights = region_row_weights(7, BODY_GROUPS)  # Swin-T's 7x7 map at 224x224
    assert torch.allclose(weights.sum(dim=1), torch.ones(4))
    # Feet = [35/6, 7): 1/6 of row 5 and all of row 6, in proportion.
    assert torch.allclose(weights[3], torch.tensor([0, 0, 0, 0, 0, 1 / 7, 6 / 7]), atol=1e-6)
    # Head = [0, 14/6): rows 0, 1 fully, a third of row 2.
    assert torch.allclose(weights[0], torch.tensor([3 / 7, 3 / 7, 1 / 7, 0, 0, 0, 0]), atol=1e-6)
    # Fewer rows than parts still gives six distinct parts.
    six = region_row_weights(2, [(p,) for p in range(6)])
    assert torch.allclose(six, torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3))


def test_pool_regions_on_a_known_feature_map():
    height = 12
    rows = torch.arange(height, dtype=torch.float32)
    feature_map = torch.stack([rows, 10 * rows]).reshape(1, 2, height, 1).expand(2, 2, height, 3).contiguous()
    pooled = pool_regions(feature_map, region_row_weights(height, BODY_GROUPS), "avg")
    assert pooled.shape == (2, 4, 2)
    assert torch.allclose(pooled[0, :, 0], torch.tensor([1.5, 3.5, 7.5, 10.5]))  # mean row index per region
    assert torch.allclose(pooled[0, :, 1], 10 * torch.tensor([1.5, 3.5, 7.5, 10.5]))
    maxed = pool_regions(feature_map, region_row_weights(height, BODY_GROUPS), "max")
    assert torch.allclose(maxed[0, :, 0], torch.tensor([3.0, 5.0, 9.0, 11.0]))


def test_channel_chunk_regions_match_the_public_code_layout():
    pooled = torch.arange(12.0).unsqueeze(0)  # 6 chunks of 2 channels
    head, upper, lower, feet = channel_regions(pooled, BODY_GROUPS)
    assert head.tolist() == [[0, 1, 2, 3]] and upper.tolist() == [[2, 3, 4, 5]]
    assert lower.tolist() == [[6, 7, 8, 9]] and feet.tolist() == [[10, 11]]


def test_encode_image_regions_come_from_the_spatial_parts(acsa):
    acsa.train()
    images = torch.randn(3, 3, *IMAGE_SIZE)
    torch.manual_seed(5)
    features = acsa.encode_image(images)
    torch.manual_seed(5)  # same drop-connect draws
    feature_map = acsa.image_backbone(images).feature_maps[-1]
    pooled = pool_regions(feature_map, region_row_weights(feature_map.shape[2], BODY_GROUPS))
    # feature_norm: layernorm (the default) normalises each pooled vector over its channels first.
    pooled = F.layer_norm(pooled, pooled.shape[-1:], acsa.image_feature_norm.weight, acsa.image_feature_norm.bias)
    expected = torch.stack([projection(pooled[:, r]) for r, projection in enumerate(acsa.region_projections)], dim=1)
    assert features["regions"].shape == (3, 4, 32) and features["global"].shape == (3, 32)
    assert torch.allclose(features["regions"], expected, atol=1e-5)
    global_pooled = feature_map.mean(dim=(2, 3))
    global_pooled = F.layer_norm(global_pooled, global_pooled.shape[-1:], acsa.image_feature_norm.weight, acsa.image_feature_norm.bias)
    expected_global = acsa.global_image_projection(global_pooled)
    assert torch.allclose(features["global"], expected_global, atol=1e-4)


def test_feature_norm_none_feeds_the_fcs_the_raw_pooled_vectors():
    method = build(feature_norm="none").eval()
    images = torch.randn(2, 3, *IMAGE_SIZE)
    with torch.no_grad():
        feature_map = method.image_backbone(images).feature_maps[-1]
        features = method.encode_image(images)
    assert isinstance(method.image_feature_norm, torch.nn.Identity) and isinstance(method.text_feature_norm, torch.nn.Identity)
    assert torch.allclose(features["global"], method.global_image_projection(feature_map.mean(dim=(2, 3))), atol=1e-5)
    with pytest.raises(ValueError, match="feature_norm"):
        build(feature_norm="batchnorm")


# ------------------------------------------------------------------------------ text side


def test_text_processor_pads_phrases_with_a_mask_and_pickles(acsa, processor):
    encoded = processor(CAPTIONS)
    phrases = processor.phrases(CAPTIONS)
    mask = encoded["phrase_mask"]
    assert mask.shape == (4, 4)
    assert mask.sum(dim=1).tolist() == [min(len(p), 4) for p in phrases]
    assert phrases[0][:3] == ["a man", "a red shirt", "blue jeans"]
    # Padding slots carry no tokens at all (never fake phrases).
    assert not encoded["phrase_input_ids"][~mask.bool()].any()
    assert (encoded["phrase_attention_mask"][mask.bool()].sum(dim=1) >= 3).all()  # [CLS] word [SEP]
    restored = pickle.loads(pickle.dumps(processor))
    again = restored(CAPTIONS)
    assert all(torch.equal(again[key], encoded[key]) for key in encoded)


def test_encode_text_shapes_and_padding_slots(acsa, batch):
    acsa.eval()
    with torch.no_grad():
        features = acsa.encode_text(batch["text"])
    assert features["global"].shape == (4, 32) and features["phrases"].shape == (4, 4, 32)
    mask = batch["text"]["phrase_mask"].bool()
    assert torch.equal(features["phrase_mask"].bool(), mask)
    assert not features["phrases"][~mask].any()
    # Each phrase is encoded on its own: the phrase vector equals encoding the phrase as a caption.
    first_phrase = AcsaTextProcessor(acsa.text_backbone.build_processor(8, pad_to_longest=True), None, None, 0)(["a man"])
    with torch.no_grad():
        alone = acsa.text_projection(acsa.text_backbone(first_phrase).sentence)[0]  # the [CLS] of "a man"
    assert torch.allclose(features["phrases"][0, 0], alone, atol=1e-5)


def test_more_phrase_padding_does_not_change_scores(acsa):
    acsa.eval()
    images = torch.randn(3, 3, *IMAGE_SIZE)
    wide = build(phrases={"max_phrases": 9, "max_length": 8})
    wide.load_state_dict(acsa.state_dict())
    wide.eval()
    with torch.no_grad():
        image_features = acsa.encode_image(images)
        narrow_text = acsa.encode_text(acsa.build_text_processor()(CAPTIONS))
        wide_text = wide.encode_text(wide.build_text_processor()(CAPTIONS))
        # Captions here have at most 4 phrases, so M = 9 only adds padding slots.
        assert wide_text["phrases"].shape[1] == 9
        assert torch.allclose(acsa.similarity(narrow_text, image_features), wide.similarity(wide_text, image_features), atol=1e-5)


# ------------------------------------------------------------------------------ ACAM (eqs. 1-11)


def test_acam_image_to_text_hand_computed():
    # v0 = (1, 0), v1 = (0, 1); t1 = (1, 0), t2 = (0, 2); lambda = ln 3.
    # Eq. 1: s = identity; eq. 2 (norm over i) leaves it; eq. 4: alpha_0 = (3/4, 1/4), alpha_1 = (1/4, 3/4).
    # Eq. 3: T_v0 = (0.75, 0.5), T_v1 = (0.25, 1.5); eq. 5: cos = 0.75/|T_v0|, 1.5/|T_v1|; eq. 6: mean.
    visual = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    text = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    lam = math.log(3.0)
    expected = (0.75 / math.sqrt(0.75**2 + 0.5**2) + 1.5 / math.sqrt(0.25**2 + 1.5**2)) / 2
    s_i2t, _ = cross_attention_similarity(visual, text, None, lam, lam)
    assert s_i2t.shape == (1, 1)
    assert s_i2t.item() == pytest.approx(expected, abs=1e-10)  # 0.90922
    _, _, alpha, _ = cross_attention_scores(
        F.normalize(visual[0], dim=-1) @ F.normalize(text[0], dim=-1).t(), visual[0].norm(dim=-1), text[0].norm(dim=-1),
        torch.ones(2, dtype=torch.float64), visual[0] @ visual[0].t(), text[0] @ text[0].t(), lam, lam,
    )
    assert torch.allclose(alpha, torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64))


def test_acam_text_to_image_hand_computed():
    # One phrase t1 = (2, 0) against v0 = (1, 0), v1 = (0, 1), lambda' = ln 3.
    # Eq. 8 (norm over phrases): s~' = (1, 0); softmax over the visual entities: alpha' = (3/4, 1/4);
    # V_t1 = (3/4, 1/4); eq. 10: cos(t1, V) = 0.75 / sqrt(0.625); eq. 11: one phrase.
    # Image-to-text: both entities attend to the only phrase, cos = (1, 0), eq. 6: 0.5.
    visual = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    text = torch.tensor([[[2.0, 0.0]]], dtype=torch.float64)
    lam = math.log(3.0)
    s_i2t, s_t2i = cross_attention_similarity(visual, text, None, 20.0, lam)
    assert s_t2i.item() == pytest.approx(0.75 / math.sqrt(0.625), abs=1e-10)  # 0.94868
    assert s_i2t.item() == pytest.approx(0.5, abs=1e-10)


def literal_acam(visual, text, mask, lam, lam_prime):
    """Eqs. 1-11 transcribed with Python loops over one image (m x D) and one caption (n x D)."""
    real = [j for j in range(text.shape[0]) if mask[j] > 0]
    s = {(i, j): float(F.cosine_similarity(visual[i], text[j], dim=0)) for i in range(visual.shape[0]) for j in real}  # eqs. 1, 7
    pos = {key: max(value, 0.0) for key, value in s.items()}
    image_scores = []
    for i in range(visual.shape[0]):
        tilde = {j: pos[i, j] / max(math.sqrt(sum(pos[a, j] ** 2 for a in range(visual.shape[0]))), 1e-4) for j in real}  # eq. 2
        z = sum(math.exp(lam * tilde[j]) for j in real)
        context = sum(math.exp(lam * tilde[j]) / z * text[j] for j in real)  # eqs. 3-4
        image_scores.append(float(F.cosine_similarity(visual[i], context, dim=0)))  # eq. 5
    text_scores = []
    for j in real:
        tilde = {i: pos[i, j] / max(math.sqrt(sum(pos[i, b] ** 2 for b in real)), 1e-4) for i in range(visual.shape[0])}  # eq. 8
        z = sum(math.exp(lam_prime * tilde[i]) for i in range(visual.shape[0]))
        context = sum(math.exp(lam_prime * tilde[i]) / z * visual[i] for i in range(visual.shape[0]))  # eq. 9
        text_scores.append(float(F.cosine_similarity(text[j], context, dim=0)))  # eq. 10
    return sum(image_scores) / len(image_scores), sum(text_scores) / len(text_scores)  # eqs. 6, 11


def test_acam_matches_the_literal_equations_for_every_pair():
    generator = torch.Generator().manual_seed(3)
    visual = torch.randn(3, 5, 6, generator=generator, dtype=torch.float64)
    text = torch.randn(4, 4, 6, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    s_i2t, s_t2i = cross_attention_similarity(visual, text, mask, 20.0, 5.0)
    for a in range(3):
        for b in range(4):
            expected = literal_acam(visual[a], text[b], mask[b], 20.0, 5.0)
            assert s_i2t[a, b].item() == pytest.approx(expected[0], abs=1e-8)
            assert s_t2i[a, b].item() == pytest.approx(expected[1], abs=1e-8)


def test_padded_phrases_get_no_weight_and_change_nothing():
    generator = torch.Generator().manual_seed(4)
    visual = torch.randn(3, 5, 8, generator=generator)
    text = torch.randn(2, 3, 8, generator=generator)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    base = cross_attention_similarity(visual, text * mask.unsqueeze(-1), mask, 20.0, 20.0)
    # Garbage vectors in the padding slots and extra padding slots leave both scores unchanged.
    padded_text = torch.cat([text, torch.randn(2, 4, 8, generator=generator)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4)], dim=1)
    padded = cross_attention_similarity(visual, padded_text, padded_mask, 20.0, 20.0)
    for before, after in zip(base, padded):
        assert torch.allclose(before, after, atol=1e-6)
    cosine = torch.einsum("md,nd->mn", F.normalize(visual[0], dim=-1), F.normalize(padded_text[1], dim=-1))
    _, _, alpha, alpha_t2i = cross_attention_scores(
        cosine, visual[0].norm(dim=-1), padded_text[1].norm(dim=-1), padded_mask[1],
        visual[0] @ visual[0].t(), padded_text[1] @ padded_text[1].t(), 20.0, 20.0,
    )
    assert not alpha[:, 1:].any() and torch.allclose(alpha.sum(dim=1), torch.ones(5))
    assert torch.allclose(alpha_t2i.sum(dim=0), torch.ones(7))  # softmax over the visual entities
    # The loss sees the same matrices, so padding contributes nothing to it either.
    ids = torch.tensor([0, 1])
    loss = similarity_kl_alignment(base[0][:2], ids, similarity_t2i=base[1][:2])
    padded_loss = similarity_kl_alignment(padded[0][:2], ids, similarity_t2i=padded[1][:2])
    assert torch.allclose(loss, padded_loss)
    # A caption without any phrase scores 0 (and no NaN).
    empty = cross_attention_similarity(visual, text, torch.zeros(2, 3), 20.0, 20.0)
    assert all(torch.equal(score, torch.zeros(3, 2)) for score in empty)


def test_tiled_and_candidate_acam_equal_the_full_grid():
    generator = torch.Generator().manual_seed(5)
    visual = torch.randn(7, 5, 8, generator=generator)
    text = torch.randn(6, 4, 8, generator=generator)
    mask = (torch.rand(6, 4, generator=generator) > 0.3).float()
    full = cross_attention_similarity(visual, text, mask, 20.0, 20.0)
    tiled = cross_attention_similarity(visual, text, mask, 20.0, 20.0, max_elements=45)
    candidates = torch.randint(0, 7, (6, 3), generator=generator)
    picked = candidate_cross_attention_similarity(visual[candidates], text, mask, 20.0, 20.0)
    for whole, tile, candidate in zip(full, tiled, picked):
        assert torch.allclose(whole, tile, atol=1e-6)
        assert torch.allclose(whole.t().gather(1, candidates), candidate, atol=1e-6)


# ------------------------------------------------------------------------------ losses (eq. 17)


def test_forward_returns_the_weighted_losses_of_eq_17(acsa, batch):
    acsa.train()
    torch.manual_seed(7)
    losses = acsa(batch)
    assert set(losses) == {"cmpm", "cmpc", "acsa"}
    assert all(torch.isfinite(value) and value.dim() == 0 for value in losses.values())
    torch.manual_seed(7)  # same dropout / drop-connect draws as inside forward
    image = acsa.encode_image(batch["images"])
    text = acsa.encode_text(batch["text"])
    labels = batch["labels"]
    assert torch.allclose(losses["cmpm"], cmpm_loss(image["global"], text["global"], labels), atol=1e-5)
    assert torch.allclose(losses["cmpc"], 4.0 * acsa.cmpc(image["global"], text["global"], labels), atol=1e-5)
    # Eqs. 12-16: p = softmax over the batch of scale * S, q = L1 identity match, KL both ways.
    s_i2t, s_t2i = cross_attention_similarity(
        torch.cat([image["global"].unsqueeze(1), image["regions"]], dim=1), text["phrases"], text["phrase_mask"], 20.0, 20.0
    )
    match = (labels[:, None] == labels[None, :]).float()
    q = match / match.sum(dim=1, keepdim=True)

    def kl(scores, scale=20.0):  # losses.acsa_scale, 20 by default
        p = (scale * scores).softmax(dim=1)
        return (p * (p.log() - (q + 1e-8).log())).sum(dim=1).mean()

    assert acsa.acsa_scale == 20.0
    assert torch.allclose(losses["acsa"], 0.1 * (kl(s_i2t) + kl(s_t2i.t())), atol=1e-5)


def test_acsa_scale_option_sets_the_loss_softmax_scale(batch, monkeypatch):
    import tbps.methods.acsa as acsa_module

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["scale"])
        return similarity_kl_alignment(*args, **kwargs)

    monkeypatch.setattr(acsa_module, "similarity_kl_alignment", spy)
    method = build(losses={"acsa_scale": 5.0})
    method.eval()  # no dropout or drop-connect: the loss can be recomputed
    with torch.no_grad():
        losses = method(batch)
        image, text = method.encode_image(batch["images"]), method.encode_text(batch["text"])
        s_i2t, s_t2i = method.cross_scale_similarities(image, text)
    assert method.acsa_scale == 5.0 and seen == [5.0]
    expected = similarity_kl_alignment(s_i2t, batch["labels"], scale=5.0, similarity_t2i=s_t2i)
    assert losses["acsa"].item() == pytest.approx(0.1 * expected.item(), rel=1e-5)


def test_gradients_reach_image_parts_phrase_encoder_and_projections(batch):
    # The ACSA term alone (CMPM and CMPC off) must train the regions and the phrase encoder.
    method = build(losses={"cmpm": 0.0, "cmpc": 0.0, "acsa": 0.1})
    method.train()
    losses = method(batch)
    assert set(losses) == {"acsa"}
    losses["acsa"].backward()

    def has_gradient(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert all(has_gradient(projection) for projection in method.region_projections)
    assert has_gradient(method.global_image_projection) and has_gradient(method.text_projection)
    assert has_gradient(method.image_backbone)
    assert has_gradient(method.text_backbone.model.encoder.layer[-1])  # phrases go through BERT


# ------------------------------------------------------------------------------ similarity at test


@pytest.mark.parametrize("relations", ["I-III", "I+II", "I-IV"])
def test_similarity_equals_score_candidates(acsa, relations):
    method = acsa if relations == "I-III" else build(relations=relations)
    method.similarity_max_elements = 37  # force several tiles and text blocks
    text, image = random_features()
    similarity = method.similarity(text, image)
    assert similarity.shape == (4, 5)
    candidates = torch.tensor([[0, 4, 2], [1, 1, 3], [4, 3, 2], [0, 1, 2]])
    scores = method.score_candidates(text, image, candidates)
    assert torch.allclose(scores, similarity.gather(1, candidates), atol=1e-5)
    global_only = F.normalize(text["global"], dim=-1) @ F.normalize(image["global"], dim=-1).t()
    assert not torch.allclose(similarity, global_only)  # the ACAM score is added
    method.similarity_max_elements = 1 << 23


def test_test_similarity_is_global_cosine_plus_acam_score(acsa):
    text, image = random_features()
    s_i2t, s_t2i = acsa.cross_scale_similarities(image, text)
    global_only = F.normalize(text["global"], dim=-1) @ F.normalize(image["global"], dim=-1).t()
    assert torch.allclose(acsa.similarity(text, image), global_only + (s_i2t + s_t2i).t() / 2, atol=1e-6)


@pytest.mark.parametrize("relations", ["I-III", "I-IV"])
def test_similarity_scores_with_the_evaluation_kernels_and_equals_the_reference(relations, monkeypatch):
    """similarity / score_candidates go through the evaluation kernels (counted here), without
    autograd, and give the differentiable cross-attention's numbers; training keeps it."""
    import tbps.methods.acsa as acsa_module

    calls = {"full": 0, "candidates": 0}
    for name, attribute in (("full", "fast_cross_attention_similarity"), ("candidates", "fast_candidate_cross_attention_similarity")):
        function = getattr(acsa_module, attribute)

        def wrapper(*args, _name=name, _function=function, **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(acsa_module, attribute, wrapper)
    method = build(relations=relations)
    text, image = random_features(dim=32)
    similarity = method.similarity(text, image)  # grad mode on: similarity turns it off
    candidates = torch.tensor([[0, 4, 2], [1, 1, 3], [4, 3, 2], [0, 1, 2]])
    scores = method.score_candidates(text, image, candidates)
    phrases, mask = method.text_entities(text)
    s_i2t, s_t2i = cross_attention_similarity(method.visual_entities(image), phrases, mask, method.lambda_i2t, method.lambda_t2i)
    expected = F.normalize(text["global"], dim=-1) @ F.normalize(image["global"], dim=-1).t() + (s_i2t + s_t2i).t() / 2
    assert calls == {"full": 1, "candidates": 1}
    assert not similarity.requires_grad
    assert torch.allclose(similarity, expected, atol=1e-5)
    assert torch.allclose(scores, expected.gather(1, candidates), atol=1e-5)
    # With autograd (the ACSA loss) the differentiable function scores, and gradients flow.
    visual = method.visual_entities(image).requires_grad_()
    trained = method.cross_scale_similarities({"global": visual[:, 0], "regions": visual[:, 1:]}, text)
    assert calls["full"] == 1 and trained[0].grad_fn is not None


def test_explain_pair_reports_the_attended_entity_per_phrase(acsa, processor):
    acsa.train()  # random-init EfficientNet collapses in eval mode; train mode gives distinct features
    result = acsa.explain_pair(torch.randn(3, *IMAGE_SIZE), CAPTIONS[0], processor)
    assert result["image_labels"] == ["global", "head", "upper body", "lower body", "feet"]
    assert result["text_labels"] == processor.phrases(CAPTIONS[:1])[0]
    assert result["text_to_image"].shape == (4, 5)
    assert torch.allclose(result["text_to_image"].sum(dim=1), torch.ones(4), atol=1e-5)
    assert len(result["attended"]) == 4
    table = format_phrase_attention(result)
    assert "a red shirt" in table and "feet" in table


# ------------------------------------------------------------------------------ ablation switches


def test_global_only_model_refuses_a_local_test_similarity():
    """Relations I has no cross-attention module: a local-only score would silently be the global one."""
    with pytest.raises(ValueError, match="test_similarity=local needs the cross-attention module"):
        build(relations="I", test_similarity="local")
    assert not build(relations="I").has_fine_similarity
    # It follows test_similarity, as NAFS's does (the searcher reads it when it opens an index).
    acsa = build()
    assert acsa.has_fine_similarity
    acsa.test_similarity = "global"
    assert not acsa.has_fine_similarity


@pytest.mark.parametrize(
    "overrides, entities",
    [
        ({"relations": "I"}, 0),
        ({"relations": "I+II"}, 4),
        ({"relations": "I-IV"}, 5),
        ({"local_features": "six-slices"}, 7),
        ({"region_source": "channel"}, 5),
        ({"attention": {"directions": "image-to-text"}}, 5),
        ({"attention": {"directions": "text-to-image"}}, 5),
    ],
)
def test_ablation_switches_build_and_run(batch, overrides, entities):
    method = build(**overrides)
    method.train()
    processor = method.build_text_processor()
    text = processor(CAPTIONS)
    losses = method({**batch, "text": text})
    assert all(torch.isfinite(value) for value in losses.values())
    with torch.no_grad():
        image_features = method.encode_image(batch["images"])
        text_features = method.encode_text(text)
        similarity = method.similarity(text_features, image_features)
    assert similarity.shape == (4, 4) and torch.isfinite(similarity).all()
    if entities == 0:  # relation I: global alignment only
        assert set(losses) == {"cmpm", "cmpc"} and "phrase_mask" not in text
        assert not method.has_fine_similarity and set(image_features) == {"global"}
    else:
        assert "acsa" in losses
        assert method.visual_entities(image_features).shape[1] == entities
    if overrides.get("relations") == "I-IV":
        entity_text, mask = method.text_entities(text_features)
        assert entity_text.shape[1] == 1 + 4 and (mask[:, 0] == 1).all()  # sentence among the text entities


def test_swin_t_backbone_gives_regions_at_224():
    torch.manual_seed(0)
    config = tiny_config(image_backbone={"name": "swin_t", "pretrained": False})
    method = create_method("acsa", config, num_classes=2, image_size=(224, 224))
    method.train()
    with torch.no_grad():
        feature_map = method.image_backbone(torch.randn(1, 3, 224, 224)).feature_maps[-1]
        features = method.encode_image(torch.randn(2, 3, 224, 224))
    assert feature_map.shape[1:] == (768, 7, 7)  # stage 4 of Swin-T
    assert features["regions"].shape == (2, 4, 32)


# ------------------------------------------------------------------------------ training


def test_a_few_training_steps_reduce_the_loss(batch):
    method = build()
    method.train()
    optimizer = torch.optim.AdamW(method.parameters(), lr=3e-4)
    history = []
    for step in range(6):
        torch.manual_seed(100 + step)
        losses = method(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(float(total.detach()))
    assert history[-1] < history[0], history


def test_explain_lays_phrase_attention_on_the_six_parts(acsa):
    acsa.eval()
    phrases, maps = acsa.explain(torch.randn(3, *IMAGE_SIZE), CAPTIONS[0])
    assert phrases and maps.shape == (len(phrases), 6, 1)
    assert (maps >= 0).all()
    # alpha' sums to 1 over the visual entities and each entity spreads its weight over its parts.
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(len(phrases)))
