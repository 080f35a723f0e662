"""Where the solve's time goes on the main job's statistics, phase by phase, with the work counted:

    python benchmarks/solve_phases.py                      # 8, 64 and 128 calibration reviews
    python benchmarks/solve_phases.py --reviews 128 --rank 64
    python benchmarks/solve_phases.py --reviews 128 --normalize-variance-guidance   # plain, then with the option

Collects the statistics of SmolLM2-135M-Instruct (all 210 linear layers) on the main job's reviews
(batches of 8), then times one ``lora_da.solve`` at rank r with timers around its phases and
counts the floating-point work of each:

* input factors: Cholesky factor and inverse of Zd per distinct input (fp64, n^3 / 3 + 2 n^3 / 3),
  side by side on host threads;
* token space: the range finder and the s x s problems of inputs with fewer tokens than features;
* stacking: G and the inverses copied into the batches, in fp64 and fp32 (bytes, not flops);
* Omega' applies (4 n^2 c + 4 m n c per module and c columns), in fp32 (the working precision)
  and fp64 (refreshes and checks), inside the batched LOBPCG;
* sigma (one Delta and one Delta^T per step, fp64);
* with ``--normalize-variance-guidance``, the norms ||Delta^T Delta||_F (Delta formed once per
  module, 2 m n^2, and its smaller Gram, 2 m n min(m, n), fp64);
* the report's diagnostics: the randomized path's estimate of ||Delta||_F^2 (16 probe columns of
  Delta) and, per module, e(A), the captured share and the objective;
* the rest (lora_B = Delta V / sigma, the report) by subtraction, as the rest of LOBPCG
  (Rayleigh-Ritz, SVQB, small eigenproblems) is LOBPCG minus its applies.

The floor printed beside them is the input factors at the rate measured here for one input of
each width (the same LAPACK calls, side by side on the same threads) plus the products that form
Delta once per module (2 m n^2, fp64 at the measured matrix-product rate): the work any solve that
reads Zd^-1 and Delta must do. Writes solve_phases.json under $OUT (default ./outputs).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_da  # noqa: E402
from lora_da.embedded import Verbalizer, load_rotten_tomatoes, load_smollm2, split  # noqa: E402
from lora_da.eigensolver import on_host_threads  # noqa: E402

from lora_da import batched_solver, block_operator, input_factors, solver, token_space  # noqa: E402


def main_job_statistics(model, tokenizer, reviews: int) -> lora_da.Statistics:
    verbalizer = Verbalizer(tokenizer)
    (calibration,) = split(load_rotten_tomatoes(), [reviews])
    batches = [verbalizer.model_inputs(b) for b in verbalizer.batches(calibration, 8)]
    return lora_da.collect_statistics(model, batches, population_size=480, progress=False)


class Meter:
    """Seconds and flops per phase, from wrappers put around the solver's functions."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.flops = collections.defaultdict(float)
        self.patched = []

    def time(self, owner, name: str, phase: str, flops=None):
        """Time ``owner.name`` under ``phase`` ("{dtype}" in it: the first argument's, an operator's
        G or a tensor's), counting ``flops(*args)`` when given (before the call: the input factors'
        count reads which inverses are still to be made)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            first = getattr(args[0], "gradient", args[0])
            label = phase.format(dtype=str(getattr(first, "dtype", "")).replace("torch.", ""))
            if flops is not None:
                self.flops[label] += flops(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, name, timed)
        self.patched.append((owner, name, original))

    def restore(self):
        for owner, name, original in reversed(self.patched):
            setattr(owner, name, original)


def apply_flops(op, x) -> float:
    """4 n^2 c + 4 m n c for Omega' X on b modules (two products with Zd^-1, two with G)."""
    batch, m, n = op.gradient.shape
    return batch * (4 * n * n + 4 * m * n) * x.shape[2]


def gram_norm_flops(op) -> float:
    """2 m n^2 + 2 m n min(m, n) per module: Delta formed, and its smaller Gram."""
    batch, m, n = op.gradient.shape
    return batch * (2 * m * n * n + 2 * m * n * min(m, n))


def factor_flops(factors, keys) -> float:
    return sum(factors.stats.inputs[key].z_sum.shape[0] ** 3 for key in dict.fromkeys(keys)
               if key not in factors.inverses)


def measured_rates() -> dict:
    """GFLOP/s here of the input factors (Cholesky and inverse in fp64, two inputs side by side
    on host threads, as the solver runs them) at n = 576 and 1536, and of an fp64 product."""
    rates = {}
    for n in (576, 1536):
        inputs = []
        for _ in range(4):
            a = torch.randn(n, n + 64, dtype=torch.float64)
            inputs.append(a @ a.T / n)

        def factor(z):
            factor_ = torch.linalg.cholesky(z)
            torch.cholesky_inverse(factor_)

        on_host_threads(factor, inputs[:2])
        start = time.perf_counter()
        on_host_threads(factor, inputs)
        rates[f"input factors n={n}"] = 4 * n**3 / (time.perf_counter() - start) / 1e9
    a, b = torch.randn(1536, 576, dtype=torch.float64), torch.randn(576, 576, dtype=torch.float64)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    rates["fp64 product"] = 5 * 2 * 1536 * 576 * 576 / (time.perf_counter() - start) / 1e9
    return rates


