#!/usr/bin/env bash
# The README's test command (CI runs it too): install with the test extras, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python -m pytest tests -q "$@"
