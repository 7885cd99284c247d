#!/usr/bin/env bash
# Installs dit_fast editable, with the given extras (scripts/demo.sh: none; scripts/test.sh: test), into
# the active Python ($PYTHON overrides), one line per step.
#  - torch only when none is installed: then torch==2.13.0, which on a CPU machine with its wheel on disk
#    is the CPU build (no multi-GB CUDA download). An existing torch (e.g. a CUDA build) is kept.
#  - The CUDA extension only where setup.py decides to build it (nvcc and a visible GPU, or
#    DIT_FAST_BUILD_CUDA=1, or DIT_FAST_CUDA_ARCHS set); its one-line decision is printed first.
#  - An unchanged checkout is not reinstalled: a stamp in the environment holds a hash of what the
#    install depends on (pyproject.toml, setup.py, csrc/, the build decision, this checkout's path) and
#    the extras installed with it. Python edits need no reinstall: the install is editable.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
py=${PYTHON:-python}
step() { echo "== install: $*"; }

# the installed distribution's version, without importing torch (seconds on a busy machine)
torch_version=$("$py" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
if [ -z "$torch_version" ]; then
    step "torch 2.13.0 (no torch in $("$py" -c 'import sys; print(sys.prefix)'))"
    "$py" -m pip install torch==2.13.0
else
    step "torch $torch_version is installed: kept"
fi

plan=$("$py" setup.py --cuda-plan)
key=$({ echo "$PWD"; echo "$plan"; cat pyproject.toml setup.py; find csrc -type f \( -name '*.cu' -o -name '*.cpp' -o -name '*.h' \) | LC_ALL=C sort | xargs cat; } \
      | sha256sum | cut -d' ' -f1)
stamp="$("$py" -c 'import sys; print(sys.prefix)')/.dit_fast_install_stamp"
# dit_fast must import from this checkout (-I: not from the current directory, which is the checkout)
here=$("$py" -I -c "import importlib.util, os; s = importlib.util.find_spec('dit_fast'); \
print(int(bool(s and s.origin) and os.path.realpath(s.origin).startswith(os.path.realpath('dit_fast') + os.sep)))" \
       2>/dev/null || echo 0)
if [ "$here" = 1 ] && [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$key" ] \
        && { [ -z "$extras" ] || grep -qxF "extras=$extras" "$stamp"; }; then
    step "dit_fast${extras:+[$extras]} is installed from this checkout and unchanged since: skipped"
    exit 0
fi

step "dit_fast${extras:+[$extras]} (editable) and its dependencies"
echo "$plan"
verbose=()
case "$plan" in *"building the CUDA extension"*) verbose=(-v);; esac  # pip shows setup.py's nvcc lines only with -v
start=$(date +%s)
"$py" -m pip install ${verbose[@]+"${verbose[@]}"} --progress-bar on -e ".${extras:+[$extras]}"
if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$key" ]; then
    grep -qxF "extras=$extras" "$stamp" || echo "extras=$extras" >> "$stamp"
else
    printf '%s\nextras=%s\n' "$key" "$extras" > "$stamp"
fi
step "done in $(( $(date +%s) - start )) s"
