"""From statistics to LoRA factors: natural-gradient estimate, guidance matrix, subspace."""
from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from . import dispatch, distributed
from .config import LoraDAConfig, resolve_config
from .eigensolver import (BlockOperator, SolveInfo, eigh, gram_norm, on_host_threads, on_one_thread,
                          smallest_eigenvectors, top_singular_values)
from .statistics import Statistics


AUTO_RANDOMIZED_MIN_N = 512  # solver="auto" takes the randomized solver from this in_features on
SOLVE_BATCH_BYTES = 2**31  # the randomized solver stacks at most this much of G and the input factors at once
# on CPUs, the solver's widest fp64 block [b, n, 3k] stays below glibc's largest mmap threshold: larger
# blocks are mapped afresh at each allocation and page-faulted anew (RESULTS.md, "Eigensolver (CPU)")
CPU_BLOCK_BYTES = 32 * 2**20
SIGMA_TOLERANCE = 1e-8  # relative change of sigma^2 at which the randomized path's sigma iteration stops
TOKEN_BASIS_OVERSAMPLING = 8  # extra columns of the range finder of Z when it has fewer tokens than features
EIGH_FLOPS = 9  # counted flops of a symmetric eigendecomposition with its vectors, per n^3
# the randomized solver's iterations as the token space's cost model counts them: the main job's
# shapes take 13 to 16 (RESULTS.md, "The main job"), and clustered spectra many more
RANDOMIZED_ITERATIONS_COUNTED = 16
DELTA_NORM_PROBES = 16  # Gaussian columns of the randomized path's estimate of ||Delta||_F^2 (the captured share)


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


@dataclass
class LoraFactors:
    """LoRA-DA factors of one module: the adapted weight starts at W0 + s * lora_B @ lora_A."""

    lora_A: torch.Tensor  # [r, n]
    lora_B: torch.Tensor  # [m, r]


class Factors(dict):
    """{module name: LoraFactors}, as ``solve`` returns them, with ``report``: what the solver did
    per module shape ("m x n, r=..") as ``{"solver", "modules", "converged"}``, ``dampings``:
    module -> the damping of its input factor (the config's, or the rounding floor of fp32 sums,
    see ``InputFactors``), ``token_space``: module -> s for the modules solved in the span of their
    input's s tokens (``token_space_subspaces``), and for the
    randomized solver the largest ``iterations`` and ``residual`` of the eigenvectors, the largest
    ``sigma_iterations`` and ``sigma_change`` (last relative change of sigma^2) of the sigma
    iteration, and ``unconverged`` / ``sigma_unconverged``: module -> residual or change, for the
    modules that stopped at ``solver_max_iterations`` before their tolerance."""

    def __init__(self, factors: Mapping[str, LoraFactors], report: Dict[str, dict]):
        super().__init__(factors)
        self.report = report


def check_ranks(shapes: Mapping[str, Tuple[int, int]], ranks: Mapping[str, int]) -> None:
    """Raise ValueError naming every module whose rank exceeds min(m, n). shapes: name -> (m, n)."""
    bad = [f"{name} (r={ranks[name]}, weight {m}x{n})" for name, (m, n) in shapes.items() if ranks[name] > min(m, n)]
    if bad:
        raise ValueError(f"rank larger than min(out_features, in_features) for: {', '.join(bad)}")


