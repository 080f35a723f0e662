"""Triton implementation of the statistics op (see ``reference.fisher_update`` for the contract).

Two kernels per call:
  * ``_z_upper_kernel``: Z += X^T diag(M) X on the upper-triangular tiles only (one program per
    tile, or a persistent grid of a few per SM looping over them: autotuned), reading just the
    counted tokens: the first ``counted`` rows where the caller compacted them (the collector's
    token buffers do), else through a device-side index list (no host synchronisation);
  * ``_g_kernel``: G_k += Gout_k^T X over every token, with y_k += sum_t M_t Gout_k[t]^2 fused
    into the programs of the first column of tiles.
Both are autotuned per shape, dtype and token bucket (``token_bucket``: calls see a few hundred
tokens unbuffered and thousands from the collector's buffers).
Accumulation is fp32; fp32 inputs use IEEE products (no TF32). Into an fp64 Z the fp32 sums of
every ``massive.flush_tokens`` tokens are added in fp64 registers, and the massive features' rows
and columns are summed in fp64 apart (``massive.add_split_gram``). Under ``TRITON_INTERPRET=1`` tiles
are cast to fp32 after loading (the interpreter computes bf16 wrongly), and each call runs one
config (``triton_setup.tile_prune``: the GPU's tiles on problems that span more than one).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .massive import add_split_gram, flush_tokens
from .triton_setup import AUTOTUNE_EXTRA, INTERPRET, configs, on_device, tile_prune

# PROGRAMS_PER_SM: 0 launches one program per upper-triangular tile; k > 0 launches k per SM
# (at most one per tile), each looping over the tiles with a stride of the grid (persistent)
_Z_CONFIGS = configs(
    [
        {"BLOCK_N": 128, "BLOCK_T": 64, "PROGRAMS_PER_SM": 0, "warps": 8, "stages": 3},
        {"BLOCK_N": 128, "BLOCK_T": 32, "PROGRAMS_PER_SM": 0, "warps": 4, "stages": 4},
        {"BLOCK_N": 64, "BLOCK_T": 64, "PROGRAMS_PER_SM": 0, "warps": 4, "stages": 4},
        # fp64 Z: no register spills with its fp64 tile (benchmarks/z_kernel_registers.py)
        {"BLOCK_N": 64, "BLOCK_T": 64, "PROGRAMS_PER_SM": 0, "warps": 8, "stages": 3},
        {"BLOCK_N": 128, "BLOCK_T": 64, "PROGRAMS_PER_SM": 0, "warps": 4, "stages": 3},
        {"BLOCK_N": 128, "BLOCK_T": 64, "PROGRAMS_PER_SM": 1, "warps": 8, "stages": 3},
        {"BLOCK_N": 128, "BLOCK_T": 64, "PROGRAMS_PER_SM": 2, "warps": 4, "stages": 3},
    ],
    {"BLOCK_N": 16, "BLOCK_T": 16, "PROGRAMS_PER_SM": 1},  # persistent: the tests run the loop over tiles
)
_G_CONFIGS = configs(
    [
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_T": 64, "warps": 8, "stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_T": 64, "warps": 8, "stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_T": 32, "warps": 4, "stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_T": 64, "warps": 4, "stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_T": 64, "warps": 4, "stages": 4},
    ],
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_T": 16},
)


@triton.jit
def _tile_pair(pid, num_tiles):
    """(i, j), i <= j, of the pid-th upper-triangular tile, rows of the triangle in order."""
    # row i starts at i * num_tiles - i * (i - 1) / 2; invert with a float estimate, then correct
    nt = num_tiles.to(tl.float32)
    p = pid * 1.0  # fp32 (pid is a plain int in the interpreter's loops)
    i = ((2.0 * nt + 1.0 - tl.sqrt((2.0 * nt + 1.0) * (2.0 * nt + 1.0) - 8.0 * p)) / 2.0).to(tl.int32)
    start = i * num_tiles - (i * (i - 1)) // 2
    i = tl.where(pid < start, i - 1, i)
    start = i * num_tiles - (i * (i - 1)) // 2
    next_start = start + num_tiles - i
    i = tl.where(pid >= next_start, i + 1, i)
    start = i * num_tiles - (i * (i - 1)) // 2
    return i, i + (pid - start)


@triton.jit
def _add_product(acc, a, b, IEEE: tl.constexpr, CAST_F32: tl.constexpr):
    """acc + a^T b for tiles a [T, I], b [T, J], accumulated in fp32 (IEEE products for fp32
    inputs; tiles cast to fp32 first under the interpreter)."""
    if CAST_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return acc + tl.dot(tl.trans(a), b, input_precision="ieee")
    return acc + tl.dot(tl.trans(a), b)


@triton.jit
def _add_tile(acc, x_ptr, order_ptr, t0, count, cols_i, cols_j, n, stride_xt, COMPACTED: tl.constexpr,
              IEEE: tl.constexpr, CAST_F32: tl.constexpr, BLOCK_T: tl.constexpr):
    """acc + X_t^T X_t [BLOCK_N, BLOCK_N] (fp32) over the counted tokens t0 .. t0 + BLOCK_T - 1
    (those below ``count``), columns cols_i and cols_j of x."""
    t = t0 + tl.arange(0, BLOCK_T)
    live = t < count
    if COMPACTED:
        token = t.to(tl.int64)
    else:
        token = tl.load(order_ptr + t, mask=live, other=0).to(tl.int64)
    a = tl.load(x_ptr + token[:, None] * stride_xt + cols_i[None, :], mask=live[:, None] & (cols_i[None, :] < n),
                other=0.0)
    b = tl.load(x_ptr + token[:, None] * stride_xt + cols_j[None, :], mask=live[:, None] & (cols_j[None, :] < n),
                other=0.0)
    return _add_product(acc, a, b, IEEE, CAST_F32)


@triton.autotune(configs=_Z_CONFIGS, key=["n", "DTYPE_KEY", "Z_KEY", "T_BUCKET", "COMPACTED", "FLUSH_TOKENS"],
                 restore_value=["z_ptr"], prune_configs_by=tile_prune({"BLOCK_N": "n"}), **AUTOTUNE_EXTRA)
@triton.jit
def _z_upper_kernel(x_ptr, order_ptr, count_ptr, count_value, z_ptr, n, stride_xt, stride_zn, DTYPE_KEY, Z_KEY,
                    T_BUCKET, COMPACTED: tl.constexpr, IEEE: tl.constexpr, CAST_F32: tl.constexpr,
                    FLUSH_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                    PROGRAMS_PER_SM: tl.constexpr):
    """Z's upper-triangular tiles += their fp32 sums over the call (FLUSH_TOKENS 0), or (fp64 Z)
    the fp32 sums of each FLUSH_TOKENS tokens added into fp64 registers, those into Z."""
    num_tiles = tl.cdiv(n, BLOCK_N)
    if COMPACTED:  # the counted tokens are the first count_value rows
        count = count_value
    else:
        count = tl.load(count_ptr)
    for tile in range(tl.program_id(0), num_tiles * (num_tiles + 1) // 2, tl.num_programs(0)):
        ti, tj = _tile_pair(tile, num_tiles)
        cols_i = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_j = tj * BLOCK_N + tl.arange(0, BLOCK_N)
        if FLUSH_TOKENS == 0:
            acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
            for t0 in range(0, count, BLOCK_T):
                acc = _add_tile(acc, x_ptr, order_ptr, t0, count, cols_i, cols_j, n, stride_xt, COMPACTED, IEEE,
                                CAST_F32, BLOCK_T)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float64)
            for g0 in range(0, count, FLUSH_TOKENS):
                group = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
                for k in tl.static_range(FLUSH_TOKENS // BLOCK_T):
                    if g0 + k * BLOCK_T < count:
                        group = _add_tile(group, x_ptr, order_ptr, g0 + k * BLOCK_T, count, cols_i, cols_j, n,
                                          stride_xt, COMPACTED, IEEE, CAST_F32, BLOCK_T)
                acc += group.to(tl.float64)
        z_ptrs = z_ptr + cols_i[:, None].to(tl.int64) * stride_zn + cols_j[None, :]  # n^2 may pass 2^31
        inside = (cols_i[:, None] < n) & (cols_j[None, :] < n)
        z = tl.load(z_ptrs, mask=inside, other=0.0)
        tl.store(z_ptrs, z + acc.to(z.dtype), mask=inside)


@triton.autotune(configs=_G_CONFIGS, key=["m", "n", "DTYPE_KEY", "T_BUCKET"], restore_value=["g_ptr", "y_ptr"],
                 prune_configs_by=tile_prune({"BLOCK_M": "m", "BLOCK_N": "n"}), **AUTOTUNE_EXTRA)
@triton.jit
def _g_kernel(x_ptr, grad_ptr, mask_ptr, g_ptr, y_ptr, tokens, m, n, stride_xt, stride_gt, stride_gm, DTYPE_KEY, T_BUCKET,
              IEEE: tl.constexpr, CAST_F32: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    y_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        live = t < tokens
        g = tl.load(grad_ptr + t[:, None].to(tl.int64) * stride_gt + rows[None, :], mask=live[:, None] & (rows[None, :] < m), other=0.0)
        x = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_xt + cols[None, :], mask=live[:, None] & (cols[None, :] < n), other=0.0)
        acc = _add_product(acc, g, x, IEEE, CAST_F32)
        if pid_n == 0:
            weight = tl.load(mask_ptr + t, mask=live, other=0.0)
            g32 = g.to(tl.float32)
            y_acc += tl.sum(g32 * g32 * weight[:, None], axis=0)
    g_ptrs = g_ptr + rows[:, None].to(tl.int64) * stride_gm + cols[None, :]  # m * n may pass 2^31
    inside = (rows[:, None] < m) & (cols[None, :] < n)
    tl.store(g_ptrs, tl.load(g_ptrs, mask=inside, other=0.0) + acc, mask=inside)
    if pid_n == 0:
        y_ptrs = y_ptr + rows
        tl.store(y_ptrs, tl.load(y_ptrs, mask=rows < m, other=0.0) + y_acc, mask=rows < m)


@functools.lru_cache(maxsize=None)
def _dtype_key(dtype: torch.dtype) -> int:
    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """The device's SMs (2 under the interpreter, so that its persistent programs loop over tiles)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _z_grid(meta: dict, n: int, sms: int) -> tuple:
    """Programs of ``_z_upper_kernel``: one per upper-triangular tile, or PROGRAMS_PER_SM per SM."""
    tiles = triton.cdiv(n, meta["BLOCK_N"])
    tiles = tiles * (tiles + 1) // 2
    return (min(tiles, sms * meta["PROGRAMS_PER_SM"]) if meta["PROGRAMS_PER_SM"] else tiles,)


