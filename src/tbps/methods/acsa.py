"""ACSA: asymmetric cross-scale alignment (Ji et al. 2022, ``acsa.md``).

Reads like the paper:

1. **Visual representations** (Sec. III-A): the image backbone (Swin-T at 224x224 in the paper;
   any backbone of the shared factory) gives the last-stage feature map. The **global** vector
   ``I_g`` is its average pool (Swin's stage 4 "after the global pooling"). The **regions** come
   from *spatial* horizontal parts of the same map: it is cut into six equal horizontal parts;
   head = parts 1-2, upper body = parts 2-3 (overlapping the head on part 2: long hair, a scarf),
   lower body = parts 4-5, feet = part 6. Each region is pooled over its rows and mapped by its
   own fully connected layer to ``d``: ``I_r = [I_head, I_upper, I_lower, I_foot]`` (k = 4).
   The parts are exact sixths of the map height: a row shared by two parts counts in each with
   the fraction of it that lies inside (:func:`region_row_weights`), so a 7-row Swin map (or a
   4-row EfficientNet map) still gives six equal parts.
2. **Textual representations** (Sec. III-B): BERT's [CLS] of the caption is the global text
   vector ``T_g``; up to ``M`` = 10 noun phrases per caption (the shared offline extractor;
   truncated, or padded with a validity mask, never with fake phrases) are each encoded by the
   same BERT on their own and their [CLS] is the phrase vector: ``T_p = [t_1 .. t_M]``. All real
   phrases of a batch go through BERT as one call. A linear map (shared by the sentence and the
   phrases, so they live in one space) takes BERT's hidden size to ``d``.
3. **Asymmetric cross-attention module** (ACAM, eqs. 1-11): visual entities
   ``I_m = [I_g, I_head, I_upper, I_lower, I_foot]`` against the phrases only, both directions,
   inverse temperature lambda = 20; shared as :func:`tbps.models.attention.cross_attention_similarity`.
4. **Losses** (eq. 17): ``L = L_cmpm + mu L_cmpc + gamma L_ACSA`` with mu = 4, gamma = 0.1.
   CMPM and CMPC act on the global vectors (relation I); ``L_ACSA`` (eqs. 12-16) is the shared
   :func:`tbps.losses.similarity_kl_alignment` on the batch matrices ``S`` (eq. 6, image-to-text
   term) and ``S'`` (eq. 11, text-to-image term). Eq. 12 normalises ``S`` linearly, which is not
   a distribution for cosines in [-1, 1]; like CMPM (which the loss follows) we use a softmax of
   ``losses.acsa_scale * S`` (20 by default; the paper gives no scale, see the option).
5. **Test similarity** (``test_similarity``): ``global+local`` (default) = cosine of the global
   vectors + ``local_weight`` (1.0) x the ACAM score, the ACAM score being the mean of ``S``
   and ``S'`` (the enabled directions). The paper does not say how it ranks at test; Fig. 4
   ends at the ACAM score ``S(I, T)``, and its Table V rows are "based on global-level
   alignment", so we add both. ``local`` and ``global`` are options. :meth:`ACSA.similarity`
   and :meth:`ACSA.score_candidates` (each text's own candidates, for two-stage retrieval: the
   same numbers) score with the evaluation kernels of :mod:`tbps.models.attention`. Re-ranking ("ACSA+RR", Table I) is the shared RVN:
   the evaluator's ``rerank="rvn"``.

Ablation switches, all under ``model``:

* ``relations`` (Table V): ``I`` (global alignment only: no ACAM, no ACSA loss, global cosine);
  ``I+II`` (regions against phrases); ``I-IV`` (global + regions against the sentence and the
  phrases: region-text alignment added by putting the sentence among the text entities);
  ``I-III`` (default: global + regions against phrases).
* ``local_features`` (Table IV): ``partition`` (the four overlapping body regions) or
  ``six-slices`` (the six parts themselves as six local entities, [17]'s slicing).
* ``region_source``: ``spatial`` (the paper: rows of the feature map) or ``channel`` (what the
  public code does: the same part/region grouping applied to channel chunks of the pooled
  global vector).
* ``attention.directions``: both / image-to-text / text-to-image.
* ``feature_norm``: ``layernorm`` (default) normalises the pooled backbone vectors (global,
  regions, sentence, phrases) before their FCs, as Swin-T's and BERT's outputs already are;
  ``none`` feeds the FCs the raw vectors.

Visualisation: :meth:`ACSA.explain_pair` returns, for one image and one caption, which visual
entity each noun phrase attends to (``alpha'`` of eq. 9); :func:`format_phrase_attention`
prints it as a table and :meth:`ACSA.visualize` paints it on the image (``tbps explain``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.losses import CMPCLoss, cmpm_loss, similarity_kl_alignment
from tbps.models.attention import (
    EvaluationCache,
    cross_attention_scores,
    cross_attention_similarity,
    fast_candidate_cross_attention_similarity,
    fast_cross_attention_similarity,
    requires_autograd,
)
from tbps.models.backbones import create_image_backbone, create_text_backbone
from tbps.models.backbones.common import option
from tbps.models.base import Features, PersonSearchMethod, TextProcessor, index_features, pool_tokens
from tbps.models.registry import register_method
from tbps.text.phrases import NounPhraseExtractor, pad_phrases

RELATIONS = ("I", "I+II", "I-III", "I-IV")
_GALLERY_ENTITIES = EvaluationCache()  # visual entities of the gallery being scored
LOCAL_FEATURES = ("partition", "six-slices")
REGION_SOURCES = ("spatial", "channel")
TEST_SIMILARITIES = ("global+local", "local", "global")
DIRECTIONS = ("both", "image-to-text", "text-to-image")
FEATURE_NORMS = ("layernorm", "none")

NUM_PARTS = 6
# Parts (0-based) making up each body region (Sec. III-A): head = parts 1-2, upper body =
# parts 2-3 (overlapping the head), lower body = parts 4-5, feet = part 6.
BODY_REGIONS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("head", (0, 1)),
    ("upper body", (1, 2)),
    ("lower body", (3, 4)),
    ("feet", (5,)),
)
SIX_SLICES: tuple[tuple[str, tuple[int, ...]], ...] = tuple((f"slice {p + 1}", (p,)) for p in range(NUM_PARTS))


# =============================================================================================
# 1. Visual representations (Sec. III-A)
# =============================================================================================


def region_row_weights(height: int, groups: Sequence[Sequence[int]], num_parts: int = NUM_PARTS) -> Tensor:
    """``[k, height]`` pooling weights of ``k`` regions over the rows of a feature map.

    The map's height is cut into ``num_parts`` equal parts, part ``p`` covering
    ``[p * height / num_parts, (p + 1) * height / num_parts)``; a region is a run of
    consecutive parts (``groups[r]``, 0-based). Row ``h`` covers ``[h, h + 1)``; its weight in a
    region is the length of their overlap, normalised so that each region's weights sum to 1.
    With ``height`` a multiple of ``num_parts`` this is plain averaging over the region's rows;
    otherwise a row straddling a boundary is shared in proportion, and maps with fewer rows than
    parts still give ``num_parts`` distinct parts.
    """
    if height < 1:
        raise ValueError(f"feature map height must be >= 1, got {height}")
    rows = torch.arange(height, dtype=torch.float64)
    weights = []
    for parts in groups:
        first, last = min(parts), max(parts)
        if sorted(parts) != list(range(first, last + 1)) or first < 0 or last >= num_parts:
            raise ValueError(f"a region must be a run of consecutive parts in 0..{num_parts - 1}, got {tuple(parts)}")
        start, end = first * height / num_parts, (last + 1) * height / num_parts
        overlap = (torch.minimum(rows + 1, torch.tensor(end)) - torch.maximum(rows, torch.tensor(start))).clamp(min=0)
        weights.append(overlap / overlap.sum())
    return torch.stack(weights).float()


def pool_regions(feature_map: Tensor, weights: Tensor, mode: str = "avg") -> Tensor:
    """Pool ``[B, C, H, W]`` into ``[B, k, C]`` with ``[k, H]`` row weights (:func:`region_row_weights`).

    ``avg``: weighted mean over the region's rows (and all columns); ``max``: maximum over every
    position of the rows the region touches; ``avg+max``: their sum.
    """
    if mode not in ("avg", "max", "avg+max"):
        raise ValueError(f"unknown region pooling {mode!r}; use avg, max or avg+max")
    weights = weights.to(device=feature_map.device, dtype=feature_map.dtype)
    pooled = 0
    if mode != "max":
        pooled = pooled + torch.einsum("kh,bch->bkc", weights, feature_map.mean(dim=3))
    if mode != "avg":
        row_max = feature_map.amax(dim=3)  # [B, C, H]
        touched = (weights > 0).unsqueeze(0).unsqueeze(2)  # [1, k, 1, H]
        lowest = torch.finfo(feature_map.dtype).min
        pooled = pooled + row_max.unsqueeze(1).masked_fill(~touched, lowest).amax(dim=3)
    return pooled


def channel_regions(pooled: Tensor, groups: Sequence[Sequence[int]], num_parts: int = NUM_PARTS) -> list[Tensor]:
    """The public code's "regions": the part grouping applied to channel chunks of a pooled vector.

    ``pooled`` ``[B, C]`` is cut into ``num_parts`` channel chunks (as equal as ``C`` allows);
    region ``r`` is the concatenation of the chunks ``groups[r]``. Returns ``k`` tensors
    ``[B, c_r]`` (their widths differ).
    """
    chunks = pooled.tensor_split(num_parts, dim=1)
    return [torch.cat([chunks[p] for p in parts], dim=1) for parts in groups]


def channel_region_widths(channels: int, groups: Sequence[Sequence[int]], num_parts: int = NUM_PARTS) -> list[int]:
    sizes = [len(chunk) for chunk in torch.arange(channels).tensor_split(num_parts)]
    return [sum(sizes[p] for p in parts) for parts in groups]


# =============================================================================================
# 2. Textual representations (Sec. III-B)
# =============================================================================================


class AcsaTextProcessor:
    """Captions -> tokens of the caption and of its noun phrases (picklable, runs in loader workers).

    Output for ``B`` captions, ``M`` = ``max_phrases``:

    * the caption tokens of the text backbone's processor (``input_ids``, ``attention_mask``,
      ``lengths`` for the Bi-LSTM), ``[B, L]``;
    * ``phrase_mask`` ``[B, M]``: 1 for a real phrase (the caption's first phrases), 0 for padding;
    * ``phrase_<key>`` ``[B, M, Lp]`` for each key of the phrase tokens: every real phrase
      tokenised on its own (``[CLS] phrase [SEP]``), padded to the longest phrase of the batch;
      padding slots are all zeros and are never encoded.

    ``extractor`` None (relation I) skips phrases altogether.
    """

    def __init__(
        self,
        caption_processor: Any,
        phrase_processor: Any,
        extractor: NounPhraseExtractor | None,
        max_phrases: int,
    ) -> None:
        if max_phrases < 1 and extractor is not None:
            raise ValueError(f"max_phrases must be >= 1, got {max_phrases}")
        self.caption_processor = caption_processor
        self.phrase_processor = phrase_processor
        self.extractor = extractor
        self.max_phrases = max_phrases

    def phrases(self, captions: Sequence[str]) -> list[list[str]]:
        """The (at most ``M``) noun phrases of each caption."""
        if self.extractor is None:
            return [[] for _ in captions]
        return self.extractor.extract_batch(list(captions), max_phrases=self.max_phrases)

    def __call__(self, captions: Sequence[str] | str) -> dict[str, Tensor]:
        batch = [captions] if isinstance(captions, str) else list(captions)
        encoded = dict(self.caption_processor(batch))
        encoded.pop("offsets", None)  # character spans: not needed here
        if self.extractor is None:
            return encoded
        size, slots = len(batch), self.max_phrases
        phrase_lists = self.phrases(batch)
        masks = [pad_phrases(phrases, slots)[1] for phrases in phrase_lists]
        phrase_mask = torch.tensor(masks, dtype=torch.bool).reshape(size, slots)
        flat = [phrase for phrases in phrase_lists for phrase in phrases]
        # An empty batch of phrases still gets correctly typed (all-padding) tensors.
        tokens = dict(self.phrase_processor(flat if flat else ["."]))
        tokens.pop("offsets", None)
        for key, value in tokens.items():
            slotted = value.new_zeros((size, slots) + tuple(value.shape[1:]))
            if flat:
                slotted[phrase_mask] = value  # row-major order = caption order, first slots real
            encoded[f"phrase_{key}"] = slotted
        encoded["phrase_mask"] = phrase_mask.long()
        return encoded


def pool_sentence(tokens: Tensor, mask: Tensor, sentence: Tensor, mode: str) -> Tensor:
    """Sentence vector of a text-backbone output: ``cls`` (BERT's [CLS], the paper) or ``mean``."""
    if mode == "cls":
        return sentence
    if mode == "mean":
        return pool_tokens(tokens, mask, mode)
    raise ValueError(f"unknown text pooling {mode!r}; use cls or mean")


# =============================================================================================
# 3-5. The method
# =============================================================================================


@register_method("acsa")
class ACSA(PersonSearchMethod):
    description = "ACSA: Swin-T body regions + BERT noun phrases, asymmetric cross-scale attention (image/region-phrase)"

    @property
    def has_fine_similarity(self) -> bool:  # type: ignore[override]
        """The cross-attention score exists (relations beyond I) and is used at test."""
        return self.uses_acam and self.test_similarity != "global"

    def __init__(self, config: Any, num_classes: int, image_size: tuple[int, int] | None = None) -> None:
        super().__init__(config, num_classes, image_size)
        self.embed_dim = int(option(config, "embed_dim", 768))  # d
        self.max_text_length = int(option(config, "max_text_length", 100))
        self.text_pooling = str(option(config, "text_pooling", "cls"))
        self.image_pooling = str(option(config, "image_pooling", "avg"))
        self.relations = str(option(config, "relations", "I-III"))
        self.local_features = str(option(config, "local_features", "partition"))
        self.region_source = str(option(config, "region_source", "spatial"))
        self.test_similarity = str(option(config, "test_similarity", "global+local"))
        self.local_weight = float(option(config, "local_weight", 1.0))
        self.feature_norm = str(option(config, "feature_norm", "layernorm"))
        # Memory budget (floats per [pairs x m x n] intermediate) of the tiled test similarity.
        self.similarity_max_elements = int(option(config, "similarity_max_elements", 1 << 23))
        for name, value, allowed in (
            ("relations", self.relations, RELATIONS),
            ("local_features", self.local_features, LOCAL_FEATURES),
            ("region_source", self.region_source, REGION_SOURCES),
            ("test_similarity", self.test_similarity, TEST_SIMILARITIES),
            ("feature_norm", self.feature_norm, FEATURE_NORMS),
        ):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got {value!r}")
        # Relation I is the global-only model (Table III/V row 1): no regions, phrases or ACAM.
        self.uses_acam = self.relations != "I"
        if not self.uses_acam and self.test_similarity == "local":
            raise ValueError("model.test_similarity=local needs the cross-attention module; model.relations=I has none")

        phrases = option(config, "phrases", {}) or {}
        self.max_phrases = int(option(phrases, "max_phrases", 10))  # M
        self.phrase_max_length = int(option(phrases, "max_length", 16))
        self.phrase_backend = str(option(phrases, "backend", "auto"))
        self.phrase_cache_file = option(phrases, "cache_file", None)

        attention = option(config, "attention", {}) or {}
        self.directions = str(option(attention, "directions", "both"))
        if self.directions not in DIRECTIONS:
            raise ValueError(f"model.attention.directions must be one of {DIRECTIONS}, got {self.directions!r}")
        self.lambda_i2t = float(option(attention, "lambda_i2t", 20.0))  # lambda_1 (eq. 4), Sec. IV-B: 20
        self.lambda_t2i = float(option(attention, "lambda_t2i", 20.0))  # lambda'_1 (eq. 9)

        loss_weights = option(config, "losses", {}) or {}
        # Eq. 17: L_cmpm + mu L_cmpc + gamma L_ACSA with mu = 4, gamma = 0.1.
        self.cmpm_weight = float(option(loss_weights, "cmpm", 1.0))
        self.cmpc_weight = float(option(loss_weights, "cmpc", 4.0))
        self.acsa_weight = float(option(loss_weights, "acsa", 0.1)) if self.uses_acam else 0.0
        # Softmax scale of the ACSA loss (eqs. 12-16), not in the paper. S and S' are means of
        # cosines whose matched/unmatched gap stays small even for features built to match: on
        # D = 256 features whose phrases equal their body regions plus noise (5 visual entities,
        # 10 phrases, a common offset as in pretrained features), the gap is 0.29-0.52 (S) and
        # 0.27-0.41 (S'), so in a batch of 64 the matched caption gets p = 0.23-0.72 (S) /
        # 0.18-0.49 (S') at scale 10, short of its target, against 0.84-1.00 / 0.75-0.98 at 20.
        self.acsa_scale = float(option(loss_weights, "acsa_scale", 20.0))
        self.acsa_epsilon = float(option(loss_weights, "acsa_epsilon", 1e-8))  # epsilon of eq. 14

        # ---- image (Sec. III-A)
        self.image_backbone = create_image_backbone(option(config, "image_backbone"), image_size=image_size)
        channels = self.image_backbone.out_channels
        self.region_groups = BODY_REGIONS if self.local_features == "partition" else SIX_SLICES
        # Swin-T's pooled stage 4 and BERT's [CLS] leave a LayerNorm, and the paper uses them as
        # they are (d = 768). Other backbones do not (EfficientNet's head is BN + ReLU6, all
        # positive; a mean of MiniLM tokens is short), and a bare FC on them starts the CMPM/CMPC
        # logits, whose scale is the feature norm, near uniform: ``feature_norm: layernorm`` puts
        # every backbone's vectors on Swin/BERT's footing before the FCs.
        self.image_feature_norm = nn.LayerNorm(channels) if self.feature_norm == "layernorm" else nn.Identity()
        self.global_image_projection = nn.Linear(channels, self.embed_dim)
        if self.uses_acam:
            widths = (
                [channels] * len(self.region_groups)
                if self.region_source == "spatial"
                else channel_region_widths(channels, [parts for _, parts in self.region_groups])
            )
            # "We additionally apply a fully connected layer": one per region (head and feet differ).
            self.region_projections = nn.ModuleList(nn.Linear(width, self.embed_dim) for width in widths)
        else:
            self.region_projections = nn.ModuleList()

        # ---- text (Sec. III-B)
        self.text_backbone = create_text_backbone(option(config, "text_backbone"))
        hidden = self.text_backbone.hidden_size
        self.text_feature_norm = nn.LayerNorm(hidden) if self.feature_norm == "layernorm" else nn.Identity()
        self.text_projection = nn.Linear(hidden, self.embed_dim)

        self.cmpc = CMPCLoss(self.embed_dim, max(self.num_classes, 1))

    # ------------------------------------------------------------------ entity names
    @property
    def region_names(self) -> list[str]:
        return [name for name, _ in self.region_groups]

    @property
    def visual_entity_names(self) -> list[str]:
        """Names of the visual entities ACAM aligns, in order (``I_m``)."""
        return self.region_names if self.relations == "I+II" else ["global", *self.region_names]

    @property
    def uses_image_to_text(self) -> bool:
        return self.directions in ("both", "image-to-text")

    @property
    def uses_text_to_image(self) -> bool:
        return self.directions in ("both", "text-to-image")

    # ------------------------------------------------------------------ 1. image features
    def encode_image(self, images: Tensor) -> Features:
        """``global`` ``[B, d]`` (``I_g``) and, with ACAM, ``regions`` ``[B, k, d]`` (``I_r``)."""
        feature_map = self.image_backbone(images).feature_maps[-1]
        pooled = pool_regions(feature_map, feature_map.new_ones(1, feature_map.shape[2]) / feature_map.shape[2], self.image_pooling)[:, 0]
        pooled = self.image_feature_norm(pooled)
        features = {"global": self.global_image_projection(pooled)}
        if not self.uses_acam:
            return features
        groups = [parts for _, parts in self.region_groups]
        if self.region_source == "spatial":
            weights = region_row_weights(feature_map.shape[2], groups)
            regions = self.image_feature_norm(pool_regions(feature_map, weights, self.image_pooling)).unbind(dim=1)
        else:
            regions = channel_regions(pooled, groups)
        features["regions"] = torch.stack(
            [projection(region) for projection, region in zip(self.region_projections, regions)], dim=1
        )
        return features

    # ------------------------------------------------------------------ 2. text features
    def fit_text(self, captions: Sequence[str]) -> None:
        self.text_backbone.fit(captions)

    def build_text_processor(self) -> TextProcessor:
        caption_processor = self.text_backbone.build_processor(self.max_text_length, pad_to_longest=True)
        if not self.uses_acam:
            return AcsaTextProcessor(caption_processor, None, None, 0)
        phrase_processor = self.text_backbone.build_processor(self.phrase_max_length, pad_to_longest=True)
        extractor = NounPhraseExtractor(self.phrase_backend, cache_file=self.phrase_cache_file)
        return AcsaTextProcessor(caption_processor, phrase_processor, extractor, self.max_phrases)

    def _sentence_vectors(self, text: Mapping[str, Tensor]) -> Tensor:
        output = self.text_backbone(text)
        return self.text_feature_norm(pool_sentence(output.tokens, output.mask, output.sentence, self.text_pooling))

    def encode_text(self, text: Mapping[str, Tensor]) -> Features:
        """``global`` ``[B, d]`` (``T_g``) and, with ACAM, ``phrases`` ``[B, M, d]`` (``T_p``, zeros
        at padding) with ``phrase_mask`` ``[B, M]``."""
        caption_inputs = {key: value for key, value in text.items() if not key.startswith("phrase_")}
        features = {"global": self.text_projection(self._sentence_vectors(caption_inputs))}
        if not self.uses_acam:
            return features
        mask = text["phrase_mask"].bool()
        batch, slots = mask.shape
        phrases = features["global"].new_zeros(batch, slots, self.embed_dim)
        if mask.any():
            # Every real phrase of the batch in one encoder call; padding slots are never encoded.
            phrase_inputs = {
                key[len("phrase_") :]: value[mask] for key, value in text.items() if key.startswith("phrase_") and key != "phrase_mask"
            }
            phrases = phrases.masked_scatter(mask.unsqueeze(-1), self.text_projection(self._sentence_vectors(phrase_inputs)))
        features["phrases"] = phrases
        features["phrase_mask"] = mask.to(phrases.dtype)
        return features

    # ------------------------------------------------------------------ 3. ACAM (eqs. 1-11)
    def visual_entities(self, image_features: Mapping[str, Tensor]) -> Tensor:
        """``I_m`` ``[B, m, d]``: [global, regions] (relations I-III, I-IV) or regions (I+II)."""
        if self.relations == "I+II":
            return image_features["regions"]
        return torch.cat([image_features["global"].unsqueeze(1), image_features["regions"]], dim=1)

    def _gallery_entities(self, image_features: Mapping[str, Tensor]) -> Tensor:
        """:meth:`visual_entities` of an evaluation gallery, built once for all its chunks of
        captions (:class:`~tbps.models.attention.EvaluationCache`)."""
        return _GALLERY_ENTITIES.get(
            (image_features["global"], image_features["regions"]), self.relations, lambda: self.visual_entities(image_features)
        )

    def text_entities(self, text_features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(T, mask)``: the phrases, or the sentence followed by the phrases for relations I-IV."""
        phrases, mask = text_features["phrases"], text_features["phrase_mask"]
        if self.relations == "I-IV":
            sentence = text_features["global"].unsqueeze(1)
            return torch.cat([sentence, phrases], dim=1), torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return phrases, mask

    def cross_scale_similarities(
        self, image_features: Mapping[str, Tensor], text_features: Mapping[str, Tensor], max_elements: int | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(S, S')`` (eqs. 6 and 11), ``[images x texts]`` each; None for a direction switched off.

        Without autograd (evaluation) the same numbers come from the evaluation kernel
        :func:`~tbps.models.attention.fast_cross_attention_similarity`.
        """
        text, mask = self.text_entities(text_features)
        if requires_autograd(image_features["global"], image_features["regions"], text):
            visual, score = self.visual_entities(image_features), cross_attention_similarity
        else:
            visual, score = self._gallery_entities(image_features), fast_cross_attention_similarity
        return score(
            visual, text, mask, self.lambda_i2t, self.lambda_t2i,
            image_to_text=self.uses_image_to_text, text_to_image=self.uses_text_to_image, max_elements=max_elements,
        )

    @staticmethod
    def _mean_directions(image_to_text: Tensor | None, text_to_image: Tensor | None) -> Tensor:
        present = [score for score in (image_to_text, text_to_image) if score is not None]
        return sum(present) / len(present)  # type: ignore[return-value]

    # ------------------------------------------------------------------ 4. losses (eq. 17)
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        image_features = self.encode_image(batch["images"])
        text_features = self.encode_text(batch["text"])
        labels = self.gather(batch["labels"])
        losses: dict[str, Tensor] = {}
        if self.cmpm_weight:
            losses["cmpm"] = self.cmpm_weight * cmpm_loss(
                self.gather(image_features["global"]), self.gather(text_features["global"]), labels
            )
        if self.cmpc_weight:
            losses["cmpc"] = self.cmpc_weight * self.cmpc(image_features["global"], text_features["global"], batch["labels"])
        if self.acsa_weight:
            # L_ACSA compares every image with every caption of the (gathered) batch (eqs. 12-16).
            images = {key: self.gather(image_features[key]) for key in ("global", "regions")}
            texts = {key: self.gather(text_features[key]) for key in ("global", "phrases", "phrase_mask")}
            image_to_text, text_to_image = self.cross_scale_similarities(images, texts)
            primary = image_to_text if image_to_text is not None else text_to_image
            losses["acsa"] = self.acsa_weight * similarity_kl_alignment(
                primary,
                labels,
                scale=self.acsa_scale,
                epsilon=self.acsa_epsilon,
                similarity_t2i=text_to_image,  # L_t2i on S' (eq. 16); with one direction both use it
            )
        return losses

    # ------------------------------------------------------------------ 5. similarity at test
    def _trim_phrase_padding(self, text_features: Mapping[str, Tensor]) -> Features:
        """Drop phrase slots that are padding for every text of this block (exact: padding gets no weight)."""
        mask = text_features["phrase_mask"]
        valid = mask.bool().any(dim=0).nonzero()
        keep = max(1, int(valid.max()) + 1 if valid.numel() else 1)
        trimmed = dict(text_features)
        trimmed["phrases"], trimmed["phrase_mask"] = text_features["phrases"][:, :keep], mask[:, :keep]
        return trimmed

    @torch.no_grad()
    def similarity(self, text_features: Mapping[str, Tensor], image_features: Mapping[str, Tensor]) -> Tensor:
        """``[texts x images]``: global cosine, ACAM score, or ``global + local_weight * ACAM``.

        The ACAM part comes from the evaluation kernel
        (:func:`~tbps.models.attention.fast_cross_attention_similarity`, the training-time
        numbers computed near the matrix-multiply bound), with at most ``similarity_max_elements``
        entries per ``[pairs x m x n]`` tile.
        """
        if not self.uses_acam or self.test_similarity == "global":
            return self.global_similarity(text_features, image_features)
        text_features = self._trim_phrase_padding(text_features)
        local = self._mean_directions(
            *self.cross_scale_similarities(image_features, text_features, self.similarity_max_elements)
        ).t().float()
        if self.test_similarity == "local":
            return local
        return self.global_similarity(text_features, image_features) + self.local_weight * local

    @torch.no_grad()
    def score_candidates(
        self, text_features: Mapping[str, Tensor], image_features: Mapping[str, Tensor], candidates: Tensor
    ) -> Tensor:
        """Score text ``t`` against ``candidates[t]`` only, ``[texts x k]``.

        The same number as :meth:`similarity` on those pairs
        (:func:`~tbps.models.attention.fast_candidate_cross_attention_similarity` gathers each
        block of texts' candidates, tiles within ``similarity_max_elements``).
        """
        global_scores = self.global_similarity(text_features, image_features).gather(1, candidates)  # as similarity's
        if not self.uses_acam or self.test_similarity == "global":
            return global_scores
        text_features = self._trim_phrase_padding(text_features)
        text, mask = self.text_entities(text_features)
        scores = fast_candidate_cross_attention_similarity(
            self._gallery_entities(image_features), text, mask, candidates, self.lambda_i2t, self.lambda_t2i,
            image_to_text=self.uses_image_to_text, text_to_image=self.uses_text_to_image,
            max_elements=self.similarity_max_elements,
        )
        local = self._mean_directions(*scores).float()
        if self.test_similarity == "local":
            return local
        return global_scores + self.local_weight * local

    # ------------------------------------------------------------------ visualisation (Fig. 5)
    @torch.no_grad()
    def phrase_attention(self, image_features: Mapping[str, Tensor], text_features: Mapping[str, Tensor]) -> dict[str, Any]:
        """Attention between the text entities and the visual entities of one image-caption pair.

        ``text_to_image`` ``[n_valid, m]``: ``alpha'`` (eq. 9), each phrase's weights over the
        visual entities (rows sum to 1); ``image_to_text`` ``[m, n_valid]``: ``alpha`` (eq. 4),
        each visual entity's weights over the phrases; ``image_labels`` the visual entity names.
        Only the first item of each feature dict is used.
        """
        if not self.uses_acam:
            raise ValueError("phrase attention needs the cross-attention module (relations != I)")
        visual = self.visual_entities(index_features(image_features, slice(0, 1)))[0]
        text, mask = self.text_entities(index_features(text_features, slice(0, 1)))
        text, mask = text[0], mask[0]
        cosine = F.normalize(visual, dim=-1) @ F.normalize(text, dim=-1).t()
        _, _, alpha, alpha_t2i = cross_attention_scores(
            cosine, visual.norm(dim=-1), text.norm(dim=-1), mask, visual @ visual.t(), text @ text.t(),
            self.lambda_i2t, self.lambda_t2i,
        )
        keep = mask.bool()
        return {
            "text_to_image": alpha_t2i.t()[keep],
            "image_to_text": alpha[:, keep],
            "image_labels": self.visual_entity_names,
        }

    @torch.no_grad()
    def explain_pair(self, image: Tensor, caption: str, text_processor: Any | None = None) -> dict[str, Any]:
        """Which visual entity each noun phrase of ``caption`` attends to in ``image`` ``[3, H, W]``.

        Adds ``text_labels`` (the phrases, with "sentence" first for relations I-IV) and
        ``attended`` (the visual entity of largest ``alpha'`` per phrase) to
        :meth:`phrase_attention`. Pass the processor to avoid rebuilding it for every pair.
        """
        processor = text_processor if text_processor is not None else self.build_text_processor()
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            text = {key: value.to(device) for key, value in processor([caption]).items()}
            result = self.phrase_attention(self.encode_image(image.unsqueeze(0).to(device)), self.encode_text(text))
        finally:
            self.train(was_training)
        labels = list(processor.phrases([caption])[0])
        if self.relations == "I-IV":
            labels = ["sentence", *labels]
        result["text_labels"] = labels
        result["attended"] = [result["image_labels"][int(i)] for i in result["text_to_image"].argmax(dim=1)]
        return result

    def phrase_entity_maps(self, result: Mapping[str, Any]) -> Tensor:
        """Each text entity's ``alpha'`` (eq. 9) of :meth:`explain_pair` painted onto the image's six
        horizontal parts: a region's weight spreads evenly over its parts, the global entity's
        over all six. ``[phrases x 6 x 1]`` (rows are parts)."""
        parts_of = dict(self.region_groups)
        layout = torch.zeros(len(result["image_labels"]), NUM_PARTS)
        for row, entity in enumerate(result["image_labels"]):
            parts = parts_of.get(entity, tuple(range(NUM_PARTS)))  # "global": the whole body
            layout[row, list(parts)] = 1.0 / len(parts)
        return (result["text_to_image"].float().cpu() @ layout).unsqueeze(-1)

    def explain(self, image: Tensor, text: str) -> tuple[list[str], Tensor] | None:
        """Each noun phrase's ACAM attention over the visual entities (:meth:`phrase_entity_maps`)."""
        if not self.uses_acam:
            return None
        result = self.explain_pair(image, text)
        maps = self.phrase_entity_maps(result)
        return list(result["text_labels"])[: maps.shape[0]], maps

    def visualize(self, image: Tensor, text: str) -> dict[str, tuple[list[str], Tensor]] | None:
        """Fig. 5: which visual entity (global, head, upper body, lower body, feet) each noun phrase
        attends to, labelled "a red coat → upper body 0.62" (the entity of largest ``alpha'``)."""
        if not self.uses_acam:
            return None
        result = self.explain_pair(image, text)
        maps = self.phrase_entity_maps(result)
        labels = [
            f"{phrase} → {entity} {float(weights.max()):.2f}"
            for phrase, entity, weights in zip(result["text_labels"], result["attended"], result["text_to_image"])
        ]
        return {"noun phrase → visual entity": (labels, maps)}


def format_phrase_attention(result: Mapping[str, Any]) -> str:
    """A text table of :meth:`ACSA.explain_pair`: one row per phrase, its ``alpha'`` per visual entity."""
    labels = list(result["image_labels"])
    phrases = list(result.get("text_labels", [f"phrase {i + 1}" for i in range(len(result["text_to_image"]))]))
    width = max([len(p) for p in phrases] + [6])
    lines = [" " * width + " | " + " ".join(f"{label[:10]:>10}" for label in labels)]
    for phrase, weights in zip(phrases, result["text_to_image"].tolist()):
        best = max(range(len(weights)), key=weights.__getitem__)
        cells = " ".join(f"{w:>9.2f}{'*' if j == best else ' '}" for j, w in enumerate(weights))
        lines.append(f"{phrase:<{width}} | {cells}")
    return "\n".join(lines)


__all__ = [
    "ACSA",
    "AcsaTextProcessor",
    "BODY_REGIONS",
    "channel_regions",
    "format_phrase_attention",
    "pool_regions",
    "region_row_weights",
]
