"""From statistics to LoRA factors: ``solve`` and ``solve_sweep`` (ALGORITHM.md steps 2-4), which
split the modules into chunks of one shape, solve each in the span of its tokens, exactly or with
the randomized solver, and report what they did."""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from . import batched_solver, dispatch, distributed, token_space
from .config import LoraDAConfig, resolve_config
from .input_factors import InputFactors
from .report import SolveReport
from .statistics import Statistics
from .subspaces import ChunkSolver, Factors, LoraFactors, Subspaces, diagnose, factor_pair


def check_ranks(shapes: Mapping[str, Tuple[int, int]], ranks: Mapping[str, int]) -> None:
    """Raise ValueError naming every module whose rank exceeds min(m, n). shapes: name -> (m, n)."""
    bad = [f"{name} (r={ranks[name]}, weight {m}x{n})" for name, (m, n) in shapes.items() if ranks[name] > min(m, n)]
    if bad:
        raise ValueError(f"rank larger than min(out_features, in_features) for: {', '.join(bad)}")


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
        subspaces, report, error = {}, SolveReport(), None
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
                  diagnosed: Optional[Tuple[float, Dict[str, int]]] = None) -> Tuple[Subspaces, SolveReport]:
    """Subspaces of the modules in ``groups`` ((m, n, largest rank) -> names) for every beta, and
    the report; warns of the modules left unconverged. Each chunk goes to the token space's solver
    first and what it leaves to the exact or the randomized one. ``diagnosed`` = (beta, module ->
    rank): the factors whose ``diagnose`` figures go into the report (a single solve only: a
    sweep's sets share one report)."""
    population = cfg.population_size or stats.population_size
    budget = batched_solver.solve_batch_bytes(device)
    chunks = [(shape, chunk) for shape, group in groups.items()
              for chunk in batched_solver.chunks(stats, group, shape, budget, batched_solver.solve_batch_modules(
                  device, shape[1], shape[2] + cfg.solver_oversampling))]
    factors = InputFactors(stats, cfg.damping, device, relative=cfg.damping_mode == "relative",
                           readers=[name for _, chunk in chunks for name in chunk])
    in_token_space = token_space.TokenSpaceSolver(stats, cfg, population, factors, budget)
    full_space: Dict[str, ChunkSolver] = {
        "exact": batched_solver.ExactSolver(stats, cfg, population, factors),
        "randomized": batched_solver.RandomizedSolver(stats, cfg, population, factors, device)}
    subspaces: Subspaces = {}
    report = SolveReport()
    for (m, n, rank), chunk in tqdm(chunks, desc="lora_da solve", unit="batch",
                                    disable=not progress or not distributed.is_main_process()):
        check_finite(stats, chunk)
        solver = batched_solver.resolve_solver(cfg.solver, n)
        entry = report.shape(f"{m}x{n}, r={rank}", solver)
        left = chunk
        for chunk_solver in (in_token_space, full_space[solver]):
            found, modules = chunk_solver.solve(left, rank, betas)
            subspaces.update(found)
            entry.modules.update(modules)
            left = [name for name in left if name not in modules]
            if not left:
                break
        if diagnosed is not None:
            beta, ranks = diagnosed
            for name in chunk:
                entry.modules[name].diagnostics = diagnose(subspaces[(beta, name)], ranks[name],
                                                           factors.z(stats.modules[name].input_key), cfg)
    warn_unconverged(report, cfg)
    if factors.redamped:
        warnings.warn(f"lora_da: the input factors of {[stats.inputs[key].modules for key in factors.redamped]}, "
                      f"summed from fp32 tile sums by the kernels, are not positive definite at damping {cfg.damping:g}: "
                      "damped at the rounding floor of fp32 sums instead (the report's dampings). "
                      "input_factor_dtype='float64' sums them in fp64 throughout", RuntimeWarning, stacklevel=5)
    return subspaces, report


def warn_unconverged(report: SolveReport, cfg: LoraDAConfig) -> None:
    """A RuntimeWarning naming every module whose eigenvectors or sigma stopped at
    ``solver_max_iterations`` before the tolerance, with its residual."""
    parts = []
    for stalled, what, tolerance in ((report.unconverged(), "subspace residual", cfg.solver_tolerance),
                                     (report.sigma_unconverged(), "sigma^2 change", batched_solver.SIGMA_TOLERANCE)):
        if stalled:
            listed = ", ".join(f"{name} ({value:.1e})" for name, value in stalled.items())
            parts.append(f"{len(stalled)} module(s) above the {what} tolerance {tolerance:g}: {listed}")
    if parts:
        warnings.warn(f"lora_da: the randomized solver stopped at solver_max_iterations={cfg.solver_max_iterations} "
                      f"with {'; and '.join(parts)}. Raise solver_max_iterations (or solver_tolerance)",
                      RuntimeWarning, stacklevel=5)
