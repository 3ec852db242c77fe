#!/usr/bin/env bash
# The fixed-batch server for bench/serve_load.py --baseline-root DIR: the lmforge package as it was just
# before commit 32e559d (serve on rollout/stream.py: rows left-padded into one HF generate call), run with
# the same CLI (`python -m lmforge.cli serve`) and PYTHONPATH=DIR.
#   bench/serve_baseline.sh .serve-baseline
set -euo pipefail
dir=${1:?usage: bench/serve_baseline.sh DIR}
cd "$(dirname "$0")/.."
mkdir -p "$dir"
rm -rf "$dir/lmforge"
git archive 32e559d^ lmforge | tar -x -C "$dir"
test -f "$dir/lmforge/rollout/stream.py" || { echo "$dir: no lmforge/rollout/stream.py after the archive" >&2; exit 1; }
echo "fixed-batch tree ready: --baseline-root $dir"
