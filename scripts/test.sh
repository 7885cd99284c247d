#!/usr/bin/env bash
# The README's test command (CI runs it too): install with the test extras, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# galore-torch, for the trajectory comparison: pure Python; --no-deps because it declares
# transformers and bitsandbytes, which the comparison does not use
python -m pip install -q --no-deps galore-torch
python -m pytest tests -q "$@"
