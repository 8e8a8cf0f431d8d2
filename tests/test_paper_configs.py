"""Every bundled paper config builds its model, trains one step and scores a 4 x 4 gallery.

Issue 17, item 2: a paper config that no longer builds (a renamed option, a shape that stopped
fitting, a backbone that lost an argument) must fail here, not in a user's first run. Each
config is taken as shipped except that its backbones are randomly initialised
(``pretrained: false``, no weights offline) and the text backbones read the offline stand-ins the
paper-scale benchmark uses (``benchmarks/bench_paper_scale.py``: BERT-base's configuration with a
WordPiece vocab of the captions' words, a CLIP-format BPE tokenizer learnt on them). The model is
built by the engine's ``build_module`` (with the dataset's real classifier size) at the config's
input size, then one optimisation step at batch 2 (the method's ``forward`` at the config's last
epoch, so every loss of a staged schedule runs; the sum of its losses; backward; the config's
optimiser), then ``similarity`` and the config's evaluation route (``eval.rerank``) on 4 images x
4 captions.

Configs whose method, input size and ``model`` section are identical build the same model (only
the classifier size, which follows the dataset, differs): one of each kind is built, and
``test_every_paper_config_is_built_or_shares_a_built_model`` checks the grouping.
"""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_paper_scale as bench  # noqa: E402

CAPTIONS = [
    "A woman with long black hair wears a white shirt, blue jeans and white sneakers, and carries a brown bag.",
    "The man has short hair and wears a dark grey jacket, black trousers and black leather shoes.",
    "A young girl in a pink dress with white flowers, white socks and red shoes, with a yellow backpack.",
    "This person wears a red hooded sweatshirt, khaki shorts and grey running shoes, and holds an umbrella.",
    "An older man with grey hair and glasses wears a light blue shirt, dark blue pants and brown shoes.",
    "She wears a long beige coat, black tights and black boots, with a white scarf and a black handbag.",
]

PAPER_CONFIGS = bench.paper_configs()
GROUPS = bench.distinct_configs(PAPER_CONFIGS)


def test_every_paper_config_is_built_or_shares_a_built_model() -> None:
    from tbps.config import CONFIG_DIR, load_config, to_container

    bundled = sorted(f"{p.parent.name}/{p.stem}" for p in CONFIG_DIR.glob("*/*.yaml") if p.stem != "synthetic")
    assert sorted(PAPER_CONFIGS) == bundled
    assert sorted(name for same in GROUPS.values() for name in same) == bundled  # each in exactly one group
    for representative, same in GROUPS.items():
        built = to_container(load_config(representative))
        for name in same:
            config = to_container(load_config(name))
            assert config["method"] == built["method"], name
            assert config["data"]["image_size"] == built["data"]["image_size"], name
            assert config["model"] == built["model"], name
    # Every method's CUHK-PEDES config is a representative (the first of its method's configs).
    methods = {name.split("/")[0] for name in bundled}
    assert {f"{method}/cuhk-pedes" for method in methods} <= set(GROUPS)


