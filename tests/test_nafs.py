"""NAFS (Gao et al. 2021): staircase network, locality-constrained BERT, contextual non-local
attention (eqs. 2-5), CSAL + CMPM + CMPC (eq. 7), similarity / two-stage scoring, ablations.

Tiny randomly initialised models (EfficientNet-Lite0 / ResNet-50 with ``pretrained: false``,
the bundled MiniLM's architecture cut to two layers), 64x32 images, data made here.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from tbps.losses import CMPCLoss, cmpm_loss, similarity_kl_alignment
from tbps.models.attention import (
    ContextualNonLocalAttention,
    attention_selectivity,
    bidirectional_non_local_similarity,
    candidate_non_local_similarity,
    chunked_non_local_similarity,
    focal_filter,
    non_local_similarity,
)
from tbps.models.backbones import create_image_backbone
from tbps.models.registry import create_method, list_methods

CAPTIONS = [
    "a man in a red shirt, blue jeans and black shoes.",
    "a woman wearing a white dress",
    "he carries a bag, wears glasses, and has short hair",
    "girl, skirt",
]
LABELS = torch.tensor([0, 1, 0, 2])
IMAGE_SIZE = (64, 32)


def tiny_config(**overrides):
    config = {
        "embed_dim": 32,
        "max_text_length": 24,
        "max_sub_sentences": 4,
        "image_backbone": {"name": "efficientnet_lite0", "pretrained": False},
        "text_backbone": {"name": "minilm", "pretrained": False},
    }
    config.update(overrides)
    return config


def build(num_classes: int = 3, **overrides):
    torch.manual_seed(0)
    method = create_method("nafs", tiny_config(**overrides), num_classes=num_classes, image_size=IMAGE_SIZE)
    backbone = method.text_backbone.backbone
    if hasattr(backbone, "model"):
        # Two transformer layers are enough to exercise every code path and keep tests fast.
        backbone.model.encoder.layer = backbone.model.encoder.layer[:2]
    return method


def make_batch(method, captions=CAPTIONS, labels=LABELS):
    torch.manual_seed(1)
    processor = method.build_text_processor()
    return {
        "images": torch.randn(len(captions), 3, *IMAGE_SIZE),
        "text": processor(captions),
        "captions": list(captions),
        "labels": labels,
        "person_ids": labels + 100,
    }


def encode_small_gallery(nafs):
    """``(text features, image features)`` of ``CAPTIONS[:3]`` and 5 random images, without
    gradients (the scoring tests' gallery; ``nafs`` already in eval mode)."""
    data = make_batch(nafs, CAPTIONS[:3], LABELS[:3])
    with torch.no_grad():
        images = nafs.encode_image(torch.randn(5, 3, *IMAGE_SIZE))
        return nafs.encode_text(data["text"]), images


# Tensors here are tiny: intra-op threads only add synchronisation (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def nafs():
    return build()


@pytest.fixture(scope="module")
def batch(nafs):
    return make_batch(nafs)


# ------------------------------------------------------------------------------ registry, configs


def test_registry_lists_nafs():
    assert "nafs" in list_methods()


@pytest.mark.parametrize("dataset", ["synthetic", "cuhk-pedes", "icfg-pedes", "rstpreid"])
def test_configs_load_with_paper_hyper_parameters(dataset):
    from tbps.config import load_config

    config = load_config(f"nafs/{dataset}")
    assert config.method == "nafs"
    model = config.model
    assert (model.losses.cmpm, model.losses.cmpc, model.losses.csal) == (1.0, 1.0, 0.1)  # eq. 7
    assert (model.region_stripes, model.patch_stripes) == (2, 3)
    if dataset != "synthetic":
        assert list(config.data.image_size) == [384, 128] and config.data.batch_size == 64
        assert model.image_backbone.name == "resnet50" and model.image_backbone.last_stride == 1
        assert model.embed_dim == 768 and config.optim.optimizer == "adam"
        assert config.optim.lr == pytest.approx(1.1e-3)
        assert config.optim.lr * config.optim.backbone_lr_mult == pytest.approx(1.1e-4)
    else:
        assert model.image_backbone.name == "efficientnet_lite0" and model.text_backbone.name == "minilm"


# ------------------------------------------------------------------------------ text side


def test_text_processor_layout_and_picklable(nafs):
    processor = nafs.build_text_processor()
    processor = pickle.loads(pickle.dumps(processor))
    text = processor(CAPTIONS)
    size, length, slots = len(CAPTIONS), 24, 4
    assert text["input_ids"].shape == (size, length)
    assert text["token_spans"].shape == (size, slots, 2)
    assert text["sub_input_ids"].shape == (size, length + slots)
    # Caption 0 has one comma -> 2 sub-sentences; a caption without commas is one sub-sentence.
    assert text["num_sub_sentences"].tolist() == [2, 1, 3, 2]
    # Word tokens exclude [CLS] and [SEP].
    assert text["word_mask"][1].sum() == text["attention_mask"][1].sum() - 2
    tokenizer = nafs.text_backbone.backbone.build_processor(24)
    for row in range(size):
        for sub in range(int(text["num_sub_sentences"][row])):
            start, end = text["token_spans"][row, sub].tolist()
            slot = int(text["sub_cls_index"][row, sub])
            assert text["sub_input_ids"][row, slot] == tokenizer.cls_id
            copy = text["sub_input_ids"][row, slot + 1 : slot + 1 + end - start]
            assert torch.equal(copy, text["input_ids"][row, start:end])
            assert text["sub_position_ids"][row, slot + 1 : slot + 1 + end - start].tolist() == list(range(start, end))
            assert (text["sub_groups"][row, slot : slot + 1 + end - start] == sub).all()


def test_text_processor_truncation_drops_cut_sub_sentences(nafs):
    processor = nafs.build_text_processor()
    long_caption = ", ".join(["a red hat"] * 20)  # 5 sub-sentences fit in 24 tokens
    text = processor([long_caption, "no commas here"])
    assert text["input_ids"].shape[1] == 24
    assert int(text["num_sub_sentences"][0]) == 4  # capped at max_sub_sentences
    assert int(text["token_spans"][0, :, 1].max()) <= 23
    assert int(text["num_sub_sentences"][1]) == 1


def test_bilstm_sub_sentence_spans():
    from tbps.methods.nafs import word_sub_sentence_spans
    from tbps.text.tokenizers import WordVocabulary

    words = WordVocabulary.tokenize("a man, in red , , shoes. short hair")
    # ['a', 'man', ',', 'in', 'red', ',', ',', 'shoes', '.', 'short', 'hair']
    assert word_sub_sentence_spans(words, 8) == [(0, 3), (3, 7), (7, 9), (9, 11)]
    assert word_sub_sentence_spans(words, 2) == [(0, 3), (3, 7)]
    assert word_sub_sentence_spans(["no", "commas"], 8) == [(0, 2)]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_locality_mask_blocks_attention_across_sub_sentences(nafs, implementation):
    """Changing the tokens of sub-sentence 2 leaves sub-sentence 1's [CLS] unchanged (eq. 1)."""
    encoder = nafs.text_backbone
    model = encoder.backbone.model
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        encoder.eval()
        processor = nafs.build_text_processor()
        text = processor(["a man in a red shirt, blue jeans and black shoes", "a man in a red shirt, a green hat"])
        with torch.no_grad():
            scales = encoder(text)
        assert scales.sub_sentences.shape == (2, 4, encoder.hidden_size)
        assert torch.allclose(scales.sub_sentences[0, 0], scales.sub_sentences[1, 0], atol=1e-5)
        assert not torch.allclose(scales.sub_sentences[0, 1], scales.sub_sentences[1, 1], atol=1e-3)
        # The sentence [CLS] sees the whole caption, so it does change.
        assert not torch.allclose(scales.sentence[0], scales.sentence[1], atol=1e-3)
        assert scales.sub_mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
        assert (scales.sub_sentences[:, 2:] == 0).all()
    finally:
        model.set_attn_implementation(previous)
        encoder.train()


def test_sub_sentence_cls_equals_isolated_sub_sentence(nafs):
    """The packed row gives the [CLS] BERT computes on the sub-sentence alone (same positions)."""
    encoder = nafs.text_backbone.eval()
    processor = nafs.build_text_processor()
    text = processor(["a man in a red shirt, blue jeans"])
    with torch.no_grad():
        packed = encoder(text).sub_sentences[0, 1]
        start, end = text["token_spans"][0, 1].tolist()
        ids = torch.cat([torch.tensor([processor.cls_id]), text["input_ids"][0, start:end]]).unsqueeze(0)
        positions = torch.cat([torch.tensor([start - 1]), torch.arange(start, end)]).unsqueeze(0)
        alone = encoder.backbone.model(input_ids=ids, position_ids=positions, token_type_ids=torch.zeros_like(ids))
    encoder.train()
    assert torch.allclose(packed, alone.last_hidden_state[0, 0], atol=1e-5)


def test_text_features_shapes(nafs, batch):
    nafs.eval()
    with torch.no_grad():
        features = nafs.encode_text(batch["text"])
    nafs.train()
    # n = sentence + S sub-sentence slots + L word slots
    assert features["global"].shape == (4, 32)
    assert features["local"].shape == (4, 1 + 4 + 24, 32)
    assert features["local_mask"].shape == (4, 1 + 4 + 24)
    expected = 1 + batch["text"]["num_sub_sentences"] + batch["text"]["word_mask"].sum(1)
    assert torch.equal(features["local_mask"].sum(1).long(), expected)


# ------------------------------------------------------------------------------ image side


def test_split_and_shuffle_is_a_permutation_of_stripes():
    from tbps.methods.nafs import split_and_shuffle

    torch.manual_seed(0)
    height = 10  # uneven stripes for 3: rows [0-3], [4-6], [7-9]
    feature_map = torch.arange(height, dtype=torch.float32).view(1, 1, height, 1).expand(6, 2, height, 3).contiguous()
    shuffled = split_and_shuffle(feature_map, 3)
    stripes = [list(range(0, 4)), list(range(4, 7)), list(range(7, 10))]
    orders = set()
    for sample in range(6):
        rows = shuffled[sample, 0, :, 0].long().tolist()
        assert sorted(rows) == list(range(height))
        # The output is the three stripes, each intact, in some order.
        pieces, at = [], 0
        while at < height:
            stripe = next(s for s in stripes if s[0] == rows[at])
            assert rows[at : at + len(stripe)] == stripe
            pieces.append(stripes.index(stripe))
            at += len(stripe)
        orders.add(tuple(pieces))
        assert torch.equal(shuffled[sample, 1], shuffled[sample, 0])  # same rows for every channel
    assert len(orders) > 1  # per-sample permutations


def test_split_and_shuffle_training_only():
    from tbps.methods.nafs import StaircaseNetwork

    torch.manual_seed(0)
    trunk = create_image_backbone({"name": "efficientnet_lite0", "pretrained": False})
    network = StaircaseNetwork(trunk, use_regions=True, use_patches=True, split_shuffle=True)
    seen = {}
    network.region_branch.register_forward_pre_hook(lambda module, args: seen.__setitem__("input", args[0]))
    images = torch.randn(2, 3, *IMAGE_SIZE)
    network.eval()
    with torch.no_grad():
        network(images)
        original = trunk(images).feature_maps[-3]
        assert torch.equal(seen["input"], original)
        network.train()
        trunk.eval()  # same trunk output as above, only the shuffle differs
        network.region_branch.eval()
        network.patch_branch.eval()
        torch.manual_seed(3)
        network(images)
    assert not torch.equal(seen["input"], original)
    assert torch.equal(seen["input"].sort(dim=2).values, original.sort(dim=2).values)


@pytest.mark.parametrize("backbone, channels", [("efficientnet_lite0", 1280), ("resnet50", 2048)])
def test_staircase_branches_shapes(backbone, channels):
    from tbps.methods.nafs import StaircaseNetwork

    torch.manual_seed(0)
    trunk = create_image_backbone({"name": backbone, "pretrained": False, "last_stride": 1})
    network = StaircaseNetwork(trunk, use_regions=True, use_patches=True).eval()
    with torch.no_grad():
        maps = network(torch.randn(2, 3, *IMAGE_SIZE))
    # Both branches end in the global branch's last stage, at its resolution, which last_stride 1
    # keeps at 1/16 of the input: the branch points are stage maps, not strides, and the copied
    # stages carry the stride-1 change.
    assert maps.global_map.shape[1] == maps.region_map.shape[1] == maps.patch_map.shape[1] == channels
    assert maps.global_map.shape[2:] == (IMAGE_SIZE[0] // 16, IMAGE_SIZE[1] // 16)
    assert maps.region_map.shape[2:] == maps.patch_map.shape[2:] == maps.global_map.shape[2:]
    # Branches are copies (own parameters), not the global branch's modules.
    trunk_ids = {id(p) for p in trunk.parameters()}
    assert not trunk_ids & {id(p) for p in network.region_branch.parameters()}
    assert not trunk_ids & {id(p) for p in network.patch_branch.parameters()}
    if backbone == "resnet50":
        assert len(network.region_branch) == 2 and len(network.patch_branch) == 1  # layer3+layer4 / layer4


def test_branches_copied_from_frozen_stages_stay_frozen():
    from tbps.methods.nafs import StaircaseNetwork

    trunk = create_image_backbone({"name": "efficientnet_lite0", "pretrained": False, "freeze_stages": 5})
    network = StaircaseNetwork(trunk, use_regions=True, use_patches=True).train()
    norms = [m for m in network.patch_branch.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert not any(p.requires_grad for p in network.patch_branch.parameters())


def test_image_features_shapes(nafs, batch):
    nafs.eval()
    with torch.no_grad():
        features = nafs.encode_image(batch["images"])
    nafs.train()
    assert features["global"].shape == (4, 32)
    assert features["local"].shape == (4, 1 + 2 + 3, 32)  # global + n1 regions + n2 patches
    assert torch.equal(features["local"][:, 0], features["global"])


# ------------------------------------------------------------------------------ non-local attention


def test_focal_filter_hand_computed():
    # s^ row (1, 0.5): sum 1.5, n = 2 -> [2*1 - 1.5]_+ * 1 = 0.5, [2*0.5 - 1.5]_+ * 0.5 = 0
    # s^ row (0, 0.5): [0 - 0.5]_+ * 0 = 0, [1 - 0.5]_+ * 0.5 = 0.25
    normalized = torch.tensor([[1.0, 0.5], [0.0, 0.5]])
    assert torch.allclose(focal_filter(normalized), torch.tensor([[0.5, 0.0], [0.0, 0.25]]))
    # A masked key neither counts in n nor in the row sum, and comes out 0.
    padded = torch.tensor([[1.0, 0.5, 0.7]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(focal_filter(padded, mask), torch.tensor([[0.5, 0.0, 0.0]]))


def test_non_local_attention_hand_computed():
    """Image-to-text eqs. 2-5 on a 2x2 case worked by hand.

    I_Q = (1,0), (0,1); T_K = (1,0), (1,1); I_V = T_V = identity rows.
    eq. 2: s = [[1, 1/sqrt2], [0, 1/sqrt2]]; normalised over images: s^ = [[1, .5], [0, .5]];
    focal: s~ = [[.5, 0], [0, .25]]; eq. 3 with lambda = ln 3:
    alpha_1 = (sqrt3, 1) / (sqrt3 + 1), alpha_2 = (1, 3^.25) / (1 + 3^.25);
    eq. 4: R_1 = alpha_11 / ||alpha_1|| = sqrt3 / 2, R_2 = alpha_22 / ||alpha_2|| = 3^.25 / sqrt(1 + sqrt3);
    eq. 5: S = (R_1 + R_2) / 2.
    """
    image_queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    text_keys = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    values = torch.eye(2).unsqueeze(0)
    similarity, alpha = non_local_similarity(
        image_queries, values, None, text_keys, values, None, math.log(3.0), return_attention=True
    )
    expected_alpha = torch.tensor(
        [[math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)], [1 / (1 + 3**0.25), 3**0.25 / (1 + 3**0.25)]]
    )
    assert torch.allclose(alpha[0, 0], expected_alpha, atol=1e-6)
    expected = (math.sqrt(3) / 2 + 3**0.25 / math.sqrt(1 + math.sqrt(3))) / 2
    assert similarity.shape == (1, 1)
    assert similarity.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.831126, abs=1e-5)


def reference_non_local(q, v, q_mask, k, u, k_mask, lam, focal=True, scaling="none"):
    """Eqs. 2-5 written literally, one pair and one feature at a time.

    ``scaling="counts"``: lambda times Q^2 / K (Q with the focal filter off) for the pair's
    Q valid queries and K valid keys.
    """
    result = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    lam_given = lam
    for i in range(q.shape[0]):
        for j in range(k.shape[0]):
            queries = [a for a in range(q.shape[1]) if q_mask[i, a]]
            keys = [b for b in range(k.shape[1]) if k_mask[j, b]]
            lam = lam_given
            if scaling == "counts":
                lam = lam_given * (len(queries) ** 2 / len(keys) if focal else len(queries))
            s = {(a, b): max(F.cosine_similarity(q[i, a], k[j, b], dim=0).item(), 0.0) for a in queries for b in keys}
            column = {b: sum(s[(a, b)] for a in queries) for b in keys}
            s_hat = {key: s[key] / (column[key[1]] + 1e-8) for key in s}
            total = 0.0
            for a in queries:
                if focal:
                    s_tilde = {b: max(sum(s_hat[(a, b)] - s_hat[(a, c)] for c in keys), 0.0) * s_hat[(a, b)] for b in keys}
                else:
                    s_tilde = {b: s_hat[(a, b)] for b in keys}
                denominator = sum(math.exp(lam * s_tilde[c]) for c in keys)
                context = sum(math.exp(lam * s_tilde[b]) / denominator * u[j, b].double() for b in keys)
                total += F.cosine_similarity(v[i, a].double(), context, dim=0).item()
            result[i, j] = total / len(queries)
    return result


@pytest.mark.parametrize("scaling", ["none", "counts"])
@pytest.mark.parametrize("focal", [True, False])
def test_non_local_similarity_matches_literal_equations(focal, scaling):
    torch.manual_seed(0)
    q, v = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    k, u = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    q_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 1]])
    k_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    options = {"focal": focal, "lambda_scaling": scaling}
    got = non_local_similarity(q, v, q_mask, k, u, k_mask, 7.0, **options)
    expected = reference_non_local(q, v, q_mask, k, u, k_mask, 7.0, focal, scaling)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    # Tiled evaluation and per-candidate scoring give the same numbers.
    tiled = chunked_non_local_similarity(q, v, q_mask, k, u, k_mask, 7.0, max_elements=24, **options)
    assert torch.allclose(tiled, got, atol=1e-6)
    candidates = torch.tensor([[1, 0, 1], [0, 0, 1]])  # key-side rows: text j gets query items
    per_candidate = candidate_non_local_similarity(
        q[candidates], v[candidates], q_mask[candidates], k, u, k_mask, 7.0, **options
    )
    assert torch.allclose(per_candidate, got.t().gather(1, candidates), atol=1e-6)
    swapped = candidate_non_local_similarity(
        k, u, k_mask, q[candidates], v[candidates], q_mask[candidates], 7.0, **options
    )
    reverse = non_local_similarity(k, u, k_mask, q, v, q_mask, 7.0, **options)
    assert torch.allclose(swapped, reverse.gather(1, candidates), atol=1e-6)
    # Both directions at once (shared pair products), with a different lambda each.
    s, s_prime = bidirectional_non_local_similarity(q, v, q_mask, k, u, k_mask, 7.0, 3.0, focal, lambda_scaling=scaling)
    assert torch.allclose(s, got, atol=1e-6)
    expected_prime = reference_non_local(k, u, k_mask, q, v, q_mask, 3.0, focal, scaling)
    assert torch.allclose(s_prime.t().double(), expected_prime, atol=1e-5)


