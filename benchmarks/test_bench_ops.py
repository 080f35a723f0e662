"""pytest-benchmark microbenchmarks of the statistics op and the solver's inner products (every
backend that runs here, timed on its device) and of the two pipeline stages on CPU.

Run: .venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-columns=median,iqr,min,max
(in the test suite they run once each, as smoke tests, with benchmarking disabled).
"""
import pytest
import torch

import lora_da
from lora_da import dispatch

# SmolLM2-135M's q/k/v group (n = 576 -> m = 576, 192, 192) and its down_proj (1536 -> 576)
SHAPES = {"qkv": (576, [576, 192, 192]), "down": (1536, [576])}
CASES = [("torch", "cpu", torch.float32)]
if torch.cuda.is_available():
    CASES += [(b, "cuda", torch.bfloat16) for b in ("torch", "triton", "cuda")
              if dispatch.find("fisher_update", b).check(torch.device("cuda"), torch.bfloat16) is None]


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
@pytest.mark.parametrize("group", list(SHAPES))
@pytest.mark.parametrize("tokens", [256, 1024])
def test_fisher_update(benchmark, backend, device, dtype, group, tokens):
    n, ms = SHAPES[group]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, tokens, n, generator=gen, device=device).to(dtype)
    grads = [torch.randn(1, tokens, m, generator=gen, device=device).to(dtype) for m in ms]
    mask = torch.rand(1, tokens, generator=gen, device=device) < 0.7
    z = torch.zeros(n, n, device=device)
    gs, ys = [torch.zeros(m, n, device=device) for m in ms], [torch.zeros(m, device=device) for m in ms]
    fn = dispatch.resolve("fisher_update", backend, torch.device(device), dtype).fn

    def step():
        fn(x, mask, grads, z, gs, ys)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


def _tiny_model_and_batches():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 256, (32, 64))
    batches = [{"input_ids": ids[i:i + 8], "labels": ids[i:i + 8]} for i in range(0, 32, 8)]
    return model, batches


def test_collect_statistics_tiny_llama(benchmark):
    model, batches = _tiny_model_and_batches()
    stats = benchmark(lora_da.collect_statistics, model, batches, progress=False)
    assert stats.num_sequences == 32


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_solve_tiny_llama(benchmark, solver):
    model, batches = _tiny_model_and_batches()
    stats = lora_da.collect_statistics(model, batches, progress=False)
    factors = benchmark(lora_da.solve, stats, rank=8, solver=solver, progress=False)
    assert len(factors) == 28


INNER_CASES = [("torch", "cpu", torch.float64)]
if torch.cuda.is_available():
    INNER_CASES += [(b, "cuda", dtype) for b in ("torch", "triton") for dtype in (torch.float32, torch.float64)
                    if dispatch.find("inner_products", b).check(torch.device("cuda"), dtype) is None]


@pytest.mark.parametrize("backend,device,dtype", INNER_CASES, ids=lambda c: str(c).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(32, 1024, 48), (32, 4096, 216)], ids=lambda s: "x".join(map(str, s)))
def test_inner_products(benchmark, backend, device, dtype, shape):
    """The eigensolver's Gram matrices: A^T B for 32 stacked modules, k = 3 (r + 8) at r = 8 and 64."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(*shape, generator=gen, device=device, dtype=dtype)
    fn = dispatch.resolve("inner_products", backend, torch.device(device), dtype).fn

    def step():
        fn(a, a)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
