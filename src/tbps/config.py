"""YAML configs: one per method and dataset, overridable from the command line.

``load_config("baseline/synthetic", ["optim.lr=3e-4"])`` merges, in order: the built-in
defaults below, the YAML file (a path, or ``<method>/<dataset>`` under ``tbps/configs``), and
``key=value`` overrides (OmegaConf dot-list syntax). The resolved config is saved beside every
run and inside every checkpoint, so a checkpoint rebuilds its model without the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from tbps.utils import atomic_write

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEFAULTS: dict[str, Any] = {
    "method": "baseline",
    "seed": 0,
    "data": {
        "dataset": "cuhk-pedes",
        "root": "data/CUHK-PEDES",
        "image_size": [384, 128],  # height, width
        "batch_size": 64,
        "eval_batch_size": 128,
        "num_workers": 2,
        "sampler": "random",  # random | identity (P identities x K images)
        "num_instances": 4,
        "val_identity_fraction": 0.1,  # only for datasets without a val split (ICFG-PEDES); 0 = train on all of train
        "val_split_seed": 0,  # the val carve-out's own seed, independent of the training seed
        "check_images": "exists",  # before training: exists (fast) | decode (every image fully decoded)
        "augment": {"flip_prob": 0.5, "padding": 10, "random_crop": True, "random_erasing": 0.0},
    },
    "model": {},
    "optim": {
        "optimizer": "adamw",  # adam | adamw
        "lr": 1e-3,
        "backbone_lr_mult": 0.1,
        "weight_decay": 1e-4,
        "betas": [0.9, 0.999],
        "scheduler": "cosine",  # cosine | multistep | constant
        "warmup_epochs": 1,
        "milestones": [20, 30],
        "gamma": 0.1,
        "min_lr_ratio": 0.01,
        "restart_epochs": [],  # epochs where warm-up and decay start again (LAIP's stage 2, App. E2)
    },
    "trainer": {
        "max_epochs": 30,
        "accelerator": "auto",
        "devices": "auto",
        "num_nodes": 1,
        "strategy": "auto",
        "precision": "32-true",  # bf16-mixed / 16-mixed on GPU
        "accumulate_grad_batches": 1,
        "gradient_clip_val": None,
        "limit_train_batches": None,
        "log_every_n_steps": 10,
        "output_dir": "runs",
        "run_name": None,
        "progress_bar": True,
    },
    "eval": {
        "split": "test",
        "rerank": "none",  # none | two-stage | rvn | two-stage+rvn
        "top_k": 128,  # candidates kept for two-stage scoring
        "rvn_neighbours": 10,
    },
}


def config_path(name_or_path: str | Path) -> Path:
    """Resolve a YAML path, or a ``method/dataset`` name under the bundled configs."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.glob("*/*.yaml"))
    raise FileNotFoundError(f"config {str(name_or_path)!r} not found; give a YAML path or one of: {', '.join(known)}")


def load_config(name_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    config = OmegaConf.create(DEFAULTS)
    if name_or_path is not None:
        config = OmegaConf.merge(config, OmegaConf.load(config_path(name_or_path)))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    if overrides:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    return config


def to_container(config: Any) -> dict[str, Any]:
    """A plain, resolved dict (what goes into checkpoints and JSON reports)."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)


def save_config(config: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(OmegaConf.to_yaml(OmegaConf.create(to_container(config))))
    return path
