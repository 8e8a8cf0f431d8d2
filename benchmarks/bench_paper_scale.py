"""What every bundled paper config costs at paper scale: training step, encoding, test scoring.

For each method's paper configs (issue 17, items 1 and 4), unchanged except that backbones with
no local weights are randomly initialised (``pretrained: false``: speed does not depend on the
values), on synthetic data rendered at the config's input size:

* **build**: the engine's :func:`~tbps.engine.train.build_module` (the model plus its one-image
  dry forward), with the classifier sizes of the real dataset (CUHK-PEDES 11,003 training
  identities, ICFG-PEDES 3,102 less its 10 % val carve-out = 2,792, RSTPReid 3,701);
* **train**: ``--steps`` optimisation steps at the config's batch size, batches from the
  engine's own dataset, sampler, transform and collate (``data.batch_size``, ``data.sampler``,
  ``data.augment``) made before timing; each step = batch to the device, the method's
  ``forward`` under ``--precision`` (autocast for ``bf16-mixed``, as Lightning's plugin does),
  the sum of its losses, backward, the config's optimiser (parameter groups and learning rates
  as the engine builds them). Step time = median of the steps after the first ``--warmup``
  (default 1, at most steps - 1); images/s = batch size / step time. The method is told the
  config's last epoch (``set_epoch``): every loss of a staged schedule runs (LAIP's stage 2);
* **peak memory**: CUDA max allocated per phase on a GPU; on a CPU the process's peak RSS after
  each phase (each config runs in its own process, so peaks never carry over; RSS is monotone,
  so each figure includes the phases before it);
* **encoding**: ``encode_image`` / ``encode_text`` in eval mode without gradients (under
  autocast for ``bf16-mixed``), ``--encode-batches`` timed batches after one untimed one,
  extrapolated to the CUHK-PEDES test split (3,074 images, 6,156 captions); batches of
  ``--image-batch`` / ``--caption-batch`` (default: 8 / 16 on a CPU, the config's
  ``eval_batch_size`` on a GPU), each of images and captions not yet seen. Caption times include
  the text processor (tokenising, noun phrases), whose share is reported apart (the evaluator
  runs it in its data loader's workers); features are moved to the CPU as the evaluator does;
* **scoring**: the evaluator's :func:`~tbps.evaluation.evaluator.score_features` on a
  CUHK-PEDES-size gallery (6,156 x 3,074) of features of the real shapes (the encoded features,
  tiled and perturbed by noise), float32 as the evaluator gets them: ``method`` (the method's own
  test similarity, ``rerank="none"``), ``two-stage`` (global top-``eval.top_k``, default 128,
  re-scored by ``score_candidates``) and ``rvn`` (RVN on the method's similarity, l =
  ``eval.rvn_neighbours``). Each is timed on a growing number of queries until the whole query
  set is measured or the next call would exceed ``--score-budget`` seconds; then the time of the
  last (largest) call is extrapolated linearly to 6,156 queries (every route scores 256-query
  chunks independently). ``rvn``: measured whole when the similarity took at most half the
  budget, else the similarity's time (measured or extrapolated) plus RVN's own re-ranking (the
  gallery's global image-image cosine and ``rvn_rerank``) measured at full size. ``--routes``
  picks the routes; a method without a fine similarity (``has_fine_similarity`` false) skips
  two-stage, which would re-score its candidates with the global cosine that chose them;
* **engine** (``--engine``): the same model and batches through the engine's LightningModule
  in a Lightning ``Trainer`` set up as ``tbps train`` sets it (precision, gradient clipping and
  accumulation, logging interval, its CSV history and TensorBoard loggers, learning-rate monitor;
  no checkpoint writing, no validation, one device with strategy ``auto``: a config's DDP strategy
  needs several), timed from one batch end to the next, against the bare loop of the training
  phase: overhead = Lightning step / bare step - 1.

Each config runs in a child process (``--config-timeout`` bounds it), or, on a GPU with
``--in-process``, all in this one (no Python start per config); results are written after every
config. Which configs (default): every CUHK-PEDES config (including ``clip-cuhk-pedes``),
and the ICFG-PEDES / RSTPReid ones whose model differs from an already listed one (method, input
size and the whole ``model`` section compared; a dataset's classifier size alone does not count).
``--all-datasets`` lists every paper config, ``--configs`` names them, ``--methods`` filters.

The text backbones' offline stand-ins: ``bert-base-uncased`` is built from a folder holding
BERT-base's configuration (``BertConfig()``: 12 x 768, 30,522-token table) and a WordPiece vocab
of the special tokens, single characters and the rendered captions' words (so each word is one
token, as BERT's own vocab makes of such words); CLIP's tokenizer is a byte-level BPE in CLIP's
format whose merges are learnt on the rendered captions (CLIP's 49,408-row table is kept).

    python benchmarks/bench_paper_scale.py --device cpu --steps 2 --out benchmarks/results/paper-scale-cpu.json
    python benchmarks/bench_paper_scale.py --device cuda --precision bf16-mixed --steps 10 --engine \\
        --out benchmarks/results/paper-scale-cuda.json
    python benchmarks/bench_paper_scale.py --table benchmarks/results/paper-scale-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

HERE = Path(__file__).resolve().parent

CUHK_TEST_IMAGES = 3074
CUHK_TEST_CAPTIONS = 6156
# Training identities of each benchmark (the ID classifiers' sizes); ICFG-PEDES has no val split
# and the engine carves data.val_identity_fraction of them out (paper_num_classes).
TRAIN_IDENTITIES = {"cuhk-pedes": 11003, "icfg-pedes": 3102, "rstpreid": 3701}
DATASETS_WITHOUT_VAL = ("icfg-pedes",)
DATASET_ORDER = ("cuhk-pedes", "clip-cuhk-pedes", "icfg-pedes", "rstpreid")
SCORING_MODES = ("method", "two-stage", "rvn")
PHASES = ("train", "encode", "score")
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDS = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


# --------------------------------------------------------------------------- configs


def paper_configs() -> list[str]:
    """Every bundled config except the synthetic ones, CUHK-PEDES first within each method."""
    from tbps.config import CONFIG_DIR

    names = [f"{p.parent.name}/{p.stem}" for p in CONFIG_DIR.glob("*/*.yaml") if p.stem != "synthetic"]

    def order(name: str) -> tuple[str, int, str]:
        method, dataset = name.split("/")
        return method, DATASET_ORDER.index(dataset) if dataset in DATASET_ORDER else len(DATASET_ORDER), dataset

    return sorted(names, key=order)


def model_signature(name: str) -> str:
    """What decides the model a config builds: its method, input size and whole ``model`` section."""
    from tbps.config import load_config, to_container

    config = to_container(load_config(name))
    return json.dumps({"method": config["method"], "image_size": list(config["data"]["image_size"]),
                       "model": config["model"]}, sort_keys=True)


def distinct_configs(names: Iterable[str]) -> dict[str, list[str]]:
    """``{representative: [configs building the same model]}``, the first of each kind kept."""
    groups: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for name in names:
        signature = model_signature(name)
        if signature in seen:
            groups[seen[signature]].append(name)
        else:
            seen[signature] = name
            groups[name] = [name]
    return groups


def paper_num_classes(config: Mapping[str, Any]) -> int:
    """The number of training identities the engine would classify on the config's real dataset."""
    dataset = str(config["data"]["dataset"])
    count = TRAIN_IDENTITIES[dataset]
    if dataset in DATASETS_WITHOUT_VAL:
        fraction = float(config["data"].get("val_identity_fraction", 0.1))
        if fraction > 0:  # the carve-out rule of tbps.data.readers
            count -= min(max(1, round(fraction * count)), count - 1)
    return count


