#!/usr/bin/env bash
# The one-call GPU check: versions, CUDA extension build, the test suite on the GPU, quick benchmarks.
#
# Run from the repository root on the lent GPU machine (the `run` tool, command
# `bash scripts/gpu_check.sh`). Stages are independent: a failing build or test stage still lets
# the benchmarks run. Each stage has its own `timeout`, and the whole script keeps inside
# TOTAL_BUDGET seconds (default 540, under the tool's 600 s per command). Logs go to $OUT, which
# comes back (at most 8 files): env.log build.log tests.log failures.log test_outcomes.txt bench.log summary.txt
# results.tar.gz.
# results.tar.gz holds only this run's rows (<device-slug>/<op>.jsonl) and plots; fold them into
# the repository here with `python -m benchmarks.run --merge <files_at>/results.tar.gz`.
#
# Environment knobs:
#   OUT=dir              where logs go (default ./out)
#   PYTHON=python3       the interpreter that has torch (python3 on the GPU machine)
#   DRY_RUN=1            print the build and test commands instead of running them; env, bench
#                        (on a CPU machine: "GPU numbers need a CUDA GPU" + smoke) and packing run
#   SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1
#   BENCH_OPS=adaln,...  ops for benchmarks.run (default: all; adaln first; "none": no benchmarks.run, the
#                        EXTRA_BENCH benches still run)
#   PLAN=next            the prepared call 1 of benchmarks/NOTES.md's "Next GPU session" (TEST_PATHS,
#                        TEST_TIMEOUT, BENCH_OPS=none, EXTRA_BENCH='auto:170 sparse:150' unless given)
#   DIFFUSERS_ARGS="..." arguments of bench_diffusers in EXTRA_BENCH (--model wan --sparse SPEC --gen-steps 50)
#   BENCH_FULL=1         all cases instead of --quick
#   BENCH_FIRST=1        benchmarks before tests (tests then get what is left of TEST_TIMEOUT)
#   EXTRA_FIRST=1        the EXTRA_BENCH benches right after the build, before the tests and benchmarks.run
#                        (the rows that decide open targets first: a call cut short still brings them back)
#   TUNE_ADALN=1         after the benchmarks, the adaLN launch-shape sweep (benchmarks/tune_adaln.py),
#                        appended to bench.log
#   PYTEST_ARGS="..."    default "-v -n 6 --timeout 200" with pytest-xdist and pytest-timeout (both in the
#                        GPU image; 14 workers ran the GPU out of memory, 8 did not finish in 230 s), else
#                        "-v"; each failure's traceback goes to $OUT/failures.log as it happens and each
#                        outcome to $OUT/test_outcomes.txt (a run cut by its limit prints no summary)
#   TEST_PATHS="..."     what pytest collects (default tests; test ids to re-run only those)
#   BUILD_TIMEOUT=240 TEST_TIMEOUT=300 TOTAL_BUDGET=540 (seconds)
#   DIT_FAST_COMMIT=sha  commit recorded in result rows when .git did not travel with the tree
#   ATTENTION_PLAN=1     the attention kernels' new paths in one call (issue 12; benchmarks/NOTES.md): their
#                        GPU correctness tests first (the TMA forward and the one-pass backward at large
#                        shapes, every head dim, masked NaN, reproducibility, the mode-by-head-dim matrix),
#                        then bench_attention --quick on the dense, spatial and tile-window cases, every
#                        ours-* provider beside cuDNN/flash SDPA, FlexAttention and permute + SDPA. Sets
#                        TEST_PATHS, TEST_TIMEOUT=240, BENCH_OPS=attention unless given.
#   EXTRA_BENCH="diffusers:120 auto:90 parallel:60"
#                        after benchmarks.run, each NAME:LIMIT_S runs benchmarks/bench_NAME.py (--quick where it
#                        has one) with its rows in this run's results and its output appended to bench.log;
#                        their limits are reserved before benchmarks.run starts (issues 12, 13, 14)
#   benchmarks/wheels/*.whl, carried with the call (`carry: ["benchmarks/wheels"]`; the GPU machine reaches no
#                        registry): installed first with --no-index --no-deps into /tmp/site (diffusers)
set -u
cd "$(dirname "$0")/.."

