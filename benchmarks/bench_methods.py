"""Train every method (and its ablation rows) with the same backbones, data and budget on the
synthetic benchmark, then score each best-on-val checkpoint's test features several ways.
``--seeds 0 1 2`` trains every named run once per seed (keys ``NAME@seedN``; seed 0 keeps the
bare name) and prints the mean ± half-range over seeds.

    python benchmarks/bench_methods.py --data /tmp/bench1/data --out /tmp/tbps-methods \
        --runs baseline nafs nafs-global acsa acsa-I+II ...
    python benchmarks/bench_methods.py --out /tmp/tbps-methods --table     # print the tables only

Generate the data first (the demo's 500 identities): `tbps data synth --out /tmp/bench1/data
--identities 500 --seed 0`. Every run gets the COMMON overrides below: EfficientNet-Lite0 with its
first two stages frozen at 128x48 with last stride 1 (final map 8x3: see bench_resolution.py for
why this setting), MiniLM with its first three layers frozen (the Bi-LSTM runs: trained from
scratch), batch 64, 6 epochs of 53 steps (an epoch is a pass over the 3,443 training captions
with either sampler, so ISANet's identity sampler gets the same 318 steps). A run whose
``report.json`` already exists is not trained again, and one with only a ``last.ckpt`` (stopped
part-way) resumes from it (``--adopt NAME=RUN_DIR`` copies in a run
trained elsewhere with the same settings, e.g. the demo's baseline).

For each best-on-val checkpoint the test split is encoded once (timed) and scored by:
``method`` (the method's own test similarity), ``global`` (global cosine only), ``rvn`` (the
method's similarity re-ranked by the shared RVN), and for methods with a fine scorer
``two-stage@k`` (global top-k re-scored by ``score_candidates``; LAIP's ITM) for each ``--top-k``,
and ``local`` (the fine score alone, e.g. NAFS's eq. 5) for methods whose ``test_similarity``
offers it.
Results go to ``OUT/results.json`` (one entry per run) and are printed as markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from tbps.config import load_config
from tbps.engine.checkpoint import load_method
from tbps.data.readers import val_split_seed
from tbps.engine.datamodule import load_configured_dataset
from tbps.engine.train import train
from tbps.evaluation.evaluator import encode_image_batches, encode_text_batches, eval_loaders, score_features
from tbps.evaluation.rank import rank
from tbps.utils import atomic_write
from tbps.utils.notices import quiet_library_notices

EPOCHS = 6  # of the random sampler: 3,443 training captions / 64 = 53 steps each
COMMON = [
    "data.image_size=[128,48]",
    "data.batch_size=64",
    "data.sampler=random",
    "model.image_backbone.name=efficientnet_lite0",
    "model.image_backbone.freeze_stages=2",
    "model.image_backbone.last_stride=1",  # final map 8x3 (4x1 with stride 2)
    f"trainer.max_epochs={EPOCHS}",
    "trainer.progress_bar=false",
    "optim.warmup_epochs=0.5",
]
MINILM = ["model.text_backbone.name=minilm", "model.text_backbone.freeze_layers=3"]
BILSTM_BASELINE = [
    "model.text_backbone.name=bilstm", "model.text_backbone.pretrained=null", "model.text_backbone.freeze_layers=null",
    "model.text_backbone.embedding_dim=300",
    "model.text_backbone.hidden_size=512",
    "model.text_backbone.min_count=2",
]
# ISANet's identity sampler (16 identities x 4 captions); its epoch is a pass over the captions (53
# steps), as the random sampler's.
ISANET = ["data.sampler=identity", "data.num_instances=4",
          "optim.lr=1.0e-2"]  # the paper's lr for the new layers (backbone x0.1 = its 1e-3)
# LAIP: ALBEF fine-tunes its pretrained encoders at 1e-4; the fusion's cross-attention blocks are
# new here, so they get 10x that as every other method's new layers do. Stage 2 (all losses)
# from epoch 4 of 6 (the paper: 30 + 15 epochs).
# Validation (model selection) scores by ITC alone: ITM re-scoring of every val query each epoch
# costs more than the training epoch on 2 cores. The best checkpoint is then scored the paper's
# way, ITC top-k re-scored by ITM, for each --top-k.
# MiniLM's first 3 layers are LAIP's whole text encoder, so none is frozen: MiniLM's [CLS] is
# untrained for sentences (it was trained with mean pooling), and at layer 3 it is the same vector
# for every caption (cosine 1.000), so a frozen text encoder gave ITC a constant text feature
# (a first run so configured stayed at chance, val R@1 2.1 after 4 epochs).
# Its ITC text vector is the mean of the text encoder's tokens (``text_pooling: mean``), as MiniLM
# was trained; the fusion encoder's [CLS] still drives ITM.
LAIP = ["optim.lr=1.0e-3", "optim.backbone_lr_mult=0.1", "model.local_losses_start_epoch=4", "eval.rerank=none",
        "model.text_backbone.freeze_layers=0", "model.text_pooling=mean"]
# ISANet's own schedule (Sec. IV-A: 70 epochs, linear warm-up over the first 10, x0.1 at 30 and 50)
# scaled to this run's length in place of the common half-epoch warm-up and cosine.
ISANET_PAPER_SCHEDULE = ["optim.scheduler=multistep", f"optim.warmup_epochs={10 / 70 * EPOCHS:.4f}",
                         f"optim.milestones=[{30 / 70 * EPOCHS:.4f},{50 / 70 * EPOCHS:.4f}]", "optim.gamma=0.1"]
# SSAN's lr (the recipe ISANet follows): 1e-3 for the new layers, backbone x0.1.
ISANET_SSAN_LR = ["optim.lr=1.0e-3"]
# Three times the common budget: 18 epochs = 954 steps. LAIP's stage 2 keeps the last third.
X3 = [f"trainer.max_epochs={3 * EPOCHS}"]
LAIP_X3 = X3 + ["model.local_losses_start_epoch=12"]
# LAIP's Table IV row 1: ITC + ITM only (no triplet, MPM or BidirAtt).
LAIP_ITC_ITM = ["model.losses.triplet=0", "model.losses.mpm=0", "model.losses.bidiratt=0"]
# Table III row 1: ISANet's global alignment alone.
ISANET_GA = ["model.local_alignment=false", "model.rgl.mode=none", "model.caf.mode=none"]
# The baseline's global recipe (avg+max image pooling, CMPC weight 1, lr 2e-3) inside ACSA.
ACSA_BASELINE_RECIPE = ["model.image_pooling=avg+max", "model.losses.cmpc=1.0", "optim.lr=2.0e-3"]

SUITE: dict[str, tuple[str, list[str]]] = {
    # name: (config, overrides on top of COMMON)
    "baseline": ("baseline/synthetic", MINILM),
    "baseline-bilstm": ("baseline/synthetic", BILSTM_BASELINE),
    # The baseline over three times the steps (954): the bar for the "-x3" rows below.
    "baseline-x3": ("baseline/synthetic", MINILM + X3),
    "nafs": ("nafs/synthetic", MINILM),
    "nafs-global": ("nafs/synthetic", MINILM + ["model.scales=global"]),                     # Table 2 "Global"
    "nafs-separate": ("nafs/synthetic", MINILM + ["model.alignment=separate"]),              # Table 3
    "nafs-no-shuffle": ("nafs/synthetic", MINILM + ["model.split_shuffle=false"]),           # Table 4
    "acsa": ("acsa/synthetic", MINILM),                                                      # relations I-III
    "acsa-I": ("acsa/synthetic", MINILM + ["model.relations=I"]),                            # Table V row 1
    "acsa-I+II": ("acsa/synthetic", MINILM + ["model.relations=I+II"]),                      # Table V row 2
    "acsa-I-IV": ("acsa/synthetic", MINILM + ["model.relations=I-IV"]),                      # Table V row 4
    "acsa-channel": ("acsa/synthetic", MINILM + ["model.region_source=channel"]),            # regions as the public code's channel chunks
    # Diagnostic: ACSA's global branch with the baseline's CMPC weight (mu = 1 instead of 4).
    "acsa-I-cmpc1": ("acsa/synthetic", MINILM + ["model.relations=I", "model.losses.cmpc=1.0"]),
    "acsa-I-baseline-recipe": ("acsa/synthetic", MINILM + ACSA_BASELINE_RECIPE + ["model.relations=I"]),
    "acsa-baseline-recipe": ("acsa/synthetic", MINILM + ACSA_BASELINE_RECIPE),
    "isanet": ("isanet/synthetic", ISANET),                                                  # GA + ILA + RGL + CAF
    "isanet-GA": ("isanet/synthetic", ISANET + ISANET_GA),
    "isanet-GA+ILA": ("isanet/synthetic", ISANET + ["model.rgl.mode=none", "model.caf.mode=none"]),
    "isanet-GA+ILA+RGL": ("isanet/synthetic", ISANET + ["model.caf.mode=none"]),
    # Table III "Baseline": no GA (shared projection of the pooled map), no ILA, no RGL, no CAF.
    "isanet-baseline": ("isanet/synthetic", ISANET + ["model.global_alignment=false", "model.local_alignment=false",
                                                      "model.rgl.mode=none", "model.caf.mode=none"]),
    # Table IV: RGL replaced by CBAM or RGA-S (the rest of ISANet as is).
    "isanet-cbam": ("isanet/synthetic", ISANET + ["model.rgl.mode=cbam"]),
    "isanet-rga": ("isanet/synthetic", ISANET + ["model.rgl.mode=rga"]),
    "isanet-no-cons": ("isanet/synthetic", ISANET + ["model.losses.consistency=0"]),           # the "w/o L_cons" ablation
    # Diagnostic: ISANet at a tenth of the paper's lr (new layers 1e-3, backbone 1e-4).
    "isanet-lr1e-3": ("isanet/synthetic", ISANET + ISANET_SSAN_LR),
    # Diagnostics: which of GA's two losses (eq. 17's ID, eqs. 18-19's ranking) trains it, and
    # whether the Bi-LSTM trained from scratch is what holds ISANet back (MiniLM as the other rows).
    "isanet-GA-id-only": ("isanet/synthetic", ISANET + ISANET_GA + ["model.losses.rank=0"]),
    "isanet-GA-rank-only": ("isanet/synthetic", ISANET + ISANET_GA + ["model.losses.id=0"]),
    # Diagnostics: GA at a tenth and a hundredth of the paper's lr (Adam at 1e-2 moves W_g's
    # outputs by several units a step: its inputs are the backbone's raw 1280 channels).
    "isanet-GA-lr1e-3": ("isanet/synthetic", ISANET + ISANET_GA + ISANET_SSAN_LR),
    "isanet-GA-lr1e-4": ("isanet/synthetic", ISANET + ISANET_GA + ["optim.lr=1.0e-4"]),
    # Diagnostic: SSAN's text branch regularises the word embeddings with dropout 0.3 (its code;
    # neither paper says so); ISANet's caption features collapse without it.
    "isanet-GA-text-dropout": ("isanet/synthetic", ISANET + ISANET_GA + ["model.text_backbone.dropout=0.3"]),
    # Diagnostics: SSAN's semi-hard negatives (the default) only touch negatives already ranked
    # below the positive; the hardest one, or every one, of each anchor instead.
    "isanet-GA-hardest": ("isanet/synthetic", ISANET + ISANET_GA + ["model.losses.negative_sampling=hardest"]),
    "isanet-GA-all": ("isanet/synthetic", ISANET + ISANET_GA + ["model.losses.negative_sampling=all"]),
    # Diagnostics: the paper's lr under the paper's schedule shape (a warm-up over 1/7 of the run,
    # not 1/12), GA and full ISANet.
    "isanet-GA-paper-schedule": ("isanet/synthetic", ISANET + ISANET_GA + ISANET_PAPER_SCHEDULE),
    "isanet-paper-schedule": ("isanet/synthetic", ISANET + ISANET_PAPER_SCHEDULE),
    # The same two at SSAN's lr, where GA's features stay bounded.
    "isanet-GA-lr1e-3-hardest": ("isanet/synthetic", ISANET + ISANET_GA + ISANET_SSAN_LR + ["model.losses.negative_sampling=hardest"]),
    "isanet-GA-lr1e-3-all": ("isanet/synthetic", ISANET + ISANET_GA + ISANET_SSAN_LR + ["model.losses.negative_sampling=all"]),
    # Full ISANet with every negative (GA learns about 3x as fast with it as with SSAN's sampling).
    "isanet-lr1e-3-all": ("isanet/synthetic", ISANET + ISANET_SSAN_LR + ["model.losses.negative_sampling=all"]),
    "isanet-lr1e-3-all-x3": ("isanet/synthetic", ISANET + ISANET_SSAN_LR + ["model.losses.negative_sampling=all"] + X3),
    # ... and its global-only row at the same 954 steps, the bar full ISANet must clear.
    "isanet-GA-lr1e-3-all-x3": ("isanet/synthetic", ISANET + ISANET_GA + ISANET_SSAN_LR + ["model.losses.negative_sampling=all"] + X3),
    # Diagnostics: GA and full ISANet at SSAN's lr with three times the steps, to see whether the
    # global branch keeps learning and whether the local alignment then adds to it.
    "isanet-GA-lr1e-3-x3": ("isanet/synthetic", ISANET + ISANET_GA + ISANET_SSAN_LR + X3),
    "isanet-lr1e-3-x3": ("isanet/synthetic", ISANET + ISANET_SSAN_LR + X3),
    # Which of ISANet's local modules costs its GA at that budget (Table III rows 2 and 3).
    "isanet-GA+ILA-lr1e-3-x3": ("isanet/synthetic", ISANET + ["model.rgl.mode=none", "model.caf.mode=none"] + ISANET_SSAN_LR + X3),
    "isanet-GA+ILA+RGL-lr1e-3-x3": ("isanet/synthetic", ISANET + ["model.caf.mode=none"] + ISANET_SSAN_LR + X3),
    "isanet-minilm": ("isanet/synthetic", ISANET + MINILM + [f"model.text_backbone.{key}=null" for key in
                                                             ("embedding_dim", "hidden_size", "min_count", "combine")]),
    "laip": ("laip/synthetic", MINILM + LAIP),
    # Table IV: row 1 ITC + ITM; rows 3-5 + one attention (no MPM, no triplet); 8 = laip (all).
    # Row 2 is row 1 fine-tuned on COCO first: no switch, no offline data.
    "laip-itc+itm": ("laip/synthetic", MINILM + LAIP + LAIP_ITC_ITM),
    "laip-+triplet": ("laip/synthetic", MINILM + LAIP + ["model.losses.mpm=0", "model.losses.bidiratt=0"]),  # row 8 without the local stream
    "laip-forward": ("laip/synthetic", MINILM + LAIP + ["model.attention_mode=forward"]),    # row 8 with ForAtt for BidirAtt
    "laip-backward": ("laip/synthetic", MINILM + LAIP + ["model.attention_mode=backward"]),  # row 8 with BackAtt for BidirAtt
    "laip-row3": ("laip/synthetic", MINILM + LAIP + ["model.losses.triplet=0", "model.losses.mpm=0", "model.attention_mode=forward"]),  # ForAtt only
    "laip-row5": ("laip/synthetic", MINILM + LAIP + ["model.losses.triplet=0", "model.losses.mpm=0"]),  # BidirAtt only
    "laip-row7": ("laip/synthetic", MINILM + LAIP + ["model.losses.triplet=0"]),  # BidirAtt + MPM, no triplet
    # Each method and its global-only row over the same 954 steps (against baseline-x3).
    "acsa-x3": ("acsa/synthetic", MINILM + X3),
    "acsa-I-x3": ("acsa/synthetic", MINILM + ["model.relations=I"] + X3),
    "nafs-x3": ("nafs/synthetic", MINILM + X3),
    "nafs-global-x3": ("nafs/synthetic", MINILM + ["model.scales=global"] + X3),
    "laip-x3": ("laip/synthetic", MINILM + LAIP + LAIP_X3),
    "laip-itc+itm-x3": ("laip/synthetic", MINILM + LAIP + LAIP_ITC_ITM + LAIP_X3),
}
METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def run_key(name: str, seed: int) -> str:
    """Results key and run folder of one run: seed 0 keeps the bare name (earlier results)."""
    return name if seed == 0 else f"{name}@seed{seed}"


def train_run(name: str, seed: int, data: Path, out: Path, extra: list[str]) -> dict:
    config_name, overrides = SUITE[name]
    key = run_key(name, seed)
    run_dir = out / "runs" / key
    if not (run_dir / "report.json").is_file():
        config = load_config(config_name, [*COMMON, *overrides, f"seed={seed}", f"data.root={data}",
                                           f"trainer.output_dir={out / 'runs'}", f"trainer.run_name={key}", *extra])
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            # A run stopped part-way (a session ended, a kill) continues from its last epoch's
            # checkpoint; train() refuses it if the settings asked for now differ from the run's.
            print(f"{key}: resuming {run_dir}", flush=True)
            train(config, resume=run_dir)
        else:
            train(config)
    return json.loads((run_dir / "report.json").read_text())


def score_run(name: str, report: dict, top_ks: list[int]) -> dict:
    """Score the best-on-val checkpoint's test features every way that applies, timing each."""
    checkpoint = report["checkpoints"]["best"]["path"]
    method, config = load_method(checkpoint)
    data = config["data"]
    dataset = load_configured_dataset(data, val_split_seed(config))
    records = dataset.split("test")
    gallery, queries = eval_loaders(records, method, data["image_size"], batch_size=int(data["eval_batch_size"]))
    started = time.perf_counter()
    with torch.inference_mode():
        image_features = encode_image_batches(method, gallery)
    image_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with torch.inference_mode():
        text_features = encode_text_batches(method, queries)
    text_seconds = time.perf_counter() - started
    query_ids = torch.tensor([q.person_id for q in queries.dataset.queries])
    gallery_ids = torch.tensor([r.person_id for r in records])

    modes: list[tuple[str, dict]] = [("method", {"rerank": "none"}), ("rvn", {"rerank": "rvn"})]
    # A method (or ablation, e.g. ACSA's relations I) without a fine score has nothing to re-score.
    has_fine_scorer = bool(method.has_fine_similarity)
    if has_fine_scorer:
        modes.append(("global", {}))
        modes += [(f"two-stage@{k}", {"rerank": "two-stage", "top_k": k}) for k in top_ks]
    if has_fine_scorer and getattr(method, "test_similarity", None) == "global+local":
        modes.append(("local", {"rerank": "none"}))
    scores = {}
    for mode, options in modes:
        started = time.perf_counter()
        with torch.inference_mode():
            if mode == "global":
                similarity = method.global_similarity(text_features, image_features)
            elif mode == "local":
                method.test_similarity = "local"  # the fine score alone (NAFS eq. 5), same features
                try:
                    similarity = score_features(method, text_features, image_features, **options)
                finally:
                    method.test_similarity = "global+local"
            else:
                similarity = score_features(method, text_features, image_features, **options)
        seconds = time.perf_counter() - started
        metrics = rank(similarity, query_ids, gallery_ids, max_rank=10)
        scores[mode] = {**{key: float(metrics[key]) for key in METRICS}, "seconds": seconds,
                        "ms_per_query": 1000 * seconds / len(query_ids)}
    return {
        "encode_images_seconds": image_seconds,
        "encode_texts_seconds": text_seconds,
        "queries": len(query_ids),
        "gallery": len(gallery_ids),
        "scores": scores,
    }


