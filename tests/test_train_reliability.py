"""Training reliability (issue 15, items 9, 12, 14, 18, 19): a killed run resumes with its whole
history, a crashing validation loses no epoch, bad data / settings fail before any training with
a message naming what to change, ``--resume`` changes only what it may, and the val carve-out
does not depend on the training seed."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tbps.cli.main import app
from tbps.data.checks import MissingImagesError, require_images
from tbps.data.readers import load_dataset, val_split_seed
from tbps.engine.checkpoint import read_checkpoint
from tbps.engine.train import load_run_dataset, prepare_config, resume_config, train

pytestmark = pytest.mark.usefixtures("single_thread")

# A Bi-LSTM, a random frozen image backbone and three batches an epoch: a run takes seconds.
FAST = (
    "model.embed_dim=32",
    "model.text_backbone.name=bilstm", "model.text_backbone.pretrained=null", "model.text_backbone.freeze_layers=null",
    "model.text_backbone.min_count=1",
    "model.text_backbone.hidden_size=32",
    "model.text_backbone.embedding_dim=16",
    "model.image_backbone.pretrained=false",
    "model.image_backbone.freeze_stages=4",
    "trainer.limit_train_batches=3",
)


def read_history(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def epochs_with(rows: list[dict[str, str]], column: str) -> set[int]:
    return {int(float(row["epoch"])) for row in rows if column in row and "epoch" in row}


def assert_no_repeated_rows(rows: list[dict[str, str]]) -> None:
    keys = [(row["step"], frozenset(row)) for row in rows]
    assert len(keys) == len(set(keys)), "a step was logged twice with the same columns"


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def icfg_dataset(source: Path, target: Path) -> Path:
    """The tiny synthetic benchmark in the ICFG-PEDES layout: train and test only (its val
    identities join train), images shared through a symlink."""
    target.mkdir(parents=True)
    records = json.loads((source / "reid_raw.json").read_text())
    for record in records:
        record["split"] = "test" if record["split"] == "test" else "train"
    (target / "ICFG-PEDES.json").write_text(json.dumps(records))
    (target / "imgs").symlink_to(source / "imgs", target_is_directory=True)
    return target


@pytest.fixture(scope="module")
def icfg_root(tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return icfg_dataset(tiny_synthetic, tmp_path_factory.mktemp("icfg") / "ICFG-PEDES")


@pytest.fixture(scope="module")
def icfg_run(icfg_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One finished ICFG-format run with training seed 1 (and the default val_split_seed)."""
    from conftest import _tiny_config

    out = tmp_path_factory.mktemp("icfg-runs")
    config = _tiny_config(icfg_root, out, *FAST, "data.dataset=icfg-pedes", "seed=1", "trainer.max_epochs=1",
                          "trainer.run_name=icfg")
    return train(config)


