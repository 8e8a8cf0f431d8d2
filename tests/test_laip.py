"""LAIP (laip.md, methods.md §6): ALBEF-style encoders and fusion, momentum model and queues,
ITC / ITM / fusion triplet, MPM and BidirAtt on image-phrase pairs, two-stage schedule,
ITM re-scoring at test.

One tiny randomly initialised model (EfficientNet-Lite0 with ``pretrained: false`` at 64x32,
the bundled MiniLM's architecture, 3 text + 3 fusion layers) is built once; ablations switch its
attributes and restore them. Data is made here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tbps.evaluation.evaluator import score_features
from tbps.losses import identity_match_targets
from tbps.methods.laip import (
    IGNORE_INDEX,
    choose_mask_word,
    combine_attention,
    sample_hard_negatives,
    word_spans,
)
from tbps.models.attention import CrossAttentionBlock
from tbps.models.registry import create_method, list_methods

CAPTIONS = [
    "a man in a red shirt, blue jeans and black shoes.",
    "a woman wearing a white dress and a black handbag",
    "he carries a green backpack and has short hair",
    "a girl with a long skirt",
]
LABELS = torch.tensor([0, 1, 0, 2])
IMAGE_SIZE = (64, 32)


def tiny_config(**overrides):
    config = {
        "embed_dim": 32,
        "max_text_length": 24,
        "max_phrase_length": 10,
        "max_phrases": 3,
        "queue_size": 10,
        "text_layers": 3,
        "attention_layer": 1,
        "local_losses_start_epoch": 2,
        "cross_attention": {"heads": 4},  # fewer heads: the finite-difference check stays quick
        "image_backbone": {"name": "efficientnet_lite0", "pretrained": False},
        "text_backbone": {"name": "minilm", "pretrained": False},
    }
    config.update(overrides)
    return config


# Tensors here are tiny: intra-op threads only add synchronisation (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def laip():
    torch.manual_seed(0)
    return create_method("laip", tiny_config(), num_classes=3, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def processor(laip):
    return laip.build_text_processor()


@pytest.fixture(scope="module")
def batch(processor):
    torch.manual_seed(1)
    return {
        "images": torch.randn(len(CAPTIONS), 3, *IMAGE_SIZE),
        "text": processor(CAPTIONS),
        "captions": list(CAPTIONS),
        "labels": LABELS,
        "person_ids": LABELS + 100,
    }


@pytest.fixture
def fresh_state(laip):
    """Restore the shared model (weights, buffers, switches) after a test that changes it."""
    state = copy.deepcopy(laip.state_dict())
    switches = (dict(laip.loss_weights), laip.masked_modeling, laip.attention_mode, laip.attention_layer, laip.score_batch_pairs)
    yield laip
    laip.float()
    laip.load_state_dict(state)
    laip.loss_weights, laip.masked_modeling, laip.attention_mode, laip.attention_layer, laip.score_batch_pairs = (
        dict(switches[0]), *switches[1:]
    )
    laip.set_epoch(0)
    laip.eval()


# ------------------------------------------------------------------------------ registry, configs


def test_registry_lists_laip():
    assert "laip" in list_methods()


@pytest.mark.parametrize("dataset", ["synthetic", "cuhk-pedes", "icfg-pedes", "rstpreid"])
def test_configs_load_with_paper_settings(dataset):
    from tbps.config import load_config

    config = load_config(f"laip/{dataset}")
    model = config.model
    assert config.method == "laip" and model.momentum == 0.995 and model.triplet_margin == 0.6
    assert config.eval.rerank == "two-stage" and config.eval.top_k == 128  # App. D
    assert config.optim.optimizer == "adamw" and config.optim.scheduler == "cosine"
    assert model.attention_mode == "bidirectional" and model.masked_modeling == "mpm"
    if dataset == "synthetic":
        assert model.image_backbone.name == "efficientnet_lite0" and model.text_backbone.name == "minilm"
        assert model.attention_layer < 6 - model.text_layers - 1
    else:
        assert model.image_backbone.name == "vit_b_16" and model.text_layers == 6 and model.embed_dim == 256
        assert (model.local_losses_start_epoch, config.trainer.max_epochs) == (30, 45)  # 30 + 15 epochs
    # Stage 2 restarts warm-up + cosine at its first epoch (App. E2), following the stage start.
    assert list(config.optim.restart_epochs) == [model.local_losses_start_epoch]


def test_stage_two_restart_follows_command_line_overrides():
    from tbps.config import load_config, to_container

    moved = to_container(load_config("laip/synthetic", ["model.local_losses_start_epoch=3"]))
    assert moved["optim"]["restart_epochs"] == [3]  # resolved into the saved config and checkpoints
    assert to_container(load_config("laip/synthetic", ["optim.restart_epochs=[5]"]))["optim"]["restart_epochs"] == [5]
    assert to_container(load_config("laip/synthetic", ["optim.restart_epochs=[]"]))["optim"]["restart_epochs"] == []


# ------------------------------------------------------------------------------ encoders and fusion


def test_encoder_shapes(laip, batch):
    laip.eval()
    with torch.no_grad():
        image = laip.encode_image(batch["images"])
        text = laip.encode_text(batch["text"])
    grid = 2 * 1  # 64x32 at 1/32
    assert image["global"].shape == (4, 32) and image["tokens"].shape == (4, 1 + grid, 1280)
    assert text["global"].shape == (4, 32) and text["tokens"].shape == (4, 24, 384)
    assert torch.allclose(image["global"].norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(text["global"].norm(dim=1), torch.ones(4), atol=1e-5)
    fused, attention = laip.fuse(text["tokens"], text["mask"], image["tokens"], attention_layer=1)
    assert fused.shape == (4, 24, 384) and attention.shape == (4, 4, 24, 1 + grid)
    assert torch.allclose(attention.sum(-1), torch.ones(4, 4, 24), atol=1e-5)


def test_cross_attention_block_masks_keys():
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, key_value_size=24, num_heads=4, dropout=0.0).eval()
    queries, keys = torch.randn(2, 5, 16), torch.randn(2, 7, 24)
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[0, 4:] = False
    output, attention = block(queries, keys, key_mask, return_attention=True)
    assert output.shape == (2, 5, 16) and attention.shape == (2, 4, 5, 7)
    assert attention[0, :, :, 4:].abs().max() == 0 and attention[1, :, :, 4:].min() > 0
    changed = keys.clone()
    changed[0, 4:] = 100.0  # masked keys: anything there leaves the output unchanged
    assert torch.allclose(block(queries, changed, key_mask)[0], output, atol=1e-6)
    assert not torch.allclose(block(queries, changed)[0][0], output[0], atol=1e-3)


def test_fusion_ignores_padded_text_tokens(laip, batch):
    laip.eval()
    text = batch["text"]
    with torch.no_grad():
        image = laip.encode_image(batch["images"])["tokens"]
        hidden = laip.encode_text(text)["tokens"]
        fused, _ = laip.fuse(hidden, text["attention_mask"], image)
        noisy = hidden.clone()
        padding = text["attention_mask"] == 0
        noisy[padding] = torch.randn(int(padding.sum()), hidden.shape[-1]) * 10
        fused_noisy, _ = laip.fuse(noisy, text["attention_mask"], image)
    valid = ~padding
    assert torch.allclose(fused[valid], fused_noisy[valid], atol=1e-4)


# ------------------------------------------------------------------------------ momentum model and queues


def test_momentum_update_is_the_ema_formula(fresh_state):
    laip = fresh_state
    pairs = list(laip.momentum_parameter_pairs())
    assert pairs and all(not momentum.requires_grad for _, momentum in pairs)
    with torch.no_grad():
        for online, _ in pairs:
            online.add_(torch.randn_like(online) * 0.1)
    before = [(online.detach().clone(), momentum.detach().clone()) for online, momentum in pairs]
    laip.momentum_update()
    m = laip.momentum
    for (online, momentum_before), (_, momentum_after) in zip(before, pairs):
        assert torch.allclose(momentum_after, m * momentum_before + (1 - m) * online, atol=1e-7)
    # The momentum text encoder is the first text_layers layers only.
    assert len(laip.momentum_text_encoder.encoder.layer) == laip.text_layers


def test_queue_enqueue_and_wrap_around(fresh_state):
    laip = fresh_state
    size, dim = laip.queue_size, laip.image_queue.shape[1]
    features = F.normalize(torch.randn(14, dim), dim=1)
    laip.enqueue(features[:6], -features[:6], torch.arange(6))
    assert int(laip.queue_filled) == 6 and int(laip.queue_pointer) == 6
    assert torch.equal(laip.queue_contents()[2], torch.arange(6))
    laip.enqueue(features[6:14], -features[6:14], torch.arange(6, 14))  # 8 more: wraps to slot 4
    assert int(laip.queue_filled) == size and int(laip.queue_pointer) == (6 + 8) % size
    assert torch.equal(laip.queue_ids, torch.tensor([10, 11, 12, 13, 4, 5, 6, 7, 8, 9]))
    assert torch.allclose(laip.image_queue[0], features[10]) and torch.allclose(laip.text_queue[0], -features[10])
    assert "image_queue" in laip.state_dict() and "queue_ids" in laip.state_dict()  # checkpointed


def test_itc_targets_count_same_identity_queue_entries(fresh_state):
    laip = fresh_state
    dim = laip.image_queue.shape[1]
    torch.manual_seed(3)
    image, text, image_m, text_m = (F.normalize(torch.randn(4, dim), dim=1) for _ in range(4))
    queue_image, queue_text = F.normalize(torch.randn(3, dim), dim=1), F.normalize(torch.randn(3, dim), dim=1)
    queue_ids = torch.tensor([2, 0, 5])
    laip.queue_filled.zero_()
    laip.queue_pointer.zero_()
    laip.enqueue(queue_image, queue_text, queue_ids)
    loss, logits_i2t, _ = laip.itc_loss(image, text, image_m, text_m, LABELS)
    tau = laip.temperature.detach()
    columns = torch.cat([LABELS, queue_ids])
    targets = identity_match_targets(LABELS, columns)
    assert targets[0].tolist() == pytest.approx([1 / 3, 0, 1 / 3, 0, 0, 1 / 3, 0])  # id 0: 2 in batch + 1 queued
    i2t = image @ torch.cat([text_m, queue_text]).t() / tau
    t2i = text @ torch.cat([image_m, queue_image]).t() / tau
    expected = (-(targets * i2t.log_softmax(1)).sum(1).mean() - (targets * t2i.log_softmax(1)).sum(1).mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(logits_i2t, i2t[:, :4], atol=1e-5)


# ------------------------------------------------------------------------------ ITM hard negatives


def test_hard_negatives_never_same_identity_and_follow_similarity():
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    similarity = torch.randn(6, 6) * 3
    for _ in range(200):
        index, valid = sample_hard_negatives(similarity, ids, ids, generator)
        assert valid.all() and (ids[index] != ids).all()
    # Peaked: row 0's most similar columns are its own identity (never drawn), then column 4.
    peaked = torch.zeros(6, 6)
    peaked[0, 1], peaked[0, 0], peaked[0, 4] = 50.0, 60.0, 20.0
    draws = torch.stack([sample_hard_negatives(peaked, ids, ids, generator)[0][0] for _ in range(100)])
    assert (draws == 4).all()
    # A row whose every column shares its identity has no negative.
    _, valid = sample_hard_negatives(torch.zeros(2, 2), torch.tensor([7, 7]), torch.tensor([7, 7]), generator)
    assert not valid.any()


# ------------------------------------------------------------------------------ MPM masking


def test_mpm_masks_exactly_one_word_inside_each_phrase(processor, batch):
    text = batch["text"]
    mask_id = processor.mask_id
    valid = text["phrase_valid"]
    assert valid.sum() >= 6
    for caption, slot in valid.nonzero().tolist():
        original = text["phrase_input_ids"][caption, slot]
        masked = text["phrase_masked_ids"][caption, slot]
        labels = text["phrase_mpm_labels"][caption, slot]
        length = int(text["phrase_attention_mask"][caption, slot].sum())
        changed = (masked != original).nonzero().flatten()
        assert changed.numel() >= 1 and (masked[changed] == mask_id).all()
        assert 0 < changed.min() and changed.max() < length - 1  # never [CLS] / [SEP] / padding
        assert torch.equal(changed, torch.arange(int(changed.min()), int(changed.max()) + 1))  # one word
        assert torch.equal((labels != IGNORE_INDEX).nonzero().flatten(), changed)
        assert torch.equal(labels[changed], original[changed])
    # Sentence tokens are untouched in MPM mode.
    assert "caption_masked_ids" not in text
    # The processor runs in data-loader workers: it must survive pickling.
    import pickle

    assert set(pickle.loads(pickle.dumps(processor))(CAPTIONS[:1])) == set(text)


def test_mask_word_groups_pieces_and_skips_function_words(processor):
    tokenizer = processor.phrases
    encoded = tokenizer(["a striped t-shirt"])
    offsets = [tuple(p) for p in encoded["offsets"][0].tolist()]
    special = ((encoded["offsets"][0, :, 1] <= encoded["offsets"][0, :, 0]) | (encoded["attention_mask"][0] == 0)).tolist()
    words = word_spans(offsets, special)
    assert len(words) == 3 and len(words[2]) >= 3  # "t", "-", "shirt" pieces form one word
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        chosen = choose_mask_word("a striped t-shirt", offsets, special, generator)
        assert chosen in (words[1], words[2])  # never the determiner "a"


# ------------------------------------------------------------------------------ BidirAtt


def test_combined_weights_are_a_distribution_and_zero_safe():
    torch.manual_seed(0)
    forward = torch.rand(5, 7).softmax(1)
    backward = torch.rand(5, 7)
    backward[1] = 0.0  # e.g. the last layer: no gradient reaches the [CLS] row
    backward[2, :3] = 0.0
    for mode in ("forward", "backward", "bidirectional"):
        weights = combine_attention(forward, backward, mode)
        assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(5))
    weights = combine_attention(forward, backward, "bidirectional")
    assert torch.allclose(weights[0], forward[0] * backward[0] / (forward[0] * backward[0]).sum())
    assert torch.allclose(weights[1], forward[1])  # fallback to the forward weights
    assert (weights[2, :3] == 0).all()


def _phrase_inputs(batch):
    text = batch["text"]
    captions, slots = text["phrase_valid"].nonzero(as_tuple=True)
    captions, slots = captions[:3], slots[:3]
    return (
        text["phrase_masked_ids"][captions, slots],
        text["phrase_attention_mask"][captions, slots],
        text["phrase_mpm_labels"][captions, slots],
    )


def _prediction_score(stream, count):
    probability = stream["mpm_logits"].softmax(-1).gather(1, stream["mpm_targets"][:, None]).squeeze(1)
    pieces = torch.zeros(count, dtype=probability.dtype).index_add_(0, stream["mpm_rows"], torch.ones_like(probability))
    return torch.zeros(count, dtype=probability.dtype).index_add_(0, stream["mpm_rows"], probability) / pieces


def test_backward_attention_matches_finite_differences(fresh_state, batch):
    laip = fresh_state.double().eval()
    ids, mask, labels = _phrase_inputs(batch)
    torch.manual_seed(5)
    image_tokens = torch.randn(ids.shape[0], 4, 1280, dtype=torch.float64)
    stream = laip.phrase_attention(ids, mask, labels, image_tokens, need_backward=True)
    backward = stream["backward"]  # [P, 3 patches]
    assert backward.shape == (3, 3) and (backward >= 0).all() and backward.abs().sum() > 0

    block = laip.cross_attention[laip.attention_layer]
    original_forward = block.forward
    perturbation = {}

    def perturbed(queries, keys_values, key_mask=None, return_attention=False):
        q, k, v = block._heads(block.query(queries)), block._heads(block.key(keys_values)), block._heads(block.value(keys_values))
        probabilities = ((q @ k.transpose(-1, -2)) * block.head_size**-0.5).softmax(-1)
        if perturbation:
            probabilities = probabilities.clone()
            probabilities[perturbation["index"]] += perturbation["delta"]
        context = (probabilities @ v).transpose(1, 2).reshape(queries.shape)
        return block.norm(block.output(context) + queries), (probabilities if return_attention else None)

    block.forward = perturbed
    try:
        with torch.no_grad():
            base = _prediction_score(laip.phrase_attention(ids, mask, labels, image_tokens, need_backward=False), 3)
            gradient = torch.zeros(3, block.num_heads, 3, dtype=torch.float64)
            step = 1e-5
            # Pairs do not interact, so one perturbed pass gives every pair's difference quotient.
            for head in range(block.num_heads):
                for patch in range(3):
                    values = []
                    for sign in (1.0, -1.0):
                        perturbation.update(index=(slice(None), head, 0, 1 + patch), delta=sign * step)
                        values.append(_prediction_score(laip.phrase_attention(ids, mask, labels, image_tokens, False), 3))
                    gradient[:, head, patch] = (values[0] - values[1]) / (2 * step)
            perturbation.clear()
    finally:
        block.forward = original_forward
    assert torch.allclose(base, _prediction_score(stream, 3))
    expected = gradient.clamp(min=0).mean(dim=1)  # eq. 6: positive part, averaged over heads
    assert torch.allclose(backward, expected, rtol=1e-4, atol=1e-9)

    # The last cross-attention layer: the [CLS] row cannot reach the masked word, gradient 0,
    # and the weights fall back to the forward attention.
    laip.attention_layer = laip.fusion_layers - 1
    last = laip.phrase_attention(ids, mask, labels, image_tokens, need_backward=True)
    assert last["backward"].abs().max() == 0
    weights = combine_attention(last["forward"], last["backward"], "bidirectional")
    assert torch.allclose(weights.sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(weights, last["forward"] / last["forward"].sum(1, keepdim=True))


# ------------------------------------------------------------------------------ losses and schedule


def _losses(laip, batch, epoch=None, seed=0):
    torch.manual_seed(seed)
    data = dict(batch) if epoch is None else {**batch, "epoch": epoch}
    return laip(data)


def test_two_stage_schedule_and_loss_names(fresh_state, batch, processor):
    laip = fresh_state.train()
    # Stage 1 is ITC + ITM only (Sec. III-A), whatever the other weights say.
    assert set(_losses(laip, batch)) == {"itc", "itm"}  # epoch 0
    laip.set_epoch(1)
    assert set(_losses(laip, batch)) == {"itc", "itm"}
    laip.set_epoch(2)  # local_losses_start_epoch: stage 2, all losses of eq. 12
    losses = _losses(laip, batch)
    assert set(losses) == {"itc", "itm", "triplet", "mpm", "bidiratt"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert int(laip.current_epoch) == 2 and "current_epoch" in laip.state_dict()
    assert set(_losses(laip, batch, epoch=0)) == {"itc", "itm"}  # an explicit batch epoch wins

    laip.loss_weights.update(triplet=0.0, mpm=0.0, bidiratt=0.0)  # ITC + ITM baseline
    assert set(_losses(laip, batch)) == {"itc", "itm"}
    laip.loss_weights.update(itm=0.0, triplet=1.0)  # the triplet alone still needs the fusion pass in stage 2
    assert set(_losses(laip, batch)) == {"itc", "triplet"}
    assert set(_losses(laip, batch, epoch=1)) == {"itc"}


def test_local_losses_sum_over_a_captions_phrases_and_average_over_captions(fresh_state, batch):
    """Eq. 12: each caption adds the sum of its phrases' MPM and BidirAtt losses, the batch loss is
    the mean over captions (a caption without a usable phrase adds 0). Checked against a literal
    loop: each pair through the fusion alone for MPM (eq. 11, the masked word's pieces averaged),
    each row and column of eq. 10's similarity for BidirAtt."""
    laip = fresh_state.eval()  # no dropout: batched and per-pair passes see the same model
    text = dict(batch["text"])
    text["phrase_valid"] = text["phrase_valid"].clone()
    text["phrase_valid"][1] = False  # caption 1: no phrase
    ids = batch["labels"]
    with torch.no_grad():
        image_tokens = laip.encode_image(batch["images"])["tokens"]
    losses = laip.local_losses(text, image_tokens, ids)
    captions, slots = text["phrase_valid"].nonzero(as_tuple=True)
    num_captions, num_pairs = len(CAPTIONS), captions.numel()
    assert num_pairs >= 5 and 1 not in captions.tolist()  # several phrases per caption

    mpm = torch.zeros(num_captions, dtype=torch.float64)
    with torch.no_grad():
        for c, slot in zip(captions.tolist(), slots.tolist()):
            stream = laip.phrase_attention(
                text["phrase_masked_ids"][c, slot][None], text["phrase_attention_mask"][c, slot][None],
                text["phrase_mpm_labels"][c, slot][None], image_tokens[c][None], need_backward=False,
            )
            mpm[c] += F.cross_entropy(stream["mpm_logits"], stream["mpm_targets"]).item()
    assert losses["mpm"].item() == pytest.approx(mpm.mean().item(), rel=1e-4)

    stream = laip.phrase_attention(
        text["phrase_masked_ids"][captions, slots], text["phrase_attention_mask"][captions, slots],
        text["phrase_mpm_labels"][captions, slots], image_tokens[captions], need_backward=True,
    )
    similarity, groups = laip.phrase_image_similarity(stream, image_tokens[captions], text, captions, slots, ids)
    logits = (similarity / laip.temperature).detach().double()
    bidiratt = torch.zeros(num_captions, dtype=torch.float64)
    for pair in range(num_pairs):
        targets = (groups == groups[pair]).double()
        targets = targets / targets.sum()
        image_to_phrase = -(targets * logits[pair].log_softmax(0)).sum()
        phrase_to_image = -(targets * logits[:, pair].log_softmax(0)).sum()
        bidiratt[captions[pair]] += (image_to_phrase + phrase_to_image) / 2
    assert losses["bidiratt"].item() == pytest.approx(bidiratt.mean().item(), rel=1e-4)
    # The mean over pairs would be num_pairs / num_captions times smaller.
    assert losses["bidiratt"].item() > 1.2 * bidiratt.sum().item() / num_pairs


def test_whole_sentence_mlm_ablation(fresh_state, batch):
    laip = fresh_state.train()
    laip.masked_modeling = "mlm"
    text = laip.build_text_processor()(CAPTIONS)
    labels, masked = text["caption_mlm_labels"], text["caption_masked_ids"]
    assert ((labels != IGNORE_INDEX).sum(1) >= 1).all()
    assert (masked[labels != IGNORE_INDEX] == laip.build_text_processor().mask_id).all()
    laip.set_epoch(2)
    losses = _losses(laip, {**batch, "text": text})
    assert set(losses) == {"itc", "itm", "triplet", "mlm", "bidiratt"}


def _without_dropout(laip):
    """Training mode (batch-norm on batch statistics, so the random CNN tells images apart) with
    dropout and drop-connect off: the same batch then gives the same loss."""
    laip.train()
    for module in laip.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    laip.image_backbone.drop_connect_rate = laip.momentum_image_backbone.drop_connect_rate = 0.0


def test_training_steps_reduce_the_loss_in_each_stage(fresh_state, batch):
    laip = fresh_state
    _without_dropout(laip)
    parameters = [p for p in laip.parameters() if p.requires_grad]
    # Plain gradient descent with a small step: if the gradients are right, the loss must fall.
    # (Adam's first steps move every weight by about lr whatever its gradient, so they need not
    # lower the loss: with AdamW at 1e-4 BidirAtt rose 5.9 -> 14.3 on some installs.)
    optimizer = torch.optim.SGD(parameters, lr=1e-3)

    def measure(epoch):
        saved = {k: v.clone() for k, v in laip.state_dict().items() if "queue" in k or k.startswith("momentum_")}
        with torch.no_grad():
            total = sum(_losses(laip, batch, epoch=epoch).values()).item()
        laip.load_state_dict({**laip.state_dict(), **saved})
        return total

    for epoch in (0, 2):  # stage 1, then stage 2
        before = measure(epoch)
        for _ in range(2):
            optimizer.zero_grad()
            saved = {k: v.clone() for k, v in laip.state_dict().items() if "queue" in k or k.startswith("momentum_")}
            total = sum(_losses(laip, batch, epoch=epoch).values())
            total.backward()
            optimizer.step()
            laip.load_state_dict({**laip.state_dict(), **saved})
        after = measure(epoch)
        assert after < before, (epoch, before, after)


# ------------------------------------------------------------------------------ inference


def test_score_candidates_uses_itm_head_batched(fresh_state, batch):
    laip = fresh_state.eval()
    with torch.no_grad():
        images = laip.encode_image(batch["images"])
        images["tokens"] = images["tokens"] + torch.randn_like(images["tokens"])  # tell images apart
        texts = laip.encode_text(batch["text"])
        candidates = torch.tensor([[0, 1, 2], [3, 2, 1], [1, 0, 3], [2, 3, 0]])
        laip.score_batch_pairs = 5  # blocks cut across texts
        scores = laip.score_candidates(texts, images, candidates)
        assert scores.shape == (4, 3)
        for t in range(4):
            for j in range(3):
                i = int(candidates[t, j])
                logits = laip.itm_logits(texts["tokens"][t : t + 1], texts["mask"][t : t + 1], images["tokens"][i : i + 1])
                assert scores[t, j].item() == pytest.approx((logits[0, 1] - logits[0, 0]).item(), abs=1e-4)
        assert scores.std() > 0
        # Two-stage retrieval keeps the ITC top-k and puts exactly these ITM scores on them.
        full = score_features(laip, texts, images, rerank="two-stage", top_k=2)
        coarse = laip.similarity(texts, images)
        kept = coarse.topk(2, dim=1).indices
        assert torch.allclose(full.gather(1, kept), laip.score_candidates(texts, images, kept), atol=1e-5)
        laip.itm_head.weight.zero_()
        laip.itm_head.bias.copy_(torch.tensor([0.0, 2.5]))
        assert torch.allclose(laip.score_candidates(texts, images, candidates), torch.full((4, 3), 2.5))


def test_attention_mode_ablations_and_figure7_maps(fresh_state, batch):
    laip = fresh_state.train()
    laip.set_epoch(2)
    for mode in ("forward", "backward"):
        laip.attention_mode = mode
        losses = _losses(laip, batch)
        assert "bidiratt" in losses and torch.isfinite(losses["bidiratt"])
    laip.eval()
    maps = laip.phrase_attention_maps(batch["images"][:2], ["a red shirt", "black shoes"])
    assert set(maps) == {"forward", "backward", "bidirectional"}
    for weights in maps.values():
        assert weights.shape == (2, 2, 1) and (weights >= 0).all()
        assert torch.allclose(weights.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)


def test_explain_returns_bidirectional_phrase_maps(laip):
    laip.train()
    phrases, maps = laip.explain(torch.randn(3, *IMAGE_SIZE), "a man in a red shirt and black shoes")
    assert phrases and maps.shape[0] == len(phrases) and maps.dim() == 3
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(len(phrases)))
    assert laip.training  # the caller's mode is restored


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_bidirectional_maps_use_the_gradient_under_no_grad_and_inference_mode(laip, context):
    """The backward attention is a gradient: a caller without autograd (a script scoring under
    inference_mode) gets the same maps, not the forward attention relabelled."""
    torch.manual_seed(0)
    image, text = torch.randn(3, *IMAGE_SIZE), "a man in a red shirt and black shoes"
    _, expected = laip.phrase_maps(image, text)
    assert not torch.allclose(expected["bidirectional"], expected["forward"])
    with getattr(torch, context)():
        _, maps = laip.phrase_maps(image.clone(), text)
    for mode in expected:  # the same computation up to float rounding
        torch.testing.assert_close(maps[mode], expected[mode], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ ALBEF checkpoints
def _albef_state(laip):
    """An ALBEF-format retrieval state dict for ``laip``'s shapes, written from ALBEF's naming
    (``text_encoder.bert.encoder.layer.i.crossattention.self.query``, ...), random values."""
    torch.manual_seed(3)
    state, expected = {}, {}

    def put(albef_key, ours_key, tensor):
        state[albef_key] = tensor
        expected[ours_key] = tensor

    for key, value in laip.image_backbone.net.state_dict().items():
        if key != "pos_embed":
            put(f"visual_encoder.{key}", f"image_backbone.net.{key}", torch.randn_like(value))
    for key, value in laip.text_backbone.model.state_dict().items():
        put(f"text_encoder.bert.{key}", f"text_backbone.model.{key}", torch.randn_like(value))
    names = {"self.query": "query", "self.key": "key", "self.value": "value", "output.dense": "output", "output.LayerNorm": "norm"}
    for j, block in enumerate(laip.cross_attention):
        for albef, ours in names.items():
            for kind in ("weight", "bias"):
                value = getattr(getattr(block, ours), kind)
                put(f"text_encoder.bert.encoder.layer.{laip.text_layers + j}.crossattention.{albef}.{kind}",
                    f"cross_attention.{j}.{ours}.{kind}", torch.randn_like(value))
    put("text_encoder.cls.predictions.transform.dense.weight", "mlm_head.dense.weight", torch.randn_like(laip.mlm_head.dense.weight))
    put("text_encoder.cls.predictions.bias", "mlm_head.decoder.bias", torch.randn_like(laip.mlm_head.decoder.bias))
    for albef, ours in (("vision_proj", "image_projection"), ("text_proj", "text_projection"), ("itm_head", "itm_head")):
        for kind in ("weight", "bias"):
            put(f"{albef}.{kind}", f"{ours}.{kind}", torch.randn_like(getattr(getattr(laip, ours), kind)))
    state["temp"] = torch.tensor(0.05)
    state["image_queue"] = torch.randn(32, 7)  # pretraining queues: no person ids, not loaded
    state["idx_queue"] = torch.zeros(1, 7, dtype=torch.long)
    state["text_encoder.bert.pooler.dense.weight"] = torch.randn(4, 4)
    return state, expected


def test_albef_checkpoint_loads_by_key_mapping(tmp_path):
    """An ALBEF checkpoint (ViT-B/16 at 64x64 = a 4x4 grid) fills the model: every mapped tensor
    lands where ALBEF's naming says, position embeddings are resampled to this model's grid, the
    momentum copies start from the online weights, and the normalisation becomes ALBEF's."""
    config = tiny_config(image_backbone={"name": "vit_b_16", "pretrained": False}, init_checkpoint={"format": "albef"})
    model = create_method("laip", config, num_classes=3, image_size=(32, 16))  # 2x1 patch grid
    assert model.image_mean_std == ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    state, expected = _albef_state(model)
    state["visual_encoder.pos_embed"] = torch.randn(1, 1 + 4 * 4, 768)
    path = tmp_path / "albef.pth"
    torch.save({"model": state, "epoch": 5}, path)

    report = model.load_albef(path)
    own = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(own[key], value), key
    assert model.temperature.item() == pytest.approx(0.05)
    assert own["image_backbone.net.pos_embed"].shape == (1, 3, 768)
    assert torch.equal(own["image_backbone.net.pos_embed"][:, 0], state["visual_encoder.pos_embed"][:, 0])  # [CLS] kept
    for online, momentum in model.momentum_parameter_pairs():
        assert torch.equal(online, momentum)
    assert torch.count_nonzero(own["image_queue"]) == 0
    assert report["missing"] == ["mlm_head.dense.bias", "mlm_head.norm.bias", "mlm_head.norm.weight"]
    assert torch.equal(own["mlm_head.decoder.weight"], expected["text_backbone.model.embeddings.word_embeddings.weight"])  # tied
    assert {"image_queue", "idx_queue", "text_encoder.bert.pooler.dense.weight"} <= set(report["ignored"])


def test_albef_checkpoint_errors(laip, tmp_path):
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="holds no ALBEF weights"):
        laip.load_albef(foreign)
    early_cross = tmp_path / "early.pth"  # fusion from layer 1, the model's from layer 3
    torch.save({"text_encoder.encoder.layer.1.crossattention.self.query.weight": torch.zeros(2)}, early_cross)
    with pytest.raises(ValueError, match="text_layers"):
        laip.load_albef(early_cross)
    wrong_shape = tmp_path / "shape.pth"
    torch.save({"vision_proj.weight": torch.zeros(5, 5)}, wrong_shape)
    with pytest.raises(ValueError, match="vision_proj.weight has shape"):
        laip.load_albef(wrong_shape)


