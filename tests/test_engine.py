"""End-to-end: train -> checkpoint -> eval, exact resume, checkpoint validation, CLI; the
learning-rate schedule the optimiser actually applies."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from typer.testing import CliRunner

from tbps.engine.checkpoint import CheckpointError, load_method, read_checkpoint
from tbps.engine.module import EpochSchedule, PersonSearchModule, build_lr_scheduler, upgrade_scheduler_states
from tbps.engine.train import train


class SimulatedKill(RuntimeError):
    pass


class StopAfterFirstEpoch(L.Callback):
    """Simulates a run killed after its first checkpoint."""

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise SimulatedKill("killed at the start of epoch 2")


def random_ranking_metrics(query_ids, gallery_ids, repeats: int = 20) -> dict[str, float]:
    """Expected metrics of a random ranking with the same ids (the chance level)."""
    from tbps.evaluation import rank

    generator = torch.Generator().manual_seed(0)
    runs = [rank(torch.rand(len(query_ids), len(gallery_ids), generator=generator), query_ids, gallery_ids) for _ in range(repeats)]
    return {key: sum(run[key] for run in runs) / repeats for key in ("R1", "R10", "mAP")}


@pytest.mark.slow
def test_train_then_eval_beats_chance(tiny_synthetic, tiny_config, tmp_path):
    # A Bi-LSTM and a mostly frozen image backbone keep this to seconds on a CPU.
    config = tiny_config(
        tiny_synthetic, tmp_path / "runs", "trainer.max_epochs=8", "trainer.run_name=e2e", "optim.lr=3e-3",
        "model.text_backbone.name=bilstm", "model.text_backbone.pretrained=null", "model.text_backbone.freeze_layers=null", "model.text_backbone.min_count=1", "model.text_backbone.hidden_size=128",
        "model.text_backbone.embedding_dim=64", "model.image_backbone.freeze_stages=4", "data.augment.padding=2",
    )
    result = train(config)

    # Files a run promises: resolved config, best/last checkpoints, logs, report.
    assert (result.run_dir / "config.yaml").is_file()
    assert result.last_checkpoint.is_file() and result.best_checkpoint is not None
    assert result.history_csv.is_file()
    report = json.loads((result.run_dir / "report.json").read_text())
    assert set(report["checkpoints"]) == {"best", "last"}
    assert report["checkpoints"]["last"]["epoch"] == 8
    assert report["checkpoints"]["best"]["val_R1"] is not None

    # The model learned to rank: on the training identities far above chance, and on the
    # unseen test identities (8 of them, 24 images: little to generalise from) above chance.
    from tbps.data.readers import load_dataset
    from tbps.evaluation.evaluator import evaluate_split

    method, _ = load_method(result.last_checkpoint)
    dataset = load_dataset("cuhk-pedes", tiny_synthetic)
    seen = evaluate_split(method, dataset.split("train"), [64, 32])
    seen_chance = random_ranking_metrics(seen["query_ids"], seen["gallery_ids"])
    assert seen["R1"] > 5 * seen_chance["R1"], (seen["R1"], seen_chance)
    unseen = evaluate_split(method, dataset.split("test"), [64, 32])
    unseen_chance = random_ranking_metrics(unseen["query_ids"], unseen["gallery_ids"])
    assert unseen["mAP"] > 1.2 * unseen_chance["mAP"], (unseen["mAP"], unseen_chance)
    assert unseen["R1"] == pytest.approx(report["checkpoints"]["last"]["test"]["R1"])

    # The checkpoint carries its config and rebuilds the same method without the YAML file.
    checkpoint = read_checkpoint(result.last_checkpoint)
    assert checkpoint["tbps"]["method"] == "baseline"
    assert checkpoint["tbps"]["config"]["data"]["image_size"] == [64, 32]

    # `tbps eval` reproduces the report's numbers and writes per-query ranks.
    from tbps.cli.main import app

    stats = report["dataset_stats"]["test"]
    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(app, ["eval", "--checkpoint", str(result.last_checkpoint), "--json", str(out), "--i2t"])
    assert cli.exit_code == 0, cli.output
    payload = json.loads(out.read_text())
    assert payload["metrics"]["text-to-image"]["R1"] == pytest.approx(report["checkpoints"]["last"]["test"]["R1"])
    assert "image-to-text" in payload["metrics"]
    assert len(payload["per_query"]) == stats["captions"]
    assert all(1 <= q["first_hit_rank"] <= stats["images"] for q in payload["per_query"])
    # --split train: the fit to the training identities, the figure evaluate_split gave above.
    cli = CliRunner().invoke(app, ["eval", "--checkpoint", str(result.last_checkpoint), "--split", "train", "--json", str(out)])
    assert cli.exit_code == 0, cli.output
    assert json.loads(out.read_text())["metrics"]["text-to-image"]["R1"] == pytest.approx(seen["R1"])


@pytest.mark.slow
def test_resume_continues_exactly(tiny_synthetic, tiny_config, tmp_path):
    # A Bi-LSTM text encoder keeps this fast and also checks that its vocabulary travels in
    # the checkpoint.
    extra = ("trainer.max_epochs=2", "model.text_backbone.name=bilstm", "model.text_backbone.pretrained=null", "model.text_backbone.freeze_layers=null", "model.text_backbone.hidden_size=64",
             "model.text_backbone.embedding_dim=32", "model.text_backbone.min_count=1", "data.augment.random_erasing=0.3",
             "eval.rerank=rvn", "eval.rvn_neighbours=3")
    straight = train(tiny_config(tiny_synthetic, tmp_path / "a", *extra, "trainer.run_name=straight"))

    interrupted_config = tiny_config(tiny_synthetic, tmp_path / "b", *extra, "trainer.run_name=resumed")
    with pytest.raises(SimulatedKill):
        train(interrupted_config, extra_callbacks=[StopAfterFirstEpoch()])
    run_dir = tmp_path / "b" / "resumed"
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 0
    resumed = train(interrupted_config, resume=run_dir)

    a = read_checkpoint(straight.last_checkpoint)["state_dict"]
    b = read_checkpoint(resumed.last_checkpoint)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], msg=f"parameter {key} differs after resume")
        else:  # extra state, e.g. the Bi-LSTM vocabulary
            assert a[key] == b[key], key
    assert straight.report["checkpoints"]["last"]["test"] == resumed.report["checkpoints"]["last"]["test"]

    # The config's eval section decides how validation, the test report and `tbps eval` score.
    from tbps.cli.main import app
    from tbps.data.readers import load_dataset
    from tbps.evaluation.evaluator import evaluate_split

    assert straight.report["scoring"] == {"rerank": "rvn", "top_k": 128, "rvn_neighbours": 3}
    assert straight.report["checkpoints"]["last"]["eval_seconds"] > 0
    method, _ = load_method(straight.last_checkpoint)
    records = load_dataset("cuhk-pedes", tiny_synthetic).split("test")
    reranked = evaluate_split(method, records, [64, 32], rerank="rvn", rvn_neighbours=3)
    assert reranked["R1"] == pytest.approx(straight.report["checkpoints"]["last"]["test"]["R1"])
    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(app, ["eval", "--checkpoint", str(straight.last_checkpoint), "--json", str(out)])
    assert cli.exit_code == 0, cli.output
    payload = json.loads(out.read_text())
    assert payload["rerank"] == "rvn"
    assert payload["metrics"]["text-to-image"]["mAP"] == pytest.approx(reranked["mAP"])


def test_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_method(missing)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_method(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a tbps checkpoint"):
        load_method(foreign)


@pytest.mark.slow
def test_wrong_method_checkpoint_is_refused(tiny_synthetic, tiny_config, tmp_path):
    config = tiny_config(tiny_synthetic, tmp_path / "runs", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                         "model.text_backbone.name=bilstm", "model.text_backbone.pretrained=null", "model.text_backbone.freeze_layers=null", "model.text_backbone.min_count=1", "trainer.run_name=w")
    result = train(config)
    with pytest.raises(CheckpointError, match="holds method 'baseline'"):
        load_method(result.last_checkpoint, expected_method="nafs")
    method, _ = load_method(result.last_checkpoint, expected_method="baseline")
    assert not method.training


# --------------------------------------------------------------------------- learning-rate schedule
# The lr the optimiser actually applies, read from its parameter groups: by driving the scheduler
# the engine builds, and through a real Lightning fit of the engine's module.

OPTIM = {"scheduler": "cosine", "warmup_epochs": 1, "milestones": [2, 4], "gamma": 0.1, "min_lr_ratio": 0.1}


def _applied_lrs(optim: dict, *, max_epochs: int = 6, steps_per_epoch: int = 10) -> list[tuple[float, float]]:
    """(new, backbone) lr of every optimisation step of a run, as the optimiser applies them."""
    parameters = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": parameters[:1], "lr": 1e-3}, {"params": parameters[1:], "lr": 1e-4}])
    scheduler = build_lr_scheduler(optimizer, optim, max_epochs=max_epochs, steps_per_epoch=steps_per_epoch)
    applied = []
    for _ in range(max_epochs * steps_per_epoch):
        applied.append(tuple(group["lr"] for group in optimizer.param_groups))
        optimizer.step()
        scheduler.step()  # Lightning's order for interval "step"
    return applied


def _cosine(progress: float, floor: float = 0.1) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    "optim, expected",
    [
        # 10 steps per epoch, 6 epochs; warm-up = 1 epoch = 10 steps, (s + 1) / 10.
        ({**OPTIM, "scheduler": "cosine"},
         {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 35: _cosine(25 / 50), 59: _cosine(49 / 50)}),
        ({**OPTIM, "scheduler": "multistep"},  # warm-up, then x0.1 at epochs 2 and 4
         {0: 0.1, 4: 0.5, 9: 1.0, 19: 1.0, 20: 0.1, 39: 0.1, 40: 0.01, 59: 0.01}),
        ({**OPTIM, "scheduler": "constant", "warmup_epochs": 0.5},
         {0: 0.2, 3: 0.8, 4: 1.0, 30: 1.0, 59: 1.0}),
        ({**OPTIM, "scheduler": "multistep", "warmup_epochs": 0},  # no warm-up: full lr from step 0
         {0: 1.0, 19: 1.0, 20: 0.1, 40: 0.01}),
        # A paper's 70-epoch schedule (10 warm-up, x0.1 at 30 and 50) scaled to 6 epochs: the
        # fractions are kept, not truncated to epochs 2 and 4.
        ({**OPTIM, "scheduler": "multistep", "warmup_epochs": 10 / 70 * 6, "milestones": [30 / 70 * 6, 50 / 70 * 6]},
         {0: 1 / 8, 7: 1.0, 20: 1.0, 25: 1.0, 26: 0.1, 42: 0.1, 43: 0.01, 59: 0.01}),
    ],
    ids=["cosine", "multistep", "constant", "multistep-no-warmup", "multistep-fractional"],
)
def test_schedule_lr_applied_per_step(optim, expected):
    applied = _applied_lrs(optim)
    for step, factor in expected.items():
        assert applied[step] == pytest.approx((1e-3 * factor, 1e-4 * factor), rel=1e-6), (step, applied[step])


def test_schedule_restart_runs_warmup_and_cosine_again():
    """``restart_epochs: [4]`` of 6 epochs (LAIP's stage 2): epochs 0-3 are one warm-up + cosine
    down towards 0.1, epochs 4-5 a second one over their 20 steps, from the full lr again."""
    applied = [new for new, _ in _applied_lrs({**OPTIM, "restart_epochs": [4]})]
    expected = {0: 0.1, 9: 1.0, 10: 1.0, 25: _cosine(15 / 30), 39: _cosine(29 / 30),
                40: 0.1, 44: 0.5, 49: 1.0, 50: 1.0, 55: _cosine(5 / 10), 59: _cosine(9 / 10)}
    for step, factor in expected.items():
        assert applied[step] == pytest.approx(1e-3 * factor, rel=1e-6), (step, applied[step])
    assert applied[39] < 0.11e-3 and applied[40] == pytest.approx(0.1e-3)  # the restart's first step
    # Without the restart the same steps are the tail of one cosine (0.41 -> 0.10 of the lr here,
    # 0.33 -> 0.10 at the paper's 30 + 15 epochs).
    single = [new for new, _ in _applied_lrs(OPTIM)]
    assert single[40] == pytest.approx(1e-3 * _cosine(30 / 50)) and single[40] < 0.42e-3
    # Multistep: milestones before a restart do not carry over; later ones decay the new segment.
    multistep = [new for new, _ in _applied_lrs({**OPTIM, "scheduler": "multistep", "milestones": [2, 5], "restart_epochs": [3]})]
    assert multistep[29] == pytest.approx(0.1e-3) and multistep[30] == pytest.approx(0.1e-3)  # ramp restarts at 1/10
    assert multistep[39] == pytest.approx(1e-3) and multistep[50] == pytest.approx(0.1e-3)


def test_schedule_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="restart_epochs: epoch 6 is outside"):
        EpochSchedule("cosine", steps_per_epoch=10, max_epochs=6, restart_epochs=[6])
    with pytest.raises(ValueError, match="whole epochs"):
        EpochSchedule("cosine", steps_per_epoch=10, max_epochs=6, restart_epochs=[2.5])
    with pytest.raises(ValueError, match="optim.scheduler must be one of"):
        EpochSchedule("step", steps_per_epoch=10, max_epochs=6)
    # A restart at epoch 0 is the start of the run: the same schedule as none.
    zero = EpochSchedule("cosine", steps_per_epoch=10, max_epochs=6, warmup_epochs=1, restart_epochs=[0])
    plain = EpochSchedule("cosine", steps_per_epoch=10, max_epochs=6, warmup_epochs=1)
    assert [zero(s) for s in range(60)] == [plain(s) for s in range(60)]


def test_old_multistep_checkpoint_resumes_at_its_step():
    """A checkpoint written when multistep was a per-epoch MultiStepLR (3 epochs done, 30 steps)
    continues at step 30 of the per-step schedule, not at step 3."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    old_optimizer = torch.optim.Adam([parameter], lr=1e-3)
    old = torch.optim.lr_scheduler.MultiStepLR(old_optimizer, milestones=[2, 4], gamma=0.1)
    for _ in range(3):
        old_optimizer.step()
        old.step()
    checkpoint = {"global_step": 30, "lr_schedulers": [old.state_dict()]}
    upgrade_scheduler_states(checkpoint)
    optimizer = torch.optim.Adam([parameter], lr=1e-3)
    scheduler = build_lr_scheduler(optimizer, {**OPTIM, "scheduler": "multistep"}, max_epochs=6, steps_per_epoch=10)
    scheduler.load_state_dict(checkpoint["lr_schedulers"][0])
    optimizer.step()
    scheduler.step()  # step 31
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # epoch 3: one milestone passed, warm-up over
    scheduler.step()
    assert scheduler.last_epoch == 32


class RecordLearningRates(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])


