"""Draw the attention figures of ``docs/figures/`` from the benchmark's checkpoints, and say in
``docs/figures/README.md`` exactly what each one shows (checkpoint, setting, image, caption).

Each named run's best-on-val checkpoint (``OUT/runs/NAME/checkpoints/best.ckpt`` of
``bench_methods.py``) draws its attention with ``tbps explain`` (the command a user runs) for the
same test image and caption: the ``--test-index``-th test image of the run's own dataset split
and its first caption, so every method is shown the same pair.

    PYTHONPATH=src python benchmarks/attention_figures.py --out /work/bm2 --runs acsa nafs isanet laip
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tbps.data.readers import val_split_seed
from tbps.engine.checkpoint import read_checkpoint
from tbps.engine.datamodule import load_configured_dataset
from tbps.utils import atomic_write

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def feature_map_note(config: dict) -> str:
    backbone = config["model"]["image_backbone"]
    height, width = config["data"]["image_size"]
    return f"{backbone['name']} at {height}x{width}, last stride {backbone.get('last_stride', 2)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="bench_methods.py's --out folder")
    parser.add_argument("--runs", nargs="+", required=True, help="run names (results keys), e.g. acsa nafs@seed1")
    parser.add_argument("--test-index", type=int, default=0, help="which test image (its first caption)")
    parser.add_argument("--figures", type=Path, default=FIGURES)
    args = parser.parse_args()

    args.figures.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rows = []
    for name in args.runs:
        checkpoint = args.out / "runs" / name / "checkpoints" / "best.ckpt"
        if not checkpoint.is_file():
            raise SystemExit(f"{name}: no best-on-val checkpoint at {checkpoint} (has the run finished?)")
        saved = read_checkpoint(checkpoint)
        tbps, epoch = saved["tbps"], int(saved["epoch"]) + 1  # epochs counted from 1, as the reports do
        config = tbps["config"]
        record = load_configured_dataset(config["data"], val_split_seed(config)).split("test")[args.test_index]
        caption = record.captions[0]
        figure = args.figures / f"attention_{config['method']}.png"
        subprocess.run([sys.executable, "-m", "tbps", "explain", "--checkpoint", str(checkpoint), str(record.image_path),
                        caption, "--out", str(figure)], check=True)
        test = results.get(name, {}).get("report", {}).get("checkpoints", {}).get("best", {}).get("test", {})
        rows.append(
            f"| `{figure.name}` | `{name}` (seed {config['seed']}), epoch {epoch}, val R@1 "
            f"{tbps.get('val_metrics', {}).get('R1', float('nan')):.1f}, test R@1 {test.get('R1', float('nan')):.1f} | "
            f"{feature_map_note(config)} | `{Path(record.image_path).name}` (person {record.person_id}) | {caption} |"
        )
        print(f"{name}: {figure}", flush=True)

    readme = args.figures / "README.md"
    with atomic_write(readme) as handle:
        handle.write(
            "# Attention figures\n\n"
            "Drawn by `tbps explain` from the synthetic benchmark's best-on-val checkpoints "
            "(`benchmarks/bench_methods.py`), every method shown the same test image and caption:\n\n"
            "```bash\n"
            f"PYTHONPATH=src python benchmarks/attention_figures.py --out BENCH_OUT --runs {' '.join(args.runs)}"
            f"{'' if args.test_index == 0 else f' --test-index {args.test_index}'}\n"
            "```\n\n"
            "| figure | checkpoint | image backbone, input | image | caption |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
        )
        drawn = {f"`{line.split('`')[1]}`" for line in rows}
        older = sorted(f"`{path.name}`" for path in args.figures.glob("attention_*.png") if f"`{path.name}`" not in drawn)
        if older:
            handle.write(f"\nNot drawn by this command (from earlier checkpoints; see git log): {', '.join(older)}.\n")
    print(readme)


if __name__ == "__main__":
    main()
