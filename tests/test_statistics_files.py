"""Statistics files, merging, reuse by ``initialize``, and sweeps."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lora_da
from conftest import TARGETS, random_batches, tiny_llama

CFG = lora_da.LoraDAConfig(rank=4, damping=1e-4, population_size=50, solver="exact")
AUTHORS_OPTIONS = {"balance_factors": True, "output_damping_ratio": 0.1, "normalize_variance_guidance": True,
                   "delta_normalization_power": 0.5, "delta_normalization_reference": 2.0}


def assert_same_factors(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].lora_A, b[name].lora_A, rtol=rtol, atol=atol)
        torch.testing.assert_close(a[name].lora_B, b[name].lora_B, rtol=rtol, atol=atol)


@pytest.mark.parametrize("output_fisher", ["diagonal", "sequence_lowrank"])
def test_save_load_solve_equals_solve(tmp_path, output_fisher):
    stats = lora_da.collect_statistics(tiny_llama(seed=1), random_batches([3, 2], seed=2), CFG,
                                       output_fisher=output_fisher, progress=False)
    stats.save(tmp_path / "stats.safetensors")
    loaded = lora_da.Statistics.load(tmp_path / "stats.safetensors")
    assert loaded.fingerprint() == stats.fingerprint() and loaded.config == stats.config
    assert (loaded.num_sequences, loaded.num_tokens, loaded.population_size) == (
        stats.num_sequences, stats.num_tokens, stats.population_size)
    assert_same_factors(lora_da.solve(loaded, CFG, output_fisher=output_fisher, progress=False),
                        lora_da.solve(stats, CFG, output_fisher=output_fisher, progress=False))


def test_file_is_safetensors_with_json_metadata(tmp_path):
    from safetensors import safe_open

    stats = lora_da.collect_statistics(tiny_llama(seed=1), random_batches([2], seed=2), CFG, progress=False,
                                       **AUTHORS_OPTIONS)
    stats.save(tmp_path / "stats.safetensors")
    with safe_open(str(tmp_path / "stats.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_da"])
    assert meta["library_version"] == lora_da.__version__
    assert meta["fingerprint"]["model.layers.0.mlp.down_proj"] == [24, 40]
    assert meta["config"]["rank"] == 4 and meta["num_sequences"] == 2
    assert {key: meta["config"][key] for key in AUTHORS_OPTIONS} == AUTHORS_OPTIONS


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a lora_da statistics file"):
        lora_da.Statistics.load(tmp_path / "other.safetensors")


def test_merge_of_two_halves_equals_collecting_all():
    batches = random_batches([3, 2, 4, 1], seed=5)
    model = tiny_llama(seed=4)
    cfg = CFG.replace(population_size=None, output_fisher="sequence_lowrank")
    whole = lora_da.collect_statistics(model, batches, cfg, progress=False)
    first = lora_da.collect_statistics(model, batches[:2], cfg, progress=False)
    second = lora_da.collect_statistics(model, batches[2:], cfg, progress=False)
    merged = lora_da.Statistics.merge(first, second)
    assert (merged.num_sequences, merged.num_tokens, merged.population_size) == (
        whole.num_sequences, whole.num_tokens, whole.population_size)
    for key in whole.inputs:
        torch.testing.assert_close(merged.inputs[key].z_sum, whole.inputs[key].z_sum, rtol=1e-12, atol=1e-12)
    assert_same_factors(lora_da.solve(merged, cfg, progress=False), lora_da.solve(whole, cfg, progress=False),
                        rtol=1e-9, atol=1e-10)
    # the parts are left as they were
    torch.testing.assert_close(first.inputs[next(iter(first.inputs))].z_sum,
                               lora_da.collect_statistics(model, batches[:2], cfg, progress=False)
                               .inputs[next(iter(first.inputs))].z_sum, rtol=0, atol=0)


def test_merge_refuses_different_statistics():
    model = tiny_llama(seed=4)
    a = lora_da.collect_statistics(model, random_batches([2], seed=1), CFG, progress=False)
    b = lora_da.collect_statistics(model, random_batches([2], seed=1), CFG, target_modules=["q_proj"], progress=False)
    with pytest.raises(ValueError, match="not in the other statistics"):
        lora_da.Statistics.merge(a, b)
    c = lora_da.collect_statistics(model, random_batches([2], seed=1), CFG, token_mask="labels", progress=False)
    with pytest.raises(ValueError, match="token_mask"):
        lora_da.Statistics.merge(a, c)


def peft_llama(seed, hidden=24, rank=4):
    model = tiny_llama(seed=seed)
    if hidden != 24:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=40,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, pad_token_id=0)).double()
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=8, target_modules=TARGETS))


def test_initialize_from_saved_statistics_equals_collecting(tmp_path):
    batches = random_batches([3, 2], seed=8)
    collected = peft_llama(seed=3)
    lora_da.initialize(collected, batches, CFG, progress=False)
    stats = lora_da.collect_statistics(tiny_llama(seed=3), batches, CFG, target_modules=TARGETS, progress=False)
    stats.save(tmp_path / "stats.safetensors")
    reused = peft_llama(seed=3)
    lora_da.initialize(reused, None, CFG, statistics=lora_da.Statistics.load(tmp_path / "stats.safetensors"),
                       progress=False)
    for (name, a), (_, b) in zip(collected.named_parameters(), reused.named_parameters()):
        assert torch.equal(a, b), name


def test_statistics_of_another_model_are_refused_and_the_model_untouched():
    stats = lora_da.collect_statistics(tiny_llama(seed=3), random_batches([2], seed=8), CFG, target_modules=TARGETS,
                                       progress=False)
    other = peft_llama(seed=3, hidden=32)
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match=r"statistics do not match the model: .*q_proj: statistics \(24, 24\), the model \(32, 32\)"):
        lora_da.initialize(other, None, CFG, statistics=stats, progress=False)
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())
    with pytest.raises(ValueError, match="calibration loader or statistics"):
        lora_da.initialize(other, None, CFG, progress=False)


@pytest.mark.parametrize("options", [{}, AUTHORS_OPTIONS], ids=["defaults", "authors_options"])
@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_sweep_equals_separate_solves(solver, options):
    stats = lora_da.collect_statistics(tiny_llama(seed=6), random_batches([4, 4, 4, 4], seed=7), CFG, progress=False)
    cfg = CFG.replace(solver=solver, **options)
    sweep = lora_da.solve_sweep(stats, cfg, variance_weights=[0.0, 0.03, 3.0], ranks=[2, 4], progress=False)
    assert set(sweep) == {(b, r) for b in (0.0, 0.03, 3.0) for r in (2, 4)}
    tolerance = 1e-12 if solver == "exact" else 1e-5
    for (beta, rank), factors in sweep.items():
        alone = lora_da.solve(stats, cfg, variance_weight=beta, rank=rank, progress=False)
        for name in alone:
            ba = factors[name].lora_B @ factors[name].lora_A
            want = alone[name].lora_B @ alone[name].lora_A
            assert float((ba - want).norm() / want.norm()) <= tolerance, (beta, rank, name)
        if options and solver == "exact":  # balanced: each factor of a smaller rank from the sweep's leading columns
            assert_same_factors(factors, alone, rtol=1e-9, atol=1e-12)


def test_same_seed_gives_bitwise_identical_factors():
    runs = [lora_da.collect_statistics(tiny_llama(seed=6, dtype=torch.float32), random_batches([3, 3], seed=7), CFG,
                                       progress=False) for _ in range(2)]
    for key in runs[0].inputs:
        assert torch.equal(runs[0].inputs[key].z_sum, runs[1].inputs[key].z_sum)
    for solver in ("exact", "randomized"):
        first = lora_da.solve(runs[0], CFG, solver=solver, progress=False)
        second = lora_da.solve(runs[1], CFG, solver=solver, progress=False)
        assert_same_factors(first, second)
