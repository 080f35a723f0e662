"""The solvers of one chunk of modules (one shape): the exact solver, one module at a time, and the
randomized one, the chunk's modules stacked on the device and solved together; with the chunks
and the memory they may take."""
from __future__ import annotations

import functools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .config import LoraDAConfig
from .block_operator import BlockOperator
from .eigensolver import SolveInfo, eigh, smallest_eigenvectors, top_singular_values
from .input_factors import InputFactors
from .natural_gradient import check_gradients, delta_scale, natural_gradient, output_scaling, variance_coefficients
from .report import ModuleReport
from .statistics import Statistics
from .subspaces import Subspace, Subspaces, fix_signs


SOLVE_BATCH_BYTES = 2**31  # the randomized solver stacks at most this much of G and the input factors at once


# on CPUs, the solver's widest fp64 block [b, n, 3k] stays below glibc's largest mmap threshold: larger
# blocks are mapped afresh at each allocation and page-faulted anew (RESULTS.md, "Eigensolver (CPU)")
CPU_BLOCK_BYTES = 32 * 2**20


SIGMA_TOLERANCE = 1e-8  # relative change of sigma^2 at which the randomized path's sigma iteration stops


DELTA_NORM_PROBES = 16  # Gaussian columns of the randomized path's estimate of ||Delta||_F^2 (the captured share)


AUTO_RANDOMIZED_MIN_N = 512  # solver="auto" takes the randomized solver from this in_features on


def resolve_solver(solver: str, in_features: int) -> str:
    """``auto`` takes the randomized solver for modules with n >= AUTO_RANDOMIZED_MIN_N."""
    if solver != "auto":
        return solver
    return "randomized" if in_features >= AUTO_RANDOMIZED_MIN_N else "exact"


