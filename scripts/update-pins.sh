#!/usr/bin/env bash
# Move the pinned versions deliberately: install the newest versions the index serves into a scratch
# virtual environment, run the whole test suite there, and rewrite constraints.txt only if it passes.
#   bash scripts/update-pins.sh            # extra arguments go to pytest (e.g. -x)
# On failure constraints.txt is left as it was and the scratch environment is kept for a look.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=$(mktemp -d)
VENV="$SCRATCH/venv"
echo "installing the newest versions into $VENV"
VENV="$VENV" PINS=none bash scripts/setup.sh
echo "running the test suite on them"
if ! "$VENV/bin/python" -m pytest -q "$@"; then
  echo "the suite fails on the newest versions: constraints.txt unchanged (environment kept in $VENV)" >&2
  exit 1
fi
{
  echo "# The versions lmforge's test suite passed with, installed by scripts/setup.sh (pip -c)."
  echo "# Written by scripts/update-pins.sh on $(date -u +%Y-%m-%d) with $("$VENV/bin/python" -V); do not edit by hand."
  echo "# torch is not here: setup.sh pins it itself (TORCH_SPEC) so a GPU build can be chosen."
  "$VENV/bin/python" -m pip freeze --exclude-editable | grep -viE '^((torch|triton|lmforge)==|nvidia-)' \
    | grep -v '^#' | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
rm -rf "$SCRATCH"
git --no-pager diff --stat -- constraints.txt || true
echo "constraints.txt rewritten; commit it with the code changes the new versions needed"
