"""CLIP image and text backbones from local weights, never downloaded (issue 16, ``methods.md`` §8).

Two sources, named by ``model.image_backbone.weights`` / ``model.text_backbone.weights``:

* a **Hugging Face CLIP folder** (``config.json`` with ``model_type: clip`` and
  ``model.safetensors`` / ``pytorch_model.bin``, sharded or not): any model ``transformers`` loads
  as ``CLIPModel`` (OpenAI's ViT-B/32, B/16, L/14, the LAION ViT models, ...). Its tokenizer
  files are the text backbone's tokenizer.
* **OpenAI's original checkpoint file** (``ViT-B-16.pt``, the file IRRA and RDE load): a
  TorchScript archive, or a plain state dict with OpenAI's names (``torch.save(state_dict)``,
  open_clip's ``.bin`` / ``.safetensors``). Its tensors are mapped key by key onto the Hugging
  Face modules (:func:`openai_to_hf_state_dict`; the fused attention ``in_proj`` splits into
  q, k, v; ``proj`` / ``text_projection`` are transposed into linear layers) and the architecture is
  read off the tensor shapes as OpenAI's ``build_model`` does (heads = width / 64, true for every
  OpenAI ViT). The activation cannot be read off a state dict: OpenAI's models use QuickGELU (the
  default here), open_clip's LAION files without ``-quickgelu`` in their name use GELU
  (``hidden_act: gelu``). An OpenAI file carries no tokenizer: the text backbone reads one from
  ``model.text_backbone.tokenizer`` (a Hugging Face CLIP folder, or OpenAI's
  ``bpe_simple_vocab_16e6.txt.gz``), or from a ``bpe_simple_vocab_16e6.txt.gz`` next to the
  weights file.

**Reading a TorchScript archive without running it.** ``torch.load(weights_only=True)`` refuses
TorchScript archives, and ``torch.jit.load`` compiles and runs the archive's code and unpickles
its objects: an untrusted file could do anything. tbps does neither. :func:`read_torchscript_tensors`
opens the zip, unpickles ``data.pkl`` with an unpickler that knows exactly four kinds of globals:
TorchScript classes (``__torch__.*``, replaced by an inert record of their attributes), the tensor
rebuild function (replaced by one of ours that views the raw bytes of ``data/<key>``), the storage
dtype markers and ``collections.OrderedDict``. Any other global (``os.system``, ``builtins.eval``,
...) is refused before anything is called. The archive's ``code/`` is never read. There is no
opt-in for ``torch.jit.load``: the tensors are all tbps needs, and a flag that makes a weights
file executable is one a user would pass without knowing it.

Image (:class:`ClipImageBackbone`, ``name: clip``): any input size (384x128 by default). The
position embeddings are resampled once, when the backbone is built, from the pretrained square
grid (14x14 for ViT-B/16 at 224) to the input's patch grid (24x8 at 384x128, stride = patch 16),
``position_interpolation: bilinear`` as IRRA's ``resize_pos_embed`` (``bicubic`` as Hugging Face's
and timm's); an input of another size than the configured one is resampled on the fly from the
stored grid. As IRRA (``model/clip_model.py``, ``VisionTransformer.forward``), ``ln_post`` and the
projection are applied to every token: the projected class token is the global vector
(``cls_token``) and the projected patch tokens form the single ``[B, D, H, W]`` feature map, so
both live in CLIP's joint embedding space (D = 512 for ViT-B/16). CLIP's normalisation statistics.

Text (:class:`ClipText`, ``name: clip``): CLIP's byte-level BPE tokenizer from the same folder, at
most 77 tokens (the position table's length) with truncation that keeps the end-of-text token;
``final_layer_norm`` and the projection on every token (IRRA), the EOS token as the sentence
vector, the token features for local methods.

``pretrained: false`` builds the architecture of ``weights`` (read from its config or its tensor
shapes) randomly initialised; a tbps checkpoint is restored that way. With no ``weights`` at all,
the image backbone is a random CLIP ViT-B/16 (what a config's feature-map check and the speed
benchmark need); the text backbone then needs ``tokenizer``.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import pickle
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.models.backbones.common import BackboneWeightsError, hugging_face_model_type, load_state_dict_file
from tbps.models.backbones.image import ImageBackbone, ImageBackboneOutput, StageInfo
from tbps.models.backbones.text import TextBackbone, TextBackboneOutput, TextProcessor
from tbps.text.tokenizers import encode_captions

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
POSITION_INTERPOLATIONS = ("bilinear", "bicubic")
HIDDEN_ACTIVATIONS = ("quick_gelu", "gelu")
START_OF_TEXT, END_OF_TEXT = "<|startoftext|>", "<|endoftext|>"


class NotClipModelError(ValueError):
    """A weights path exists but does not hold a CLIP model tbps can load."""


# =============================================================================================
# Where the weights are
# =============================================================================================


@dataclass(frozen=True)
class ClipSource:
    kind: str  # "huggingface" (a folder) or "openai" (one checkpoint file)
    path: Path


def resolve_clip_source(weights: str | Path | None, section: str) -> ClipSource:
    """Classify ``model.<section>.weights``; clear errors name the option to set."""
    option = f"model.{section}.weights"
    if not weights:
        raise BackboneWeightsError(
            f"the clip backbone needs local CLIP weights and tbps never downloads them: set {option}=/path/to/"
            f"clip-vit-base-patch16 (a Hugging Face CLIP folder) or {option}=/path/to/ViT-B-16.pt (OpenAI's "
            f"checkpoint), or model.{section}.pretrained=false for a randomly initialised model"
        )
    path = Path(weights).expanduser()
    if not path.exists():
        raise BackboneWeightsError(
            f"{option}={str(path)!r} does not exist; point it to a Hugging Face CLIP folder "
            f"(e.g. clip-vit-base-patch16) or OpenAI's checkpoint file (e.g. ViT-B-16.pt)"
        )
    if path.is_dir():
        try:
            model_type = hugging_face_model_type(path)
        except FileNotFoundError:
            raise NotClipModelError(
                f"{option}={str(path)!r} is a folder without config.json, not a Hugging Face CLIP model folder"
            ) from None
        except ValueError as error:
            raise NotClipModelError(f"{option}={str(path)!r}: config.json is not a model config ({error})") from None
        if model_type != "clip":
            raise NotClipModelError(
                f"{option}={str(path)!r} holds a {model_type!r} model, not CLIP (its config.json must say "
                f"model_type: clip); point {option} to a CLIP folder or OpenAI's ViT-B-16.pt"
            )
        return ClipSource("huggingface", path)
    return ClipSource("openai", path)


# =============================================================================================
# OpenAI's TorchScript archive, read without executing it
# =============================================================================================

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# TorchScript's typed-container helpers; each returns its first argument (the list or value).
_TORCHSCRIPT_IDENTITY_HELPERS = frozenset(
    {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag"}
)


class _ScriptObject:
    """Inert stand-in for a TorchScript class instance: it only keeps its attribute dict."""

    def __init__(self, *_: Any) -> None:
        self.attributes: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.attributes = dict(state) if isinstance(state, dict) else {}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _first_argument(value: Any, *_: Any) -> Any:
    return value


def _rebuild_tensor(storage: Any, offset: int, size: Sequence[int], stride: Sequence[int], *_: Any) -> Tensor:
    if not isinstance(storage, Tensor):
        raise pickle.UnpicklingError("a tensor in the archive does not point to a storage")
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset)).clone()


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl`` into :class:`_ScriptObject` trees of tensors, calling
    nothing but :func:`_rebuild_tensor`, ``OrderedDict`` and :func:`_first_argument`."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.storages: dict[str, Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch.jit._pickle" and name in _TORCHSCRIPT_IDENTITY_HELPERS:
            return _first_argument
        raise pickle.UnpicklingError(f"refused global {module}.{name}: a CLIP weights archive holds only tensors")

    def persistent_load(self, pid: Any) -> Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        dtype, key = pid[1].dtype, str(pid[2])
        if key not in self.storages:
            try:
                data = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"the archive lacks the storage data/{key}") from None
            # bytearray: a writable buffer, so the tensor owns its memory (frombuffer shares it).
            self.storages[key] = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return self.storages[key]


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip holding TorchScript code (``torch.jit.save``), not a ``torch.save`` checkpoint."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def read_torchscript_tensors(path: str | Path) -> dict[str, Tensor]:
    """The module tensors of a TorchScript archive as a flat ``{dotted.name: tensor}`` dict (the
    names ``torch.jit.load(path).state_dict()`` would give, plus tensor attributes such as
    OpenAI's ``input_resolution``), without compiling or running anything (module docstring)."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        roots = [name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
        if not roots:
            raise NotClipModelError(f"{str(path)!r} is a zip file but not a TorchScript archive (no data.pkl)")
        prefix = roots[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").decode().strip() != sys.byteorder:
            raise NotClipModelError(f"{str(path)!r} was written on a machine of another byte order")
        with archive.open(roots[0]) as handle:
            try:
                root = _TensorOnlyUnpickler(handle, archive, prefix).load()
            except pickle.UnpicklingError as error:
                raise NotClipModelError(f"{str(path)!r} was refused: {error}") from None
    tensors: dict[str, Tensor] = {}
    stack: list[tuple[str, Any]] = [("", root)]
    seen: set[int] = set()
    while stack:
        name, value = stack.pop()
        if isinstance(value, Tensor):
            tensors[name] = value
        elif isinstance(value, _ScriptObject) and id(value) not in seen:
            seen.add(id(value))
            stack.extend((f"{name}.{key}" if name else str(key), item) for key, item in value.attributes.items())
    return tensors


def read_openai_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """OpenAI-named CLIP tensors from a TorchScript archive, a ``torch.save`` state dict (read with
    ``weights_only=True``) or a ``.safetensors`` file; a DDP ``module.`` prefix is dropped."""
    path = Path(path)
    state = read_torchscript_tensors(path) if is_torchscript_archive(path) else load_state_dict_file(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise NotClipModelError(f"{str(path)!r} does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


# =============================================================================================
# OpenAI names -> Hugging Face CLIPModel names, and the architecture read off the shapes
# =============================================================================================

# Per-block renames (OpenAI ResidualAttentionBlock -> HF CLIPEncoderLayer); in_proj is split below.
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _count_blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.attn\.in_proj_weight$")
    indices = {int(match.group(1)) for key in state if (match := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise NotClipModelError(f"OpenAI CLIP checkpoint: transformer blocks {sorted(indices)} are not numbered 0..n-1")
    return len(indices)


def _map_blocks(state: Mapping[str, Tensor], source: str, target: str, count: int, out: dict[str, Tensor]) -> None:
    for index in range(count):
        src, dst = f"{source}{index}.", f"{target}{index}."
        # nn.MultiheadAttention stacks the q, k and v projections, in that order, in in_proj.
        for kind in ("weight", "bias"):
            query, key, value = state[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"] = query
            out[f"{dst}self_attn.k_proj.{kind}"] = key
            out[f"{dst}self_attn.v_proj.{kind}"] = value
        for old, new in _BLOCK_RENAMES.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]


def _require(state: Mapping[str, Tensor], keys: Sequence[str], tower: str) -> None:
    missing = [key for key in keys if key not in state]
    if not missing:
        return
    if any(key.startswith(("vision_model.", "text_model.")) for key in state):
        raise NotClipModelError(
            "this file holds Hugging Face CLIP tensors without their config: point the weights option to the "
            "folder that holds it and its config.json"
        )
    if any(key.startswith("visual.layer1.") for key in state):
        raise NotClipModelError(
            "this is a ResNet CLIP checkpoint (RN50, RN101, ...): tbps's clip backbone is the ViT (ViT-B/32, B/16, L/14)"
        )
    raise NotClipModelError(
        f"not an OpenAI CLIP checkpoint with a {tower} tower: it lacks {missing[:3]} "
        f"(has e.g. {sorted(state)[:3]}); use OpenAI's ViT-*.pt or a Hugging Face CLIP folder"
    )


def openai_vision_config(state: Mapping[str, Tensor], hidden_act: str = "quick_gelu") -> Any:
    """``CLIPVisionConfig`` of an OpenAI ViT checkpoint, read off its shapes (OpenAI's build_model)."""
    from transformers import CLIPVisionConfig

    _require(state, ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "visual.class_embedding"), "vision")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = _count_blocks(state, "visual.transformer.resblocks.")
    return CLIPVisionConfig(
        hidden_size=int(width),
        intermediate_size=int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=max(1, int(width) // 64),
        image_size=int(patch) * grid,
        patch_size=int(patch),
        projection_dim=int(state["visual.proj"].shape[1]),
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
    )


def openai_text_config(state: Mapping[str, Tensor], hidden_act: str = "quick_gelu") -> Any:
    """``CLIPTextConfig`` of an OpenAI checkpoint's text tower, read off its shapes."""
    from transformers import CLIPTextConfig

    _require(state, ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"), "text")
    width = int(state["ln_final.weight"].shape[0])
    return CLIPTextConfig(
        vocab_size=int(state["token_embedding.weight"].shape[0]),
        hidden_size=width,
        intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=_count_blocks(state, "transformer.resblocks."),
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=int(state["positional_embedding"].shape[0]),
        projection_dim=int(state["text_projection"].shape[1]),
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
    )


def openai_to_hf_state_dict(state: Mapping[str, Tensor], towers: Sequence[str] = ("vision", "text")) -> dict[str, Tensor]:
    """Map OpenAI CLIP names onto Hugging Face ``CLIPModel`` names, key by key."""
    out: dict[str, Tensor] = {}
    if "vision" in towers:
        _require(state, ("visual.conv1.weight", "visual.proj"), "vision")
        out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
        out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
        out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
        for old, new in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
            for kind in ("weight", "bias"):
                out[f"vision_model.{new}.{kind}"] = state[f"visual.{old}.{kind}"]
        _map_blocks(state, "visual.transformer.resblocks.", "vision_model.encoder.layers.",
                    _count_blocks(state, "visual.transformer.resblocks."), out)
        out["visual_projection.weight"] = state["visual.proj"].t()  # x @ proj == Linear(weight = proj^T)
    if "text" in towers:
        _require(state, ("token_embedding.weight", "text_projection"), "text")
        out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
        out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
        for kind in ("weight", "bias"):
            out[f"text_model.final_layer_norm.{kind}"] = state[f"ln_final.{kind}"]
        _map_blocks(state, "transformer.resblocks.", "text_model.encoder.layers.",
                    _count_blocks(state, "transformer.resblocks."), out)
        out["text_projection.weight"] = state["text_projection"].t()
    if "logit_scale" in state and towers == ("vision", "text"):
        out["logit_scale"] = state["logit_scale"]
    return out


# =============================================================================================
# One tower (vision or text) from a source: its config and, when pretrained, its tensors
# =============================================================================================

_TOWER_PREFIXES = {"vision": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}


def _hf_weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise BackboneWeightsError(
        f"Hugging Face CLIP folder {str(folder)!r} has no weights (model.safetensors or pytorch_model.bin)"
    )


def _read_hf_tensors(folder: Path, prefixes: Sequence[str]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for file in _hf_weight_files(folder):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:  # reads only the tower asked for
                for key in handle.keys():
                    if key.startswith(tuple(prefixes)):
                        tensors[key] = handle.get_tensor(key)
        else:
            tensors.update({k: v for k, v in load_state_dict_file(file).items() if k.startswith(tuple(prefixes))})
    return tensors


def load_clip_tower(
    tower: str, weights: str | Path | None, pretrained: bool, hidden_act: str | None, section: str
) -> tuple[Any, dict[str, Tensor] | None, ClipSource | None]:
    """``(config, tensors or None, source)`` of CLIP's ``vision`` or ``text`` tower.

    The config's ``projection_dim`` is the model's (``transformers`` does not copy the top-level
    value into the sub-configs). ``weights=None`` with ``pretrained=False`` gives ViT-B/16's
    shapes; ``hidden_act`` must agree with a Hugging Face folder's config.
    """
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    if hidden_act is not None and hidden_act not in HIDDEN_ACTIVATIONS:
        raise ValueError(f"model.{section}.hidden_act must be one of {HIDDEN_ACTIVATIONS}, got {hidden_act!r}")
    if not weights and not pretrained:
        if tower == "vision":  # CLIP ViT-B/16 (OpenAI): 12 x 768, patch 16 at 224, 512-d projection
            config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                      image_size=224, patch_size=16, projection_dim=512,
                                      hidden_act=hidden_act or "quick_gelu", layer_norm_eps=1e-5)
        else:  # its text tower: 12 x 512, 8 heads, 77 positions, 49,408 BPE tokens
            config = CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                    num_attention_heads=8, max_position_embeddings=77, projection_dim=512,
                                    hidden_act=hidden_act or "quick_gelu", layer_norm_eps=1e-5)
        return config, None, None
    source = resolve_clip_source(weights, section)
    if source.kind == "huggingface":
        full = CLIPConfig.from_pretrained(str(source.path), local_files_only=True)
        config = full.vision_config if tower == "vision" else full.text_config
        config.projection_dim = int(full.projection_dim)
        if hidden_act is not None and hidden_act != config.hidden_act:
            raise ValueError(
                f"model.{section}.hidden_act={hidden_act!r} contradicts {str(source.path)!r}, whose config says "
                f"{config.hidden_act!r}; remove the option (it is only for OpenAI-format files)"
            )
        tensors = _read_hf_tensors(source.path, _TOWER_PREFIXES[tower]) if pretrained else None
        return config, tensors, source
    state = read_openai_checkpoint(source.path)
    act = hidden_act or "quick_gelu"
    config = openai_vision_config(state, act) if tower == "vision" else openai_text_config(state, act)
    # The other tower's tensors and OpenAI's non-weight attributes (input_resolution, ...) are left out.
    tensors = openai_to_hf_state_dict(state, (tower,)) if pretrained else None
    return config, tensors, source


def _load_tower_tensors(model: nn.Module, tensors: Mapping[str, Tensor], source: ClipSource, section: str) -> None:
    """Copy ``tensors`` into ``model`` (HF names); every parameter must be filled, shapes must agree."""
    own = model.state_dict()
    missing = [key for key in own if key not in tensors and not key.endswith("position_ids")]
    if missing:
        raise NotClipModelError(
            f"model.{section}.weights={str(source.path)!r} does not fill the CLIP {section.split('_')[0]} tower: "
            f"{len(missing)} missing tensors, e.g. {missing[:3]}"
        )
    for key, target in own.items():
        if key in tensors and tensors[key].shape != target.shape:
            raise NotClipModelError(
                f"model.{section}.weights={str(source.path)!r}: {key} has shape {tuple(tensors[key].shape)}, "
                f"the architecture read from the same source {tuple(target.shape)}"
            )
    model.load_state_dict({key: tensors[key].to(own[key].dtype) for key in own if key in tensors}, strict=False)


# =============================================================================================
# Image backbone
# =============================================================================================


def resize_position_embedding(
    weight: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str = "bilinear"
) -> Tensor:
    """Position embeddings ``[1 + h0*w0, C]`` resampled to ``[1 + h*w, C]`` (row-major grids).

    The class token's position is kept; the grid is interpolated with ``align_corners=False``
    (IRRA's ``resize_pos_embed`` uses bilinear). Equal grids return the input unchanged.
    """
    if mode not in POSITION_INTERPOLATIONS:
        raise ValueError(f"position_interpolation must be one of {POSITION_INTERPOLATIONS}, got {mode!r}")
    old_grid, new_grid = tuple(int(v) for v in old_grid), tuple(int(v) for v in new_grid)
    if weight.shape[0] != 1 + old_grid[0] * old_grid[1]:
        raise ValueError(f"{weight.shape[0]} position embeddings do not make a class token plus a {old_grid} grid")
    if old_grid == new_grid:
        return weight
    channels = weight.shape[1]
    grid = weight[1:].reshape(1, *old_grid, channels).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], channels).to(weight.dtype)
    return torch.cat([weight[:1], grid])


class ClipImageBackbone(ImageBackbone):
    """CLIP's ViT image tower (module docstring): one stage, stride = patch size, a class token."""

    name = "clip"
    mean = CLIP_MEAN
    std = CLIP_STD
    has_cls_token = True
    extra_options = ("position_interpolation", "hidden_act")

    def __init__(
        self,
        pretrained: bool = True,
        weights: str | None = None,
        image_size: tuple[int, int] = (384, 128),
        last_stride: int | None = None,
        position_interpolation: str = "bilinear",
        hidden_act: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        if last_stride is not None:
            raise ValueError(
                "image backbone 'clip' has no last_stride option (its map is the patch grid); remove model.image_backbone.last_stride"
            )
        if position_interpolation not in POSITION_INTERPOLATIONS:
            raise ValueError(
                f"model.image_backbone.position_interpolation must be one of {POSITION_INTERPOLATIONS}, got {position_interpolation!r}"
            )
        config, tensors, source = load_clip_tower("vision", weights, pretrained, hidden_act, "image_backbone")
        self.model = CLIPVisionModelWithProjection(config)
        if tensors is not None and source is not None:
            _load_tower_tensors(self.model, tensors, source, "image_backbone")
        self.position_interpolation = position_interpolation
        self.patch_size = int(config.patch_size)
        side = int(config.image_size) // self.patch_size
        self.pretrained_grid = (side, side)
        self.grid = tuple(int(v) // self.patch_size for v in image_size)
        if min(self.grid) < 1:
            raise ValueError(f"image size {tuple(image_size)} is smaller than one {self.patch_size}-pixel patch")
        self._resize_positions(self.grid)
        self.channels = [int(config.projection_dim)]
        self.width = int(config.hidden_size)

    def _resize_positions(self, grid: tuple[int, int]) -> None:
        """Replace the pretrained position table by one for ``grid`` (IRRA resizes it once, at load)."""
        embeddings = self.model.vision_model.embeddings
        old = embeddings.position_embedding.weight.data
        new = resize_position_embedding(old, self.pretrained_grid, grid, self.position_interpolation)
        table = nn.Embedding(new.shape[0], new.shape[1])
        table.weight.data.copy_(new)
        embeddings.position_embedding = table
        embeddings.num_patches, embeddings.num_positions = grid[0] * grid[1], new.shape[0]
        embeddings.register_buffer("position_ids", torch.arange(new.shape[0]).expand((1, -1)), persistent=False)

    @property
    def stages(self) -> list[StageInfo]:
        return [StageInfo(channels=self.channels[0], reduction=self.patch_size)]

    def stage_modules(self) -> list[nn.Module]:
        # Each transformer block is a unit of freeze_stages; the embeddings go with the first,
        # ln_post and the projection with the last.
        vision = self.model.vision_model
        layers = list(vision.encoder.layers)
        first = [vision.embeddings, vision.pre_layrnorm, layers[0]]
        last = [vision.post_layernorm, self.model.visual_projection]
        if len(layers) == 1:
            return [nn.ModuleList(first + last)]
        return [nn.ModuleList(first), *layers[1:-1], nn.ModuleList([layers[-1], *last])]

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """``[1 + h*w, C]`` for a patch grid: the stored table, resampled when the input size differs."""
        weight = self.model.vision_model.embeddings.position_embedding.weight
        return resize_position_embedding(weight, self.grid, grid, self.position_interpolation)

    def forward(self, images: Tensor) -> ImageBackboneOutput:
        vision = self.model.vision_model
        embeddings = vision.embeddings
        patches = embeddings.patch_embedding(images.to(embeddings.patch_embedding.weight.dtype))  # [B, C, h, w]
        batch, _, height, width = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        cls = embeddings.class_embedding.to(tokens.dtype).expand(batch, 1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.position_embedding((height, width)).to(tokens.dtype)
        tokens = vision.encoder(inputs_embeds=vision.pre_layrnorm(tokens))[0]
        # IRRA: ln_post and the projection on every token (OpenAI's CLIP applies them to the class token only).
        tokens = self.model.visual_projection(vision.post_layernorm(tokens))
        feature_map = tokens[:, 1:].transpose(1, 2).reshape(batch, -1, height, width)
        return ImageBackboneOutput([feature_map], cls_token=tokens[:, 0])


# =============================================================================================
# Tokenizer and text backbone
# =============================================================================================


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map of the 256 byte values onto printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def openai_bpe_vocabulary(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` as OpenAI's
    ``SimpleTokenizer`` builds them: 256 byte symbols, the same with ``</w>``, one token per merge
    (the first 49,152 - 256 - 2 merges), then ``<|startoftext|>`` and ``<|endoftext|>``."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1] if line.strip()]
    if any(len(merge) != 2 for merge in merges):
        raise NotClipModelError(f"{str(path)!r} is not OpenAI's BPE merges file (lines must hold two symbols)")
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    return {token: index for index, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def load_clip_tokenizer(source: str | Path) -> Any:
    """A fast CLIP tokenizer from a Hugging Face folder or OpenAI's BPE ``.txt.gz``, offline."""
    from transformers import AutoTokenizer, CLIPTokenizerFast

    path = Path(source).expanduser()
    if not path.exists():
        raise BackboneWeightsError(f"CLIP tokenizer {str(path)!r} does not exist (model.text_backbone.tokenizer)")
    if path.is_file():
        if not path.name.endswith(".txt.gz"):
            raise NotClipModelError(
                f"CLIP tokenizer {str(path)!r}: give a Hugging Face CLIP folder or OpenAI's {OPENAI_BPE_FILE}"
            )
        vocabulary, merges = openai_bpe_vocabulary(path)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "vocab.json").write_text(json.dumps(vocabulary))
            (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
            tokenizer = CLIPTokenizerFast.from_pretrained(folder, local_files_only=True)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise NotClipModelError(f"no CLIP tokenizer in {str(path)!r} ({error})") from error
    if tokenizer.convert_tokens_to_ids(END_OF_TEXT) in (None, tokenizer.unk_token_id) and tokenizer.unk_token != END_OF_TEXT:
        raise NotClipModelError(f"the tokenizer in {str(path)!r} is not CLIP's (it has no {END_OF_TEXT} token)")
    if not getattr(tokenizer, "is_fast", False):
        raise NotClipModelError(f"the tokenizer in {str(path)!r} is not a fast tokenizer (tokenizer.json)")
    tokenizer.padding_side = "right"  # the EOS position is read off the attention mask
    return tokenizer


class ClipTokenizer:
    """Picklable caption processor for :class:`ClipText`: ``input_ids``, ``attention_mask`` and
    character ``offsets`` [B x L]; ``<|startoftext|> ... <|endoftext|>``, truncated to
    ``max_length`` tokens with the end-of-text token kept (OpenAI's ``tokenize(truncate=True)``)."""

    def __init__(self, source: str | Path, max_length: int = 77, pad_to_longest: bool = False) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        self.source = str(source)
        self.max_length = int(max_length)
        self.pad_to_longest = pad_to_longest
        self._tokenizer = load_clip_tokenizer(source)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def pad_id(self) -> int:
        return int(self._tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int:
        return int(self._tokenizer.convert_tokens_to_ids(END_OF_TEXT))

    def __call__(self, captions: Sequence[str] | str) -> dict[str, Tensor]:
        return encode_captions(self._tokenizer, captions, self.max_length, self.pad_to_longest)

    def decode(self, input_ids: Sequence[int] | Tensor) -> str:
        ids = input_ids.tolist() if isinstance(input_ids, Tensor) else list(input_ids)
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def resolve_clip_tokenizer(weights: str | None, tokenizer: str | None) -> Path:
    """Where the text backbone's tokenizer is: ``tokenizer``, else the weights folder, else OpenAI's
    BPE file next to an OpenAI checkpoint."""
    if tokenizer:
        return Path(tokenizer).expanduser()
    if weights:
        path = Path(weights).expanduser()
        if path.is_dir():
            return path
        beside = path.parent / OPENAI_BPE_FILE
        if beside.is_file():
            return beside
    raise BackboneWeightsError(
        "the clip text backbone needs CLIP's tokenizer: set model.text_backbone.tokenizer=/path/to/a Hugging Face CLIP "
        f"folder or /path/to/{OPENAI_BPE_FILE} (an OpenAI checkpoint file carries none"
        + (f"; none beside {str(weights)!r})" if weights else ")")
    )


class ClipText(TextBackbone):
    """CLIP's text tower (module docstring): EOS token as the sentence vector, projected tokens."""

    options = ("name", "pretrained", "weights", "tokenizer", "hidden_act", "freeze_layers")

    def __init__(
        self, pretrained: bool = True, weights: str | None = None, tokenizer: str | None = None, hidden_act: str | None = None
    ) -> None:
        super().__init__()
        from transformers import CLIPTextModelWithProjection

        self.name = "clip"
        config, tensors, source = load_clip_tower("text", weights, pretrained, hidden_act, "text_backbone")
        self.model = CLIPTextModelWithProjection(config)
        if tensors is not None and source is not None:
            _load_tower_tensors(self.model, tensors, source, "text_backbone")
        self.tokenizer_path = resolve_clip_tokenizer(weights, tokenizer)
        vocabulary = len(load_clip_tokenizer(self.tokenizer_path))  # fails now, not in a data-loader worker
        if vocabulary > int(config.vocab_size):
            raise NotClipModelError(
                f"the CLIP tokenizer {str(self.tokenizer_path)!r} has {vocabulary} tokens, the text model's embedding "
                f"table {config.vocab_size}: they are not from the same CLIP (model.text_backbone.tokenizer)"
            )
        self.max_positions = int(config.max_position_embeddings)
        self.hidden_size = int(config.projection_dim)
        self.width = int(config.hidden_size)
        self.frozen_layers = 0

    def freeze_layers(self, count: int) -> None:
        """Keep the embeddings and the first ``count`` transformer layers fixed (0 = train all)."""
        layers = self.model.text_model.encoder.layers
        if not 0 <= count <= len(layers):
            raise ValueError(f"freeze_layers must be in 0..{len(layers)} for clip, got {count}")
        self.frozen_layers = count
        if count:
            self.model.text_model.embeddings.requires_grad_(False)
            for layer in layers[:count]:
                layer.requires_grad_(False)

    def build_processor(self, max_length: int, pad_to_longest: bool = False) -> TextProcessor:
        if max_length > self.max_positions:
            raise ValueError(
                f"max_text_length {max_length} exceeds the CLIP text model's {self.max_positions} positions; "
                f"set model.max_text_length to at most {self.max_positions}"
            )
        return ClipTokenizer(self.tokenizer_path, max_length=max_length, pad_to_longest=pad_to_longest)

    def forward(self, text: Mapping[str, Tensor]) -> TextBackboneOutput:
        mask = text["attention_mask"]
        hidden = self.model.text_model(input_ids=text["input_ids"], attention_mask=mask)[0]  # after final_layer_norm
        tokens = self.model.text_projection(hidden)  # IRRA: every token projected
        # The tokenizer pads on the right and always ends a caption with <|endoftext|>.
        eos = (mask.sum(dim=1) - 1).clamp(min=0)
        sentence = tokens[torch.arange(tokens.shape[0], device=tokens.device), eos]
        return TextBackboneOutput(tokens=tokens, mask=mask, sentence=sentence)


def create_clip_text_backbone(config: Any) -> ClipText:
    """``model.text_backbone`` with ``name: clip``; options it does not know are refused."""
    from tbps.models.backbones.common import option

    keys = set(config.keys()) if isinstance(config, Mapping) or hasattr(config, "keys") else set()
    unknown = sorted(keys - set(ClipText.options))
    if unknown:
        raise ValueError(f"text backbone 'clip' has no option(s) {unknown}; it takes {', '.join(ClipText.options[1:])}")
    backbone = ClipText(
        pretrained=bool(option(config, "pretrained", True)),
        weights=option(config, "weights"),
        tokenizer=option(config, "tokenizer"),
        hidden_act=option(config, "hidden_act"),
    )
    backbone.freeze_layers(int(option(config, "freeze_layers", 0)))
    return backbone