def solve_with_phases(stats, rank: int, **options) -> dict:
    meter = Meter()
    meter.time(input_factors.InputFactors, "stacked_inverses", "input factors", factor_flops)
    meter.time(token_space, "token_space_subspaces", "token space")
    meter.time(batched_solver.RandomizedSolver, "operator", "stacking (includes input factors)")
    meter.time(batched_solver, "smallest_eigenvectors", "LOBPCG (includes its applies)")
    meter.time(block_operator.BlockOperator, "omega", "Omega' applies, {dtype}", apply_flops)
    meter.time(batched_solver, "top_singular_values", "sigma")
    meter.time(block_operator.BlockOperator, "gram_norms", "||Delta^T Delta||_F", gram_norm_flops)
    meter.time(batched_solver.RandomizedSolver, "delta_norm2", "diagnostics: ||Delta||_F^2 estimate")
    meter.time(solver, "diagnose", "diagnostics: e(A), share, objective")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            factors = lora_da.solve(stats, rank=rank, progress=False, **options)
            total = time.perf_counter() - start
    finally:
        meter.restore()
    seconds = dict(meter.seconds)
    seconds["rest"] = total - sum(seconds.get(k, 0.0) for k in ("token space", "stacking (includes input factors)",
                                                                 "LOBPCG (includes its applies)", "sigma",
                                                                 "||Delta^T Delta||_F",
                                                                 "diagnostics: ||Delta||_F^2 estimate",
                                                                 "diagnostics: e(A), share, objective"))
    return {"total": total, "seconds": seconds, "gflop": {k: v / 1e9 for k, v in meter.flops.items()},
            "report": {shape: shape_summary(entry) for shape, entry in factors.report.shapes.items()}}


def shape_summary(entry: lora_da.ShapeReport) -> dict:
    """A shape's solver, module count, convergence, largest iterations and residuals, the modules
    solved in the span of their tokens, and the median input energy and captured share."""
    figures = list(entry.diagnostics.values())
    medians = {f"median {key}": round(statistics.median(getattr(f, key) for f in figures), 4)
               for key in ("input_energy", "captured_share")} if figures else {}
    return {"solver": entry.solver, "modules": len(entry.modules), "converged": entry.converged,
            "iterations": entry.iterations, "residual": entry.residual, "sigma_iterations": entry.sigma_iterations,
            "sigma_change": entry.sigma_change, "token_space": len(entry.token_space), **medians}


def floor_seconds(stats, rates: dict) -> dict:
    """The input factors of every distinct input at the measured rates, and Delta = -diag(d) G Zd^-1
    formed once per module (2 m n^2 fp64)."""
    factor = sum(e.z_sum.shape[0] ** 3 / rates[f"input factors n={e.z_sum.shape[0]}"]
                 for e in stats.inputs.values()) / 1e9
    delta = sum(2 * m.g_sum.shape[0] * m.g_sum.shape[1] ** 2 for m in stats.modules.values())
    return {"input factors": factor, "Delta products": delta / 1e9 / rates["fp64 product"], "Delta GFLOP": delta / 1e9}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviews", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--normalize-variance-guidance", action="store_true",
                        help="solve each set of statistics a second time with normalize_variance_guidance")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    rates = measured_rates()
    print("measured: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()))
    records = {}
    for reviews in args.reviews:
        stats = main_job_statistics(model, tokenizer, reviews)
        variants = [{}] + ([{"normalize_variance_guidance": True}] if args.normalize_variance_guidance else [])
        for options in variants:
            run = solve_with_phases(stats, args.rank, **options)
            run["floor"] = floor_seconds(stats, rates)
            run["tokens"] = stats.num_tokens
            records[f"{reviews}" + "".join(f", {key}" for key in options)] = run
            print(f"\n{reviews} reviews ({stats.num_tokens} counted tokens), r = {args.rank}"
                  f"{''.join(f', {key}' for key in options)}: solve {run['total']:.2f} s; "
                  f"floor {run['floor']['input factors']:.2f} s input factors + {run['floor']['Delta products']:.2f} s "
                  f"Delta ({run['floor']['Delta GFLOP']:.0f} GFLOP)")
            for phase, seconds in sorted(run["seconds"].items(), key=lambda item: -item[1]):
                gflop = run["gflop"].get(phase)
                work = f"  {gflop:8.1f} GFLOP  {gflop / seconds:6.1f} GFLOP/s" if gflop else ""
                print(f"  {phase:<40} {seconds:7.2f} s{work}")
            for shape, info in run["report"].items():
                print(f"  {shape}: {info}")
    out = Path(os.environ.get("OUT", ROOT / "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "solve_phases.json").write_text(json.dumps({"args": vars(args), "rates": rates, "records": records},
                                                      indent=1))


if __name__ == "__main__":
    main()
