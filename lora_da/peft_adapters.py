"""Drop-in LoRA-DA initialisation of a Hugging Face PEFT LoRA model, in place."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from .batches import execution_device
from .collect import collect_statistics, population_size_warning
from .config import LoraDAConfig, resolve_config
from .report import Diagnostics, SolveReport
from .solver import check_ranks, solve
from .subspaces import LoraFactors
from .statistics import Statistics
from .targets import linear_shape, lora_layers, matches

logger = logging.getLogger(__name__)


@dataclass
class InitReport:
    """What ``initialize`` did and what it cost."""

    adapter_name: str
    ranks: Dict[str, int]  # module -> r
    num_sequences: int
    num_tokens: int
    population_size: int
    seconds: Dict[str, float]  # collect, solve, apply
    statistics_bytes: int
    peak_memory_bytes: Optional[int]  # accelerator peak during initialize; None on CPU
    solver: SolveReport  # how each module was solved: ``solve``'s Factors.report
    passes: int = 1  # passes over the calibration data (more than one under a memory budget)
    warnings: List[str] = field(default_factory=list)  # what the user should act on, printed first

    @property
    def modules(self) -> List[str]:
        return list(self.ranks)

    def __str__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        lines = [f"WARNING: {text}" for text in self.warnings] + [
            f"LoRA-DA initialisation of adapter {self.adapter_name!r}",
            f"  modules     {len(self.ranks)} (rank {', '.join(map(str, ranks))})",
            f"  sequences   {self.num_sequences}   counted tokens {self.num_tokens}   population N {self.population_size}",
            "  seconds     " + "   ".join(f"{k} {v:.2f}" for k, v in self.seconds.items())
            + f"   total {sum(self.seconds.values()):.2f}",
            f"  statistics  {self.statistics_bytes / 2**20:.1f} MiB in {self.passes} pass(es)",
        ]
        if self.peak_memory_bytes is not None:
            lines.append(f"  peak memory {self.peak_memory_bytes / 2**20:.1f} MiB")
        figures = list(self.solver.diagnostics().values())
        if figures:
            lines.append("  subspace    " + _median_and_min(figures))
        for shape, entry in self.solver.shapes.items():
            detail = (f", {entry.iterations} iterations, residual {entry.residual:.1e}"
                      if entry.iterations is not None else "")
            if entry.token_space:
                detail += f", {len(entry.token_space)} in the span of their input's tokens"
            dampings = entry.dampings.values()
            if dampings and max(dampings) > min(dampings):
                detail += f", damping {min(dampings):.1e} to {max(dampings):.1e}"
            elif dampings:
                detail += f", damping {max(dampings):.1e}"
            stalled = sorted({**entry.unconverged, **entry.sigma_unconverged})
            detail += f", NOT CONVERGED: {', '.join(stalled)}" if stalled else ""
            lines.append(f"  solve       {shape}: {len(entry.modules)} modules, {entry.solver}{detail}")
            if entry.diagnostics:
                lines.append(f"              {_median_and_min(list(entry.diagnostics.values()))}")
        return "\n".join(lines)


def _median_and_min(figures: List[Diagnostics]) -> str:
    """Median and minimum of the input energy and captured share over modules (``subspaces.diagnose``)."""
    parts = []
    for key, label in (("input_energy", "input energy e(A)"), ("captured_share", "share of |Delta_hat|^2")):
        values = torch.tensor([getattr(f, key) for f in figures])
        parts.append(f"{label} median {float(values.median()):.3g} (min {float(values.min()):.3g})")
    return ", ".join(parts)


def _adapter_layers(model: nn.Module, adapter_name: Optional[str], target_modules) -> tuple:
    """(adapter name, {module name: LoraLayer}) of the layers to initialise; raises on bad input."""
    layers = lora_layers(model)
    if not layers:
        raise TypeError(
            f"{type(model).__name__} has no PEFT LoRA layers: wrap it with peft.get_peft_model first, "
            "or call lora_da.collect_statistics + lora_da.solve and apply the factors yourself"
        )
    if adapter_name is None:
        adapter_name = getattr(model, "active_adapter", None)
        if isinstance(adapter_name, (list, tuple)):
            if len(adapter_name) != 1:
                raise ValueError(f"several active adapters {adapter_name}: pass adapter_name=")
            adapter_name = adapter_name[0]
    layers = {name: layer for name, layer in layers.items() if adapter_name in layer.lora_A}
    if not layers:
        known = sorted({a for layer in lora_layers(model).values() for a in layer.lora_A})
        raise ValueError(f"no LoRA layer holds adapter {adapter_name!r}; adapters present: {known}")
    if target_modules is not None:
        layers = {name: layer for name, layer in layers.items() if matches(name, target_modules)}
        if not layers:
            raise ValueError(f"no LoRA layer of adapter {adapter_name!r} matches target_modules={target_modules!r}")
    for name, layer in layers.items():
        if linear_shape(layer.get_base_layer()) is None:
            raise ValueError(f"LoRA layer {name!r} wraps a {type(layer.get_base_layer()).__name__}; only linear layers are supported")
        if layer.use_dora.get(adapter_name, False):
            raise ValueError(f"LoRA layer {name!r} uses DoRA, which LoRA-DA does not initialise")
    return adapter_name, layers


def placed_like(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``value`` (the whole factor) in ``weight``'s dtype and device; for a DTensor weight (a
    model sharded with FSDP2) on its mesh and placements, each rank keeping its own part of the
    value every rank holds."""
    value = value.to(device=weight.device, dtype=weight.dtype)
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(weight, DTensor):
            return distribute_tensor(value, weight.device_mesh, weight.placements, src_data_rank=None)
    return value