def test_offline_stand_ins_keep_the_paper_shapes(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assets = bench.write_assets(tmp_path, CAPTIONS)
    bert = AutoConfig.from_pretrained(assets["bert"], local_files_only=True)
    assert (bert.num_hidden_layers, bert.hidden_size, bert.vocab_size) == (12, 768, 30522)
    tokenizer = AutoTokenizer.from_pretrained(assets["bert"], local_files_only=True)
    words = CAPTIONS[0].lower().replace(",", " ,").replace(".", " .").split()
    assert tokenizer.tokenize(CAPTIONS[0]) == words  # one WordPiece token per word, as bert-base-uncased
    overrides = bench.random_init_overrides("laip/clip-cuhk-pedes", assets)
    assert overrides == ["model.image_backbone.pretrained=false", "model.text_backbone.pretrained=false",
                         f"model.text_backbone.weights={assets['bert']}"]
    assert bench.random_init_overrides("isanet/cuhk-pedes", assets) == ["model.image_backbone.pretrained=false"]
    assert bench.paper_num_classes(bench.load_paper_config("nafs/icfg-pedes", assets)) == 3102 - 310


def test_scoring_time_is_measured_whole_when_it_fits_and_extrapolated_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def scorer(cost_per_query):
        def run(queries: int) -> None:
            clock[0] += queries * cost_per_query(queries)
        return run

    # Small calls cost more per query (warm-up, fixed costs): the first projection overshoots the
    # budget, the second fits it although the whole set is less than 1.5x the last call.
    measured = bench.timed_queries(scorer(lambda q: 0.0048 if q < 1000 else 0.00277), 6156, budget=20.0)
    assert (measured["queries"], measured["extrapolated"]) == (6156, False)
    assert measured["full_seconds"] == pytest.approx(6156 * 0.00277)
    assert [calls[0] for calls in measured["calls"]] == [1, 4166, 6156]
    slow = bench.timed_queries(scorer(lambda q: 2.0**-7), 6156, budget=20.0)  # 48 s in all: 2,560 queries fit
    assert slow["extrapolated"] and slow["queries"] == 2560 and slow["full_seconds"] == pytest.approx(6156 * 2.0**-7)
    heavy = bench.timed_queries(scorer(lambda q: 30.0), 6156, budget=20.0)  # one query is already over budget
    assert heavy["queries"] == 1 and heavy["full_seconds"] == pytest.approx(6156 * 30.0)


def test_tiled_features_keep_shapes_and_masks_and_differ_row_to_row() -> None:
    features = {"global": torch.randn(3, 8), "tokens": torch.randn(3, 5, 8), "mask": torch.tensor([[1, 1, 0]] * 3)}
    tiled = bench.tile_features(features, 10, seed=0)
    assert {k: tuple(v.shape) for k, v in tiled.items()} == {"global": (10, 8), "tokens": (10, 5, 8), "mask": (10, 3)}
    assert torch.equal(tiled["mask"], features["mask"][torch.arange(10) % 3])
    assert torch.unique(tiled["global"], dim=0).shape[0] == 10  # rows 0 and 3 come from one row, perturbed
    assert torch.allclose(tiled["global"][3], features["global"][0], atol=0.5)


def test_results_of_a_rerun_replace_only_failed_entries_and_show_the_batch_used() -> None:
    """A config killed at the paper's batch (NAFS at 64 on 24 GiB) and rerun with --batch-size:
    the table of both files has the rerun's row, marked with the paper's batch."""
    ok = {"config": "baseline/cuhk-pedes", "image_size": [384, 128], "batch_size": 64, "paper_batch_size": 64,
          "train": {"step_seconds": 24.5}}
    killed = {"config": "nafs/cuhk-pedes", "error": "killed (SIGKILL; ...): try a smaller --batch-size"}
    rerun = {"config": "nafs/cuhk-pedes", "image_size": [384, 128], "batch_size": 32, "paper_batch_size": 64,
             "train": {"step_seconds": 44.4}}
    again = {"config": "baseline/cuhk-pedes", "error": "exit code 1"}
    merged = bench.merge_results([{"configs": [ok, killed]}, {"configs": [rerun, again]}])
    assert merged["configs"] == [ok, rerun]
    rows = bench.table(merged).splitlines()
    assert "| 384x128, 64 |" in rows[2] and "| 384x128, 32 (paper 64) | " in rows[3] and "44.4" in rows[3]


def test_batch_size_override_reaches_the_config(tmp_path: Path) -> None:
    assets = {"bert": str(tmp_path / "bert"), "clip_tokenizer": str(tmp_path / "clip")}
    assert bench.load_paper_config("nafs/cuhk-pedes", assets)["data"]["batch_size"] == 64
    assert bench.load_paper_config("nafs/cuhk-pedes", assets, batch_size=32)["data"]["batch_size"] == 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return bench.write_assets(tmp_path_factory.mktemp("paper-assets"), CAPTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GROUPS))
def test_paper_config_builds_trains_one_step_and_scores(name: str, assets: dict[str, str]) -> None:
    from tbps.data.datasets import Collate
    from tbps.engine.train import build_module
    from tbps.evaluation.evaluator import score_features, scoring_options

    torch.manual_seed(0)
    config = bench.load_paper_config(name, assets)
    module = build_module(config, {i: i for i in range(bench.paper_num_classes(config))})
    method = module.method
    bench.fit_text(method, config, CAPTIONS * 3)
    processor = method.build_text_processor()
    height, width = (int(v) for v in config["data"]["image_size"])

    # One optimisation step at batch 2 (two people), in the engine's batch format.
    items = [{"image": torch.randn(3, height, width), "caption": CAPTIONS[i], "label": i, "person_id": i + 1,
              "image_id": i, "index": i} for i in range(2)]
    batch = Collate(processor)(items)
    method.train()
    optimizer = bench.make_optimizer(method, config["optim"])
    epoch = int(config["trainer"]["max_epochs"]) - 1
    losses = bench.training_step(method, optimizer, batch, torch.device("cpu"), "32-true", epoch)
    assert losses, name
    assert all(math.isfinite(float(value)) for value in losses.values()), losses
    for group, parameters in method.parameter_groups().items():
        stepped = [p for p in parameters if p.grad is not None and bool(p.grad.abs().sum() > 0)]
        assert stepped, f"{name}: no {group} parameter received a gradient"
        assert all(torch.isfinite(p.grad).all() for p in stepped), f"{name}: non-finite {group} gradient"
        assert all(optimizer.state[p] for p in stepped), f"{name}: the optimiser did not step the {group} parameters"
    del optimizer, batch
    gc.collect()

    # The test similarity and the config's evaluation route on 4 images x 4 captions.
    method.eval()
    with torch.no_grad():
        images = method.encode_image(torch.randn(4, 3, height, width))
        texts = method.encode_text(processor(CAPTIONS[:4]))
        similarity = method.similarity(texts, images)
        configured = score_features(method, texts, images, **scoring_options(config))
    assert similarity.shape == (4, 4) and torch.isfinite(similarity).all(), name
    assert configured.shape == (4, 4) and torch.isfinite(configured).all(), name
