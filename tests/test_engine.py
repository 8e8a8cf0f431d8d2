"""End-to-end: train -> checkpoint -> eval, exact resume, checkpoint validation, CLI."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from typer.testing import CliRunner

from tbps.engine.checkpoint import CheckpointError, load_method, read_checkpoint
from tbps.engine.train import train


class StopAfterFirstEpoch(L.Callback):
    """Simulates a run killed after its first checkpoint."""

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_train_then_eval_beats_chance(tiny_synthetic, tiny_config, tmp_path):
    config = tiny_config(tiny_synthetic, tmp_path / "runs", "trainer.max_epochs=4", "trainer.run_name=e2e", "optim.lr=2e-3")
    result = train(config)

    # Files a run promises: resolved config, best/last checkpoints, logs, report.
    assert (result.run_dir / "config.yaml").is_file()
    assert result.last_checkpoint.is_file() and result.best_checkpoint is not None
    assert result.history_csv.is_file()
    report = json.loads((result.run_dir / "report.json").read_text())
    assert set(report["checkpoints"]) == {"best", "last"}
    assert report["checkpoints"]["last"]["epoch"] == 4
    stats = report["dataset_stats"]["test"]
    chance_r1 = 100.0 / stats["identities"]

    test_r1 = report["checkpoints"]["best"]["test"]["R1"]
    assert test_r1 > 3 * chance_r1, f"test R@1 {test_r1:.1f} is not well above chance {chance_r1:.1f}"

    # The checkpoint carries its config and rebuilds the same method without the YAML file.
    checkpoint = read_checkpoint(result.last_checkpoint)
    assert checkpoint["tbps"]["method"] == "baseline"
    assert checkpoint["tbps"]["config"]["data"]["image_size"] == [64, 32]

    # `tbps eval` reproduces the report's numbers and writes per-query ranks.
    from tbps.cli.main import app

    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(app, ["eval", "--checkpoint", str(result.last_checkpoint), "--json", str(out), "--i2t"])
    assert cli.exit_code == 0, cli.output
    payload = json.loads(out.read_text())
    assert payload["metrics"]["text-to-image"]["R1"] == pytest.approx(report["checkpoints"]["last"]["test"]["R1"])
    assert "image-to-text" in payload["metrics"]
    assert len(payload["per_query"]) == stats["captions"]
    assert all(1 <= q["first_hit_rank"] <= stats["images"] for q in payload["per_query"])


@pytest.mark.slow
def test_resume_continues_exactly(tiny_synthetic, tiny_config, tmp_path):
    # A Bi-LSTM text encoder keeps this fast and also checks that its vocabulary travels in
    # the checkpoint.
    extra = ("trainer.max_epochs=2", "model.text_backbone.name=bilstm", "model.text_backbone.hidden_size=64",
             "model.text_backbone.embedding_dim=32", "model.text_backbone.min_count=1", "data.augment.random_erasing=0.3")
    straight = train(tiny_config(tiny_synthetic, tmp_path / "a", *extra, "trainer.run_name=straight"))

    interrupted_config = tiny_config(tiny_synthetic, tmp_path / "b", *extra, "trainer.run_name=resumed")
    first = train(interrupted_config, extra_callbacks=[StopAfterFirstEpoch()])
    assert read_checkpoint(first.last_checkpoint)["epoch"] == 0
    resumed = train(interrupted_config, resume=first.run_dir)

    a = read_checkpoint(straight.last_checkpoint)["state_dict"]
    b = read_checkpoint(resumed.last_checkpoint)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=f"parameter {key} differs after resume")
    assert straight.report["checkpoints"]["last"]["test"] == resumed.report["checkpoints"]["last"]["test"]


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
                         "model.text_backbone.name=bilstm", "model.text_backbone.min_count=1", "trainer.run_name=w")
    result = train(config)
    with pytest.raises(CheckpointError, match="holds method 'baseline'"):
        load_method(result.last_checkpoint, expected_method="nafs")
    method, _ = load_method(result.last_checkpoint, expected_method="baseline")
    assert not method.training