def print_tables(results: dict) -> None:
    print("| run | checkpoint | epoch | val R@1 | R@1 | R@5 | R@10 | mAP | mINP | train min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in results.items():
        if "error" in entry:
            print(f"| {name} | failed: {entry['error'][:120]} | | | | | | | | |")
            continue
        report = entry["report"]
        for tag, checkpoint in report["checkpoints"].items():
            test = checkpoint["test"]
            val = checkpoint.get("val_R1")
            train_min = f"{report['train_seconds'] / 60:.1f}" if tag == "best" and report.get("train_seconds") else ""
            print(f"| {name} | {'best-on-val' if tag == 'best' else 'last'} | {checkpoint['epoch']} | "
                  f"{'n/a' if val is None else f'{val:.1f}'} | " + " | ".join(f"{test[k]:.1f}" for k in METRICS) + f" | {train_min} |")
    print()
    print("| run | scoring (best-on-val) | R@1 | R@5 | R@10 | mAP | mINP | encode images + texts s | scoring s | ms / query |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in results.items():
        scored = entry.get("scored")
        if not scored:
            continue
        encode = f"{scored['encode_images_seconds']:.1f} + {scored['encode_texts_seconds']:.1f}"
        for mode, row in scored["scores"].items():
            print(f"| {name} | {mode} | " + " | ".join(f"{row[k]:.1f}" for k in METRICS)
                  + f" | {encode} | {row['seconds']:.2f} | {row['ms_per_query']:.2f} |")


def print_seed_summary(results: dict) -> None:
    """Mean ± half-range over the seeds of each run that has more than one (best-on-val and last)."""
    by_run: dict[str, list[dict]] = {}
    for key, entry in results.items():
        if "report" in entry:
            by_run.setdefault(key.split("@seed")[0], []).append(entry["report"]["checkpoints"])
    rows = {name: runs for name, runs in by_run.items() if len(runs) > 1}
    if not rows:
        return
    print()
    print("| run | seeds | best-on-val R@1 | best-on-val mAP | last R@1 | last mAP |")
    print("|---|---|---|---|---|---|")
    for name, runs in rows.items():
        cells = []
        for tag in ("best", "last"):
            for metric in ("R1", "mAP"):
                values = [run[tag]["test"][metric] for run in runs if tag in run]
                mean = sum(values) / len(values)
                cells.append(f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f}")
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")


def main() -> None:
    quiet_library_notices()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="the synthetic benchmark (CUHK-PEDES layout)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="*", default=[], choices=sorted(SUITE))
    parser.add_argument("--adopt", nargs="*", default=[], metavar="NAME=RUN_DIR")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="train each run once per seed (seed 0 first)")
    parser.add_argument("--top-k", type=int, nargs="*", default=[16, 64, 128])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run (last wins)")
    parser.add_argument("--table", action="store_true", help="only print the tables from OUT/results.json")
    args = parser.parse_args()

    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not args.table:
        if args.data is None:
            parser.error("--data is needed to train")
        for item in args.adopt:
            name, _, source = item.partition("=")
            target = args.out / "runs" / name
            if not target.exists():
                shutil.copytree(source, target)
                report_file = target / "report.json"  # point the report at the copied checkpoints
                report_file.write_text(report_file.read_text().replace(str(Path(source).resolve()), str(target.resolve())))
        for seed in args.seeds:
            for name in args.runs:
                key = run_key(name, seed)
                started = time.perf_counter()
                try:
                    report = train_run(name, seed, args.data.resolve(), args.out.resolve(), args.set)
                    scored = score_run(name, report, args.top_k)
                except Exception as error:  # a diverging run is a result too; the queue goes on
                    results[key] = {"error": f"{type(error).__name__}: {error}", "wall_seconds": time.perf_counter() - started}
                    print(f"== {key} failed: {results[key]['error']}", flush=True)
                else:
                    results[key] = {"report": report, "scored": scored, "wall_seconds": time.perf_counter() - started,
                                    "seed": seed, "setting": {"common": COMMON, "set": args.set},
                                    "device": f"CPU ({torch.get_num_threads()} threads, {platform.machine()})"}
                    print(f"== {key} done in {results[key]['wall_seconds'] / 60:.1f} min", flush=True)
                args.out.mkdir(parents=True, exist_ok=True)
                # Merged into the file as it is now: another invocation on the same OUT (a
                # diagnostic, a rescoring) may have written its entries since this one started.
                on_disk = json.loads(results_path.read_text()) if results_path.is_file() else {}
                results = {**on_disk, key: results[key]}
                with atomic_write(results_path) as handle:
                    json.dump(results, handle, indent=2)
    print_tables(results)
    print_seed_summary(results)


if __name__ == "__main__":
    main()
