"""NAFS: non-local alignment over full-scale representations (Gao et al. 2021, ``nafs.md``).

Reads like the paper:

1. **Visual features** (Sec. 3.1): a staircase network on the image backbone. The global branch
   is the backbone itself; the *region* branch re-runs the later backbone stages (two stages, a
   deep copy so it starts from the same pretrained weights) from the stage-2 map and cuts the
   result into ``n1`` horizontal stripes; the *patch* branch re-runs the last stage from the
   stage-3 map, ``n2`` stripes. Before the branches, split-and-shuffle permutes horizontal
   stripes of the stage-2/3 maps (training only) so a stripe cannot lean on its neighbours.
   Branch points are the backbone's 1/8- and 1/16-resolution stage maps: ResNet-50 ``layer2`` /
   ``layer3`` (the paper's stages 2 and 3; the region branch re-runs ``layer3``+``layer4``, the
   patch branch ``layer4``), EfficientNet-Lite0 maps 2 (40 ch, 1/8) and 3 (112 ch, 1/16) (the
   region branch re-runs its 1/16 and 1/32 stages plus the head, the patch branch the 1/32 stage
   plus the head). ``region_stage`` / ``patch_stage`` index the factory's stage-map list, not a
   stride: with ``image_backbone.last_stride: 1`` the last stage keeps 1/16 (the paper's setting)
   and the branches, deep copies of the backbone's own (already stride-1) stages, end at the
   global map's size too. The network asks the backbone, not its class: ``backbone.stages``
   (one map per stage) and ``backbone.stage_tail(i)`` (a copy of the stages after map ``i``), so
   any staged backbone (Swin-T too) gets a staircase. A single-stage backbone (a ViT, CLIP)
   has no earlier map to branch from: ``image_network: staircase`` is refused with a message
   naming ``model.image_network=plain``, which cuts regions and patches from its patch map.
2. **Textual features** (Sec. 3.2): a locality-constrained BERT. The sentence [CLS] and every
   word token come from an ordinary BERT pass; each comma-separated sub-sentence gets its own
   [CLS] whose attention sees only the sub-sentence's tokens (eq. 1). See
   :class:`LocalityConstrainedTextEncoder` for how this is done with one extra BertModel call
   and a 4-D attention mask. A Bi-LSTM can stand in for BERT (Table 4, row 1).
3. **Alignment** (Sec. 3.3): contextual non-local attention between *all* image features
   (global, regions, patches) and *all* text features (sentence, sub-sentences, words), in both
   directions (eqs. 2-5 and the text-to-image counterpart), shared with other methods in
   :mod:`tbps.models.attention`. The inverse temperatures lambda_1 / lambda_2 of eq. 3 (the paper
   gives none) are set per direction, ``attention.lambda_image`` and ``attention.lambda_text``
   (4 both), and by default act on the focal-filtered score with its dependence on the numbers
   of image and text features divided out (``attention.lambda_scaling: counts``; the derivation and
   the measurements are in :class:`~tbps.models.attention.ContextualNonLocalAttention`).
   :meth:`NAFS.attention_selectivity` reports how peaked both directions' attention is.
4. **Losses** (eq. 7): ``L = 1 * CMPM + 1 * CMPC + 0.1 * CSAL``; CMPM and CMPC on the global
   features, CSAL (the KL of the batch non-local similarities to the identity-match
   distribution) on ``S`` (image-to-text) and ``S'`` (text-to-image), as a softmax of
   ``losses.csal_scale * S`` (20; the paper gives no scale).
5. **Test similarity** (``test_similarity``): ``global+local`` by default, the cosine of the
   global vectors plus the non-local score (the mean of the enabled directions), as the public
   code ranks; ``local`` is the non-local score alone (eq. 5's ``S``, averaged with ``S'``
   when both directions are on: the paper ranks by eq. 5, Sec. 3.4) and ``global`` the global
   cosine. It only changes how encoded features are scored, so a trained checkpoint can be
   scored either way. :meth:`NAFS.similarity` and :meth:`NAFS.score_candidates` (each text's
   own candidates, for two-stage retrieval: the same numbers on those pairs) score with the
   evaluation kernels of :mod:`tbps.models.attention` (the training-time attention's numbers,
   computed near the matrix-multiply bound; ``benchmarks/README.md``, "Evaluation cost against
   the compute bound"). RVN re-ranking (Sec. 3.4, eq. 8) is the evaluator's ``rerank="rvn"``.

Ablation switches (Tables 2-4 and methods.md §3), all under ``model``:

* ``scales``: ``full`` (global + regions/sub-sentences + patches/words), ``global+finest``
  (global + patches/words, Table 2 "Local+Global") or ``global`` (Table 2 "Global": only CMPM and
  CMPC, global cosine);
* ``alignment``: ``joint`` (contextual non-local over all scales), ``separate`` (Table 3: global
  image/sentence cosine, regions/sub-sentences and patches/words non-local, averaged) or
  ``concat`` (Table 4 rows 2-3: per-scale vectors concatenated into one global vector, no CSAL);
* ``text_backbone.name``: BERT-family (locality-constrained) or ``bilstm``;
* ``image_network``: ``staircase`` or ``plain`` (regions and patches cut from the global map);
* ``split_shuffle``: on/off; ``attention.directions``: both / image-to-text / text-to-image;
  ``attention.focal``: the focal filter on/off;
* ``attention.lambda_scaling``: ``counts`` (default, lambda on the count-free focal score) or
  ``none`` (eq. 3 as printed: lambda times the focal score, whose scale then depends on the
  numbers of features), with ``attention.lambda_image`` / ``attention.lambda_text``.

Other options: ``losses.csal_scale`` (the CSAL softmax scale, 20), ``losses.csal_epsilon``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.losses import CMPCLoss, cmpm_loss, similarity_kl_alignment
from tbps.models.attention import (
    LAMBDA_SCALINGS,
    NON_LOCAL_LAMBDA_IMAGE,
    NON_LOCAL_LAMBDA_TEXT,
    ContextualNonLocalAttention,
    attention_selectivity,
    fast_candidate_bidirectional_non_local_similarity,
    requires_autograd,
)
from tbps.models.backbones import create_image_backbone, create_text_backbone
from tbps.models.backbones.common import option
from tbps.models.backbones.image import ImageBackbone
from tbps.models.backbones.text import BiLSTMText, TextBackbone, TransformerText
from tbps.models.base import Features, PersonSearchMethod, TextProcessor, pool_tokens
from tbps.models.registry import register_method
from tbps.text.split import split_sub_sentences, sub_sentence_token_spans, token_span_masks
from tbps.text.tokenizers import token_strings

SCALES = ("full", "global+finest", "global")
ALIGNMENTS = ("joint", "separate", "concat")
TEST_SIMILARITIES = ("global+local", "local", "global")
_SUB_SENTENCE_DELIMITERS = frozenset(",;.!?")


# =============================================================================================
# 1. Visual representation: staircase network with split-and-shuffle (Sec. 3.1)
# =============================================================================================


def split_and_shuffle(feature_map: Tensor, num_stripes: int, generator: torch.Generator | None = None) -> Tensor:
    """Cut ``[B, C, H, W]`` into ``num_stripes`` horizontal stripes and re-stack them in a random order.

    Each sample gets its own permutation. Stripes are as equal as ``H`` allows
    (``torch.tensor_split`` sizes); a stripe keeps its rows in order, only the stripe order
    changes. The branches never undo it: the non-local attention does not depend on the order
    of stripes (Sec. 3.1).
    """
    batch, _, height, _ = feature_map.shape
    if num_stripes <= 1 or height < 2:
        return feature_map
    num_stripes = min(num_stripes, height)
    stripe_of_row = torch.cat(
        [torch.full((len(rows),), i, dtype=torch.long) for i, rows in enumerate(torch.arange(height).tensor_split(num_stripes))]
    ).to(feature_map.device)
    # rank[b, s] = where stripe s goes for sample b; sort rows by (new stripe slot, row index).
    keys = torch.rand(batch, num_stripes, generator=generator, device="cpu").to(feature_map.device)
    rank = keys.argsort(dim=1).argsort(dim=1)
    row_keys = rank[:, stripe_of_row] * height + torch.arange(height, device=feature_map.device)
    order = row_keys.argsort(dim=1)  # [B, H] source row of each output row
    index = order[:, None, :, None].expand(-1, feature_map.shape[1], -1, feature_map.shape[3])
    return feature_map.gather(2, index)


def backbone_tail(backbone: ImageBackbone, after_map: int) -> nn.Module:
    """A deep copy of the backbone stages that follow stage map ``after_map`` (to the end).

    A copy, not shared weights: each staircase branch learns its own stages, initialised from
    the same (pretrained) weights as the global branch, as in the paper's Fig. 2. The backbone
    builds it (:meth:`ImageBackbone.stage_tail`); one that cannot re-run its stages (a single
    map: ViT, CLIP) is refused here with the option that works for it.
    """
    if not backbone.can_rerun_stages:
        raise ValueError(
            f"NAFS's staircase network branches from earlier stage maps, and image backbone {backbone.name!r} has "
            f"{len(backbone.stages)} stage map(s) it can re-run from none of; set model.image_network=plain (regions "
            f"and patches cut from its final map) or use a staged CNN (resnet50, efficientnet_lite0, swin_t)"
        )
    return backbone.stage_tail(after_map)


@dataclass
class StaircaseMaps:
    global_map: Tensor  # [B, C, h, w] last map of the global branch
    region_map: Tensor | None  # output of the region branch (or the global map for "plain")
    patch_map: Tensor | None  # output of the patch branch (or the global map for "plain")


class StaircaseNetwork(nn.Module):
    """Global, region and patch branches over one image backbone (Sec. 3.1, Fig. 2).

    ``staircase=False`` is the "plain" ablation (Table 4 without the staircase): the region and
    patch stripes are cut from the global branch's last map (PCB style), no extra stages.
    """

    def __init__(
        self,
        trunk: ImageBackbone,
        use_regions: bool,
        use_patches: bool,
        staircase: bool = True,
        region_stage: int = -3,
        patch_stage: int = -2,
        region_stripes: int = 2,
        patch_stripes: int = 3,
        split_shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.staircase = staircase
        self.use_regions, self.use_patches = use_regions, use_patches
        self.region_stage, self.patch_stage = region_stage, patch_stage
        self.region_stripes, self.patch_stripes = region_stripes, patch_stripes
        self.split_shuffle = split_shuffle
        self.region_branch = backbone_tail(trunk, region_stage) if staircase and use_regions else None
        self.patch_branch = backbone_tail(trunk, patch_stage) if staircase and use_patches else None

    # What PersonSearchMethod.image_mean_std reads.
    @property
    def mean(self) -> tuple[float, ...]:
        return self.trunk.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.trunk.std

    @property
    def out_channels(self) -> int:
        return self.trunk.out_channels

    def train(self, mode: bool = True) -> "StaircaseNetwork":
        super().train(mode)  # the trunk keeps its own frozen stages in eval mode
        # A branch copied from frozen trunk stages (image_backbone.freeze_stages) is frozen too:
        # keep its batch-norm statistics as loaded, like the trunk does.
        for branch in (self.region_branch, self.patch_branch):
            for module in branch.modules() if branch is not None else ():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()
                ):
                    module.eval()
        return self

    def _branch_input(self, feature_map: Tensor, stripes: int) -> Tensor:
        if self.training and self.split_shuffle:
            return split_and_shuffle(feature_map, stripes)
        return feature_map

    def forward(self, images: Tensor) -> StaircaseMaps:
        maps = self.trunk(images).feature_maps
        global_map = maps[-1]
        region_map = patch_map = None
        if self.use_regions:
            region_map = (
                self.region_branch(self._branch_input(maps[self.region_stage], self.region_stripes))
                if self.region_branch is not None
                else global_map
            )
        if self.use_patches:
            patch_map = (
                self.patch_branch(self._branch_input(maps[self.patch_stage], self.patch_stripes))
                if self.patch_branch is not None
                else global_map
            )
        return StaircaseMaps(global_map, region_map, patch_map)


def pool_stripes(feature_map: Tensor, num_stripes: int, mode: str) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, num_stripes, C]``: horizontal stripes, each pooled ("avg", "max", "avg+max").

    Stripes are as equal as ``H`` allows; a map with fewer rows than stripes repeats its last
    stripe so the feature count per image stays fixed.
    """
    if mode not in ("avg", "max", "avg+max"):
        raise ValueError(f"unknown image pooling {mode!r}; use avg, max or avg+max")
    pooled = []
    for stripe in feature_map.tensor_split(min(num_stripes, feature_map.shape[2]), dim=2):
        parts = []
        if mode != "max":
            parts.append(stripe.mean(dim=(2, 3)))
        if mode != "avg":
            # Max pooling keeps small, distinctive parts (a bag, shoes) that averaging dilutes.
            parts.append(stripe.amax(dim=(2, 3)))
        pooled.append(sum(parts))
    result = torch.stack(pooled, dim=1)
    if result.shape[1] < num_stripes:
        result = torch.cat([result, result[:, -1:].expand(-1, num_stripes - result.shape[1], -1)], dim=1)
    return result


