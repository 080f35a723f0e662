"""What every Triton kernel module shares: interpreter detection and autotuning configs."""
from __future__ import annotations

import os
import statistics
import time
from typing import Sequence

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    if INTERPRET:
        return [triton.Config(interpret, num_warps=1)]
    return [triton.Config({k: v for k, v in c.items() if k not in ("warps", "stages")}, num_warps=c["warps"],
                          num_stages=c["stages"]) for c in gpu]


AUTOTUNE_EXTRA = {"do_bench": cpu_do_bench} if INTERPRET else {}
