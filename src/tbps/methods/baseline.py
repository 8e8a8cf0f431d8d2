"""Global-embedding baseline: the model all four papers compare against.

Features: one global vector per image (pooled last feature map -> linear) and per caption
(pooled token features -> linear), in a shared embedding space.
Alignment: none beyond the shared space; similarity is the cosine of the global vectors.
Losses: CMPM + CMPC (Zhang & Lu, ECCV 2018), as in the papers' baselines.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from tbps.losses import CMPCLoss, cmpm_loss
from tbps.models.backbones import create_image_backbone, create_text_backbone
from tbps.models.backbones.common import option
from tbps.models.base import Features, PersonSearchMethod, TextProcessor, pool_tokens
from tbps.models.registry import register_method


@register_method("baseline")
class GlobalBaseline(PersonSearchMethod):
    description = "Global image/text embeddings trained with CMPM + CMPC (the papers' common baseline)"

    def __init__(self, config: Any, num_classes: int, image_size: tuple[int, int] | None = None) -> None:
        super().__init__(config, num_classes, image_size)
        embed_dim = int(option(config, "embed_dim", 512))
        self.max_text_length = int(option(config, "max_text_length", 64))
        self.text_pooling = str(option(config, "text_pooling", "mean"))
        self.image_pooling = str(option(config, "image_pooling", "avg+max"))
        loss_weights = option(config, "losses", {}) or {}
        self.cmpm_weight = float(option(loss_weights, "cmpm", 1.0))
        self.cmpc_weight = float(option(loss_weights, "cmpc", 1.0))

        self.image_backbone = create_image_backbone(option(config, "image_backbone"), image_size=image_size)
        self.text_backbone = create_text_backbone(option(config, "text_backbone"))
        self.image_projection = nn.Sequential(
            nn.BatchNorm1d(self.image_backbone.out_channels), nn.Linear(self.image_backbone.out_channels, embed_dim)
        )
        self.text_projection = nn.Sequential(
            nn.LayerNorm(self.text_backbone.hidden_size), nn.Linear(self.text_backbone.hidden_size, embed_dim)
        )
        self.cmpc = CMPCLoss(embed_dim, max(self.num_classes, 1))

    # ------------------------------------------------------------------ features
    def fit_text(self, captions) -> None:
        self.text_backbone.fit(captions)

    def build_text_processor(self) -> TextProcessor:
        # Only a pooled sentence vector is kept, so batches are padded to their longest caption.
        return self.text_backbone.build_processor(self.max_text_length, pad_to_longest=True)

    def encode_image(self, images: Tensor) -> Features:
        feature_map = self.image_backbone(images).feature_maps[-1]
        pooled = feature_map.mean(dim=(2, 3))
        if self.image_pooling == "avg+max":
            # Max pooling keeps small, distinctive parts (a bag, shoes) that averaging dilutes.
            pooled = pooled + feature_map.amax(dim=(2, 3))
        return {"global": self.image_projection(pooled)}

    def encode_text(self, text: Mapping[str, Tensor]) -> Features:
        output = self.text_backbone(text)
        return {"global": self.text_projection(pool_tokens(output.tokens, output.mask, self.text_pooling))}

    # ------------------------------------------------------------------ losses
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        image_embeddings = self.encode_image(batch["images"])["global"]
        text_embeddings = self.encode_text(batch["text"])["global"]
        labels = batch["labels"]
        losses: dict[str, Tensor] = {}
        if self.cmpm_weight:
            # CMPM is batch-level: under DDP it sees every process's pairs.
            losses["cmpm"] = self.cmpm_weight * cmpm_loss(
                self.gather(image_embeddings), self.gather(text_embeddings), self.gather(labels)
            )
        if self.cmpc_weight:
            losses["cmpc"] = self.cmpc_weight * self.cmpc(image_embeddings, text_embeddings, labels)
        return losses