# --------------------------------------------------------------------------- item 9: history survives a kill


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["epoch_end", "before_validation"])
def test_killed_run_resumes_with_its_whole_history(tiny_synthetic: Path, tmp_path: Path, kill_at: str) -> None:
    """A real `tbps train` killed with SIGKILL once a last.ckpt of stage `kill_at` exists, then
    `tbps train --resume`: metrics.csv holds train and val rows of every epoch, the rows written
    before the kill unchanged, and no step twice.

    The child is stopped (SIGSTOP) the moment such a checkpoint is seen, and the checkpoint is
    read again while it cannot write: a tiny epoch can go on to the next save while the test
    reads the first, and what the resume must do depends on which checkpoint the kill left (a run
    resumed from a pre-validation checkpoint does not validate that epoch again, by design; its
    val row is there only if the validation had finished and logged it before the kill)."""
    run_dir = tmp_path / "runs" / "killed"
    overrides = [
        f"data.root={tiny_synthetic}", "data.image_size=[64,32]", "data.batch_size=16", "data.eval_batch_size=64",
        "data.num_workers=0", f"trainer.output_dir={tmp_path / 'runs'}", "trainer.run_name=killed",
        "trainer.progress_bar=false", "trainer.log_every_n_steps=1", "trainer.max_epochs=4", *FAST,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    last = run_dir / "checkpoints" / "last.ckpt"
    with open(tmp_path / "first.log", "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "tbps", "train", *overrides], stdout=output, stderr=subprocess.STDOUT, env=env)
        at_kill = None
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if last.is_file() and read_checkpoint(last)["callbacks"].get("EpochCheckpoints", {}).get("stage") == kill_at:
                process.send_signal(signal.SIGSTOP)
                # Checkpoints are written through a temporary file and a rename: a stopped child
                # leaves either the old last.ckpt or the new one, whole.
                at_kill = read_checkpoint(last)["callbacks"]["EpochCheckpoints"]
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        process.wait(timeout=60)
    first_log = (tmp_path / "first.log").read_text()
    assert process.returncode == -signal.SIGKILL, first_log[-3000:]
    # What `tbps train` prints is the run's, not the libraries' tips and notices.
    for notice in ("GPU available", "Tip:", "in eval mode", "LeafSpec", "logging interval"):
        assert notice not in first_log, first_log
    assert at_kill is not None and at_kill["epoch"] < 3 and not (run_dir / "report.json").exists()
    before = read_history(run_dir / "logs" / "metrics.csv")
    # The epoch the kill interrupted (the one after an epoch-end checkpoint; the one whose
    # validation had not run after a pre-validation checkpoint), and the epochs finished before it.
    if at_kill["stage"] == "epoch_end":
        interrupted, not_validated = at_kill["epoch"] + 1, set()
    else:
        assert at_kill["stage"] == "before_validation", at_kill
        interrupted, not_validated = at_kill["epoch"], {at_kill["epoch"]}
    assert set(range(interrupted)) <= epochs_with(before, "train/loss_step")
    assert set(range(interrupted)) <= epochs_with(before, "val/R1")

    resumed = CliRunner().invoke(app, ["train", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    after = read_history(run_dir / "logs" / "metrics.csv")
    assert epochs_with(after, "train/loss_step") == {0, 1, 2, 3}
    assert epochs_with(after, "val/R1") == ({0, 1, 2, 3} - not_validated) | (epochs_with(before, "val/R1") & not_validated)
    # The epoch-level loss row is logged just after an epoch's last checkpoint and flushed when the
    # next epoch starts: a kill between the two loses that one row, not replayed (and an epoch
    # resumed after its pre-validation checkpoint never reaches its epoch end).
    assert epochs_with(after, "train/loss_epoch") >= {0, 1, 2, 3} - {at_kill["epoch"]}
    assert_no_repeated_rows(after)
    # What was on disk for the finished epochs is still there, as written.
    finished = [row for row in before if "epoch" not in row or int(float(row["epoch"])) < interrupted]
    assert all(row in after for row in finished)
    steps = [int(row["step"]) for row in after if "train/loss_step" in row]
    assert steps == sorted(steps) and len(steps) == 4 * 3  # 4 epochs x limit_train_batches
    assert json.loads((run_dir / "report.json").read_text())["checkpoints"]["last"]["epoch"] == 4


def test_history_writer_extends_replaces_and_never_truncates(tmp_path: Path) -> None:
    from tbps.engine.train import HistoryWriter

    log_dir = tmp_path / "logs"
    first = HistoryWriter(str(log_dir), resume=False)
    for step in range(4):
        first.log_metrics({"epoch": 0 if step < 2 else 1, "train/loss_step": 1.0 / (step + 1)}, step)
    first.save()
    path = log_dir / "metrics.csv"
    assert path.read_text().splitlines()[0] == "epoch,step,train/loss_step"
    # The killed run logged steps 2-3 after its checkpoint; the resumed run replays them and adds
    # a column (val/R1) the file did not have.
    resumed = HistoryWriter(str(log_dir), resume=True)
    resumed.log_metrics({"epoch": 1, "train/loss_step": 0.3}, 2)
    resumed.log_metrics({"epoch": 1, "train/loss_step": 0.2}, 3)
    resumed.log_metrics({"epoch": 1, "val/R1": 42.0}, 3)
    resumed.save()
    rows = read_history(path)
    assert path.read_text().splitlines()[0] == "epoch,step,train/loss_step,val/R1"
    assert [(r["step"], r.get("train/loss_step"), r.get("val/R1")) for r in rows] == [
        ("0", "1.0", None), ("1", "0.5", None), ("2", "0.3", None), ("3", "0.2", None), ("3", None, "42.0")]
    assert [p.name for p in log_dir.iterdir()] == ["metrics.csv"]  # no temporary file left behind
    # A new (not resumed) run in the same directory starts its own history.
    HistoryWriter(str(log_dir), resume=False)
    assert not path.exists()


# --------------------------------------------------------------------------- item 12: images and validation


class FailValidation(L.Callback):
    """A validation that crashes (a bad image, an out-of-memory) in the first epoch."""

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == 0:
            raise RuntimeError("validation crashed")


@pytest.mark.slow
def test_a_crashing_validation_keeps_the_trained_epoch(tiny_synthetic: Path, tmp_path: Path, tiny_config, caplog) -> None:
    config = tiny_config(tiny_synthetic, tmp_path / "runs", *FAST, "trainer.max_epochs=2", "trainer.run_name=v")
    with pytest.raises(RuntimeError, match="validation crashed"):
        train(config, extra_callbacks=[FailValidation()])
    run_dir = tmp_path / "runs" / "v"
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # written before validation
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 3
    state = checkpoint["callbacks"]["EpochCheckpoints"]
    assert {key: state[key] for key in ("stage", "epoch")} == {"stage": "before_validation", "epoch": 0}
    assert state["train_seconds"] > 0
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()
    assert epochs_with(read_history(run_dir / "logs" / "metrics.csv"), "train/loss_step") == {0}
    # The report's train_seconds covers every part of a resumed run: pretend the first part took
    # 1,000 s (a long run stopped by the end of a session).
    state["train_seconds"] = 1000.0
    torch.save(checkpoint, run_dir / "checkpoints" / "last.ckpt")

    with caplog.at_level(logging.WARNING, logger="tbps.engine.train"):
        result = train(None, resume=run_dir)
    assert "epoch 1 is not validated" in caplog.text
    assert read_checkpoint(result.last_checkpoint)["global_step"] == 6  # epoch 0 was not trained again
    history = read_history(result.history_csv)
    assert epochs_with(history, "train/loss_step") == {0, 1}
    assert epochs_with(history, "val/R1") == {1}
    assert result.report["checkpoints"]["best"]["epoch"] == 2
    assert 1000.0 < result.report["train_seconds"] < 1000.0 + 600


def test_missing_val_and_test_images_fail_before_training(tiny_synthetic: Path, tmp_path: Path, tiny_config) -> None:
    root = copy_dataset(tiny_synthetic, tmp_path / "data")
    dataset = load_dataset("cuhk-pedes", root)
    gone = [dataset.split("val")[0].image_path, dataset.split("test")[-1].image_path]
    for path in gone:
        path.unlink()
    total = len({record.image_path for record in dataset.records})
    config = tiny_config(root, tmp_path / "runs", *FAST, "trainer.run_name=m")
    with pytest.raises(MissingImagesError) as error:
        train(config)
    message = str(error.value)
    assert f"2 of {total} images this run reads are missing or empty (train: 0, val: 1, test: 1)" in message
    assert all(str(path) in message for path in gone)
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written

    cli = CliRunner().invoke(app, ["train", f"data.root={root}", f"trainer.output_dir={tmp_path / 'runs'}"])
    assert cli.exit_code == 2 and f"2 of {total} images this run reads are missing" in " ".join(cli.output.split())


def test_check_images_decode_finds_corrupt_files(tiny_synthetic: Path, tmp_path: Path, tiny_config) -> None:
    root = copy_dataset(tiny_synthetic, tmp_path / "data")
    dataset = load_dataset("cuhk-pedes", root)
    corrupt = dataset.split("train")[5].image_path
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    empty = dataset.split("test")[0].image_path
    empty.write_bytes(b"")
    with pytest.raises(MissingImagesError, match=r"1 of \d+ images .* missing or empty \(train: 0, test: 1\).*empty file"):
        require_images(dataset, ("train", "test"))  # the fast check: exists and not empty
    empty.write_bytes(corrupt.read_bytes())
    assert require_images(dataset, ("train", "val", "test")) == len(dataset)
    with pytest.raises(MissingImagesError, match=r"2 of \d+ images this run reads are missing or unreadable"):
        train(tiny_config(root, tmp_path / "runs", *FAST, "data.check_images=decode"))
    with pytest.raises(ValueError, match="data.check_images must be one of exists, decode"):
        train(tiny_config(root, tmp_path / "runs", *FAST, "data.check_images=full"))


# --------------------------------------------------------------------------- item 14: fail early


def write_cuhk(root: Path, identities: dict[str, list[int]]) -> Path:
    """A tiny CUHK-PEDES-format dataset: two images with two captions each per identity."""
    records = []
    for split, ids in identities.items():
        for person in ids:
            for shot in range(2):
                path = root / "imgs" / f"{person}_{shot}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 64), (person * 30 % 255, 90, shot * 100)).save(path)
                records.append({"split": split, "id": person, "file_path": path.name,
                                "captions": [f"person {person} in red", f"person {person} shot {shot}"]})
    (root / "reid_raw.json").write_text(json.dumps(records))
    return root


def test_too_few_captions_for_one_batch_fails_before_training(tiny_synthetic: Path, tmp_path: Path, tiny_config) -> None:
    captions = sum(len(r.captions) for r in load_dataset("cuhk-pedes", tiny_synthetic).split("train"))
    config = tiny_config(tiny_synthetic, tmp_path / "runs", *FAST, f"data.batch_size={captions + 1}")
    with pytest.raises(ValueError, match=rf"data.batch_size={captions + 1} but the train split has {captions} captions"
                                         rf".*Lower data.batch_size to at most {captions}"):
        train(config)
    assert not (tmp_path / "runs").exists()


def test_one_identity_or_no_test_split_fails_before_training(tmp_path: Path, tiny_config) -> None:
    one = write_cuhk(tmp_path / "one", {"train": [1], "val": [2, 3], "test": [4, 5]})
    with pytest.raises(ValueError, match="the train split of cuhk-pedes .* has 1 identity"):
        train(tiny_config(one, tmp_path / "runs", *FAST, "data.batch_size=2"))
    no_test = write_cuhk(tmp_path / "no-test", {"train": [1, 2, 3], "val": [4, 5]})
    with pytest.raises(ValueError, match=r"has no 'test' split \(available: train, val\)"):
        train(tiny_config(no_test, tmp_path / "runs", *FAST, "data.batch_size=2"))
    assert not (tmp_path / "runs").exists()


def test_too_small_image_size_names_the_setting(tiny_synthetic: Path, tmp_path: Path, tiny_config) -> None:
    config = tiny_config(tiny_synthetic, tmp_path / "runs", *FAST, "data.image_size=[8,4]")
    with pytest.raises(ValueError, match=r"data.image_size=\[8, 4\] is too small for efficientnet_lite0: .*Raise data.image_size"):
        train(config)
    assert not (tmp_path / "runs").exists()
    # A size the backbone takes but the method's own layers do not (e.g. more stripes than rows).
    from tbps.engine.train import build_module, check_image_size

    config = prepare_config(tiny_config(tiny_synthetic, tmp_path / "runs", *FAST))
    module = build_module(config, {1: 0, 2: 1})

    def too_few_rows(images):
        raise RuntimeError("6 stripes need at least 6 rows")

    module.method.encode_image = too_few_rows
    with pytest.raises(ValueError, match=r"data.image_size=\[64, 32\] \(final feature map 2x1\): a dry forward .* "
                                         r"6 stripes need at least 6 rows.*raise data.image_size"):
        check_image_size(module, config)
    assert module.method.training  # left as it was


# --------------------------------------------------------------------------- item 18: what --resume may change


def test_resume_refuses_settings_that_change_the_experiment(icfg_run, tiny_config, icfg_root: Path) -> None:
    with pytest.raises(ValueError, match=r"optim.lr: checkpoint 0.002, requested 0.5.*may change only trainer.max_epochs"):
        train(None, resume=icfg_run.run_dir, overrides=["optim.lr=0.5"])
    changed = tiny_config(icfg_root, icfg_run.run_dir.parent, *FAST, "data.dataset=icfg-pedes", "seed=2",
                          "trainer.max_epochs=1", "trainer.run_name=icfg")
    with pytest.raises(ValueError, match=r"1 setting\(s\) differ from it: seed: checkpoint 1, requested 2"):
        train(changed, resume=icfg_run.run_dir)
    cli = CliRunner().invoke(app, ["train", "--resume", str(icfg_run.run_dir), "data.batch_size=8"])
    assert cli.exit_code == 2 and "data.batch_size: checkpoint 16, requested 8" in " ".join(cli.output.split())
    # The same settings as stored (e.g. the original command line again) are no change.
    stored = read_checkpoint(icfg_run.last_checkpoint)["tbps"]["config"]
    assert resume_config(stored, stored, ["data.batch_size=16"]) == stored


@pytest.mark.slow
def test_resume_applies_the_allowed_settings(icfg_run, tmp_path: Path) -> None:
    run_dir = shutil.copytree(icfg_run.run_dir, tmp_path / "icfg")
    cli = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "trainer.max_epochs=2", "data.eval_batch_size=7"])
    assert cli.exit_code == 0, cli.output
    config = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["tbps"]["config"]
    assert config["trainer"]["max_epochs"] == 2 and config["data"]["eval_batch_size"] == 7
    assert "max_epochs: 2" in (run_dir / "config.yaml").read_text()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["checkpoints"]["last"]["epoch"] == 2
    assert epochs_with(read_history(run_dir / "logs" / "metrics.csv"), "train/loss_step") == {0, 1}


# --------------------------------------------------------------------------- item 19: the val carve-out


def test_val_split_does_not_depend_on_the_training_seed(icfg_root: Path, icfg_run, tiny_config, tmp_path: Path) -> None:
    def val_ids(*extra: str) -> frozenset[int]:
        config = prepare_config(tiny_config(icfg_root, tmp_path, "data.dataset=icfg-pedes", *extra))
        return frozenset(r.person_id for r in load_run_dataset(config).split("val"))

    assert val_ids("seed=0") == val_ids("seed=1") == val_ids("seed=7")
    assert val_ids("data.val_split_seed=1") != val_ids("data.val_split_seed=0")  # the option does choose
    # The run stores the seed it carved with; runs older than the option carved with `seed`.
    stored = read_checkpoint(icfg_run.last_checkpoint)["tbps"]["config"]
    assert stored["seed"] == 1 and stored["data"]["val_split_seed"] == 0 and val_split_seed(stored) == 0
    assert val_split_seed({"seed": 3, "data": {}}) == 3
    # `tbps eval --split val` scores the val split the run was selected on.
    expected = load_dataset("icfg-pedes", icfg_root, seed=0).split("val")
    assert [r.image_path for r in expected] != [r.image_path for r in load_dataset("icfg-pedes", icfg_root, seed=1).split("val")]
    out = tmp_path / "val.json"
    cli = CliRunner().invoke(app, ["eval", "--checkpoint", str(icfg_run.last_checkpoint), "--split", "val", "--json", str(out)])
    assert cli.exit_code == 0, cli.output
    assert json.loads(out.read_text())["gallery"] == [r.relative_path for r in expected]


@pytest.mark.slow
def test_val_identity_fraction_zero_trains_on_everything(icfg_root: Path, tmp_path: Path, tiny_config, caplog) -> None:
    config = tiny_config(icfg_root, tmp_path / "runs", *FAST, "data.dataset=icfg-pedes", "data.val_identity_fraction=0",
                         "trainer.max_epochs=1", "trainer.run_name=all")
    with caplog.at_level(logging.WARNING, logger="tbps.engine.train"):
        result = train(config)
    assert "no model selection, best.ckpt is not written" in caplog.text
    assert result.best_checkpoint is None and not (result.run_dir / "checkpoints" / "best.ckpt").exists()
    assert set(result.report["checkpoints"]) == {"last"}
    assert result.report["selection"].startswith("none: no val split")
    train_ids = {r.person_id for r in load_dataset("icfg-pedes", icfg_root, val_identity_fraction=0).split("train")}
    assert read_checkpoint(result.last_checkpoint)["tbps"]["num_classes"] == len(train_ids) == 32


def test_eval_image_to_text_uses_the_plain_similarity(icfg_run, tmp_path: Path) -> None:
    from tbps.engine.checkpoint import load_method
    from tbps.evaluation.evaluator import evaluate_split

    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(app, ["eval", "--checkpoint", str(icfg_run.last_checkpoint), "--rerank", "rvn", "--i2t",
                                   "--json", str(out), "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    payload = json.loads(out.read_text())
    method, config = load_method(icfg_run.last_checkpoint)
    records = load_dataset("icfg-pedes", config["data"]["root"], seed=0).split("test")
    plain = evaluate_split(method, records, config["data"]["image_size"], image_to_text=True)
    assert payload["metrics"]["image-to-text"] == pytest.approx({k: plain["i2t"][k] for k in ("R1", "R5", "R10", "mAP", "mINP")})
    assert payload["image_to_text_scoring"].startswith("none")
