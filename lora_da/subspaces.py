"""A module's solution: the subspace V of the guidance matrix Omega, the LoRA factors it gives
(ALGORITHM.md step 4) and what it is (``diagnose``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Protocol, Sequence, Tuple

import torch

from .config import LoraDAConfig
from .report import Diagnostics, ModuleReport, SolveReport


@dataclass
class LoraFactors:
    """LoRA-DA factors of one module: the adapted weight starts at W0 + s * lora_B @ lora_A."""

    lora_A: torch.Tensor  # [r, n]
    lora_B: torch.Tensor  # [m, r]


class Factors(dict):
    """{module name: LoraFactors}, as ``solve`` returns them, with ``report``: how each module was
    solved (``report.SolveReport``)."""

    def __init__(self, factors: Mapping[str, LoraFactors], report: SolveReport):
        super().__init__(factors)
        self.report = report


@dataclass
class Subspace:
    """One module's solution at the largest rank R asked for."""

    v: torch.Tensor  # V [n, R]
    lora_b: torch.Tensor  # Delta_hat V [m, R]
    values: torch.Tensor  # [R]: v_i^T Omega v_i (the objective's terms)
    delta_norm2: float  # ||Delta_hat||_F^2 (estimated on the randomized path: ``BatchedSolver.solve``)


Subspaces = Dict[Tuple[float, str], Subspace]  # (beta, module) -> its solution


class ChunkSolver(Protocol):
    """A solver of a chunk of modules of one shape: in the span of their inputs' tokens
    (``token_space.TokenSpaceSolver``), exact or randomized (``batched_solver``)."""

    def solve(self, names: List[str], rank: int, betas: Sequence[float]) -> Tuple[Subspaces, Dict[str, ModuleReport]]:
        """The subspaces at rank ``rank``, for every beta, of those of ``names`` it solves (all of
        them, but for the token space's), and a report per solved module. It tells the input
        factors it is ``done`` with each module it solved."""


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


def diagnose(subspace: Subspace, rank: int, z: torch.Tensor, cfg: LoraDAConfig) -> Diagnostics:
    """What the chosen subspace is, for a module with input factor Z [n, n]:
    ``input_energy`` e(A) = tr(A Z A^T) / tr(A A^T) / (tr Z / n), the input energy along lora_A
    relative to a random direction; ``captured_share`` = ||Delta_hat V||_F^2 / ||Delta_hat||_F^2;
    ``objective`` = tr(V^T Omega V), the value the subspace minimises."""
    lora_a = factor_pair(subspace, rank, cfg)[1].to(z.dtype)
    energy = float((lora_a @ z * lora_a).sum() / lora_a.square().sum() / (z.diagonal().sum() / z.shape[0]))
    share = float(subspace.lora_b[:, :rank].square().sum()) / subspace.delta_norm2
    return Diagnostics(energy, share, float(subspace.values[:rank].sum()))
