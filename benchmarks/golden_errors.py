"""Largest relative Frobenius error against the authors' golden factors, per variant: B·A, and
for balanced factors lora_A and lora_B as well.

    TRITON_INTERPRET=1 python benchmarks/golden_errors.py
    (folders: LORA_DA_GOLDEN or tests/data/golden, LORA_DA_GOLDEN_EXTRAS or tests/data/golden-extras)
"""
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import GOLDEN_EXTRAS, golden_batches, golden_dir, golden_errors  # noqa: E402

RUNS = [("fp64, torch", torch.float64, {}), ("fp32, torch", torch.float32, {}),
        ("fp32, triton", torch.float32, {"backend": "triton"}),
        ("fp64, randomized solver", torch.float64, {"solver": "randomized"}),
        ("fp32, randomized solver", torch.float32, {"solver": "randomized"})]


def main():
    golden = golden_dir()
    extras = Path(os.environ.get("LORA_DA_GOLDEN_EXTRAS") or GOLDEN_EXTRAS)
    batches = golden_batches(golden)
    for folder in (golden, extras):
        manifest = json.loads((folder / "manifest.json").read_text())
        print(f"{folder}:")
        for label, dtype, extra in RUNS:
            cells = []
            for variant, fields in manifest["variants"].items():
                errors = golden_errors(golden / "model", batches, fields, folder / f"expected-{variant}.safetensors",
                                       dtype, **extra)
                keys = ["BA", "lora_A", "lora_B"] if fields.get("balance_factors") else ["BA"]
                cells.append(f"{variant} " + " ".join(f"{max(errors[key].values()):.2e}" for key in keys))
            print(f"  {label:<26}" + " | ".join(cells))


if __name__ == "__main__":
    main()
