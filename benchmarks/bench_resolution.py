"""What a local-alignment method sees and what it costs, per input size and last stride.

For each method of the synthetic benchmark (the exact ``bench_methods.py`` run settings) and each
candidate setting: build the model, take real training batches of the synthetic benchmark, and
time full optimisation steps (forward, backward, AdamW step) after warm-up. One process per
method builds a model per setting and interleaves their steps, so on a machine shared with other
work every setting sees the same load and the ratios stay meaningful (the 1-minute load average
is recorded); peak RSS comes from a separate process per cell (build + 2 steps). Reports the final
feature-map size (measured by a forward pass, not a formula), the median step time, its ratio to
the first setting, the implied minutes for the benchmark's 318 steps, and the peak RSS.

    python benchmarks/bench_resolution.py --data /work/bm/data --out benchmarks/results/resolution.json
    python benchmarks/bench_resolution.py --out benchmarks/results/resolution.json --table

Settings are ``HxW/last-stride``: ``128x48/2`` (the old default, 4x1 map), ``128x48/1`` (8x3),
``192x64/1`` (12x4), ``256x96/2`` (8x3).
"""

from __future__ import annotations

import argparse
import json
import os
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


class Cell:
    """One (method, setting): its model, optimiser and an endless stream of real training batches."""

    def __init__(self, method_run: str, setting: str, data: Path) -> None:
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
        self.method = module.method
        self.method.fit_text([caption for record in records for caption in record.captions])
        datamodule = PersonSearchDataModule(config["data"], dataset, self.method.build_text_processor(),
                                            self.method.image_mean_std, seed=int(config["seed"]))
        self.loader = iter(datamodule.train_dataloader())
        backbone = next(m for m in self.method.modules() if isinstance(m, ImageBackbone))  # NAFS's branches reuse its stages
        self.feature_map = backbone.feature_map_sizes(tuple(config["data"]["image_size"]))[-1]
        self.batch_size = int(config["data"]["batch_size"])
        self.optimizer = torch.optim.AdamW([p for ps in self.method.parameter_groups().values() for p in ps], lr=1e-4)
        self.method.train()
        self.method.set_epoch(int(config["trainer"]["max_epochs"]) - 1)  # the last epoch: every loss is on
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        batch = next(self.loader)
        started = time.perf_counter()
        losses = self.method(batch)
        total = torch.stack(list(losses.values())).sum()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if record:
            self.times.append(time.perf_counter() - started)


def measure_memory(method_run: str, setting: str, data: Path) -> dict:
    """One cell alone, in a fresh subprocess: peak RSS over build + two training steps, and the
    floating-point operations of one full step (forward + backward) counted by PyTorch's
    FlopCounterMode (matmuls and convolutions; element-wise work is not counted). The count does
    not depend on how loaded the machine is, so it ranks the settings' cost where timings cannot."""
    from torch.utils.flop_counter import FlopCounterMode

    cell = Cell(method_run, setting, data)
    cell.step(record=False)
    with FlopCounterMode(display=False) as counter:
        cell.step(record=False)
    return {"feature_map": list(cell.feature_map), "gflop_per_step": counter.get_total_flops() / 1e9,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_times(method_run: str, settings: list[str], data: Path, steps: int, warmup: int) -> dict:
    """Step times of every setting of one method, interleaved step by step in one process, so a
    machine shared with other work loads every setting alike and the ratios stay meaningful."""
    cells = {setting: Cell(method_run, setting, data) for setting in settings}
    load = []
    for round_index in range(warmup + steps):
        for cell in cells.values():
            cell.step(record=round_index >= warmup)
        load.append(os.getloadavg()[0])
    return {
        setting: {
            "method": method_run,
            "setting": setting,
            "feature_map": list(cell.feature_map),
            "batch_size": cell.batch_size,
            "step_seconds_median": statistics.median(cell.times),
            "step_seconds": cell.times,
            "bench_minutes": statistics.median(cell.times) * BENCH_STEPS / 60,
            "load_average_1min": load,
            "threads": torch.get_num_threads(),
        }
        for setting, cell in cells.items()
    }


def print_table(results: dict) -> None:
    print(f"| method | input / last stride | final map (H×W) | GFLOP / step | × {SETTINGS[0]} | step s (median) | × {SETTINGS[0]} "
          f"| 318 steps min | peak RSS MiB | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(results, key=lambda k: (METHODS.index(results[k]["method"]) if results[k]["method"] in METHODS else 99,
                                              SETTINGS.index(results[k]["setting"]) if results[k]["setting"] in SETTINGS else 99)):
        row = results[key]
        if "error" in row:
            print(f"| {row['method']} | {row['setting']} | failed: {row['error'][:100]} | | | | | | | |")
            continue
        fmap = "×".join(str(v) for v in row["feature_map"])
        reference = results.get(f"{row['method']}@{SETTINGS[0]}", {}).get("step_seconds_median")
        ratio = f"{row['step_seconds_median'] / reference:.2f}" if reference else "–"
        memory = f"{row['peak_rss_mib']:.0f}" if row.get("peak_rss_mib") else "–"
        gflop = f"{row['gflop_per_step']:.0f}" if row.get("gflop_per_step") else "–"
        reference_gflop = results.get(f"{row['method']}@{SETTINGS[0]}", {}).get("gflop_per_step")
        gflop_ratio = f"{row['gflop_per_step'] / reference_gflop:.2f}" if reference_gflop and row.get("gflop_per_step") else "–"
        load = statistics.mean(row["load_average_1min"])
        print(f"| {row['method']} | {row['setting']} | {fmap} | {gflop} | {gflop_ratio} | {row['step_seconds_median']:.2f} | "
              f"{ratio} | {row['bench_minutes']:.1f} | {memory} | {load:.1f} |")


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
    parser.add_argument("--times", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.cell:  # one subprocess: the cell's own peak memory
        print(json.dumps(measure_memory(args.cell[0], args.cell[1], args.data)))
        return
    if args.times:  # one subprocess per method: its settings' step times, interleaved
        print(json.dumps(measure_times(args.times, args.settings, args.data, args.steps, args.warmup)))
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not args.table:
        if args.data is None:
            parser.error("--data is needed to measure")
        common = ["--data", str(args.data), "--out", str(args.out), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        for method_run in args.methods:
            done = subprocess.run([sys.executable, __file__, *common, "--settings", *args.settings, "--times", method_run],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                error = done.stderr.strip().splitlines()[-1]
                for setting in args.settings:
                    results[f"{method_run}@{setting}"] = {"method": method_run, "setting": setting, "error": error}
                print(f"== {method_run}: {error}", flush=True)
                continue
            timed = json.loads(done.stdout.strip().splitlines()[-1])
            for setting in args.settings:
                memory = subprocess.run([sys.executable, __file__, *common, "--cell", method_run, setting],
                                        capture_output=True, text=True)
                row = timed[setting]
                if memory.returncode == 0:
                    row.update({key: value for key, value in json.loads(memory.stdout.strip().splitlines()[-1]).items()
                                if key != "feature_map"})
                results[f"{method_run}@{setting}"] = row
                print(f"== {method_run}@{setting}: {row['step_seconds_median']:.2f} s/step", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(args.out) as handle:
                json.dump(results, handle, indent=2)
    print_table(results)


if __name__ == "__main__":
    main()