def test_count_scaling_hand_computed():
    """The 2x2 case of test_non_local_attention_hand_computed: Q = K = 2, so "counts" multiplies
    lambda by Q^2 / K = 2 (by Q = 2 without the focal filter)."""
    image_queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    text_keys = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    values = torch.eye(2).unsqueeze(0)
    for focal in (True, False):
        literal = non_local_similarity(image_queries, values, None, text_keys, values, None, math.log(3.0), focal)
        counted = non_local_similarity(
            image_queries, values, None, text_keys, values, None, math.log(3.0) / 2, focal, lambda_scaling="counts"
        )
        assert counted.item() == pytest.approx(literal.item(), abs=1e-6)
    with pytest.raises(ValueError, match="lambda_scaling"):
        non_local_similarity(image_queries, values, None, text_keys, values, None, 1.0, lambda_scaling="keys")


@pytest.mark.parametrize("focal", [True, False])
def test_count_scaling_removes_the_dependence_on_feature_counts(focal):
    """Every feature twice (queries and keys) is the same set: with "counts" each original key
    keeps its attention (split over its two copies) and S is unchanged; as printed (eq. 3) the
    focal score, and with it the softmax's sharpness, moves with the counts."""
    torch.manual_seed(0)
    q, v = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    k, u = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    twice = lambda x: x.repeat_interleave(2, dim=1)  # noqa: E731
    for scaling in ("counts", "none"):
        s, alpha = non_local_similarity(q, v, None, k, u, None, 4.0, focal, return_attention=True, lambda_scaling=scaling)
        s2, alpha2 = non_local_similarity(
            twice(q), twice(v), None, twice(k), twice(u), None, 4.0, focal, return_attention=True, lambda_scaling=scaling
        )
        per_key = alpha2[:, :, ::2].unflatten(-1, (5, 2)).sum(-1)  # first copy of each query, copies of a key summed
        same = torch.allclose(per_key, alpha, atol=1e-5) and torch.allclose(s2, s, atol=1e-5)
        assert same == (scaling == "counts")


