"""Backbone factories: image encoders return stage feature maps, text encoders token features."""

from tbps.models.backbones.common import BackboneWeightsError
from tbps.models.backbones.image import (
    IMAGE_BACKBONES,
    ImageBackbone,
    ImageBackboneOutput,
    StageInfo,
    create_image_backbone,
)
from tbps.models.backbones.text import TEXT_BACKBONES, TextBackbone, TextBackboneOutput, create_text_backbone

__all__ = [
    "BackboneWeightsError",
    "IMAGE_BACKBONES",
    "ImageBackbone",
    "ImageBackboneOutput",
    "StageInfo",
    "TEXT_BACKBONES",
    "TextBackbone",
    "TextBackboneOutput",
    "create_image_backbone",
    "create_text_backbone",
]