if [[ ${PLAN:-} == next ]]; then
  # benchmarks/NOTES.md's "Next GPU session", call 1 (issues 17-19): the changed kernels' GPU correctness
  # (head dims 1..256 incl. unaligned rows, the NaN contract, the block-sparse kernels at real tile sizes,
  # the diffusers backend on a head dim of 10), then the auto rows and the sparse rows
  gpu_case="tests/test_attention.py::test_gpu_large_shapes"
  : "${TEST_PATHS:=$(printf "$gpu_case[%s] " full-10- window-10- full-12-atomic temporal-24- spatial-8-tma full-24-tma \
    rope_in_kernel-10-atomic full-200- full-128- full-128-atomic full-128-tma tile_window-72-) \
    tests/test_attention_masking.py tests/test_block_sparse_kernels.py \
    tests/test_diffusers.py::test_small_head_dim_model_on_triton_kernels}"
  : "${TEST_TIMEOUT:=170}"
  : "${BENCH_OPS:=none}"
  : "${EXTRA_BENCH:=auto:170 sparse:150}"
fi

if [[ ${ATTENTION_PLAN:-0} == 1 ]]; then
  gpu_case="tests/test_attention.py::test_gpu_large_shapes"
  : "${TEST_PATHS:=$(printf "$gpu_case[%s] " full-128-tma full-72-tma spatial-72-tma temporal-72-tma full-128-atomic \
    full-72-atomic spatial-72-atomic temporal-72-atomic window-128-atomic tile_window-72-atomic \
    rope_in_kernel-128-atomic full-40- full-80- full-256- full-128-) \
    tests/test_attention.py::test_gpu_cross_attention_text_lengths tests/test_attention.py::test_backward_reproducibility \
    tests/test_attention.py::test_attention_matches_reference tests/test_attention_masking.py::test_masked_keys_never_leak \
    tests/test_attention.py::test_gpu_offsets_past_2_31_elements}"
  : "${TEST_TIMEOUT:=240}"
  : "${BENCH_OPS:=attention}"
  export DIT_FAST_BENCH_ATTENTION_CASES=${DIT_FAST_BENCH_ATTENTION_CASES:-dense,spatial,tile_window}
fi

START=$(date +%s)
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
RESULTS=$(mktemp -d "${TMPDIR:-/tmp}/dit_fast_results.XXXXXX")
TOTAL_BUDGET=${TOTAL_BUDGET:-540}
DRY_RUN=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1 PY DRY_RUN
unset TRITON_INTERPRET  # real kernels on the GPU, never the interpreter
if compgen -G "benchmarks/wheels/*.whl" >/dev/null && [[ $DRY_RUN != 1 ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    benchmarks/wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
: >"$SUMMARY"

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((TOTAL_BUDGET - $(elapsed))); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME LIMIT_S DRY_OK CMD...: runs CMD with its output in $OUT/NAME.log under `timeout`,
# capped by the time left (minus a reserve for the later stages' bookkeeping and packing).
# DRY_OK=1: the stage also runs under DRY_RUN=1.
stage() {
  local name=$1 limit=$2 dry_ok=$3
  shift 3
  local log="$OUT/$name.log" reserve=25 t0 rc
  local avail=$(($(left) - reserve))
  ((limit > avail)) && limit=$avail
  {
    echo "===== $name: $* (limit ${limit}s, $(date -u +%H:%M:%S) UTC)"
  } >>"$log"
  if ((limit < 15)); then
    note "$name: SKIPPED (out of time: $(elapsed)s of ${TOTAL_BUDGET}s used)"
    return 0
  fi
  if [[ $DRY_RUN == 1 && $dry_ok != 1 ]]; then
    echo "DRY RUN: would run: $*" >>"$log"
    note "$name: dry run (would run: $*)"
    return 0
  fi
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then  # a function of this script: `timeout` needs a process
    timeout -k 10 "$limit" bash -c "$(declare -f "$1"); $*" >>"$log" 2>&1
  else
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  fi
  rc=$?
  local took=$(($(date +%s) - t0))
  if ((rc == 124 || rc == 137)); then
    note "$name: TIMED OUT after ${took}s (limit ${limit}s)"
  elif ((rc == 0)); then
    note "$name: ok (${took}s)"
  else
    note "$name: FAILED rc=$rc (${took}s)"
  fi
  echo "===== $name exit $rc after ${took}s" >>"$log"
  return $rc
}

env_report() {
  echo "date: $(date -u)"
  echo "host: $(uname -a)"
  echo "cpus: $(nproc)"
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
  command -v nvidia-smi >/dev/null && nvidia-smi \
    --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu \
    --format=csv
  command -v nvcc >/dev/null && nvcc --version || echo "nvcc: not found"
  "$PY" - <<'EOF'
import sys, platform
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1),
              "L2 MB", round(getattr(p, "L2_cache_size", 0) / 2**20, 1), "cc", f"{p.major}.{p.minor}")
except Exception as exc:
    print("torch: import failed:", exc)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: import failed:", exc)
EOF
  "$PY" -m pip list --disable-pip-version-check 2>/dev/null |
    grep -iE '^(torch|triton|pytest|pytest-benchmark|pybind11|setuptools|wheel|ninja|matplotlib|numpy|dit.fast) ' || true
  echo "git commit: $(git rev-parse HEAD 2>/dev/null || echo "${DIT_FAST_COMMIT:-unknown (no .git here; set DIT_FAST_COMMIT)}")"
}

