#!/usr/bin/env bash
# Compile check of the CUDA sources, no GPU needed (called by .ci/run).
#
#   * every csrc/*.cu is compiled for sm_90a with `-Xptxas -v`;
#   * every csrc/*.cpp (the pybind11 layer) is checked as host C++ against pybind11 and Python
#     (-fsyntax-only: parsed and type-checked, no code generated);
#   * a table per kernel shows registers, spill stores/loads (bytes) and static shared memory.
#
# Exits non-zero on any compile error. Usage: bash csrc/compile_check.sh [ARCH]   (default 90a)
set -euo pipefail
CSRC="$(cd "$(dirname "$0")" && pwd)"
ARCH="${1:-90a}"

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; else NVCC="$(command -v nvcc || true)"; fi
fi
if [[ -z "$NVCC" ]]; then
  echo "compile_check: nvcc not found (set CUDA_HOME or NVCC)" >&2
  exit 1
fi
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import pybind11" 2>/dev/null; then
  # a fresh machine: pybind11 is only a build requirement of the package (pyproject.toml)
  echo "compile_check: installing pybind11 to compile the binding layer"
  "$PYTHON" -m pip install -q "pybind11>=2.10"
fi
PY_INCLUDES=$("$PYTHON" -c 'import sysconfig, pybind11; print("-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"])')

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
COMMON=(-O3 -std=c++17 -Xcompiler -fPIC --expt-relaxed-constexpr "-I$CSRC")

# One background nvcc per source; each writes its log, then we wait for all of them.
pids=()
names=()
for src in "$CSRC"/*.cu "$CSRC"/*.cpp; do
  [[ -e "$src" ]] || continue
  name="$(basename "$src")"
  if [[ "$src" == *.cu ]]; then
    flags=(-gencode "arch=compute_${ARCH},code=sm_${ARCH}" -Xptxas -v)
  else
    # host C++: a full parse and type check is the point, code generation is not (twice as fast)
    # shellcheck disable=SC2206
    flags=(-x c++ $PY_INCLUDES -Xcompiler -fsyntax-only)
  fi
  "$NVCC" -c "$src" -o "$TMP/$name.o" "${COMMON[@]}" "${flags[@]}" >"$TMP/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
done

failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "ok      ${names[$i]}"
  else
    echo "FAILED  ${names[$i]}"
    cat "$TMP/${names[$i]}.log"
    failed=1
  fi
  # compiler warnings are shown, not fatal
  grep -i "warning" "$TMP/${names[$i]}.log" | grep -v "ptxas info" || true
done

# Table: one line per kernel from ptxas' "Compiling entry function" / "Used N registers" lines.
"$PYTHON" - "$TMP" "$ARCH" <<'EOF'
import pathlib, re, shutil, subprocess, sys

tmp, arch = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = []
for log in sorted(tmp.glob("*.cu.log")):
    kernel = None
    spills = (0, 0, 0)
    for line in log.read_text().splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_", line)
        if m:
            kernel, spills = m.group(1), (0, 0, 0)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and kernel:
            spills = tuple(int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append([log.name[:-4], kernel, int(m.group(1)), spills[1], spills[2], spills[0],
                         int(smem.group(1)) if smem else 0])
            kernel = None

if shutil.which("c++filt") and rows:
    names = subprocess.run(["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True, text=True).stdout.split("\n")
    for r, n in zip(rows, names):
        # drop namespaces and the parameter list: "adaln_forward_kernel<__nv_bfloat16, 8, 2>"
        n = re.sub(r"^void |\(anonymous namespace\)::|\w+::", "", n)
        r[1] = re.sub(r"\(.*\)$", "", n)

print(f"\nsm_{arch} kernels: registers, spill stores/loads (bytes), stack frame, static shared memory")
print(f"{'file':<12} {'kernel':<64} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'stack':>6} {'smem':>6}")
for f, k, regs, st, ld, stack, smem in rows:
    flag = "  <- spills" if st or ld else ""
    print(f"{f:<12} {k:<64} {regs:>5} {st:>9} {ld:>9} {stack:>6} {smem:>6}{flag}")
print(f"{len(rows)} kernels, {sum(1 for r in rows if r[3] or r[4])} with spills")
EOF

if [[ $failed -ne 0 ]]; then
  echo "compile_check: FAILED" >&2
  exit 1
fi
echo "compile_check: all CUDA sources compile for sm_${ARCH}"