def token_bucket(tokens: int) -> int:
    """The autotune key of a call's token count (the tiles that win change with it): the next power
    of two, within [256, 16384]."""
    return min(max(256, 1 << max(0, tokens - 1).bit_length()), 16384)


def counted_order(mask: torch.Tensor):
    """(order [T] int32: counted tokens first, count [1] int32), built on the device without sync."""
    flat = mask.reshape(-1)
    order = torch.argsort((~flat.bool()).to(torch.int8), stable=True).to(torch.int32)
    return order, flat.sum(dtype=torch.int32).reshape(1)


def _add_upper_gram(xs: torch.Tensor, mask: torch.Tensor, z: torch.Tensor, counted: Optional[int], key: int,
                    bucket: int) -> None:
    """Upper triangle of z [n, n] += the sums of xs [T, n]'s counted rows: for fp32 z their fp32
    sums, for fp64 z the fp32 sums of each ``flush_tokens`` tokens added in fp64."""
    n = xs.shape[1]
    order, count = (xs, xs) if counted is not None else counted_order(mask)  # xs: unread stand-ins
    grid = functools.partial(_z_grid, n=n, sms=_multiprocessors(xs.device))
    wide = z.dtype == torch.float64
    _z_upper_kernel[grid](xs, order, count, counted or 0, z, n, xs.stride(0), z.stride(0), key, int(wide), bucket,
                          COMPACTED=counted is not None, IEEE=xs.dtype == torch.float32, CAST_F32=INTERPRET,
                          FLUSH_TOKENS=flush_tokens(xs.device) if wide else 0)


