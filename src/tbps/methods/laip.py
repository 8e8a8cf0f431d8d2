"""LAIP: local alignment from image-phrase modeling (``laip.md``), on an ALBEF-style model.

LAIP's equations were lost from its text; ``methods.md`` §6 reconstructs them from ALBEF (Li et
al., NeurIPS 2021), which LAIP extends. Equation numbers below are the paper's.

1. **Encoders** (App. B): an image encoder giving a global token and patch tokens (ViT-B/16 at
   paper scale; offline, EfficientNet-Lite0's last feature map flattened into patch tokens, a
   LayerNorm on them and their mean as the global token); a text encoder = the first
   ``text_layers`` layers of a BERT-family model; a fusion encoder = the remaining layers, each
   followed after its self-attention by a new :class:`~tbps.models.attention.CrossAttentionBlock`
   (text queries, image token keys/values), then the layer's feed-forward block. The BERT stays
   whole under ``text_backbone`` (its layers are run by hand), so pretrained and new parameters
   keep their learning-rate groups.
2. **Momentum model and queues** (App. C): EMA copies (``momentum``, 0.995) of the unimodal
   encoders and the projections; queues of momentum image/text features with their person ids,
   kept as buffers so checkpoints carry them. Under DDP the gathered features are enqueued.
3. **Global alignment** (eqs. 13-20): ITC with a learnable temperature against batch + queue and
   identity-aware targets (every same-id pair is positive, eq. 17 with person ids); ITM on the
   fusion [CLS] with one hard negative image per text and one hard negative text per image,
   sampled in proportion to the ITC similarity, never of the same identity (eqs. 18-19); the
   fusion triplet loss on the ITM positive probability, margin 0.6 (eq. 20), in stage 2 only.
4. **Image-phrase stream** (Sec. II-B): noun phrases from the shared extractor, each phrase fed
   with its image as its own pair through the same encoders.

   * **MPM** (eq. 11): one word inside the phrase becomes [MASK] (all of its word pieces), the
     fusion output at those positions goes through an MLM head (initialised from the BERT
     checkpoint's MLM head when it has one), cross-entropy over the vocabulary. Whole-sentence
     MLM is the ablation (``masked_modeling: mlm``, Table V).
   * **BidirAtt** (eqs. 2-10): in cross-attention layer ``attention_layer`` of the fusion encoder
     (not the last: there the phrase [CLS] row cannot reach the masked word, its gradient is 0),
     forward attention ``a_j`` = head-averaged attention of the phrase [CLS] to patch ``j`` (eq. 4);
     backward attention ``b_j`` = head-averaged positive part of the gradient of the MPM
     prediction score (probability of the right word, eq. 5) with respect to that attention
     entry (eq. 6), from ``torch.autograd.grad`` on the retained attention probabilities;
     weights ``w = normalise(a * b)`` (eq. 7, see :func:`combine_attention`); phrase-guided image
     vector ``v_bar = sum_j w_j v_j`` (eq. 8); coarse similarity = cosine of the projected
     ``v_bar`` and phrase [CLS] (eq. 9); the loss is contrastive over the image-phrase pairs of
     the batch like ITC (eq. 10).
   * Eq. 12 sums both over a caption's phrases; the batch loss is the mean over captions of
     those sums (:meth:`LAIP.local_losses`), not the mean over image-phrase pairs.
5. **Training** (Sec. III-A, App. E2): two stages. Stage 1, until epoch
   ``local_losses_start_epoch``: ITC + ITM only; stage 2: all losses of eq. 12 (+ fusion triplet,
   BidirAtt, MPM). "In both stages" AdamW with cosine decay and a warm-up: each stage has its own,
   the engine's schedule restarting at ``optim.restart_epochs`` (the configs set it to
   ``${model.local_losses_start_epoch}``). The current epoch reaches the method through
   :meth:`LAIP.set_epoch` (or a batch key ``"epoch"``), and lives in a buffer so a resumed run
   keeps its stage.
6. **Inference** (App. D): ``similarity`` is the ITC cosine over the whole gallery;
   :meth:`LAIP.score_candidates` re-scores candidates with the ITM head (log-odds of "match"),
   batched over pairs. The paper's inference is the evaluator's ``rerank: two-stage`` with
   ``top_k: 128``. ``encode_image`` keeps every gallery image's tokens for that re-scoring:
   ``(1 + N) x C`` floats per image, 193 x 768 x 4 B = 593 KB for ViT-B/16 at 384x128 (1.8 GB
   for the 3,074 CUHK-PEDES test images in float32), 11 x 1280 x 4 B = 56 KB for
   EfficientNet-Lite0 at 160x64.

Ablation switches (Tables IV-VI, App. E), all under ``model``:

* ``losses.{itc, itm, triplet, mpm, bidiratt}`` weights, Table IV's rows: 1 ITC + ITM (triplet =
  mpm = bidiratt = 0); 3-5 + one attention (triplet = mpm = 0, ``attention_mode`` below); 6 + MPM
  (triplet = bidiratt = 0); 7 + BidirAtt + MPM (triplet = 0); 8 all (LAIP). Row 2 is row 1 after
  COCO fine-tuning: a checkpoint (``init_checkpoint``), not a switch;
* ``attention_mode``: ``forward`` | ``backward`` | ``bidirectional`` (Table IV rows 3-5);
* ``masked_modeling``: ``mpm`` | ``mlm`` (whole sentence) | ``none`` (Table V);
* ``attention_layer`` (Fig. 6 left) and ``triplet_margin`` (Fig. 6 right).

``text_pooling`` (``cls``, ALBEF's; or ``mean``) picks the text vector of ITC and BidirAtt: a
text encoder trained with mean pooling, like the bundled MiniLM, has an untrained [CLS] (after
MiniLM's first 3 layers it is the same vector for every caption). ``init_checkpoint`` starts from
an ALBEF checkpoint (:meth:`LAIP.load_albef`).
"""

from __future__ import annotations

import copy
import logging
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.losses import (
    identity_aware_contrastive_loss,
    identity_mask,
    identity_match_targets,
    soft_target_cross_entropy,
    triplet_ranking_loss,
)
from tbps.models.attention import CrossAttentionBlock
from tbps.models.backbones import create_image_backbone, create_text_backbone
from tbps.models.backbones.common import load_state_dict_file, option
from tbps.models.backbones.text import TransformerText
from tbps.models.base import Features, PersonSearchMethod, TextProcessor, pool_tokens
from tbps.models.registry import register_method

log = logging.getLogger(__name__)

ATTENTION_MODES = ("forward", "backward", "bidirectional")
MASKED_MODELING = ("mpm", "mlm", "none")
IGNORE_INDEX = -100

# Words never chosen for the MPM mask when the phrase has another word: reconstructing "a" or
# "his" is exactly the biased masking MPM avoids (Sec. I, Fig. 1b).
_FUNCTION_WORDS = frozenset(
    "a an the his her its their this that these those some any my your our one of with and or".split()
)


# =============================================================================================
# Text side: captions, noun phrases and their masks (Sec. II-B, eq. 11)
# =============================================================================================


