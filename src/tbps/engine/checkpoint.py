"""Checkpoint I/O: atomic writes, safe reads, and loading a method back from a checkpoint with clear errors.

Every checkpoint read goes through ``torch.load(weights_only=True)``: a checkpoint is a pickle,
and a full unpickler runs whatever code the file names (an index someone sends you names the
checkpoint that ``tbps search`` / ``tbps serve`` then load). tbps therefore only stores plain
data in its checkpoints (tensors, dicts, lists, tuples, strings, numbers, booleans, None), which
:class:`AtomicCheckpointIO` checks before writing, and refuses any file that needs more. That
includes ``tbps train --resume``: Lightning reads the checkpoint through this plugin's
:meth:`AtomicCheckpointIO.load_checkpoint`, which forces ``weights_only=True`` whatever Lightning,
torch's default or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` would pick.

**Model sources** (:func:`load_model_source`): wherever tbps takes a checkpoint (``tbps index
build|add|verify``, ``tbps search``, ``tbps serve``, ``tbps eval``, ``tbps explain``,
``Searcher.open``), CLIP weights may stand instead: a Hugging Face CLIP folder or OpenAI's CLIP
file (``ViT-B-16.pt``, with OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` beside it). They give
method ``clip`` in CLIP's own embedding space with no training (zero-shot,
:func:`tbps.methods.clip_sdm.zero_shot_config`), optionally with a prompt template for the text.
:class:`ModelSource` names the files whose bytes define the model; an index records their
hashes, so it is never searched with other weights than it was built with.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tbps.models.backbones.common import hugging_face_model_type
from tbps.models.backbones.text import accepted_text_options, text_backbone_options
from tbps.models.base import PersonSearchMethod
from tbps.models.registry import create_method, get_method_class
from tbps.utils import atomic_write, sha256_file


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or not what the caller expects."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names Python objects beyond tensors and plain data."""