# --------------------------------------------------------------------------- offline stand-ins


def caption_words(captions: Iterable[str]) -> list[str]:
    return sorted({word for caption in captions for word in _WORDS.findall(caption.lower())})


def write_bert_folder(folder: Path, captions: Iterable[str]) -> Path:
    """A ``bert-base-uncased`` stand-in: BERT-base's configuration and a WordPiece vocab (special
    tokens, single characters and their ``##`` pieces, the captions' words)."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = BertConfig()  # the defaults are bert-base-uncased's: 12 layers x 768, 30,522 tokens
    config.save_pretrained(folder)
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = [word for word in caption_words(captions) if word not in characters]
    vocab = list(BERT_SPECIAL_TOKENS) + characters + ["##" + c for c in characters] + words
    if len(vocab) > config.vocab_size:
        raise ValueError(f"{len(vocab)} vocab entries do not fit BERT-base's {config.vocab_size}-token table")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 512})
    )
    return folder


def write_clip_tokenizer(folder: Path, captions: Sequence[str]) -> Path:
    """A byte-level BPE tokenizer in CLIP's format (normaliser, pre-tokeniser, ``</w>`` word ends,
    special tokens) whose merges are learnt on ``captions``: each of their words becomes one
    token, as CLIP's own 49k-token BPE makes of most words in such captions."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizerFast

    from tbps.models.backbones.clip import _bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    base = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    raw = folder / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(base)}))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    backend = CLIPTokenizerFast.from_pretrained(str(raw), local_files_only=True).backend_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(list(captions), trainer=trainer)
    backend.save(str(folder / "tokenizer.json"))
    tokenizer_folder = folder / "tokenizer"
    CLIPTokenizerFast(tokenizer_file=str(folder / "tokenizer.json")).save_pretrained(tokenizer_folder)
    return tokenizer_folder


def write_assets(folder: Path, captions: Sequence[str]) -> dict[str, str]:
    """The text backbones' stand-ins for ``captions``: ``{"bert": folder, "clip_tokenizer": folder}``."""
    return {"bert": str(write_bert_folder(folder / "bert-base-uncased", captions)),
            "clip_tokenizer": str(write_clip_tokenizer(folder / "clip", captions))}


def random_init_overrides(name: str, assets: Mapping[str, str]) -> list[str]:
    """Overrides that build ``name``'s model without downloaded weights: ``pretrained=false`` for
    every backbone with no local weights, and the stand-ins for what a text backbone reads from its
    weights folder (BERT's configuration and vocab, CLIP's tokenizer)."""
    from tbps.config import load_config, to_container

    model = to_container(load_config(name))["model"]
    overrides = []
    for section in ("image_backbone", "text_backbone"):
        backbone = model.get(section) or {}
        backbone_name = str(backbone.get("name", ""))
        if backbone_name == "bilstm":  # trained from scratch: nothing to load
            continue
        if backbone.get("weights"):
            continue  # local weights given: the config stays as it is
        overrides.append(f"model.{section}.pretrained=false")
        if section == "text_backbone":
            if backbone_name == "clip":
                if not backbone.get("tokenizer"):
                    overrides.append(f"model.text_backbone.tokenizer={assets['clip_tokenizer']}")
            elif backbone_name == "bert-base-uncased":
                overrides.append(f"model.text_backbone.weights={assets['bert']}")
            elif backbone_name != "minilm":
                raise ValueError(f"{name}: no offline stand-in for text backbone {backbone_name!r}")
    if model.get("init_checkpoint"):
        overrides.append("model.init_checkpoint=null")
    return overrides