class StripeProjection(nn.Module):
    """BatchNorm + linear map of pooled stripe vectors ``[B, n, C]`` to ``[B, n, D]`` (shared over stripes)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_channels)
        self.linear = nn.Linear(in_channels, dim)

    def forward(self, stripes: Tensor) -> Tensor:
        batch, count, channels = stripes.shape
        return self.linear(self.norm(stripes.reshape(batch * count, channels))).reshape(batch, count, -1)


# =============================================================================================
# 2. Textual representation: locality-constrained BERT (Sec. 3.2, eq. 1)
# =============================================================================================


def word_sub_sentence_spans(words: Sequence[str], max_sub_sentences: int) -> list[tuple[int, int]]:
    """Token spans of sub-sentences in a word list (Bi-LSTM input): cut after , ; . ! ? tokens."""
    spans: list[tuple[int, int]] = []
    start = 0
    for index, word in enumerate(words):
        if word in _SUB_SENTENCE_DELIMITERS:
            if index + 1 > start and any(w not in _SUB_SENTENCE_DELIMITERS for w in words[start : index + 1]):
                spans.append((start, index + 1))
                start = index + 1
            elif spans:  # a stray delimiter run joins the previous sub-sentence
                spans[-1] = (spans[-1][0], index + 1)
                start = index + 1
    if start < len(words):
        spans.append((start, len(words)))
    return spans[:max_sub_sentences]


class NafsTextProcessor:
    """Captions -> BERT (or Bi-LSTM) inputs plus the sub-sentence layout (picklable).

    Output, B captions, L = ``max_length``, S = ``max_sub_sentences``:

    * ``input_ids``, ``attention_mask`` ``[B, L]`` (and ``lengths`` for the Bi-LSTM): the sentence;
    * ``word_mask`` ``[B, L]``: word tokens (special tokens excluded);
    * ``token_spans`` ``[B, S, 2]``, ``num_sub_sentences`` ``[B]``: sub-sentence token spans;
    * BERT only, the *packed sub-sentence row* (length ``L + S``): for each sub-sentence a
      [CLS] followed by a copy of its tokens, ``sub_input_ids``, ``sub_position_ids`` (the
      tokens keep their sentence positions; the [CLS] takes the position just before its
      sub-sentence, i.e. it is "attached to the beginning of the sub-sentence"), ``sub_groups``
      (sub-sentence index of each slot, -1 for padding) and ``sub_cls_index`` ``[B, S]`` (slot of
      each sub-sentence [CLS]).

    Padding is always to ``max_length``: word features are stacked across evaluation batches.
    A caption without a comma is one sub-sentence; sub-sentences cut off by truncation are dropped.
    """

    def __init__(self, base: Any, kind: str, max_length: int, max_sub_sentences: int, cls_id: int = 0, pad_id: int = 0):
        if kind not in ("bert", "bilstm"):
            raise ValueError(f"kind must be bert or bilstm, got {kind!r}")
        self.base = base
        self.kind = kind
        self.max_length = max_length
        self.max_sub_sentences = max_sub_sentences
        self.cls_id = cls_id
        self.pad_id = pad_id

    def __call__(self, captions: Sequence[str] | str) -> dict[str, Tensor]:
        batch = [captions] if isinstance(captions, str) else list(captions)
        encoded = dict(self.base(batch))
        size, slots = len(batch), self.max_sub_sentences
        token_spans = torch.zeros((size, slots, 2), dtype=torch.long)
        counts = torch.zeros(size, dtype=torch.long)
        if self.kind == "bert":
            offsets = encoded.pop("offsets")
            word_mask = (offsets[..., 1] > offsets[..., 0]).long() * encoded["attention_mask"]
            for row, caption in enumerate(batch):
                spans = sub_sentence_token_spans(offsets[row], split_sub_sentences(caption))[:slots]
                if spans:
                    token_spans[row, : len(spans)] = torch.tensor(spans, dtype=torch.long)
                counts[row] = len(spans)
            encoded.update(self._packed_rows(encoded["input_ids"], token_spans, counts))
        else:
            from tbps.text.tokenizers import WordVocabulary

            word_mask = encoded["attention_mask"].clone()
            for row, caption in enumerate(batch):
                words = WordVocabulary.tokenize(caption)[: self.max_length]
                spans = word_sub_sentence_spans(words, slots)
                if spans:
                    token_spans[row, : len(spans)] = torch.tensor(spans, dtype=torch.long)
                counts[row] = len(spans)
        encoded.update({"word_mask": word_mask, "token_spans": token_spans, "num_sub_sentences": counts})
        return encoded

    def _packed_rows(self, input_ids: Tensor, token_spans: Tensor, counts: Tensor) -> dict[str, Tensor]:
        size, slots = token_spans.shape[:2]
        length = input_ids.shape[1] + slots
        ids = torch.full((size, length), self.pad_id, dtype=torch.long)
        positions = torch.zeros((size, length), dtype=torch.long)
        groups = torch.full((size, length), -1, dtype=torch.long)
        cls_index = torch.zeros((size, slots), dtype=torch.long)
        for row in range(size):
            cursor = 0
            for sub in range(int(counts[row])):
                start, end = (int(v) for v in token_spans[row, sub])
                width = end - start
                ids[row, cursor] = self.cls_id
                positions[row, cursor] = max(start - 1, 0)
                groups[row, cursor : cursor + 1 + width] = sub
                ids[row, cursor + 1 : cursor + 1 + width] = input_ids[row, start:end]
                positions[row, cursor + 1 : cursor + 1 + width] = torch.arange(start, end)
                cls_index[row, sub] = cursor
                cursor += 1 + width
        return {"sub_input_ids": ids, "sub_position_ids": positions, "sub_groups": groups, "sub_cls_index": cls_index}


@dataclass
class TextScales:
    sentence: Tensor  # [B, H] sentence [CLS] (Bi-LSTM: max-pooled)
    sub_sentences: Tensor | None  # [B, S, H] sub-sentence [CLS] (Bi-LSTM: max over the span)
    sub_mask: Tensor | None  # [B, S] 1 for real sub-sentences
    words: Tensor  # [B, L, H] word tokens
    word_mask: Tensor  # [B, L] 1 for word tokens


def group_attention_mask(groups: Tensor, additive_dtype: torch.dtype | None = None) -> Tensor:
    """4-D mask ``[B, 1, P, P]`` letting slot ``i`` attend to slot ``j`` only within one group (eq. 1).

    ``groups[b, i]`` is the sub-sentence of slot ``i`` (-1 = padding). Every slot also sees itself
    so no softmax row is empty. Boolean (True = attend) for SDPA; with ``additive_dtype`` the
    additive form (0 / dtype min) that eager attention adds to its scores.
    """
    same = (groups.unsqueeze(2) == groups.unsqueeze(1)) & (groups.unsqueeze(2) >= 0)
    same = same | torch.eye(groups.shape[1], dtype=torch.bool, device=groups.device)
    mask = same.unsqueeze(1)
    if additive_dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=additive_dtype, device=groups.device).masked_fill(
        ~mask, torch.finfo(additive_dtype).min
    )


class LocalityConstrainedTextEncoder(nn.Module):
    """Sentence, sub-sentence and word features of a caption (Sec. 3.2).

    BERT: pass 1 is plain BERT over ``[CLS] caption [SEP]`` (sentence [CLS] and word tokens).
    Pass 2 runs the *packed sub-sentence rows* of :class:`NafsTextProcessor` (each sub-sentence's
    [CLS] followed by a copy of its tokens) with a block-diagonal 4-D attention mask, so in every
    layer a sub-sentence [CLS] attends only to the tokens of its own sub-sentence: eq. 1 with
    ``U`` = the sub-sentence. The copies also attend only within the sub-sentence, which makes the
    constraint hold through all layers (in a single shared sequence the word tokens would carry
    the rest of the sentence into the [CLS] from layer 2 on). Positions are the sentence's, so a
    sub-sentence reads as it does inside the caption. Cost: one extra pass of length ``L + S``.

    Bi-LSTM: sentence = max-pooled states, sub-sentence = max over its span, words = states.
    """

    def __init__(self, backbone: TextBackbone, use_sub_sentences: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.use_sub_sentences = use_sub_sentences
        self.is_transformer = isinstance(backbone, TransformerText)

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    def fit(self, captions: Sequence[str]) -> None:
        self.backbone.fit(captions)

    def _sub_sentence_cls(self, text: Mapping[str, Tensor]) -> Tensor:
        model = self.backbone.model
        implementation = getattr(model.config, "_attn_implementation", "eager")
        additive = None if implementation == "sdpa" else model.dtype
        mask = group_attention_mask(text["sub_groups"], additive)
        hidden = model(
            input_ids=text["sub_input_ids"],
            attention_mask=mask,
            position_ids=text["sub_position_ids"],
            token_type_ids=torch.zeros_like(text["sub_input_ids"]),
        ).last_hidden_state
        index = text["sub_cls_index"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index)  # [B, S, H]

    def forward(self, text: Mapping[str, Tensor]) -> TextScales:
        output = self.backbone(text)
        word_mask = text["word_mask"]
        sub_sentences = sub_mask = None
        if self.use_sub_sentences:
            counts = text["num_sub_sentences"]
            slots = text["token_spans"].shape[1]
            sub_mask = (torch.arange(slots, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)).long()
            if self.is_transformer:
                sub_sentences = self._sub_sentence_cls(text)
            else:
                spans = token_span_masks(text["token_spans"], output.tokens.shape[1])  # [B, S, L]
                masked = output.tokens.unsqueeze(1).masked_fill(~spans.unsqueeze(-1), float("-inf"))
                sub_sentences = masked.amax(dim=2)
                sub_sentences = sub_sentences.masked_fill(~spans.any(dim=2, keepdim=True), 0.0)
            sub_sentences = sub_sentences * sub_mask.unsqueeze(-1).to(sub_sentences.dtype)
        return TextScales(output.sentence, sub_sentences, sub_mask, output.tokens, word_mask)


class TokenProjection(nn.Module):
    """LayerNorm + linear map of text hidden states to the joint space D."""

    def __init__(self, hidden: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


# =============================================================================================
# 3-5. The method: features, contextual non-local alignment, losses, similarity
# =============================================================================================


@register_method("nafs")
class NAFS(PersonSearchMethod):
    description = "NAFS: staircase CNN + locality-constrained BERT, contextual non-local alignment over all scales"

    @property
    def has_fine_similarity(self) -> bool:  # type: ignore[override]
        """The non-local score is computed (not the global-scale ablation) and used at test."""
        return self.has_local and self.test_similarity != "global"

    def __init__(self, config: Any, num_classes: int, image_size: tuple[int, int] | None = None) -> None:
        super().__init__(config, num_classes, image_size)
        self.embed_dim = int(option(config, "embed_dim", 768))
        self.max_text_length = int(option(config, "max_text_length", 64))
        self.max_sub_sentences = int(option(config, "max_sub_sentences", 8))
        self.scales = str(option(config, "scales", "full"))
        self.alignment = str(option(config, "alignment", "joint"))
        test_similarity = str(option(config, "test_similarity", "global+local"))
        self.image_pooling = str(option(config, "image_pooling", "avg"))
        self.region_stripes = int(option(config, "region_stripes", 2))  # n1
        self.patch_stripes = int(option(config, "patch_stripes", 3))  # n2
        # Memory budget (floats per [pairs x m x n] intermediate) of the tiled test similarity.
        self.similarity_max_elements = int(option(config, "similarity_max_elements", 1 << 23))
        if self.scales not in SCALES:
            raise ValueError(f"model.scales must be one of {SCALES}, got {self.scales!r}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"model.alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        self.use_mid = self.scales == "full"  # regions and sub-sentences (scale 2)
        self.use_fine = self.scales in ("full", "global+finest")  # patches and words (scale 3)
        # Table 2 "Global": the contextual non-local attention needs several features per side,
        # so with global features only it is off, like concatenation (one vector each).
        self.has_local = self.use_fine and self.alignment != "concat"
        attention = option(config, "attention", {}) or {}
        lambda_scaling = str(option(attention, "lambda_scaling", "counts"))  # checked before any backbone is built
        if lambda_scaling not in LAMBDA_SCALINGS:
            raise ValueError(f"model.attention.lambda_scaling must be one of {LAMBDA_SCALINGS}, got {lambda_scaling!r}")
        self.test_similarity = test_similarity  # checked by the setter

        loss_weights = option(config, "losses", {}) or {}
        # Eq. 7: lambda_2 L_CMPM + lambda_3 L_CMPC + lambda_4 L_CSAL with (1, 1, 0.1).
        self.cmpm_weight = float(option(loss_weights, "cmpm", 1.0))
        self.cmpc_weight = float(option(loss_weights, "cmpc", 1.0))
        self.csal_weight = float(option(loss_weights, "csal", 0.1)) if self.has_local else 0.0
        # CSAL (the equations above eq. 7) writes S itself where a distribution belongs; the shared
        # loss uses p = softmax(scale * S) (tbps.losses.similarity_kl_alignment). The paper gives
        # no scale; the public NAFS code uses 20. S is a mean of cosines, and its gap between a
        # matched and an unmatched pair is small even for features built to match: on the
        # lambda calibration's features (ContextualNonLocalAttention; 64 pairs, default
        # lambdas) it is 0.32 for S and 0.19 for S', so in a batch of 64 the matched caption
        # gets p = 0.27 (S) / 0.10 (S') at scale 10, far from its target q = 1, against
        # 0.89 / 0.40 at scale 20.
        self.csal_scale = float(option(loss_weights, "csal_scale", 20.0))
        self.csal_epsilon = float(option(loss_weights, "csal_epsilon", 1e-8))

        # ---- image: staircase network (Sec. 3.1)
        image_network = str(option(config, "image_network", "staircase"))
        if image_network not in ("staircase", "plain"):
            raise ValueError(f"model.image_network must be staircase or plain, got {image_network!r}")
        trunk = create_image_backbone(option(config, "image_backbone"), image_size=image_size)
        self.image_backbone = StaircaseNetwork(
            trunk,
            use_regions=self.use_mid,
            use_patches=self.use_fine,
            staircase=image_network == "staircase",
            region_stage=int(option(config, "region_stage", -3)),
            patch_stage=int(option(config, "patch_stage", -2)),
            region_stripes=self.region_stripes,
            patch_stripes=self.patch_stripes,
            split_shuffle=bool(option(config, "split_shuffle", True)),
        )
        channels = trunk.out_channels
        self.global_projection = StripeProjection(channels, self.embed_dim)
        self.region_projection = StripeProjection(channels, self.embed_dim) if self.use_mid else None
        self.patch_projection = StripeProjection(channels, self.embed_dim) if self.use_fine else None

        # ---- text: locality-constrained BERT (Sec. 3.2)
        self.text_backbone = LocalityConstrainedTextEncoder(
            create_text_backbone(option(config, "text_backbone")), use_sub_sentences=self.use_mid
        )
        hidden = self.text_backbone.hidden_size
        self.sentence_projection = TokenProjection(hidden, self.embed_dim)
        self.sub_sentence_projection = TokenProjection(hidden, self.embed_dim) if self.use_mid else None
        self.word_projection = TokenProjection(hidden, self.embed_dim) if self.use_fine else None

        # ---- alignment (Sec. 3.3)
        # lambda_1, lambda_2 (eq. 3) are not given in the paper. One per direction; by default
        # they act on the focal score with its count factor divided out (lambda_scaling=counts).
        # ContextualNonLocalAttention.__init__ derives the defaults (4 and 4); the old 20 for
        # both, as eq. 3 prints it, left the image-to-text attention nearly one-hot and the
        # text-to-image one nearly uniform.
        self.attention = ContextualNonLocalAttention(
            self.embed_dim,
            image_inverse_temperature=float(option(attention, "lambda_image", NON_LOCAL_LAMBDA_IMAGE)),  # lambda_1
            text_inverse_temperature=float(option(attention, "lambda_text", NON_LOCAL_LAMBDA_TEXT)),  # lambda_2
            focal=bool(option(attention, "focal", True)),
            directions=str(option(attention, "directions", "both")),
            lambda_scaling=lambda_scaling,
        )
        num_scales = 1 + int(self.use_mid) + int(self.use_fine)
        global_dim = self.embed_dim * (num_scales if self.alignment == "concat" else 1)
        self.cmpc = CMPCLoss(global_dim, max(self.num_classes, 1))

    @property
    def test_similarity(self) -> str:
        """How :meth:`similarity` and :meth:`score_candidates` score (module docstring, item 5).

        Settable on a trained model (it does not change the features), e.g.
        ``method.test_similarity = "local"`` to rank a checkpoint by the non-local score alone.
        """
        return self._test_similarity

    @test_similarity.setter
    def test_similarity(self, value: str) -> None:
        if value not in TEST_SIMILARITIES:
            raise ValueError(f"model.test_similarity must be one of {TEST_SIMILARITIES}, got {value!r}")
        if value == "local" and not self.has_local:
            # global+local falls back to the global cosine there (nothing local to add); a
            # local-only score has nothing to fall back to.
            raise ValueError(
                f"model.test_similarity=local needs the non-local score, which scales={self.scales!r} / "
                f"alignment={self.alignment!r} does not compute; use global or global+local"
            )
        self._test_similarity = value

    # ------------------------------------------------------------------ 1. image features
    def encode_image(self, images: Tensor) -> Features:
        """``global`` [B, D] (global branch) and, with local scales, ``local`` [B, m, D]:
        the global vector, then ``n1`` region stripes, then ``n2`` patch stripes."""
        maps = self.image_backbone(images)
        scales = [self.global_projection(pool_stripes(maps.global_map, 1, self.image_pooling))]
        if self.use_mid:
            scales.append(self.region_projection(pool_stripes(maps.region_map, self.region_stripes, self.image_pooling)))
        if self.use_fine:
            scales.append(self.patch_projection(pool_stripes(maps.patch_map, self.patch_stripes, self.image_pooling)))
        if self.alignment == "concat":
            # Table 4 rows 2-3: one vector per image, the scales' (mean) vectors concatenated.
            return {"global": torch.cat([scale.mean(dim=1) for scale in scales], dim=-1)}
        features = {"global": scales[0][:, 0]}
        if self.has_local:
            features["local"] = torch.cat(scales, dim=1)
        return features

    # ------------------------------------------------------------------ 2. text features
    def fit_text(self, captions: Sequence[str]) -> None:
        self.text_backbone.fit(captions)

    def build_text_processor(self) -> TextProcessor:
        backbone = self.text_backbone.backbone
        if isinstance(backbone, BiLSTMText):
            base = backbone.build_processor(self.max_text_length)
            return NafsTextProcessor(base, "bilstm", self.max_text_length, self.max_sub_sentences)
        tokenizer = backbone.build_processor(self.max_text_length, pad_to_longest=False)
        return NafsTextProcessor(
            tokenizer, "bert", self.max_text_length, self.max_sub_sentences, tokenizer.cls_id, tokenizer.pad_id
        )

    def encode_text(self, text: Mapping[str, Tensor]) -> Features:
        """``global`` [B, D] (sentence [CLS]) and, with local scales, ``local`` [B, n, D] (sentence,
        ``S`` sub-sentence slots, ``L`` word slots) with its ``local_mask`` [B, n]."""
        parts = self.text_backbone(text)
        sentence = self.sentence_projection(parts.sentence)
        scales, masks = [sentence.unsqueeze(1)], [torch.ones_like(sentence[:, :1])]
        if self.use_mid:
            scales.append(self.sub_sentence_projection(parts.sub_sentences))
            masks.append(parts.sub_mask.to(sentence.dtype))
        if self.use_fine:
            scales.append(self.word_projection(parts.words))
            masks.append(parts.word_mask.to(sentence.dtype))
        if self.alignment == "concat":
            return {"global": torch.cat([pool_tokens(s, m, "mean") for s, m in zip(scales, masks)], dim=-1)}
        features = {"global": sentence}
        if self.has_local:
            features["local"] = torch.cat(scales, dim=1)
            features["local_mask"] = torch.cat(masks, dim=1)
        return features

    # ------------------------------------------------------------------ 3. alignment
    def _scale_slices(self) -> list[tuple[slice, slice]]:
        """(image slice, text slice) of the ``local`` sets aligned separately (Table 3)."""
        slots = self.max_sub_sentences
        pairs = [(slice(0, 1), slice(0, 1))]  # whole image <-> whole sentence
        image_at, text_at = 1, 1
        if self.use_mid:  # large regions <-> sub-sentences
            pairs.append((slice(image_at, image_at + self.region_stripes), slice(text_at, text_at + slots)))
            image_at, text_at = image_at + self.region_stripes, text_at + slots
        if self.use_fine:  # small patches <-> words
            pairs.append((slice(image_at, image_at + self.patch_stripes), slice(text_at, None)))
        return pairs

    def local_similarities(
        self, image_features: Mapping[str, Tensor], text_features: Mapping[str, Tensor], max_elements: int | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(S, S')`` over every image x text, ``[images x texts]`` each (None if a direction is off).

        Joint alignment: one contextual non-local attention over all scales (eqs. 2-5). Separate
        alignment (Table 3): the global pair by cosine, regions/sub-sentences and patches/words
        each by the non-local attention within the pair of scales, averaged.
        """
        image_local, text_local, text_mask = image_features["local"], text_features["local"], text_features["local_mask"]
        if requires_autograd(image_local, text_local, *self.attention.parameters()):
            queries, image_values, keys, text_values = self.attention.project(image_local, text_local)
        else:  # evaluation: padded text slots are not projected (the attention ignores them)
            queries, image_values, keys, text_values = self.attention.project_for_evaluation(image_local, text_local, text_mask)
        if self.alignment == "joint":
            return self.attention.similarities_from_projections(
                queries, image_values, None, keys, text_values, text_mask, max_elements
            )
        totals: list[Tensor | None] = [None, None]
        pairs = self._scale_slices()
        for image_slice, text_slice in pairs:
            if image_slice.stop == 1:
                cosine = F.normalize(image_local[:, 0], dim=-1) @ F.normalize(text_local[:, 0], dim=-1).t()
                parts: tuple[Tensor | None, Tensor | None] = (
                    cosine if self.attention.uses_image_to_text else None,
                    cosine if self.attention.uses_text_to_image else None,
                )
            else:
                parts = self.attention.similarities_from_projections(
                    queries[:, image_slice], image_values[:, image_slice], None,
                    keys[:, text_slice], text_values[:, text_slice], text_mask[:, text_slice], max_elements,
                )
            totals = [part if total is None else (total if part is None else total + part) for total, part in zip(totals, parts)]
        return tuple(None if total is None else total / len(pairs) for total in totals)  # type: ignore[return-value]

    def _trim_text_padding(self, text_features: Mapping[str, Tensor]) -> Features:
        """Drop word slots that are padding for every text of this block (exact: masked keys get
        no attention weight), so short captions do not pay for ``max_text_length``."""
        mask = text_features["local_mask"]
        valid = mask.bool().any(dim=0).nonzero()
        fixed = 1 + (self.max_sub_sentences if self.use_mid else 0)  # sentence + sub-sentence slots stay
        keep = max(fixed, int(valid.max()) + 1 if valid.numel() else fixed)
        trimmed = dict(text_features)
        trimmed["local"], trimmed["local_mask"] = text_features["local"][:, :keep], mask[:, :keep]
        return trimmed

    @staticmethod
    def _mean_directions(image_to_text: Tensor | None, text_to_image: Tensor | None) -> Tensor:
        present = [s for s in (image_to_text, text_to_image) if s is not None]
        return sum(present) / len(present)  # type: ignore[return-value]

    @torch.no_grad()
    def alignment_weights(self, image_features: Mapping[str, Tensor], text_features: Mapping[str, Tensor]) -> dict[str, Any]:
        """What each text feature attends to in the image, for one image and one caption (Fig. 4).

        Returns the text-to-image weights ``alpha'`` (the softmax of eq. 3 with text keys as
        queries): ``weights`` ``[n_valid, m]`` over the image features, and ``text_labels`` /
        ``image_labels`` naming rows ("sentence", "sub-sentence 1", "word 3", ...) and columns
        ("global", "region 1", ..., "patch 1", ...), image stripes numbered top to bottom. Only
        valid text features are kept. Both feature dicts hold a single item (batch of 1).
        """
        if not self.has_local:
            raise ValueError("alignment weights need local features (scales != global, alignment != concat)")
        queries, keys = self.attention.image_query(image_features["local"][:1]), self.attention.text_key(text_features["local"][:1])
        mask = text_features["local_mask"][:1]
        _, alpha = self.attention.matched_attention(queries, keys, text_mask=mask)  # alpha' [1, n, m]
        text_labels = ["sentence"]
        if self.use_mid:
            text_labels += [f"sub-sentence {i + 1}" for i in range(self.max_sub_sentences)]
        if self.use_fine:
            text_labels += [f"word {i}" for i in range(text_features["local"].shape[1] - len(text_labels))]
        image_labels = ["global"]
        if self.use_mid:
            image_labels += [f"region {i + 1}" for i in range(self.region_stripes)]
        if self.use_fine:
            image_labels += [f"patch {i + 1}" for i in range(self.patch_stripes)]
        keep = mask[0].bool()
        return {
            "weights": alpha[0][keep],
            "text_labels": [label for label, valid in zip(text_labels, keep.tolist()) if valid],
            "image_labels": image_labels,
        }

    @torch.no_grad()
    def attention_selectivity(
        self, image_features: Mapping[str, Tensor], text_features: Mapping[str, Tensor]
    ) -> dict[str, dict[str, float]]:
        """How peaked the non-local attention of matched pairs is, per direction.

        ``image_features`` / ``text_features`` hold ``B`` encoded images and their ``B`` captions
        (item ``i`` with item ``i``). Returns ``{"image-to-text": ..., "text-to-image": ...}``,
        each :func:`tbps.models.attention.attention_selectivity` of eq. 3's weights (joint
        attention over all scales, as the default alignment): mean max weight, its uniform value
        ``1 / K``, max weight times ``K`` (1 uniform, ``K`` one-hot) and normalised entropy.
        """
        if not self.has_local:
            raise ValueError("attention selectivity needs local features (scales != global, alignment != concat)")
        text_features = self._trim_text_padding(text_features)
        queries = self.attention.image_query(image_features["local"])
        keys = self.attention.text_key(text_features["local"])
        image_mask = queries.new_ones(queries.shape[:2])
        text_mask = text_features["local_mask"]
        alpha, alpha_t2i = self.attention.matched_attention(queries, keys, image_mask, text_mask)
        return {
            "image-to-text": attention_selectivity(alpha, image_mask, text_mask.unsqueeze(1)),
            "text-to-image": attention_selectivity(alpha_t2i, text_mask, image_mask.unsqueeze(1)),
        }

    def text_feature_attention(self, image: Tensor, text: str) -> tuple[list[str], list[str], Tensor] | None:
        """alpha' (eq. 3) of every valid text feature of ``text`` over the global, region and patch
        features of ``image``, laid out on horizontal rows of the image as in Fig. 4: a stripe's
        weight covers its rows, the global feature's spreads over all.

        Returns the :meth:`alignment_weights` text labels ("sentence", "sub-sentence 1",
        "word 3"), their display names (the caption, the sub-sentence's text, the word token) and
        maps [texts x rows x 1]; ``None`` without local features.
        """
        if not self.has_local:
            return None
        processor = self.build_text_processor()
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            text_batch = {k: v.to(device) for k, v in processor([text]).items()}
            result = self.alignment_weights(self.encode_image(image.unsqueeze(0).to(device)), self.encode_text(text_batch))
        finally:
            self.train(was_training)
        rows = self.region_stripes * self.patch_stripes  # a grid both stripe counts divide
        layout = torch.zeros(len(result["image_labels"]), rows)
        for column, label in enumerate(result["image_labels"]):
            kind, _, number = label.partition(" ")
            stripes = {"region": self.region_stripes, "patch": self.patch_stripes}.get(kind)
            if stripes is None:  # the global feature: the whole image
                layout[column] = 1.0 / rows
            else:
                span = rows // stripes
                layout[column, (int(number) - 1) * span : int(number) * span] = 1.0 / span
        sub_sentences = [text[start:end].strip(" ,.;") for start, end in split_sub_sentences(text)]
        # Word slot i is token position i: WordPiece tokens for BERT, vocabulary words for the Bi-LSTM.
        words = token_strings(text, text_batch["input_ids"][0], processor.base if processor.kind == "bert" else None)
        names = []
        for label in result["text_labels"]:
            kind, _, number = label.rpartition(" ")
            if kind == "word":
                names.append(words[int(number)])
            elif kind == "sub-sentence" and int(number) <= len(sub_sentences):
                names.append(sub_sentences[int(number) - 1])
            else:
                names.append(text)
        maps = result["weights"].float().cpu() @ layout
        return list(result["text_labels"]), names, maps.unsqueeze(-1)

    def explain(self, image: Tensor, text: str) -> tuple[list[str], Tensor] | None:
        """The sentence's and each sub-sentence's rows of :meth:`text_feature_attention`."""
        attention = self.text_feature_attention(image, text)
        if attention is None:
            return None
        labels, names, maps = attention
        keep = [i for i, label in enumerate(labels) if not label.startswith("word")]
        return [names[i] for i in keep], maps[keep]

    def visualize(self, image: Tensor, text: str) -> dict[str, tuple[list[str], Tensor]] | None:
        """Fig. 4: which image stripes the sentence, each sub-sentence and each word attend to
        (:meth:`text_feature_attention`), one figure row per text scale."""
        attention = self.text_feature_attention(image, text)
        if attention is None:
            return None
        labels, names, maps = attention
        rows: dict[str, list[int]] = {"sentence": [], "sub-sentences": [], "words": []}
        for i, label in enumerate(labels):
            rows["words" if label.startswith("word") else "sub-sentences" if label.startswith("sub") else "sentence"].append(i)
        return {title: ([names[i] for i in keep], maps[keep]) for title, keep in rows.items() if keep}

    # ------------------------------------------------------------------ 4. losses (eq. 7)
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        image_features = self.encode_image(batch["images"])
        text_features = self.encode_text(batch["text"])
        labels = self.gather(batch["labels"])
        image_global, text_global = self.gather(image_features["global"]), self.gather(text_features["global"])
        losses: dict[str, Tensor] = {}
        if self.cmpm_weight:
            losses["cmpm"] = self.cmpm_weight * cmpm_loss(image_global, text_global, labels)
        if self.cmpc_weight:
            losses["cmpc"] = self.cmpc_weight * self.cmpc(image_features["global"], text_features["global"], batch["labels"])
        if self.csal_weight:
            # CSAL compares every image with every caption of the (gathered) batch.
            images = {"local": self.gather(image_features["local"])}
            texts = {"local": self.gather(text_features["local"]), "local_mask": self.gather(text_features["local_mask"])}
            image_to_text, text_to_image = self.local_similarities(images, texts)
            primary = image_to_text if image_to_text is not None else text_to_image
            losses["csal"] = self.csal_weight * similarity_kl_alignment(
                primary,
                labels,
                scale=self.csal_scale,
                epsilon=self.csal_epsilon,
                similarity_t2i=text_to_image,  # L_t on S'; with one direction, both terms use it
            )
        return losses

    # ------------------------------------------------------------------ 5. similarity at test
    @torch.no_grad()
    def similarity(self, text_features: Mapping[str, Tensor], image_features: Mapping[str, Tensor]) -> Tensor:
        """``[texts x images]``: global cosine, non-local score, or their sum (``test_similarity``).

        The non-local part comes from the evaluation kernel
        (:func:`~tbps.models.attention.fast_bidirectional_non_local_similarity`: the same numbers
        as the training-time attention, computed near the matrix-multiply bound), tiled over the
        pair grid with at most ``similarity_max_elements`` entries per ``[pairs x m x n]`` tile.
        """
        if not self.has_local or self.test_similarity == "global":
            return self.global_similarity(text_features, image_features)
        text_features = self._trim_text_padding(text_features)
        local_i2t, local_t2i = self.local_similarities(image_features, text_features, self.similarity_max_elements)
        local = self._mean_directions(local_i2t, local_t2i).t().float()
        if self.test_similarity == "local":
            return local
        return self.global_similarity(text_features, image_features) + local

    @torch.no_grad()
    def score_candidates(
        self, text_features: Mapping[str, Tensor], image_features: Mapping[str, Tensor], candidates: Tensor
    ) -> Tensor:
        """Score text ``t`` against ``candidates[t]`` only, ``[texts x k]``.

        The same number as :meth:`similarity` on those pairs: the gallery is projected once and
        :func:`~tbps.models.attention.fast_candidate_bidirectional_non_local_similarity` gathers
        each block of texts' candidates (tiles within ``similarity_max_elements``).
        """
        global_scores = self.global_similarity(text_features, image_features).gather(1, candidates)  # as similarity's
        if not self.has_local or self.test_similarity == "global":
            return global_scores
        text_features = self._trim_text_padding(text_features)
        text_local, text_mask = text_features["local"], text_features["local_mask"]
        attention = self.attention
        queries, image_values, keys, text_values = attention.project_for_evaluation(
            image_features["local"], text_local, text_mask
        )
        pairs = [(slice(None), slice(None))] if self.alignment == "joint" else self._scale_slices()
        totals: list[Tensor | None] = [None, None]
        for image_slice, text_slice in pairs:
            if image_slice.stop == 1:  # separate alignment: local slot 0 is the global vector
                cosine = torch.einsum(
                    "tkd,td->tk",
                    F.normalize(image_features["global"], dim=-1)[candidates],
                    F.normalize(text_local[:, 0], dim=-1),
                )
                parts = (cosine if attention.uses_image_to_text else None, cosine if attention.uses_text_to_image else None)
            else:
                parts = fast_candidate_bidirectional_non_local_similarity(
                    queries[:, image_slice], image_values[:, image_slice],
                    keys[:, text_slice], text_values[:, text_slice], text_mask[:, text_slice], candidates,
                    attention.image_inverse_temperature, attention.text_inverse_temperature, attention.focal,
                    image_to_text=attention.uses_image_to_text, text_to_image=attention.uses_text_to_image,
                    max_elements=self.similarity_max_elements, lambda_scaling=attention.lambda_scaling,
                )
            totals = [part if total is None else (total if part is None else total + part) for total, part in zip(totals, parts)]
        totals = [None if total is None else total / len(pairs) for total in totals]
        local = self._mean_directions(totals[0], totals[1]).float()
        if self.test_similarity == "local":
            return local
        return global_scores + local


__all__ = [
    "NAFS",
    "LocalityConstrainedTextEncoder",
    "NafsTextProcessor",
    "StaircaseNetwork",
    "backbone_tail",
    "group_attention_mask",
    "pool_stripes",
    "split_and_shuffle",
    "word_sub_sentence_spans",
]
