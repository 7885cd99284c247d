#!/usr/bin/env bash
# Installs dit_fast editable, with the given extras (scripts/demo.sh: none; scripts/test.sh: test), into
# the active Python ($PYTHON overrides), one line per step.
#  - torch only when none is installed: then torch==2.13.0, which on a CPU machine with its wheel on disk
#    is the CPU build (no multi-GB CUDA download). An existing torch (e.g. a CUDA build) is kept.
#  - The CUDA extension only where setup.py decides to build it (nvcc and a visible GPU, or
#    DIT_FAST_BUILD_CUDA=1, or DIT_FAST_CUDA_ARCHS set); its one-line decision is printed first.
#  - Nothing is installed or built twice. A stamp in the environment ($DIT_FAST_INSTALL_STAMP overrides
#    where) holds a hash of what the install depends on (pyproject.toml, setup.py, csrc/, this checkout's
#    path), the build decision it ran with and the extras installed. Unchanged, and the same decision, or
#    an extension already built where this run would only skip it for want of a GPU (scripts/test.sh asks
#    for sm_90a; scripts/demo.sh then needs nothing more): skipped. Only extras missing: their packages
#    alone, no rebuild of the package. Python edits need no reinstall: the install is editable.
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
key=$({ echo "$PWD"; cat pyproject.toml setup.py; find csrc -type f \( -name '*.cu' -o -name '*.cpp' -o -name '*.h' \) | LC_ALL=C sort | xargs cat; } \
      | sha256sum | cut -d' ' -f1)
stamp=${DIT_FAST_INSTALL_STAMP:-"$("$py" -c 'import sys; print(sys.prefix)')/.dit_fast_install_stamp"}
# dit_fast must import from this checkout (-I: not from the current directory, which is the checkout)
here=$("$py" -I -c "import importlib.util, os; s = importlib.util.find_spec('dit_fast'); \
print(int(bool(s and s.origin) and os.path.realpath(s.origin).startswith(os.path.realpath('dit_fast') + os.sep)))" \
       2>/dev/null || echo 0)
stamped_plan=$(sed -n 's/^plan=//p' "$stamp" 2>/dev/null | head -n 1 || true)
same_build=0
if [ "$here" = 1 ] && [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$key" ]; then
    if [ "$stamped_plan" = "$plan" ]; then
        same_build=1
    else  # built before; this run would skip the extension only because no GPU or nvcc is here
        case "$stamped_plan" in *"building the CUDA extension"*)
            case "$plan" in *"no GPU visible, skipping"* | *"CUDA toolkit is not available"*) same_build=1;; esac;;
        esac
    fi
fi
missing=()
for extra in ${extras//,/ }; do
    grep -qxF "extras=$extra" "$stamp" 2>/dev/null || missing+=("$extra")
done

if [ "$same_build" = 1 ] && [ ${#missing[@]} = 0 ]; then
    step "dit_fast${extras:+[$extras]} is installed from this checkout and unchanged since: skipped"
    exit 0
fi
start=$(date +%s)
reqs=()
if [ "$same_build" = 1 ]; then  # the package is current: the missing extras' own packages (Python >= 3.11)
    mapfile -t reqs < <("$py" -c "import sys, tomllib; extras = tomllib.load(open('pyproject.toml', 'rb'))['project']\
['optional-dependencies']; print('\n'.join(r for e in sys.argv[1:] for r in extras[e]))" "${missing[@]}" 2>/dev/null \
                        || true)
fi
if [ ${#reqs[@]} -gt 0 ]; then
    step "dit_fast is installed from this checkout and unchanged since; the packages of [${missing[*]}]"
    "$py" -m pip install --progress-bar on "${reqs[@]}"
    printf 'extras=%s\n' "${missing[@]}" >> "$stamp"
    step "done in $(( $(date +%s) - start )) s"
    exit 0
fi

step "dit_fast${extras:+[$extras]} (editable) and its dependencies"
echo "$plan"
verbose=()
case "$plan" in *"building the CUDA extension"*) verbose=(-v);; esac  # pip shows setup.py's nvcc lines only with -v
"$py" -m pip install ${verbose[@]+"${verbose[@]}"} --progress-bar on -e ".${extras:+[$extras]}"
{ echo "$key"; echo "plan=$plan"; for extra in ${extras//,/ }; do echo "extras=$extra"; done; } > "$stamp"
step "done in $(( $(date +%s) - start )) s"