def machine_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def load_paper_config(name: str, assets: Mapping[str, str], data_root: str | Path | None = None,
                      batch_size: int | None = None) -> dict[str, Any]:
    """``name`` resolved, with :func:`random_init_overrides` (and the synthetic data's root; a
    training batch other than the config's, ``--batch-size``, where the paper's does not fit)."""
    from tbps.config import load_config, to_container

    overrides = random_init_overrides(name, assets) + ["data.num_workers=0"]
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    if batch_size is not None:
        overrides.append(f"data.batch_size={int(batch_size)}")
    return to_container(load_config(name, overrides))


def filler_words(count: int) -> list[str]:
    """``count`` distinct lower-case pseudo-words (``xaaaa``, ``xaaab``, ...)."""
    words = []
    for index in range(count):
        letters = []
        for _ in range(4):
            index, digit = divmod(index, 26)
            letters.append(string.ascii_lowercase[digit])
        words.append("x" + "".join(reversed(letters)))
    return words


def fit_text(method: Any, config: Mapping[str, Any], captions: Sequence[str]) -> None:
    """``method.fit_text(captions)``; a Bi-LSTM with a ``vocabulary_size`` also sees that many
    filler words often enough to be kept, so its embedding table has the paper's size V."""
    model = config["model"]
    text = model.get("text_backbone") or {}
    size = model.get("vocabulary_size")
    extra: list[str] = []
    if text.get("name") == "bilstm" and size:
        line = " ".join(filler_words(int(size)))
        extra = [line] * (int(text.get("min_count", 2)) + 1)
    method.fit_text(list(captions) + extra)


# --------------------------------------------------------------------------- batches and devices


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    return value


def training_batches(method: Any, config: Mapping[str, Any], records: Sequence[Any], count: int,
                     batch_size: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Up to ``count`` training batches (CPU) from the engine's dataset, sampler, transform and
    collate, as ``tbps train`` makes them from ``records``."""
    from torch.utils.data import DataLoader

    from tbps.data.datasets import CaptionPairs, Collate
    from tbps.data.samplers import EpochShuffleSampler, IdentityBalancedSampler
    from tbps.data.transforms import ImageTransform

    data = config["data"]
    batch_size = int(batch_size or data["batch_size"])
    augment = data["augment"]
    mean, std = method.image_mean_std
    transform = ImageTransform(tuple(data["image_size"]), mean, std, train=True, flip_prob=float(augment["flip_prob"]),
                               padding=int(augment["padding"]), random_crop=bool(augment["random_crop"]),
                               random_erasing=float(augment["random_erasing"]))
    labels = {pid: i for i, pid in enumerate(sorted({r.person_id for r in records}))}
    pairs = CaptionPairs(records, labels, transform, seed=seed)
    if data["sampler"] == "identity":
        sampler = IdentityBalancedSampler(pairs.person_ids, batch_size, int(data["num_instances"]), seed=seed)
    else:
        sampler = EpochShuffleSampler(len(pairs), seed=seed, drop_last=True)
    loader = DataLoader(pairs, batch_size=batch_size, sampler=sampler, drop_last=True,
                        collate_fn=Collate(method.build_text_processor()))
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    if not batches:
        raise ValueError(f"the synthetic training split ({len(pairs)} pairs) gives no batch of {batch_size}")
    return batches


def make_optimizer(method: Any, optim: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The engine's optimiser (PersonSearchModule.configure_optimizers without its schedule)."""
    groups = method.parameter_groups()
    lr = float(optim["lr"])
    param_groups = [{"params": groups["new"], "lr": lr},
                    {"params": groups["backbone"], "lr": lr * float(optim["backbone_lr_mult"])}]
    param_groups = [group for group in param_groups if group["params"]]
    kwargs = {"betas": tuple(optim["betas"]), "weight_decay": float(optim["weight_decay"])}
    kind = str(optim["optimizer"]).lower()
    if kind not in ("adam", "adamw"):
        raise ValueError(f"optim.optimizer must be adam or adamw, got {kind!r}")
    return (torch.optim.AdamW if kind == "adamw" else torch.optim.Adam)(param_groups, **kwargs)


def autocast(device: torch.device, precision: str):
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"--precision must be 32-true or bf16-mixed, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(method: Any, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any], device: torch.device,
                  precision: str, epoch: int, clip: float | None = None) -> dict[str, torch.Tensor]:
    """One bare optimisation step, as the engine's training_step + Lightning's optimiser step do it."""
    method.set_epoch(epoch)
    batch = to_device(batch, device)
    with autocast(device, precision):
        losses = method(batch)
    total = torch.stack(list(losses.values())).sum()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(method.parameters(), float(clip))
    optimizer.step()
    return {name: value.detach() for name, value in losses.items()}


# --------------------------------------------------------------------------- features


