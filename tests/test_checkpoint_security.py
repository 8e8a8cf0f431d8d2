"""Reading a checkpoint or a weights file never runs code (weights_only=True everywhere), and
tbps only ever writes checkpoints that load that way."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from search_fixtures import write_code_running_checkpoint
from typer.testing import CliRunner

from tbps.engine.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    UnsafeCheckpointError,
    check_plain_data,
    load_method,
    read_checkpoint,
)


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def test_a_checkpoint_whose_pickle_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = write_code_running_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="was refused: its pickle needs Python objects"):
        read_checkpoint(evil)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        load_method(evil)
    assert not marker.exists()
    # The payload is real: a plain unpickler runs it (shown on the object itself, since a full
    # torch.load is exactly what tbps must never do).
    from search_fixtures import _CreatesFileWhenUnpickled

    proof = tmp_path / "plain-unpickler-ran"
    pickle.loads(pickle.dumps(_CreatesFileWhenUnpickled(proof)))
    assert proof.exists()


def test_lightning_resume_loading_is_weights_only_whatever_torch_is_told(tmp_path: Path, monkeypatch) -> None:
    """``trainer.fit(ckpt_path=...)`` reads through the checkpoint plugin; the environment
    variable that flips torch.load's default to a full unpickler must not reach it."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code-ran"
    evil = write_code_running_checkpoint(tmp_path / "last.ckpt", marker)
    io = AtomicCheckpointIO()
    with pytest.raises(UnsafeCheckpointError, match="was refused"):
        io.load_checkpoint(evil)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        io.load_checkpoint(evil, weights_only=False)
    assert not marker.exists()


def test_train_resume_refuses_a_code_running_checkpoint(tmp_path: Path, tiny_config) -> None:
    from tbps.cli.main import app
    from tbps.engine.train import train

    marker = tmp_path / "code-ran"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    write_code_running_checkpoint(run_dir / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError):
        train(tiny_config(tmp_path / "data", tmp_path / "runs"), resume=run_dir)
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir)])
    assert result.exit_code == 2 and "was refused" in _flat(result.output)
    assert not marker.exists()


@pytest.mark.slow  # shares the search tests' tiny trained checkpoint
def test_a_real_training_checkpoint_is_plain_data(search_checkpoint: Path) -> None:
    """What train() writes (optimizer and scheduler states, callback and loop states, hyper-
    parameters, tbps metadata) loads with weights_only=True, through tbps and through Lightning."""
    checkpoint = torch.load(search_checkpoint, map_location="cpu", weights_only=True)
    assert {"optimizer_states", "lr_schedulers", "callbacks", "loops", "hyper_parameters", "tbps"} <= set(checkpoint)
    check_plain_data(checkpoint)
    through_lightning = AtomicCheckpointIO().load_checkpoint(search_checkpoint)
    assert through_lightning["tbps"]["config"] == read_checkpoint(search_checkpoint)["tbps"]["config"]


def test_saving_anything_but_plain_data_is_refused(tmp_path: Path) -> None:
    from lightning.fabric.utilities.data import AttributeDict

    io = AtomicCheckpointIO()
    target = tmp_path / "out.ckpt"
    with pytest.raises(CheckpointError, match=r"checkpoint\['hyper_parameters'\] is a lightning.*AttributeDict"):
        io.save_checkpoint({"state_dict": {}, "hyper_parameters": AttributeDict(lr=1.0)}, target)
    with pytest.raises(CheckpointError, match=r"checkpoint\['tbps'\]\['config'\]\['root'\] is a pathlib"):
        io.save_checkpoint({"tbps": {"config": {"root": Path("/data")}}}, target)
    assert not target.exists()
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([weight])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4])  # milestones: a Counter
    plain = {"state_dict": OrderedDict(w=weight.detach()), "epoch": 3, "meta": {"sizes": (1, 2), "name": None, "dtype": torch.float16},
             "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [scheduler.state_dict()]}
    io.save_checkpoint(plain, target)
    loaded = torch.load(target, weights_only=True)
    assert loaded["epoch"] == 3 and loaded["meta"]["dtype"] == torch.float16
    assert loaded["lr_schedulers"][0]["milestones"] == {2: 1, 4: 1}


def test_a_weights_file_whose_pickle_runs_code_is_refused(tmp_path: Path) -> None:
    from tbps.models.backbones.common import load_state_dict_file

    marker = tmp_path / "code-ran"
    evil = write_code_running_checkpoint(tmp_path / "backbone.pth", marker, like={"state_dict": {"w": torch.ones(1)}})
    with pytest.raises(ValueError, match="was refused: its pickle needs Python objects"):
        load_state_dict_file(evil)
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "plain.pth")
    assert torch.equal(load_state_dict_file(tmp_path / "plain.pth")["w"], torch.ones(1))
