"""What collection will hold: the statistics' bytes per target, the passes a memory budget needs
(groups of whole blocks), the token chunks of the buffers, and the plan ``lora-da plan`` prints."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from . import dispatch
from .batches import execution_device
from .config import LoraDAConfig, resolve_config
from .targets import Target, find_targets


# token buffers take at most this fraction of the accumulators' bytes (a deterministic chunk:
# sums in fp32 depend on it), and no more than max_memory leaves (RESULTS.md, "Token buffering")
BUFFER_SHARE_OF_ACCUMULATORS = 0.125


@dataclass
class MemoryPlan:
    """What collection will hold, from the model's shapes alone (a model on the meta device will
    do): the passes' target groups and their token chunks, with bytes per pass (upper bounds:
    Z counted per module, where modules sharing an input hold one)."""

    groups: List[List[str]]  # per pass: the target names
    chunks: List[int]  # per pass: tokens per statistics op call
    accumulator_bytes: List[int]  # per pass: Z, G and y
    buffer_bytes: List[int]  # per pass: the token buffers at their chunk
    model_bytes: int  # the model's parameters and buffers (from their shapes: on the meta device too)
    budget: Optional[int]  # max_memory in bytes, None = unbounded
    z_summation: str = "float64"  # input_factor_dtype, with the dtype of Z's sums
    held_bytes: List[int] = field(default_factory=list)  # per pass: rows in host memory (``holds_rows``)

    @property
    def passes(self) -> int:
        return len(self.groups)

    @property
    def peak_bytes(self) -> int:
        """The model and the largest pass's accumulators and buffers on its device (one batch's
        activations come on top; finished passes wait in host memory)."""
        return self.model_bytes + max(a + b for a, b in zip(self.accumulator_bytes, self.buffer_bytes))

    def __str__(self) -> str:
        gib = 2**30
        budget = "unbounded" if self.budget is None else f"{self.budget / gib:.2f} GiB"
        lines = [f"LoRA-DA collection plan: {sum(map(len, self.groups))} modules in {self.passes} pass(es), "
                 f"max_memory {budget}; Z summed as {self.z_summation}"]
        for index, group in enumerate(self.groups):
            lines.append(f"  pass {index + 1}: {len(group)} modules ({group[0]} .. {group[-1]}), statistics "
                         f"{self.accumulator_bytes[index] / gib:.2f} GiB, buffers {self.buffer_bytes[index] / gib:.2f} GiB "
                         f"({self.chunks[index]} tokens per op call)")
        lines.append(f"  statistics {sum(self.accumulator_bytes) / gib:.2f} GiB in all; expected peak on the device "
                     f"{self.peak_bytes / gib:.2f} GiB (model {self.model_bytes / gib:.2f} GiB, plus one batch's "
                     "activations)")
        if any(self.held_bytes):
            lines.append(f"  rows held in host memory while an input has few tokens: up to "
                         f"{max(self.held_bytes) / gib:.2f} GiB (the largest pass)")
        return "\n".join(lines)


def z_dtype(cfg: LoraDAConfig, element: torch.dtype) -> torch.dtype:
    """The dtype of Z's sums for inputs whose statistics are summed in ``element``: fp64 unless
    ``input_factor_dtype`` is float32, then the wider of fp32 and ``element``."""
    wanted = torch.float32 if cfg.input_factor_dtype == "float32" else torch.float64
    return torch.promote_types(wanted, element)


# an input's counted rows are held, and summed as fp64 products, until they number this many times
# its features: with T <= n tokens Z is singular, and for T up to a few n so ill-conditioned that
# fp32 sums of its entries, even flushed into fp64 every few tokens, break the damping's hold on its
# smallest eigenvalues (RESULTS.md, "Input factor schemes")
HELD_ROWS_PER_FEATURE = 2


def kernel_sums_fp64(input_factor_dtype: str, backend: str, dtype: torch.dtype) -> bool:
    """Whether the ``backend`` kernel sums an fp64 Z of ``dtype`` inputs itself (``kernels.massive``,
    for inputs with over HELD_ROWS_PER_FEATURE * n counted tokens): for "mixed", any kernel on fp16
    or bf16 inputs, whose products fp32 holds exactly; for "auto", the Triton kernel only (the CUDA
    extension's GEMMs sum a whole call in fp32: RESULTS.md, "Input factor schemes"). Otherwise
    Z's products are fp64 through PyTorch."""
    if dtype == torch.float32 or backend == "torch":
        return False
    return input_factor_dtype == "mixed" or (input_factor_dtype == "auto" and backend == "triton")


def holds_rows(cfg: LoraDAConfig, device: torch.device, x_dtype: torch.dtype) -> bool:
    """Whether collection on ``device`` holds each input's counted rows of ``x_dtype`` in host
    memory until they outnumber HELD_ROWS_PER_FEATURE times its features
    (``Accumulators._hold_rows``)."""
    if z_dtype(cfg, torch.promote_types(torch.float32, x_dtype)) != torch.float64:
        return False
    try:
        backend = dispatch.resolve("fisher_update", cfg.backend, device, x_dtype).backend
    except RuntimeError:
        return False
    return kernel_sums_fp64(cfg.input_factor_dtype, backend, x_dtype)


def plan_memory(model: nn.Module, cfg: Optional[LoraDAConfig] = None, max_memory: Union[int, str, None] = None,
                targets: Optional[Dict[str, Target]] = None, device: Optional[torch.device] = None,
                **overrides) -> MemoryPlan:
    """The passes, chunks and bytes that ``collect_statistics(model, ..., max_memory=max_memory)``
    will use (``targets``: found from ``cfg.target_modules`` when not given) on ``device`` (default:
    the model's execution device). Only shapes and dtypes are read: build a model on the meta
    device to plan for one that fits nowhere here."""
    cfg = resolve_config(cfg, overrides)
    targets = find_targets(model, cfg.target_modules) if targets is None else targets
    param = next(model.parameters(), None)
    x_dtype = param.dtype if param is not None else torch.float32
    element = torch.promote_types(torch.float32, x_dtype)
    z_element = z_dtype(cfg, element)
    device = execution_device(model) if device is None else torch.device(device)
    budget = memory_budget(max_memory, device)
    groups = plan_groups(targets, element.itemsize, z_element.itemsize, budget)
    held = holds_rows(cfg, device, x_dtype)
    chunks, accumulators, buffers, held_bytes = [], [], [], []
    for group in groups:
        members = [targets[name] for name in group]
        accumulators.append(accumulator_bytes(members, element.itemsize, z_element.itemsize))
        # up to HELD_ROWS_PER_FEATURE * n rows of n elements per input (counted per module, as Z)
        held_bytes.append(sum(HELD_ROWS_PER_FEATURE * x_dtype.itemsize * t.in_features ** 2 for t in members)
                          if held else 0)
        left = int(accumulators[-1] * BUFFER_SHARE_OF_ACCUMULATORS)
        if budget is not None:
            left = min(left, budget - accumulators[-1])
        chunks.append(chunk_tokens(members, cfg.buffer_tokens, x_dtype.itemsize, left))
        buffers.append(chunks[-1] * buffer_token_bytes(members, x_dtype.itemsize))
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    summation = f"{cfg.input_factor_dtype} ({str(z_element).replace('torch.', '')} sums"
    summation += ", the kernels' fp32 tiles added into them every few tokens)" if held else ")"
    return MemoryPlan(groups, chunks, accumulators, buffers, model_bytes, budget, summation, held_bytes)


def memory_budget(max_memory: Union[int, str, None], device: torch.device) -> Optional[int]:
    """Bytes the accumulators may take: ``max_memory``, or for "auto" half the free memory of
    ``device`` (host memory for CPUs); None = unbounded."""
    if max_memory is None:
        return None
    if max_memory == "auto":
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return free // 2
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory <= 0:
        raise ValueError(f"max_memory must be a positive number of bytes or 'auto', got {max_memory!r}")
    return max_memory


def plan_groups(targets: Dict[str, Target], element_size: int, z_element_size: int,
                budget: Optional[int]) -> List[List[str]]:
    """Target names in model order, split into groups whose accumulators fit ``budget`` bytes.

    Modules under one parent (a layer's attention or MLP block) stay in one group, so inputs they
    share are seen together. The estimate is an upper bound: Z [n, n] (``z_element_size`` bytes
    each) counted for every module (shared inputs hold one), plus G [m, n] and y [m]
    (``element_size``); per-sequence sums are not counted.
    """
    blocks: Dict[str, List[str]] = {}
    for name in targets:
        blocks.setdefault(name.rpartition(".")[0], []).append(name)
    groups: List[List[str]] = []
    used = 0
    for names in blocks.values():
        need = accumulator_bytes([targets[name] for name in names], element_size, z_element_size)
        if budget is not None and need > budget:
            raise ValueError(f"max_memory={budget} bytes cannot hold the accumulators of {names} (up to {need} bytes)")
        if groups and (budget is None or used + need <= budget):
            groups[-1] += names
            used += need
        else:
            groups.append(list(names))
            used = need
    return groups


def accumulator_bytes(targets: List[Target], element_size: int, z_element_size: int) -> int:
    """Upper bound of the accumulators' bytes: Z [n, n] per module (shared inputs hold one) and
    G [m, n], y [m]."""
    return sum(z_element_size * t.in_features ** 2 + element_size * t.out_features * (t.in_features + 1)
               for t in targets)


def chunk_tokens(targets: List[Target], wanted: int, x_element_size: int, left: int) -> int:
    """Tokens per statistics op call for a pass over ``targets``: ``wanted`` (the config's
    ``buffer_tokens``), fewer where the buffers would not fit the ``left`` bytes. A buffered token
    takes n + m elements of the model's dtype per module (an upper bound: modules that share an
    input share its rows) and a flag; 0 runs each micro-batch at once."""
    return min(wanted, max(0, left) // buffer_token_bytes(targets, x_element_size))


def buffer_token_bytes(targets: List[Target], x_element_size: int) -> int:
    """Bytes one buffered token takes: n + m elements per module and a flag (an upper bound)."""
    return sum(x_element_size * (t.in_features + t.out_features) + 1 for t in targets)
