"""Training entry point: build everything from a config, fit with Lightning, report on test.

Model selection uses the val split only (``best.ckpt`` = best val R@1); the final report gives
test metrics for both the best-on-val and the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from tbps.config import save_config, to_container
from tbps.data.checks import dataset_stats
from tbps.engine.checkpoint import AtomicCheckpointIO, load_method, read_checkpoint
from tbps.engine.datamodule import PersonSearchDataModule, load_configured_dataset
from tbps.engine.module import PersonSearchModule
from tbps.evaluation.evaluator import evaluate_split, scoring_options
from tbps.utils import atomic_write

log = logging.getLogger(__name__)
METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")


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
    trainer = config["trainer"]
    name = trainer.get("run_name") or f"{config['method']}-{Path(str(config['data']['dataset'])).name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(trainer["output_dir"]) / name


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


def train(config: Any, *, resume: str | Path | None = None, extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    config = to_container(config)
    resume_checkpoint = None
    if resume is not None:
        run_dir, resume_checkpoint = resolve_resume(resume)
        # A resumed run continues with the config it started with (overrides of the resume
        # command line must not silently change the experiment).
        config = read_checkpoint(resume_checkpoint)["tbps"]["config"]
    else:
        run_dir = default_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    seed = int(config["seed"])
    L.seed_everything(seed, workers=True, verbose=False)

    from omegaconf import OmegaConf

    data_config = OmegaConf.create(config["data"])
    dataset = load_configured_dataset(data_config, seed)
    train_records = dataset.split("train")
    labels = {pid: i for i, pid in enumerate(sorted({r.person_id for r in train_records}))}
    module = PersonSearchModule(config, num_classes=len(labels), label_map=labels)
    module.method.fit_text([caption for record in train_records for caption in record.captions])
    datamodule = PersonSearchDataModule(
        data_config, dataset, module.method.build_text_processor(), module.method.image_mean_std, seed=seed
    )

    trainer_config = config["trainer"]
    checkpoint_dir = run_dir / "checkpoints"
    # best.ckpt follows val R@1 (never test); last.ckpt is rewritten every epoch for --resume.
    checkpointing = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor="val/R1", mode="max", save_top_k=1, enable_version_counter=False
    )
    every_epoch = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, enable_version_counter=False)
    callbacks: list[L.Callback] = [
        checkpointing,
        every_epoch,
        LearningRateMonitor(logging_interval="step"),
        *extra_callbacks,
    ]
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
        log_every_n_steps=int(trainer_config.get("log_every_n_steps", 10)),
        logger=[CSVLogger(run_dir, name="", version="logs"), TensorBoardLogger(run_dir, name="", version="tensorboard")],
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # our samplers shard by rank themselves
        num_sanity_val_steps=0,
        enable_progress_bar=bool(trainer_config.get("progress_bar", True)),
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint)
    train_seconds = time.perf_counter() - started

    best = Path(checkpointing.best_model_path) if checkpointing.best_model_path else None
    last = checkpoint_dir / "last.ckpt"
    result = TrainResult(run_dir=run_dir, best_checkpoint=best, last_checkpoint=last)
    if trainer.is_global_zero:
        result.report, result.test_evaluations = test_report(config, dataset, best, last, train_seconds=train_seconds)
        with atomic_write(run_dir / "report.json") as handle:
            json.dump(result.report, handle, indent=2)
    return result


def test_report(
    config: dict[str, Any], dataset: Any, best: Path | None, last: Path, *, train_seconds: float | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Test metrics of the best-on-val and the last checkpoint (never selected on test), and the
    evaluations they come from."""
    split = "test"
    records = dataset.split(split)
    report: dict[str, Any] = {
        "method": config["method"],
        "dataset": config["data"]["dataset"],
        "split": split,
        "selection": "best val R@1 (model selection never looks at test)",
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

