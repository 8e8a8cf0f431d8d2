"""Train and evaluate the baseline on the default synthetic benchmark; print a results row.

    python benchmarks/bench_baseline.py --out /tmp/tbps-bench [--identities 600 --epochs 4]

Runs the same pipeline as `tbps demo` (render -> train -> val selection -> test) and prints a
markdown row with R@1/R@5/R@10/mAP/mINP of the best-on-val and last checkpoints and the wall time,
for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tbps.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tbps-bench"))
    parser.add_argument("--identities", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()

    started = time.perf_counter()
    run_demo(args.out, identities=args.identities, epochs=args.epochs, seed=args.seed, extra_overrides=args.overrides)
    wall = time.perf_counter() - started
    report = json.loads((args.out / "runs" / "baseline" / "report.json").read_text())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads, {platform.machine()})"
    print("| checkpoint | epoch | val R@1 | R@1 | R@5 | R@10 | mAP | mINP | train s | wall s (incl. data) | device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tag, entry in report["checkpoints"].items():
        test = entry["test"]
        val = entry.get("val_R1")
        val_text = "n/a" if val is None else f"{val:.1f}"
        print(
            f"| {tag} | {entry['epoch']} | {val_text} | {test['R1']:.1f} | {test['R5']:.1f} | {test['R10']:.1f} | "
            f"{test['mAP']:.1f} | {test['mINP']:.1f} | {report['train_seconds']:.0f} | {wall:.0f} | {device} |"
        )


if __name__ == "__main__":
    main()
