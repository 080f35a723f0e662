"""Omega' of a stack of modules of one shape, applied to blocks of vectors without forming it
(the batched solver's operator; see ``eigensolver`` for the algorithm)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


def skinny_product(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a @ x for [..., p, q] @ [..., q, k] with few columns k, computed as (x^T a^T)^T: CPU BLAS
    runs this orientation up to twice as fast in fp64 and at k = 8 (RESULTS.md, "Solve phases")."""
    return (x.mT @ a.mT).mT


def gram_norm(delta: torch.Tensor) -> torch.Tensor:
    """||Delta^T Delta||_F [...] of Delta [..., m, n], from the smaller of the two Grams
    (||Delta^T Delta||_F = ||Delta Delta^T||_F): 2 m n min(m, n) flops."""
    gram = delta @ delta.mT if delta.shape[-2] <= delta.shape[-1] else delta.mT @ delta
    return torch.linalg.matrix_norm(gram)


@dataclass
class BlockOperator:
    """Omega' of b stacked modules that read u distinct inputs.

    G: [b, m, n], d: [b, m], variance: [b]; zd_inv: [u, n, n], the inverse of each distinct
    input's damped factor Zd (dense, symmetric); owner: [b] (host), the input of each module;
    make_zd() gives the Zd [u, n, n] themselves, made on first use (only the preconditioner reads
    them). Products with Zd or Zd^-1 are one matmul per input, on the columns of all its modules at
    once (q/k/v share one).
    """

    gradient: torch.Tensor
    d: torch.Tensor
    zd_inv: torch.Tensor
    owner: torch.Tensor
    variance: torch.Tensor  # c' = beta * sum(d) / N
    bias_weight: float
    make_zd: Callable[[], torch.Tensor]

    def __post_init__(self):
        device = self.gradient.device
        self.private = bool((self.owner == torch.arange(len(self.owner))).all()) and len(self.zd_inv) == len(self.owner)
        self.members = [(int(j), (self.owner == j).nonzero().flatten().to(device)) for j in self.owner.unique()]
        self._zd: Optional[torch.Tensor] = None

    @property
    def zd(self) -> torch.Tensor:
        """Zd [u, n, n], made on first use."""
        if self._zd is None:
            self._zd = self.make_zd()
        return self._zd

    def _per_input(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """factors[owner_b] @ X_b [b, n, k] for X [b, n, k] (factors symmetric): one matmul per input."""
        if self.private:
            return skinny_product(factors, x)
        out = torch.empty_like(x)
        _, n, k = x.shape
        for j, idx in self.members:  # the modules' columns side by side as rows [c k, n] (free when
            rows = x[idx].mT.reshape(-1, n)  # x is itself a transposed product), times the symmetric factor
            out[idx] = (rows @ factors[j]).reshape(len(idx), k, n).mT
        return out

    def zd_solve(self, x: torch.Tensor) -> torch.Tensor:
        """Zd^-1 X [b, n, k]."""
        return self._per_input(x, self.zd_inv)

    def zd_product(self, x: torch.Tensor) -> torch.Tensor:
        """Zd X [b, n, k]."""
        return self._per_input(x, self.zd)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Delta X [b, m, k] for X [b, n, k]."""
        return -self.d[..., None] * skinny_product(self.gradient, self.zd_solve(x))

    def delta_t(self, y: torch.Tensor) -> torch.Tensor:
        """Delta^T Y [b, n, k] for Y [b, m, k]."""
        return -self.zd_solve(skinny_product(self.gradient.transpose(1, 2), self.d[..., None] * y))

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """Delta^T Delta X [b, n, k]."""
        return self.delta_t(self.delta(x))

    def gram_norms(self) -> torch.Tensor:
        """||Delta_b^T Delta_b||_F [b], from Delta formed one input at a time (2 m n^2 flops per
        module) and the smaller of its two Grams (2 m n min(m, n))."""
        norms = self.d.new_empty(len(self.owner))
        for j, idx in self.members:
            norms[idx] = gram_norm(-self.d[idx, :, None] * (self.gradient[idx] @ self.zd_inv[j]))
        return norms

    def inverse_norms(self) -> torch.Tensor:
        """||Zd_b^-1||_F [b]."""
        return torch.linalg.matrix_norm(self.zd_inv)[self.owner.to(self.zd_inv.device)]

    def omega(self, x: torch.Tensor) -> torch.Tensor:
        """Omega' X [b, n, k] = Zd^-1 (alpha G^T (d * Delta X) + c' X)."""
        inner = self.bias_weight * skinny_product(self.gradient.transpose(1, 2), self.d[..., None] * self.delta(x))
        return self.zd_solve(inner + self.variance[:, None, None] * x)

    def variance_dominates(self, bias_scale: torch.Tensor) -> bool:
        """Whether c' Zd^-1 can reach a tenth of ``bias_scale`` [b] (an estimate of alpha sigma^2)
        in some module."""
        largest = torch.diagonal(self.zd_inv, dim1=1, dim2=2).amax(dim=1)[self.owner.to(self.zd_inv.device)]
        return bool((self.variance * largest >= 0.1 * bias_scale).any())

    def to(self, dtype: torch.dtype) -> "BlockOperator":
        """The same operator with its tensors in ``dtype`` (the working copy of mixed precision)."""
        return BlockOperator(self.gradient.to(dtype), self.d.to(dtype), self.zd_inv.to(dtype), self.owner,
                             self.variance.to(dtype), self.bias_weight, lambda: self.zd.to(dtype))

    def select(self, index: torch.Tensor) -> "BlockOperator":
        """The operator of the modules ``index`` (ascending; the inputs' factors are shared, and
        a run of consecutive modules shares the gradients too: views, no copies)."""
        index = index.cpu()
        first, count = int(index[0]), len(index)
        consecutive = bool((index == torch.arange(first, first + count)).all())
        take = slice(first, first + count) if consecutive else index.to(self.gradient.device)
        if self.private and consecutive:  # each module its own input: views of the factors
            return BlockOperator(self.gradient[take], self.d[take], self.zd_inv[take], torch.arange(count),
                                 self.variance[take], self.bias_weight, lambda: self.zd[take])
        return BlockOperator(self.gradient[take], self.d[take], self.zd_inv, self.owner[index],
                             self.variance[take], self.bias_weight, lambda: self.zd)
