"""Helpers behind the search fixtures in conftest.py: a tiny trained checkpoint, a sidecar of
camera / time metadata for the synthetic gallery, and checkpoints that must be refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

# A small Bi-LSTM text encoder and a mostly frozen image backbone keep training to seconds on a
# CPU while the model still learns the synthetic captions well enough to find their people.
SEARCH_TRAIN_OVERRIDES = (
    "trainer.max_epochs=4",
    "optim.lr=3e-3",
    "model.image_backbone.freeze_stages=4",
    "model.text_backbone.name=bilstm",
    "model.text_backbone.min_count=1",
    "model.text_backbone.embedding_dim=64",
    "model.text_backbone.hidden_size=128",
    "trainer.run_name=search",
)
CAMERAS = ("c1", "c2", "c3")


def train_search_checkpoint(data_root: Path, out_dir: Path, make_config: Any) -> Path:
    from tbps.engine.train import train

    return train(make_config(data_root, out_dir, *SEARCH_TRAIN_OVERRIDES)).last_checkpoint


def synthetic_records(data_root: Path) -> list[dict[str, Any]]:
    """The synthetic benchmark's annotation rows (file_path, id, captions, split, attributes)."""
    return json.loads((data_root / "reid_raw.json").read_text())


def camera_of(person_id: int) -> str:
    return CAMERAS[person_id % len(CAMERAS)]


def timestamp_of(row_number: int) -> str:
    """One image a minute from 2024-05-01 08:00, in annotation order."""
    return f"2024-05-01T{8 + row_number // 60:02d}:{row_number % 60:02d}:00"


def write_sidecar(data_root: Path, out_csv: Path) -> Path:
    """camera = c1..c3 by person id, timestamp = annotation order; paths relative to imgs/."""
    with out_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "camera", "timestamp"])
        for n, row in enumerate(synthetic_records(data_root)):
            writer.writerow([row["file_path"], camera_of(row["id"]), timestamp_of(n)])
    return out_csv


def checkpoint_with_embed_dim(source: Path, target: Path, embed_dim: int) -> Path:
    """A valid checkpoint of the same method with another feature size (fresh weights)."""
    from tbps.engine.checkpoint import load_method, read_checkpoint
    from tbps.models.registry import create_method

    original, config = load_method(source)
    checkpoint = read_checkpoint(source)
    config = json.loads(json.dumps(config))
    config["model"]["embed_dim"] = embed_dim
    model_config = {**config["model"], "image_backbone": {**config["model"]["image_backbone"], "pretrained": False}}
    method = create_method(config["method"], model_config, checkpoint["tbps"]["num_classes"], image_size=tuple(config["data"]["image_size"]))
    method.text_backbone.set_extra_state(original.text_backbone.get_extra_state())
    torch.save(
        {"tbps": {**checkpoint["tbps"], "config": config}, "state_dict": {f"method.{k}": v for k, v in method.state_dict().items()}},
        target,
    )
    return target


def checkpoint_with_other_weights(source: Path, target: Path) -> Path:
    """The same method and size, slightly different weights (e.g. another training run)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    key = next(k for k, v in checkpoint["state_dict"].items() if k.startswith("method.image_projection") and v.is_floating_point())
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 0.01
    torch.save(checkpoint, target)
    return target
