"""The batched randomized solver against exact fp64 eigendecompositions."""

import pytest
import torch

import lora_da
from conftest import random_batches, tiny_llama
from lora_da.block_operator import BlockOperator
from lora_da.eigensolver import (
    consecutive_runs,
    eigh,
    rayleigh_ritz,
    smallest_eigenvectors,
    svqb,
    top_singular_values,
    unconverged_columns,
)
from lora_da.batched_solver import solve_batch_modules


def problem(n, m, spread, deficient_rank=None, seed=0):
    """(G [m, n], d [m], L [n, n]) with Z's eigenvalues log-spaced over ``spread`` decades
    (``clustered``: two tight clusters) and Delta of full or given rank."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    if spread == "clustered":
        z = torch.cat([torch.full((n // 2,), 1.0), torch.full((n - n // 2,), 1e-3)]) * (1 + 1e-6 * torch.rand(n, generator=gen))
    else:
        z = torch.logspace(0, -spread, n, dtype=torch.float64)
    zd = (q * z) @ q.T + 1e-6 * torch.eye(n, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64) * torch.arange(1, n + 1) ** -0.5
    if deficient_rank is not None:
        g = torch.randn(m, deficient_rank, generator=gen, dtype=torch.float64) @ torch.randn(
            deficient_rank, n, generator=gen, dtype=torch.float64)
    d = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
    return g, d, torch.linalg.cholesky(zd)


def operator(problems, variance):
    g, d, chol = (torch.stack(t) for t in zip(*problems))
    return BlockOperator(g, d, torch.cholesky_inverse(chol), torch.arange(len(problems)),
                         torch.tensor(variance, dtype=torch.float64), 1.0, lambda: chol @ chol.transpose(1, 2))


def dense_omega(op, i):
    zd_inv = op.zd_inv[i]
    delta = -op.d[i][:, None] * op.gradient[i] @ zd_inv
    return -delta.T @ delta + op.variance[i] * zd_inv


def sine(u, v):
    s = torch.linalg.svdvals(u.T @ v)
    return float(torch.sqrt(torch.clamp(1 - s.min() ** 2, min=0)))


CASES = [  # n, m, spread, deficient rank, variance weight (relative to sigma^2), r
    (60, 80, 3, None, 0.0, 1),
    (60, 80, 3, None, 1e-9, 8),
    (60, 40, 6, None, 1e-4, 20),
    (60, 80, "clustered", None, 1e-3, 5),
    (60, 80, 6, 3, 1e-5, 8),  # rank(Delta) < r: the variance term decides the rest
    (48, 70, 6, None, 10.0, 16),  # beta large: Zd^-1 dominates
]


@pytest.mark.parametrize("precondition", [None, True], ids=["auto", "preconditioned"])
@pytest.mark.parametrize("working_dtype", [torch.float64, torch.float32], ids=["fp64", "mixed"])
@pytest.mark.parametrize("n,m,spread,deficient,variance,r", CASES)
def test_subspace_matches_exact_eigh(n, m, spread, deficient, variance, r, working_dtype, precondition):
    problems = [problem(n, m, spread, deficient, seed) for seed in range(3)]
    op = operator(problems, [0.0] * 3)
    sigma2 = top_singular_values(op, block=8, tolerance=1e-12, max_iterations=300)[0] ** 2
    op.variance = variance * sigma2
    cfg = lora_da.LoraDAConfig()
    v, info = smallest_eigenvectors(op, r, oversampling=cfg.solver_oversampling, tolerance=cfg.solver_tolerance,
                                    max_iterations=cfg.solver_max_iterations, working=op.to(working_dtype),
                                    precondition=precondition)
    assert bool((info.residuals <= cfg.solver_tolerance).all()), info
    for i in range(3):
        omega = dense_omega(op, i)
        values, vectors = torch.linalg.eigh(omega)
        scale = values.abs().max()
        torch.testing.assert_close(v[i].T @ v[i], torch.eye(r, dtype=v.dtype), atol=1e-8, rtol=0)
        residual = (omega @ v[i] - v[i] @ (v[i].T @ omega @ v[i])).norm(dim=0).max() / scale
        assert residual <= 10 * cfg.solver_tolerance, residual
        # Davis-Kahan: the sine to an eigenspace is at most sqrt(r) * residual / gap, where gap
        # separates the Ritz values from the eigenvalues outside it; 1e-4 wherever the gap allows it
        rayleigh = torch.linalg.eigvalsh(v[i].T @ omega @ v[i])
        torch.testing.assert_close(rayleigh, values[:r], atol=1e-6 * float(scale), rtol=0)
        gap = float(values[r] - rayleigh[-1]) / float(scale)
        if gap > 0:
            assert sine(v[i], vectors[:, :r]) <= max(1e-4, 2 * r**0.5 * float(residual) / gap)
        # the part well below a (nearly) degenerate r-th eigenvalue is pinned down regardless
        below = values < values[r - 1] - 1e-3 * scale
        if below.any():
            assert sine(v[i], vectors[:, below]) <= 1e-4


def test_sigma_matches_svd():
    op = operator([problem(50, 70, 3, None, s) for s in range(4)], [0.0] * 4)
    sigma, info = top_singular_values(op, block=8, tolerance=1e-10, max_iterations=300)
    assert bool(info.converged.all())
    for i in range(4):
        delta = -op.d[i][:, None] * op.gradient[i] @ op.zd_inv[i]
        assert abs(float(sigma[i]) / float(torch.linalg.matrix_norm(delta, 2)) - 1) < 1e-6


def test_svqb_drops_dependent_columns():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 30, 4, generator=gen, dtype=torch.float64)
    s = torch.cat([s, s[:, :, :1] * 2.0, torch.zeros(2, 30, 1, dtype=torch.float64)], dim=2)
    transform, kept = svqb(s)
    assert kept.sum(dim=1).tolist() == [4, 4]
    basis = s @ transform
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.diag_embed(kept.double()), atol=1e-12, rtol=0)


def test_unconverged_columns_come_first_padded_to_the_largest_count():
    r = torch.zeros(3, 5, 4, dtype=torch.float64)
    r[0, :, 1], r[0, :, 3], r[1, :, 2] = 1.0, 2.0, 3.0  # module 2: every column converged
    index = unconverged_columns(r)
    assert index.shape == (3, 5, 2)
    gathered = r.gather(2, index)
    torch.testing.assert_close(gathered[0], r[0][:, [1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(gathered[1], torch.stack([r[1, :, 2], torch.zeros(5, dtype=torch.float64)], 1),
                               rtol=0, atol=0)
    assert not gathered[2].any()


@pytest.mark.parametrize("width", [1, 3, 9])
def test_rayleigh_ritz_on_fewer_new_directions_than_ritz_vectors(width):
    """Locked columns leave S narrower than X: the Ritz pairs are still those of span([X, S])."""
    gen = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(2, 40, 40, generator=gen, dtype=torch.float64))[0]
    a = q @ torch.diag_embed(torch.linspace(-3, 5, 40, dtype=torch.float64).expand(2, 40)) @ q.transpose(1, 2)
    x = torch.linalg.qr(torch.randn(2, 40, 6, generator=gen, dtype=torch.float64))[0]
    s = torch.randn(2, 40, width, generator=gen, dtype=torch.float64)
    s[1, :, -1] = 0.0  # a padding column
    new_x, a_new_x, _, theta, _ = rayleigh_ritz(s, lambda block: a @ block, 6, x, a @ x)
    for i in range(2):
        basis = torch.linalg.qr(torch.cat([x[i], s[i][:, s[i].norm(dim=0) > 0]], dim=1))[0]
        want = torch.linalg.eigvalsh(basis.T @ a[i] @ basis)[:6]
        torch.testing.assert_close(theta[i], want, rtol=0, atol=1e-10)
        torch.testing.assert_close(a_new_x[i], a[i] @ new_x[i], rtol=0, atol=1e-10)
        torch.testing.assert_close(new_x[i].T @ new_x[i], torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.03, 5.0])
def test_randomized_solve_equals_exact_on_a_model(beta, mixed):
    stats = lora_da.collect_statistics(tiny_llama(seed=40), random_batches([3, 2], seed=41), progress=False)
    cfg = lora_da.LoraDAConfig(rank=4, variance_weight=beta, damping=1e-4, population_size=50,
                               solver_mixed_precision=mixed)
    exact = lora_da.solve(stats, cfg, solver="exact", progress=False)
    fast = lora_da.solve(stats, cfg, solver="randomized", progress=False)
    report = fast.report
    assert {info.solver for info in report.shapes.values()} == {"randomized"}
    assert all(info.residual <= cfg.solver_tolerance and info.converged for info in report.shapes.values())
    assert all(info.sigma_change <= 1e-8 and not info.sigma_unconverged for info in report.shapes.values())
    for name in exact:
        ba_exact = exact[name].lora_B @ exact[name].lora_A
        ba_fast = fast[name].lora_B @ fast[name].lora_A
        assert float((ba_fast - ba_exact).norm() / ba_exact.norm()) <= 1e-4, name


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_zero_gradient_is_an_error_naming_the_module(solver):
    stats = lora_da.collect_statistics(tiny_llama(seed=40), random_batches([3, 2], seed=41), progress=False)
    name = next(iter(stats.modules))
    stats.modules[name].g_sum.zero_()
    with pytest.raises(ValueError, match=f"{name}.*gradient is zero"):
        lora_da.solve(stats, lora_da.LoraDAConfig(rank=4), solver=solver, progress=False)


def test_batched_equals_unbatched():
    problems = [problem(40, 50, 4, None, s) for s in range(3)]
    variance = [1e-6, 1e-4, 1e-2]
    together, _ = smallest_eigenvectors(operator(problems, variance), 5, oversampling=8, tolerance=1e-10,
                                        max_iterations=300)
    for i in range(3):
        alone, _ = smallest_eigenvectors(operator([problems[i]], [variance[i]]), 5, oversampling=8, tolerance=1e-10,
                                         max_iterations=300)
        assert sine(together[i], alone[0]) <= 1e-6


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_eigh_helper_matches_torch_and_restores_threads(threads):
    """The batch is split over worker threads (unequal parts for 5 over 3)."""
    a = torch.randn(5, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = a + a.transpose(1, 2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, vectors = eigh(a)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(a), rtol=0, atol=1e-12)
    torch.testing.assert_close(vectors @ torch.diag_embed(values) @ vectors.transpose(1, 2), a, rtol=0, atol=1e-11)


def test_consecutive_runs():
    runs = consecutive_runs(torch.tensor([0, 1, 2, 5, 7, 8]))
    assert [r.tolist() for r in runs] == [[0, 1, 2], [5], [7, 8]]
    assert [r.tolist() for r in consecutive_runs(torch.tensor([4]))] == [[4]]


def test_cpu_batches_keep_the_widest_block_within_the_mmap_threshold():
    most = solve_batch_modules(torch.device("cpu"), 1024, 72)
    assert most == 18 and 8 * 1024 * 3 * 72 * most <= 32 * 2**20 < 8 * 1024 * 3 * 72 * (most + 1)
    assert solve_batch_modules(torch.device("cpu"), 10**6, 100) == 1
    assert solve_batch_modules(torch.device("cuda"), 1024, 72) is None


def test_mixed_precision_keeps_the_operator_in_range():
    """Omega' of real statistics can exceed fp32's range on raw vectors (||Omega'|| ~ 1e20 here):
    the working precision only ever sees unit columns."""
    problems = [problem(40, 50, 6, None, s) for s in range(2)]
    problems = [(g * 1e9, d, chol) for g, d, chol in problems]
    op = operator(problems, [0.0, 0.0])
    v, info = smallest_eigenvectors(op, 4, oversampling=8, tolerance=1e-7, max_iterations=100, working=op.to(torch.float32))
    assert bool((info.residuals <= 1e-7).all()) and int(info.iterations.max()) < 100
    for i in range(2):
        assert sine(v[i], torch.linalg.eigh(dense_omega(op, i)).eigenvectors[:, :4]) <= 1e-4


def test_auto_picks_by_size():
    from lora_da.batched_solver import AUTO_RANDOMIZED_MIN_N, resolve_solver

    assert resolve_solver("auto", AUTO_RANDOMIZED_MIN_N) == "randomized"
    assert resolve_solver("auto", AUTO_RANDOMIZED_MIN_N - 1) == "exact"
    assert resolve_solver("exact", 10**6) == "exact"


def test_modules_sharing_an_input_equal_private_copies():
    """Three modules on one input (q/k/v-like) and one on another: shared factors, same products."""
    problems = [problem(30, 20, 3, None, s) for s in range(4)]
    shared_chol = problems[0][2]
    problems = [(g, d, shared_chol if i < 3 else chol) for i, (g, d, chol) in enumerate(problems)]
    private = operator(problems, [1e-3] * 4)
    shared = BlockOperator(private.gradient, private.d, private.zd_inv[[0, 3]], torch.tensor([0, 0, 0, 1]),
                           private.variance, 1.0, lambda: private.zd[[0, 3]])
    x = torch.randn(4, 30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for method in ("omega", "zd_product", "gram"):
        torch.testing.assert_close(getattr(shared, method)(x), getattr(private, method)(x), rtol=1e-12, atol=0)
    keep = torch.tensor([1, 3])
    torch.testing.assert_close(shared.select(keep).omega(x[keep]), private.omega(x)[keep], rtol=1e-12, atol=0)


@pytest.mark.parametrize("limit", ["bytes", "modules"])
def test_batches_bounded_in_memory_give_the_same_factors(monkeypatch, limit):
    import sys

    stats = lora_da.collect_statistics(tiny_llama(seed=6), random_batches([4, 4, 4, 4], seed=7), progress=False)
    cfg = lora_da.LoraDAConfig(rank=4, damping=1e-4, population_size=50, solver="randomized")
    whole = lora_da.solve(stats, cfg, progress=False)
    if limit == "bytes":  # one module per batch
        monkeypatch.setattr(sys.modules["lora_da.batched_solver"], "solve_batch_bytes", lambda device: 1)
    else:  # two
        monkeypatch.setattr(sys.modules["lora_da.batched_solver"], "solve_batch_modules", lambda device, n, columns: 2)
    alone = lora_da.solve(stats, cfg, progress=False)
    assert {k: len(v.modules) for k, v in alone.report.shapes.items()} == {k: len(v.modules) for k, v in whole.report.shapes.items()}
    for name in whole:
        want = whole[name].lora_B @ whole[name].lora_A
        got = alone[name].lora_B @ alone[name].lora_A
        assert float((got - want).norm() / want.norm()) <= 1e-5, name


def test_factors_made_on_host_threads_equal_those_made_one_at_a_time():
    """``InputFactors.stacked_inverses`` (Cholesky factors and inverses side by side on host
    threads, written into one stack) against the lazy path, input by input, with fp32 sums damped
    at their rounding floor."""
    from lora_da.input_factors import InputFactors, rounding_floor

    stats = lora_da.collect_statistics(tiny_llama(seed=6, dtype=torch.float32), random_batches([4, 4], seed=7),
                                       input_factor_dtype="float32", progress=False)
    keys = [key for key, entry in stats.inputs.items() if entry.z_sum.shape[0] == 24]  # one width per stack
    together, alone = (InputFactors(stats, 1e-12, torch.device("cpu")) for _ in range(2))
    stack = together.stacked_inverses(keys)
    for key in keys:
        alone.inverse(key)
    assert together.dampings == alone.dampings
    for key in keys:
        z = stats.input_factor(key).double()
        floor = rounding_floor(z, stats.inputs[key].num_tokens, torch.float32)
        assert together.dampings[key] == pytest.approx(floor, rel=1e-6) and floor > 1e-12
        assert torch.equal(together.factors[key], alone.factors[key])
        assert torch.equal(together.inverses[key], alone.inverses[key])
        assert torch.equal(stack[keys.index(key)], alone.inverses[key])
        sums = stats.inputs[key].z_sum.double() / stats.inputs[key].num_tokens  # the one Zd of factor and preconditioner
        zd = sums + together.dampings[key] * torch.eye(z.shape[0], dtype=torch.float64)
        assert torch.equal(together.damped(key), zd)


def test_exact_and_randomized_paths_share_the_damping_of_each_input():
    """One factorisation per input for both solvers: fp32 sums damped at their rounding floor
    give the same dampings and factors whichever solver reads them."""
    stats = lora_da.collect_statistics(tiny_llama(seed=6, dtype=torch.float32), random_batches([4, 4], seed=7),
                                       input_factor_dtype="float32", progress=False)
    cfg = lora_da.LoraDAConfig(rank=4, damping=1e-12, population_size=50)
    exact = lora_da.solve(stats, cfg, solver="exact", progress=False)
    randomized = lora_da.solve(stats, cfg, solver="randomized", progress=False)
    dampings = [{name: d for info in f.report.shapes.values() for name, d in info.dampings.items()} for f in (exact, randomized)]
    assert dampings[0] == dampings[1] and min(dampings[0].values()) > 1e-12
    for name in exact:
        want = exact[name].lora_B @ exact[name].lora_A
        got = randomized[name].lora_B @ randomized[name].lora_A
        assert float((got - want).norm() / want.norm()) <= 1e-4, name


def test_unconverged_modules_are_named_in_a_warning_and_the_report():
    stats = lora_da.collect_statistics(tiny_llama(seed=40), random_batches([3, 2], seed=41), progress=False)
    cfg = lora_da.LoraDAConfig(rank=4, damping=1e-4, population_size=50, solver="randomized", solver_max_iterations=1)
    with pytest.warns(RuntimeWarning, match=r"solver_max_iterations=1 .*subspace residual tolerance 1e-07: "
                                            r".*model\.layers\.0\.self_attn\.o_proj \(\d\.\de-\d\d\).*sigma\^2 change"):
        factors = lora_da.solve(stats, cfg, progress=False)
    assert factors.report and all(not info.converged for info in factors.report.shapes.values())
    for info in factors.report.shapes.values():
        assert info.iterations == 1 and info.sigma_iterations == 1
        assert set(info.unconverged) <= set(factors) and info.unconverged
        assert all(value > cfg.solver_tolerance for value in info.unconverged.values())
        assert info.sigma_unconverged  # one step cannot measure a change of sigma
    converged = lora_da.solve(stats, cfg.replace(solver_max_iterations=200), progress=False)
    assert all(info.converged and not info.unconverged for info in converged.report.shapes.values())


def test_sigma_iteration_reports_its_convergence():
    op = operator([problem(50, 70, 3, None, s) for s in range(2)], [0.0] * 2)
    _, stopped = top_singular_values(op, block=8, tolerance=1e-10, max_iterations=2)
    assert stopped.iterations.tolist() == [2, 2] and not bool(stopped.converged.all())
    _, done = top_singular_values(op, block=8, tolerance=1e-10, max_iterations=300)
    assert bool(done.converged.all()) and bool((done.residuals <= 1e-10).all()) and int(done.iterations[0]) < 300


@pytest.mark.parametrize("place", ["host", "device"])
def test_small_eigenproblems_placement_is_a_config_field(place):
    stats = lora_da.collect_statistics(tiny_llama(seed=40), random_batches([3, 2], seed=41), progress=False)
    cfg = lora_da.LoraDAConfig(rank=4, damping=1e-4, population_size=50, solver="randomized")
    want = lora_da.solve(stats, cfg, progress=False)
    got = lora_da.solve(stats, cfg, solver_small_eigh=place, progress=False)
    for name in want:
        torch.testing.assert_close(got[name].lora_A, want[name].lora_A, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown solver_small_eigh 'gpu'"):
        lora_da.LoraDAConfig(solver_small_eigh="gpu")
