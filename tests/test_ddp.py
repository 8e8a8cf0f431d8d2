"""Two-process DDP (Lightning, gloo, CPU) through the real ``train()`` (issue 15, items 16-17).

One launch runs this file as a script (``python tests/test_ddp.py WORKDIR DATA_ROOT``) with
``trainer.devices=2, strategy=ddp...``: Lightning's subprocess launcher re-runs the script for
rank 1, exactly as it re-runs ``tbps train`` in production, so each rank builds its own config,
its own timestamp and its own Trainer. The script trains twice in the same two processes:

1. the tiny baseline (CMPM only: the batch-level loss, all-gathered across ranks) for 2 steps
   and one validation, with no ``run_name`` (a timestamped run directory). Each rank records
   its first batch, the weights before the first step, the gradients DDP hands the optimiser,
   its validation features and metrics, and the run directory ``train()`` returned;
2. the same model with a loss made NaN on rank 1 only, at its second batch: both ranks must
   stop with the engine's FloatingPointError, none may hang in the next collective.

The tests then check, in this (single) process: the DDP gradients equal the gradient of the
loss on the two ranks' batches concatenated; validation is the same on both ranks; one run
directory exists and both ranks name it; both ranks raised and exited.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORLD_SIZE = 2
BATCH_SIZE = 8  # per rank: the gathered batch-level loss sees 16 pairs
LAUNCH_TIMEOUT_S = 240  # a hang fails the test instead of blocking the suite
POISONED_RANK, POISONED_BATCH = 1, 1
# Variables a surrounding distributed job would set: the launch must start a fresh world.
DISTRIBUTED_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                         "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED")


# --------------------------------------------------------------------------- the two ranks (script)


def _config(data_root: Path, output_dir: Path, *extra: str) -> dict:
    from tbps.config import load_config, to_container

    return to_container(load_config("baseline/synthetic", [
        f"data.root={data_root}", "data.image_size=[64,32]", f"data.batch_size={BATCH_SIZE}", "data.eval_batch_size=64",
        "data.num_workers=0", "data.sampler=random", "data.augment.padding=2",
        "model.embed_dim=16", "model.image_backbone.pretrained=false", "model.text_backbone.name=bilstm", "model.text_backbone.pretrained=null", "model.text_backbone.freeze_layers=null",
        "model.text_backbone.min_count=1", "model.text_backbone.embedding_dim=16", "model.text_backbone.hidden_size=16",
        # CMPM alone: the batch-level loss under test (CMPC's classifier then gets no gradient,
        # hence find_unused_parameters).
        "model.losses.cmpm=1.0", "model.losses.cmpc=0.0",
        "trainer.accelerator=cpu", f"trainer.devices={WORLD_SIZE}", "trainer.strategy=ddp_find_unused_parameters_true",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
        f"trainer.output_dir={output_dir}", *extra,
    ]))


def _run_ranks(workdir: Path, data_root: Path) -> None:
    import lightning as L

    from tbps.engine.train import train
    from tbps.methods.baseline import GlobalBaseline
    from tbps.models.registry import register_method

    torch.set_num_threads(1)

    class Record(L.Callback):
        """What each rank saw and computed during the first run."""

        def __init__(self) -> None:
            self.rank = -1
            self.seen: dict = {"val": []}

        def setup(self, trainer, module, stage):
            self.rank = trainer.global_rank

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 0:
                self.seen["initial_state"] = {k: v.detach().clone() for k, v in module.method.state_dict().items()
                                              if isinstance(v, torch.Tensor)}
                self.seen["batch"] = {"images": batch["images"].clone(), "labels": batch["labels"].clone(),
                                      "text": {k: v.clone() for k, v in batch["text"].items()}}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if "loss" not in self.seen:
                self.seen["loss"] = outputs["loss"].detach().clone()

        def on_before_optimizer_step(self, trainer, module, optimizer):
            # After backward: DDP has averaged the gradients over the ranks.
            if "grads" not in self.seen:
                self.seen["grads"] = {name: parameter.grad.detach().clone() for name, parameter in module.method.named_parameters()
                                      if parameter.grad is not None}

        def on_validation_epoch_end(self, trainer, module):
            # Callbacks run before the module's hook, which ranks these features and clears them.
            features = {}
            for index, name in ((0, "images"), (1, "texts")):
                features[name] = torch.cat([chunk["global"] for chunk in module._val_outputs[index]])
            self.seen["val"].append({"features": features})

        def on_validation_end(self, trainer, module):
            self.seen["val"][-1]["metrics"] = dict(module.last_val_metrics)

    record = Record()
    result = train(_config(data_root, workdir / "runs"), extra_callbacks=[record])
    record.seen["run_dir"] = str(result.run_dir)
    record.seen["last_checkpoint"] = str(result.last_checkpoint)
    torch.save(record.seen, workdir / f"rank{record.rank}.pt")

    # ----- run 2: a non-finite loss on one rank only
    @register_method("ddp_test_poisoned")
    class Poisoned(GlobalBaseline):
        poisoned = False

        def forward(self, batch):
            losses = super().forward(batch)
            if self.poisoned:
                # Only this rank's own loss: the gathered features (and so rank 0's loss) stay finite.
                losses["cmpm"] = losses["cmpm"] + float("nan")
            return losses

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            module.method.poisoned = trainer.global_rank == POISONED_RANK and batch_idx == POISONED_BATCH

    config = _config(data_root, workdir / "runs-nonfinite", "trainer.run_name=nonfinite", "trainer.limit_train_batches=4")
    config["method"] = "ddp_test_poisoned"
    rank = record.rank
    try:
        train(config, extra_callbacks=[Poison()])
    except FloatingPointError as error:
        (workdir / f"rank{rank}-nonfinite.txt").write_text(f"{type(error).__name__}: {error}\n{time.time()}")
        raise SystemExit(3) from None
    (workdir / f"rank{rank}-nonfinite.txt").write_text("no error")


# --------------------------------------------------------------------------- the launch (pytest)


@pytest.fixture(scope="module")
def ddp_run(tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("ddp")
    env = {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_VARIABLES}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    started = time.time()
    # Its own session: on a hang, the whole process group (rank 0 and the rank Lightning
    # launched) is killed, not just rank 0.
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(workdir), str(tiny_synthetic)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        # The output pipe closes only when every process holding it (both ranks) has exited.
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        timed_out = True
    text = output.decode(errors="replace")
    ranks = [torch.load(path, weights_only=True) if (path := workdir / f"rank{r}.pt").is_file() else None for r in range(WORLD_SIZE)]
    return {"workdir": workdir, "returncode": process.returncode, "timed_out": timed_out, "seconds": time.time() - started,
            "ended": time.time(), "output": text, "ranks": ranks}


def _first_run(ddp_run: dict) -> list[dict]:
    missing = [rank for rank, seen in enumerate(ddp_run["ranks"]) if seen is None]
    assert not missing, f"rank(s) {missing} did not finish the first run:\n{ddp_run['output'][-6000:]}"
    return ddp_run["ranks"]


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")  # as each rank: the same summation order
def test_ddp_gathered_loss_gradients_equal_single_process_gradients(ddp_run):
    from tbps.engine.checkpoint import load_method
    from tbps.engine.module import seed_batch
    from tbps.losses import cmpm_loss

    ranks = _first_run(ddp_run)
    # The method as it was before the first step (the weights DDP broadcast from rank 0).
    method, config = load_method(ranks[0]["last_checkpoint"])
    for name, value in ranks[1]["initial_state"].items():
        assert torch.equal(value, ranks[0]["initial_state"][name]), f"ranks started from different {name}"
    method.load_state_dict({**method.state_dict(), **ranks[0]["initial_state"]})
    method.train()
    method.zero_grad()
    # One process, the loss on the concatenated batch. Each rank's chunk is encoded on its own,
    # with that rank's random draws (drop-connect), as DDP did: a batch norm in training mode
    # normalises a rank's batch with its own statistics (no SyncBatchNorm), which is not the
    # question here; the batch-level loss and its gradient scale are.
    images, texts, labels = [], [], []
    for rank, seen in enumerate(ranks):
        seed_batch(int(config["seed"]), epoch=0, batch_idx=0, rank=rank)
        images.append(method.encode_image(seen["batch"]["images"])["global"])
        texts.append(method.encode_text(seen["batch"]["text"])["global"])
        labels.append(seen["batch"]["labels"])
    loss = cmpm_loss(torch.cat(images), torch.cat(texts), torch.cat(labels))
    loss.backward()
    reference = {name: p.grad for name, p in method.named_parameters() if p.grad is not None}

    for rank, seen in enumerate(ranks):
        # Every rank computed the loss of the whole (gathered) batch.
        assert float(seen["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5), rank
        assert set(seen["grads"]) == set(reference), rank
    for name in reference:
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), f"DDP left different gradients of {name}"
    got = torch.cat([ranks[0]["grads"][name].flatten() for name in reference])
    expected = torch.cat([gradient.flatten() for gradient in reference.values()])
    # A gradient off by the world size would be 2x or 0.5x the reference. Measured: 5e-10 with one
    # thread per process as here (several threads sum in other orders, and the tiny batch norms
    # amplify that to ~2e-3).
    assert float(got.norm() / expected.norm()) == pytest.approx(1.0, abs=1e-4)
    assert float((got - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.slow
def test_ddp_validation_is_the_same_on_every_rank(ddp_run):
    ranks = _first_run(ddp_run)
    assert len(ranks[0]["val"]) == len(ranks[1]["val"]) == 1
    first, second = ranks[0]["val"][0], ranks[1]["val"][0]
    assert first["metrics"] and first["metrics"] == second["metrics"]
    for name in ("images", "texts"):
        # Every rank encodes the whole val split (no sharding), with the same weights and the
        # same batch-norm statistics.
        assert torch.allclose(first["features"][name], second["features"][name], rtol=1e-5, atol=1e-6), name


@pytest.mark.slow
def test_ddp_creates_one_run_directory(ddp_run):
    ranks = _first_run(ddp_run)
    run_dirs = sorted(path for path in (ddp_run["workdir"] / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    assert [Path(seen["run_dir"]) for seen in ranks] == [run_dirs[0]] * WORLD_SIZE
    assert (run_dirs[0] / "config.yaml").is_file() and (run_dirs[0] / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ddp_nonfinite_loss_on_one_rank_stops_every_rank(ddp_run):
    _first_run(ddp_run)
    assert not ddp_run["timed_out"], f"a rank hung after the non-finite loss:\n{ddp_run['output'][-6000:]}"
    assert ddp_run["returncode"] == 3, ddp_run["output"][-6000:]
    for rank in range(WORLD_SIZE):
        path = ddp_run["workdir"] / f"rank{rank}-nonfinite.txt"
        assert path.is_file(), f"rank {rank} did not stop with a FloatingPointError:\n{ddp_run['output'][-6000:]}"
        message, stopped = path.read_text().rsplit("\n", 1)
        assert message.startswith("FloatingPointError: non-finite loss"), message
        assert f"rank(s) [{POISONED_RANK}]" in message, message
        # Both raised right away, not after a collective's timeout.
        assert ddp_run["ended"] - float(stopped) < 60


def test_nonfinite_loss_stops_a_single_process_run_with_the_losses_named():
    """Without DDP the check raises on the one process, naming it and its losses; a finite loss passes."""
    from tbps.engine.module import PersonSearchModule

    module = PersonSearchModule(_config(Path("unused"), Path("unused"), "trainer.devices=1"), num_classes=4)
    module.stop_if_not_finite(torch.tensor(1.5), {"cmpm": torch.tensor(1.5)})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0 on rank\(s\) \[0\] of 1.*'cmpm': inf"):
        module.stop_if_not_finite(torch.tensor(float("inf")), {"cmpm": torch.tensor(float("inf"))})


if __name__ == "__main__":
    _run_ranks(Path(sys.argv[1]), Path(sys.argv[2]))
