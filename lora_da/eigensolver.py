"""Batched, matrix-free LOBPCG for the LoRA-DA subspaces of many modules at once.

For each module b the solver finds the r eigenvectors with the smallest eigenvalues of

    Omega'_b = -alpha Delta_b^T Delta_b + c'_b Zd_b^-1,   Delta_b = -diag(d_b) G_b Zd_b^-1,

(Omega' = sigma^2 Omega: the same eigenvectors, and sigma is not needed to find them). Omega' is
only ever applied to blocks: Omega' X = Zd^-1 (alpha G^T (d * Delta X) + c' X), two products with
the explicit inverse Zd^-1 (formed once per distinct input from its Cholesky factor, shared by
the modules that read that input: one matmul each, where triangular solves with the factor run
several times slower on CPUs and GPUs alike) and two skinny matmuls with G. Modules of one shape
are stacked into 3-D tensors [b, ...] and iterate together; each stops on its own residual,
checked every few iterations (one host synchronisation per check), and converged modules leave
the batch.

The search space of each iteration is [X, R, P] (Ritz vectors, residuals, previous direction),
plus Zd R (residuals preconditioned by Zd) when the variance term reaches the scale of the bias
term (c' max diag(Zd^-1) >= 0.1 alpha sigma^2): R alone converges fast when c' Zd^-1 is a small
perturbation, Zd R when it dominates the spectrum. Converged columns are locked: R and P keep only
the columns still above the tolerance. Bases are orthonormalised by SVQB on an fp64 Gram matrix
(rank-deficient directions are dropped by giving them an infinite Rayleigh quotient), and the
projected problems are solved in fp64. With a ``working`` operator in fp32 (mixed precision),
Omega' is applied in fp32 to the new search directions only; everything carried from one
iteration to the next stays in fp64 (see ``smallest_eigenvectors``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from . import dispatch
from .block_operator import BlockOperator

STAGNATION_CHECKS = 10  # mixed precision: full precision once a refreshed module stalls for this many checks
SINGLE_THREAD_EIGH_MAX_N = 1024  # CPU eigh up to this size: batches split over one-threaded workers (RESULTS.md)
CUDA_BATCHED_EIGH_MAX_N = 32  # torch's CUDA eigh runs a batch as one call up to this size, one matrix at a time above

_host_pool: Optional[ThreadPoolExecutor] = None  # made on first use, grown when more threads are wanted
_host_pool_size = 0


def on_one_thread(fn: Callable, item):
    """fn(item) with one intra-op thread in the calling thread (the setting is per thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(item)
    finally:
        torch.set_num_threads(threads)


def on_host_threads(fn: Callable, items: Sequence) -> list:
    """[fn(item) for item in items], side by side on up to torch.get_num_threads() host threads
    that each run one-threaded ops: LAPACK on matrices up to ~1000 runs several times faster so
    than multi-threaded (RESULTS.md, "Eigensolver (CPU)")."""
    global _host_pool, _host_pool_size
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [on_one_thread(fn, item) for item in items]
    if _host_pool_size < workers:
        _host_pool, _host_pool_size = ThreadPoolExecutor(workers, thread_name_prefix="lora_da"), workers
    return list(_host_pool.map(lambda item: on_one_thread(fn, item), items))


def _host_eigh(a: torch.Tensor):
    """eigh of host [..., n, n]; a batch [b, n, n] is split over ``on_host_threads``, which write
    into tensors made by the calling thread (results made by the workers would live in their
    malloc arenas: 0.8 GiB more peak memory in the main job's solve)."""
    if a.dim() != 3:
        return on_one_thread(torch.linalg.eigh, a)
    values, vectors = a.new_empty(a.shape[:2]), torch.empty_like(a)
    spans = [slice(int(part[0]), int(part[-1]) + 1)
             for part in torch.arange(a.shape[0]).chunk(min(torch.get_num_threads(), a.shape[0]))]
    on_host_threads(lambda span: torch.linalg.eigh(a[span], out=(values[span], vectors[span])), spans)
    return values, vectors


def eigh(a: torch.Tensor, on_host: bool = True):
    """(eigenvalues, eigenvectors) of symmetric [..., n, n], as torch.linalg.eigh.

    For n <= SINGLE_THREAD_EIGH_MAX_N a host batch is split over ``on_host_threads``. torch's CUDA
    eigh loops over a batch above CUDA_BATCHED_EIGH_MAX_N (one cuSOLVER syevd per matrix), so
    with ``on_host`` such batches go to the host and back (the config's ``solver_small_eigh``).
    """
    n = a.shape[-1]
    if n > SINGLE_THREAD_EIGH_MAX_N:
        return torch.linalg.eigh(a)
    if a.device.type == "cpu":
        return _host_eigh(a)
    if a.device.type == "cuda" and on_host and n > CUDA_BATCHED_EIGH_MAX_N:
        values, vectors = _host_eigh(a.cpu())
        return values.to(a.device, non_blocking=True), vectors.to(a.device, non_blocking=True)
    return torch.linalg.eigh(a)


def inner_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A^T B [b, p, q] in fp64 for tall-skinny A [b, n, p], B [b, n, q], by the ``inner_products``
    op (Triton on GPUs, split over the rows; PyTorch elsewhere; LORA_DA_BACKEND=cuda, which has
    no such kernel, leaves the choice to ``auto``)."""
    return dispatch.resolve("inner_products", "auto", a.device, a.dtype, missing_is_auto=True).fn(a, b)


def gram_matrix(s: torch.Tensor) -> torch.Tensor:
    """S^T S [b, k, k] in fp64 for tall-skinny S [b, n, k]."""
    return inner_products(s, s)


def svqb(s: torch.Tensor, drop: float = 1e-8, eigh_on_host: bool = True):
    """Orthonormal basis of the columns of S [b, n, k] (SVQB, fp64 Gram matrix; ``eigh_on_host``
    as ``eigh``'s ``on_host``).

    Returns (transform [b, k, k], kept [b, k] bool): S @ transform has orthonormal columns where
    kept, zero columns elsewhere (directions S does not span).
    """
    m = gram_matrix(s)
    scale = torch.diagonal(m, dim1=1, dim2=2).clamp_min(torch.finfo(m.dtype).tiny).rsqrt()
    values, vectors = eigh(scale[:, :, None] * m * scale[:, None, :], eigh_on_host)
    kept = values > drop * values[:, -1:].clamp_min(torch.finfo(m.dtype).tiny)
    inv_sqrt = torch.where(kept, values.clamp_min(torch.finfo(m.dtype).tiny).rsqrt(), torch.zeros_like(values))
    return (scale[:, :, None] * vectors * inv_sqrt[:, None, :]).to(s.dtype), kept


def rayleigh_ritz(s: torch.Tensor, apply: Callable[[torch.Tensor], torch.Tensor], count: int,
                  x: Optional[torch.Tensor] = None, a_x: Optional[torch.Tensor] = None, eigh_on_host: bool = True):
    """The ``count`` smallest Ritz pairs of the operator on span([X, S]).

    X [b, n, kx] (orthonormal, optional) with A X, S [b, n, ks]; ``apply`` computes A Q;
    ``eigh_on_host`` as ``eigh``'s ``on_host``. S is
    projected off X twice and orthonormalised by SVQB, and only then is A applied: no difference of
    nearly equal blocks is ever formed, so errors of a low-precision A stay relative to ||A||.
    Returns (X' [b, n, count], A X', P' [b, n, count], theta [b, count], largest |theta| [b]) where
    P' is the part of X' outside span(X) (the LOBPCG direction).
    """
    if x is not None:
        for _ in range(2):
            s = s - x @ (x.transpose(1, 2) @ s)
    transform, kept = svqb(s, eigh_on_host=eigh_on_host)
    q = s @ transform
    a_q = apply(q)
    kx = 0 if x is None else x.shape[2]
    h = inner_products(q, a_q)
    if x is not None:
        # the coupling X^T A Q from the carried (full-precision) A X, not from A Q: its true size is
        # that of the residuals, and the errors of a low-precision A Q would swamp it near convergence
        coupling = inner_products(a_x, q)
        h = torch.cat([torch.cat([inner_products(x, a_x), coupling], dim=2),
                       torch.cat([coupling.transpose(1, 2), h], dim=2)], dim=1)
    h = 0.5 * (h + h.transpose(1, 2))
    # dropped directions get a Rayleigh quotient far above every real one, so none is picked
    dropped = torch.cat([kept.new_zeros((kept.shape[0], kx)), ~kept], dim=1)
    big = 10.0 * (h.abs().amax(dim=(1, 2), keepdim=True) + 1.0)
    h = h.masked_fill(dropped[:, :, None] | dropped[:, None, :], 0.0) + torch.diag_embed(dropped.to(h.dtype)) * big
    theta, coefficients = eigh(h, eigh_on_host)
    real = torch.arange(theta.shape[1], device=theta.device) < (~dropped).sum(dim=1, keepdim=True)
    c = coefficients[:, :, :count].to(s.dtype)
    p, a_p = q @ c[:, kx:], a_q @ c[:, kx:]
    if x is not None:  # X' = X c_X + P' without the concatenated basis [X, Q]
        x, a_x = torch.baddbmm(p, x, c[:, :kx]), torch.baddbmm(a_p, a_x, c[:, :kx])
    else:
        x, a_x = p, a_p
    return x, a_x, p, theta[:, :count], torch.where(real, theta.abs(), 0.0).amax(dim=1)


def consecutive_runs(index: torch.Tensor) -> List[torch.Tensor]:
    """Ascending host ``index`` [c] split into runs of consecutive values."""
    breaks = ((index[1:] - index[:-1]) != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(index, breaks))


def unconverged_columns(r: torch.Tensor) -> torch.Tensor:
    """Gather index [b, n, c] of the columns of R [b, n, k] that are not zero (not yet converged),
    first in each module, padded with zero columns to the batch's largest count c: the new search
    directions shrink as columns converge (locking), and the padding is dropped by SVQB."""
    live = r.norm(dim=1) > 0
    count = max(int(live.sum(dim=1).max()), 1)
    order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)[:, :count]
    return order[:, None, :].expand(-1, r.shape[1], -1)


@dataclass
class SolveInfo:
    """Convergence of one batch of modules."""

    iterations: torch.Tensor  # [b] int
    residuals: torch.Tensor  # [b]: the final relative residual (or change) of each module
    converged: torch.Tensor  # [b] bool: whether it reached the tolerance

    @classmethod
    def exact(cls, batch: int) -> "SolveInfo":
        """``batch`` modules with nothing to iterate."""
        return cls(torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.float64),
                   torch.ones(batch, dtype=torch.bool))


def _relative_residual(r: torch.Tensor, rank: int, norm: torch.Tensor) -> torch.Tensor:
    """[b] on the host: max over the first ``rank`` columns of ||r_i|| / ||Omega'||."""
    return (r[:, :, :rank].norm(dim=1).amax(dim=1) / norm.clamp_min(torch.finfo(r.dtype).tiny)).double().cpu()


# over 60 lines: one LOBPCG loop, whose state (Ritz vectors, directions, locked columns, the
# working precision per module) would only be handed back and forth between pieces of it
def smallest_eigenvectors(
    op: BlockOperator,
    rank: int,
    *,
    oversampling: int,
    tolerance: float,
    max_iterations: int,
    precondition: Optional[bool] = None,
    check_every: Optional[int] = None,
    working: Optional[BlockOperator] = None,
    generator: Optional[torch.Generator] = None,
    eigh_on_host: bool = True,
):
    """V [b, n, r]: the r smallest eigenvectors of every Omega'_b (ascending), and SolveInfo
    (residual: max_i ||Omega' v_i - theta_i v_i|| / ||Omega'|| over the r vectors).

    ``precondition`` adds Zd R to the search space (None: decided by ``variance_dominates`` at the
    bias scale the warm start shows, -theta_min); convergence is checked every ``check_every``
    iterations (default 1 on CPU, 4 on accelerators, where each check synchronises the host).
    ``working``: op in a lower precision (``op.to(torch.float32)``) that applies Omega' to the new
    search directions, while the Ritz vectors, A X and the projected problems stay in op's. A X is
    recomputed in full precision once a module's residual reaches the working precision's floor
    and again to confirm convergence, so the tolerance is met in op's precision: the corrections
    applied in low precision shrink with the residual, and so do their errors. A module that
    stalls after its refresh switches the batch to full precision. ``eigh_on_host``: as
    ``eigh``'s ``on_host``.
    """
    if check_every is None:
        check_every = 1 if op.gradient.device.type == "cpu" else 4
    batch, _, n = op.gradient.shape
    k = min(rank + oversampling, n)
    dtype, device = op.gradient.dtype, op.gradient.device
    mixed = working is not None and working.gradient.dtype != dtype
    working = working if mixed else op
    # below this carried residual, low-precision drift of A X may dominate: refresh A X once
    floor = max(tolerance, 1e3 * torch.finfo(working.gradient.dtype).eps) if mixed else tolerance
    refreshed = torch.full((batch,), not mixed)
    since_refresh = torch.zeros(batch, dtype=torch.long)  # convergence checks since A X was refreshed

    def fast(method, x):
        """working.method(x) [b, n, c] on unit columns (Omega' X alone may overflow fp32), rescaled."""
        scale = x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        return getattr(working, method)((x / scale).to(working.gradient.dtype)).to(dtype) * scale

    start = torch.randn(batch, n, k, dtype=dtype, device="cpu", generator=generator).to(device)
    # warm start: Delta's dominant subspace, with the random block kept so that the span has k dimensions
    warm = torch.cat([fast("gram", start), start], dim=2)
    x, ax, _, theta, norm = rayleigh_ritz(warm, lambda q: fast("omega", q), k, eigh_on_host=eigh_on_host)
    if precondition is None:
        precondition = op.variance_dominates((-theta[:, 0]).clamp_min(0.0))
    p = columns = None
    active = torch.arange(batch, device=device)
    finished = torch.zeros(batch, dtype=torch.bool)  # per active module (host): its result is stored
    result = torch.empty(batch, n, rank, dtype=dtype, device=device)
    iterations = torch.zeros(batch, dtype=torch.long)
    residuals = torch.zeros(batch, dtype=torch.float64)
    for step in range(1, max_iterations + 1):
        theta = (x * ax).sum(dim=1)
        r = ax - x * theta[:, None, :]
        # soft locking: converged columns stop contributing directions (their residual is noise)
        r = r * (r.norm(dim=1, keepdim=True) > tolerance * norm[:, None, None])
        if step % check_every == 0 or step == max_iterations:
            relative = _relative_residual(r, rank, norm)
            last = step == max_iterations
            wanted = (relative <= tolerance) | last | (~refreshed & (relative <= floor))
            candidates = (wanted & ~finished).nonzero().flatten()
            if candidates.numel():
                # a fresh A X in full precision: the carried one drifts through the linear combinations
                fresh = candidates.to(device)
                for run in consecutive_runs(candidates):  # views of op's tensors, where a selection copies G
                    ax[run[0]:run[-1] + 1] = op.select(run).omega(x[run[0]:run[-1] + 1])
                r[fresh] = ax[fresh] - x[fresh] * theta[fresh][:, None, :]
                relative[candidates] = _relative_residual(r[fresh], rank, norm[fresh])
                refreshed[candidates] = True
            since_refresh = torch.where(refreshed, since_refresh + 1, since_refresh)
            done = ~finished & ((relative <= tolerance) | last)
            if done.any():
                idx = done.nonzero().flatten()
                result[active[idx.to(device)]] = x[idx.to(device), :, :rank]
                iterations[active.cpu()[idx]] = step
                residuals[active.cpu()[idx]] = relative[idx]
                finished |= done
            if bool(finished.all()):
                break
            # finished modules leave the batch once they are half of it (each exit copies the rest's G)
            if 2 * int(finished.sum()) >= len(finished):
                keep = (~finished).nonzero().flatten()
                refreshed, finished, since_refresh = refreshed[keep], finished[keep], since_refresh[keep]
                keep = keep.to(device)
                active, x, ax, r, norm = active[keep], x[keep], ax[keep], r[keep], norm[keep]
                op = op.select(keep)
                working = working.select(keep) if mixed else op
                p = None if p is None else p[keep]
                columns = None
            r[finished.to(device)] = 0.0
            if mixed and bool((since_refresh[~finished] > STAGNATION_CHECKS).any()):
                # the working precision's errors stall a nearly degenerate module (rotations inside
                # a cluster keep the corrections large): go on in full precision, from a fresh A X
                mixed, working = False, op
                ax = op.omega(x)
                theta = (x * ax).sum(dim=1)
                r = (ax - x * theta[:, None, :]) * (~finished).to(device)[:, None, None]
        if step % check_every == 0 or columns is None:
            columns = unconverged_columns(r)
        r_active = r.gather(2, columns)
        blocks = [r_active, fast("zd_product", r_active)] if precondition else [r_active]
        if p is not None:
            blocks.append(p.gather(2, columns))
        x, ax, p, _, new_norm = rayleigh_ritz(torch.cat(blocks, 2), lambda q: fast("omega", q), k, x, ax,
                                              eigh_on_host)
        norm = torch.maximum(norm, new_norm)
    return result, SolveInfo(iterations, residuals, residuals <= tolerance)


def top_singular_values(op: BlockOperator, *, block: int, tolerance: float, max_iterations: int,
                        start: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                        eigh_on_host: bool = True):
    """(sigma [b] = ||Delta_b||_2, SolveInfo) by block subspace iteration on Delta^T Delta: each
    step projects onto span(X) (Rayleigh-Ritz from Y = Delta X, Y^T Y = X^T Delta^T Delta X) and
    moves to span(Delta^T Y); one Delta and one Delta^T per step. ``start`` [b, n, k]: a first
    block (default ``block`` random vectors). Stops when sigma^2 changes by <= ``tolerance``
    (relative) in every module, or after ``max_iterations``; SolveInfo's residual is each
    module's last relative change (inf after a single step)."""
    batch, _, n = op.gradient.shape
    x = start
    if x is None:
        x = torch.randn(batch, n, min(block, n), dtype=op.gradient.dtype, device="cpu", generator=generator)
    x = x.to(device=op.gradient.device, dtype=op.gradient.dtype)
    previous = None
    change = torch.full((batch,), float("inf"), dtype=torch.float64)
    for step in range(1, max_iterations + 1):
        x = x @ svqb(x, eigh_on_host=eigh_on_host)[0]
        y = op.delta(x)
        theta, vectors = eigh(gram_matrix(y), eigh_on_host)
        top = theta[:, -1].clamp_min(0.0)
        if previous is not None:
            change = ((top - previous).abs() / top.clamp_min(torch.finfo(top.dtype).tiny)).double().cpu()
            if bool((change <= tolerance).all()):
                break
        previous = top
        if step == max_iterations:
            break
        y = y @ vectors.to(y.dtype)
        x = op.delta_t(y / y.norm(dim=1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny))
    info = SolveInfo(torch.full((batch,), step, dtype=torch.long), change, change <= tolerance)
    return top.sqrt().to(op.gradient.dtype), info
