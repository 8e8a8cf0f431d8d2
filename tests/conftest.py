"""Shared fixtures: tiny synthetic benchmarks rendered by the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a network or a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny tensors: more threads only add synchronisation
    (and spin on a busy CPU). Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-identity synthetic benchmark in the CUHK-PEDES format, small images."""
    from tbps.data.synth import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, identities=40, seed=3, image_size=(96, 40), images_per_identity=(3, 3), workers=1, progress=False)
    return root


@pytest.fixture
def tiny_config():
    """Factory for a baseline config that trains in seconds on a CPU."""
    return _tiny_config


def _tiny_config(data_root: Path, out_dir: Path, *extra: str):
    from tbps.config import load_config

    return load_config(
        "baseline/synthetic",
        [
            f"data.root={data_root}",
            "data.image_size=[64,32]",
            "data.batch_size=16",
            "data.eval_batch_size=64",
            "data.num_workers=0",
            "data.sampler=random",
            "model.embed_dim=64",
            f"trainer.output_dir={out_dir}",
            "trainer.progress_bar=false",
            "trainer.log_every_n_steps=1",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def search_checkpoint(tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny baseline trained once per session for the search tests."""
    from search_fixtures import train_search_checkpoint

    return train_search_checkpoint(tiny_synthetic, tmp_path_factory.mktemp("search-runs"), _tiny_config)


@pytest.fixture(scope="session")
def search_index(tiny_synthetic: Path, search_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of the whole synthetic gallery with camera / time metadata; tests must not modify it."""
    from search_fixtures import write_sidecar

    from tbps.search.index import build_index, scan_folder

    work = tmp_path_factory.mktemp("search-index")
    sidecar = write_sidecar(tiny_synthetic, work / "sidecar.csv")
    sources = scan_folder(tiny_synthetic / "imgs", sidecar=sidecar)
    build_index(search_checkpoint, sources, work / "index", batch_size=32)
    return work / "index"
