"""End-to-end: train -> checkpoint -> eval, exact resume, checkpoint validation, CLI."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from typer.testing import CliRunner

from tbps.engine.checkpoint import CheckpointError, load_method, read_checkpoint
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
        "model.text_backbone.name=bilstm", "model.text_backbone.min_count=1", "model.text_backbone.hidden_size=128",
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


@pytest.mark.slow
def test_resume_continues_exactly(tiny_synthetic, tiny_config, tmp_path):
    # A Bi-LSTM text encoder keeps this fast and also checks that its vocabulary travels in
    # the checkpoint.
    extra = ("trainer.max_epochs=2", "model.text_backbone.name=bilstm", "model.text_backbone.hidden_size=64",
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
                         "model.text_backbone.name=bilstm", "model.text_backbone.min_count=1", "trainer.run_name=w")
    result = train(config)
    with pytest.raises(CheckpointError, match="holds method 'baseline'"):
        load_method(result.last_checkpoint, expected_method="nafs")
    method, _ = load_method(result.last_checkpoint, expected_method="baseline")
    assert not method.training