build() {
  # No network on the GPU machine: no build isolation, no dependencies, no index.
  local t0=$(date +%s)
  if [[ $DRY_RUN == 1 ]]; then
    echo "DRY RUN: would run: DIT_FAST_BUILD_CUDA=1 DIT_FAST_CUDA_ARCHS=${DIT_FAST_CUDA_ARCHS:-90a} PIP_NO_INDEX=1" \
      "$PY -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check -v -e ."
    return 0
  fi
  # pyproject's `license = "MIT"` (PEP 639) needs setuptools >= 77 when building without isolation
  "$PY" -c "import setuptools as s; from packaging.version import Version as V; print('setuptools', s.__version__);
assert V(s.__version__) >= V('77'), 'WARNING: setuptools < 77 may reject pyproject license = \"MIT\"'" || true
  DIT_FAST_BUILD_CUDA=1 DIT_FAST_CUDA_ARCHS=${DIT_FAST_CUDA_ARCHS:-90a} PIP_NO_INDEX=1 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check -v -e .
  local rc=$?
  echo "build + install took $(($(date +%s) - t0)) s (rc $rc)"
  if ((rc != 0)); then
    # keep the Triton and PyTorch paths testable: install the package without the extension
    echo "CUDA build failed; installing without the extension so the other stages still run"
    DIT_FAST_BUILD_CUDA=0 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
      --disable-pip-version-check -q -e .
  fi
  "$PY" -c "from dit_fast import _extension as e; print('dit_fast._C:', 'loaded' if e.cuda_ext else 'NOT loaded: %s' % e.load_error)"
  return $rc
}

pack() {
  if [[ -n "$(ls -A "$RESULTS" 2>/dev/null)" ]]; then
    tar -czf "$OUT/results.tar.gz" -C "$RESULTS" .
  fi
}

note "gpu_check: started $(date -u +%FT%TZ), budget ${TOTAL_BUDGET}s, python $PY, out $OUT, dry run $DRY_RUN"

default_pytest_args() {
  if "$PY" -c "import xdist, pytest_timeout" >/dev/null 2>&1; then
    echo "-v -n 6 --timeout 200"
  else
    echo "-v"
  fi
}

run_tests() {
  [[ ${SKIP_TESTS:-0} == 1 ]] && return 0
  export DIT_FAST_FAILURE_LOG=${DIT_FAST_FAILURE_LOG:-$OUT/failures.log}
  # shellcheck disable=SC2086
  stage tests "${TEST_TIMEOUT:-300}" 0 "$PY" -m pytest ${TEST_PATHS:-tests} ${PYTEST_ARGS:-$(default_pytest_args)} \
    -p no:cacheprovider
  # one line per finished test, whether or not the run reached its summary
  grep -oE "(PASSED|FAILED|SKIPPED|ERROR) tests/\S+" "$OUT/tests.log" 2>/dev/null | sort >"$OUT/test_outcomes.txt"
  note "tests: $(grep -c ^PASSED "$OUT/test_outcomes.txt") passed, $(grep -c ^FAILED "$OUT/test_outcomes.txt") failed," \
    "$(grep -c ^SKIPPED "$OUT/test_outcomes.txt") skipped, $(grep -c ^ERROR "$OUT/test_outcomes.txt") errors"
}

