#!/usr/bin/env bash
# The README's main job: install (once: an unchanged checkout is not reinstalled, see scripts/install.sh),
# then generate a video with the bundled text-to-video model.
# Usage: scripts/demo.sh ["a prompt"] [out.gif] [extra dit-fast generate flags]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/install.sh
prompt=${1:-"a red circle moving right"}
out=${2:-out.gif}
shift $(( $# < 2 ? $# : 2 ))
echo "== demo: dit-fast generate \"$prompt\" -o $out $*"
"${PYTHON:-python}" -m dit_fast.cli generate "$prompt" -o "$out" "$@"
echo "== demo: done in $(( $(date +%s) - start )) s"
