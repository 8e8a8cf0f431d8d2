"""Training entry point: build everything from a config, fit with Lightning, report on test.

Model selection uses the val split only (``best.ckpt`` = best val R@1); the final report gives
test metrics for both the best-on-val and the last checkpoint. Without a val split
(``data.val_identity_fraction=0`` on ICFG-PEDES: train on the whole train split) nothing is
selected: ``best.ckpt`` is not written and the last checkpoint is the result.

What a run guarantees, and where:

* **Checks before any training** (:func:`check_run_data`, :func:`check_image_size`): every split
  the run reads exists, train has at least 2 identities and one full batch per epoch, every
  image of train / val / test exists (``data.check_images: exists``, the default, or ``decode``
  to decode each one fully), and one blank ``data.image_size`` image goes through the model.
  Each failure says which setting to change; nothing is written before they pass.
* **Checkpoints** (:class:`EpochCheckpoints`): ``last.ckpt`` is written before every validation
  (so a validation that crashes, or a kill during it, loses no training) and again at every
  epoch end. Lightning resumes a pre-validation checkpoint with the next epoch: the interrupted
  validation is not run again (logged when it happens).
* **History** (:class:`HistoryCSVLogger`): ``logs/metrics.csv`` keeps the rows of earlier runs
  of the same directory on ``--resume`` (Lightning's CSVLogger deletes them), is rewritten
  atomically (never truncated by a kill), and is flushed at every checkpoint, so after a kill it
  holds at least every row up to the checkpoint the run resumes from.
* **Resume** (:func:`resume_config`): ``--resume`` continues the checkpoint's own config; only
  the settings in :data:`RESUME_SETTINGS` may differ, any other difference is refused.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from tbps.config import save_config, to_container
from tbps.data.checks import IMAGE_CHECKS, dataset_stats, require_images
from tbps.data.readers import val_split_seed
from tbps.data.records import PersonSearchDataset
from tbps.data.samplers import IdentityBalancedSampler
from tbps.engine.checkpoint import AtomicCheckpointIO, load_method, read_checkpoint
from tbps.engine.datamodule import PersonSearchDataModule, load_configured_dataset
from tbps.engine.module import PersonSearchModule
from tbps.evaluation.evaluator import evaluate_split, scoring_options
from tbps.utils import atomic_write

log = logging.getLogger(__name__)
METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")

#: Settings ``--resume`` may change, and why each is safe: they change how the run is executed or
#: logged, not the experiment the checkpoint belongs to (``trainer.max_epochs`` excepted, which
#: is the point of extending a run; its effect on the schedule is logged).
RESUME_SETTINGS: dict[str, str] = {
    "trainer.max_epochs": "train longer or stop earlier; the lr schedule is recomputed for the new length from the current step",
    "trainer.progress_bar": "display only",
    "trainer.log_every_n_steps": "how often rows reach logs/metrics.csv",
    "data.num_workers": "loader processes; every sample derives from (seed, epoch, index) whatever the count",
    "data.eval_batch_size": "evaluation batch size; the model evaluates in eval mode, so results do not depend on it (up to float rounding)",
    "data.check_images": "how images are checked before training",
}

#: Values a run's config gets for these keys when it does not set them.
RUN_DEFAULTS: dict[str, Any] = {"data.val_split_seed": 0, "data.check_images": "exists"}


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    report: dict[str, Any] = field(default_factory=dict)
    # Per checkpoint tag: the test evaluation behind the report (metrics, per-query results,
    # ids and the similarity matrix), so callers such as the demo need not evaluate again.
    test_evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def history_csv(self) -> Path:
        return self.run_dir / "logs" / "metrics.csv"


def default_run_dir(config: Any) -> Path:
    """``trainer.output_dir / trainer.run_name``, or, without a run name, a name made of the
    method, the dataset and the time now.

    Under DDP each process calls this for itself, at a different time (Lightning's launcher
    re-runs the script for ranks > 0; torchrun or SLURM start every process), so their
    timestamps differ: only global rank 0 creates the directory, and :class:`SharedRunDir`
    hands every rank rank 0's.
    """
    trainer = config["trainer"]
    name = trainer.get("run_name") or f"{config['method']}-{Path(str(config['data']['dataset'])).name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(trainer["output_dir"]) / name


class SharedRunDir(L.Callback):
    """Every process of a run ends with global rank 0's run directory.

    Rank 0 alone writes into the run directory (``train()`` creates it and writes
    ``config.yaml`` on rank 0 only; Lightning's loggers and checkpoint saving write on rank 0
    only), so the directory the other ranks computed for themselves (another timestamp) is
    never created. Once the processes are connected, ``setup`` broadcasts rank 0's directory;
    ``train()`` returns it on every rank.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run_dir = Path(trainer.strategy.broadcast(str(self.run_dir), src=0))


