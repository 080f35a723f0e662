"""Largest relative Frobenius error of B·A against the authors' golden factors, per variant.

    TRITON_INTERPRET=1 python benchmarks/golden_errors.py    # golden folder: LORA_DA_GOLDEN or tests/data/golden
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import lora_da  # noqa: E402
from conftest import TARGETS, golden_batches, golden_dir  # noqa: E402

RUNS = [("fp64, torch", torch.float64, {}), ("fp32, torch", torch.float32, {}),
        ("fp32, triton", torch.float32, {"backend": "triton"}), ("fp64, randomized solver", torch.float64,
                                                                  {"solver": "randomized"})]


def main():
    golden = golden_dir()
    manifest = json.loads((golden / "manifest.json").read_text())
    batches = golden_batches(golden)
    for label, dtype, extra in RUNS:
        errors = []
        for variant, fields in manifest["variants"].items():
            model = AutoModelForCausalLM.from_pretrained(str(golden / "model")).to(dtype)
            cfg = lora_da.LoraDAConfig(target_modules=TARGETS, **fields, **extra)
            factors = lora_da.solve(lora_da.collect_statistics(model, batches, cfg, progress=False), cfg, progress=False)
            expected = load_file(str(golden / f"expected-{variant}.safetensors"))
            worst = max(float(torch.linalg.norm(f.lora_B.double() @ f.lora_A.double() - expected[f"{n}.BA"])
                              / torch.linalg.norm(expected[f"{n}.BA"])) for n, f in factors.items())
            errors.append(f"{variant} {worst:.2e}")
        print(f"{label:<26}" + " | ".join(errors))


if __name__ == "__main__":
    main()