extra_reserve() {
  local total=0 item
  for item in ${EXTRA_BENCH:-}; do total=$((total + ${item#*:})); done
  echo $total
}

run_extra_bench() {
  [[ ${SKIP_BENCH:-0} == 1 ]] && return 0
  local item name limit
  for item in ${EXTRA_BENCH:-}; do
    name=${item%%:*}
    limit=${item#*:}
    local args=()
    case $name in
      auto) args=(--quick --budget-s $((limit > 80 ? limit - 40 : 40))) ;;
      diffusers) read -r -a args <<<"${DIFFUSERS_ARGS:-}" ;;  # e.g. "--model wan --sparse SPEC --gen-steps 50"
      parallel) args=(--quick --json "$RESULTS/parallel_plan_bench.json") ;;
      sparse) args=(--quick --budget-s $((limit > 80 ? limit - 40 : 40))) ;;  # issue 18: bench_sparse's kernel rows
      *) note "extra bench $name: unknown (auto, diffusers, parallel, sparse)"; continue ;;
    esac
    note "extra bench: benchmarks.bench_$name"
    DIT_FAST_RESULTS_DIR="$RESULTS" stage bench "$limit" 0 "$PY" -m "benchmarks.bench_$name" ${args[@]+"${args[@]}"}
  done
  pack
}

run_bench() {
  [[ ${SKIP_BENCH:-0} == 1 || ${BENCH_OPS:-} == none ]] && return 0
  local reserve=$((25 + $(extra_reserve)))
  [[ ${BENCH_FIRST:-0} == 1 && ${SKIP_TESTS:-0} != 1 ]] && reserve=$((reserve + ${TEST_TIMEOUT:-300}))
  BENCH_LIMIT=$(($(left) - reserve))
  QUICK=--quick
  [[ ${BENCH_FULL:-0} == 1 ]] && QUICK=
  # --budget-s stops starting new cases 45 s before the stage's timeout; rows are written as they come
  # shellcheck disable=SC2086
  export DIT_FAST_RESULTS_DIR="$RESULTS"  # this run's rows only; merged into the repository afterwards
  stage bench "$BENCH_LIMIT" 1 "$PY" -m benchmarks.run $QUICK --plot \
    --ops "${BENCH_OPS:-adaln,attention,rope,patchify,galore,model}" --budget-s $((BENCH_LIMIT > 90 ? BENCH_LIMIT - 45 : 45)) \
    --results-dir "$RESULTS"
  pack
}

stage env 60 1 env_report
[[ ${SKIP_BUILD:-0} == 1 ]] || stage build "${BUILD_TIMEOUT:-240}" 1 build
if [[ ${EXTRA_FIRST:-0} == 1 ]]; then
  # the extra benches that decide open targets first (issue 17's auto rows, issue 18's sparse rows), then
  # the tests and benchmarks.run with what is left
  run_extra_bench
  EXTRA_BENCH=
  run_tests
  run_bench
elif [[ ${BENCH_FIRST:-0} == 1 ]]; then
  run_bench
  run_extra_bench
  run_tests
else
  run_tests
  run_bench
  run_extra_bench
fi
[[ ${TUNE_ADALN:-0} == 1 ]] && stage bench "${TUNE_TIMEOUT:-150}" 0 "$PY" -m benchmarks.tune_adaln
pack
note "gpu_check: done in $(elapsed)s; files: $(cd "$OUT" && ls | tr '\n' ' ')"

# The tool's reply carries the end of the output: put what matters last.
echo
echo "----- tests (tail) -----"
tail -n 3 "$OUT/tests.log" 2>/dev/null
grep ^FAILED "$OUT/test_outcomes.txt" 2>/dev/null | head -40
echo "----- bench (tail) -----"
tail -n 50 "$OUT/bench.log" 2>/dev/null
echo "----- adaLN targets -----"
sed -n '/^Targets (copy bandwidth/,/^$/p' "$OUT/bench.log" 2>/dev/null
echo "----- summary -----"
cat "$SUMMARY"
exit 0