def word_spans(offsets: Sequence[tuple[int, int]], special: Sequence[bool]) -> list[list[int]]:
    """Group token positions into words: a token continues the previous word when its character
    span starts where the previous one ended ("t-shirt" -> t, -, shirt is one word).

    ``offsets`` are the tokens' character spans, ``special`` marks [CLS]/[SEP]/padding.
    """
    words: list[list[int]] = []
    previous_end = None
    for position, ((start, end), is_special) in enumerate(zip(offsets, special)):
        if is_special:
            previous_end = None
            continue
        if previous_end is not None and start == previous_end and words:
            words[-1].append(position)
        else:
            words.append([position])
        previous_end = end
    return words


def choose_mask_word(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[bool], generator: torch.Generator | None = None) -> list[int]:
    """Token positions of one word of ``text`` to replace by [MASK] (MPM, eq. 11).

    Uniform over the phrase's words that contain a letter or digit, leaving out function words
    (determiners, possessives) when another word is there. Returns ``[]`` for a phrase with no
    such word.
    """
    words = word_spans(offsets, special)
    candidates = []
    for positions in words:
        word = text[offsets[positions[0]][0] : offsets[positions[-1]][1]]
        if any(ch.isalnum() for ch in word):
            candidates.append((positions, word.lower() in _FUNCTION_WORDS))
    content = [positions for positions, is_function in candidates if not is_function]
    pool = content or [positions for positions, _ in candidates]
    if not pool:
        return []
    return pool[int(torch.randint(len(pool), (1,), generator=generator))]


def phrase_key(phrase: str) -> int:
    """A process-independent integer for a phrase's text (lower-cased, whitespace collapsed)."""
    return zlib.crc32(" ".join(phrase.lower().split()).encode("utf-8"))


class LaipTextProcessor:
    """Captions -> tensors for LAIP (picklable; runs in data-loader workers).

    Always: ``input_ids``, ``attention_mask`` ``[B, L]`` (and ``offsets``) of the captions.
    With phrases (training): for ``P = max_phrases`` noun phrases per caption, each tokenised on
    its own as ``[CLS] phrase [SEP]`` of length ``Lp``:

    * ``phrase_input_ids``, ``phrase_attention_mask`` ``[B, P, Lp]``;
    * ``phrase_masked_ids`` ``[B, P, Lp]``: the same with one word's pieces replaced by [MASK];
    * ``phrase_mpm_labels`` ``[B, P, Lp]``: the original ids at the masked positions, -100 elsewhere;
    * ``phrase_valid`` ``[B, P]`` (real phrases with a maskable word) and ``phrase_keys`` ``[B, P]``
      (:func:`phrase_key`, to tell identical phrases apart from different ones in the BidirAtt loss).

    With ``masked_modeling="mlm"`` also ``caption_masked_ids`` / ``caption_mlm_labels`` ``[B, L]``:
    BERT-style whole-word masking of ``mlm_probability`` of the caption's words (at least one).
    """

    def __init__(
        self,
        model_path: str | Path,
        max_length: int,
        max_phrase_length: int = 16,
        max_phrases: int = 4,
        with_phrases: bool = True,
        masked_modeling: str = "mpm",
        mlm_probability: float = 0.15,
        phrase_backend: str = "auto",
        phrase_cache_file: str | None = None,
    ) -> None:
        from tbps.text.tokenizers import WordPieceTokenizer

        self.captions = WordPieceTokenizer(model_path, max_length=max_length)
        self.phrases = WordPieceTokenizer(model_path, max_length=max_phrase_length)
        self.max_phrases = int(max_phrases)
        self.with_phrases = bool(with_phrases) and self.max_phrases > 0
        self.masked_modeling = masked_modeling
        self.mlm_probability = float(mlm_probability)
        self.phrase_backend = phrase_backend
        self.phrase_cache_file = phrase_cache_file
        self._extractor: Any = None

    @property
    def mask_id(self) -> int:
        return self.captions.mask_id

    @property
    def extractor(self) -> Any:
        if self._extractor is None:
            from tbps.text.phrases import NounPhraseExtractor

            self._extractor = NounPhraseExtractor(self.phrase_backend, cache_file=self.phrase_cache_file)
        return self._extractor

    @staticmethod
    def _special(input_ids: Tensor, attention_mask: Tensor, offsets: Tensor) -> Tensor:
        # Special and padding tokens are the ones with an empty character span.
        return (offsets[..., 1] <= offsets[..., 0]) | (attention_mask == 0)

    def _mask_words(self, texts: Sequence[str], encoded: dict[str, Tensor], whole_sentence: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(masked_ids, labels, has_mask)`` for a batch of texts: one word each (MPM), or a
        ``mlm_probability`` share of the words, at least one (whole-sentence MLM)."""
        input_ids = encoded["input_ids"]
        masked = input_ids.clone()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        has_mask = torch.zeros(len(texts), dtype=torch.bool)
        special = self._special(input_ids, encoded["attention_mask"], encoded["offsets"])
        for row, text in enumerate(texts):
            offsets = [tuple(int(v) for v in pair) for pair in encoded["offsets"][row].tolist()]
            if whole_sentence:
                words = [w for w in word_spans(offsets, special[row].tolist()) if any(
                    ch.isalnum() for ch in text[offsets[w[0]][0] : offsets[w[-1]][1]])]
                if not words:
                    continue
                count = max(1, round(self.mlm_probability * len(words)))
                chosen = [words[i] for i in torch.randperm(len(words))[:count].tolist()]
                positions = [p for word in chosen for p in word]
            else:
                positions = choose_mask_word(text, offsets, special[row].tolist())
            if positions:
                labels[row, positions] = input_ids[row, positions]
                masked[row, positions] = self.mask_id
                has_mask[row] = True
        return masked, labels, has_mask

    def __call__(self, captions: Sequence[str] | str) -> dict[str, Tensor]:
        captions = [captions] if isinstance(captions, str) else list(captions)
        output = dict(self.captions(captions))
        if self.masked_modeling == "mlm" and self.with_phrases:
            output["caption_masked_ids"], output["caption_mlm_labels"], _ = self._mask_words(captions, output, whole_sentence=True)
        if not self.with_phrases:
            return output
        from tbps.text.phrases import pad_phrases

        batch, count = len(captions), self.max_phrases
        padded, real = zip(*(pad_phrases(p, count) for p in self.extractor.extract_batch(captions, max_phrases=count)))
        flat = [phrase if phrase else "." for phrases in padded for phrase in phrases]  # "." = placeholder
        encoded = self.phrases(flat)
        masked, labels, has_mask = self._mask_words(flat, encoded, whole_sentence=False)
        length = encoded["input_ids"].shape[1]
        output.update(
            phrase_input_ids=encoded["input_ids"].reshape(batch, count, length),
            phrase_attention_mask=encoded["attention_mask"].reshape(batch, count, length),
            phrase_masked_ids=masked.reshape(batch, count, length),
            phrase_mpm_labels=labels.reshape(batch, count, length),
            phrase_valid=torch.tensor([v for row in real for v in row], dtype=torch.bool).reshape(batch, count) & has_mask.reshape(batch, count),
            phrase_keys=torch.tensor([phrase_key(p) for p in flat], dtype=torch.long).reshape(batch, count),
        )
        return output


# =============================================================================================
# Model blocks
# =============================================================================================


class MaskedLanguageModelHead(nn.Module):
    """BERT's MLM head: dense + GELU + LayerNorm, then a linear map to the vocabulary (eq. 11)."""

    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))

    def initialise_from(self, word_embeddings: Tensor, model_path: Any) -> bool:
        """Decoder from the word embeddings (BERT ties them); the rest from the checkpoint's
        ``cls.predictions.*`` when it has an MLM head. Returns True when that head was found."""
        with torch.no_grad():
            self.decoder.weight.copy_(word_embeddings)
            self.decoder.bias.zero_()
        state = _checkpoint_mlm_head(model_path)
        if not state:
            return False
        mapping = {
            "transform.dense.weight": self.dense.weight, "transform.dense.bias": self.dense.bias,
            "transform.LayerNorm.weight": self.norm.weight, "transform.LayerNorm.bias": self.norm.bias,
            "transform.LayerNorm.gamma": self.norm.weight, "transform.LayerNorm.beta": self.norm.bias,
            "decoder.weight": self.decoder.weight, "bias": self.decoder.bias, "decoder.bias": self.decoder.bias,
        }
        with torch.no_grad():
            for key, value in state.items():
                target = mapping.get(key)
                if target is not None and target.shape == value.shape:
                    target.copy_(value)
        return True


