"""Data-parallel LoRA-DA on torch.distributed (gloo on CPUs, NCCL on GPUs).

Every rank collects statistics over its shard of the calibration data; the sums and counts are
then reduced with ``all_reduce`` (one flat buffer per distinct input: Z with the G and y of the
modules that read it), so every rank holds the statistics of all the data (or, with
``shard_statistics``, reduced to one owner per input, so that each rank keeps its own). The
solve is split by module across ranks and each module's factors are broadcast from the rank that
solved it, so every rank ends with identical adapters. Nothing here runs unless a process group is
initialised with more than one rank.
"""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .report import SolveReport
from .statistics import Statistics


def world() -> Optional[Tuple[int, int]]:
    """(rank, world size) inside an initialised process group of two or more ranks, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Rank 0, or a single process (the one that shows progress bars)."""
    place = world()
    return place is None or place[0] == 0


def presharded(loader: Iterable) -> bool:
    """Whether ``loader`` draws through a DistributedSampler (each rank already sees its shard)."""
    from torch.utils.data.distributed import DistributedSampler

    samplers = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    return any(isinstance(s, DistributedSampler) for s in samplers)


def owns_batch(index: int, place: Tuple[int, int]) -> bool:
    """Batch ``index`` belongs to this rank when the library shards (round robin)."""
    rank, size = place
    return index % size == rank


def agree_on_failure(error: Optional[BaseException], device: torch.device, during: str = "collection") -> None:
    """Every rank calls this after its local work (``during``: what it was): if any rank failed,
    all raise (instead of the healthy ones waiting forever in the next collective), the failed
    rank with its own error."""
    flag = torch.tensor([0.0 if error is None else 1.0], device=device)
    torch.distributed.all_reduce(flag)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise RuntimeError(f"lora_da: {int(flag.item())} other rank(s) failed during {during}; see their errors")


def check_same_layout(stats: Statistics, device: torch.device) -> None:
    """ValueError on every rank unless every rank holds the same distinct inputs, each read by the
    same modules, with the same shapes and dtypes: checked before any reduction, which would
    otherwise pair unlike buffers, or wait forever for one that a rank does not have."""
    mine = {key: [list(entry.modules), list(entry.z_sum.shape), str(entry.z_sum.dtype),
                  {name: list(stats.modules[name].g_sum.shape) for name in entry.modules}]
            for key, entry in stats.inputs.items()}
    layouts = _gather_json(mine, device)
    differences = []
    for rank, layout in enumerate(layouts[1:], start=1):
        for key in sorted(layouts[0].keys() | layout.keys()):
            if layouts[0].get(key) != layout.get(key):
                differences.append(f"input {key}: rank 0 {layouts[0].get(key)}, rank {rank} {layout.get(key)}")
    if differences:
        shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
        raise ValueError("ranks collected different statistics (every rank needs the same model and targets, and "
                         f"batches that reach every targeted module): {shown}")


def merge_reports(report: SolveReport, device: torch.device) -> SolveReport:
    """The solver reports of every rank's share as one (``SolveReport.union``). ``device``: where
    the process group's collectives run."""
    return SolveReport.union([SolveReport.from_json(part) for part in _gather_json(report.to_json(), device)])