# Realistic shapes for the non-local attention: NAFS's m = 6 image features (global, 2 regions,
# 3 patches) against 1 + 3 + 20-30 text features (sentence, sub-sentences, words), D = 256.
IMAGE_PARTS = [{0, 1, 2}, {0, 1}, {1, 2}, {0}, {1}, {2}]  # body parts (head, upper, lower) each sees


def structured_pairs(batch=16, dim=256, offset=0.75, seed=0, text_slots=34, attribute_words=9):
    """``batch`` matched (image, caption) feature sets with structure, as projected queries / keys.

    Each person has three unit body-part directions. Image: the whole body, two regions
    (head + upper, upper + lower) and three patches (one part each), plus small noise. Caption:
    the sentence (whole body), three sub-sentences (one part each), then 20-30 words of which
    ``attribute_words`` name a part ("a word = an image part + noise") and the rest (function
    words) match nothing, padded to ``text_slots`` with a mask. Every feature shares one
    ``offset`` direction, as pretrained features do (matched cosines 0.41 on average).
    Returns image ``[B, 6, D]``, text ``[B, text_slots, D]``, the text mask and the text slots'
    part sets.
    """
    g = torch.Generator().manual_seed(seed)

    def noise(*shape, scale):
        return torch.randn(*shape, dim, generator=g) * scale / math.sqrt(dim)

    common = F.normalize(torch.randn(dim, generator=g), dim=0) * offset
    parts = F.normalize(torch.randn(batch, 3, dim, generator=g), dim=-1)
    whole = F.normalize(parts.sum(1, keepdim=True), dim=-1)
    regions = F.normalize(torch.stack([parts[:, 0] + parts[:, 1], parts[:, 1] + parts[:, 2]], 1), dim=-1)
    image = torch.cat([whole, regions, parts], 1) + common + noise(batch, 6, scale=0.5)
    word_part = torch.arange(attribute_words) % 3
    words = torch.cat([parts[:, word_part], torch.zeros(batch, text_slots - 4 - attribute_words, dim)], 1)
    text = torch.cat([whole, parts, words], 1) + common
    text = text + torch.cat([noise(batch, 4, scale=0.5), noise(batch, text_slots - 4, scale=1.0)], 1)
    lengths = 4 + torch.randint(20, text_slots - 4 + 1, (batch,), generator=g)
    mask = (torch.arange(text_slots) < lengths[:, None]).float()
    text_parts = [{0, 1, 2}, {0}, {1}, {2}] + [{int(p)} for p in word_part]
    text_parts += [set()] * (text_slots - len(text_parts))
    return image, text, mask, text_parts


