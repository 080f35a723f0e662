"""How the kernels sum Z into fp64 (``input_factor_dtype`` "mixed", and "auto" on GPUs), at kernel speed.

Massive activations (a few features of a few tokens, thousands of times the rest) make Z's
spectrum span more than fp32 can hold: summed in fp32, the rounding of their rows and columns
is about eps32 ||Z||, above the damping lambda, and Z + lambda I can turn indefinite; and fp32
sums over thousands of tokens bury the smallest eigenvalues of singular inputs (benchmarks/
input_factor_schemes.py, RESULTS.md "Input factor schemes"). So per call:
  * the massive features D (``massive_features``) have their rows and columns of Z summed as
    fp64 products in fp64 (``add_massive_columns``: a skinny [n, T] x [T, |D|] product);
  * every other entry is the kernel's bf16 (or fp16) tile products, exact in fp32, summed in
    fp32 over ``flush_tokens`` tokens and added into fp64 registers (the Triton kernel; the
    CUDA extension's cuBLAS products sum over the whole call), with D's columns read as zeros.
``split_gram`` is the PyTorch reference of that arithmetic, the oracle of the kernels' fp64 path.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

MASSIVE = 64  # a feature is massive in a call when its largest |x| is over this many times the median feature's
MAX_MASSIVE = 16  # the most features a call sums in fp64 (its largest): bounds the fp64 products at 2 n T MAX_MASSIVE
# tokens whose fp32 tile sums are added into fp64 at a time: n^2 / 2 fp64 additions per flush against
# n^2 * FLUSH bf16 flops; 256 where fp64 units run at 1/64 of fp32 (counted costs and accuracy of
# both: RESULTS.md, "Input factor schemes")
FLUSH_TOKENS = 64
FLUSH_TOKENS_SLOW_FP64 = 256
FULL_RATE_FP64 = (6, 7, 8, 9, 10)  # compute capabilities X.0 (P100 to B200): fp64 at half of fp32 or more


def flush_tokens(device: torch.device) -> int:
    """Tokens per fp64 addition of the Triton kernel's fp32 tile sums on ``device``:
    FLUSH_TOKENS on GPUs with full-rate fp64 (and under the interpreter), FLUSH_TOKENS_SLOW_FP64
    on the others."""
    if device.type != "cuda":
        return FLUSH_TOKENS
    major, minor = torch.cuda.get_device_capability(device)
    return FLUSH_TOKENS if minor == 0 and major in FULL_RATE_FP64 else FLUSH_TOKENS_SLOW_FP64


def massive_features(x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices [k] (int64, k <= MAX_MASSIVE, ascending) of the massive features of x [T, n]: those
    whose largest |x| over the rows of nonzero weight (weights [T], 0/1; all rows without) is
    over MASSIVE times the median feature's, at most the MAX_MASSIVE largest. Synchronises with
    the device once (k)."""
    magnitude = x.abs()
    if weights is not None:
        magnitude = magnitude * weights.to(magnitude.dtype)[:, None]
    if magnitude.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    scale = magnitude.amax(dim=0).float()
    over = scale > MASSIVE * scale.median()
    count = min(int(over.sum()), MAX_MASSIVE)
    return torch.sort(torch.topk(torch.where(over, scale, -1.0), count).indices).values


def add_massive_columns(z: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, massive: torch.Tensor) -> None:
    """z [n, n] (fp64) += the rows and columns ``massive`` of X^T diag(weights) X for x [T, n]
    and 0/1 weights [T]: fp64 products and sums, both triangles, D x D once."""
    if massive.numel() == 0:
        return
    wide = x.double()
    columns = wide.T @ (wide[:, massive] * weights.double()[:, None])  # [n, |D|]
    z[:, massive] += columns
    z[massive, :] += columns.T
    z[massive[:, None], massive] -= columns[massive]


def without_features(x: torch.Tensor, massive: torch.Tensor) -> torch.Tensor:
    """x [T, n] with the columns ``massive`` set to zero (a copy where there are any)."""
    return x.index_fill(1, massive, 0) if massive.numel() else x


def add_split_gram(z: torch.Tensor, xs: torch.Tensor, weights: torch.Tensor, counted: Optional[int],
                   add_rest: Callable[[torch.Tensor], None]) -> None:
    """The kernels' fp64 path: z [n, n] (fp64) += X^T diag(weights) X over xs [T, n]'s counted
    rows (the first ``counted`` where given, see ``reference.fisher_update``), the massive
    features in fp64 here and the rest by ``add_rest(x_rest)``, a kernel that adds into z the
    sums of x_rest [T, n] (xs with the massive columns zeroed) over the same rows."""
    rows = slice(None) if counted is None else slice(0, counted)
    massive = massive_features(xs[rows], weights[rows])
    add_rest(without_features(xs, massive))
    add_massive_columns(z, xs[rows], weights[rows], massive)


def split_gram(z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, flush: Optional[int]) -> None:
    """Reference of the kernels' fp64 path: z [n, n] (fp64) += X^T diag(mask) X for x [T, n]
    (fp32/fp16/bf16), mask [T] 0/1: the massive features' rows and columns in fp64, the rest as
    fp32 products (exact for fp16/bf16 inputs) of each ``flush`` counted tokens (None: all of
    them), each added into z."""
    massive = massive_features(x, mask)
    rest = without_features(x, massive)[mask.bool()].float()
    for group in rest.split(flush or max(1, len(rest))):
        z += (group.T @ group).double()
    add_massive_columns(z, x, mask, massive)
