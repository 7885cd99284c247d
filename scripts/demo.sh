#!/usr/bin/env bash
# The README's main job: install, then generate a video with the bundled text-to-video model.
# Usage: scripts/demo.sh ["a prompt"] [out.gif] [extra dit-fast generate flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
prompt=${1:-"a red circle moving right"}
out=${2:-out.gif}
shift $(( $# < 2 ? $# : 2 ))
dit-fast generate "$prompt" -o "$out" "$@"
