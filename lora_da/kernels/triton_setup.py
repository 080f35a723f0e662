"""What every Triton kernel module shares: interpreter detection, autotuning configs, the device guard."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Dict, Optional, Sequence

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(device: torch.device):
    """The context every launch runs in: ``device`` current (so that Triton launches on its
    stream, not on that of whichever GPU is current, e.g. cuda:0 for tensors on cuda:1)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def cpu_do_bench(fn, quantiles=None, **_):
    """Median wall time in ms (the autotuner's timer under the interpreter)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    return [median] * len(quantiles) if quantiles else median


def configs(gpu: Sequence[dict], interpret: dict):
    """Autotuning configs: ``gpu`` (block sizes plus ``warps`` and ``stages``) on a GPU. Under the
    interpreter, ``interpret`` (small tiles: fast on small problems) followed by the GPU's tile
    shapes, of which ``tile_prune`` keeps one per call."""
    if not INTERPRET:
        return [triton.Config({k: v for k, v in c.items() if k not in ("warps", "stages")}, num_warps=c["warps"],
                              num_stages=c["stages"]) for c in gpu]
    shapes = [interpret]
    for c in gpu:
        shape = {k: v for k, v in c.items() if k not in ("warps", "stages")}
        if shape not in shapes:
            shapes.append(shape)
    return [triton.Config(shape, num_warps=1) for shape in shapes]


def tile_prune(dims: Dict[str, str]) -> Optional[dict]:
    """``prune_configs_by`` for the interpreter (None on a GPU, where every config is timed): keep
    the GPU tile shape with the largest output tile of which the problem spans more than one
    along every dimension of ``dims`` (block size name -> the kernel argument it tiles), else the
    interpreter's own small tiles. So the tests run the GPU's tile logic, ragged tails included,
    wherever their problems are big enough, without timing every config under the interpreter."""
    if not INTERPRET:
        return None

    def area(config) -> int:
        product = 1
        for block in dims:
            product *= config.kwargs[block]
        return product

    def prune(configs, named_args, **_):
        spanned = [c for c in configs[1:] if all(c.kwargs[block] < named_args[size] for block, size in dims.items())]
        return [max(spanned, key=area)] if spanned else configs[:1]

    return {"early_config_prune": prune}


# Triton versions that time even a single pruned config need a timer that runs without a GPU
AUTOTUNE_EXTRA = {"do_bench": cpu_do_bench} if INTERPRET else {}