# Leaf types a checkpoint may hold; all of them load under torch.load(weights_only=True).
_PLAIN_LEAVES = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def check_plain_data(value: Any, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming the first entry of ``value`` that is not plain data.

    Containers must be exactly dict / OrderedDict / Counter (a MultiStepLR's milestones) / list /
    tuple, which torch's weights-only unpickler rebuilds; a subclass such as Lightning's
    AttributeDict would be pickled by class name and refused when read back. Classes registered
    with ``torch.serialization.add_safe_globals`` count as plain too, since they load.
    """
    registered = tuple(g for g in torch.serialization.get_safe_globals() if isinstance(g, type))
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        kind = type(item)
        if kind in (dict, OrderedDict, Counter):
            for key, entry in item.items():
                if type(key) not in (str, int, float, bool, type(None), tuple):
                    raise CheckpointError(f"{path} has a key of type {kind.__name__}.{type(key).__qualname__}; checkpoints hold plain data only")
                stack.append((entry, f"{path}[{key!r}]"))
        elif kind in (list, tuple):
            stack.extend((entry, f"{path}[{i}]") for i, entry in enumerate(item))
        elif kind in _PLAIN_LEAVES or kind is torch.nn.Parameter or kind in registered:
            continue
        else:
            raise CheckpointError(
                f"{path} is a {kind.__module__}.{kind.__qualname__}: tbps checkpoints hold only tensors and plain "
                "data (dict, list, tuple, str, int, float, bool, None), so that they load with weights_only=True"
            )


def safe_torch_load(source: Any, name: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with a clear :class:`CheckpointError` for unsafe or damaged files."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        if "global" not in detail.lower():
            # Not a refused class or function but bytes that are no pickle a checkpoint makes.
            raise CheckpointError(f"{name} cannot be read: it is not a checkpoint torch can load ({detail})") from None
        named = re.search(r"GLOBAL (\S+)", detail)
        raise UnsafeCheckpointError(
            f"{name} was refused: its pickle needs Python objects other than tensors and plain data "
            f"({'it names ' + named.group(1) if named else detail}). "
            "tbps loads checkpoints with weights_only=True because unpickling such objects can run arbitrary "
            "code; do not load this file unless you know exactly where it comes from"
        ) from None
    except Exception as error:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{name} cannot be read: {error}") from error


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written file (temp file + rename),
    writes only plain data, and reads with ``weights_only=True`` (``--resume`` included)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        check_plain_data(checkpoint)  # fail now, not when the checkpoint is read back
        with atomic_write(path, "wb") as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {str(path)!r} with weights_only=False: tbps checkpoints are plain data"
            )
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        with path.open("rb") as handle:
            return safe_torch_load(handle, f"checkpoint {str(path)!r}", map_location=map_location)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    checkpoint = safe_torch_load(path, f"checkpoint {str(path)!r}")
    if not isinstance(checkpoint, dict) or "tbps" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} is not a tbps checkpoint (no 'tbps' metadata)")
    return checkpoint


def load_method(
    path: str | Path, expected_method: str | None = None, map_location: str = "cpu", *, checkpoint: dict[str, Any] | None = None
) -> tuple[PersonSearchMethod, dict[str, Any]]:
    """Rebuild the method stored in a checkpoint; returns (method in eval mode, resolved config).

    ``checkpoint`` is the already-read contents of ``path`` (from :func:`read_checkpoint`), for
    callers that need its other entries too and should not read the file twice.
    """
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path)
    meta = checkpoint["tbps"]
    config = meta["config"]
    if expected_method is not None and meta["method"] != expected_method:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds method {meta['method']!r}, but {expected_method!r} was expected"
        )
    model_config = dict(config["model"])
    # The weights come from the checkpoint: build backbones randomly initialised (a text model
    # still reads its config and tokenizer files from its path) and overwrite them below.
    if isinstance(model_config.get("image_backbone"), dict):
        model_config["image_backbone"] = {**model_config["image_backbone"], "pretrained": False}
    if isinstance(model_config.get("text_backbone"), dict):
        # A run made before text encoders refused options they do not read may carry some
        # (a Bi-LSTM's ``freeze_layers``): they did nothing then, and are dropped. An encoder
        # without pretrained weights (the Bi-LSTM) has no ``pretrained`` to switch off.
        text = accepted_text_options(model_config["text_backbone"])
        if "pretrained" in text_backbone_options(text.get("name", "minilm")):
            text["pretrained"] = False
        model_config["text_backbone"] = text
    # Likewise the weights a method started training from (``model.init_checkpoint``, e.g. LAIP's ALBEF).
    if isinstance(model_config.get("init_checkpoint"), dict):
        model_config["init_checkpoint"] = {**model_config["init_checkpoint"], "path": None}
    method = create_method(meta["method"], model_config, meta["num_classes"], image_size=tuple(config["data"]["image_size"]))
    state = {k.removeprefix("method."): v for k, v in checkpoint["state_dict"].items() if k.startswith("method.")}
    missing, unexpected = method.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match method {meta['method']!r} as configured: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    method.to(map_location).eval()
    return method, config



# =============================================================================================
# Model sources: a tbps checkpoint, or CLIP weights used zero-shot
# =============================================================================================

MODEL_OPTION = "--checkpoint"
MODEL_KINDS = ("checkpoint", "clip")
# What a Hugging Face CLIP folder holds besides its weights that tbps reads: the model config and
# the tokenizer files (a README or another framework's weights change nothing and are not hashed).
HF_CLIP_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)
_SOURCE_HELP = (
    "give a tbps checkpoint (.ckpt), a Hugging Face CLIP folder (e.g. clip-vit-base-patch16) or OpenAI's CLIP "
    "file (e.g. ViT-B-16.pt, with bpe_simple_vocab_16e6.txt.gz beside it)"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` ``checkpoint`` (a tbps checkpoint file) or ``clip``
    (CLIP weights, ``format`` ``huggingface`` for a folder or ``openai`` for one file)."""

    kind: str
    path: Path
    format: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model source kind must be one of {MODEL_KINDS}, got {self.kind!r}")

    def files(self) -> dict[str, Path]:
        """The files whose bytes define the model, by name (relative to the CLIP folder, or the
        file name; for OpenAI's file, the BPE file beside it too). Found by name, never loaded."""
        from tbps.models.backbones.clip import OPENAI_BPE_FILE, _hf_weight_files
        from tbps.models.backbones.common import BackboneWeightsError

        if self.kind == "checkpoint":
            return {self.path.name: self.path}
        if self.format == "openai":
            found = {self.path.name: self.path}
            if (self.path.parent / OPENAI_BPE_FILE).is_file():
                found[OPENAI_BPE_FILE] = self.path.parent / OPENAI_BPE_FILE
            return found
        found = {name: self.path / name for name in HF_CLIP_FILES if (self.path / name).is_file()}
        try:
            weights = _hf_weight_files(self.path)
        except (BackboneWeightsError, OSError, ValueError, KeyError):
            weights = []  # reported as a changed model (its weights are gone)
        found.update({file.relative_to(self.path).as_posix(): file for file in weights if file.is_file()})
        return found

    def exists(self) -> bool:
        return self.path.is_dir() if self.format == "huggingface" else self.path.is_file()

    def fingerprint(self) -> tuple[str, dict[str, str]]:
        """``(sha256, {file name: sha256})``. A checkpoint's is its file's sha256; CLIP weights'
        is the sha256 of the ``sha256sum``-style listing (``<hash>  <name>``, one line per file,
        sorted by name) of :meth:`files`, i.e. ``sha256sum NAMES | sha256sum`` in the folder."""
        hashes = {name: sha256_file(path) for name, path in sorted(self.files().items())}
        if self.kind == "checkpoint":
            return hashes[self.path.name], hashes
        listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items()))
        return hashlib.sha256(listing.encode()).hexdigest(), hashes

    def describe(self) -> str:
        return "checkpoint" if self.kind == "checkpoint" else "CLIP weights"


