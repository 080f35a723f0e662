"""When the solve moves to the span of an input's tokens: the path ``token_space_pays`` chooses
against the other one, timed side by side in one process, for an input of n = 1024 features read
by one 1024 x 1024 module, from T counted tokens (Z of rank T, G in the span of the tokens, fp64).

    OMP_NUM_THREADS=2 python benchmarks/token_space.py [--tokens 100 400 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import lora_da
from lora_da.statistics import InputStatistics, ModuleStatistics, Statistics

N = M = 1024


def synthetic(tokens: int, seed: int = 0) -> Statistics:
    """Sums of T random tokens x [T, n] with gradients g [T, m]: Z = x^T x, G = g^T x, y = sum g^2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, N, generator=gen, dtype=torch.float64)
    g = torch.randn(tokens, M, generator=gen, dtype=torch.float64) * 1e-3
    name = "layer.proj"
    return Statistics({name: ModuleStatistics(name, g.T @ x, g.square().sum(0))},
                      {name: InputStatistics((name,), x.T @ x, tokens)}, num_sequences=tokens,
                      population_size=100_000, token_mask="attention", output_fisher="diagonal")


def timed(stats: Statistics, span: bool | None, repeats: int) -> tuple:
    """(median seconds, whether the span was taken) of ``solve``: as chosen (None) or forced."""
    module = sys.modules["lora_da.token_space"]
    chosen = module.token_space_pays
    if span is not None:
        module.token_space_pays = lambda *args: span
    try:
        times, report = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            report = lora_da.solve(stats, rank=8, progress=False).report
            times.append(time.perf_counter() - start)
    finally:
        module.token_space_pays = chosen
    return statistics.median(times), any(info.token_space for info in report.shapes.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[100, 400, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"n = m = {N}, rank 8, fp64, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print("| T | chosen | span s | full solve s | span / full |")
    print("| --- | --- | --- | --- | --- |")
    for tokens in args.tokens:
        stats = synthetic(tokens)
        auto, took_span = timed(stats, None, args.repeats)
        span, _ = timed(stats, True, args.repeats)
        full, _ = timed(stats, False, args.repeats)
        print(f"| {tokens} | {'span' if took_span else 'full'} ({auto:.2f} s) | {span:.2f} | {full:.2f} | {span / full:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
