"""CLIP fine-tuned with SDM: the CLIP-era global baseline (IRRA, Jiang & Ye, CVPR 2023, ``methods.md`` §8).

The recipe the field reports as its baseline since 2023: IRRA without its implicit relation
reasoning (the cross-modal MLM), i.e. IRRA's ``loss_names: sdm+id``. Reads like IRRA's Sec. 3:

1. **Encoders** (Sec. 3.1): CLIP's image and text towers from local weights
   (:mod:`tbps.models.backbones.clip`). Image: 384x128 input, the position grid resampled from
   14x14 to 24x8, ``ln_post`` and the projection on every token; the projected class token is
   the global image vector ``f_v``. Text: 77 tokens, the projected end-of-text token is the
   global text vector ``f_t``. Both live in CLIP's joint space (512-d for ViT-B/16); nothing is
   added on top, so the pretrained zero-shot alignment is where fine-tuning starts.
2. **SDM** (Sec. 3.3, eqs. 2-4): ``p_ij = softmax_j(cos(f_v_i, f_t_j) / tau)``, ``q_ij`` the
   identity-match distribution of the batch, ``KL(p || q)`` both directions
   (:func:`tbps.losses.sdm_loss`). ``tau = 0.02`` fixed as in IRRA (``temperature``); with
   ``learnable_temperature: true`` it is learnt in log space as CLIP's own logit scale, capped at
   ``1/tau = 100`` as CLIP caps it. Under DDP the loss sees every process's pairs.
3. **ID loss** (IRRA's ``compute_id``, after Zheng et al. 2020): one linear classifier over the
   person ids, shared by both modalities, on ``f_v`` and ``f_t``: ``(CE(W f_v) + CE(W f_t)) / 2``
   times ``losses.id``; IRRA initialises ``W`` with std 0.001 and a zero bias.
4. **Test** (Sec. 3.5): the cosine of the global vectors (the base class's ``similarity``).
5. **Zero-shot** (no paper section; CLIP, Radford et al. 2021, Sec. 3.1.4's prompts):
   :func:`zero_shot_config` describes CLIP weights used as they are, with no training, which
   is how ``tbps.engine.checkpoint.load_model_source`` lets a CLIP folder or file stand wherever
   a checkpoint stands (``zero_shot: true`` in the config, no ID classifier, SDM unused). The
   image and text vectors are then CLIP's own embeddings: the projected class token is
   ``ln_post(x_cls) @ proj`` and the EOS token ``ln_final(x_eos) @ text_projection``, exactly
   OpenAI's ``encode_image`` / ``encode_text``.

Ablation switches, all under ``model``:

* ``losses.sdm`` / ``losses.id``: the loss weights (IRRA: 1 and 1; ``id: 0`` is SDM alone);
* ``losses.sdm_same_identity_weight``: ``null`` (IRRA's default: every same-id pair is a full
  positive) or a weight, IRRA's optional soft label (same image 1, other same-id pairs 0.3);
* ``temperature`` (0.02) and ``learnable_temperature`` (false, IRRA);
* ``image_backbone.position_interpolation``: ``bilinear`` (IRRA) or ``bicubic``; the backbones'
  ``freeze_stages`` / ``freeze_layers`` as everywhere;
* ``prompt``: ``null`` (IRRA: captions as they are) or a template with ``{}`` exactly once, e.g.
  ``"a photo of {}"``: every caption (training, evaluation and search queries alike) is put into
  it before tokenising (CLIP's prompt engineering; ``tbps ... --prompt``);
* ``max_text_length``: 77 (CLIP's context) or ``null``, the text model's own context length.

Optimisation (IRRA's Sec. 4.2, in the configs): Adam, lr 1e-5 for CLIP and x5 for the new layers
(here ``optim.lr`` 5e-5 with ``backbone_lr_mult`` 0.2), 5 warm-up epochs then cosine, 60 epochs,
batch 64. IRRA's bias-specific lr (x2) and weight decay (0) have no counterpart in tbps's two
optimiser groups.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from tbps.losses import IdentityLoss, sdm_loss
from tbps.models.backbones import create_image_backbone, create_text_backbone
from tbps.models.backbones.common import option
from tbps.models.base import Features, PersonSearchMethod, TextProcessor
from tbps.models.registry import register_method

# CLIP caps its learnt logit scale at 100 (temperature 0.01).
MAX_LOGIT_SCALE = 100.0
# Zero-shot input size: the person-crop shape every CLIP-era TBPS method feeds CLIP (IRRA's
# 384x128; 24x8 patches for ViT-B/16, the 14x14 position grid resampled), so a zero-shot index
# costs what a fine-tuned one does and person crops keep their aspect ratio.
ZERO_SHOT_IMAGE_SIZE = (384, 128)
PROMPT_SLOT = "{}"


def check_prompt(template: Any) -> str | None:
    """``None`` or a template holding ``{}`` exactly once (where the caption goes)."""
    if template is None:
        return None
    if not isinstance(template, str) or template.count(PROMPT_SLOT) != 1:
        raise ValueError(
            f"the prompt template (--prompt / model.prompt) must contain {PROMPT_SLOT} exactly once, where the "
            f"query text goes (e.g. \"a photo of {PROMPT_SLOT}\"), got {template!r}"
        )
    return template


class PromptedTextProcessor:
    """A text processor that puts every caption into a prompt template before tokenising.

    Picklable (it runs in data-loader workers); the wrapped processor's attributes (``decode``,
    ``pad_id``, ...) are reachable through it.
    """

    def __init__(self, processor: Any, template: str) -> None:
        self.processor = processor
        self.template = check_prompt(template)
        self._before, self._after = self.template.split(PROMPT_SLOT)

    def apply(self, caption: str) -> str:
        # Plain concatenation, not str.format: a caption holding braces stays as it is.
        return f"{self._before}{caption}{self._after}"

    def __call__(self, captions: Sequence[str] | str) -> dict[str, Tensor]:
        batch = [captions] if isinstance(captions, str) else list(captions)
        return self.processor([self.apply(caption) for caption in batch])

    def __getattr__(self, name: str) -> Any:
        if name == "processor":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.processor, name)


def zero_shot_config(
    weights: str | Path, *, prompt: str | None = None, image_size: Sequence[int] | None = None
) -> dict[str, Any]:
    """The config of CLIP weights used with no training (section 5 of the module docstring).

    ``weights``: a Hugging Face CLIP folder or OpenAI's CLIP file (with OpenAI's BPE file beside
    it); both towers load from it. ``image_size``: the input (default :data:`ZERO_SHOT_IMAGE_SIZE`).
    ``max_text_length`` is ``null`` (the text model's context), filled in once the model is built.
    """
    size = [int(v) for v in (image_size if image_size is not None else ZERO_SHOT_IMAGE_SIZE)]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}")
    path = str(Path(weights).expanduser().resolve())
    return {
        "method": "clip",
        "zero_shot": True,
        "seed": 0,
        "data": {"image_size": size},
        "model": {
            "image_backbone": {"name": "clip", "pretrained": True, "weights": path},
            "text_backbone": {"name": "clip", "pretrained": True, "weights": path},
            "max_text_length": None,
            "prompt": check_prompt(prompt),
            # Nothing is trained: no ID classifier is built; SDM is the loss fine-tuning would start with.
            "losses": {"sdm": 1.0, "id": 0.0, "sdm_same_identity_weight": None},
        },
        "eval": {"rerank": "none"},
    }


@register_method("clip")
class ClipSDM(PersonSearchMethod):
    description = "CLIP image/text encoders fine-tuned with SDM (+ ID loss): IRRA's CLIP global baseline"
    # Reads model.prompt: tbps.engine.checkpoint passes a --prompt to methods that say they take one.
    accepts_prompt = True

    def __init__(self, config: Any, num_classes: int, image_size: tuple[int, int] | None = None) -> None:
        super().__init__(config, num_classes, image_size)
        max_text_length = option(config, "max_text_length", 77)
        self.prompt = check_prompt(option(config, "prompt", None))
        loss_weights = option(config, "losses", {}) or {}
        self.sdm_weight = float(option(loss_weights, "sdm", 1.0))
        self.id_weight = float(option(loss_weights, "id", 1.0))
        same = option(loss_weights, "sdm_same_identity_weight", None)
        self.sdm_same_identity_weight = None if same is None else float(same)
        if self.sdm_same_identity_weight is not None and not 0.0 <= self.sdm_same_identity_weight <= 1.0:
            raise ValueError(f"model.losses.sdm_same_identity_weight must be in [0, 1] or null, got {same!r}")
        temperature = float(option(config, "temperature", 0.02))
        if not 1.0 / MAX_LOGIT_SCALE <= temperature:
            raise ValueError(f"model.temperature must be at least {1 / MAX_LOGIT_SCALE} (CLIP's cap), got {temperature}")
        self.learnable_temperature = bool(option(config, "learnable_temperature", False))
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if self.learnable_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

        # ---- 1. encoders
        self.image_backbone = create_image_backbone(option(config, "image_backbone") or {"name": "clip"}, image_size=image_size)
        self.text_backbone = create_text_backbone(option(config, "text_backbone") or {"name": "clip"})
        if not self.image_backbone.has_cls_token:
            raise ValueError(
                f"method clip takes the projected class token as the image vector; image backbone "
                f"{self.image_backbone.name!r} has none (use model.image_backbone.name=clip)"
            )
        image_dim, text_dim = self.image_backbone.out_channels, self.text_backbone.hidden_size
        if image_dim != text_dim:
            raise ValueError(
                f"method clip compares image and text vectors directly: the image backbone gives {image_dim}-d, "
                f"the text backbone {text_dim}-d (use the same CLIP model for both)"
            )
        self.embed_dim = text_dim
        # null: the text model's whole context (77 for every OpenAI CLIP).
        self.max_text_length = int(max_text_length) if max_text_length is not None else self.text_backbone.max_positions

        # ---- 3. ID loss: one classifier shared by both modalities (IRRA's init)
        self.identity = IdentityLoss(self.embed_dim, max(self.num_classes, 1), bias=True) if self.id_weight else None
        if self.identity is not None:
            nn.init.normal_(self.identity.classifier.weight, std=0.001)
            nn.init.zeros_(self.identity.classifier.bias)

    @property
    def logit_scale(self) -> Tensor:
        """``1 / tau`` of eq. 2 (CLIP's cap applies to a learnt one)."""
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    # ------------------------------------------------------------------ features
    def fit_text(self, captions: Sequence[str]) -> None:
        self.text_backbone.fit(captions)

    def build_text_processor(self) -> TextProcessor:
        # Only the EOS vector is kept, so a batch is padded to its longest caption.
        processor = self.text_backbone.build_processor(self.max_text_length, pad_to_longest=True)
        return PromptedTextProcessor(processor, self.prompt) if self.prompt is not None else processor

    def encode_image(self, images: Tensor) -> Features:
        """``global`` [B, D]: the projected class token."""
        return {"global": self.image_backbone(images).cls_token}

    def encode_text(self, text: Mapping[str, Tensor]) -> Features:
        """``global`` [B, D]: the projected end-of-text token."""
        return {"global": self.text_backbone(text).sentence}

    # ------------------------------------------------------------------ losses
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        image = self.encode_image(batch["images"])["global"]
        text = self.encode_text(batch["text"])["global"]
        labels = batch["labels"]
        losses: dict[str, Tensor] = {}
        if self.sdm_weight:
            soft_labels: dict[str, Any] = {}
            if self.sdm_same_identity_weight is not None:
                if "image_ids" not in batch:
                    raise KeyError("model.losses.sdm_same_identity_weight needs the batch's image_ids")
                soft_labels = {"image_ids": self.gather(batch["image_ids"]), "same_identity_weight": self.sdm_same_identity_weight}
            # SDM is batch-level: under DDP it sees every process's pairs.
            losses["sdm"] = self.sdm_weight * sdm_loss(
                self.gather(image), self.gather(text), self.gather(labels), self.logit_scale, **soft_labels
            )
        if self.identity is not None:
            losses["id"] = self.id_weight * 0.5 * (self.identity(image.float(), labels) + self.identity(text.float(), labels))
        return losses
