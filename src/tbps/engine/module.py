"""The LightningModule wrapping any registered method: the science lives in the method, the
plumbing (devices, precision, DDP, checkpointing, logging) in Lightning."""

from __future__ import annotations

import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from tbps.config import to_container
from tbps.evaluation.evaluator import score_features, scoring_options
from tbps.evaluation.rank import rank
from tbps.models.base import concat_features
from tbps.models.registry import create_method

CHECKPOINT_FORMAT = 1


class PersonSearchModule(L.LightningModule):
    def __init__(self, config: Any, num_classes: int, label_map: dict[int, int] | None = None) -> None:
        super().__init__()
        self.config = to_container(config)
        self.num_classes = int(num_classes)
        self.label_map = dict(label_map or {})
        # Stored in every checkpoint, so it rebuilds the model without the YAML file.
        self.save_hyperparameters({"config": self.config, "num_classes": self.num_classes})
        self.method = create_method(
            self.config["method"], self.config["model"], self.num_classes, image_size=tuple(self.config["data"]["image_size"])
        )
        self._val_outputs: dict[int, list[dict[str, Tensor]]] = {0: [], 1: []}
        self.last_val_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ DDP and determinism
    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            # Batch-level losses compare against every process's samples; gradients flow back.
            self.method.gather = lambda tensor: self.all_gather(tensor, sync_grads=True).flatten(0, 1)

    def on_fit_start(self) -> None:
        # Pretrained loaders (transformers' from_pretrained) hand back modules in eval mode;
        # training must run with dropout and batch-norm updates on.
        self.method.train()

    def on_train_epoch_start(self) -> None:
        self.method.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Model-side randomness (dropout, drop-connect, sampling inside a method) is re-seeded
        # from (seed, epoch, batch, rank) before every batch, so a run resumed from a checkpoint draws
        # exactly what an uninterrupted one draws, whatever Lightning consumed in between.
        # Data-side randomness already derives from (seed, epoch, index) in the dataset.
        # (Lightning's global_step still reads 0 at the first batch after a restore, so the
        # epoch and batch index are used instead.)
        seed = int(np.random.SeedSequence([int(self.config["seed"]), self.current_epoch, batch_idx, self.global_rank]).generate_state(1)[0])
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.method(batch)
        total = torch.stack(list(losses.values())).sum()
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss at step {self.global_step}: { {k: float(v) for k, v in losses.items()} }")
        batch_size = batch["images"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return total

    # ------------------------------------------------------------------ validation (R@1 on val)
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = {0: [], 1: []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            features = self.method.encode_image(batch["images"])
        else:
            features = self.method.encode_text(batch["text"])
        features = {k: v.detach().float().cpu() for k, v in features.items()}
        features["_person_ids"] = batch["person_ids"].cpu()
        self._val_outputs[dataloader_idx].append(features)

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs[0] or not self._val_outputs[1]:
            return
        images = concat_features(self._val_outputs[0])
        texts = concat_features(self._val_outputs[1])
        gallery_ids, query_ids = images.pop("_person_ids"), texts.pop("_person_ids")
        # The configured test-time scoring (eval.rerank), so model selection sees what test sees.
        similarity = score_features(self.method, texts, images, device=self.device, **scoring_options(self.config))
        metrics = rank(similarity, query_ids, gallery_ids, max_rank=10)
        self.last_val_metrics = {key: float(metrics[key]) for key in ("R1", "R5", "R10", "mAP", "mINP")}
        for key, value in self.last_val_metrics.items():
            self.log(f"val/{key}", value, prog_bar=key == "R1", sync_dist=False)
        self._val_outputs = {0: [], 1: []}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.config["optim"]
        groups = self.method.parameter_groups()
        lr = float(optim["lr"])
        param_groups = [
            {"params": groups["new"], "lr": lr, "name": "new"},
            {"params": groups["backbone"], "lr": lr * float(optim["backbone_lr_mult"]), "name": "backbone"},
        ]
        param_groups = [group for group in param_groups if group["params"]]
        kind = optim["optimizer"].lower()
        kwargs = {"betas": tuple(optim["betas"]), "weight_decay": float(optim["weight_decay"])}
        if kind == "adamw":
            optimizer = torch.optim.AdamW(param_groups, **kwargs)
        elif kind == "adam":
            optimizer = torch.optim.Adam(param_groups, **kwargs)
        else:
            raise ValueError(f"optim.optimizer must be adam or adamw, got {kind!r}")

        scheduler_kind = optim["scheduler"]
        max_epochs = int(self.config["trainer"]["max_epochs"])
        if scheduler_kind == "multistep":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=list(optim["milestones"]), gamma=float(optim["gamma"])
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        # Warm-up then cosine (or constant), stepped per optimisation step.
        total_steps = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer else 1
        steps_per_epoch = max(1, total_steps // max(1, max_epochs))
        warmup = int(float(optim["warmup_epochs"]) * steps_per_epoch)
        floor = float(optim["min_lr_ratio"])

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if scheduler_kind == "constant":
                return 1.0
            if scheduler_kind != "cosine":
                raise ValueError(f"optim.scheduler must be cosine, multistep or constant, got {scheduler_kind!r}")
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoint contents
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tbps"] = {
            "format": CHECKPOINT_FORMAT,
            "method": self.config["method"],
            "config": self.config,
            "num_classes": self.num_classes,
            "label_map": self.label_map,
            "val_metrics": self.last_val_metrics,  # of the epoch this checkpoint closes
        }
