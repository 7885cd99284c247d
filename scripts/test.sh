#!/usr/bin/env bash
# The README's test command (CI runs it too): install with the test extras, run the whole suite on
# every core (pytest-xdist; DIT_FAST_TEST_WORKERS overrides), each test under a time limit so that a
# hung collective fails its test instead of the run.
set -euo pipefail
cd "$(dirname "$0")/.."
# the tests check the CUDA extension's host code even without a GPU: ask setup.py for it wherever nvcc is
# and no GPU is visible (with a GPU it builds on its own, for sm_90a and sm_80); sm_90a alone there,
# the H100/H200 target, at half the build time of both
if command -v nvcc >/dev/null 2>&1 && [ -z "${DIT_FAST_CUDA_ARCHS:-}" ] && [ "${DIT_FAST_BUILD_CUDA:-}" != 0 ] \
        && ! python setup.py --cuda-plan | grep -q "building the CUDA extension"; then
    export DIT_FAST_CUDA_ARCHS="90a"
fi
bash scripts/install.sh test
# galore-torch, for the trajectory comparison: pure Python; --no-deps because it declares
# transformers and bitsandbytes, which the comparison does not use; once (pip's own start costs seconds)
python -c "import importlib.metadata as m; m.version('galore-torch')" 2>/dev/null \
    || python -m pip install -q --no-deps galore-torch
workers=${DIT_FAST_TEST_WORKERS:-$(python -c "import os; print(min(4, len(os.sched_getaffinity(0))))")}
python -m pytest tests -q -n "$workers" --timeout 900 "$@"