def relevant_mass(alpha, query_parts, key_parts, query_mask, key_mask):
    """Mean attention on keys sharing a body part with the query, over the valid queries that
    name a part, and the same for uniform attention over the valid keys."""
    relevant = torch.tensor([[float(bool(a & b)) for b in key_parts] for a in query_parts])
    weights = torch.tensor([float(bool(a)) for a in query_parts]) * query_mask
    mass = (alpha * relevant).sum(-1)
    uniform = ((relevant * key_mask).sum(-1) / key_mask.sum(-1)).expand_as(mass)
    return float((mass * weights).sum() / weights.sum()), float((uniform * weights).sum() / weights.sum())


def non_local_selectivity(attention, image, text, mask, text_parts):
    alpha, alpha_t2i = attention.matched_attention(image, text, text_mask=mask)
    image_mask = torch.ones(image.shape[:2])
    i2t = attention_selectivity(alpha, image_mask, mask.unsqueeze(1))
    t2i = attention_selectivity(alpha_t2i, mask, image_mask.unsqueeze(1))
    i2t["relevant"], i2t["relevant_uniform"] = relevant_mass(alpha, IMAGE_PARTS, text_parts, image_mask, mask.unsqueeze(1))
    t2i["relevant"], t2i["relevant_uniform"] = relevant_mass(alpha_t2i, text_parts, IMAGE_PARTS, mask, torch.ones(1, 1, 6))
    return i2t, t2i


