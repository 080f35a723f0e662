"""Triton batched inner products of tall-skinny blocks: out[b] = A[b]^T B[b] in fp64.

The eigensolver's Gram matrices and projected problems (``reference.inner_products`` is the
contract and the oracle): A [b, n, p], B [b, n, q] with n in the thousands and p, q at most a few
hundred. A plain batched matmul gives such shapes only b * (p/64) * (q/64) output tiles, far too
few programs for a GPU; here the rows are split over a second grid axis and each program
reduces its slice of rows into a [BLOCK_P, BLOCK_Q] tile, with fp64 fused multiply-adds (fp32
inputs are widened exactly: their products fit fp64's mantissa). The partial tiles of the row
slices are summed afterwards in a fixed order, so results are deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_setup import AUTOTUNE_EXTRA, configs, on_device, tile_prune

ROWS_PER_SLICE = 256  # rows reduced by one program before its partial tile is written

_CONFIGS = configs(
    [
        {"BLOCK_N": 8, "BLOCK_P": 32, "BLOCK_Q": 32, "warps": 4, "stages": 2},
        {"BLOCK_N": 4, "BLOCK_P": 64, "BLOCK_Q": 32, "warps": 4, "stages": 2},
        {"BLOCK_N": 16, "BLOCK_P": 16, "BLOCK_Q": 16, "warps": 2, "stages": 3},
    ],
    {"BLOCK_N": 16, "BLOCK_P": 16, "BLOCK_Q": 16},
)


@triton.autotune(configs=_CONFIGS, key=["p", "q", "rows"], prune_configs_by=tile_prune({"BLOCK_P": "p", "BLOCK_Q": "q"}),
                 **AUTOTUNE_EXTRA)
@triton.jit
def _inner_kernel(a_ptr, b_ptr, part_ptr, n, p, q, rows,
                  stride_ab, stride_an, stride_ap, stride_bb, stride_bn, stride_bq,
                  BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """part[slice, batch, p-tile, q-tile] = sum over the slice's rows of A^T B (fp64)."""
    tile = tl.program_id(0)
    row_slice = tl.program_id(1)
    tiles_p = tl.cdiv(p, BLOCK_P)
    tiles_q = tl.cdiv(q, BLOCK_Q)
    batch = tile // (tiles_p * tiles_q)
    tp = (tile // tiles_q) % tiles_p
    tq = tile % tiles_q
    cols_p = tp * BLOCK_P + tl.arange(0, BLOCK_P)
    cols_q = tq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offsets = tl.arange(0, BLOCK_N)
    a_base = a_ptr + batch.to(tl.int64) * stride_ab
    b_base = b_ptr + batch.to(tl.int64) * stride_bb
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float64)
    first = row_slice * rows
    last = tl.minimum(first + rows, n)
    for start in range(first, last, BLOCK_N):
        r = start + offsets
        in_rows = r < last
        a = tl.load(a_base + r[:, None].to(tl.int64) * stride_an + cols_p[None, :] * stride_ap,
                    mask=in_rows[:, None] & (cols_p[None, :] < p), other=0.0).to(tl.float64)
        b = tl.load(b_base + r[:, None].to(tl.int64) * stride_bn + cols_q[None, :] * stride_bq,
                    mask=in_rows[:, None] & (cols_q[None, :] < q), other=0.0).to(tl.float64)
        acc += tl.sum(a[:, :, None] * b[:, None, :], axis=0)
    batches = tl.num_programs(0) // (tiles_p * tiles_q)
    out = part_ptr + ((row_slice.to(tl.int64) * batches + batch) * p + cols_p[:, None]) * q + cols_q[None, :]
    tl.store(out, acc, mask=(cols_p[:, None] < p) & (cols_q[None, :] < q))


def inner_products(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A^T B [batch, p, q] fp64 for A [batch, n, p], B [batch, n, q] (fp32 or fp64); ``out``
    (fp64, contiguous) receives the result when given."""
    batch, n, p = a.shape
    q = b.shape[2]
    if out is None:
        out = torch.empty(batch, p, q, dtype=torch.float64, device=a.device)
    if n == 0 or batch == 0 or p == 0 or q == 0:
        return out.zero_()
    slices = triton.cdiv(n, ROWS_PER_SLICE)
    partial = torch.empty(slices, batch, p, q, dtype=torch.float64, device=a.device)
    grid = lambda meta: (batch * triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(q, meta["BLOCK_Q"]), slices)  # noqa: E731
    with on_device(a.device):
        _inner_kernel[grid](a, b, partial, n, p, q, ROWS_PER_SLICE, a.stride(0), a.stride(1), a.stride(2),
                            b.stride(0), b.stride(1), b.stride(2))
    return torch.sum(partial, dim=0, out=out)

