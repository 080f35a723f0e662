"""ALGORITHM.md step 2 per module: the output scaling d, the natural gradient Delta = -diag(d) G Zd^-1
and its normalisation, and the variance coefficient c of the guidance matrix Omega."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from .config import LoraDAConfig
from .block_operator import gram_norm
from .input_factors import scaled_damping
from .statistics import Statistics


def check_gradients(names: Sequence[str], deltas: Sequence[torch.Tensor]) -> None:
    """ValueError naming those of ``names`` whose Delta (or gradient: zero together) in ``deltas``
    is zero, where LoRA-DA has no direction to follow."""
    silent = [name for name, delta in zip(names, deltas) if not bool(delta.any())]
    if silent:
        raise ValueError(f"modules {silent}: the gradient is zero, LoRA-DA has no direction to follow")


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
    check_gradients([name], [delta])
    sigma = torch.linalg.matrix_norm(delta, ord=2) if cfg.normalize_delta else torch.ones((), dtype=delta.dtype)
    scale = float(delta_scale(sigma, cfg))
    return NaturalGradient(delta / scale, scale, d)
