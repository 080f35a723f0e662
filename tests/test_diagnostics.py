"""The subspace diagnostics in every solve's report: input energy e(A), the captured share of
||Delta_hat||_F^2 and the objective, against dense matrices; the randomized path's estimate of
||Delta_hat||_F^2."""
import sys

import pytest
import torch

import lora_da
from conftest import random_batches, tiny_llama
from lora_da.input_factors import InputFactors
from lora_da.natural_gradient import natural_gradient

CFG = lora_da.LoraDAConfig(rank=3, damping=1e-4, population_size=20)


@pytest.fixture(scope="module")
def stats():
    return lora_da.collect_statistics(tiny_llama(seed=3), random_batches([2, 3, 1, 4], seed=4), progress=False)


def dense_figures(stats, name, factors, cfg):
    """e(A), ||Delta_hat V||^2 / ||Delta_hat||^2 and tr(V^T Omega V) from explicit matrices."""
    key = stats.modules[name].input_key
    inputs = InputFactors(stats, cfg.damping, stats.device)
    ng = natural_gradient(stats, name, inputs.cholesky(key), cfg)
    z = stats.input_factor(key).double()
    a = factors.lora_A.double()
    v = torch.linalg.qr(a.T).Q  # the subspace (lora_A's rows span it)
    omega = -cfg.bias_weight * ng.delta_hat.T @ ng.delta_hat + ng.variance_coefficient(cfg, 20) * inputs.inverse(key)
    energy = torch.trace(a @ z @ a.T) / torch.trace(a @ a.T) / (torch.trace(z) / z.shape[0])
    share = (ng.delta_hat @ v).square().sum() / ng.delta_hat.square().sum()
    return {"input_energy": float(energy), "captured_share": float(share), "objective": float(torch.trace(v.T @ omega @ v))}


@pytest.mark.parametrize("balance", [False, True])
def test_exact_solver_diagnostics_match_dense_matrices(stats, balance):
    cfg = CFG.replace(solver="exact", balance_factors=balance)
    factors = lora_da.solve(stats, cfg, progress=False)
    found = {name: f for info in factors.report.shapes.values() for name, f in info.diagnostics.items()}
    assert found.keys() == factors.keys()
    for name, figures in found.items():
        want = dense_figures(stats, name, factors[name], cfg)
        for key in ("captured_share", "objective", "input_energy"):  # e(A) of the lora_A written, balanced or not
            assert getattr(figures, key) == pytest.approx(want[key], rel=1e-8, abs=1e-12), (name, key)


def test_randomized_solver_diagnostics_agree_with_the_exact_ones(stats):
    exact = lora_da.solve(stats, CFG, solver="exact", progress=False).report
    randomized = lora_da.solve(stats, CFG, solver="randomized", progress=False).report
    for shape, info in exact.shapes.items():
        for name, want in info.diagnostics.items():
            got = randomized.shapes[shape].diagnostics[name]
            assert got.input_energy == pytest.approx(want.input_energy, rel=1e-6)
            assert got.objective == pytest.approx(want.objective, rel=1e-6, abs=1e-9)
            assert got.captured_share == pytest.approx(want.captured_share, rel=0.25)  # 16 probes: an estimate


def test_randomized_estimate_of_the_delta_norm_is_unbiased(stats, monkeypatch):
    """With many probes the estimate of ||Delta_hat||_F^2 converges to the exact value."""
    monkeypatch.setattr(sys.modules["lora_da.batched_solver"], "DELTA_NORM_PROBES", 4000)
    exact = lora_da.solve(stats, CFG, solver="exact", progress=False).report
    randomized = lora_da.solve(stats, CFG, solver="randomized", progress=False).report
    for shape, info in exact.shapes.items():
        for name, want in info.diagnostics.items():
            got = randomized.shapes[shape].diagnostics[name].captured_share
            assert got == pytest.approx(want.captured_share, rel=0.05), name


def test_initialize_prints_median_and_minimum():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=1), LoraConfig(r=2, target_modules="all-linear"))
    report = lora_da.initialize(model, random_batches([2, 3], seed=2), population_size=10, progress=False)
    text = str(report)
    assert "subspace    input energy e(A) median" in text and "share of |Delta_hat|^2 median" in text
    assert all(len(info.diagnostics) == len(info.modules) for info in report.solver.shapes.values())


def test_a_sweep_carries_no_diagnostics(stats):
    sweep = lora_da.solve_sweep(stats, CFG, variance_weights=[0.0, 0.03], progress=False)
    assert all(not info.diagnostics for factors in sweep.values() for info in factors.report.shapes.values())
