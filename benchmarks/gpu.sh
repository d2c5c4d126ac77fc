#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py) with nothing but this repository: headscope is installed from the checkout,
# without dependencies, into a scratch folder on top of the machine's own torch and transformers; a GPU is needed.
# Under 8 minutes on one H200 (the script skips any cell that would overrun its budget and says so).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
"$python" -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" "$root" >/dev/null
PYTHONPATH="$site" PYTHONUNBUFFERED=1 exec "$python" "$root/benchmarks/gpu.py" "$@"