def resolve_resume(resume: str | Path) -> tuple[Path, Path]:
    """``--resume`` takes a run directory or a checkpoint file; returns (run_dir, checkpoint)."""
    resume = Path(resume)
    checkpoint = resume / "checkpoints" / "last.ckpt" if resume.is_dir() else resume
    if not checkpoint.is_file():
        raise FileNotFoundError(f"nothing to resume: {str(checkpoint)!r} does not exist")
    return checkpoint.parent.parent, checkpoint


def evaluation_device(config: dict[str, Any]) -> str:
    accelerator = str(config["trainer"]["accelerator"])
    return "cuda" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "cpu"


# --------------------------------------------------------------------------- configs


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _with_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    if not overrides:
        return config
    from omegaconf import OmegaConf

    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    merged = OmegaConf.merge(OmegaConf.create(config), OmegaConf.from_dotlist(list(overrides)))
    return to_container(merged)


def prepare_config(config: Any, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A fresh run's config as a plain dict, with :data:`RUN_DEFAULTS` filled in and checked, so
    the config saved beside the run (and in its checkpoints) states every choice it made."""
    config = _with_overrides(copy.deepcopy(to_container(config)), overrides)
    for key, default in RUN_DEFAULTS.items():
        if _get(config, key) is None:
            _set(config, key, default)
    _check_run_options(config)
    return config


def _check_run_options(config: Mapping[str, Any]) -> None:
    mode = _get(config, "data.check_images")
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"data.check_images must be one of {', '.join(IMAGE_CHECKS)}, got {mode!r}")
    seed = _get(config, "data.val_split_seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"data.val_split_seed must be an integer, got {seed!r}")


def resume_config(stored: Mapping[str, Any], requested: Any = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The config a resumed run continues with: the checkpoint's (``stored``), changed only where
    :data:`RESUME_SETTINGS` allows.

    ``requested``: a full config asked for with the resume (e.g. the command line's ``--config``);
    keys it lacks keep the stored value. ``overrides``: ``key=value`` items on top. Any setting that
    then differs from the stored one and is not in :data:`RESUME_SETTINGS` raises ValueError
    naming each difference; the allowed ones are logged.
    """
    stored = copy.deepcopy(dict(stored))
    if _get(stored, "data.val_split_seed") is None:
        # Runs made before data.val_split_seed carved their val split with the training seed.
        _set(stored, "data.val_split_seed", val_split_seed(stored))
        log.info("this run predates data.val_split_seed: its val split stays carved with seed %d (its training seed)",
                 _get(stored, "data.val_split_seed"))
    for key, default in RUN_DEFAULTS.items():
        if _get(stored, key) is None:
            _set(stored, key, default)
    wanted = copy.deepcopy(stored)
    if requested is not None:
        flat_requested = _flatten(to_container(requested))
        for key, value in flat_requested.items():
            _set(wanted, key, value)
    wanted = _with_overrides(wanted, overrides)

    before, after = _flatten(stored), _flatten(wanted)
    changed = sorted(key for key in set(before) | set(after) if before.get(key, "<unset>") != after.get(key, "<unset>"))
    refused = [key for key in changed if key not in RESUME_SETTINGS]
    if refused:
        listed = "; ".join(f"{key}: checkpoint {before.get(key, '<unset>')!r}, requested {after.get(key, '<unset>')!r}" for key in refused)
        raise ValueError(
            f"--resume continues the run its checkpoint belongs to, and {len(refused)} setting(s) differ from it: {listed}. "
            f"A resume may change only {', '.join(RESUME_SETTINGS)}; start a new run to change anything else"
        )
    for key in changed:
        log.info("resume: %s %r -> %r (%s)", key, before.get(key), after.get(key), RESUME_SETTINGS[key])
    _check_run_options(wanted)
    return wanted


# --------------------------------------------------------------------------- data and model checks


def load_run_dataset(config: Mapping[str, Any]) -> PersonSearchDataset:
    """The dataset of a run, with its val split carved (when the dataset has none) by
    ``data.val_split_seed``: the same val identities whatever the training ``seed``."""
    return load_configured_dataset(config["data"], val_split_seed(config))


def run_splits(dataset: PersonSearchDataset) -> tuple[str, ...]:
    """The splits a run reads: train, val when the dataset has one, and test."""
    return tuple(name for name in ("train", "val", "test") if name != "val" or dataset.splits.get("val"))


def check_run_data(config: Mapping[str, Any], dataset: PersonSearchDataset, *, world_size: int = 1) -> None:
    """Refuse, before any training, a dataset the run could not finish with: a missing train or test
    split, fewer than 2 train identities, not one full training batch per epoch. Each error says
    what to change."""
    data = config["data"]
    where = f"{dataset.name} at {data['root']}"
    for name in ("train", "test"):
        if not dataset.splits.get(name):
            available = ", ".join(n for n, records in dataset.splits.items() if records) or "none"
            use = "trains on" if name == "train" else "reports its test metrics on"
            raise ValueError(f"{where} has no {name!r} split (available: {available}); a run {use} it")
    train_records = dataset.splits["train"]
    identities = len({record.person_id for record in train_records})
    if identities < 2:
        raise ValueError(
            f"the train split of {where} has {identities} identity: the losses tell identities apart "
            "(cross-modal matching over the batch, identity classification), which needs at least 2; "
            "add identities to the train split or check data.dataset / data.root"
        )
    captions = sum(len(record.captions) for record in train_records)
    batch_size = int(data["batch_size"])
    if batch_size < 2:
        raise ValueError(f"data.batch_size={batch_size}: the batch-level losses need at least 2 pairs per batch")
    processes = f" x {world_size} processes" if world_size > 1 else ""
    # Every sampler drops the last incomplete batch (batch-level losses need full batches), so an
    # epoch is floor(captions / (batch_size x processes)) batches.
    if captions < batch_size * world_size:
        raise ValueError(
            f"data.batch_size={batch_size}{processes} but the train split has {captions} captions "
            f"({len(train_records)} images): not one full batch per epoch, nothing would be trained. "
            f"Lower data.batch_size to at most {captions // world_size}"
        )
    if data.get("sampler") == "identity":
        pairs = [record.person_id for record in train_records for _ in record.captions]
        # The sampler's own checks (batch_size a multiple of num_instances, enough identities per batch).
        sampler = IdentityBalancedSampler(pairs, batch_size, int(data["num_instances"]), seed=0, rank=0, world_size=world_size)
        if len(sampler) == 0:
            raise ValueError(f"data.sampler=identity yields no full batch of {batch_size} from {captions} captions: lower data.batch_size")
    limit = config["trainer"].get("limit_train_batches")
    if limit is not None and float(limit) == 0:
        raise ValueError("trainer.limit_train_batches=0 trains nothing; remove it or set a positive value")


def check_run_images(config: Mapping[str, Any], dataset: PersonSearchDataset) -> int:
    """Every image of the splits the run reads must exist (``data.check_images: decode``: decode);
    returns how many were checked. A missing val or test image would otherwise crash the run at
    the end of an epoch, or after training."""
    decode = config["data"]["check_images"] == "decode"
    workers = min(32, 2 * (os.cpu_count() or 1))
    started = time.perf_counter()
    checked = require_images(dataset, run_splits(dataset), decode=decode, workers=workers)
    log.info("checked %d images of %s (%s) in %.1f s", checked, "/".join(run_splits(dataset)),
             "decoded" if decode else "exist", time.perf_counter() - started)
    return checked


def _image_backbone_name(config: Mapping[str, Any]) -> str:
    backbone = _get(config, "model.image_backbone")
    return str(backbone.get("name")) if isinstance(backbone, Mapping) else "the image backbone"


def _backbone_size_error(config: Mapping[str, Any]) -> str | None:
    """Why the image backbone alone cannot take ``data.image_size`` (None when it can)."""
    from tbps.models.backbones import create_image_backbone

    backbone_config = _get(config, "model.image_backbone")
    if not isinstance(backbone_config, Mapping):
        return None
    size = tuple(int(v) for v in config["data"]["image_size"])
    try:
        backbone = create_image_backbone({**backbone_config, "pretrained": False}, image_size=size)
        final = backbone.feature_map_sizes(size)[-1]
    except Exception as error:  # noqa: BLE001 - any failure on a blank image is the size's
        return str(error)
    return None if min(final) >= 1 else f"its final feature map would be {final[0]}x{final[1]}"


def build_module(config: Mapping[str, Any], labels: dict[int, int]) -> PersonSearchModule:
    """The Lightning module of a run, checked with one blank image of ``data.image_size``
    (:func:`check_image_size`): a size too small fails here, not at the first batch."""
    try:
        module = PersonSearchModule(config, num_classes=len(labels), label_map=labels)
    except Exception as error:
        # Some methods measure their feature maps while being built; blame the size only when the
        # backbone cannot take it, anything else is the method's own error.
        reason = _backbone_size_error(config)
        if reason is not None:
            raise ValueError(_too_small(config, reason)) from error
        raise
    check_image_size(module, config)
    return module


def _too_small(config: Mapping[str, Any], reason: str) -> str:
    size = [int(v) for v in config["data"]["image_size"]]
    return f"data.image_size={size} is too small for {_image_backbone_name(config)}: {reason}. Raise data.image_size"


def check_image_size(module: PersonSearchModule, config: Mapping[str, Any]) -> None:
    """A dry forward of one blank ``data.image_size`` image through the method's image encoder
    (eval mode, no gradients); a failure becomes a ValueError naming the size and the backbone."""
    size = [int(v) for v in config["data"]["image_size"]]
    method = module.method
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            method.encode_image(torch.zeros(1, 3, *size))
    except Exception as error:  # noqa: BLE001 - a blank image only fails on the configuration
        reason = _backbone_size_error(config)
        if reason is not None:
            raise ValueError(_too_small(config, reason)) from error
        backbone = getattr(method, "image_backbone", None)
        final = backbone.feature_map_sizes(tuple(size))[-1] if backbone is not None else None
        shape = f" (final feature map {final[0]}x{final[1]})" if final else ""
        raise ValueError(
            f"data.image_size={size}{shape}: a dry forward of one blank image through {config['method']} failed: "
            f"{type(error).__name__}: {error}. If the method needs more rows or columns of that map "
            "(stripes, body parts), raise data.image_size"
        ) from error
    finally:
        method.train(was_training)


# --------------------------------------------------------------------------- checkpoints and history


class EpochCheckpoints(L.Callback):
    """``last.ckpt`` before every validation and at every epoch end, each time with the history
    flushed to disk.

    Lightning validates after an epoch's last batch and *before* ``on_train_epoch_end``, so a
    ``ModelCheckpoint(save_on_train_epoch_end=True)`` would still save after validation; the
    pre-validation save is ``on_validation_start``. A run resumed from it continues with the next
    epoch (Lightning does not rerun the interrupted validation): the callback's state records
    which save a checkpoint is, and the resumed run says so. It also records the training seconds
    the checkpoint embodies, so a run resumed any number of times reports its whole training time
    (the work lost between a checkpoint and a kill is not counted).
    """

    BEFORE_VALIDATION = "before_validation"
    EPOCH_END = "epoch_end"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.stage = ""
        self.epoch = -1
        self.resumed_from: dict[str, Any] = {}  # the state of the checkpoint this run resumes
        self._started: float | None = None

    @property
    def train_seconds(self) -> float:
        """Training seconds up to now, over every resume."""
        now = 0.0 if self._started is None else time.perf_counter() - self._started
        return float(self.resumed_from.get("train_seconds", 0.0)) + now

    def _save(self, trainer: L.Trainer, stage: str) -> None:
        self.stage, self.epoch = stage, int(trainer.current_epoch)
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: --resume needs it
        # Rows logged so far must be on disk with the checkpoint that covers them: a resumed run
        # does not log them again.
        for logger in trainer.loggers:
            logger.save()

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._save(trainer, self.BEFORE_VALIDATION)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, self.EPOCH_END)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # The previous epoch's epoch-level rows are logged after its last checkpoint.
        for logger in trainer.loggers:
            logger.save()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        if self.resumed_from.get("stage") == self.BEFORE_VALIDATION:
            epoch = int(self.resumed_from.get("epoch", trainer.current_epoch - 1)) + 1
            log.warning(
                "resumed from a checkpoint written before epoch %d's validation (the run stopped during it): "
                "training continues with epoch %d and epoch %d is not validated, so metrics.csv has no val row "
                "for it and best.ckpt cannot be it", epoch, epoch + 1, epoch,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "epoch": self.epoch, "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed_from = dict(state_dict)


class HistoryWriter(ExperimentWriter):
    """``metrics.csv`` that a resume extends instead of deleting, written atomically.

    With ``resume=True`` the existing file's rows are kept. A row the resumed run logs again (the
    same step and the same columns: steps between the checkpoint and the kill are replayed)
    replaces the old one, so no step appears twice; rows it does not replay stay. Every save
    rewrites the whole file through a temporary file and a rename, so a kill never leaves it
    truncated, and the header is the union of every column seen (old rows leave new ones empty).
    """

    def __init__(self, log_dir: str, *, resume: bool) -> None:
        super().__init__(log_dir=log_dir)
        self.rows: list[dict[str, Any] | None] = []
        self._replaceable: dict[tuple[str, frozenset[str]], int] = {}
        path = Path(self.metrics_file_path)
        if not resume and path.is_file():
            # A new run in the directory of an earlier one: its history is not this run's.
            log.warning("a new run in %s: removing the earlier run's %s", Path(log_dir).parent, path.name)
            path.unlink()
        if resume and path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.metrics_keys = sorted(reader.fieldnames or [])
                for row in reader:
                    kept = {key: value for key, value in row.items() if key is not None and value not in ("", None)}
                    self._replaceable[self._row_key(kept)] = len(self.rows)
                    self.rows.append(kept)
            log.info("keeping %d rows of %s", len(self.rows), path)

    @staticmethod
    def _row_key(row: Mapping[str, Any]) -> tuple[str, frozenset[str]]:
        return str(row.get("step", "")), frozenset(row)

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes an existing metrics.csv here, resume or not; ``__init__`` decides."""

    def save(self) -> None:
        if not self.metrics:
            return
        for row in self.metrics:
            old = self._replaceable.pop(self._row_key(row), None)
            if old is not None:
                self.rows[old] = None
            self.rows.append(row)
        self.metrics = []
        rows = [row for row in self.rows if row is not None]  # replaced rows stay as None: indices hold
        self.metrics_keys = sorted(set(self.metrics_keys).union(*rows))
        with atomic_write(self.metrics_file_path) as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


class HistoryCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing ``<save_dir>/logs/metrics.csv`` through :class:`HistoryWriter`."""

    def __init__(self, save_dir: str | Path, *, resume: bool = False) -> None:
        super().__init__(save_dir, name="", version="logs")
        self._resume = resume

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryWriter(self.log_dir, resume=self._resume)
        return self._experiment


# --------------------------------------------------------------------------- training


def train(
    config: Any = None,
    *,
    resume: str | Path | None = None,
    overrides: Sequence[str] = (),
    extra_callbacks: Sequence[L.Callback] = (),
) -> TrainResult:
    """Train one run (``config`` + ``overrides``), or continue one (``resume``: a run directory or a
    checkpoint; ``config``, if given, and ``overrides`` may then change only
    :data:`RESUME_SETTINGS`)."""
    resume_checkpoint = None
    if resume is not None:
        run_dir, resume_checkpoint = resolve_resume(resume)
        stored = read_checkpoint(resume_checkpoint)["tbps"]["config"]
        config = resume_config(stored, config, overrides)
    else:
        if config is None:
            raise ValueError("train() needs a config, or resume= to continue a run")
        config = prepare_config(config, overrides)
        run_dir = default_run_dir(config)
    seed = int(config["seed"])
    L.seed_everything(seed, workers=True, verbose=False)

    dataset = load_run_dataset(config)
    has_val = bool(dataset.splits.get("val"))
    trainer_config = config["trainer"]
    checkpoint_dir = run_dir / "checkpoints"
    every_epoch = EpochCheckpoints(checkpoint_dir / "last.ckpt")
    callbacks: list[L.Callback] = [every_epoch, LearningRateMonitor(logging_interval="step")]
    checkpointing = None
    if has_val:
        # best.ckpt follows val R@1 (never test).
        checkpointing = ModelCheckpoint(
            dirpath=checkpoint_dir, filename="best", monitor="val/R1", mode="max", save_top_k=1, enable_version_counter=False
        )
        callbacks.insert(0, checkpointing)
    else:
        log.warning(
            "%s has no val split (data.val_identity_fraction=%s): no model selection, best.ckpt is not written "
            "and the last checkpoint (%s) is the result", dataset.name, config["data"].get("val_identity_fraction"),
            checkpoint_dir / "last.ckpt",
        )
    callbacks.extend(extra_callbacks)
    if trainer_config.get("progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, int(trainer_config.get("log_every_n_steps", 10)))))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=int(trainer_config["max_epochs"]),
        accelerator=trainer_config["accelerator"],
        devices=trainer_config["devices"],
        num_nodes=int(trainer_config["num_nodes"]),
        strategy=trainer_config["strategy"],
        precision=trainer_config["precision"],
        accumulate_grad_batches=int(trainer_config["accumulate_grad_batches"]),
        gradient_clip_val=trainer_config.get("gradient_clip_val"),
        limit_train_batches=trainer_config.get("limit_train_batches"),
        limit_val_batches=None if has_val else 0,
        log_every_n_steps=int(trainer_config.get("log_every_n_steps", 10)),
        logger=[
            HistoryCSVLogger(run_dir, resume=resume is not None),
            TensorBoardLogger(run_dir, name="", version="tensorboard"),
        ],
        callbacks=callbacks,
        enable_checkpointing=has_val,  # no ModelCheckpoint without val: last.ckpt is EpochCheckpoints'
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # our samplers shard by rank themselves
        num_sanity_val_steps=0,
        enable_progress_bar=bool(trainer_config.get("progress_bar", True)),
        enable_model_summary=False,
    )

    # Everything that can be known before training is checked before anything is written.
    check_run_data(config, dataset, world_size=trainer.world_size)
    check_run_images(config, dataset)
    train_records = dataset.split("train")
    labels = {pid: i for i, pid in enumerate(sorted({r.person_id for r in train_records}))}
    module = build_module(config, labels)
    module.method.fit_text([caption for record in train_records for caption in record.captions])
    datamodule = PersonSearchDataModule(
        _data_config(config), dataset, module.method.build_text_processor(), module.method.image_mean_std, seed=seed
    )

    # One run directory, rank 0's, whatever each DDP process computed (see SharedRunDir).
    shared_run_dir = SharedRunDir(run_dir)
    trainer.callbacks.append(shared_run_dir)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint)
    train_seconds = every_epoch.train_seconds  # over every resume of this run
    run_dir = shared_run_dir.run_dir
    checkpoint_dir = run_dir / "checkpoints"

    best = Path(checkpointing.best_model_path) if checkpointing is not None and checkpointing.best_model_path else None
    last = checkpoint_dir / "last.ckpt"
    result = TrainResult(run_dir=run_dir, best_checkpoint=best, last_checkpoint=last)
    if trainer.is_global_zero:
        result.report, result.test_evaluations = test_report(config, dataset, best, last, train_seconds=train_seconds)
        with atomic_write(run_dir / "report.json") as handle:
            json.dump(result.report, handle, indent=2)
    return result


