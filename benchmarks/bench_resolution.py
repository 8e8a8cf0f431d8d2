"""What a local-alignment method sees and what it costs, per input size and last stride.

For each method of the synthetic benchmark (the exact ``bench_methods.py`` run settings) and each
candidate setting, one process per cell: build the model, take real training batches of the
synthetic benchmark, and time full optimisation steps (forward, backward, AdamW step) after
warm-up. Reports the final feature-map size (measured by a forward pass, not a formula), the
median step time, the implied minutes for the benchmark's 318 steps, and the process's peak RSS.

    python benchmarks/bench_resolution.py --data /work/bm/data --out benchmarks/results/resolution.json
    python benchmarks/bench_resolution.py --out benchmarks/results/resolution.json --table

Settings are ``HxW/last-stride``: ``128x48/2`` (the old default, 4x1 map), ``128x48/1`` (8x3),
``192x64/1`` (12x4), ``256x96/2`` (8x3).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import COMMON, SUITE  # noqa: E402  (the benchmark's own run settings)

from tbps.config import load_config  # noqa: E402
from tbps.utils import atomic_write  # noqa: E402

SETTINGS = ("128x48/2", "128x48/1", "192x64/1", "256x96/2")
METHODS = ("baseline", "nafs", "acsa", "isanet", "laip")
BENCH_STEPS = 318  # bench_methods.py: 6 epochs x 53 steps at batch 64


def setting_overrides(setting: str) -> list[str]:
    size, _, stride = setting.partition("/")
    height, width = size.split("x")
    return [f"data.image_size=[{height},{width}]", f"model.image_backbone.last_stride={stride}"]


def measure(method_run: str, setting: str, data: Path, steps: int, warmup: int) -> dict:
    """One cell, in this process (called in a fresh subprocess so peak RSS is the cell's own)."""
    from omegaconf import OmegaConf

    from tbps.data.readers import val_split_seed
    from tbps.engine.datamodule import PersonSearchDataModule, load_configured_dataset
    from tbps.engine.module import PersonSearchModule
    from tbps.models.backbones.image import ImageBackbone

    config_name, overrides = SUITE[method_run]
    config = load_config(config_name, [*COMMON, *overrides, *setting_overrides(setting), f"data.root={data}",
                                       "data.num_workers=0"])
    torch.manual_seed(0)
    dataset = load_configured_dataset(config["data"], val_split_seed(config))
    records = dataset.split("train")
    labels = {pid: i for i, pid in enumerate(sorted({r.person_id for r in records}))}
    module = PersonSearchModule(OmegaConf.to_container(config, resolve=True), num_classes=len(labels), label_map=labels)
    method = module.method
    method.fit_text([caption for record in records for caption in record.captions])
    datamodule = PersonSearchDataModule(config["data"], dataset, method.build_text_processor(), method.image_mean_std,
                                        seed=int(config["seed"]))
    loader = iter(datamodule.train_dataloader())
    backbone = next(m for m in method.modules() if isinstance(m, ImageBackbone))  # NAFS's branches reuse its stages
    feature_map = backbone.feature_map_sizes(tuple(config["data"]["image_size"]))[-1]
    groups = method.parameter_groups()
    optimizer = torch.optim.AdamW([p for ps in groups.values() for p in ps], lr=1e-4)
    method.train()
    method.set_epoch(int(config["trainer"]["max_epochs"]) - 1)  # the last epoch: every loss is on
    times = []
    for step in range(warmup + steps):
        batch = next(loader)
        started = time.perf_counter()
        losses = method(batch)
        total = torch.stack(list(losses.values())).sum()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "method": method_run,
        "setting": setting,
        "feature_map": list(feature_map),
        "batch_size": int(config["data"]["batch_size"]),
        "step_seconds_median": median,
        "step_seconds": times,
        "bench_minutes": median * BENCH_STEPS / 60,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def print_table(results: dict) -> None:
    print("| method | input / last stride | final map (H×W) | step s (median) | 318 steps min | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for key in sorted(results, key=lambda k: (METHODS.index(results[k]["method"]) if results[k]["method"] in METHODS else 99,
                                              SETTINGS.index(results[k]["setting"]) if results[k]["setting"] in SETTINGS else 99)):
        row = results[key]
        if "error" in row:
            print(f"| {row['method']} | {row['setting']} | failed: {row['error'][:100]} | | | |")
            continue
        fmap = "×".join(str(v) for v in row["feature_map"])
        print(f"| {row['method']} | {row['setting']} | {fmap} | {row['step_seconds_median']:.2f} | "
              f"{row['bench_minutes']:.1f} | {row['peak_rss_mib']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=sorted(SUITE))
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--cell", nargs=2, metavar=("METHOD", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.cell:
        print(json.dumps(measure(args.cell[0], args.cell[1], args.data, args.steps, args.warmup)))
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not args.table:
        if args.data is None:
            parser.error("--data is needed to measure")
        for method_run in args.methods:
            for setting in args.settings:
                command = [sys.executable, __file__, "--data", str(args.data), "--out", str(args.out), "--steps",
                           str(args.steps), "--warmup", str(args.warmup), "--cell", method_run, setting]
                done = subprocess.run(command, capture_output=True, text=True)
                key = f"{method_run}@{setting}"
                if done.returncode == 0:
                    results[key] = json.loads(done.stdout.strip().splitlines()[-1])
                else:
                    results[key] = {"method": method_run, "setting": setting, "error": done.stderr.strip().splitlines()[-1]}
                print(f"== {key}: {results[key].get('step_seconds_median', results[key].get('error'))}", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(args.out) as handle:
                    json.dump(results, handle, indent=2)
    print_table(results)


if __name__ == "__main__":
    main()
