"""Helpers shared by the backbone factories: config access and offline weight resolution."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch


class BackboneWeightsError(FileNotFoundError):
    """Pretrained weights were asked for but are not available offline."""


def option(config: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a dict-like or attribute config (OmegaConf, dict, namespace)."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file holding a state dict (plain, or nested under a usual key)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneWeightsError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # weights_only=True: a weights file is a pickle, and a full unpickler runs the code it names.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL (\S+)", str(error))
        if named is None:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
            raise ValueError(f"weights file {str(path)!r} cannot be read: not a file torch can load ({detail})") from None
        raise ValueError(
            f"weights file {str(path)!r} was refused: its pickle needs Python objects other than tensors and "
            f"plain data (it names {named.group(1)}); tbps reads weights with weights_only=True because "
            "unpickling such objects can run arbitrary code (convert the file to a plain state dict or .safetensors)"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def hugging_face_model_type(folder: Path) -> Any:
    """The ``model_type`` a Hugging Face model folder's ``config.json`` declares (None when absent).

    Raises FileNotFoundError when the folder has no ``config.json``, and ValueError when that file
    is not a JSON object; callers turn both into their own message naming the option to set.
    """
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json")
    config = json.loads(config_file.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"config.json holds a {type(config).__name__}, not an object")
    return config.get("model_type")