def is_selective(stats):
    """Neither near one-hot nor near uniform, and on the right features.

    Thresholds from the measurements (the default lambdas give, image-to-text / text-to-image,
    max weight 0.25 / 0.55, i.e. 7.2x / 3.3x a uniform row, entropy 0.74 / 0.61, relevant mass
    0.74 / 0.99 against 0.27 / 0.59 uniform): max weight below 0.9, at least twice uniform
    (1.5x would be a max of 0.25 over 6 image features; 20/20 as printed gives 1.1x, entropy
    1.00 text-to-image), normalised entropy below 0.9, and at least 1.2x the uniform attention
    on the keys that share a body part.
    """
    return (
        stats["max_weight"] < 0.9
        and stats["max_over_uniform"] > 2.0
        and stats["entropy"] < 0.9
        and stats["relevant"] > 1.2 * stats["relevant_uniform"]
    )


def test_default_lambdas_are_selective_in_both_directions_on_realistic_shapes():
    image, text, mask, text_parts = structured_pairs()
    default = ContextualNonLocalAttention(256)
    assert default.lambda_scaling == "counts"
    i2t, t2i = non_local_selectivity(default, image, text, mask, text_parts)
    assert is_selective(i2t), i2t
    assert is_selective(t2i), t2i
    # Comparable selectivity: the two directions' normalised entropies within 0.2 of each other.
    assert abs(i2t["entropy"] - t2i["entropy"]) < 0.2
    # The old defaults, 20 for both as eq. 3 prints it: text-to-image is near uniform.
    old = ContextualNonLocalAttention(256, 20.0, 20.0, lambda_scaling="none")
    old_i2t, old_t2i = non_local_selectivity(old, image, text, mask, text_parts)
    assert not is_selective(old_t2i) and old_t2i["max_over_uniform"] < 1.25 and old_t2i["entropy"] > 0.98
    assert old_i2t["entropy"] < old_t2i["entropy"] - 0.5  # and image-to-text far sharper (0.34 vs 1.00)


@pytest.mark.parametrize("scaling", ["counts", "none"])
def test_attention_module_directions(scaling):
    torch.manual_seed(0)
    images, texts = torch.randn(3, 4, 8), torch.randn(2, 5, 8)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    both = ContextualNonLocalAttention(8, 5.0, 9.0, lambda_scaling=scaling)
    s, s_prime = both(images, texts, text_mask=text_mask)
    assert s.shape == s_prime.shape == (3, 2)
    iq, iv, tk, tv = both.project(images, texts)
    assert torch.allclose(s, non_local_similarity(iq, iv, None, tk, tv, text_mask, 5.0, lambda_scaling=scaling))
    # Text-to-image: text keys query the image queries, lambda_2, transposed to [images x texts].
    expected_prime = non_local_similarity(tk, tv, text_mask, iq, iv, None, 9.0, lambda_scaling=scaling)
    assert torch.allclose(s_prime, expected_prime.t())
    # matched_attention: the weights of the pairs (image i, text i) behind those scores.
    _, alpha = non_local_similarity(iq[:2], iv[:2], None, tk, tv, text_mask, 5.0, return_attention=True, lambda_scaling=scaling)
    _, alpha_prime = non_local_similarity(
        tk, tv, text_mask, iq[:2], iv[:2], None, 9.0, return_attention=True, lambda_scaling=scaling
    )
    matched, matched_prime = both.matched_attention(iq[:2], tk, text_mask=text_mask)
    assert torch.allclose(matched, alpha[[0, 1], [0, 1]], atol=1e-6)
    assert torch.allclose(matched_prime, alpha_prime[[0, 1], [0, 1]], atol=1e-6)
    one_way = ContextualNonLocalAttention(8, directions="image-to-text")
    assert one_way(images, texts, text_mask=text_mask)[1] is None
    with pytest.raises(ValueError, match="lambda_scaling"):
        ContextualNonLocalAttention(8, lambda_scaling="keys")


