"""Helpers behind the search fixtures in conftest.py: a tiny trained checkpoint, a sidecar of
camera / time metadata for the synthetic gallery, checkpoints that must be refused, and hostile
files (a pickle that runs code, a decompression bomb)."""

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
    "model.text_backbone.name=bilstm", "model.text_backbone.pretrained=null", "model.text_backbone.freeze_layers=null",
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
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    key = next(k for k, v in checkpoint["state_dict"].items() if k.startswith("method.image_projection") and v.is_floating_point())
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 0.01
    torch.save(checkpoint, target)
    return target


class _CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: the marker file proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return builtins.open, (self.marker, "w")


def write_code_running_checkpoint(target: Path, marker: Path, *, like: dict[str, Any] | None = None) -> Path:
    """A file that looks like a tbps checkpoint (``like``'s entries, or minimal ones) but whose
    pickle creates ``marker`` when loaded with a full unpickler (``weights_only=False``)."""
    checkpoint = dict(like) if like is not None else {"tbps": {"method": "baseline"}, "state_dict": {}}
    checkpoint["payload"] = _CreatesFileWhenUnpickled(marker)
    torch.save(checkpoint, target)
    return target


def write_png_bomb(target: Path, width: int, height: int) -> Path:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels, written row by row
    through zlib so that neither the test nor the file uses much memory (13,000 x 13,000 is
    about 21 KB on disk; decoded as RGB it would take 507 MB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    with target.open("wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)))
        handle.write(chunk(b"IDAT", b"".join(parts)))
        handle.write(chunk(b"IEND", b""))
    return target
