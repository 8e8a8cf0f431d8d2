#!/usr/bin/env bash
# One command to set up tbps in a local virtual environment and run something with it:
#   bash scripts/bootstrap.sh demo [tbps demo options]   # the offline demo (main job)
#   bash scripts/bootstrap.sh test [pytest options]      # the test suite
#   bash scripts/bootstrap.sh setup                      # only install
# Needs only Python >= 3.11 with pip and venv; installs into .venv next to this repository.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${TBPS_VENV:-.venv}
task=${1:-demo}
shift || true

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.tbps-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing tbps and its dependencies (first time: a few minutes)"
    # PyPI's PyTorch for Linux x86_64 is the CUDA build: about 6 GB in the venv. pip's cache would
    # hold a second copy of every wheel while it installs, so it is off (a CI machine ran out of disk).
    free_kb=$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')
    if [ -n "$free_kb" ] && [ "$free_kb" -lt $((7 * 1024 * 1024)) ]; then
        echo "warning: $((free_kb / 1024)) MB free where $VENV lies; installing PyTorch from PyPI needs about 7 GB" >&2
    fi
    export PIP_NO_CACHE_DIR=1
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    touch "$stamp"
fi

case "$task" in
    setup) echo "ready: $VENV/bin/tbps" ;;
    demo) exec "$VENV/bin/tbps" demo "$@" ;;
    test)
        # The browser test drives Debian's chromium (through the playwright package, which never
        # downloads a browser of its own).
        if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing chromium for the browser test"
            apt-get update -qq && apt-get install -y -qq chromium
        fi
        exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: bash scripts/bootstrap.sh demo|test|setup [args]" >&2; exit 2 ;;
esac
