#!/usr/bin/env bash
# Paper-scale figures on a GPU machine in one run of about 8 minutes (issue 17, item 4): one pass
# of benchmarks/bench_paper_scale.py over its default set (each method's CUHK-PEDES and
# clip-cuhk-pedes configs, and the ICFG-PEDES / RSTPReid ones whose model differs: 14 models), all
# in one process (--in-process: no Python start per config), --device cuda --precision bf16-mixed:
#
#   * training step at the config's batch size (8 steps, the first 3 untimed), images/s, CUDA peak
#     memory per phase, encoding throughput at the config's eval batch size (2 batches);
#   * the engine's overhead: the same model and batches through the Lightning Trainer against the
#     bare loop (goal <= 5 %);
#   * every scoring route on a CUHK-PEDES-size gallery (6,156 captions x 3,074 images) with 2 s a
#     route (cheap routes measured whole, the others extrapolated), except the headline
#     evaluations, which get 40 s (measured on every query when they fit, goal <= 30 s each): NAFS's
#     and ACSA's test similarity and LAIP's ITM re-scoring (two-stage, top 128), i.e. the
#     nafs/cuhk-pedes, acsa/cuhk-pedes and laip/cuhk-pedes rows.
#
# Results: $OUT when set (the device tool's folder), else benchmarks/results/: paper-scale-cuda.json
# (written after every config), paper-scale-cuda-log.txt and nvidia-smi.txt. Print the tables with
#   python benchmarks/bench_paper_scale.py --table benchmarks/results/paper-scale-cuda.json
#
# Usage:
#   bash scripts/gpu_bench.sh            # on the GPU machine
#   bash scripts/gpu_bench.sh --dry-run  # anywhere: check the environment and print the plan
#   bash scripts/gpu_bench.sh --prepare  # here, before: copy what the GPU image lacks (below)
#
# Python: .venv/bin/python when it runs tbps, else python3 with src/ on PYTHONPATH. The device
# machine has no network and its python3 (torch, lightning, transformers, timm, PIL, yaml) lacks
# three pure-Python packages tbps needs there: omegaconf (configs), nltk and textblob-aptagger
# (noun phrases for ACSA and LAIP; spaCy's compiled wheels would have to match its Python).
# --prepare copies them from this checkout's .venv into .whl/tbps-site (ignored by git); the
# device call carries it: run(command="bash scripts/gpu_bench.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=run
case "${1:-}" in
    "") ;;
    --dry-run) mode=dry ;;
    --prepare) mode=prepare ;;
    *) echo "usage: bash scripts/gpu_bench.sh [--dry-run | --prepare]" >&2; exit 2 ;;
esac

SITE=.whl/tbps-site
if [ "$mode" = prepare ]; then
    python=${TBPS_PYTHON:-.venv/bin/python}
    rm -rf "$SITE" && mkdir -p "$SITE"
    for package in omegaconf nltk textblob_aptagger; do
        from=$("$python" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('$package').origin))")
        cp -r "$from" "$SITE/"
    done
    find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
    echo "copied omegaconf, nltk, textblob_aptagger into $SITE ($(du -sh "$SITE" | cut -f1)); carry .whl"
    exit 0
fi

if [ -x .venv/bin/python ] && .venv/bin/python -c "import tbps" 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=${TBPS_PYTHON:-python3}
fi
if [ -d "$SITE" ]; then
    export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "torchvision", "lightning", "transformers", "timm", "tokenizers", "omegaconf", "PIL", "yaml",
        "tensorboard", "nltk", "textblob_aptagger"]
print(" ".join(name for name in need if importlib.util.find_spec(name) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "missing Python packages for $PY: $missing (run bash scripts/gpu_bench.sh --prepare where .venv works, and carry .whl)" >&2
    exit 3
fi
gpu=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

RESULTS=${OUT:-benchmarks/results}
WORK=${TBPS_BENCH_WORK:-${TMPDIR:-/tmp}/tbps-gpu-bench}
mkdir -p "$RESULTS" "$WORK"
bench=(benchmarks/bench_paper_scale.py --device cuda --precision bf16-mixed --work "$WORK" --in-process
       --steps 8 --warmup 3 --engine --encode-batches 2 --score-budget 2
       --score-budget-for nafs/cuhk-pedes=40 acsa/cuhk-pedes=40 laip/cuhk-pedes=40
       --out "$RESULTS/paper-scale-cuda.json")

if [ "$mode" = dry ]; then
    echo "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')); GPU: $gpu"
    echo "results: $RESULTS; work: $WORK"
    echo "+ $PY ${bench[*]}"
    exec "$PY" "${bench[@]}" --dry-run
fi
if [ "$gpu" != 1 ]; then
    echo "torch sees no GPU here; bash scripts/gpu_bench.sh --dry-run checks the plan without one" >&2
    exit 4
fi

nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
start=$SECONDS
set -o pipefail
status=0
"$PY" "${bench[@]}" 2>&1 | tee "$RESULTS/paper-scale-cuda-log.txt" || status=$?
echo "every config: $((SECONDS - start)) s, exit $status"
exit $status