def solve_batch_bytes(device: torch.device) -> int:
    """Bytes of G and input factors the randomized solver stacks at once: SOLVE_BATCH_BYTES, or
    on a GPU a quarter of its free memory where that is more."""
    if device.type == "cuda":
        return max(SOLVE_BATCH_BYTES, torch.cuda.mem_get_info(device)[0] // 4)
    return SOLVE_BATCH_BYTES


def solve_batch_modules(device: torch.device, n: int, columns: int) -> Optional[int]:
    """Most modules of in_features ``n`` the randomized solver stacks at once with ``columns`` = r +
    oversampling search vectors: on CPUs, as many as keep [b, n, 3 columns] fp64 within
    CPU_BLOCK_BYTES; no limit elsewhere."""
    if device.type != "cpu":
        return None
    return max(1, CPU_BLOCK_BYTES // (8 * n * 3 * columns))


def exact_subspace(dhat: torch.Tensor, zd_inv: Optional[torch.Tensor], c: float, bias_weight: float, rank: int,
                   eigh_on_host: bool = True) -> torch.Tensor:
    """V [n, r]: eigenvectors of Omega = -alpha dhat^T dhat + c Zd^-1 with the smallest eigenvalues.

    dhat: [m, n]; zd_inv: Zd^-1 [n, n] (unused, may be None, when c = 0: then these are the
    top-r right singular vectors of dhat).
    """
    if c == 0.0:
        return torch.linalg.svd(dhat, full_matrices=False).Vh[:rank].T
    omega = -bias_weight * (dhat.T @ dhat) + c * zd_inv
    return eigh(0.5 * (omega + omega.T), on_host=eigh_on_host).eigenvectors[:, :rank]


class ExactSolver:
    """The exact chunk solver (``subspaces.ChunkSolver``), one module at a time: Delta by Cholesky
    solves, then a dense eigenproblem of Omega per beta."""

    def __init__(self, stats: Statistics, cfg: LoraDAConfig, population: int, factors: InputFactors):
        self.stats, self.cfg, self.population, self.factors = stats, cfg, population, factors

    def solve(self, names: List[str], rank: int, betas: Sequence[float]) -> Tuple[Subspaces, Dict[str, ModuleReport]]:
        stats, cfg, factors = self.stats, self.cfg, self.factors
        eigh_on_host = cfg.solver_small_eigh == "host"
        out, reports = {}, {}
        for name in names:
            key = stats.modules[name].input_key
            ng = natural_gradient(stats, name, factors.cholesky(key), cfg)
            for beta in betas:
                c = ng.variance_coefficient(cfg.replace(variance_weight=beta), self.population,
                                            lambda key=key: factors.inverse(key))
                zd_inv = factors.inverse(key) if c != 0.0 else None
                v = fix_signs(exact_subspace(ng.delta_hat, zd_inv, c, cfg.bias_weight, rank, eigh_on_host))
                lora_b = ng.delta_hat @ v
                values = -cfg.bias_weight * lora_b.square().sum(dim=0)
                if zd_inv is not None:
                    values += c * (v * (zd_inv @ v)).sum(dim=0)
                out[(beta, name)] = Subspace(v, lora_b, values, float(ng.delta_hat.square().sum()))
            reports[name] = ModuleReport(factors.damping(key))
            factors.done([name])
        return out, reports


def chunks(stats, names: List[str], shape: Tuple[int, int, int], budget: int,
            most: Optional[int] = None) -> Iterator[List[str]]:
    """Consecutive runs of ``names`` (one shape, in model order, so q/k/v stay together) of at most
    ``most`` modules whose randomized-solver tensors fit ``budget`` bytes: G in fp64 and fp32, and
    per distinct input Zd^-1 in fp64 and fp32 (and Zd when the preconditioner runs). At least one
    module per run."""
    m, n, _ = shape
    chunk, keys = [], set()
    for name in names:
        key = stats.modules[name].input_key
        need = 12 * m * n * (len(chunk) + 1) + 24 * n * n * len(keys | {key})
        if chunk and (need > budget or len(chunk) == most):
            yield chunk
            chunk, keys = [], set()
        chunk.append(name)
        keys.add(key)
    if chunk:
        yield chunk


class RandomizedSolver:
    """The randomized chunk solver (``subspaces.ChunkSolver``): stacks the modules of one shape on
    ``device`` and solves them together."""

    def __init__(self, stats: Statistics, cfg: LoraDAConfig, population: int, factors: InputFactors,
                 device: torch.device):
        self.stats, self.cfg, self.population, self.factors, self.device = stats, cfg, population, factors, device
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def operator(self, names) -> BlockOperator:
        """Omega' of the modules ``names`` (one shape) with c' = 0; the input factors are done with
        once stacked. Stacks are filled one module at a time."""
        stats, cfg, factors, device = self.stats, self.cfg, self.factors, self.device
        keys = [stats.modules[name].input_key for name in names]
        distinct = list(dict.fromkeys(keys))
        d = torch.stack([output_scaling(stats, name, cfg, device) for name in names])
        gradient = stacked([lambda name=name: stats.modules[name].g_sum.to(device) for name in names], torch.float64)
        op = BlockOperator(
            gradient=gradient.div_(stats.num_sequences),
            d=d,
            zd_inv=factors.stacked_inverses(distinct),
            owner=torch.tensor([distinct.index(key) for key in keys]),  # on the host
            variance=torch.zeros(len(names), dtype=d.dtype, device=d.device),
            bias_weight=cfg.bias_weight,
            make_zd=lambda: stacked([lambda key=key: factors.damped(key) for key in distinct]),
        )
        factors.done(names)
        check_gradients(names, op.gradient)
        return op

    def solve(self, names: List[str], rank: int, betas: Sequence[float]) -> Tuple[Subspaces, Dict[str, ModuleReport]]:
        """The operator, sigma and ||Delta||_F are shared by the variance weights ``betas``; each
        module's report takes the largest iteration count and residual over them."""
        op, cfg = self.operator(names), self.cfg
        working = op.to(torch.float32) if cfg.solver_mixed_precision else None
        eigh_on_host = cfg.solver_small_eigh == "host"
        sigma = sigma_info = norms_of_delta = None
        norms = functools.lru_cache(maxsize=None)(lambda: (op.gram_norms(), op.inverse_norms()))
        subspaces, runs = {}, []
        for beta in betas:
            op.variance = variance_coefficients(cfg, beta, op.d.sum(dim=1), self.population, norms)
            if working is not None:
                working.variance = op.variance.to(working.variance.dtype)
            v, convergence = smallest_eigenvectors(
                op, rank, oversampling=cfg.solver_oversampling, tolerance=cfg.solver_tolerance,
                max_iterations=cfg.solver_max_iterations, generator=self.generator, working=working,
                eigh_on_host=eigh_on_host,
            )
            runs.append(convergence)
            if sigma is None:
                if cfg.normalize_delta:
                    sigma, sigma_info = top_singular_values(op, block=8, tolerance=SIGMA_TOLERANCE,
                                                            max_iterations=cfg.solver_max_iterations,
                                                            start=v[:, :, :8], eigh_on_host=eigh_on_host)
                else:
                    sigma = torch.ones(len(names), dtype=op.gradient.dtype, device=op.gradient.device)
                    sigma_info = SolveInfo.exact(len(names))
            v = fix_signs(v)
            scale = delta_scale(sigma, cfg)[:, None]
            delta_v = op.delta(v)
            values = (v * op.omega(v)).sum(dim=1) / scale**2
            if norms_of_delta is None:
                norms_of_delta = self.delta_norm2(op, v, delta_v) / scale[:, 0] ** 2
            subspaces.update({(beta, name): Subspace(v[i], delta_v[i] / scale[i], values[i], float(norms_of_delta[i]))
                              for i, name in enumerate(names)})
        reports = {name: ModuleReport(
            self.factors.damping(self.stats.modules[name].input_key),
            iterations=max(int(run.iterations[i]) for run in runs),
            residual=max(float(run.residuals[i]) for run in runs),
            converged=all(bool(run.converged[i]) for run in runs),
            sigma_iterations=int(sigma_info.iterations[i]), sigma_change=float(sigma_info.residuals[i]),
            sigma_converged=bool(sigma_info.converged[i])) for i, name in enumerate(names)}
        return subspaces, reports

    def delta_norm2(self, op: BlockOperator, v: torch.Tensor, delta_v: torch.Tensor) -> torch.Tensor:
        """||Delta_b||_F^2 [b], without forming Delta: ||Delta V||^2 (exact, V [b, n, R] orthonormal,
        Delta V given) plus the unbiased estimate ||Delta (I - V V^T) W||^2 / k of the rest, from
        k = DELTA_NORM_PROBES Gaussian columns W (seeded): E ||A w||^2 = ||A||_F^2."""
        probes = torch.randn(v.shape[0], v.shape[1], DELTA_NORM_PROBES, dtype=v.dtype, generator=self.generator)
        probes = probes.to(v.device)
        rest = probes - v @ (v.mT @ probes)
        return delta_v.square().sum(dim=(1, 2)) + op.delta(rest).square().sum(dim=(1, 2)) / DELTA_NORM_PROBES


def stacked(makers, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """torch.stack of the tensors the callables make, one at a time (no list of temporaries),
    cast to ``dtype`` (default: theirs) as they are copied in."""
    first = makers[0]()
    out = first.new_empty((len(makers), *first.shape), dtype=dtype or first.dtype)
    out[0] = first
    for i, make in enumerate(makers[1:], start=1):
        out[i] = make()
    return out