def test_model_rebuilt_from_tbps_checkpoint_does_not_need_the_albef_file(tmp_path):
    from tbps.engine.checkpoint import load_method

    albef = tmp_path / "albef.pth"
    torch.save({"model": {"text_proj.weight": torch.full((32, 384), 0.5)}}, albef)
    config = tiny_config(init_checkpoint={"format": "albef", "path": str(albef)})
    model = create_method("laip", config, num_classes=3, image_size=IMAGE_SIZE)
    assert torch.all(model.text_projection.weight == 0.5) and model.init_report["loaded"] == ["text_projection.weight"]
    checkpoint = tmp_path / "run.ckpt"
    torch.save({"tbps": {"method": "laip", "num_classes": 3, "config": {"model": config, "data": {"image_size": list(IMAGE_SIZE)}}},
                "state_dict": {f"method.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    albef.unlink()
    rebuilt, _ = load_method(checkpoint, expected_method="laip")
    assert torch.all(rebuilt.text_projection.weight == 0.5)
    assert rebuilt.image_mean_std == model.image_mean_std


def test_mean_text_pooling_ignores_padding(laip, processor):
    """``text_pooling: mean`` (MiniLM-style encoders): the ITC text vector is the mean of the real
    tokens, so a caption's vector does not depend on how far its batch pads it."""
    laip.eval()
    short = "a girl with a long skirt"
    longer = CAPTIONS[0] + " and a grey scarf, white socks and a small red umbrella in her left hand"
    try:
        laip.text_pooling = "mean"
        with torch.no_grad():
            alone = laip.encode_text(processor([short]))["global"][0]
            batch = processor([short, longer])
            padded = laip.encode_text(batch)["global"][0]
            hidden = laip._text_tokens(batch["input_ids"], batch["attention_mask"])
        assert int(batch["attention_mask"][0].sum()) < batch["attention_mask"].shape[1]  # really padded
        assert torch.allclose(alone, padded, atol=1e-5)
        real = int(batch["attention_mask"][0].sum())
        expected = F.normalize(laip.text_projection(hidden[0, :real].mean(dim=0)), dim=-1)
        assert torch.allclose(padded, expected, atol=1e-5)
        laip.text_pooling = "cls"
        with torch.no_grad():
            cls = laip.encode_text(batch)["global"][0]
        assert not torch.allclose(cls, padded, atol=1e-3)
    finally:
        laip.text_pooling = "cls"
