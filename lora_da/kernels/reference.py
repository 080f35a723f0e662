"""PyTorch references of the ops (fp32 or wider inside); the oracle for every kernel."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def fisher_update(
    x: torch.Tensor,
    mask: torch.Tensor,
    grads: Sequence[torch.Tensor],
    input_factor: Optional[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    output_factors: Sequence[torch.Tensor],
    counted: Optional[int] = None,
) -> None:
    """Accumulate one input's statistics and those of the modules that read it, in place.

    x: [B, L, n] layer input; mask: [B, L] (1 = counted token); grads[k]: [B, L, m_k] output
    gradients. Products and sums are computed in each accumulator's own dtype:
      input_factor [n, n]     += x^T diag(mask) x          (the upper triangle, diagonal
                                                             included, is what counts: below
                                                             it, implementations may update
                                                             or not; skipped when None)
      gradients[k] [m_k, n]   += grads[k]^T x               (every token)
      output_factors[k] [m_k] += sum_t mask_t grads[k][t]^2
    ``counted``: the caller's promise that the mask is 1 on the first ``counted`` of the B * L
    tokens (in x.reshape(B * L, n) order) and 0 after them, so that Z can read those rows directly.
    """
    batch, length, n = x.shape
    flat_x = x.reshape(batch * length, n)
    flat_mask = mask.reshape(batch * length)
    if input_factor is not None:
        rows = slice(None) if counted is None else slice(0, counted)
        add_upper_gram(input_factor, flat_x[rows], flat_mask[rows])
    if not grads:
        return
    dtype = gradients[0].dtype
    xs, weights = flat_x.to(dtype), flat_mask.to(dtype)
    for k, g in enumerate(grads):
        gs = g.reshape(batch * length, g.shape[-1]).to(dtype)
        gradients[k].addmm_(gs.T, xs)
        output_factors[k].addmv_(gs.square().T, weights)


GRAM_PANEL = 192  # rows of Z per product in add_upper_gram (timed against the full product in RESULTS.md)


def add_upper_gram(z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> None:
    """The upper triangle of z [n, n] += x^T diag(mask) x, in z's dtype, for x [T, n], mask [T]:
    one product per panel of GRAM_PANEL rows, from its diagonal block (updated whole) rightwards."""
    x = x.to(z.dtype)
    weighted = (x * mask.to(z.dtype)[:, None]).T
    for start in range(0, z.shape[0], GRAM_PANEL):
        rows = slice(start, start + GRAM_PANEL)
        z[rows, start:].addmm_(weighted[rows], x[:, start:])


def write_sequence_sums(grad: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> None:
    """out [B, m] = sum_t mask[b, t] grad[b, t] in out's dtype (grad [B, L, m], mask [B, L]), overwritten."""
    out.copy_((grad.to(out.dtype) * mask.to(out.dtype)[..., None]).sum(dim=1))


def inner_products(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A^T B [batch, p, q] in fp64 for tall-skinny A [batch, n, p], B [batch, n, q]; written into
    ``out`` (fp64) when given. The eigensolver's Gram matrices and projected problems."""
    result = a.double().transpose(1, 2) @ b.double()
    return result if out is None else out.copy_(result)
