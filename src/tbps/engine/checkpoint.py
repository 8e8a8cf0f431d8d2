"""Checkpoint I/O: atomic writes, safe reads, and loading a method back from a checkpoint with clear errors.

Every checkpoint read goes through ``torch.load(weights_only=True)``: a checkpoint is a pickle,
and a full unpickler runs whatever code the file names (an index someone sends you names the
checkpoint that ``tbps search`` / ``tbps serve`` then load). tbps therefore only stores plain
data in its checkpoints (tensors, dicts, lists, tuples, strings, numbers, booleans, None), which
:class:`AtomicCheckpointIO` checks before writing, and refuses any file that needs more. That
includes ``tbps train --resume``: Lightning reads the checkpoint through this plugin's
:meth:`AtomicCheckpointIO.load_checkpoint`, which forces ``weights_only=True`` whatever Lightning,
torch's default or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` would pick.
"""

from __future__ import annotations

import pickle
import re
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tbps.models.base import PersonSearchMethod
from tbps.models.registry import create_method
from tbps.utils import atomic_write


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
    for section in ("image_backbone", "text_backbone"):
        if isinstance(model_config.get(section), dict):
            model_config[section] = {**model_config[section], "pretrained": False}
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