def _checkpoint_mlm_head(model_path: Any) -> dict[str, Tensor]:
    """``cls.predictions.*`` tensors (prefix removed) of a local BERT checkpoint, or ``{}``."""
    path = Path(str(model_path)).expanduser()
    files = [path / "model.safetensors", path / "pytorch_model.bin"] if path.is_dir() else []
    if not path.is_dir():
        try:  # a Hugging Face cache id, looked up without network
            from transformers.utils import cached_file

            for name in ("model.safetensors", "pytorch_model.bin"):
                found = cached_file(str(model_path), name, local_files_only=True, _raise_exceptions_for_missing_entries=False)
                if found:
                    files.append(Path(found))
        except (OSError, ValueError, TypeError):
            return {}
    for file in files:
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                return {k[len("cls.predictions."):]: handle.get_tensor(k) for k in handle.keys() if k.startswith("cls.predictions.")}
        state = torch.load(file, map_location="cpu", weights_only=True)
        return {k[len("cls.predictions."):]: v for k, v in state.items() if k.startswith("cls.predictions.")}
    return {}


def extended_attention_mask(mask: Tensor, dtype: torch.dtype, implementation: str = "eager") -> Tensor:
    """``[B, L]`` 1/0 mask -> ``[B, 1, 1, L]`` mask for BERT self-attention layers run by hand.

    Boolean (True = attend) for the SDPA kernels, which under autocast accept a boolean mask
    whatever the query dtype; additive (0 / most negative) for the eager implementation.
    """
    if implementation == "sdpa":
        return mask[:, None, None, :].bool()
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def sample_hard_negatives(
    similarity: Tensor, row_ids: Tensor, column_ids: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One negative column per row, drawn with probability ``softmax(similarity)`` over the
    columns of a different identity (ITM hard negatives, ALBEF; eqs. 18-19).

    Returns ``(index [R], valid [R])``; a row whose every column shares its identity has no
    negative (``valid`` False, its index is arbitrary and must be ignored).
    """
    allowed = ~identity_mask(row_ids, column_ids)
    weights = similarity.detach().float().softmax(dim=1) * allowed
    # Softmax underflow can zero every allowed column of a row: fall back to uniform over them.
    underflow = (weights.sum(dim=1) <= 0) & allowed.any(dim=1)
    weights = torch.where(underflow[:, None], allowed.float(), weights)
    valid = allowed.any(dim=1)
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    index = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return index, valid


def combine_attention(forward: Tensor, backward: Tensor | None, mode: str, epsilon: float = 1e-12) -> Tensor:
    """Weights over image patches summing to 1 (eq. 7), ``[P, N]`` from ``[P, N]`` inputs.

    ``forward`` ``a`` (head-averaged attention of the phrase [CLS], eq. 4) and ``backward`` ``b``
    (head-averaged positive gradient, eq. 6) are both non-negative.

    * ``bidirectional``: ``w = a * b / sum(a * b)``. A product, not a sum: a patch needs both to
      be attended to *and* to raise the probability of the masked word, which is the Grad-CAM
      reading (attention map times its gradient) that the backward attention comes from, and a
      sum would let a large attention on the background survive a zero gradient. L1
      normalisation rather than a softmax keeps patches with zero evidence at weight 0 (a softmax
      of values this small would be nearly uniform).
    * ``forward``: ``w = a / sum(a)``; ``backward``: ``w = b / sum(b)``.

    Zero-safe: a row whose product (or gradient) is all zero, e.g. at the last cross-attention
    layer where the gradient never reaches the [CLS] row, falls back to the forward weights.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {mode!r}")
    forward = forward.clamp(min=0)
    forward_weights = forward / forward.sum(dim=1, keepdim=True).clamp(min=epsilon)
    if mode == "forward" or backward is None:
        return forward_weights
    backward = backward.clamp(min=0)
    combined = forward * backward if mode == "bidirectional" else backward
    total = combined.sum(dim=1, keepdim=True)
    return torch.where(total > epsilon, combined / total.clamp(min=epsilon), forward_weights)


# =============================================================================================
# ALBEF checkpoints
# =============================================================================================

ALBEF_MEAN = (0.48145466, 0.4578275, 0.40821073)
ALBEF_STD = (0.26862954, 0.26130258, 0.27577711)
# ALBEF's cross-attention sub-module names -> CrossAttentionBlock's.
_ALBEF_CROSS = {
    "self.query": "query", "self.key": "key", "self.value": "value",
    "output.dense": "output", "output.LayerNorm": "norm",
}
_ALBEF_MLM = {"transform.dense": "dense", "transform.LayerNorm": "norm", "decoder": "decoder"}
_ALBEF_DIRECT = {
    "vision_proj": "image_projection", "text_proj": "text_projection",
    "vision_proj_m": "momentum_image_projection", "text_proj_m": "momentum_text_projection",
    "itm_head": "itm_head",
}


def albef_key(key: str, text_layers: int) -> str | None:
    """This model's parameter name for an ALBEF state-dict key, or None when it has none.

    ALBEF (github.com/salesforce/ALBEF) names: ``visual_encoder[_m].*`` (a timm-style ViT-B/16),
    ``text_encoder[_m].[bert.]{embeddings, encoder.layer.i.*}`` with ``crossattention`` in the
    fusion layers ``i >= text_layers``, ``text_encoder.cls.predictions.*`` (pretraining's MLM
    head), ``vision_proj``, ``text_proj``, their ``_m`` copies, ``itm_head`` and ``temp``.
    """
    key = key.removeprefix("module.")
    if key == "temp":
        return "temperature"
    head, _, rest = key.partition(".")
    if head in _ALBEF_DIRECT:
        return f"{_ALBEF_DIRECT[head]}.{rest}"
    if head in ("visual_encoder", "visual_encoder_m"):
        return f"{'momentum_image_backbone' if head.endswith('_m') else 'image_backbone'}.net.{rest}"
    if head not in ("text_encoder", "text_encoder_m"):
        return None
    momentum = head.endswith("_m")
    if rest.startswith("cls.predictions."):
        if momentum:
            return None
        rest = rest.removeprefix("cls.predictions.")
        if rest == "bias":
            return "mlm_head.decoder.bias"
        for albef, ours in _ALBEF_MLM.items():
            if rest.startswith(albef + "."):
                return f"mlm_head.{ours}.{rest.removeprefix(albef + '.')}"
        return None
    rest = rest.removeprefix("bert.")
    if rest.startswith("pooler."):
        return None
    target = "momentum_text_encoder" if momentum else "text_backbone.model"
    if not rest.startswith("encoder.layer."):
        return f"{target}.{rest}"
    index_text, _, inside = rest.removeprefix("encoder.layer.").partition(".")
    index = int(index_text)
    if momentum and index >= text_layers:
        return None  # the momentum model here is unimodal: no fusion layers
    if inside.startswith("crossattention."):
        inside = inside.removeprefix("crossattention.")
        for albef, ours in _ALBEF_CROSS.items():
            if inside.startswith(albef + "."):
                if index < text_layers:
                    raise ValueError(
                        f"the ALBEF checkpoint has cross-attention in layer {index}, but model.text_layers is "
                        f"{text_layers}: set text_layers to ALBEF's fusion start (6 for BERT-base)"
                    )
                return f"cross_attention.{index - text_layers}.{ours}.{inside.removeprefix(albef + '.')}"
        return None
    return f"{target}.encoder.layer.{index}.{inside}"


# =============================================================================================
# The method
# =============================================================================================


@register_method("laip")
class LAIP(PersonSearchMethod):
    description = "LAIP: ALBEF-style ITC/ITM + fusion triplet, BidirAtt and mask phrase modeling on image-phrase pairs"
    has_fine_similarity = True

    def __init__(self, config: Any, num_classes: int, image_size: tuple[int, int] | None = None) -> None:
        super().__init__(config, num_classes, image_size)
        embed_dim = int(option(config, "embed_dim", 256))
        self.max_text_length = int(option(config, "max_text_length", 64))
        self.max_phrase_length = int(option(config, "max_phrase_length", 16))
        self.max_phrases = int(option(config, "max_phrases", 4))
        self.phrase_backend = str(option(config, "phrase_backend", "auto"))
        self.phrase_cache_file = option(config, "phrase_cache_file")
        self.momentum = float(option(config, "momentum", 0.995))
        self.queue_size = int(option(config, "queue_size", 4096))
        self.distill_alpha = float(option(config, "distill_alpha", 0.0))
        self.attention_mode = str(option(config, "attention_mode", "bidirectional"))
        self.masked_modeling = str(option(config, "masked_modeling", "mpm"))
        self.mlm_probability = float(option(config, "mlm_probability", 0.15))
        self.local_losses_start_epoch = int(option(config, "local_losses_start_epoch", 0))
        self.triplet_margin = float(option(config, "triplet_margin", 0.6))
        # The text vector of ITC / BidirAtt: ALBEF's [CLS]; ``mean`` over the real tokens for a text
        # encoder trained with mean pooling (MiniLM: its [CLS] after 3 layers is one vector for
        # every caption, so ITC would start from a constant text feature).
        self.text_pooling = str(option(config, "text_pooling", "cls"))
        if self.text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be cls or mean, got {self.text_pooling!r}")
        self.score_batch_pairs = int(option(config, "score_batch_pairs", 1024))
        weights = option(config, "losses", {}) or {}
        self.loss_weights = {name: float(option(weights, name, 1.0)) for name in ("itc", "itm", "triplet", "mpm", "bidiratt")}
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {self.attention_mode!r}")
        if self.masked_modeling not in MASKED_MODELING:
            raise ValueError(f"masked_modeling must be one of {MASKED_MODELING}, got {self.masked_modeling!r}")

        # ---- 1. encoders (App. B)
        self.image_backbone = create_image_backbone(option(config, "image_backbone"), image_size=image_size)
        self.text_backbone = create_text_backbone(option(config, "text_backbone"))
        if not isinstance(self.text_backbone, TransformerText):
            raise ValueError("LAIP splits a BERT-family model into text and fusion encoders; the Bi-LSTM cannot be used")
        bert = self.text_backbone.model
        bert.pooler = None  # never used; left in, it would hold parameters without gradients (DDP)
        bert_config = bert.config
        total_layers = len(bert.encoder.layer)
        self.text_layers = int(option(config, "text_layers", total_layers // 2))
        if not 1 <= self.text_layers < total_layers:
            raise ValueError(f"text_layers must be in 1..{total_layers - 1} for this model, got {self.text_layers}")
        self.fusion_layers = total_layers - self.text_layers
        if getattr(self.text_backbone, "frozen_layers", 0) >= self.text_layers:
            log.warning(
                "LAIP's whole text encoder (embeddings + %d layers) is frozen: its [CLS] is the ITC text feature and cannot "
                "adapt (MiniLM's [CLS] is the same vector for every caption); lower model.text_backbone.freeze_layers",
                self.text_layers,
            )
        self.attention_layer = int(option(config, "attention_layer", max(0, self.fusion_layers - 2)))
        if not 0 <= self.attention_layer < self.fusion_layers:
            raise ValueError(f"attention_layer must be in 0..{self.fusion_layers - 1}, got {self.attention_layer}")
        hidden, image_width = int(bert_config.hidden_size), self.image_backbone.out_channels
        self.image_has_cls = self.image_backbone.has_cls_token
        # Transformer tokens come out of its final LayerNorm; CNN feature maps (ReLU6 outputs) get one.
        self.image_token_norm = nn.Identity() if self.image_has_cls else nn.LayerNorm(image_width)
        cross = option(config, "cross_attention", {}) or {}
        self.cross_attention = nn.ModuleList(
            CrossAttentionBlock(
                hidden, image_width,
                num_heads=int(option(cross, "heads", bert_config.num_attention_heads)),
                dropout=float(option(cross, "dropout", bert_config.attention_probs_dropout_prob)),
                layer_norm_eps=float(bert_config.layer_norm_eps),
            )
            for _ in range(self.fusion_layers)
        )
        self.image_projection = nn.Linear(image_width, embed_dim)  # g_v (eq. 13)
        self.text_projection = nn.Linear(hidden, embed_dim)  # g_w (eq. 14)
        self.itm_head = nn.Linear(hidden, 2)  # eq. 18
        self.temperature = nn.Parameter(torch.tensor(float(option(config, "temperature", 0.07))))
        self.mlm_head = MaskedLanguageModelHead(hidden, int(bert_config.vocab_size), float(bert_config.layer_norm_eps))
        self.mlm_head_pretrained = self.mlm_head.initialise_from(
            bert.embeddings.word_embeddings.weight, self.text_backbone.model_path
        ) if bool(option(option(config, "text_backbone"), "pretrained", True)) else False

        # ---- 2. momentum model (EMA copies of the unimodal encoders and projections) and queues
        self.momentum_image_backbone = copy.deepcopy(self.image_backbone)
        self.momentum_image_token_norm = copy.deepcopy(self.image_token_norm)
        self.momentum_text_encoder = copy.deepcopy(bert)
        self.momentum_text_encoder.encoder.layer = self.momentum_text_encoder.encoder.layer[: self.text_layers]
        self.momentum_image_projection = copy.deepcopy(self.image_projection)
        self.momentum_text_projection = copy.deepcopy(self.text_projection)
        for _, momentum_parameter in self.momentum_parameter_pairs():
            momentum_parameter.requires_grad_(False)
        self.register_buffer("image_queue", torch.zeros(self.queue_size, embed_dim))
        self.register_buffer("text_queue", torch.zeros(self.queue_size, embed_dim))
        self.register_buffer("queue_ids", torch.full((self.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("current_epoch", torch.zeros((), dtype=torch.long))

        # ---- 3. optional start from an ALBEF checkpoint (the paper fine-tunes ALBEF's weights)
        init = option(config, "init_checkpoint") or {}
        if init:
            if str(option(init, "format", "albef")) != "albef":
                raise ValueError(f"model.init_checkpoint.format must be 'albef', got {option(init, 'format')!r}")
            if option(option(config, "image_backbone"), "mean") is None:
                # ALBEF was trained on CLIP's normalisation; the weights expect it.
                for backbone in (self.image_backbone, self.momentum_image_backbone):
                    backbone.mean, backbone.std = ALBEF_MEAN, ALBEF_STD
            if option(init, "path"):  # None when rebuilt from a tbps checkpoint, which carries the weights
                self.init_report = report = self.load_albef(option(init, "path"))
                log.info("ALBEF checkpoint %s: %d tensors loaded; not in it (kept as initialised): %d %s; ignored: %d %s",
                         option(init, "path"), len(report["loaded"]), len(report["missing"]), report["missing"][:5],
                         len(report["ignored"]), report["ignored"][:5])

    def load_albef(self, path: str | Path) -> dict[str, list[str]]:
        """Copy an ALBEF checkpoint's weights into this model by key mapping (:func:`albef_key`).

        The ViT's position embeddings are resampled to this model's patch grid (ALBEF trains at
        256x256 or 384x384). A shape mismatch or a checkpoint that fills nothing is an error;
        parameters the checkpoint lacks (e.g. the MLM head of a retrieval checkpoint) keep their
        initialisation and are listed in the returned report (``loaded``, ``missing``,
        ``ignored``), as are its keys with no counterpart here (queues, pooler).
        """
        state = load_state_dict_file(path)
        own = self.state_dict()
        mapped: dict[str, Tensor] = {}
        ignored = []
        for key, value in state.items():
            target = albef_key(key, self.text_layers)
            if target is None or target not in own:
                ignored.append(key)
                continue
            if target.endswith("net.pos_embed") and value.shape != own[target].shape:
                from timm.layers import resample_abs_pos_embed

                grid = tuple(self.image_backbone.grid)
                value = resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=1)
            if target == "temperature":
                value = value.reshape(own[target].shape)
            if value.shape != own[target].shape:
                raise ValueError(
                    f"ALBEF checkpoint {str(path)!r}: {key} has shape {tuple(value.shape)}, this model's {target} "
                    f"{tuple(own[target].shape)} (check model.image_backbone / text_backbone: ALBEF is ViT-B/16 + BERT-base)"
                )
            mapped[target] = value.to(own[target].dtype)
        if not mapped:
            raise ValueError(f"{str(path)!r} holds no ALBEF weights (keys like visual_encoder.*, text_encoder.*)")
        words = "text_backbone.model.embeddings.word_embeddings.weight"
        if "mlm_head.decoder.weight" not in mapped and words in mapped:
            mapped["mlm_head.decoder.weight"] = mapped[words]  # BERT ties the MLM decoder to the embeddings
        self.load_state_dict(mapped, strict=False)
        # Queues (ALBEF's hold features without person ids) start empty here.
        missing = [key for key in own if key not in mapped and not key.startswith(("image_queue", "text_queue", "queue_", "current_epoch"))]
        if not any(key.startswith("momentum_") for key in mapped):
            # A checkpoint without momentum copies: start the EMA model from the online weights.
            for online, momentum in self.momentum_parameter_pairs():
                momentum.data.copy_(online.data)
            missing = [key for key in missing if not key.startswith("momentum_")]
        return {"loaded": sorted(mapped), "missing": sorted(missing), "ignored": sorted(ignored)}

    # ------------------------------------------------------------------ text input
    @property
    def uses_local_losses(self) -> bool:
        return bool(self.loss_weights["bidiratt"] or self.loss_weights["mpm"])

    def build_text_processor(self) -> TextProcessor:
        return LaipTextProcessor(
            self.text_backbone.model_path,
            max_length=self.max_text_length,
            max_phrase_length=self.max_phrase_length,
            max_phrases=self.max_phrases,
            with_phrases=self.uses_local_losses,
            masked_modeling=self.masked_modeling,
            mlm_probability=self.mlm_probability,
            phrase_backend=self.phrase_backend,
            phrase_cache_file=self.phrase_cache_file,
        )

    # ------------------------------------------------------------------ schedule
    def set_epoch(self, epoch: int) -> None:
        """Tell the method the training epoch (two-stage schedule, Sec. III-A)."""
        self.current_epoch.fill_(int(epoch))

    def stage_two_active(self, epoch: int | None = None) -> bool:
        """Stage 2 (all losses of eq. 12) from ``local_losses_start_epoch`` on; stage 1 is ITC +
        ITM only (Sec. III-A: "During the first stage, it is trained ... with only [ITC] and [ITM]
        losses. In the second stage ... with all losses")."""
        epoch = int(self.current_epoch) if epoch is None else int(epoch)
        return epoch >= self.local_losses_start_epoch

    # ------------------------------------------------------------------ encoders
    def _image_tokens(self, images: Tensor, backbone: nn.Module, token_norm: nn.Module) -> Tensor:
        """``[B, 1 + N, C]``: the global token, then the ``N`` patch tokens (row-major grid)."""
        return self._tokens_from_output(backbone(images), token_norm)

    @staticmethod
    def _tokens_from_output(output: Any, token_norm: nn.Module) -> Tensor:
        patches = token_norm(output.feature_maps[-1].flatten(2).transpose(1, 2))
        cls = output.cls_token if output.cls_token is not None else patches.mean(dim=1)
        return torch.cat([cls.unsqueeze(1), patches], dim=1)

    def _text_tokens(self, input_ids: Tensor, attention_mask: Tensor, encoder: nn.Module | None = None) -> Tensor:
        """Text encoder: embeddings and the first ``text_layers`` BERT layers, ``[B, L, H]``."""
        bert = self.text_backbone.model if encoder is None else encoder
        hidden = bert.embeddings(input_ids=input_ids)
        mask = extended_attention_mask(attention_mask, hidden.dtype, bert.config._attn_implementation)
        for layer in bert.encoder.layer[: self.text_layers]:
            hidden = layer(hidden, mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    def fuse(
        self,
        text_hidden: Tensor,
        text_mask: Tensor,
        image_tokens: Tensor,
        image_mask: Tensor | None = None,
        attention_layer: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Fusion encoder: per layer, BERT self-attention -> cross-attention to the image -> FFN.

        Returns the fused tokens ``[B, L, H]`` and, when ``attention_layer`` is given, that
        layer's cross-attention probabilities ``[B, heads, L, 1 + N]`` (in the graph).
        """
        mask = extended_attention_mask(text_mask, text_hidden.dtype, self.text_backbone.model.config._attn_implementation)
        hidden, attention = text_hidden, None
        layers = self.text_backbone.model.encoder.layer[self.text_layers :]
        for index, (layer, cross) in enumerate(zip(layers, self.cross_attention)):
            hidden = layer.attention(hidden, mask)[0]
            hidden, probabilities = cross(hidden, image_tokens, image_mask, return_attention=index == attention_layer)
            if probabilities is not None:
                attention = probabilities
            hidden = layer.feed_forward_chunk(hidden)
        return hidden, attention

    def encode_image(self, images: Tensor) -> Features:
        tokens = self._image_tokens(images, self.image_backbone, self.image_token_norm)
        return {"global": F.normalize(self.image_projection(tokens[:, 0]), dim=-1), "tokens": tokens}

    def encode_text(self, text: Mapping[str, Tensor]) -> Features:
        hidden = self._text_tokens(text["input_ids"], text["attention_mask"])
        return {
            "global": F.normalize(self.text_projection(pool_tokens(hidden, text["attention_mask"], self.text_pooling)), dim=-1),
            "tokens": hidden,
            "mask": text["attention_mask"],
        }

    # ------------------------------------------------------------------ momentum model, queues
    def momentum_parameter_pairs(self) -> Iterator[tuple[nn.Parameter, nn.Parameter]]:
        """(online, momentum) parameter pairs of the unimodal encoders and projections."""
        for online, momentum in (
            (self.image_backbone, self.momentum_image_backbone),
            (self.image_token_norm, self.momentum_image_token_norm),
            (self.image_projection, self.momentum_image_projection),
            (self.text_projection, self.momentum_text_projection),
        ):
            yield from zip(online.parameters(), momentum.parameters())
        bert = self.text_backbone.model
        for name, momentum_parameter in self.momentum_text_encoder.named_parameters():
            yield bert.get_parameter(name), momentum_parameter

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_m <- m * theta_m + (1 - m) * theta`` (App. C, after MoCo)."""
        for online, momentum in self.momentum_parameter_pairs():
            momentum.mul_(self.momentum).add_(online.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def momentum_features(self, images: Tensor, text: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        image_tokens = self._image_tokens(images, self.momentum_image_backbone, self.momentum_image_token_norm)
        text_hidden = self._text_tokens(text["input_ids"], text["attention_mask"], self.momentum_text_encoder)
        return (
            F.normalize(self.momentum_image_projection(image_tokens[:, 0]), dim=-1),
            F.normalize(self.momentum_text_projection(pool_tokens(text_hidden, text["attention_mask"], self.text_pooling)), dim=-1),
        )

    @torch.no_grad()
    def enqueue(self, image_features: Tensor, text_features: Tensor, ids: Tensor) -> None:
        """Write features at the pointer, wrapping around; keep the newest ``queue_size``."""
        count = image_features.shape[0]
        if count > self.queue_size:  # only the newest fit
            image_features, text_features, ids = image_features[-self.queue_size :], text_features[-self.queue_size :], ids[-self.queue_size :]
            count = self.queue_size
        slots = (self.queue_pointer + torch.arange(count, device=self.queue_ids.device)) % self.queue_size
        self.image_queue[slots] = image_features.to(self.image_queue.dtype)
        self.text_queue[slots] = text_features.to(self.text_queue.dtype)
        self.queue_ids[slots] = ids.to(self.queue_ids.dtype)
        self.queue_pointer.copy_((self.queue_pointer + count) % self.queue_size)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + count, max=self.queue_size))

    def queue_contents(self) -> tuple[Tensor, Tensor, Tensor]:
        """The filled part of the queues (clones: the queues change in place after the loss)."""
        filled = int(self.queue_filled)
        return self.image_queue[:filled].clone(), self.text_queue[:filled].clone(), self.queue_ids[:filled].clone()

    # ------------------------------------------------------------------ 3. global alignment
    def itc_loss(
        self, image_features: Tensor, text_features: Tensor, image_momentum: Tensor, text_momentum: Tensor, ids: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Identity-aware ITC (eqs. 15-17): online features against momentum batch + queue.

        Returns the loss and the batch blocks of the logits (image-to-text, text-to-image) used
        to sample ITM hard negatives.
        """
        image_queue, text_queue, queue_ids = self.queue_contents()
        text_columns = torch.cat([text_momentum, text_queue])
        image_columns = torch.cat([image_momentum, image_queue])
        column_ids = torch.cat([ids, queue_ids])
        temperature = self.temperature
        logits_i2t = image_features @ text_columns.t() / temperature
        logits_t2i = text_features @ image_columns.t() / temperature
        if self.distill_alpha > 0:
            # ALBEF's momentum distillation: targets mix the momentum model's own similarity.
            with torch.no_grad():
                identity_targets = identity_match_targets(ids, column_ids, dtype=logits_i2t.dtype)
                soft_i2t = (image_momentum @ text_columns.t() / temperature).softmax(dim=1)
                soft_t2i = (text_momentum @ image_columns.t() / temperature).softmax(dim=1)
                targets_i2t = self.distill_alpha * soft_i2t + (1 - self.distill_alpha) * identity_targets
                targets_t2i = self.distill_alpha * soft_t2i + (1 - self.distill_alpha) * identity_targets
            loss = (soft_target_cross_entropy(logits_i2t, targets_i2t) + soft_target_cross_entropy(logits_t2i, targets_t2i)) / 2
        else:
            loss = identity_aware_contrastive_loss(
                logits_i2t, ids, column_ids, similarity_t2i=logits_t2i, person_ids_image_columns=column_ids
            )
        batch = image_features.shape[0]
        return loss, logits_i2t[:, :batch], logits_t2i[:, :batch]

    def itm_logits(self, text_hidden: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """ITM logits ``[B, 2]`` (class 1 = match) from the fusion [CLS] (eq. 18)."""
        fused, _ = self.fuse(text_hidden, text_mask, image_tokens)
        return self.itm_head(fused[:, 0])

    def itm_and_triplet_losses(
        self,
        text_hidden: Tensor,
        text_mask: Tensor,
        image_tokens: Tensor,
        logits_i2t: Tensor,
        logits_t2i: Tensor,
        ids: Tensor,
        triplet: bool = True,
    ) -> dict[str, Tensor]:
        """ITM with hard negatives (eq. 19) and, when ``triplet`` (stage 2), the fusion triplet
        (eq. 20), in one fusion pass."""
        batch = image_tokens.shape[0]
        negative_image, image_valid = sample_hard_negatives(logits_t2i, ids, ids)  # per text
        negative_text, text_valid = sample_hard_negatives(logits_i2t, ids, ids)  # per image
        logits = self.itm_logits(
            torch.cat([text_hidden, text_hidden, text_hidden[negative_text]]),
            torch.cat([text_mask, text_mask, text_mask[negative_text]]),
            torch.cat([image_tokens, image_tokens[negative_image], image_tokens]),
        )
        targets = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
        keep = torch.cat([torch.ones(batch, dtype=torch.bool, device=logits.device), image_valid, text_valid])
        losses: dict[str, Tensor] = {}
        if self.loss_weights["itm"]:
            losses["itm"] = self.loss_weights["itm"] * F.cross_entropy(logits[keep].float(), targets[keep])
        if triplet and self.loss_weights["triplet"]:
            match = logits.float().softmax(dim=1)[:, 1]  # s^f, the ITM positive score
            positive, with_negative_image, with_negative_text = match[:batch], match[batch : 2 * batch], match[2 * batch :]
            losses["triplet"] = self.loss_weights["triplet"] * (
                triplet_ranking_loss(positive, with_negative_text, self.triplet_margin, text_valid)  # s(I, T-)
                + triplet_ranking_loss(positive, with_negative_image, self.triplet_margin, image_valid)  # s(I-, T)
            )
        return losses

    # ------------------------------------------------------------------ 4. image-phrase stream
    def phrase_attention(
        self,
        phrase_ids: Tensor,
        phrase_mask: Tensor,
        mpm_labels: Tensor,
        image_tokens: Tensor,
        need_backward: bool,
    ) -> dict[str, Tensor]:
        """One fusion pass of (masked phrase, image) pairs; MPM logits and BidirAtt inputs.

        Returns ``mpm_logits`` ``[M, V]`` at the masked positions (``mpm_targets`` ``[M]``,
        ``mpm_rows`` ``[M]`` their pair index), ``forward`` ``a`` and ``backward`` ``b``
        ``[P, N]`` over the image patches (the global token's column dropped). ``b`` is the
        gradient of the prediction score ``p`` (eq. 5: probability of the right word, averaged
        over the masked word's pieces) with respect to the attention probabilities of layer
        ``attention_layer``, kept positive per head and then averaged over heads (eq. 6); the
        graph is retained for the main backward pass and no graph is built for the gradient.
        """
        phrase_hidden = self._text_tokens(phrase_ids, phrase_mask)
        fused, attention = self.fuse(phrase_hidden, phrase_mask, image_tokens, attention_layer=self.attention_layer)
        rows, positions = (mpm_labels != IGNORE_INDEX).nonzero(as_tuple=True)
        targets = mpm_labels[rows, positions]
        logits = self.mlm_head(fused[rows, positions])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax over the vocabulary
        result = {"mpm_logits": logits, "mpm_targets": targets, "mpm_rows": rows}
        result["forward"] = attention[:, :, 0, 1:].mean(dim=1).detach()  # eq. 4, [P, N]
        if need_backward:
            probability = logits.softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)
            pieces = probability.new_zeros(phrase_ids.shape[0]).index_add_(0, rows, torch.ones_like(probability))
            score = torch.zeros_like(pieces).index_add_(0, rows, probability) / pieces.clamp(min=1)  # eq. 5
            if score.requires_grad:
                (gradient,) = torch.autograd.grad(score.sum(), attention, retain_graph=True, allow_unused=True)
            else:
                gradient = None
            if gradient is None:  # no path from the score to this layer
                gradient = torch.zeros_like(attention)
            result["backward"] = gradient[:, :, 0, 1:].clamp(min=0).mean(dim=1)  # eq. 6
        return result

    def local_losses(self, text: Mapping[str, Tensor], image_tokens: Tensor, ids: Tensor) -> dict[str, Tensor]:
        """MPM (eq. 11) and BidirAtt (eqs. 7-10) over every (phrase, its image) pair of the batch.

        Eq. 12 adds ``sum_{p in P(T)} (L_bidiratt(I, p) + L_mpm(I, p))`` to each (image, caption)
        pair's loss: summed over the caption's phrases, then averaged over the batch's captions
        like the global losses, i.e. ``sum over all pairs / captions`` (a caption without a
        usable phrase adds an empty sum). Not the mean over pairs, which would weigh the local
        losses as if every caption had one phrase.
        """
        captions, slots = text["phrase_valid"].nonzero(as_tuple=True)
        losses: dict[str, Tensor] = {}
        if captions.numel() == 0:
            return losses
        num_captions = ids.shape[0]
        want_mpm = self.masked_modeling == "mpm" and self.loss_weights["mpm"] > 0
        want_bidiratt = self.loss_weights["bidiratt"] > 0
        need_backward = want_bidiratt and self.attention_mode != "forward"
        phrase_mask = text["phrase_attention_mask"][captions, slots]
        pair_tokens = image_tokens[captions]
        stream = self.phrase_attention(
            text["phrase_masked_ids"][captions, slots], phrase_mask, text["phrase_mpm_labels"][captions, slots],
            pair_tokens, need_backward,
        )
        if want_mpm:
            losses["mpm"] = self.loss_weights["mpm"] * self.mpm_pair_losses(stream, captions.numel()).sum() / num_captions
        if want_bidiratt:
            similarity, groups = self.phrase_image_similarity(stream, pair_tokens, text, captions, slots, ids)
            # identity_aware_contrastive_loss is the mean over the pairs of each pair's eq. 10
            # (both directions averaged): times the pair count, the sum over pairs.
            pair_mean = identity_aware_contrastive_loss(similarity, groups, groups, temperature=self.temperature)
            losses["bidiratt"] = self.loss_weights["bidiratt"] * pair_mean * captions.numel() / num_captions
        return losses

    @staticmethod
    def mpm_pair_losses(stream: Mapping[str, Tensor], num_pairs: int) -> Tensor:
        """Eq. 11 per image-phrase pair, ``[num_pairs]``: the cross-entropy of the masked word,
        averaged over its word pieces (one word is masked; a word cut into three pieces is one
        prediction, as for the prediction score of eq. 5, not three)."""
        entropy = F.cross_entropy(stream["mpm_logits"], stream["mpm_targets"], reduction="none")
        rows = stream["mpm_rows"]
        pieces = entropy.new_zeros(num_pairs).index_add_(0, rows, torch.ones_like(entropy))
        return entropy.new_zeros(num_pairs).index_add_(0, rows, entropy) / pieces.clamp(min=1)

    def phrase_image_similarity(
        self,
        stream: Mapping[str, Tensor],
        pair_tokens: Tensor,
        text: Mapping[str, Tensor],
        captions: Tensor,
        slots: Tensor,
        ids: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Eq. 9 between every phrase-guided image vector and every phrase of the batch's pairs,
        ``[P, P]``, and each pair's positive group ``[P]`` for eq. 10's targets."""
        weights = combine_attention(stream["forward"], stream.get("backward"), self.attention_mode)  # eq. 7
        guided = torch.einsum("pn,pnc->pc", weights, pair_tokens[:, 1:])  # eq. 8: v_bar
        # The phrase's own vector comes from the unmasked phrase: with its key word masked it
        # would not describe what the image region should match.
        phrase_mask = text["phrase_attention_mask"][captions, slots]
        phrase_tokens = self._text_tokens(text["phrase_input_ids"][captions, slots], phrase_mask)
        phrase_vector = pool_tokens(phrase_tokens, phrase_mask, self.text_pooling)
        image_side = F.normalize(self.image_projection(guided), dim=-1)
        phrase_side = F.normalize(self.text_projection(phrase_vector), dim=-1)
        # Positives: the same phrase text of the same person (the pair itself, and repeats of it
        # from other captions of that person); everything else is a negative (eq. 10).
        keys = torch.stack([ids[captions], text["phrase_keys"][captions, slots]], dim=1)
        groups = torch.unique(keys, dim=0, return_inverse=True)[1]
        return image_side @ phrase_side.t(), groups

    def sentence_mlm_loss(self, text: Mapping[str, Tensor], image_tokens: Tensor) -> Tensor:
        """Whole-sentence MLM (Table V ablation): masked caption + its image through the fusion."""
        mask = text["attention_mask"]
        fused, _ = self.fuse(self._text_tokens(text["caption_masked_ids"], mask), mask, image_tokens)
        labels = text["caption_mlm_labels"]
        rows, positions = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
        return F.cross_entropy(self.mlm_head(fused[rows, positions]).float(), labels[rows, positions])

    # ------------------------------------------------------------------ 5. training step (eq. 12)
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        text, ids = batch["text"], batch["labels"]
        epoch = batch.get("epoch")
        stage_two = self.stage_two_active(None if epoch is None else int(epoch))
        image_tokens = self._image_tokens(batch["images"], self.image_backbone, self.image_token_norm)
        text_hidden = self._text_tokens(text["input_ids"], text["attention_mask"])
        image_features = F.normalize(self.image_projection(image_tokens[:, 0]), dim=-1)
        text_features = F.normalize(self.text_projection(pool_tokens(text_hidden, text["attention_mask"], self.text_pooling)), dim=-1)
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)
            self.momentum_update()
            image_momentum, text_momentum = self.momentum_features(batch["images"], text)

        losses: dict[str, Tensor] = {}
        itc, logits_i2t, logits_t2i = self.itc_loss(image_features, text_features, image_momentum, text_momentum, ids)
        if self.loss_weights["itc"]:
            losses["itc"] = self.loss_weights["itc"] * itc
        # Stage 1: ITC + ITM; stage 2 adds the fusion triplet and the local losses (Sec. III-A).
        triplet = stage_two and self.loss_weights["triplet"] > 0
        if self.loss_weights["itm"] or triplet:
            losses.update(self.itm_and_triplet_losses(
                text_hidden, text["attention_mask"], image_tokens, logits_i2t, logits_t2i, ids, triplet=triplet
            ))
        if stage_two and "phrase_valid" in text:
            losses.update(self.local_losses(text, image_tokens, ids))
        if stage_two and self.masked_modeling == "mlm" and self.loss_weights["mpm"] and "caption_mlm_labels" in text:
            losses["mlm"] = self.loss_weights["mpm"] * self.sentence_mlm_loss(text, image_tokens)

        # Every process's momentum features enter the queue (ALBEF's concat_all_gather).
        self.enqueue(self.gather(image_momentum), self.gather(text_momentum), self.gather(ids))
        return losses

    # ------------------------------------------------------------------ 6. inference (App. D)
    @torch.no_grad()
    def score_candidates(
        self, text_features: Mapping[str, Tensor], image_features: Mapping[str, Tensor], candidates: Tensor
    ) -> Tensor:
        """ITM re-scoring of each text's candidates, ``[texts x k]``: the log-odds
        ``l_match - l_no_match`` of the ITM head (same order as its match probability, without
        its saturation at 1), batched over ``score_batch_pairs`` (text, image) pairs at a time."""
        num_texts, k = candidates.shape
        text_index = torch.arange(num_texts, device=candidates.device).repeat_interleave(k)
        image_index = candidates.reshape(-1)
        image_tokens, text_tokens, text_mask = image_features["tokens"], text_features["tokens"], text_features["mask"]
        scores = []
        for start in range(0, text_index.numel(), self.score_batch_pairs):
            texts = text_index[start : start + self.score_batch_pairs]
            mask = text_mask[texts]
            # Drop padding columns no text of the block uses (exact: padded keys get no weight).
            length = int(mask.bool().any(dim=0).nonzero().max()) + 1 if mask.any() else 1
            logits = self.itm_logits(
                text_tokens[texts, :length], mask[:, :length], image_tokens[image_index[start : start + self.score_batch_pairs]]
            ).float()
            scores.append(logits[:, 1] - logits[:, 0])
        if not scores:
            return torch.zeros((num_texts, k), dtype=torch.float32, device=candidates.device)
        return torch.cat(scores).reshape(num_texts, k)

    # ------------------------------------------------------------------ visualisation (Fig. 7)
    def phrase_attention_maps(self, images: Tensor, phrases: Sequence[str]) -> dict[str, Tensor]:
        """Forward, backward and bidirectional weights of each (image, phrase) over the patch
        grid, ``[B, h, w]`` each (Fig. 7). The phrase is masked as in training (one word)."""
        processor = LaipTextProcessor(self.text_backbone.model_path, self.max_text_length, self.max_phrase_length, max_phrases=0)
        device = images.device
        # The backward attention is a gradient (eq. 6): it needs autograd even when the caller
        # runs under no_grad or inference_mode (an explain or a benchmark script), where it would
        # otherwise be all zero and the maps would silently fall back to the forward attention.
        # Every input is made here, outside inference mode (the images cloned), so autograd can
        # record it.
        with torch.inference_mode(False), torch.enable_grad():
            encoded = processor.phrases(list(phrases))
            masked, labels, _ = processor._mask_words(list(phrases), encoded, whole_sentence=False)
            images = images.clone()
            output = self.image_backbone(images)
            grid = output.feature_maps[-1].shape[-2:]
            tokens = self._tokens_from_output(output, self.image_token_norm)
            stream = self.phrase_attention(
                masked.to(device), encoded["attention_mask"].to(device), labels.to(device), tokens, need_backward=True
            )
        maps = {mode: combine_attention(stream["forward"], stream["backward"], mode).detach() for mode in ATTENTION_MODES}
        return {mode: weights.reshape(-1, *grid) for mode, weights in maps.items()}

    def phrase_maps(self, image: Tensor, text: str) -> tuple[list[str], dict[str, Tensor]]:
        """The noun phrases of ``text`` and their :meth:`phrase_attention_maps` over one image
        ``[3, H, W]`` (all three modes from one masked pass), in eval mode."""
        phrases = self.build_text_processor().extractor.extract(text, max_phrases=self.max_phrases) or [text.strip()]
        was_training = self.training
        self.eval()
        try:
            images = image.unsqueeze(0).expand(len(phrases), *image.shape).to(next(self.parameters()).device)
            maps = self.phrase_attention_maps(images, phrases)
        finally:
            self.train(was_training)
        return list(phrases), {mode: weights.float().cpu() for mode, weights in maps.items()}

    def explain(self, image: Tensor, text: str) -> tuple[list[str], Tensor] | None:
        """Bidirectional attention (forward x backward) of each noun phrase of ``text`` over the
        patch grid, as in the paper's Fig. 7."""
        phrases, maps = self.phrase_maps(image, text)
        return phrases, maps["bidirectional"]

    def visualize(self, image: Tensor, text: str) -> dict[str, tuple[list[str], Tensor]] | None:
        """Fig. 7: each noun phrase's forward attention (eq. 4) next to its bidirectional
        attention (eq. 7, forward x backward) over the image patches."""
        phrases, maps = self.phrase_maps(image, text)
        return {"forward attention": (phrases, maps["forward"]), "bidirectional attention": (phrases, maps["bidirectional"])}


__all__ = [
    "ALBEF_MEAN",
    "ALBEF_STD",
    "LAIP",
    "albef_key",
    "LaipTextProcessor",
    "MaskedLanguageModelHead",
    "choose_mask_word",
    "combine_attention",
    "extended_attention_mask",
    "phrase_key",
    "sample_hard_negatives",
    "word_spans",
]
