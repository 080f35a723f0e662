"""pytest-benchmark microbenchmarks of the statistics op and the two pipeline stages on CPU.

Run: .venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-columns=median,iqr,min,max
(in the test suite they run once each, as smoke tests, with benchmarking disabled).
"""
import pytest
import torch

import lora_da
from lora_da.kernels import reference

# SmolLM2-135M's q/k/v group (n = 576 -> m = 576, 192, 192) and its down_proj (1536 -> 576)
SHAPES = {"qkv": (576, [576, 192, 192]), "down": (1536, [576])}


@pytest.mark.parametrize("group", list(SHAPES))
@pytest.mark.parametrize("tokens", [256, 1024])
def test_fisher_update_reference(benchmark, group, tokens):
    n, ms = SHAPES[group]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, n, generator=gen)
    grads = [torch.randn(1, tokens, m, generator=gen) for m in ms]
    mask = torch.rand(1, tokens, generator=gen) < 0.7
    z = torch.zeros(n, n)
    gs, ys = [torch.zeros(m, n) for m in ms], [torch.zeros(m) for m in ms]
    benchmark(reference.fisher_update, x, mask, grads, z, gs, ys)


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


def test_solve_exact_tiny_llama(benchmark):
    model, batches = _tiny_model_and_batches()
    stats = lora_da.collect_statistics(model, batches, progress=False)
    factors = benchmark(lora_da.solve, stats, rank=8, progress=False)
    assert len(factors) == 28