def rounding_floor(z: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> float:
    """The smallest damping that Z [n, n] summed over ``num_tokens`` tokens in ``dtype`` can take:
    eps(dtype) * sqrt(T) * ||Z||_F. The rounding noise E of such sums can make Z + lambda I
    indefinite when ||E||_2 > lambda; on the main job's 120 inputs, ||E||_2 stays below
    2 eps * ||Z||_2 in fp32, 35 times or more below this floor (RESULTS.md), and sqrt(T) covers
    the growth of summation errors with the number of terms."""
    return torch.finfo(dtype).eps * math.sqrt(num_tokens) * float(torch.linalg.matrix_norm(z))


def damped_cholesky(zd: torch.Tensor, damping: float, what: str) -> torch.Tensor:
    """zd [n, n] = Z + damping*I (its lower triangle is read) overwritten with its lower Cholesky
    factor L, which is returned; RuntimeError when zd is not positive definite (Z is then not
    the sum of outer products its statistics claim: corrupted, or edited)."""
    _, info = torch.linalg.cholesky_ex(zd, out=(zd, torch.empty((), dtype=torch.int32, device=zd.device)))
    if int(info) != 0:
        raise RuntimeError(f"lora_da: Cholesky of the input factor of {what} failed at damping {damping:g}: "
                           "Z + damping I is not positive definite, so Z is no sum of outer products")
    return zd


def scaled_damping(damping: float, scale: float) -> float:
    """``damping`` * ``scale``, the mean eigenvalue of a factor (``damping_mode="relative"``), or
    ``damping`` where that factor is 0."""
    return damping * scale if scale > 0 else damping


def output_damping(y: torch.Tensor, cfg: LoraDAConfig) -> float:
    """The output side's damping for y [m]: lambda (lambda * mean(y) when ``damping_mode`` is
    relative), or with ``output_damping_ratio`` rho max(rho * median(y), the smallest positive
    normal number of y's dtype)."""
    if cfg.output_damping_ratio is None:
        return scaled_damping(cfg.damping, float(y.double().mean())) if cfg.damping_mode == "relative" else cfg.damping
    return max(cfg.output_damping_ratio * float(torch.median(y)), torch.finfo(y.dtype).tiny)


def output_scaling(stats: Statistics, name: str, cfg: LoraDAConfig, device: Optional[torch.device] = None) -> torch.Tensor:
    """d [m]: the diagonal of the inverse output Fisher factor (fp64, on ``device``), damped by
    ``output_damping``."""
    y = stats.output_factor(name, device)
    damping = output_damping(y, cfg)
    if stats.output_fisher == "diagonal":
        return 1.0 / (y.double() + damping)
    p = stats.sequence_factor(name, device).double()  # [m, K]
    k = p.shape[1]
    gram = damping * torch.eye(k, dtype=p.dtype, device=p.device) + p.T @ p
    solved = torch.cholesky_solve(p.T, torch.linalg.cholesky(gram)).T  # P (lambda_y I + P^T P)^-1
    return torch.clamp_min(1.0 - (p * solved).sum(dim=1), 0.0) / damping


def delta_scale(sigma: torch.Tensor, cfg: LoraDAConfig) -> torch.Tensor:
    """s [b] that Delta is divided by, from its top singular values sigma [b]: sigma^p *
    rho_Delta^(1 - p) with ``normalize_delta`` (sigma itself at the default p = 1), else 1."""
    if not cfg.normalize_delta:
        return torch.ones_like(sigma)
    p = cfg.delta_normalization_power
    return sigma if p == 1.0 else sigma**p * cfg.delta_normalization_reference ** (1.0 - p)


def variance_coefficients(cfg: LoraDAConfig, beta: float, d_sum: torch.Tensor, population: int,
                          norms: Callable[[], Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """c' [b] of Omega' = s^2 Omega = -alpha Delta^T Delta + c' Zd^-1 (the eigenvectors of Omega):
    beta * sum(d) / N, from d_sum = sum(d) [b]. With ``normalize_variance_guidance``
    the variance term takes the bias term's Frobenius norm before beta weighs it:
    c' = beta * alpha * ||Delta^T Delta||_F / ||Zd^-1||_F, where ``norms()`` gives the two norms
    [b], [b] (called only then); modules with sum(d) = 0 keep c' = 0."""
    plain = beta * d_sum / population
    if beta == 0.0 or not cfg.normalize_variance_guidance:
        return plain
    bias, inverse = norms()
    return torch.where(d_sum > 0, beta * cfg.bias_weight * bias / inverse, plain)


def column_signs(v: torch.Tensor) -> torch.Tensor:
    """[..., 1, r]: +-1 per column of v [..., n, r], the sign of its largest-magnitude entry (+1 for zero columns)."""
    index = v.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(v, -2, index))
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def fix_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip each column of v [..., n, r] so that its largest-magnitude entry is positive."""
    return v * column_signs(v)


def balanced(lora_b: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B [m, r], A [r, n]) with B A = lora_b V^T that do not depend on the basis V [n, r] of the
    subspace: lora_b = U S W^T (thin SVD, each column of U and row of W^T flipped so that U's
    largest-magnitude entry is positive), B = U S^1/2, A = S^1/2 W^T V^T."""
    u, s, wt = torch.linalg.svd(lora_b, full_matrices=False)
    signs = column_signs(u)  # [1, r]
    root = s.sqrt()
    return u * signs * root, (root[:, None] * signs.T * wt) @ v.T


def factor_pair(subspace: Subspace, rank: int, cfg: LoraDAConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lora_B [m, r], lora_A [r, n]) before the 1/sqrt(gamma) step size, from the leading ``rank``
    columns of ``subspace`` (balanced with ``balance_factors``)."""
    v, lora_b = subspace.v[:, :rank], subspace.lora_b[:, :rank]
    return balanced(lora_b, v) if cfg.balance_factors else (lora_b, v.T)


def diagnose(subspace: Subspace, rank: int, z: torch.Tensor, cfg: LoraDAConfig) -> Dict[str, float]:
    """What the chosen subspace is, for a module with input factor Z [n, n]:
    ``input_energy`` e(A) = tr(A Z A^T) / tr(A A^T) / (tr Z / n), the input energy along lora_A
    relative to a random direction; ``captured_share`` = ||Delta_hat V||_F^2 / ||Delta_hat||_F^2;
    ``objective`` = tr(V^T Omega V), the value the subspace minimises."""
    lora_a = factor_pair(subspace, rank, cfg)[1].to(z.dtype)
    energy = float((lora_a @ z * lora_a).sum() / lora_a.square().sum() / (z.diagonal().sum() / z.shape[0]))
    share = float(subspace.lora_b[:, :rank].square().sum()) / subspace.delta_norm2
    return {"input_energy": energy, "captured_share": share, "objective": float(subspace.values[:rank].sum())}


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


@dataclass
class NaturalGradient:
    """ALGORITHM.md step 2 for one module (fp64)."""

    delta_hat: torch.Tensor  # [m, n]: Delta / s
    scale: float  # s = delta_scale(sigma), sigma the top singular value of Delta (1 when not normalising)
    d: torch.Tensor  # [m]: output scaling

    def variance_coefficient(self, cfg: LoraDAConfig, population_size: int,
                             zd_inverse: Optional[Callable[[], torch.Tensor]] = None) -> float:
        """c of Omega = -alpha Delta_hat^T Delta_hat + c Zd^-1: c' / s^2 (``variance_coefficients``
        at beta = cfg.variance_weight); ``zd_inverse()`` gives Zd^-1 [n, n] where
        ``normalize_variance_guidance`` needs its norm."""
        def norms():
            if zd_inverse is None:
                raise ValueError("normalize_variance_guidance needs Zd^-1 (zd_inverse)")
            return gram_norm(self.delta_hat)[None] * self.scale**2, torch.linalg.matrix_norm(zd_inverse())[None]

        c = variance_coefficients(cfg, cfg.variance_weight, self.d.sum()[None], population_size, norms)
        return float(c[0]) / self.scale**2


def natural_gradient(stats: Statistics, name: str, chol: torch.Tensor, cfg: LoraDAConfig) -> NaturalGradient:
    """Delta = -diag(d) G Zd^-1 by Cholesky solves with the lower factor ``chol`` [n, n] of the
    module's Zd, divided by ``delta_scale`` of its top singular value; on ``chol``'s device."""
    d = output_scaling(stats, name, cfg, chol.device)
    gradient = stats.gradient(name, chol.device).double()
    delta = -d[:, None] * torch.cholesky_solve(gradient.T, chol).T
    if not bool(delta.any()):
        raise ValueError(f"module {name!r}: the gradient is zero, LoRA-DA has no direction to follow")
    sigma = torch.linalg.matrix_norm(delta, ord=2) if cfg.normalize_delta else torch.ones((), dtype=delta.dtype)
    scale = float(delta_scale(sigma, cfg))
    return NaturalGradient(delta / scale, scale, d)


def check_counted_tokens(stats: Statistics) -> None:
    """ValueError naming the modules whose input saw no counted token (empty statistics)."""
    silent = [key for key, entry in stats.inputs.items() if entry.num_tokens == 0]
    if silent:
        names = [m for key in silent for m in stats.inputs[key].modules]
        raise ValueError(f"no counted token reached modules {names}: their statistics are empty")


def check_finite(stats: Statistics, names: Sequence[str]) -> None:
    """FloatingPointError naming those of ``names`` whose G, y or input Z hold NaN or Inf."""
    bad = stats.non_finite(names)
    if bad:
        raise FloatingPointError(f"non-finite statistics (NaN or Inf in G, y or Z) of modules {bad}")


class InputFactors:
    """Per distinct input of ``stats``, in fp64 on ``device``: the lower Cholesky factor L of
    Zd = Z + damping I [n, n], Zd^-1 and Zd, each made once, one-threaded (the same bits however
    it is reached), and kept until ``release``. The damping of each input is chosen once: the
    config's (times tr(Z) / n where it is ``relative``), or the rounding floor of Z's sums where
    that is larger (``rounding_floor``). On CPUs
    ``stacked_inverses`` makes the factors of several inputs side by side on host threads."""

    def __init__(self, stats: Statistics, damping: float, device: torch.device, seed: int = 0,
                 relative: bool = False):
        self.stats, self.damping, self.device, self.seed = stats, damping, device, seed
        self.relative = relative
        self.factors: Dict[str, torch.Tensor] = {}  # key -> L
        self.inverses: Dict[str, torch.Tensor] = {}  # key -> Zd^-1
        self.bases: Dict[str, Optional[Tuple[torch.Tensor, torch.Tensor]]] = {}  # key -> token_basis
        self.probes: Dict[Tuple[int, int], torch.Tensor] = {}  # (n, columns) -> the range finder's Gaussian
        self.floors: Dict[str, float] = {}  # key -> the rounding floor of Z's sums (inputs with a token basis)
        self.dampings: Dict[str, float] = {}  # key -> its damping (kept after ``release``: the report reads it)

    def _choose_damping(self, key: str, z: torch.Tensor) -> Tuple[float, float]:
        """(damping, rounding floor) of input ``key`` whose Z [n, n] is ``z``: the damping is the
        config's (relative: times tr(Z) / n), or the floor where that is larger."""
        entry = self.stats.inputs[key]
        floor = rounding_floor(z, entry.num_tokens, entry.z_sum.dtype)
        damping = scaled_damping(self.damping, float(z.diagonal().sum()) / z.shape[0]) if self.relative else self.damping
        self.dampings[key] = max(damping, floor)
        return self.dampings[key], floor

    def _factor(self, key: str) -> torch.Tensor:
        """Factor input ``key`` into ``self.factors[key]`` (made here unless it is there
        already, e.g. allocated by ``stacked_inverses``), in place: the sums are copied in, scaled and
        damped there; returns L. Z's sums are symmetric: Cholesky reads their lower triangle."""
        entry = self.stats.inputs[key]
        zd = self.factors.get(key)
        zd = entry.z_sum.to(self.device, torch.float64, copy=True) if zd is None else zd.copy_(entry.z_sum)
        zd /= entry.num_tokens
        zd.diagonal().add_(self._choose_damping(key, zd)[0])
        self.factors[key] = damped_cholesky(zd, self.dampings[key], "/".join(entry.modules))
        return self.factors[key]

    def token_basis(self, key: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """For an input with fewer counted tokens than features (T + TOKEN_BASIS_OVERSAMPLING < n),
        whose Z has rank at most T: (W [n, s], z [s]), orthonormal eigenvectors of Z and their
        eigenvalues, for the s eigenvalues above the rounding floor of Z's sums (the rest of R^n is
        Z's numerical null space); None for other inputs. Found by a randomized range finder with
        T + TOKEN_BASIS_OVERSAMPLING columns, exact for a rank-T matrix, and Rayleigh-Ritz, then
        checked on a Gaussian sketch: W diag(z) W^T must equal Z to its rounding floor."""
        if key not in self.bases:
            entry = self.stats.inputs[key]
            n, tokens = entry.z_sum.shape[0], entry.num_tokens
            self.bases[key] = None
            if tokens + TOKEN_BASIS_OVERSAMPLING < n:
                z = self.stats.input_factor(key, self.device).double()
                _, floor = self._choose_damping(key, z)
                q = torch.linalg.qr(z @ self.probe(n, tokens + TOKEN_BASIS_OVERSAMPLING)).Q
                values, vectors = eigh(q.T @ (z @ q))
                kept = values > floor
                w, values = q @ vectors[:, kept], values[kept]
                # statistics whose Z has a larger rank than their token count (edited, or made up) keep the full solve
                probe = self.probe(n, TOKEN_BASIS_OVERSAMPLING)
                missed = torch.linalg.matrix_norm(z @ probe - w @ (values[:, None] * (w.T @ probe)))
                if float(missed) <= math.sqrt(TOKEN_BASIS_OVERSAMPLING * n) * floor:
                    self.bases[key], self.floors[key] = (w, values), floor
        return self.bases[key]

    def probe(self, n: int, columns: int) -> torch.Tensor:
        """A Gaussian [n, columns] (fp64, on the device) from the seed, made once per size."""
        if (n, columns) not in self.probes:
            self.probes[(n, columns)] = torch.randn(n, columns, dtype=torch.float64,
                                                    generator=torch.Generator().manual_seed(self.seed)).to(self.device)
        return self.probes[(n, columns)]

    def cholesky(self, key: str) -> torch.Tensor:
        """L [n, n] of input ``key``."""
        if key not in self.factors:
            on_one_thread(self._factor, key)
        return self.factors[key]

    def inverse(self, key: str) -> torch.Tensor:
        """Zd^-1 [n, n] of input ``key``."""
        if key not in self.inverses:
            self.inverses[key] = on_one_thread(torch.cholesky_inverse, self.cholesky(key))
        return self.inverses[key]

    def damped(self, key: str) -> torch.Tensor:
        """Zd [n, n] of input ``key``, at its damping."""
        self.cholesky(key)
        z = self.stats.input_factor(key, self.device).double()
        return z + self.dampings[key] * torch.eye(z.shape[0], dtype=z.dtype, device=z.device)

    def stacked_inverses(self, keys: Sequence[str]) -> torch.Tensor:
        """Zd^-1 of the inputs ``keys`` (one n) stacked [u, n, n]. Those not made yet are written
        into the stack itself, on CPUs side by side on host threads (their factors in tensors made
        here: see ``eigensolver._host_eigh``), and ``inverse`` hands out views of it until
        ``release``."""
        n = self.stats.inputs[keys[0]].z_sum.shape[0]
        out = torch.empty(len(keys), n, n, dtype=torch.float64, device=self.device)
        missing = []
        for j, key in enumerate(keys):
            if key in self.inverses:
                out[j] = self.inverses[key]
            else:
                missing.append(j)
                self.factors[keys[j]] = torch.empty(n, n, dtype=torch.float64, device=self.device)

        def factor_and_invert(j: int) -> None:
            torch.cholesky_inverse(self._factor(keys[j]), out=out[j])
            self.inverses[keys[j]] = out[j]

        if self.device.type == "cpu":
            on_host_threads(factor_and_invert, missing)
        else:
            for j in missing:
                factor_and_invert(j)
        return out

    def release(self, key: str) -> None:
        """Forget the factors of an input no module still to be solved reads."""
        for cache in (self.factors, self.inverses, self.bases):
            cache.pop(key, None)

    def release_probes(self, n: int) -> None:
        """Forget the Gaussians of inputs with n features, once none is left to solve."""
        for size in [size for size in self.probes if size[0] == n]:
            del self.probes[size]


def resolve_solver(solver: str, in_features: int) -> str:
    """``auto`` takes the randomized solver for modules with n >= AUTO_RANDOMIZED_MIN_N."""
    if solver != "auto":
        return solver
    return "randomized" if in_features >= AUTO_RANDOMIZED_MIN_N else "exact"


def solve(
    stats: Statistics,
    cfg: Optional[LoraDAConfig] = None,
    *,
    ranks: Optional[Mapping[str, int]] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    **overrides,
) -> Factors:
    """LoRA-DA factors for every module in ``stats`` (ALGORITHM.md steps 2-4).

    ``ranks`` maps module names to their own rank (default ``cfg.rank``). Factors are fp64 when
    the statistics are, else fp32, on ``device`` (default: the statistics' own; statistics on the
    host, e.g. from several passes, move there one module at a time). The result is a dict with
    the solver's report as ``.report`` (see ``Factors``); modules the randomized solver leaves
    unconverged at ``solver_max_iterations`` are named in a RuntimeWarning. Inside a
    torch.distributed process group every rank must call this: each solves a share of the
    modules and all get every factor and the whole report; if one rank fails, every rank raises.
    """
    cfg = resolve_config(cfg, overrides)
    ranks = {name: (ranks or {}).get(name, cfg.rank) for name in stats.fingerprint()}
    sweep, report = _solve(stats, cfg, [ranks], [cfg.variance_weight], device, progress)
    return Factors(sweep[(cfg.variance_weight, 0)], report)


def solve_sweep(
    stats: Statistics,
    cfg: Optional[LoraDAConfig] = None,
    *,
    variance_weights: Optional[Sequence[float]] = None,
    ranks: Optional[Sequence[int]] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    **overrides,
) -> Dict[Tuple[float, int], Factors]:
    """One factor set per (variance_weight, rank) combination from one set of statistics.

    Default: the config's value for whichever of the two is not swept. The Cholesky factors,
    natural gradients and sigma are computed once; each variance weight takes one subspace
    solve at the largest rank, whose leading columns serve the smaller ranks. Equals separate
    ``solve`` calls (to the solver's tolerance on the randomized path); every set carries the
    sweep's report.
    """
    cfg = resolve_config(cfg, overrides)
    betas = list(dict.fromkeys(variance_weights if variance_weights is not None else [cfg.variance_weight]))
    rank_list = list(dict.fromkeys(ranks if ranks is not None else [cfg.rank]))
    for beta in betas:
        cfg.replace(variance_weight=beta)  # validates
    if not rank_list or any(not (isinstance(r, int) and r >= 1) for r in rank_list):
        raise ValueError(f"ranks must be positive integers, got {rank_list!r}")
    rank_sets = [{name: r for name in stats.fingerprint()} for r in rank_list]
    sweep, report = _solve(stats, cfg, rank_sets, betas, device, progress)
    return {(beta, rank): Factors(sweep[(beta, i)], report) for beta in betas for i, rank in enumerate(rank_list)}


@dataclass
class Subspace:
    """One module's solution at the largest rank R asked for."""

    v: torch.Tensor  # V [n, R]
    lora_b: torch.Tensor  # Delta_hat V [m, R]
    values: torch.Tensor  # [R]: v_i^T Omega v_i (the objective's terms)
    delta_norm2: float  # ||Delta_hat||_F^2 (estimated on the randomized path: ``_BatchedSolver.solve``)


Subspaces = Dict[Tuple[float, str], Subspace]  # (beta, module) -> its solution


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


def token_space_subspaces(stats: Statistics, names: Sequence[str], factors: InputFactors, cfg: LoraDAConfig,
                          betas: Sequence[float], rank: int, population: int, eigh_on_host: bool = True,
                          budget: int = SOLVE_BATCH_BYTES) -> Dict[str, Dict[float, Subspace]]:
    """The exact subspaces of those of ``names`` (one shape) whose input has fewer counted tokens
    than features: module -> beta -> Subspace.

    With (W [n, s], z [s]) = ``factors.token_basis`` and S = span(W), Zd is diag(z + damping) on S
    and damping I on its complement, where Z vanishes. When G has no rows outside S (every token
    with an output gradient is counted), Delta = Delta_S W^T with Delta_S = -diag(d) (G W)
    diag(z + damping)^-1 [m, s], and Omega' = s^2 Omega is -alpha Delta_S^T Delta_S + c' Zd^-1
    on S and c' / damping on the complement: its smallest eigenvectors come from an s x s
    eigenproblem, solved densely (the modules of one s together). A module is left to the full
    solve when G reaches outside S beyond the rounding of its sums, when s < r, or when the
    complement's eigenvalue is not above the r-th smallest on S. Only the inputs
    ``token_space_inputs`` picks are tried; the modules of one s are solved in stacks of at most
    ``budget`` bytes ([b, s, s] fp64, three of them)."""
    problems = []
    chosen = token_space_inputs(stats, names, resolve_solver(cfg.solver, stats.modules[names[0]].g_sum.shape[1]),
                                rank + cfg.solver_oversampling)
    for name in names:
        key = stats.modules[name].input_key
        basis = factors.token_basis(key) if key in chosen else None
        if basis is None or basis[0].shape[1] < rank:
            continue
        w, z = basis
        gradient = stats.gradient(name, w.device).double()
        projected = gradient @ w  # [m, s]
        if sketched_outside(gradient, projected, w, factors.probe(w.shape[0], TOKEN_BASIS_OVERSAMPLING)) > \
                rounding_outside(stats, name, projected, z, factors.floors[key]):
            continue
        d = output_scaling(stats, name, cfg, w.device)
        delta = -d[:, None] * projected / (z + factors.dampings[key])
        if not bool(delta.any()):
            raise ValueError(f"module {name!r}: the gradient is zero, LoRA-DA has no direction to follow")
        problems.append(_TokenSpaceProblem(name, w, delta, 1.0 / (z + factors.dampings[key]), factors.dampings[key],
                                           float(d.sum())))
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


@dataclass
class _TokenSpaceProblem:
    """One module's problem in the span S of its input's tokens (``token_space_subspaces``)."""

    name: str
    basis: torch.Tensor  # W [n, s]
    delta: torch.Tensor  # Delta W [m, s]
    zd_inv: torch.Tensor  # Zd^-1 on S, the diagonal [s]
    damping: float  # Zd^-1 is 1 / damping on the complement of S
    d_sum: float  # sum(d)


def _solve(stats: Statistics, cfg: LoraDAConfig, rank_sets: List[Dict[str, int]], betas: List[float],
           device: Union[str, torch.device, None], progress: bool):
    """Factors of every module for every (beta, rank set index) on ``device``, and the report."""
    with dispatch.pinned("torch" if cfg.deterministic else None):
        return _solve_pinned(stats, cfg, rank_sets, betas, device, progress)


def _solve_pinned(stats: Statistics, cfg: LoraDAConfig, rank_sets: List[Dict[str, int]], betas: List[float],
                  device: Union[str, torch.device, None], progress: bool):
    """``_solve`` with its ops' backends chosen."""
    shapes = {name: tuple(shape) for name, shape in stats.fingerprint().items()}  # every module's, also other ranks'
    names = list(shapes)
    device = stats.device if device is None else torch.device(device)
    for rank_set in rank_sets:
        check_ranks(shapes, rank_set)
    out_dtype = torch.float64 if stats.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(cfg.gamma)
    groups: Dict[Tuple[int, int, int], list] = {}
    for name in names:
        groups.setdefault((*shapes[name], max(rs[name] for rs in rank_sets)), []).append(name)
    place = distributed.world()
    if place is None and stats.layout is not None:
        raise ValueError("statistics sharded by owner are solved by the ranks that hold them, inside their process group")
    diagnosed = (betas[0], rank_sets[0]) if len(betas) == len(rank_sets) == 1 else None
    if place is None:
        check_counted_tokens(stats)
        subspaces, report = _solve_groups(stats, cfg, groups, betas, device, progress, diagnosed)
    else:  # each rank solves its share of every shape (its own modules when sharded); the factors are broadcast after
        owners = ({name: stats.layout[name][0] for name in names} if stats.layout is not None
                  else distributed.module_owners(list(groups.values()), place[1]))
        mine = {key: [n for n in group if owners[n] == place[0]] for key, group in groups.items()}
        subspaces, report, error = {}, {}, None
        try:
            check_counted_tokens(stats)  # of this rank's own inputs when sharded
            subspaces, report = _solve_groups(stats, cfg, {k: g for k, g in mine.items() if g}, betas, device, progress,
                                              diagnosed)
        except BaseException as exc:  # every rank must reach the agreement, or the others wait forever
            error = exc
        distributed.agree_on_failure(error, device, "the solve")
        report = distributed.merge_reports(report, device)
    sweep = {}
    for beta in betas:
        for i, rank_set in enumerate(rank_sets):
            sweep[(beta, i)] = {}
            for name in names:
                if (beta, name) not in subspaces:
                    continue  # another rank's module
                lora_b, lora_a = factor_pair(subspaces[(beta, name)], rank_set[name], cfg)
                sweep[(beta, i)][name] = LoraFactors((lora_a * scale).to(out_dtype).contiguous(),
                                                     (lora_b * scale).to(out_dtype).contiguous())
            if place is not None:
                sizes = {name: (*shapes[name], rank_set[name]) for name in names}
                sweep[(beta, i)] = distributed.broadcast_factors(sweep[(beta, i)], owners, sizes, out_dtype, device,
                                                                 LoraFactors)
    return sweep, report


def _solve_groups(stats: Statistics, cfg: LoraDAConfig, groups: Dict[Tuple[int, int, int], List[str]],
                  betas: List[float], device: torch.device, progress: bool,
                  diagnosed: Optional[Tuple[float, Dict[str, int]]] = None) -> Tuple[Subspaces, Dict[str, dict]]:
    """Subspaces of the modules in ``groups`` ((m, n, largest rank) -> names) for every beta, and
    the report; warns of the modules left unconverged. ``diagnosed`` = (beta, module -> rank): the
    factors whose ``diagnose`` figures go into the report as ``diagnostics`` (module -> figures;
    a single solve only: a sweep's sets share one report)."""
    population = cfg.population_size or stats.population_size
    budget = solve_batch_bytes(device)
    chunks = [(shape, chunk) for shape, group in groups.items()
              for chunk in _chunks(stats, group, shape, budget,
                                   solve_batch_modules(device, shape[1], shape[2] + cfg.solver_oversampling))]
    readers = Counter(stats.modules[n].input_key for _, chunk in chunks for n in chunk)
    widths_left = Counter(shape[1] for shape, _ in chunks)  # chunks still to solve, per in_features
    factors = InputFactors(stats, cfg.damping, device, cfg.seed, relative=cfg.damping_mode == "relative")
    batched = _BatchedSolver(stats, cfg, population, factors, device)
    eigh_on_host = cfg.solver_small_eigh == "host"
    subspaces: Subspaces = {}
    report: Dict[str, dict] = {}
    for (m, n, rank), chunk in tqdm(chunks, desc="lora_da solve", unit="batch",
                                    disable=not progress or not distributed.is_main_process()):
        check_finite(stats, chunk)
        readers.subtract(stats.modules[name].input_key for name in chunk)
        # factors of inputs that no later chunk reads are dropped as soon as they are used: they add up to GBs
        last_readers = {stats.modules[name].input_key for name in chunk} - {k for k, c in readers.items() if c > 0}
        solver = resolve_solver(cfg.solver, n)
        info = report.setdefault(f"{m}x{n}, r={rank}", {"solver": solver, "modules": 0, "converged": True})
        info["modules"] += len(chunk)
        in_token_space = token_space_subspaces(stats, chunk, factors, cfg, betas, rank, population, eigh_on_host,
                                               budget)
        for name, found in in_token_space.items():
            subspaces.update({(beta, name): subspace for beta, subspace in found.items()})
        info.setdefault("token_space", {}).update(
            {name: factors.bases[stats.modules[name].input_key][0].shape[1] for name in in_token_space})
        rest = [name for name in chunk if name not in in_token_space]
        if rest and solver == "exact":
            for name in rest:
                key = stats.modules[name].input_key
                ng = natural_gradient(stats, name, factors.cholesky(key), cfg)
                for beta in betas:
                    c = ng.variance_coefficient(cfg.replace(variance_weight=beta), population,
                                                lambda key=key: factors.inverse(key))
                    zd_inv = factors.inverse(key) if c != 0.0 else None
                    v = fix_signs(exact_subspace(ng.delta_hat, zd_inv, c, cfg.bias_weight, rank, eigh_on_host))
                    lora_b = ng.delta_hat @ v
                    values = -cfg.bias_weight * lora_b.square().sum(dim=0)
                    if zd_inv is not None:
                        values += c * (v * (zd_inv @ v)).sum(dim=0)
                    subspaces[(beta, name)] = Subspace(v, lora_b, values, float(ng.delta_hat.square().sum()))
        elif rest:
            results, sigma_info = batched.solve(rest, rank, betas, last_readers)
            for beta, (found, convergence) in zip(betas, results):
                subspaces.update({(beta, name): subspace for name, subspace in zip(rest, found)})
                _record(info, rest, convergence, "iterations", "residual", "unconverged")
            _record(info, rest, sigma_info, "sigma_iterations", "sigma_change", "sigma_unconverged")
        info.setdefault("dampings", {}).update({name: factors.dampings[stats.modules[name].input_key] for name in chunk})
        if diagnosed is not None:
            beta, ranks = diagnosed
            info.setdefault("diagnostics", {}).update(
                {name: diagnose(subspaces[(beta, name)], ranks[name],
                                stats.input_factor(stats.modules[name].input_key, device).double(), cfg)
                 for name in chunk})
        for key in last_readers:
            factors.release(key)
        widths_left[n] -= 1
        if not widths_left[n]:
            factors.release_probes(n)
    warn_unconverged(report, cfg)
    return subspaces, report


def _record(info: dict, names: Sequence[str], convergence: SolveInfo, iterations: str, residual: str,
            unconverged: str) -> None:
    """Fold one batch's convergence into a shape's report entry under the given keys."""
    info[iterations] = max(int(convergence.iterations.max()), info.get(iterations, 0))
    info[residual] = max(float(convergence.residuals.max()), info.get(residual, 0.0))
    stalled = info.setdefault(unconverged, {})
    stalled.update({names[i]: float(convergence.residuals[i]) for i in (~convergence.converged).nonzero().flatten()})
    info["converged"] = info["converged"] and not stalled


def warn_unconverged(report: Dict[str, dict], cfg: LoraDAConfig) -> None:
    """A RuntimeWarning naming every module whose eigenvectors or sigma stopped at
    ``solver_max_iterations`` before the tolerance, with its residual."""
    parts = []
    for key, what, tolerance in (("unconverged", "subspace residual", cfg.solver_tolerance),
                                 ("sigma_unconverged", "sigma^2 change", SIGMA_TOLERANCE)):
        stalled = {name: value for info in report.values() for name, value in info.get(key, {}).items()}
        if stalled:
            listed = ", ".join(f"{name} ({value:.1e})" for name, value in stalled.items())
            parts.append(f"{len(stalled)} module(s) above the {what} tolerance {tolerance:g}: {listed}")
    if parts:
        warnings.warn(f"lora_da: the randomized solver stopped at solver_max_iterations={cfg.solver_max_iterations} "
                      f"with {'; and '.join(parts)}. Raise solver_max_iterations (or solver_tolerance)",
                      RuntimeWarning, stacklevel=5)


def _chunks(stats, names: List[str], shape: Tuple[int, int, int], budget: int,
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


class _BatchedSolver:
    """The randomized path: stacks modules of one shape on ``device`` and solves them together."""

    def __init__(self, stats: Statistics, cfg: LoraDAConfig, population: int, factors: InputFactors,
                 device: torch.device):
        self.stats, self.cfg, self.population, self.factors, self.device = stats, cfg, population, factors, device
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def operator(self, names, release: Iterable[str] = ()) -> BlockOperator:
        """Omega' of the modules ``names`` (one shape) with c' = 0; the factors of the inputs in
        ``release`` are forgotten once stacked. Stacks are filled one module at a time."""
        stats, cfg, factors, device = self.stats, self.cfg, self.factors, self.device
        keys = [stats.modules[name].input_key for name in names]
        distinct = list(dict.fromkeys(keys))
        d = torch.stack([output_scaling(stats, name, cfg, device) for name in names])
        gradient = _stacked([lambda name=name: stats.modules[name].g_sum.to(device) for name in names], torch.float64)
        op = BlockOperator(
            gradient=gradient.div_(stats.num_sequences),
            d=d,
            zd_inv=factors.stacked_inverses(distinct),
            owner=torch.tensor([distinct.index(key) for key in keys]),  # on the host
            variance=torch.zeros(len(names), dtype=d.dtype, device=d.device),
            bias_weight=cfg.bias_weight,
            make_zd=lambda: _stacked([lambda key=key: factors.damped(key) for key in distinct]),
        )
        for key in release:
            factors.release(key)
        zero = (torch.linalg.vector_norm(op.gradient, dim=(1, 2)) == 0).tolist()
        if any(zero):
            silent = [name for name, z in zip(names, zero) if z]
            raise ValueError(f"modules {silent}: the gradient is zero, LoRA-DA has no direction to follow")
        return op

    def solve(self, names, rank: int, variance_weights: Sequence[float], release: Iterable[str] = ()):
        """([per variance weight: ([Subspace per module], SolveInfo)], sigma's SolveInfo) for the
        modules ``names`` (one shape); the operator, sigma and ||Delta||_F are shared by the
        variance weights."""
        op, cfg = self.operator(names, release), self.cfg
        working = op.to(torch.float32) if cfg.solver_mixed_precision else None
        eigh_on_host = cfg.solver_small_eigh == "host"
        sigma = sigma_info = norms_of_delta = None
        norms = functools.lru_cache(maxsize=None)(lambda: (op.gram_norms(), op.inverse_norms()))
        results = []
        for beta in variance_weights:
            op.variance = variance_coefficients(cfg, beta, op.d.sum(dim=1), self.population, norms)
            if working is not None:
                working.variance = op.variance.to(working.variance.dtype)
            v, convergence = smallest_eigenvectors(
                op, rank, oversampling=cfg.solver_oversampling, tolerance=cfg.solver_tolerance,
                max_iterations=cfg.solver_max_iterations, generator=self.generator, working=working,
                eigh_on_host=eigh_on_host,
            )
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
            results.append(([Subspace(v[i], delta_v[i] / scale[i], values[i], float(norms_of_delta[i]))
                              for i in range(len(names))], convergence))
        return results, sigma_info

    def delta_norm2(self, op: BlockOperator, v: torch.Tensor, delta_v: torch.Tensor) -> torch.Tensor:
        """||Delta_b||_F^2 [b], without forming Delta: ||Delta V||^2 (exact, V [b, n, R] orthonormal,
        Delta V given) plus the unbiased estimate ||Delta (I - V V^T) W||^2 / k of the rest, from
        k = DELTA_NORM_PROBES Gaussian columns W (seeded): E ||A w||^2 = ||A||_F^2."""
        probes = torch.randn(v.shape[0], v.shape[1], DELTA_NORM_PROBES, dtype=v.dtype, generator=self.generator)
        probes = probes.to(v.device)
        rest = probes - v @ (v.mT @ probes)
        return delta_v.square().sum(dim=(1, 2)) + op.delta(rest).square().sum(dim=(1, 2)) / DELTA_NORM_PROBES


def _stacked(makers, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """torch.stack of the tensors the callables make, one at a time (no list of temporaries),
    cast to ``dtype`` (default: theirs) as they are copied in."""
    first = makers[0]()
    out = first.new_empty((len(makers), *first.shape), dtype=dtype or first.dtype)
    out[0] = first
    for i, make in enumerate(makers[1:], start=1):
        out[i] = make()
    return out
