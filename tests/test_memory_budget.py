"""Memory-bounded collection: planned groups, extra passes only when needed, same factors."""
import pytest
import torch

import lora_da
from conftest import random_batches, tiny_llama
from lora_da.memory import memory_budget, plan_groups
from lora_da.targets import find_targets
from test_statistics_files import assert_same_factors, peft_llama

CFG = lora_da.LoraDAConfig(rank=4, damping=1e-4, population_size=50)
BLOCK_BYTES = 50_000  # one attention block (32.8 kB of fp64 accumulators) or one MLP block (45.9 kB)


def test_plan_keeps_blocks_whole_and_packs_them():
    targets = find_targets(tiny_llama(seed=0), None)
    assert plan_groups(targets, 8, 8, None) == [list(targets)]
    groups = plan_groups(targets, 8, 8, BLOCK_BYTES)
    assert [sorted({name.rsplit(".", 1)[0] for name in group}) for group in groups] == [
        ["model.layers.0.self_attn"], ["model.layers.0.mlp"], ["model.layers.1.self_attn"], ["model.layers.1.mlp"]]
    assert len(plan_groups(targets, 8, 8, 2 * BLOCK_BYTES)) == 2
    with pytest.raises(ValueError, match=r"max_memory=1000 bytes cannot hold the accumulators of \['model.layers.0"):
        plan_groups(targets, 8, 8, 1000)


def test_budget_forcing_several_passes_gives_the_factors_of_one_pass():
    model, batches = tiny_llama(seed=2), random_batches([3, 2, 4], seed=3)
    one = lora_da.collect_statistics(model, batches, CFG, progress=False)
    several = lora_da.collect_statistics(model, batches, CFG, max_memory=BLOCK_BYTES, progress=False)
    assert (one.passes, several.passes) == (1, 4)
    assert list(several.modules) == list(one.modules) and several.num_tokens == one.num_tokens
    for solver in ("exact", "randomized"):
        assert_same_factors(lora_da.solve(several, CFG, solver=solver, progress=False),
                            lora_da.solve(one, CFG, solver=solver, progress=False))


def test_initialize_under_a_budget_reports_its_passes():
    batches = random_batches([3, 2], seed=8)
    bounded, free = peft_llama(seed=3), peft_llama(seed=3)
    report = lora_da.initialize(bounded, batches, CFG, max_memory=2 * BLOCK_BYTES, progress=False)
    assert report.passes == 2 and "in 2 pass(es)" in str(report)
    lora_da.initialize(free, batches, CFG, progress=False)
    for (name, a), (_, b) in zip(bounded.named_parameters(), free.named_parameters()):
        assert torch.equal(a, b), name


def test_several_passes_need_a_reiterable_loader():
    model = tiny_llama(seed=2)
    with pytest.raises(ValueError, match="needs 4 passes .* not an iterator"):
        lora_da.collect_statistics(model, iter(random_batches([2], seed=3)), CFG, max_memory=BLOCK_BYTES, progress=False)


def test_budget_values():
    assert memory_budget(None, torch.device("cpu")) is None
    assert memory_budget(123, torch.device("cpu")) == 123
    assert memory_budget("auto", torch.device("cpu")) > 0
    for bad in (0, -5, 1.5, "lots", True):
        with pytest.raises(ValueError, match="max_memory must be"):
            memory_budget(bad, torch.device("cpu"))
