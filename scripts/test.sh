#!/usr/bin/env bash
# The README's test command: installs dit_fast with its test extras on this machine (CPU torch wheel
# where one is on disk, so no multi-GB CUDA download) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0 2>/dev/null || python -m pip install -q torch
python -m pip install -q -e ".[test]"
python -m pytest tests -q "$@"
