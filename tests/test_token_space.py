"""Inputs with fewer counted tokens than features: Z has rank at most T, and the solve moves to
the span of the tokens, where it is exact and small."""
import sys

import pytest
import torch

import lora_da
from conftest import random_batches, tiny_llama

CFG = lora_da.LoraDAConfig(rank=4, population_size=50)


def few_tokens():
    """fp64 statistics of the tiny Llama from 12 counted tokens (< 24 and 40 features)."""
    batches = random_batches([2], seed=12, max_len=7)
    assert int(batches[0]["attention_mask"].sum()) == 12
    return lora_da.collect_statistics(tiny_llama(seed=11), batches, CFG, progress=False)


def full_space(monkeypatch, stats, **overrides):
    """The same solve with the token space switched off (no input qualifies)."""
    monkeypatch.setattr(sys.modules["lora_da.solve"], "TOKEN_BASIS_OVERSAMPLING", 10**9)
    return lora_da.solve(stats, CFG, progress=False, **overrides)


def relative_ba_error(got, want):
    ba, want_ba = got.lora_B @ got.lora_A, want.lora_B @ want.lora_A
    return float((ba - want_ba).norm() / want_ba.norm())


@pytest.mark.parametrize("variance_weight", [0.0, 0.03, 1.0])
def test_token_space_solve_equals_the_full_solve(monkeypatch, variance_weight):
    stats = few_tokens()
    fast = lora_da.solve(stats, CFG, variance_weight=variance_weight, progress=False)
    spans = {name: s for info in fast.report.values() for name, s in info["token_space"].items()}
    assert spans.keys() == fast.keys() and set(spans.values()) <= set(range(4, 13))
    want = full_space(monkeypatch, stats, variance_weight=variance_weight, solver="exact")
    assert not any(info["token_space"] for info in want.report.values())
    for name in want:
        assert relative_ba_error(fast[name], want[name]) <= 1e-8, name
    for shape, info in want.report.items():  # the diagnostics too
        for name, figures in info["diagnostics"].items():
            for key, value in figures.items():
                assert fast.report[shape]["diagnostics"][name][key] == pytest.approx(value, rel=1e-7, abs=1e-10), key
    for name in fast:  # every module's lora_A has orthonormal rows (over sqrt(gamma))
        torch.testing.assert_close(fast[name].lora_A @ fast[name].lora_A.T * CFG.gamma,
                                   torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)


def test_gradients_outside_the_counted_tokens_keep_the_full_solve(monkeypatch):
    """token_mask='labels' leaves the prompt's tokens out of Z, and in the first layer their output
    gradients (which later tokens' attention passes back) put rows of G outside the span of the
    counted tokens, where Zd^-1 is 1/damping: those modules keep the full solve. Every module
    gets the full solve's factors."""
    batches = random_batches([2], seed=12, max_len=7)
    stats = lora_da.collect_statistics(tiny_llama(seed=11), batches, CFG, token_mask="labels", progress=False)
    assert stats.num_tokens == 8
    fast = lora_da.solve(stats, CFG, solver="exact", progress=False)
    in_token_space = {name for info in fast.report.values() for name in info["token_space"]}
    assert not {name for name in fast if ".layers.0." in name} & in_token_space
    want = full_space(monkeypatch, stats, solver="exact")
    for name in want:
        assert relative_ba_error(fast[name], want[name]) <= 1e-8, name


def test_rank_above_the_token_span_keeps_the_full_solve():
    stats = lora_da.collect_statistics(tiny_llama(seed=11), random_batches([1], seed=13, max_len=4), CFG,
                                       progress=False)
    factors = lora_da.solve(stats, CFG, rank=6, solver="exact", progress=False)  # at most 4 tokens: s <= 4 < 6
    assert not any(info["token_space"] for info in factors.report.values())
    assert all(torch.isfinite(f.lora_B).all() for f in factors.values())


def test_statistics_whose_z_outranks_their_token_count_keep_the_full_solve(monkeypatch):
    """A Z of full rank under a count of 12 tokens (statistics edited by hand): the range finder
    misses part of Z, its check says so, and every module keeps the full solve."""
    from lora_da.solve import InputFactors

    stats = few_tokens()
    key = "model.layers.0.mlp.down_proj"
    assert InputFactors(stats, CFG.damping, torch.device("cpu")).token_basis(key) is not None
    for entry in stats.inputs.values():
        entry.z_sum += entry.num_tokens * 1e-2 * torch.eye(entry.z_sum.shape[0], dtype=entry.z_sum.dtype)
    assert InputFactors(stats, CFG.damping, torch.device("cpu")).token_basis(key) is None
    fast = lora_da.solve(stats, CFG, solver="exact", progress=False)
    assert not any(info["token_space"] for info in fast.report.values())
    want = full_space(monkeypatch, stats, solver="exact")
    for name in want:
        assert relative_ba_error(fast[name], want[name]) <= 1e-12, name


@pytest.mark.parametrize("options", [
    {"output_damping_ratio": 0.1},
    {"normalize_variance_guidance": True, "variance_weight": 0.5},
    {"delta_normalization_power": 0.5, "delta_normalization_reference": 2.0},
    {"balance_factors": True},
    {"damping_mode": "relative", "damping": 1e-2},
], ids=["output_damping_ratio", "normalize_variance_guidance", "delta_power", "balance_factors", "relative_damping"])
def test_token_space_honours_the_authors_options(monkeypatch, options):
    """Each further option in the span of the tokens gives the full exact solve's factors (lora_A
    and lora_B one by one where they are balanced); ||Zd^-1||_F there counts the complement."""
    stats = few_tokens()
    fast = lora_da.solve(stats, CFG, progress=False, **options)
    assert {name for info in fast.report.values() for name in info["token_space"]} == fast.keys()
    want = full_space(monkeypatch, stats, solver="exact", **options)
    plain = lora_da.solve(stats, CFG, progress=False)
    for name in want:
        assert relative_ba_error(fast[name], want[name]) <= 1e-8, name
        if options.get("balance_factors"):
            torch.testing.assert_close(fast[name].lora_A, want[name].lora_A, atol=0, rtol=1e-7)
            torch.testing.assert_close(fast[name].lora_B, want[name].lora_B, atol=0, rtol=1e-7)
    changed = [name for name in want if relative_ba_error(plain[name], want[name]) > 1e-3
               or not torch.allclose(plain[name].lora_A, want[name].lora_A, rtol=1e-3)]
    assert changed, "the option changed no factor"