def test_alignment_weights_for_figure_4(nafs, batch):
    nafs.eval()
    with torch.no_grad():
        images = nafs.encode_image(batch["images"][:1])
        texts = nafs.encode_text({k: v[:1] for k, v in batch["text"].items()})
    nafs.train()
    result = nafs.alignment_weights(images, texts)
    valid = int(texts["local_mask"][0].sum())
    assert result["weights"].shape == (valid, 6)
    assert torch.allclose(result["weights"].sum(1), torch.ones(valid))  # a softmax over image features
    assert result["image_labels"] == ["global", "region 1", "region 2", "patch 1", "patch 2", "patch 3"]
    assert result["text_labels"][:3] == ["sentence", "sub-sentence 1", "sub-sentence 2"]
    assert len(result["text_labels"]) == valid


def test_attention_defaults_and_options_reach_the_module(nafs, batch):
    from tbps.models.attention import NON_LOCAL_LAMBDA_IMAGE, NON_LOCAL_LAMBDA_TEXT

    # Defaults (the fixture sets no attention or loss options): count-free lambda 4 both ways, CSAL scale 20.
    attention = nafs.attention
    assert (attention.image_inverse_temperature, attention.text_inverse_temperature) == (4.0, 4.0)
    assert (NON_LOCAL_LAMBDA_IMAGE, NON_LOCAL_LAMBDA_TEXT) == (4.0, 4.0) and attention.lambda_scaling == "counts"
    assert nafs.csal_scale == 20.0
    method = build(attention={"lambda_scaling": "none", "lambda_image": 3.0, "lambda_text": 7.0}, losses={"csal_scale": 7.5})
    attention = method.attention
    assert (attention.image_inverse_temperature, attention.text_inverse_temperature, attention.lambda_scaling) == (3.0, 7.0, "none")
    method.eval()
    with torch.no_grad():
        losses = method(batch)
        image, text = method.encode_image(batch["images"]), method.encode_text(batch["text"])
        iq, iv, tk, tv = attention.project(image["local"], text["local"])
        s = non_local_similarity(iq, iv, None, tk, tv, text["local_mask"], 3.0)  # eq. 3 as printed
        s_prime = non_local_similarity(tk, tv, text["local_mask"], iq, iv, None, 7.0).t()
    expected = 0.1 * similarity_kl_alignment(s, LABELS, scale=7.5, similarity_t2i=s_prime)
    assert losses["csal"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="lambda_scaling"):
        build(attention={"lambda_scaling": "per-key"})


def test_test_similarity_local_needs_local_features(nafs):
    with pytest.raises(ValueError, match="test_similarity=local"):
        build(scales="global", test_similarity="local")
    # Whether there is a fine score to search or re-rank by (the searcher and the bench ask).
    assert not build(scales="global").has_fine_similarity and nafs.has_fine_similarity
    nafs.test_similarity = "global"
    assert not nafs.has_fine_similarity
    nafs.test_similarity = "global+local"
    # Set on a built model (how a checkpoint is scored both ways) it is checked the same way.
    with pytest.raises(ValueError, match="test_similarity must be one of"):
        nafs.test_similarity = "eq5"
    saved, nafs.has_local = nafs.has_local, False
    try:
        with pytest.raises(ValueError, match="test_similarity=local"):
            nafs.test_similarity = "local"
    finally:
        nafs.has_local = saved
    assert nafs.test_similarity == "global+local"


def test_attention_selectivity_reports_both_directions(nafs, batch):
    nafs.eval()
    with torch.no_grad():
        images, texts = nafs.encode_image(batch["images"]), nafs.encode_text(batch["text"])
        stats = nafs.attention_selectivity(images, texts)
        queries, keys = nafs.attention.image_query(images["local"]), nafs.attention.text_key(texts["local"])
        alpha, alpha_t2i = nafs.attention.matched_attention(queries, keys, text_mask=texts["local_mask"])
    nafs.train()
    valid = texts["local_mask"].sum(1)
    t2i, i2t = stats["text-to-image"], stats["image-to-text"]
    assert t2i["uniform"] == pytest.approx(1 / 6)
    assert i2t["uniform"] == pytest.approx((1 / valid).mean().item(), rel=1e-5)
    assert i2t["max_weight"] == pytest.approx(alpha.amax(-1).mean().item(), rel=1e-5)
    weights = texts["local_mask"]
    t2i_max = (alpha_t2i.amax(-1) * weights).sum() / weights.sum()  # padded word slots are not queries
    assert t2i["max_weight"] == pytest.approx(t2i_max.item(), rel=1e-5)
    for direction in (i2t, t2i):
        assert 0.0 <= direction["entropy"] <= 1.0 and direction["max_over_uniform"] >= 1.0


# ------------------------------------------------------------------------------ losses (eq. 7)