def tile_features(features: Mapping[str, torch.Tensor], rows: int, seed: int = 0, noise: float = 0.05,
                  chunk: int = 512) -> dict[str, torch.Tensor]:
    """``rows`` rows made of ``features``' rows in turn, each floating row perturbed by Gaussian
    noise of ``noise`` times that tensor's standard deviation (so no two rows are equal); masks and
    counts are copied."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in features.items():
        index = torch.arange(rows) % value.shape[0]
        tiled = value[index]  # advanced indexing copies
        if tiled.is_floating_point():
            scale = noise * float(value.float().std()) if value.numel() > 1 else noise
            for start in range(0, rows, chunk):
                part = tiled[start : start + chunk]
                part.add_(torch.randn(part.shape, generator=generator, dtype=part.dtype) * scale)
        out[key] = tiled
    return out


def timed_queries(run: Callable[[int], Any], total: int, budget: float) -> dict[str, Any]:
    """Time ``run(q)`` (scoring the first ``q`` queries) on growing ``q`` until all ``total`` are
    measured or the next call would pass ``budget`` seconds; the largest call is the measurement."""
    calls = []
    queries = 1
    while True:
        start = time.perf_counter()
        run(queries)
        seconds = time.perf_counter() - start
        calls.append([queries, round(seconds, 4)])
        if queries >= total:
            return {"queries": queries, "seconds": seconds, "full_seconds": seconds, "extrapolated": False, "calls": calls}
        per_query = seconds / queries
        if per_query * total <= budget:
            queries = total  # the whole query set fits the budget: measure it
            continue
        following = int(budget / max(per_query, 1e-9))
        if following < 1.5 * queries:  # no call much larger than this one fits: extrapolate from it
            return {"queries": queries, "seconds": seconds, "full_seconds": per_query * total, "extrapolated": True,
                    "calls": calls}
        queries = following


def scoring_costs(method: Any, text_features: Mapping[str, torch.Tensor], image_features: Mapping[str, torch.Tensor],
                  config: Mapping[str, Any], device: torch.device, budget: float,
                  routes: Sequence[str] = SCORING_MODES) -> dict[str, Any]:
    """Seconds to score ``text_features`` against ``image_features`` by each of ``routes`` (of
    :data:`SCORING_MODES`; see the module docstring)."""
    unknown = sorted(set(routes) - set(SCORING_MODES))
    if unknown:
        raise ValueError(f"unknown scoring route(s) {unknown}; use {', '.join(SCORING_MODES)}")
    from tbps.evaluation.evaluator import score_features
    from tbps.evaluation.rerank import rvn_rerank
    from tbps.models.base import index_features

    section = config.get("eval") or {}
    top_k = int(section.get("top_k", 128))
    neighbours = int(section.get("rvn_neighbours", 10))
    total = next(iter(text_features.values())).shape[0]
    results: dict[str, Any] = {"texts": total, "images": next(iter(image_features.values())).shape[0],
                               "top_k": top_k, "rvn_neighbours": neighbours}
    method.eval()

    def runner(rerank: str) -> Callable[[int], Any]:
        def run(queries: int) -> None:
            texts = index_features(text_features, slice(0, queries))
            score_features(method, texts, image_features, rerank=rerank, top_k=top_k, rvn_neighbours=neighbours,
                           device=device)
        return run

    for mode, rerank in (("method", "none"), ("two-stage", "two-stage")):
        if mode not in routes and not (mode == "method" and "rvn" in routes):
            continue
        if mode == "two-stage" and not method.has_fine_similarity:
            # Its candidates would be re-scored by the global cosine that chose them.
            results[mode] = {"skipped": "no fine similarity: two-stage is the global cosine"}
            continue
        measured = timed_queries(runner(rerank), total, budget)
        measured["how"] = ("measured on every query" if not measured["extrapolated"]
                           else f"extrapolated from {measured['queries']} queries")
        results[mode] = measured
    if "rvn" not in routes:
        return results
    similarity = results["method"]
    if not similarity["extrapolated"] and similarity["full_seconds"] <= budget / 2:
        measured = timed_queries(runner("rvn"), total, float("inf"))
        measured["how"] = "measured on every query"
    else:
        # score_features' rvn path after the similarity rows (the gallery's global image-image
        # cosine and rvn_rerank), timed on a full-size stand-in matrix (the global cosine), plus the
        # similarity's time: a second full similarity would not fit the budget.
        with torch.no_grad():
            texts = {key: value.to(device) for key, value in text_features.items()}
            images = {key: value.to(device) for key, value in image_features.items()}
            stand_in = method.global_similarity(texts, images)
            del texts
            synchronize(device)
            start = time.perf_counter()
            image_image = method.global_similarity(images, images)
            rvn_rerank(stand_in, image_image, neighbours=neighbours).cpu()
            rerank_seconds = time.perf_counter() - start
            del images, stand_in, image_image
        measured = {"queries": similarity["queries"], "rerank_seconds": rerank_seconds,
                    "full_seconds": similarity["full_seconds"] + rerank_seconds, "extrapolated": similarity["extrapolated"],
                    "how": f"the similarity's time ({similarity['how']}) + RVN's re-ranking measured at full size"}
    results["rvn"] = measured
    return results


# --------------------------------------------------------------------------- child: one config


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


class _Memory:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.figures: dict[str, float] = {}

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def record(self, phase: str) -> None:
        if self.device.type == "cuda":
            self.figures[phase] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        else:
            self.figures[phase] = round(peak_rss_mb())


def encoding_costs(method: Any, config: Mapping[str, Any], records: Sequence[Any], device: torch.device, precision: str,
                   image_batch: int, caption_batch: int, batches: int) -> tuple[dict[str, Any], dict, dict]:
    """Images/s and captions/s over ``batches`` timed batches (one untimed before), and the
    features of the timed batches (float32, CPU). Each batch takes the next images and captions of
    ``records`` (cycling when they run out): no caption is processed twice while the pool lasts, so
    caches (e.g. the noun-phrase extractor's) do not flatter the figures."""
    from tbps.data.datasets import GalleryImages
    from tbps.data.transforms import ImageTransform
    from tbps.models.base import concat_features

    mean, std = method.image_mean_std
    gallery = GalleryImages(records, ImageTransform(tuple(config["data"]["image_size"]), mean, std, train=False))
    pool = [c for r in records for c in r.captions]
    image_batches = [torch.stack([gallery[(b * image_batch + i) % len(gallery)]["image"] for i in range(image_batch)])
                     for b in range(batches + 1)]
    caption_batches = [[pool[(b * caption_batch + i) % len(pool)] for i in range(caption_batch)]
                       for b in range(batches + 1)]
    processor = method.build_text_processor()
    method.eval()
    image_chunks, text_chunks, image_times, text_times, processing_times = [], [], [], [], []

    def keep(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in features.items()}

    with torch.no_grad(), autocast(device, precision):
        for index in range(batches + 1):
            synchronize(device)
            start = time.perf_counter()
            features = keep(method.encode_image(image_batches[index].to(device)))
            elapsed = time.perf_counter() - start
            if index:
                image_times.append(elapsed)
                image_chunks.append(features)
        for index in range(batches + 1):
            synchronize(device)
            start = time.perf_counter()
            text = processor(caption_batches[index])
            processed = time.perf_counter()
            features = keep(method.encode_text(to_device(text, device)))
            elapsed = time.perf_counter() - start
            if index:
                text_times.append(elapsed)
                processing_times.append(processed - start)
                text_chunks.append(features)
    images_per_second = image_batch / median(image_times)
    captions_per_second = caption_batch / median(text_times)
    stats = {
        "image_batch": image_batch, "caption_batch": caption_batch, "timed_batches": batches,
        "distinct_captions": min(len(pool), caption_batch * (batches + 1)),
        "images_per_second": round(images_per_second, 2), "captions_per_second": round(captions_per_second, 2),
        "test_split_images_seconds": round(CUHK_TEST_IMAGES / images_per_second, 1),
        "test_split_captions_seconds": round(CUHK_TEST_CAPTIONS / captions_per_second, 1),
        # Of the caption time, the text processor's share (tokenising, noun phrases): in the evaluator
        # it runs in the data loader's workers, beside the model.
        "caption_processing_share": round(median(processing_times) / median(text_times), 3),
        "times_seconds": {"images": [round(t, 3) for t in image_times], "captions": [round(t, 3) for t in text_times],
                          "caption_processing": [round(t, 4) for t in processing_times]},
        "image_features": {k: list(v.shape[1:]) for k, v in image_chunks[0].items()},
        "text_features": {k: list(v.shape[1:]) for k, v in text_chunks[0].items()},
    }
    stats["test_split_seconds"] = round(stats["test_split_images_seconds"] + stats["test_split_captions_seconds"], 1)
    return stats, concat_features(image_chunks), concat_features(text_chunks)


def engine_overhead(module: Any, batches: Sequence[Mapping[str, Any]], config: Mapping[str, Any], device: torch.device,
                    precision: str, steps: int, warmup: int, epoch: int, work: Path) -> dict[str, Any]:
    """Step times of the same model and batches through the engine's LightningModule in a Lightning
    Trainer set up as ``tbps train`` sets it (module docstring)."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, Dataset

    from tbps.engine.train import HistoryCSVLogger

    class Repeat(Dataset):
        def __len__(self) -> int:
            return steps

        def __getitem__(self, index: int) -> Mapping[str, Any]:
            return batches[index % len(batches)]

    ends: list[float] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            pl_module.method.set_epoch(epoch)  # the bare loop's epoch (the module sets the trainer's, 0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            synchronize(device)
            ends.append(time.perf_counter())

    trainer_config = config["trainer"]
    run_dir = work / "engine-run"
    trainer = L.Trainer(
        default_root_dir=run_dir, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, strategy="auto",
        precision=precision, max_epochs=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
        accumulate_grad_batches=int(trainer_config["accumulate_grad_batches"]),
        gradient_clip_val=trainer_config.get("gradient_clip_val"),
        log_every_n_steps=int(trainer_config.get("log_every_n_steps", 10)),
        logger=[HistoryCSVLogger(run_dir), TensorBoardLogger(run_dir, name="", version="tensorboard")],
        callbacks=[StepTimer(), LearningRateMonitor(logging_interval="step")],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(Repeat(), batch_size=None, shuffle=False))
    fit_seconds = time.perf_counter() - start
    intervals = [b - a for a, b in zip(ends, ends[1:])][max(0, warmup - 1):]
    return {"steps": len(ends), "warmup": warmup, "step_seconds": round(median(intervals), 4),
            "times_seconds": [round(t, 4) for t in intervals], "fit_seconds": round(fit_seconds, 1)}


def run_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Everything measured for one config (runs in a child process)."""
    from tbps.data.readers import load_dataset
    from tbps.engine.train import build_module

    device = torch.device(spec["device"])
    precision = spec["precision"]
    phases = set(spec["phases"])
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result: dict[str, Any] = {"config": spec["config"], "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}
    config = load_paper_config(spec["config"], spec["assets"], spec["data_root"], spec.get("batch_size"))
    num_classes = paper_num_classes(config)
    epoch = max(0, int(config["trainer"]["max_epochs"]) - 1)
    result.update({"method": config["method"], "dataset": config["data"]["dataset"],
                   "image_size": list(config["data"]["image_size"]), "batch_size": int(config["data"]["batch_size"]),
                   "paper_batch_size": int(load_paper_config(spec["config"], spec["assets"])["data"]["batch_size"]),
                   "image_backbone": config["model"]["image_backbone"]["name"],
                   "text_backbone": config["model"]["text_backbone"]["name"], "num_classes": num_classes,
                   "epoch": epoch, "config_precision": config["trainer"]["precision"]})
    memory = _Memory(device)

    start = time.perf_counter()
    module = build_module(config, {i: i for i in range(num_classes)})
    method = module.method
    dataset = load_dataset("cuhk-pedes", spec["data_root"])
    train_records, test_records = dataset.split("train"), dataset.split("test")
    fit_text(method, config, [c for r in train_records for c in r.captions])
    method.to(device)
    result["build_seconds"] = round(time.perf_counter() - start, 1)
    result["parameters_million"] = round(sum(p.numel() for p in method.parameters()) / 1e6, 1)
    result["trainable_million"] = round(sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6, 1)
    memory.record("built")

    steps, warmup = int(spec["steps"]), int(spec["warmup"])
    batches: list[dict[str, Any]] = []
    if "train" in phases or spec["engine"]:
        batches = training_batches(method, config, train_records, count=min(steps, 4))
    if "train" in phases:
        memory.start()
        method.train()
        optimizer = make_optimizer(method, config["optim"])
        times, last = [], {}
        for index in range(steps):
            synchronize(device)
            begin = time.perf_counter()
            last = training_step(method, optimizer, batches[index % len(batches)], device, precision, epoch,
                                 config["trainer"].get("gradient_clip_val"))
            synchronize(device)
            times.append(time.perf_counter() - begin)
        timed = times[warmup:]
        step = median(timed)
        losses = {name: float(value) for name, value in last.items()}
        result["train"] = {"steps": steps, "warmup": warmup, "step_seconds": round(step, 3),
                           "images_per_second": round(result["batch_size"] / step, 2),
                           "times_seconds": [round(t, 3) for t in times], "losses": losses,
                           "finite": all(v == v and abs(v) != float("inf") for v in losses.values())}
        memory.record("train")
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    image_features = text_features = None
    if "encode" in phases or "score" in phases:
        memory.start()
        encode_batches = int(spec["encode_batches"]) if "encode" in phases else 1
        image_batch = int(spec["image_batch"] or config["data"]["eval_batch_size"])
        caption_batch = int(spec["caption_batch"] or config["data"]["eval_batch_size"])
        records = test_records + dataset.split("val") + train_records  # test first, the rest as a larger pool
        stats, image_features, text_features = encoding_costs(method, config, records, device, precision,
                                                              image_batch, caption_batch, encode_batches)
        if "encode" in phases:
            result["encode"] = stats
            memory.record("encode")
        else:
            result["feature_shapes"] = {"image": stats["image_features"], "text": stats["text_features"]}

    if "score" in phases:
        memory.start()
        images = tile_features(image_features, CUHK_TEST_IMAGES, seed=1)
        texts = tile_features(text_features, CUHK_TEST_CAPTIONS, seed=2)
        del image_features, text_features
        result["score"] = scoring_costs(method, texts, images, config, device, float(spec["score_budget"]),
                                        spec["routes"])
        memory.record("score")
        del images, texts
        gc.collect()

    if spec["engine"]:
        memory.start()
        with tempfile.TemporaryDirectory(dir=spec.get("work")) as folder:
            engine = engine_overhead(module, batches, config, device, precision, steps, warmup, epoch, Path(folder))
        if "train" in result:
            bare = result["train"]["step_seconds"]
            engine["bare_step_seconds"] = bare
            engine["overhead_percent"] = round(100.0 * (engine["step_seconds"] / bare - 1.0), 1)
        result["engine"] = engine
        memory.record("engine")

    result["peak_memory_mb"] = memory.figures
    result["peak_memory_kind"] = "cuda max allocated per phase" if device.type == "cuda" else "process peak RSS (cumulative)"
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return result


# --------------------------------------------------------------------------- parent


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "processor": platform.processor() or platform.machine()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def select_configs(args: argparse.Namespace) -> tuple[list[str], dict[str, list[str]]]:
    names = paper_configs()
    if args.configs:
        unknown = sorted(set(args.configs) - set(names))
        if unknown:
            raise SystemExit(f"unknown paper config(s) {unknown}; known: {', '.join(names)}")
        names = [name for name in names if name in args.configs]
        groups = {name: [name] for name in names}
    elif args.all_datasets:
        groups = {name: [name] for name in names}
    else:
        groups = distinct_configs(names)
    if args.methods:
        groups = {name: same for name, same in groups.items() if name.split("/")[0] in args.methods}
    return list(groups), groups


def prepare(work: Path, sizes: Iterable[tuple[int, int]], identities: int) -> tuple[dict[str, str], dict[str, str]]:
    """Synthetic data at each input size (CUHK-PEDES layout) and the text stand-ins, in ``work``
    (reused when already there)."""
    from tbps.data.readers import load_dataset
    from tbps.data.synth import generate

    roots = {}
    captions: list[str] = []
    for height, width in sorted(set(sizes)):
        root = work / f"synthetic-{height}x{width}"
        if not (root / "reid_raw.json").exists():
            generate(root, identities=identities, seed=0, image_size=(height, width), workers=min(4, os.cpu_count() or 1),
                     progress=False, overwrite=True)
        roots[f"{height}x{width}"] = str(root)
        dataset = load_dataset("cuhk-pedes", root)
        captions += [c for split in dataset.splits.values() for r in split for c in r.captions]
    assets_dir = work / "assets"
    marker = assets_dir / "done.json"
    if marker.exists():
        assets = json.loads(marker.read_text())
    else:
        shutil.rmtree(assets_dir, ignore_errors=True)
        assets = write_assets(assets_dir, captions)
        marker.write_text(json.dumps(assets))
    return roots, assets


def write_results(path: Path | None, payload: Mapping[str, Any]) -> None:
    if path is None:
        return
    from tbps.utils import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 100:
        return f"{seconds:.0f} s"
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2f} s"


def _score_cell(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "–"
    if "skipped" in entry:
        return "= global"
    text = _fmt(entry.get("full_seconds"))
    return f"~{text}" if entry.get("extrapolated") else text


def merge_results(payloads: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One payload of several runs' configs, in first-seen order; a later run's entry replaces an
    earlier one of the same config only where the earlier failed (a rerun at a smaller batch)."""
    entries: dict[str, Mapping[str, Any]] = {}
    for payload in payloads:
        for entry in payload.get("configs", []):
            name = entry.get("config")
            if name not in entries or ("error" in entries[name] and "error" not in entry):
                entries[name] = entry
    return {"configs": list(entries.values())}


def table(payload: Mapping[str, Any]) -> str:
    """The results as markdown: one row per config; ``~`` marks an extrapolated scoring time."""
    lines = ["| config | same model as | input, batch | params M | train step s | train img/s | peak MiB | "
             "encode img/s | encode cap/s | test-split encoding | method score | two-stage | rvn |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    engine_rows = []
    for entry in payload.get("configs", []):
        name = entry.get("config")
        if "error" in entry:
            lines.append(f"| {name} | | | | failed: {entry['error'].splitlines()[-1][:120]} | | | | | | | | |")
            continue
        same = ", ".join(n.split("/")[1] for n in entry.get("same_model_as", []) if n != name) or ""
        train = entry.get("train") or {}
        encode = entry.get("encode") or {}
        score = entry.get("score") or {}
        peak = max((entry.get("peak_memory_mb") or {0: 0}).values())
        size = "x".join(str(v) for v in entry.get("image_size", []))
        batch = entry.get("batch_size")
        if entry.get("paper_batch_size", batch) != batch:
            batch = f"{batch} (paper {entry['paper_batch_size']})"
        lines.append(
            f"| {name} | {same} | {size}, {batch} | {entry.get('parameters_million')} | "
            f"{train.get('step_seconds', '–')} | {train.get('images_per_second', '–')} | {peak} | "
            f"{encode.get('images_per_second', '–')} | {encode.get('captions_per_second', '–')} | "
            f"{_fmt(encode.get('test_split_seconds'))} | {_score_cell(score.get('method'))} | "
            f"{_score_cell(score.get('two-stage'))} | {_score_cell(score.get('rvn'))} |")
        if entry.get("engine"):
            engine = entry["engine"]
            engine_rows.append(f"| {name} | {engine.get('bare_step_seconds', '–')} | {engine['step_seconds']} | "
                               f"{engine.get('overhead_percent', '–')} |")
    if engine_rows:
        lines += ["", "| config | bare loop step s | engine (Lightning) step s | overhead % |", "|---|---|---|---|"]
        lines += engine_rows
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    parser.add_argument("--steps", type=int, default=2, help="training steps per config, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (at most steps - 1)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods' configs")
    parser.add_argument("--configs", nargs="+", default=None, help="these paper configs (method/dataset)")
    parser.add_argument("--all-datasets", action="store_true", help="every paper config, also those sharing a model")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES,
                        help="what to measure (score encodes one batch for the feature shapes when encode is left out)")
    parser.add_argument("--engine", action="store_true", help="also time the same steps through the Lightning engine")
    parser.add_argument("--encode-batches", type=int, default=2, help="timed encoding batches (after one untimed)")
    parser.add_argument("--image-batch", type=int, default=None,
                        help="images per encoding batch (default: 8 on a CPU, the config's eval_batch_size on a GPU)")
    parser.add_argument("--caption-batch", type=int, default=None,
                        help="captions per encoding batch (default: 16 on a CPU, the config's eval_batch_size on a GPU)")
    parser.add_argument("--routes", nargs="+", default=list(SCORING_MODES), choices=SCORING_MODES,
                        help="scoring routes to time (rvn also times method, which it adds to)")
    parser.add_argument("--score-budget", type=float, default=20.0,
                        help="seconds a scoring measurement may take before it is extrapolated from fewer queries")
    parser.add_argument("--score-budget-for", nargs="+", default=[], metavar="CONFIG=SECONDS",
                        help="another --score-budget for these configs (e.g. nafs/cuhk-pedes=40)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training batch instead of each config's (for a config whose batch does not fit this machine)")
    parser.add_argument("--identities", type=int, default=100,
                        help="synthetic identities rendered per input size (about 10 captions each)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--config-timeout", type=float, default=None, help="seconds before a config's process is stopped")
    parser.add_argument("--in-process", action="store_true",
                        help="run every config in this process (GPU only: saves a start per config; CUDA peaks are "
                             "per phase, a CPU's peak RSS would carry over; --config-timeout does not apply)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the synthetic data and stand-ins (kept)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (written after every config)")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve configs and overrides, print the plan, build and run nothing")
    parser.add_argument("--table", type=Path, nargs="+", default=None,
                        help="print the markdown table of results JSONs (one table; a config measured in a later "
                             "file replaces its failed entry of an earlier one) and exit")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.table is not None:
        print(table(merge_results([json.loads(path.read_text()) for path in args.table])))
        return 0
    if args.child is not None:
        spec = json.loads(args.child.read_text())
        result = run_config(spec)
        Path(spec["result"]).write_text(json.dumps(result, indent=2))
        return 0
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    warmup = min(args.warmup, args.steps - 1)
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not args.dry_run and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    if args.in_process and not on_gpu:
        parser.error("--in-process needs --device cuda: on a CPU the peak RSS of one config would carry over to the next")
    if args.in_process and args.config_timeout is not None:
        parser.error("--config-timeout needs a process per config; leave out --in-process")
    names, groups = select_configs(args)
    if not names:
        parser.error("no paper config selected")
    budgets = {}
    for item in args.score_budget_for:
        name, _, seconds = item.partition("=")
        if name not in names or not seconds:
            parser.error(f"--score-budget-for {item!r}: give CONFIG=SECONDS for a selected config ({', '.join(names)})")
        budgets[name] = float(seconds)

    from tbps.config import load_config, to_container

    sizes = {name: tuple(int(v) for v in to_container(load_config(name))["data"]["image_size"]) for name in names}
    settings = {"device": args.device, "precision": args.precision, "steps": args.steps, "warmup": warmup,
                "phases": args.phases, "engine": args.engine, "encode_batches": args.encode_batches,
                "image_batch": args.image_batch or (None if on_gpu else 8),
                "caption_batch": args.caption_batch or (None if on_gpu else 16),
                "routes": args.routes, "score_budget": args.score_budget, "score_budget_for": budgets,
                "in_process": args.in_process, "identities": args.identities, "threads": args.threads,
                "batch_size": args.batch_size}
    if args.dry_run:
        assets = {"bert": "<work>/assets/bert-base-uncased", "clip_tokenizer": "<work>/assets/clip/tokenizer"}
        print(json.dumps(settings))
        for name in names:
            print(f"{name}: {sizes[name][0]}x{sizes[name][1]}, same model as {groups[name]}; overrides "
                  f"{random_init_overrides(name, assets)}; {paper_num_classes(to_container(load_config(name)))} classes")
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="tbps-paper-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    roots, assets = prepare(work, sizes.values(), args.identities)
    payload: dict[str, Any] = {
        "command": "python benchmarks/bench_paper_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": settings, "machine": machine_info(args.device),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "prepare_seconds": round(time.perf_counter() - started, 1), "configs": [],
    }
    for name in names:
        height, width = sizes[name]
        spec = dict(settings, config=name, score_budget=budgets.get(name, args.score_budget), assets=assets, data_root=roots[f"{height}x{width}"], work=str(work),
                    result=str(work / f"result-{name.replace('/', '-')}.json"))
        spec_path = work / f"spec-{name.replace('/', '-')}.json"
        spec_path.write_text(json.dumps(spec))
        Path(spec["result"]).unlink(missing_ok=True)
        log_path = work / f"log-{name.replace('/', '-')}.txt"
        print(f"[{time.perf_counter() - started:7.0f} s] {name} ...", flush=True)
        begin = time.perf_counter()
        if args.in_process:
            try:
                entry = run_config(spec)
            except Exception:  # noqa: BLE001 - one config's failure is recorded, the others still run
                import traceback

                entry = {"config": name, "error": traceback.format_exc()}
            gc.collect()
            torch.cuda.empty_cache()
        else:
            with open(log_path, "w") as log:
                try:
                    code = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                          stdout=log, stderr=subprocess.STDOUT, timeout=args.config_timeout).returncode
                except subprocess.TimeoutExpired:
                    code = None
            if code == 0 and Path(spec["result"]).exists():
                entry = json.loads(Path(spec["result"]).read_text())
            else:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
                if code is None:
                    reason = f"timed out after {args.config_timeout} s"
                elif code == -signal.SIGKILL:
                    # What SIGKILLs a child nobody signalled is the kernel's out-of-memory killer.
                    reason = (f"killed (SIGKILL; on a machine of {machine_memory_gib():.0f} GiB, the out-of-memory killer): "
                              "try a smaller --batch-size")
                else:
                    reason = f"exit code {code}"
                entry = {"config": name, "error": reason + "\n" + "\n".join(tail)}
        entry["same_model_as"] = groups[name]
        entry["wall_seconds"] = round(time.perf_counter() - begin, 1)
        payload["configs"].append(entry)
        payload["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_results(args.out, payload)
        print(f"[{time.perf_counter() - started:7.0f} s] {name}: "
              + ("failed, see " + str(log_path) if "error" in entry else f"{entry['wall_seconds']} s"), flush=True)
    print(table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