@dataclass
class LoadedModel:
    """A method in eval mode, its resolved config and where it came from."""

    method: PersonSearchMethod
    config: dict[str, Any]
    source: ModelSource

    def manifest_info(self) -> dict[str, Any]:
        """What an index records about the model that made it (``checkpoint_sha256``: the
        fingerprint; ``model_source``: kind, format and the hash of each file)."""
        digest, hashes = self.source.fingerprint()
        return {
            "checkpoint": str(self.source.path),
            "checkpoint_sha256": digest,
            "model_source": {"kind": self.source.kind, "format": self.source.format, "files": hashes},
        }


def _unwrap_state_dict(contents: Any) -> Any:
    for key in ("state_dict", "model", "module"):
        if isinstance(contents, dict) and key in contents and isinstance(contents[key], dict):
            contents = contents[key]
    return contents


def _is_openai_clip_state(contents: Any) -> bool:
    state = _unwrap_state_dict(contents)
    return isinstance(state, dict) and any(
        isinstance(key, str) and key.removeprefix("module.").startswith("visual.") for key in state
    )


def _check_clip_folder(path: Path, option: str) -> None:
    try:
        model_type = hugging_face_model_type(path)
    except FileNotFoundError:
        raise CheckpointError(
            f"{option} {str(path)!r} is a folder but not a Hugging Face CLIP model folder (it has no config.json); {_SOURCE_HELP}"
        ) from None
    except (ValueError, OSError) as error:
        raise CheckpointError(f"{option} {str(path)!r}: config.json is not a model config ({error})") from None
    if model_type != "clip":
        raise CheckpointError(
            f"{option} {str(path)!r} holds a {model_type!r} model, not CLIP (its config.json must say model_type: clip); {_SOURCE_HELP}"
        )


def open_model_source(
    path: str | Path,
    prompt: str | None = None,
    *,
    image_size: Sequence[int] | None = None,
    expected_method: str | None = None,
    map_location: str = "cpu",
    option: str = MODEL_OPTION,
) -> LoadedModel:
    """Load what stands where a checkpoint stands: a tbps checkpoint, or CLIP weights (zero-shot).

    * a **tbps checkpoint** (a file with tbps metadata): as :func:`load_method`;
    * a **Hugging Face CLIP folder**, or **OpenAI's CLIP file** (a TorchScript archive, a state
      dict with ``visual.*`` tensors or a ``.safetensors`` file, with OpenAI's
      ``bpe_simple_vocab_16e6.txt.gz`` beside it): method ``clip`` built from
      :func:`tbps.methods.clip_sdm.zero_shot_config`, both towers from ``path``, in eval mode.

    ``prompt``: a template with ``{}`` exactly once that every text is put into before it is
    tokenised (for CLIP weights, or a checkpoint whose method takes one; others refuse it).
    ``image_size``: the input size; CLIP weights default to 384x128, a checkpoint keeps the size
    it was trained at and refuses another (an index passes the size its gallery was encoded at).
    ``option`` names the setting in error messages (``--checkpoint`` on the command line).
    Every file is read with ``weights_only=True`` or, for a TorchScript archive, without running it.
    """
    from tbps.methods.clip_sdm import check_prompt, zero_shot_config
    from tbps.models.backbones.clip import OPENAI_BPE_FILE, NotClipModelError, is_torchscript_archive
    from tbps.models.backbones.common import BackboneWeightsError

    check_prompt(prompt)
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{option} {str(path)!r} does not exist: {_SOURCE_HELP}")
    path = path.resolve()
    name = f"{option} {str(path)!r}"
    if path.is_dir():
        _check_clip_folder(path, option)
        source = ModelSource("clip", path, "huggingface")
    elif path.suffix == ".safetensors" or is_torchscript_archive(path):
        source = ModelSource("clip", path, "openai")
    else:
        contents = safe_torch_load(path, name)
        if isinstance(contents, dict) and "tbps" in contents and "state_dict" in contents:
            return _open_checkpoint(path, contents, prompt, image_size, expected_method, map_location, option)
        if not _is_openai_clip_state(contents):
            raise CheckpointError(f"{name} is neither a tbps checkpoint (no 'tbps' metadata) nor CLIP weights (no visual.* tensors); {_SOURCE_HELP}")
        source = ModelSource("clip", path, "openai")
        del contents  # the backbones read the file themselves, tower by tower

    if expected_method is not None and expected_method != "clip":
        raise CheckpointError(f"{name} holds CLIP weights (method 'clip'), but {expected_method!r} was expected")
    if source.format == "openai" and not (path.parent / OPENAI_BPE_FILE).is_file():
        raise CheckpointError(
            f"{name} is OpenAI's CLIP file, which carries no tokenizer: put OpenAI's {OPENAI_BPE_FILE} (it comes with "
            "OpenAI's CLIP code) beside it, or use a Hugging Face CLIP folder"
        )
    config = zero_shot_config(path, prompt=prompt, image_size=image_size)
    try:
        method = create_method("clip", config["model"], 0, image_size=tuple(config["data"]["image_size"]))
    except (BackboneWeightsError, NotClipModelError) as error:
        raise CheckpointError(f"{name} holds no CLIP model tbps can load: {error}") from error
    config["model"]["max_text_length"] = method.max_text_length  # what null resolved to
    method.to(map_location).eval()
    return LoadedModel(method, config, source)


