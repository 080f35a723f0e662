"""The solve in the span of an input's tokens, for inputs with fewer counted tokens than features
(README, "Token space"): Z's eigenbasis there, the cost model that picks it, and the subspaces."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .config import LoraDAConfig
from .batched_solver import SOLVE_BATCH_BYTES, resolve_solver
from .eigensolver import eigh
from .input_factors import InputFactors
from .natural_gradient import check_gradients, delta_scale, output_scaling, variance_coefficients
from .report import ModuleReport
from .statistics import Statistics
from .subspaces import Subspace, Subspaces, fix_signs


TOKEN_BASIS_OVERSAMPLING = 8  # extra columns of the range finder of Z when it has fewer tokens than features


EIGH_FLOPS = 9  # counted flops of a symmetric eigendecomposition with its vectors, per n^3


# the randomized solver's iterations as the token space's cost model counts them: the main job's
# shapes take 13 to 16 (RESULTS.md, "The main job"), and clustered spectra many more
RANDOMIZED_ITERATIONS_COUNTED = 16


class TokenBases:
    """Per input with fewer counted tokens than features: Z's eigenbasis in the span of its tokens
    (``basis``) and the Gaussians of its range finder and sketches (``probe``), released with the
    input's factors (``InputFactors.release``)."""

    def __init__(self, factors: InputFactors, seed: int = 0):
        self.factors, self.seed = factors, seed
        self.bases: Dict[str, Optional[Tuple[torch.Tensor, torch.Tensor]]] = {}  # key -> basis
        self.probes: Dict[Tuple[int, int], torch.Tensor] = {}  # (n, columns) -> a Gaussian
        factors.on_release.append(self.release)

    def basis(self, key: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """For an input with fewer counted tokens than features (T + TOKEN_BASIS_OVERSAMPLING < n),
        whose Z has rank at most T: (W [n, s], z [s]), orthonormal eigenvectors of Z and their
        eigenvalues, for the s eigenvalues above the rounding floor of Z's sums (the rest of R^n is
        Z's numerical null space); None for other inputs. Found by a randomized range finder with
        T + TOKEN_BASIS_OVERSAMPLING columns, exact for a rank-T matrix, and Rayleigh-Ritz, then
        checked on a Gaussian sketch: W diag(z) W^T must equal Z to its rounding floor."""
        if key not in self.bases:
            entry = self.factors.stats.inputs[key]
            n, tokens = entry.z_sum.shape[0], entry.num_tokens
            self.bases[key] = None
            if tokens + TOKEN_BASIS_OVERSAMPLING < n:
                z = self.factors.z(key)
                floor = self.factors.floor(key, z)
                q = torch.linalg.qr(z @ self.probe(n, tokens + TOKEN_BASIS_OVERSAMPLING)).Q
                values, vectors = eigh(q.T @ (z @ q))
                kept = values > floor
                w, values = q @ vectors[:, kept], values[kept]
                # statistics whose Z has a larger rank than their token count (edited, or made up) keep the full solve
                probe = self.probe(n, TOKEN_BASIS_OVERSAMPLING)
                missed = torch.linalg.matrix_norm(z @ probe - w @ (values[:, None] * (w.T @ probe)))
                if float(missed) <= math.sqrt(TOKEN_BASIS_OVERSAMPLING * n) * floor:
                    self.bases[key] = (w, values)
        return self.bases[key]

    def probe(self, n: int, columns: int) -> torch.Tensor:
        """A Gaussian [n, columns] (fp64, on the device) from the seed, made once per size."""
        if (n, columns) not in self.probes:
            self.probes[(n, columns)] = torch.randn(n, columns, dtype=torch.float64,
                                                    generator=torch.Generator().manual_seed(self.seed)).to(
                                                        self.factors.device)
        return self.probes[(n, columns)]

    def release(self, key: str) -> None:
        """Forget the basis of input ``key``, and the Gaussians of its width once no input of that
        width is still read."""
        self.bases.pop(key, None)
        inputs = self.factors.stats.inputs
        n = inputs[key].z_sum.shape[0]
        if not any(count > 0 and inputs[k].z_sum.shape[0] == n for k, count in self.factors.readers.items()):
            for size in [size for size in self.probes if size[0] == n]:
                del self.probes[size]


def sketched_outside(gradient: torch.Tensor, projected: torch.Tensor, w: torch.Tensor, probe: torch.Tensor) -> float:
    """||G (I - W W^T) P||_F for G [m, n], G W [m, s], W [n, s] and a Gaussian sketch P [n, p]:
    about sqrt(p) ||G (I - W W^T)||_F (E ||A P||_F^2 = p ||A||_F^2), for 2 m n p flops."""
    return float(torch.linalg.matrix_norm(gradient @ probe - projected @ (w.T @ probe)))


def rounding_outside(stats: Statistics, name: str, projected: torch.Tensor, z: torch.Tensor, floor: float) -> float:
    """The largest ``sketched_outside`` (8 columns) that rounding alone explains for a module whose
    G has no rows outside the span of its input's tokens in exact arithmetic: G's sums over T tokens
    (eps sqrt(T) sum_t |g_t| |x_t| / S, where sum_t |g_t| |x_t| <= T sqrt(sum(y) tr(Z))), the
    sketch's products of length n, and the basis (eigenvector i off by about floor / z_i)."""
    tokens = stats.inputs[stats.modules[name].input_key].num_tokens
    eps = torch.finfo(stats.modules[name].g_sum.dtype).eps
    sums = tokens * math.sqrt(float(stats.output_factor(name).sum()) * float(z.sum())) / stats.num_sequences
    n = stats.modules[name].g_sum.shape[1]
    sketch = torch.finfo(torch.float64).eps * math.sqrt(n) * float(torch.linalg.matrix_norm(projected))
    basis = float(torch.linalg.matrix_norm(projected * (floor / z)))
    return math.sqrt(TOKEN_BASIS_OVERSAMPLING) * (eps * math.sqrt(tokens) * sums + sketch + basis)


def token_space_pays(n: int, tokens: int, widths: Sequence[int], solver: str, columns: int) -> bool:
    """Whether the modules of one input (in_features n, out_features ``widths``) cost fewer counted
    flops in the span of its ``tokens`` counted tokens (s = tokens + TOKEN_BASIS_OVERSAMPLING
    columns: the range finder's products with Z, its QR and Rayleigh-Ritz, the sketch's check, and
    per module G W, Delta_S^T Delta_S and an s x s eigenproblem) than in the full solve (Cholesky
    and inverse of Zd, per module Delta = G Zd^-1, then an n x n eigenproblem for the exact solver,
    or RANDOMIZED_ITERATIONS_COUNTED applies of Omega to ``columns`` vectors for the randomized one).
    Where Z's null space (n - T directions, all at the damping in Zd) is wider than twice the
    randomized solver's ``columns``, that solver stalls at its iteration limit with residuals far
    above its tolerance (RESULTS.md, "Token space"): the span, exact, is taken there."""
    s = tokens + TOKEN_BASIS_OVERSAMPLING
    if s >= n:
        return False
    if solver == "randomized" and n - tokens > 2 * columns:
        return True
    basis = 4 * n * n * s + 4 * n * s * s + EIGH_FLOPS * s ** 3 + 2 * n * n * TOKEN_BASIS_OVERSAMPLING
    in_span = basis + sum(2 * m * n * s + 2 * m * s * s + EIGH_FLOPS * s ** 3 for m in widths)
    per_module = {"exact": lambda m: EIGH_FLOPS * n ** 3,
                  "randomized": lambda m: RANDOMIZED_ITERATIONS_COUNTED * (4 * m * n + 2 * n * n) * columns}[solver]
    full = n ** 3 / 3 + n ** 3 + sum(2 * m * n * n + per_module(m) for m in widths)
    return in_span < full


def token_space_inputs(stats: Statistics, names: Sequence[str], solver: str, columns: int) -> set:
    """The inputs of ``names`` to solve in the span of their tokens: fp64 statistics (in fp32, the
    rounding of G's sums outside that span, which the full solve keeps and Zd^-1 = 1 / damping
    amplifies there, would make the two solves differ by more than their rounding, and results
    jump as T crosses n) whose counted cost is lower there (``token_space_pays``)."""
    if stats.dtype != torch.float64:
        return set()
    keys = {stats.modules[name].input_key for name in names}
    return {key for key in keys
            if token_space_pays(stats.inputs[key].z_sum.shape[0], stats.inputs[key].num_tokens,
                                [stats.modules[m].g_sum.shape[0] for m in stats.inputs[key].modules], solver,
                                columns)}


def token_space_subspaces(stats: Statistics, names: Sequence[str], bases: TokenBases, cfg: LoraDAConfig,
                          betas: Sequence[float], rank: int, population: int, eigh_on_host: bool = True,
                          budget: int = SOLVE_BATCH_BYTES) -> Dict[str, Dict[float, Subspace]]:
    """The exact subspaces of those of ``names`` (one shape) whose input has fewer counted tokens
    than features: module -> beta -> Subspace.

    With (W [n, s], z [s]) = ``bases.basis`` and S = span(W), Zd is diag(z + damping) on S
    and damping I on its complement, where Z vanishes. When G has no rows outside S (every token
    with an output gradient is counted), Delta = Delta_S W^T with Delta_S = -diag(d) (G W)
    diag(z + damping)^-1 [m, s], and Omega' = s^2 Omega is -alpha Delta_S^T Delta_S + c' Zd^-1
    on S and c' / damping on the complement: its smallest eigenvectors come from an s x s
    eigenproblem, solved densely (the modules of one s together). A module is left to the full
    solve when G reaches outside S beyond the rounding of its sums, when s < r, or when the
    complement's eigenvalue is not above the r-th smallest on S. Only the inputs
    ``token_space_inputs`` picks are tried; the modules of one s are solved in stacks of at most
    ``budget`` bytes ([b, s, s] fp64, three of them)."""
    problems = _problems(stats, names, bases, cfg, rank)
    out: Dict[str, Dict[float, Subspace]] = {}
    stacks = []
    for size in sorted({problem.basis.shape[1] for problem in problems}):
        same = [problem for problem in problems if problem.basis.shape[1] == size]
        most = max(1, budget // (3 * 8 * size * size))
        stacks += [(size, same[start:start + most]) for start in range(0, len(same), most)]
    for size, group in stacks:
        grams = torch.stack([problem.delta.T @ problem.delta for problem in group])  # [b, s, s]
        sigma = eigh(grams, on_host=eigh_on_host)[0][:, -1].clamp_min(0.0).sqrt() if cfg.normalize_delta \
            else torch.ones(len(group), dtype=grams.dtype, device=grams.device)
        scale = delta_scale(sigma, cfg)
        d_sums = torch.tensor([problem.d_sum for problem in group], dtype=grams.dtype, device=grams.device)

        def norms(group=group, grams=grams, size=size):
            """||Delta^T Delta||_F = ||Delta_S^T Delta_S||_F, and ||Zd^-1||_F over S and its complement."""
            inverse = torch.stack([(p.zd_inv.square().sum() + (p.basis.shape[0] - size) / p.damping**2).sqrt()
                                   for p in group])
            return torch.linalg.matrix_norm(grams), inverse

        for beta in betas:
            variance = variance_coefficients(cfg, beta, d_sums, population, norms)  # c' [b]
            values, vectors = eigh(-cfg.bias_weight * grams + torch.diag_embed(variance[:, None] * torch.stack(
                [p.zd_inv for p in group])), on_host=eigh_on_host)
            for i, problem in enumerate(group):
                if float(values[i, rank - 1]) < float(variance[i]) / problem.damping:  # the complement's
                    v = fix_signs(problem.basis @ vectors[i, :, :rank])
                    lora_b = problem.delta @ (problem.basis.T @ v) / float(scale[i])
                    out.setdefault(problem.name, {})[beta] = Subspace(
                        v, lora_b, values[i, :rank] / float(scale[i]) ** 2,
                        float(problem.delta.square().sum()) / float(scale[i]) ** 2)
    return {name: found for name, found in out.items() if len(found) == len(betas)}


class TokenSpaceSolver:
    """The chunk solver (``subspaces.ChunkSolver``) in the span of the inputs' tokens: it solves
    those modules of a chunk that ``token_space_subspaces`` can, and leaves the rest."""

    def __init__(self, stats: Statistics, cfg: LoraDAConfig, population: int, factors: InputFactors,
                 budget: int = SOLVE_BATCH_BYTES):
        self.stats, self.cfg, self.population, self.factors, self.budget = stats, cfg, population, factors, budget
        self.bases = TokenBases(factors, cfg.seed)

    def solve(self, names: List[str], rank: int, betas: Sequence[float]) -> Tuple[Subspaces, Dict[str, ModuleReport]]:
        found = token_space_subspaces(self.stats, names, self.bases, self.cfg, betas, rank, self.population,
                                      self.cfg.solver_small_eigh == "host", self.budget)
        reports = {}
        for name in found:
            key = self.stats.modules[name].input_key
            reports[name] = ModuleReport(self.factors.damping(key), token_space=self.bases.bases[key][0].shape[1])
        self.factors.done(found)
        subspaces = {(beta, name): subspace for name, per_beta in found.items() for beta, subspace in per_beta.items()}
        return subspaces, reports


def _problems(stats: Statistics, names: Sequence[str], bases: TokenBases, cfg: LoraDAConfig,
              rank: int) -> List["_TokenSpaceProblem"]:
    """The ``_TokenSpaceProblem`` of each of ``names`` whose input ``token_space_inputs`` picks, whose
    span has r columns or more and whose G stays in it to the rounding of its sums."""
    problems, factors = [], bases.factors
    chosen = token_space_inputs(stats, names, resolve_solver(cfg.solver, stats.modules[names[0]].g_sum.shape[1]),
                                rank + cfg.solver_oversampling)
    for name in names:
        key = stats.modules[name].input_key
        basis = bases.basis(key) if key in chosen else None
        if basis is None or basis[0].shape[1] < rank:
            continue
        w, z = basis
        gradient = stats.gradient(name, w.device).double()
        projected = gradient @ w  # [m, s]
        if sketched_outside(gradient, projected, w, bases.probe(w.shape[0], TOKEN_BASIS_OVERSAMPLING)) > \
                rounding_outside(stats, name, projected, z, factors.floor(key)):
            continue
        d = output_scaling(stats, name, cfg, w.device)
        damping = factors.damping(key)
        delta = -d[:, None] * projected / (z + damping)
        check_gradients([name], [delta])
        problems.append(_TokenSpaceProblem(name, w, delta, 1.0 / (z + damping), damping, float(d.sum())))
    return problems


@dataclass
class _TokenSpaceProblem:
    """One module's problem in the span S of its input's tokens (``token_space_subspaces``)."""

    name: str
    basis: torch.Tensor  # W [n, s]
    delta: torch.Tensor  # Delta W [m, s]
    zd_inv: torch.Tensor  # Zd^-1 on S, the diagonal [s]
    damping: float  # Zd^-1 is 1 / damping on the complement of S
    d_sum: float  # sum(d)
