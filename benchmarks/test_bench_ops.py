"""pytest-benchmark microbenchmarks of the statistics op and the solver's inner products (every
backend that runs here, timed on its device) and of the two pipeline stages on CPU.

Run: .venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-columns=median,iqr,min,max
(in the test suite they run once each, as smoke tests, with benchmarking disabled).
"""
import copy

import pytest
import torch

import lora_da
from lora_da import dispatch
from lora_da.kernels import reference

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
    fn = dispatch.resolve("fisher_update", backend, torch.device(device), dtype).fn

    def accumulators():
        return (torch.zeros(n, n, device=device), [torch.zeros(m, n, device=device) for m in ms],
                [torch.zeros(m, device=device) for m in ms])

    z, gs, ys = accumulators()
    fn(x, mask, grads, z, gs, ys)  # one call checked against the reference before the timed ones
    want_z, want_gs, want_ys = accumulators()
    reference.fisher_update(x, mask, grads, want_z, want_gs, want_ys)
    tolerance = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(torch.triu(z), torch.triu(want_z), **tolerance)
    for got, want in zip(gs + ys, want_gs + want_ys):
        torch.testing.assert_close(got, want, **tolerance)

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


def _fp64_statistics(model, batches):
    """The same model's statistics in fp64: the reference the benchmarked runs are checked against."""
    return lora_da.collect_statistics(copy.deepcopy(model).double(), batches, progress=False)


def test_collect_statistics_tiny_llama(benchmark):
    model, batches = _tiny_model_and_batches()
    stats = benchmark(lora_da.collect_statistics, model, batches, progress=False)
    want = _fp64_statistics(model, batches)
    assert stats.num_sequences == want.num_sequences == 32
    for name in want.modules:
        torch.testing.assert_close(stats.gradient(name).double(), want.gradient(name), rtol=1e-3, atol=1e-7)
    for key in want.inputs:
        torch.testing.assert_close(stats.input_factor(key).double(), want.input_factor(key), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_solve_tiny_llama(benchmark, solver):
    """B A within 1e-3 of the exact solve of fp64 statistics (at damping 1e-4, where fp32 sums
    lose no more digits than that)."""
    model, batches = _tiny_model_and_batches()
    stats = lora_da.collect_statistics(model, batches, progress=False)
    factors = benchmark(lora_da.solve, stats, rank=8, damping=1e-4, solver=solver, progress=False)
    want = lora_da.solve(_fp64_statistics(model, batches), rank=8, damping=1e-4, solver="exact", progress=False)
    assert factors.keys() == want.keys() and len(factors) == 28
    for name, f in factors.items():
        ba, want_ba = f.lora_B.double() @ f.lora_A.double(), want[name].lora_B @ want[name].lora_A
        assert float((ba - want_ba).norm() / want_ba.norm()) <= 1e-3, name


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
        out = fn(a, a)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    got = benchmark(step)
    want = reference.inner_products(a, a)
    scale = (a.double().abs().transpose(1, 2) @ a.double().abs()).clamp_min(1.0)
    assert bool(((got - want).abs() <= 1e-13 * scale).all())
