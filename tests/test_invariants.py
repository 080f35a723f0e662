"""Properties the factors must have whatever the data."""
import math

import pytest
import torch

import lora_da
from conftest import random_batches, tiny_llama
from lora_da.solve import input_choleskys, natural_gradient


@pytest.fixture(scope="module")
def stats():
    return lora_da.collect_statistics(tiny_llama(seed=3), random_batches([2, 3, 1], seed=4), progress=False)


def subspace(factors, gamma):
    """V [n, r] recovered from lora_A = V^T / sqrt(gamma)."""
    return factors.lora_A.T * math.sqrt(gamma)


@pytest.mark.parametrize("beta", [0.0, 0.03, 2.0])
def test_orthonormal_basis_and_projection(stats, beta):
    cfg = lora_da.LoraDAConfig(rank=4, variance_weight=beta, gamma=64.0, damping=1e-4, population_size=20)
    factors = lora_da.solve(stats, cfg, progress=False)
    cholesky = input_choleskys(stats, cfg.damping)
    for name, f in factors.items():
        v = subspace(f, cfg.gamma)
        torch.testing.assert_close(v.T @ v, torch.eye(4, dtype=v.dtype), atol=1e-10, rtol=0)
        ng = natural_gradient(stats, name, cholesky[stats.modules[name].input_key], cfg)
        torch.testing.assert_close(f.lora_B @ f.lora_A, ng.delta_hat @ v @ v.T / cfg.gamma, atol=1e-12, rtol=1e-9)
        # V spans the r eigenvectors of Omega with the smallest eigenvalues
        c = ng.variance_coefficient(cfg, 20)
        omega = -cfg.bias_weight * ng.delta_hat.T @ ng.delta_hat + c * torch.cholesky_inverse(ng.chol)
        smallest = torch.linalg.eigvalsh(omega)[:4]
        torch.testing.assert_close(torch.linalg.eigvalsh(v.T @ omega @ v), smallest, atol=1e-9, rtol=1e-9)
        # sign convention: each column's largest-magnitude entry is positive
        assert (v.gather(0, v.abs().argmax(0, keepdim=True)) > 0).all()


def test_no_variance_is_top_r_svd(stats):
    cfg = lora_da.LoraDAConfig(rank=3, variance_weight=0.0, gamma=4.0, damping=1e-4)
    factors = lora_da.solve(stats, cfg, progress=False)
    cholesky = input_choleskys(stats, cfg.damping)
    for name, f in factors.items():
        dhat = natural_gradient(stats, name, cholesky[stats.modules[name].input_key], cfg).delta_hat
        u, s, vh = torch.linalg.svd(dhat, full_matrices=False)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        torch.testing.assert_close(f.lora_B @ f.lora_A * cfg.gamma, best, atol=1e-10, rtol=1e-8)


def test_batch_order_does_not_matter():
    model = tiny_llama(seed=5)
    batches = random_batches([1, 2, 3, 2], seed=6)
    cfg = lora_da.LoraDAConfig(rank=2, damping=1e-4, population_size=10)
    first = lora_da.solve(lora_da.collect_statistics(model, batches, cfg, progress=False), cfg, progress=False)
    second = lora_da.solve(lora_da.collect_statistics(model, batches[::-1], cfg, progress=False), cfg, progress=False)
    for name in first:
        torch.testing.assert_close(
            first[name].lora_B @ first[name].lora_A, second[name].lora_B @ second[name].lora_A, atol=1e-12, rtol=1e-8
        )


def test_factors_follow_the_statistics_dtype(stats):
    assert all(f.lora_A.dtype == torch.float64 for f in lora_da.solve(stats, rank=1, progress=False).values())


def test_num_samples_stops_early_and_truncates():
    model = tiny_llama()
    batches = random_batches([3, 3, 3])
    stats = lora_da.collect_statistics(model, batches, num_samples=5, progress=False)
    reference = lora_da.collect_statistics(model, [batches[0], {k: v[:2] for k, v in batches[1].items()}], progress=False)
    assert stats.num_sequences == 5
    for name in stats.modules:
        torch.testing.assert_close(stats.gradient(name), reference.gradient(name))


def test_population_size_defaults(caplog):
    model = tiny_llama()
    batches = random_batches([2, 2])
    with caplog.at_level("INFO", logger="lora_da"):
        assert lora_da.collect_statistics(model, batches, progress=False).population_size == 4
    assert "population_size N = 4" in caplog.text

    class Loader(list):
        dataset = list(range(1000))

    assert lora_da.collect_statistics(model, Loader(batches), progress=False).population_size == 1000
    assert lora_da.collect_statistics(model, batches, population_size=7, progress=False).population_size == 7


def test_ill_conditioned_input_retries_with_more_damping(stats):
    from lora_da.solve import damped_cholesky

    z = torch.zeros(5, 5, dtype=torch.float64)
    z[0, 0] = -1.0  # not positive definite until the damping exceeds 1
    with pytest.warns(RuntimeWarning, match="my.module"):
        factor, damping = damped_cholesky(z, 1e-3, "my.module")
    assert damping > 1.0 and torch.isfinite(factor).all()
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="my.module"):
        damped_cholesky(-1e12 * torch.eye(3, dtype=torch.float64), 1e-3, "my.module")
