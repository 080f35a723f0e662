"""Same model, data, config and seed: bitwise-identical factors across runs in fresh processes (CPU)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

RUN = """
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
import lora_da
from conftest import random_batches, tiny_llama
digest = hashlib.sha256()
for solver in ("exact", "randomized"):
    model = tiny_llama(seed=4, dtype=torch.float32)
    cfg = lora_da.LoraDAConfig(rank=3, population_size=50, solver=solver, buffer_tokens=16)
    factors = lora_da.solve(lora_da.collect_statistics(model, random_batches([3, 2, 4], seed=5), cfg, progress=False),
                            cfg, progress=False)
    for name in sorted(factors):
        digest.update(factors[name].lora_A.numpy().tobytes() + factors[name].lora_B.numpy().tobytes())
print(digest.hexdigest())
"""


def test_factors_are_bitwise_identical_across_processes():
    runs = [subprocess.run([sys.executable, "-c", RUN.format(tests=str(ROOT))], capture_output=True, text=True,
                           check=True, cwd=ROOT.parent).stdout.split()[-1] for _ in range(2)]
    assert len(runs[0]) == 64 and runs[0] == runs[1]