def apply_factors(layers: Dict[str, nn.Module], factors: Dict[str, LoraFactors], adapter_name: str) -> None:
    """Write lora_A/lora_B of ``adapter_name`` in place, in each adapter's dtype, device and (FSDP2) sharding."""
    with torch.no_grad():
        for name, layer in layers.items():
            for weight, value in ((layer.lora_A[adapter_name].weight, factors[name].lora_A),
                                  (layer.lora_B[adapter_name].weight, factors[name].lora_B)):
                weight.copy_(placed_like(value, weight))


def _collect_without_adapters(peft_model: nn.Module, loader: Iterable, cfg: LoraDAConfig, loss_fn: Optional[Callable],
                              max_memory: Union[int, str, None], progress: bool) -> Statistics:
    """``collect_statistics`` on the PEFT model with its adapters disabled (the base model's gradients)."""
    disabled = peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext()
    with disabled:
        return collect_statistics(peft_model, loader, cfg, loss_fn, max_memory=max_memory, progress=progress)


def initialize(
    peft_model: nn.Module,
    loader: Optional[Iterable],
    cfg: Optional[LoraDAConfig] = None,
    adapter_name: Optional[str] = None,
    loss_fn: Optional[Callable] = None,
    *,
    statistics: Optional[Statistics] = None,
    max_memory: Union[int, str, None] = None,
    progress: bool = True,
    **overrides,
) -> InitReport:
    """Initialise a PEFT LoRA adapter with LoRA-DA from one pass over ``loader``.

    Each LoRA layer keeps its own rank (``rank_pattern`` honoured; ``cfg.rank`` is not used);
    targets are the adapter's LoRA layers, narrowed by ``cfg.target_modules`` when given. The
    base weights are not touched; statistics are taken with the adapters disabled.
    ``statistics`` (e.g. ``Statistics.load(path)``): solve from these instead of collecting
    (``loader`` may be None); they must cover exactly the targeted layers, with their shapes.
    ``max_memory``: the accumulators' budget (see ``collect_statistics``). Under torch.distributed
    every rank calls this with its loader and ends with the same adapter.
    """
    cfg = resolve_config(cfg, overrides)
    adapter_name, layers = _adapter_layers(peft_model, adapter_name, cfg.target_modules)
    ranks = {name: layer.r[adapter_name] for name, layer in layers.items()}
    shapes = {name: linear_shape(layer.get_base_layer()) for name, layer in layers.items()}
    check_ranks(shapes, ranks)
    if statistics is not None:
        statistics.check_matches(shapes)
    elif loader is None:
        raise ValueError("initialize needs a calibration loader or statistics=")
    device = execution_device(peft_model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = {}
    start = time.perf_counter()
    stats = statistics
    if stats is None:
        stats = _collect_without_adapters(peft_model, loader, cfg.replace(target_modules=tuple(layers)), loss_fn,
                                          max_memory, progress)
    seconds["collect"] = time.perf_counter() - start
    start = time.perf_counter()
    factors = solve(stats, cfg, ranks=ranks, device=device, progress=progress)
    seconds["solve"] = time.perf_counter() - start
    start = time.perf_counter()
    apply_factors(layers, factors, adapter_name)
    seconds["apply"] = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    notes = ([population_size_warning(stats.population_size, "the calibration data's size")]
             if cfg.population_size is None and stats.population_size_assumed else [])
    return InitReport(
        adapter_name=adapter_name,
        ranks=ranks,
        num_sequences=stats.num_sequences,
        num_tokens=stats.num_tokens,
        population_size=cfg.population_size or stats.population_size,
        seconds=seconds,
        statistics_bytes=stats.nbytes(),
        peak_memory_bytes=peak,
        solver=factors.report,
        passes=stats.passes,
        warnings=notes,
    )