def _data_config(config: Mapping[str, Any]) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create(config["data"])


def test_report(
    config: dict[str, Any], dataset: Any, best: Path | None, last: Path, *, train_seconds: float | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Test metrics of the best-on-val and the last checkpoint (never selected on test), and the
    evaluations they come from."""
    split = "test"
    records = dataset.split(split)
    has_val = bool(dataset.splits.get("val"))
    report: dict[str, Any] = {
        "method": config["method"],
        "dataset": config["data"]["dataset"],
        "split": split,
        "selection": "best val R@1 (model selection never looks at test)" if has_val else
        "none: no val split (trained on the whole train split); the last checkpoint is the result",
        "dataset_stats": dataset_stats(dataset),
        "train_seconds": train_seconds,
        "scoring": scoring_options(config),
        "checkpoints": {},
    }
    evaluations: dict[str, dict[str, Any]] = {}
    device = evaluation_device(config)
    for tag, path in (("best", best), ("last", last)):
        if path is None or not Path(path).is_file():
            continue
        checkpoint = read_checkpoint(path)
        method, _ = load_method(path, map_location=device, checkpoint=checkpoint)
        started = time.perf_counter()
        result = evaluate_split(
            method,
            records,
            config["data"]["image_size"],
            batch_size=int(config["data"]["eval_batch_size"]),
            num_workers=int(config["data"]["num_workers"]),
            device=device,
            return_similarity=True,
            **scoring_options(config),
        )
        evaluate_seconds = time.perf_counter() - started
        evaluations[tag] = result
        val_r1 = checkpoint["tbps"].get("val_metrics", {}).get("R1")
        report["checkpoints"][tag] = {
            "path": str(path),
            "epoch": int(checkpoint.get("epoch", -1)) + 1,
            "val_R1": val_r1,
            "test": {key: result[key] for key in METRIC_KEYS},
            "eval_seconds": evaluate_seconds,  # encode the split + score + rank
        }
    return report, evaluations