def test_forward_returns_weighted_losses_of_eq_7(nafs, batch):
    nafs.eval()  # deterministic (no shuffle, no dropout) so the losses can be recomputed
    with torch.no_grad():
        losses = nafs(batch)
        image, text = nafs.encode_image(batch["images"]), nafs.encode_text(batch["text"])
        s, s_prime = nafs.attention(image["local"], text["local"], text_mask=text["local_mask"])
        expected_csal = similarity_kl_alignment(s, LABELS, scale=nafs.csal_scale, similarity_t2i=s_prime)
        expected_cmpm = cmpm_loss(image["global"], text["global"], LABELS)
        expected_cmpc = nafs.cmpc(image["global"], text["global"], LABELS)
    nafs.train()
    assert set(losses) == {"cmpm", "cmpc", "csal"}
    assert losses["cmpm"].item() == pytest.approx(1.0 * expected_cmpm.item(), rel=1e-5)
    assert losses["cmpc"].item() == pytest.approx(1.0 * expected_cmpc.item(), rel=1e-5)
    assert losses["csal"].item() == pytest.approx(0.1 * expected_csal.item(), rel=1e-5)
    assert isinstance(nafs.cmpc, CMPCLoss)


def test_csal_matches_its_equation():
    """CSAL: KL of softmax(scale * S) rows to q_ij = y_ij / sum_k y_ik, images then texts (S')."""
    torch.manual_seed(0)
    s, s_prime = torch.rand(4, 4) * 2 - 1, torch.rand(4, 4) * 2 - 1
    ids = torch.tensor([0, 1, 0, 2])
    y = (ids[:, None] == ids[None, :]).double()
    q = y / y.sum(1, keepdim=True)

    def kl(rows):
        p = (10 * rows.double()).softmax(1)
        return (p * (p.log() - (q + 1e-8).log())).sum(1).mean()

    expected = kl(s) + kl(s_prime.t())
    assert similarity_kl_alignment(s, ids, scale=10.0, similarity_t2i=s_prime).item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------ similarity


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"test_similarity": "local"},
        {"alignment": "separate"},
        {"directions": "text-to-image"},
        {"directions": "image-to-text", "test_similarity": "local"},
    ],
)
def test_similarity_equals_score_candidates(nafs, switches):
    # Test-time switches only change how the same features are scored, so one model serves all.
    saved = (nafs.test_similarity, nafs.alignment, nafs.attention.directions, nafs.similarity_max_elements)
    nafs.test_similarity = switches.get("test_similarity", nafs.test_similarity)
    nafs.alignment = switches.get("alignment", nafs.alignment)
    nafs.attention.directions = switches.get("directions", nafs.attention.directions)
    nafs.eval()
    try:
        texts, images = encode_small_gallery(nafs)
        with torch.no_grad():
            full = nafs.similarity(texts, images)
            candidates = torch.tensor([[4, 0, 2], [1, 1, 3], [0, 2, 4]])
            scored = nafs.score_candidates(texts, images, candidates)
            nafs.similarity_max_elements = 7  # force many tiles
            tiled = nafs.similarity(texts, images)
            tiled_candidates = nafs.score_candidates(texts, images, candidates)
            local = nafs._mean_directions(*nafs.local_similarities(images, texts)).t()
    finally:
        nafs.test_similarity, nafs.alignment, nafs.attention.directions, nafs.similarity_max_elements = saved
        nafs.train()
    assert full.shape == (3, 5)
    assert torch.allclose(scored, full.gather(1, candidates), atol=1e-5)
    assert torch.allclose(tiled, full, atol=1e-5)
    assert torch.allclose(tiled_candidates, scored, atol=1e-5)
    expected = local if switches.get("test_similarity") == "local" else nafs.global_similarity(texts, images) + local
    assert torch.allclose(full, expected, atol=1e-5)


@pytest.mark.parametrize(
    "switches",
    [{}, {"alignment": "separate"}, {"directions": "image-to-text"}, {"focal": False, "lambda_scaling": "none"}],
)
def test_similarity_scores_with_the_evaluation_kernels_and_equals_the_reference(nafs, switches, monkeypatch):
    """similarity and score_candidates go through the evaluation kernels (counted here), without
    autograd even when called with it on, and give the training-time attention's numbers."""
    import tbps.methods.nafs as nafs_module
    import tbps.models.attention as attention_module

    calls = {"full": 0, "candidates": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        attention_module, "fast_bidirectional_non_local_similarity",
        counting("full", attention_module.fast_bidirectional_non_local_similarity),
    )
    monkeypatch.setattr(
        nafs_module, "fast_candidate_bidirectional_non_local_similarity",
        counting("candidates", nafs_module.fast_candidate_bidirectional_non_local_similarity),
    )
    attention = nafs.attention
    saved = (nafs.alignment, attention.directions, attention.focal, attention.lambda_scaling)
    nafs.alignment = switches.get("alignment", nafs.alignment)
    attention.directions = switches.get("directions", attention.directions)
    attention.focal = switches.get("focal", attention.focal)
    attention.lambda_scaling = switches.get("lambda_scaling", attention.lambda_scaling)
    nafs.eval()
    try:
        texts, images = encode_small_gallery(nafs)
        full = nafs.similarity(texts, images)  # grad mode on: similarity turns it off
        candidates = torch.tensor([[4, 0, 2], [1, 1, 3], [0, 2, 4]])
        scored = nafs.score_candidates(texts, images, candidates)
        with torch.no_grad():  # the reference: the differentiable functions on the training projections
            iq, iv, tk, tv = attention.project(images["local"], texts["local"])
            mask = texts["local_mask"]
            pairs = [(slice(None), slice(None))] if nafs.alignment == "joint" else nafs._scale_slices()
            totals = []
            for image_slice, text_slice in pairs:
                if image_slice.stop == 1:
                    cosine = F.normalize(images["local"][:, 0], dim=-1) @ F.normalize(texts["local"][:, 0], dim=-1).t()
                    parts = [cosine] * (2 if attention.directions == "both" else 1)
                else:
                    parts = [p for p in bidirectional_non_local_similarity(
                        iq[:, image_slice], iv[:, image_slice], None, tk[:, text_slice], tv[:, text_slice],
                        mask[:, text_slice], attention.image_inverse_temperature, attention.text_inverse_temperature,
                        attention.focal, image_to_text=attention.uses_image_to_text,
                        text_to_image=attention.uses_text_to_image, lambda_scaling=attention.lambda_scaling,
                    ) if p is not None]
                totals.append(sum(parts) / len(parts))
            expected = nafs.global_similarity(texts, images) + (sum(totals) / len(pairs)).t()
    finally:
        nafs.alignment, attention.directions, attention.focal, attention.lambda_scaling = saved
        nafs.train()
    assert calls["full"] >= 1 and calls["candidates"] >= 1
    assert not full.requires_grad and not scored.requires_grad
    assert torch.allclose(full, expected, atol=1e-5)
    assert torch.allclose(scored, expected.gather(1, candidates), atol=1e-5)


