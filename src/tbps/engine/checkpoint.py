"""Checkpoint I/O: atomic writes, and loading a method back from a checkpoint with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tbps.models.base import PersonSearchMethod
from tbps.models.registry import create_method
from tbps.utils import atomic_write


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not what the caller expects."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written file (temp file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        with atomic_write(path, "wb") as handle:
            torch.save(checkpoint, handle)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {error}") from error
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

