"""Same model, data, config and seed: bitwise-identical factors across runs in fresh processes
(on CPUs always; on a GPU with ``deterministic=True``, which pins the plain PyTorch ops)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_da
from lora_da import dispatch

ROOT = Path(__file__).resolve().parent

RUN = """
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
import lora_da
from conftest import random_batches, tiny_llama
digest = hashlib.sha256()
for solver in ("exact", "randomized"):
    model = tiny_llama(seed=4, dtype=torch.float32).to({device!r})
    cfg = lora_da.LoraDAConfig(rank=3, population_size=50, solver=solver, buffer_tokens=16, deterministic={pinned})
    batches = [{{k: v.to({device!r}) for k, v in b.items()}} for b in random_batches([3, 2, 4], seed=5)]
    factors = lora_da.solve(lora_da.collect_statistics(model, batches, cfg, progress=False), cfg, progress=False)
    for name in sorted(factors):
        digest.update(factors[name].lora_A.cpu().numpy().tobytes() + factors[name].lora_B.cpu().numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.parametrize("device,pinned", [
    ("cpu", False),
    pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
])
def test_factors_are_bitwise_identical_across_processes(device, pinned):
    code = RUN.format(tests=str(ROOT), device=device, pinned=pinned)
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=ROOT.parent).stdout.split()[-1] for _ in range(2)]
    assert len(runs[0]) == 64 and runs[0] == runs[1]


def test_deterministic_pins_the_pytorch_ops():
    with dispatch.pinned("torch"):
        assert dispatch.resolve("fisher_update", "auto", torch.device("cpu"), torch.float32).backend == "torch"
        assert dispatch.resolve("inner_products", "triton", torch.device("cpu"), torch.float64).backend == "torch"
    with pytest.raises(ValueError, match="deterministic=True runs the plain PyTorch ops"):
        lora_da.LoraDAConfig(deterministic=True, backend="triton")