def fisher_update(
    x: torch.Tensor,
    mask: torch.Tensor,
    grads: Sequence[torch.Tensor],
    input_factor: Optional[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    output_factors: Sequence[torch.Tensor],
    counted: Optional[int] = None,
) -> None:
    """Triton version of ``reference.fisher_update``; writes only the upper triangle of Z.

    x: [B, L, n] (fp32/fp16/bf16); mask: [B, L]; grads[k]: [B, L, m_k]; G and y fp32, Z fp32 or
    fp64 (then summed as ``massive.split_gram``). With ``counted`` Z reads the first ``counted``
    rows directly, else through ``counted_order``.
    """
    batch, length, n = x.shape
    tokens = batch * length
    xs = x.reshape(tokens, n)
    if xs.stride(1) != 1:
        xs = xs.contiguous()
    weights = mask.reshape(tokens).to(torch.float32)
    ieee = x.dtype == torch.float32
    key, bucket = _dtype_key(x.dtype), token_bucket(tokens)
    with on_device(x.device):
        if input_factor is not None and tokens > 0 and counted != 0:
            add_rest = functools.partial(_add_upper_gram, mask=mask, z=input_factor, counted=counted, key=key,
                                         bucket=bucket)
            if input_factor.dtype == torch.float64:
                add_split_gram(input_factor, xs, weights, counted, add_rest)
            else:
                add_rest(xs)
        for k, grad in enumerate(grads):
            m = grad.shape[-1]
            gs = grad.reshape(tokens, m)
            if gs.stride(1) != 1:
                gs = gs.contiguous()
            if tokens > 0:
                grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
                _g_kernel[grid](xs, gs, weights, gradients[k], output_factors[k], tokens, m, n, xs.stride(0),
                                gs.stride(0), gradients[k].stride(0), key, bucket, IEEE=ieee, CAST_F32=INTERPRET)