def reduce_statistics(stats: Statistics, to_owners: bool = False) -> None:
    """Sum every rank's sums and counts in place (per-sequence sums are gathered in rank order).

    ``to_owners``: each distinct input's sums, with those of the modules that read it, go to one
    rank only (``input_owners``), the others drop them, and ``stats.layout`` records where every
    module's sums are: no rank keeps the statistics of every module."""
    dist = torch.distributed
    rank, size = dist.get_rank(), dist.get_world_size()
    counts = torch.tensor([stats.num_sequences] + [e.num_tokens for e in stats.inputs.values()],
                          dtype=torch.float64, device=stats.device)
    dist.all_reduce(counts)
    stats.num_sequences = int(counts[0].item())
    for entry, total in zip(stats.inputs.values(), counts[1:].tolist()):
        entry.num_tokens = int(total)
    owners = input_owners(stats, size) if to_owners else {}
    layout = {}
    for key, entry in list(stats.inputs.items()):
        modules = [stats.modules[name] for name in entry.modules]
        tensors = [entry.z_sum] + [m.g_sum for m in modules] + [m.y_sum for m in modules]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if to_owners:
            dist.reduce(flat, dst=owners[key])
        else:
            dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()
        for module in modules:
            if module.sequence_sums is not None:
                module.sequence_sums = _gather_rows(module.sequence_sums)
        if to_owners:
            layout.update({name: [owners[key], *stats.modules[name].g_sum.shape] for name in entry.modules})
            if owners[key] != rank:
                for name in entry.modules:
                    del stats.modules[name]
                del stats.inputs[key]
    if to_owners:
        stats.layout = layout


def input_owners(stats: Statistics, size: int) -> Dict[str, int]:
    """Distinct input -> the rank that keeps its sums and those of its modules, and solves them:
    contiguous runs in model order of nearly equal bytes (Z and G). ValueError when there are
    fewer inputs than ranks (a rank would own nothing)."""
    if len(stats.inputs) < size:
        raise ValueError(f"shard_statistics: {len(stats.inputs)} distinct inputs cannot be shared by {size} ranks")
    weights = {key: entry.z_sum.numel() + sum(stats.modules[name].g_sum.numel() for name in entry.modules)
               for key, entry in stats.inputs.items()}
    total, before, owner, owners = sum(weights.values()), 0, 0, {}
    for index, (key, weight) in enumerate(weights.items()):
        by_bytes = int((before + weight / 2) * size // total)  # the rank its middle byte falls to
        # the next rank at most (none skipped), and the next at least when only as many inputs are left as ranks
        owner = owner if index == 0 else max(min(by_bytes, owner + 1), owner, size - (len(weights) - index))
        owners[key] = owner
        before += weight
    return owners


def _gather_json(value, device: torch.device) -> list:
    """Every rank's JSON-serialisable ``value``, in rank order (sent as UTF-8 bytes: no pickle)."""
    dist = torch.distributed
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=device)
    count = torch.tensor([data.numel()], device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    padded = torch.zeros(int(max(c.item() for c in counts)), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    blocks = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(blocks, padded)
    return [json.loads(bytes(block[: int(c.item())].cpu().tolist()).decode()) for block, c in zip(blocks, counts)]


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """All ranks' [K_rank, m] blocks stacked in rank order (K may differ between ranks)."""
    dist = torch.distributed
    size = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = rows.new_zeros((longest, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    blocks = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(blocks, padded)
    return torch.cat([block[: int(c.item())] for block, c in zip(blocks, counts)])


def module_owners(groups: List[List[str]], size: int) -> Dict[str, int]:
    """Module -> rank that solves it: each shape group split into contiguous, nearly equal runs,
    so ranks keep batches of one shape and the work is even."""
    owners = {}
    for names in groups:
        for index, name in enumerate(names):
            owners[name] = index * size // len(names)
    return owners


def broadcast_factors(factors: Dict[str, object], owners: Dict[str, int], shapes: Dict[str, Tuple[int, int, int]],
                      dtype: torch.dtype, device: torch.device, factor_type) -> Dict[str, object]:
    """Every module's factors on every rank: each comes from its owner. shapes: name -> (m, n, r)."""
    rank = torch.distributed.get_rank()
    out = {}
    for name, owner in owners.items():
        m, n, r = shapes[name]
        if owner == rank:
            a, b = factors[name].lora_A.contiguous(), factors[name].lora_B.contiguous()
        else:
            a = torch.empty(r, n, dtype=dtype, device=device)
            b = torch.empty(m, r, dtype=dtype, device=device)
        torch.distributed.broadcast(a, src=owner)
        torch.distributed.broadcast(b, src=owner)
        out[name] = factor_type(a, b)
    return out