def test_similarity_follows_weights_and_gallery_changed_in_place(nafs):
    """The gallery's projections are cached across chunks of captions (EvaluationCache); an
    optimiser step (in-place weights) or an in-place change of the features must show."""
    nafs.eval()
    try:
        texts, images = encode_small_gallery(nafs)
        with torch.no_grad():
            before = nafs.similarity(texts, images)
            assert torch.equal(nafs.similarity(texts, images), before)
            saved = nafs.attention.image_query.weight.clone()
            nafs.attention.image_query.weight.mul_(-1.0)
            flipped = nafs.similarity(texts, images)
            nafs.attention.image_query.weight.copy_(saved)
            images["local"][1:].mul_(0.5).add_(0.1)
            moved = nafs.similarity(texts, images)
            fresh = nafs.similarity(texts, {key: value.clone() for key, value in images.items()})
    finally:
        nafs.train()
    assert not torch.allclose(flipped, before)
    assert not torch.allclose(moved, before) and torch.equal(moved, fresh)


# ------------------------------------------------------------------------------ ablations, training


@pytest.mark.parametrize(
    "overrides, expected_losses, global_dim",
    [
        ({"scales": "global"}, {"cmpm", "cmpc"}, 32),  # Table 2 "Global"
        ({"alignment": "concat", "image_network": "plain"}, {"cmpm", "cmpc"}, 96),  # Table 4 row 2
        ({"alignment": "concat"}, {"cmpm", "cmpc"}, 96),  # Table 4 row 3 (staircase)
        ({"split_shuffle": False, "scales": "global+finest"}, {"cmpm", "cmpc", "csal"}, 32),  # Table 2
        ({"alignment": "separate"}, {"cmpm", "cmpc", "csal"}, 32),  # Table 3
        ({"image_network": "plain", "text_backbone": {"name": "bilstm", "embedding_dim": 16, "hidden_size": 16, "min_count": 1}},
         {"cmpm", "cmpc", "csal"}, 32),  # Table 4 row 1 backbones, full scale
    ],
)
def test_ablation_switches(overrides, expected_losses, global_dim):
    method = build(**overrides)
    method.fit_text(CAPTIONS)
    data = make_batch(method)
    losses = method(data)
    assert set(losses) == expected_losses
    assert all(torch.isfinite(v) for v in losses.values())
    method.eval()
    with torch.no_grad():
        images, texts = method.encode_image(data["images"]), method.encode_text(data["text"])
        assert images["global"].shape == texts["global"].shape == (4, global_dim)
        assert method.similarity(texts, images).shape == (4, 4)
    if overrides.get("image_network") == "plain":
        assert method.image_backbone.region_branch is None and method.image_backbone.patch_branch is None


def test_training_step_reaches_every_branch_and_reduces_the_loss(batch):
    method = build(split_shuffle=False)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)

    def total_loss():
        torch.manual_seed(5)  # the same dropout masks every time; batch norm uses batch statistics
        return torch.stack(list(method(batch).values())).sum()

    method.train()
    loss = total_loss()
    before = loss.item()
    loss.backward()
    modules = {
        "global branch": method.image_backbone.trunk,
        "region branch": method.image_backbone.region_branch,
        "patch branch": method.image_backbone.patch_branch,
        "bert": method.text_backbone.backbone.model.encoder,
        "global projection": method.global_projection,
        "region projection": method.region_projection,
        "patch projection": method.patch_projection,
        "sentence projection": method.sentence_projection,
        "sub-sentence projection": method.sub_sentence_projection,
        "word projection": method.word_projection,
        "non-local attention": method.attention,
        "cmpc": method.cmpc,
    }
    for name, module in modules.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    # Staircase branches are backbone layers (backbone learning rate, Sec. 4.1).
    names = {id(p): n for n, p in method.named_parameters()}
    backbone = [names[id(p)] for p in method.parameter_groups()["backbone"]]
    assert any(n.startswith("image_backbone.region_branch") for n in backbone)
    assert not any(n.startswith(("attention.", "cmpc.")) for n in backbone)
    optimizer.step()
    for _ in range(2):
        optimizer.zero_grad()
        total_loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = total_loss().item()
    assert math.isfinite(after) and after < before


def test_explain_lays_sentence_and_sub_sentence_attention_on_rows(nafs):
    caption = "a man wears a blue shirt, black pants and white shoes. he carries a bag."
    nafs.train()
    texts, maps = nafs.explain(torch.randn(3, *IMAGE_SIZE), caption)
    assert texts[0] == caption and "a man wears a blue shirt" in texts
    assert maps.shape == (len(texts), nafs.region_stripes * nafs.patch_stripes, 1)
    assert (maps >= 0).all()
    # alpha' sums to 1 over the image features, and each feature spreads its weight over its rows.
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(len(texts)))
    assert nafs.training  # the caller's mode is restored
