#!/usr/bin/env bash
# Creates scripts/.venv with what the Python check scripts need: PyTorch, transformers, PEFT,
# safetensors (PyPI's torch wheel brings CUDA libraries, ~3 GB, even for CPU use).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch transformers peft safetensors numpy
.venv/bin/python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