class CheapStepModule(PersonSearchModule):
    """The engine's module (its optimiser, parameter groups and scheduler) with a training step
    that only touches one parameter of each group: the schedule does not depend on the loss."""

    def training_step(self, batch, batch_idx):
        groups = self.method.parameter_groups()
        return sum(group[0].sum() for group in (groups["new"], groups["backbone"])) * 0.0 + batch.sum() * 0.0


@pytest.mark.usefixtures("single_thread")
def test_lightning_fit_applies_warmup_multistep_and_restart(tmp_path):
    """A real Lightning fit of the engine's module (2 batches an epoch, 4 epochs): multistep with
    1 warm-up epoch, x0.1 at epoch 2, a restart at epoch 3, all set as command-line overrides."""
    from tbps.config import load_config

    config = load_config("baseline/synthetic", [
        "data.image_size=[64,32]", "model.embed_dim=16", "model.image_backbone.pretrained=false",
        "model.text_backbone.name=bilstm", "model.text_backbone.pretrained=null", "model.text_backbone.freeze_layers=null", "model.text_backbone.min_count=1", "model.text_backbone.embedding_dim=16",
        "model.text_backbone.hidden_size=16", "optim.lr=1e-3", "optim.backbone_lr_mult=0.1", "optim.scheduler=multistep",
        "optim.milestones=[2]", "optim.warmup_epochs=1", "optim.restart_epochs=[3]", "trainer.max_epochs=4",
    ])
    module = CheapStepModule(config, num_classes=4)
    recorder = RecordLearningRates()
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder],
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1))
    factors = [1 / 2, 1, 1, 1, 0.1, 0.1, 1 / 2, 1]  # epochs 0-3, two steps each
    assert len(recorder.lrs) == 8
    for step, (lrs, factor) in enumerate(zip(recorder.lrs, factors)):
        assert lrs == pytest.approx([1e-3 * factor, 1e-4 * factor], rel=1e-6), (step, lrs)
