"""The LightningModule wrapping any registered method: the science lives in the method, the
plumbing (devices, precision, DDP, checkpointing, logging) in Lightning.

The learning-rate schedule (:class:`EpochSchedule`) is given in epochs and applied per
optimisation step, for every ``optim.scheduler`` kind: ``optim.warmup_epochs`` of linear warm-up,
then cosine (to ``min_lr_ratio``), multistep (``gamma`` at each of ``milestones``) or constant;
``optim.restart_epochs`` starts warm-up and decay again at those epochs (LAIP's second stage).

Under DDP (``trainer.devices`` > 1), checked on two processes by ``tests/test_ddp.py``:

* batch-level losses see every process's samples through ``method.gather`` (an all-gather that
  keeps gradients), and the gradient the optimiser gets is the single-process gradient of the
  loss on the concatenated batch, with no rescaling (see :meth:`PersonSearchModule.setup`);
* every process validates on the whole val split, so val metrics (and ``best.ckpt``'s choice)
  are the same on every rank;
* a non-finite loss on any process stops every process together
  (:meth:`PersonSearchModule.stop_if_not_finite`), instead of leaving the others waiting in
  the next collective.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
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
log = logging.getLogger(__name__)


SCHEDULERS = ("cosine", "multistep", "constant")


class EpochSchedule:
    """The learning-rate factor of every optimisation step, from a schedule given in epochs.

    The run is cut into *segments* at ``restart_epochs`` (none: one segment, the whole run). Each
    segment starts with a linear warm-up over ``warmup_epochs`` (factor ``(s + 1) / W`` at step
    ``s`` of the segment), then follows ``kind``:

    * ``cosine``: from 1 down to ``min_lr_ratio`` over the rest of the segment;
    * ``multistep``: ``gamma ** n``, ``n`` = the ``milestones`` (epochs, counted from the start of
      the run, fractions allowed: a paper's schedule scaled to a shorter run) passed since the
      segment began; during the warm-up the ramp multiplies it;
    * ``constant``: 1.

    A restart thus returns the lr to its initial value and runs warm-up + decay again over the
    remaining epochs (LAIP's second stage, App. E2: "in both stages ... cosine learning rate
    decay ... and a warmup"). A milestone at a restart epoch is superseded by the restart.
    """

    def __init__(
        self,
        kind: str,
        *,
        steps_per_epoch: int,
        max_epochs: int,
        warmup_epochs: float = 0.0,
        milestones: Sequence[float] = (),
        gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
        restart_epochs: Sequence[int] = (),
    ) -> None:
        if kind not in SCHEDULERS:
            raise ValueError(f"optim.scheduler must be one of {', '.join(SCHEDULERS)}, got {kind!r}")
        if steps_per_epoch < 1 or max_epochs < 1:
            raise ValueError(f"steps_per_epoch and max_epochs must be >= 1, got {steps_per_epoch} and {max_epochs}")
        if float(warmup_epochs) < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {warmup_epochs}")
        restarts = []
        for epoch in restart_epochs or ():
            if isinstance(epoch, bool) or not float(epoch).is_integer():
                raise ValueError(f"optim.restart_epochs must hold whole epochs, got {epoch!r}")
            if not 0 <= int(epoch) < max_epochs:
                raise ValueError(
                    f"optim.restart_epochs: epoch {int(epoch)} is outside the run's epochs 0..{max_epochs - 1} "
                    f"(trainer.max_epochs = {max_epochs}); a restart there would never happen "
                    "(for a run that ends before it, set optim.restart_epochs=[])"
                )
            restarts.append(int(epoch))
        self.kind = kind
        self.steps_per_epoch = int(steps_per_epoch)
        self.max_epochs = int(max_epochs)
        self.warmup_steps = int(float(warmup_epochs) * steps_per_epoch)
        # The step each milestone takes effect at (epoch 2.5 of 10-step epochs: step 25).
        self.milestones = sorted(float(m) for m in milestones or ())
        self.milestone_steps = [round(m * steps_per_epoch) for m in self.milestones]
        self.gamma = float(gamma)
        self.min_lr_ratio = float(min_lr_ratio)
        # Restart at epoch 0 is the start of the run itself.
        self.segment_epochs = sorted({0, *restarts})
        boundaries = [epoch * steps_per_epoch for epoch in self.segment_epochs] + [max_epochs * steps_per_epoch]
        self.segments = list(zip(boundaries[:-1], boundaries[1:], self.segment_epochs))
        short = [epochs for epochs in zip(self.segment_epochs, self.segment_epochs[1:] + [max_epochs])
                 if (epochs[1] - epochs[0]) * steps_per_epoch <= self.warmup_steps]
        if short:
            log.warning("a warm-up of %s epochs does not fit in the schedule's segment(s) %s: their lr never reaches its peak",
                        warmup_epochs, ", ".join(f"[{a}, {b})" for a, b in short))

    def segment(self, step: int) -> tuple[int, int, int]:
        """``(first step, end step, first epoch)`` of the segment holding ``step``."""
        for start, end, epoch in reversed(self.segments):
            if step >= start:
                return start, end, epoch
        return self.segments[0]

    def __call__(self, step: int) -> float:
        start, end, first_epoch = self.segment(step)
        local = step - start
        ramp = (local + 1) / self.warmup_steps if local < self.warmup_steps else 1.0
        if self.kind == "constant":
            return ramp
        if self.kind == "multistep":
            passed = sum(1 for m, at in zip(self.milestones, self.milestone_steps) if first_epoch < m and at <= step)
            return ramp * self.gamma**passed
        if local < self.warmup_steps:
            return ramp
        progress = min(1.0, (local - self.warmup_steps) / max(1, end - start - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, optim: Mapping[str, Any], *, max_epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``optim`` config's schedule as a LambdaLR to step once per optimisation step."""
    schedule = EpochSchedule(
        str(optim["scheduler"]),
        steps_per_epoch=steps_per_epoch,
        max_epochs=max_epochs,
        warmup_epochs=float(optim.get("warmup_epochs", 0) or 0),
        milestones=list(optim.get("milestones") or ()),
        gamma=float(optim.get("gamma", 0.1)),
        min_lr_ratio=float(optim.get("min_lr_ratio", 0.0)),
        restart_epochs=list(optim.get("restart_epochs") or ()),
    )

    # A plain function, not the schedule object: LambdaLR would store an object's attributes in
    # the checkpoint and restore them over the ones this run computed (e.g. steps per epoch).
    def factor(step: int) -> float:
        return schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def upgrade_scheduler_states(checkpoint: dict[str, Any]) -> None:
    """Rewrite, in place, a checkpoint's MultiStepLR states as this engine's per-step LambdaLR.

    Checkpoints written before every schedule became a per-step LambdaLR hold a MultiStepLR state
    that counts epochs; loaded as is, LambdaLR would read that epoch count as a step count and
    replay the warm-up. The step count (``global_step``) replaces it, so a resumed multistep run
    keeps its milestones (and from then on follows its configured warm-up, which MultiStepLR
    ignored: the same lr once the warm-up epochs are over).
    """
    for state in checkpoint.get("lr_schedulers", []):
        if "milestones" in state:
            step = int(checkpoint.get("global_step", 0))
            for key in ("milestones", "gamma"):
                state.pop(key)
            state.update(last_epoch=step, _step_count=step + 1, lr_lambdas=[None] * len(state.get("base_lrs", [])))


def seed_batch(seed: int, *, epoch: int, batch_idx: int, rank: int) -> None:
    """Seed torch, numpy and ``random`` for one training batch of one process, from
    ``(seed, epoch, batch, rank)`` alone (see :meth:`PersonSearchModule.on_train_batch_start`)."""
    state = int(np.random.SeedSequence([int(seed), int(epoch), int(batch_idx), int(rank)]).generate_state(1)[0])
    torch.manual_seed(state)
    np.random.seed(state % 2**32)
    random.seed(state)


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
            # Their scale needs no correction: each of the W processes computes the loss L of the
            # whole gathered batch; the all-gather's backward (torch.distributed.nn's, a
            # reduce-scatter) sums over processes the gradients reaching each process's own rows,
            # so process r holds W * dL/d(rows of r); DDP then averages over the W processes,
            # which leaves sum_r dL/d(rows of r) * d(rows of r)/d(theta) = dL/d(theta): the
            # gradient of one process computing L on the concatenated batch (measured on 2
            # processes: relative difference 5e-10). A loss over a process's own rows only (CMPC,
            # ID) is averaged by DDP like any per-sample mean.
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
        seed_batch(int(self.config["seed"]), epoch=self.current_epoch, batch_idx=batch_idx, rank=self.global_rank)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.method(batch)
        total = torch.stack(list(losses.values())).sum()
        self.stop_if_not_finite(total, losses)
        batch_size = batch["images"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return total

    def stop_if_not_finite(self, total: Tensor, losses: Mapping[str, Tensor]) -> None:
        """Raise FloatingPointError, on every process at once, when any process's loss is not finite.

        Under DDP a process that raised alone would leave the others waiting in their next
        collective (the all-gather of a batch-level loss, DDP's gradient all-reduce): with NCCL
        until the process group's timeout (30 min by default), with gloo until the dead peer's
        socket closes, and then with a connection error instead of this one. So every process
        shares its finiteness flag (one all-gather of one value per step) and all raise together,
        naming the process(es) whose loss was not finite.
        """
        finite = torch.isfinite(total.detach())
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if world_size > 1:
            flags = self.all_gather(finite.to(torch.int32)).reshape(-1).tolist()
            failed = [rank for rank, flag in enumerate(flags) if not flag]
        else:
            failed = [] if bool(finite) else [0]
        if failed:
            own = {name: float(value.detach()) for name, value in losses.items()}
            raise FloatingPointError(
                f"non-finite loss at step {self.global_step} on rank(s) {failed} of {world_size}; "
                f"this process's (rank {self.global_rank}) losses: {own}. Every rank stops"
            )

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

        max_epochs = int(self.config["trainer"]["max_epochs"])
        # Optimisation steps per epoch (Lightning's estimate is ceil(batches / accumulation) x
        # max_epochs, so this division is exact); every kind is stepped per optimisation step.
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total_steps // max(1, max_epochs))
        scheduler = build_lr_scheduler(optimizer, optim, max_epochs=max_epochs, steps_per_epoch=steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_scheduler_states(checkpoint)  # runs before Lightning restores the scheduler

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
