"""Inputs with fewer counted tokens than features: Z has rank at most T, and the solve moves to
the span of the tokens, where it is exact and small."""
import sys

import dataclasses

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


@pytest.fixture
def span_always_pays(monkeypatch):
    """The tiny model's inputs (n = 24 and 40, s = 20) cost less in the full solve
    (``token_space_pays``); these tests check the span's math, so it is taken wherever it applies."""
    monkeypatch.setattr(sys.modules["lora_da.token_space"], "token_space_pays", lambda *args: True)


def full_space(monkeypatch, stats, **overrides):
    """The same solve with the token space switched off (no input qualifies)."""
    monkeypatch.setattr(sys.modules["lora_da.token_space"], "TOKEN_BASIS_OVERSAMPLING", 10**9)
    return lora_da.solve(stats, CFG, progress=False, **overrides)


def relative_ba_error(got, want):
    ba, want_ba = got.lora_B @ got.lora_A, want.lora_B @ want.lora_A
    return float((ba - want_ba).norm() / want_ba.norm())


@pytest.mark.usefixtures("span_always_pays")
@pytest.mark.parametrize("variance_weight", [0.0, 0.03, 1.0])
def test_token_space_solve_equals_the_full_solve(monkeypatch, variance_weight):
    stats = few_tokens()
    fast = lora_da.solve(stats, CFG, variance_weight=variance_weight, progress=False)
    spans = {name: s for info in fast.report.shapes.values() for name, s in info.token_space.items()}
    assert spans.keys() == fast.keys() and set(spans.values()) <= set(range(4, 13))
    want = full_space(monkeypatch, stats, variance_weight=variance_weight, solver="exact")
    assert not any(info.token_space for info in want.report.shapes.values())
    for name in want:
        assert relative_ba_error(fast[name], want[name]) <= 1e-8, name
    for shape, info in want.report.shapes.items():  # the diagnostics too
        for name, figures in info.diagnostics.items():
            for key, value in dataclasses.asdict(figures).items():
                got = getattr(fast.report.shapes[shape].diagnostics[name], key)
                assert got == pytest.approx(value, rel=1e-7, abs=1e-10), key
    for name in fast:  # every module's lora_A has orthonormal rows (over sqrt(gamma))
        torch.testing.assert_close(fast[name].lora_A @ fast[name].lora_A.T * CFG.gamma,
                                   torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.usefixtures("span_always_pays")
def test_gradients_outside_the_counted_tokens_keep_the_full_solve(monkeypatch):
    """token_mask='labels' leaves the prompt's tokens out of Z, and in the first layer their output
    gradients (which later tokens' attention passes back) put rows of G outside the span of the
    counted tokens, where Zd^-1 is 1/damping: those modules keep the full solve. Every module
    gets the full solve's factors."""
    batches = random_batches([2], seed=12, max_len=7)
    stats = lora_da.collect_statistics(tiny_llama(seed=11), batches, CFG, token_mask="labels", progress=False)
    assert stats.num_tokens == 8
    fast = lora_da.solve(stats, CFG, solver="exact", progress=False)
    in_token_space = {name for info in fast.report.shapes.values() for name in info.token_space}
    assert not {name for name in fast if ".layers.0." in name} & in_token_space
    want = full_space(monkeypatch, stats, solver="exact")
    for name in want:
        assert relative_ba_error(fast[name], want[name]) <= 1e-8, name


def test_rank_above_the_token_span_keeps_the_full_solve():
    stats = lora_da.collect_statistics(tiny_llama(seed=11), random_batches([1], seed=13, max_len=4), CFG,
                                       progress=False)
    factors = lora_da.solve(stats, CFG, rank=6, solver="exact", progress=False)  # at most 4 tokens: s <= 4 < 6
    assert not any(info.token_space for info in factors.report.shapes.values())
    assert all(torch.isfinite(f.lora_B).all() for f in factors.values())


def test_statistics_whose_z_outranks_their_token_count_keep_the_full_solve(monkeypatch):
    """A Z of full rank under a count of 12 tokens (statistics edited by hand): the range finder
    misses part of Z, its check says so, and every module keeps the full solve."""
    from lora_da.input_factors import InputFactors
    from lora_da.token_space import TokenBases

    stats = few_tokens()
    key = "model.layers.0.mlp.down_proj"
    assert TokenBases(InputFactors(stats, CFG.damping, torch.device("cpu"))).basis(key) is not None
    for entry in stats.inputs.values():
        entry.z_sum += entry.num_tokens * 1e-2 * torch.eye(entry.z_sum.shape[0], dtype=entry.z_sum.dtype)
    assert TokenBases(InputFactors(stats, CFG.damping, torch.device("cpu"))).basis(key) is None
    fast = lora_da.solve(stats, CFG, solver="exact", progress=False)
    assert not any(info.token_space for info in fast.report.shapes.values())
    want = full_space(monkeypatch, stats, solver="exact")
    for name in want:
        assert relative_ba_error(fast[name], want[name]) <= 1e-12, name


@pytest.mark.usefixtures("span_always_pays")
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
    assert {name for info in fast.report.shapes.values() for name in info.token_space} == fast.keys()
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


def test_the_span_is_taken_where_its_counted_cost_is_lower():
    """n = 1024 with T = 1000 tokens: the span's range finder and s x s eigenproblems cost more
    than the full solve (the randomized solve was the faster, 0.70 s against 4.27 s), and Z's null
    space (24 directions) is narrow enough for the randomized solver; with T = 100, or at n = 4096
    with 300 tokens, the span costs a fraction; at T = 700 the randomized solver would stall."""
    from lora_da.token_space import token_space_pays

    assert not token_space_pays(1024, 1000, [1024], "randomized", 16)
    assert token_space_pays(1024, 100, [1024], "randomized", 16)
    assert token_space_pays(1024, 700, [1024], "randomized", 16)
    assert not token_space_pays(1024, 700, [1024], "exact", 16)  # the exact solve is exact either way, and cheaper
    assert token_space_pays(4096, 300, [4096, 1024, 1024], "exact", 16)
    assert not token_space_pays(24, 12, [24, 8, 8], "exact", 12)  # the tiny model's: the full solve is cheaper
    assert not token_space_pays(100, 92, [100], "exact", 12)  # s = T + 8 = n: no span to take


@pytest.mark.usefixtures("span_always_pays")
def test_fp32_statistics_keep_the_full_solve_on_both_sides_of_n():
    """In fp32 the span would drop G's rounding outside it, which the full solve amplifies by
    1 / damping: the two differ beyond rounding, so fp32 statistics always take the full solve and
    the factors do not jump as T crosses n - 8."""
    batches = random_batches([2], seed=12, max_len=7)
    stats = lora_da.collect_statistics(tiny_llama(seed=11, dtype=torch.float32), batches, CFG, progress=False)
    assert stats.num_tokens == 12 and stats.dtype == torch.float32
    factors = lora_da.solve(stats, CFG, progress=False)
    assert not any(info.token_space for info in factors.report.shapes.values())


@pytest.mark.usefixtures("span_always_pays")
def test_stacks_within_the_budget_give_the_same_subspaces_and_probes_are_released(monkeypatch):
    from lora_da.input_factors import InputFactors
    from lora_da.token_space import TokenBases, token_space_subspaces

    stats = few_tokens()
    made = []
    original = TokenBases.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(TokenBases, "__init__", keep)
    names = [name for name in stats.modules if stats.modules[name].g_sum.shape == (24, 24)]
    found = {}
    for budget in (2**31, 1):  # 1 byte: one module per stack
        bases = TokenBases(InputFactors(stats, CFG.damping, torch.device("cpu")))
        found[budget] = token_space_subspaces(stats, names, bases, CFG, [CFG.variance_weight], CFG.rank, 50,
                                              budget=budget)
    assert found[1].keys() == found[2**31].keys() == set(names)
    for name in names:
        torch.testing.assert_close(found[1][name][CFG.variance_weight].v, found[2**31][name][CFG.variance_weight].v,
                                   rtol=1e-10, atol=1e-12)
    made.clear()
    lora_da.solve(stats, CFG, progress=False)
    assert len(made) == 1 and not made[0].probes  # every Gaussian of the span released with its last chunk
