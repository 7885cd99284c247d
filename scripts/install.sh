#!/usr/bin/env bash
# Installs dit_fast editable with the given extras. torch is installed only when none is: then
# torch==2.13.0, which on a CPU machine with its wheel on disk is the CPU build (no multi-GB CUDA
# download). An existing torch (for example a CUDA build on a GPU machine) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".${extras:+[$extras]}"