def _open_checkpoint(
    path: Path, checkpoint: dict[str, Any], prompt: str | None, image_size: Sequence[int] | None,
    expected_method: str | None, map_location: str, option: str,
) -> LoadedModel:
    meta = checkpoint["tbps"]
    config = meta["config"]
    trained = [int(v) for v in config["data"]["image_size"]]
    if image_size is not None and [int(v) for v in image_size] != trained:
        raise CheckpointError(
            f"{option} {str(path)!r} was trained at {trained[0]}x{trained[1]}, but images of "
            f"{int(image_size[0])}x{int(image_size[1])} were asked for (an index encodes its gallery at one size)"
        )
    if prompt is not None:
        if not getattr(get_method_class(meta["method"]), "accepts_prompt", False):
            raise CheckpointError(
                f"--prompt applies to CLIP models (CLIP weights, or a checkpoint of method 'clip'); {option} "
                f"{str(path)!r} holds method {meta['method']!r}, which takes no prompt template"
            )
        config = {**config, "model": {**config["model"], "prompt": prompt}}
        checkpoint = {**checkpoint, "tbps": {**meta, "config": config}}
    method, config = load_method(path, expected_method, map_location, checkpoint=checkpoint)
    return LoadedModel(method, config, ModelSource("checkpoint", path))


def load_model_source(
    path: str | Path,
    prompt: str | None = None,
    *,
    image_size: Sequence[int] | None = None,
    expected_method: str | None = None,
    map_location: str = "cpu",
    option: str = MODEL_OPTION,
) -> tuple[PersonSearchMethod, dict[str, Any]]:
    """``(method in eval mode, config)`` from a tbps checkpoint or CLIP weights (:func:`open_model_source`)."""
    loaded = open_model_source(path, prompt, image_size=image_size, expected_method=expected_method,
                               map_location=map_location, option=option)
    return loaded.method, loaded.config


def recorded_model_problems(manifest: Mapping[str, Any]) -> list[str]:
    """Whether the model an index names (its manifest's ``checkpoint``) is still the one it was
    built with, by hashing the files :class:`ModelSource` names: never loaded, so a swapped file
    cannot run anything. Empty when it is."""
    record = manifest.get("model_source") or {"kind": "checkpoint"}  # indexes from before CLIP weights
    source = ModelSource(record.get("kind", "checkpoint"), Path(manifest["checkpoint"]), record.get("format"))
    what = source.describe()
    if not source.exists():
        return [f"the index's {what} {str(source.path)!r} is missing: pass --checkpoint to search"]
    digest, hashes = source.fingerprint()
    expected = manifest["checkpoint_sha256"]
    if digest == expected:
        return []
    detail = ""
    recorded = record.get("files") or {}
    if source.kind == "clip" and recorded:
        changed = sorted(name for name in set(hashes) | set(recorded) if hashes.get(name) != recorded.get(name))
        detail = f"; files changed, added or removed: {', '.join(changed)}"
    return [
        f"the index's {what} {str(source.path)!r} has changed since the index was built "
        f"(sha256 {digest[:12]} vs {expected[:12]} in the manifest){detail}"
    ]
