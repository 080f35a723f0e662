"""Solver benchmark: exact path vs 10-iteration torch.lobpcg vs the batched randomized solver.

    python benchmarks/eigensolver.py                 # Llama-shaped, scaled to a CPU: hidden 1024, MLP 2752, 8 layers
    python benchmarks/eigensolver.py --llama-7b      # full Llama-2-7B shapes (4096, 11008, 32 layers), for a GPU
    python benchmarks/eigensolver.py --llama-7b --randomized-only   # the 224 modules, batched solver alone
    python benchmarks/eigensolver.py --smollm2       # real statistics: SmolLM2-135M, 4 layers, 64 reviews
    python benchmarks/eigensolver.py --eigh-threads  # one dense eigh on one CPU thread against all of them

Synthetic statistics with a Llama layer's structure (q/k/v share an input, gate/up share one, o and
down have their own; power-law spectra for Z and G). Times are wall-clock seconds of the whole
solve per module shape (Cholesky, natural gradient, sigma, subspace); accuracy is the sine of the
largest principal angle between each module's subspace and the exact fp64 one. Prints a table and
writes eigensolver.json under $OUT (default ./outputs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_da  # noqa: E402
from lora_da.input_factors import InputFactors  # noqa: E402
from lora_da.natural_gradient import natural_gradient  # noqa: E402
from lora_da.statistics import InputStatistics, ModuleStatistics, Statistics  # noqa: E402

TYPES = {  # module -> (input group, out features key, in features key)
    "self_attn.q_proj": ("attn_in", "hidden", "hidden"),
    "self_attn.k_proj": ("attn_in", "hidden", "hidden"),
    "self_attn.v_proj": ("attn_in", "hidden", "hidden"),
    "self_attn.o_proj": ("attn_out", "hidden", "hidden"),
    "mlp.gate_proj": ("mlp_in", "mlp", "hidden"),
    "mlp.up_proj": ("mlp_in", "mlp", "hidden"),
    "mlp.down_proj": ("mlp_out", "hidden", "mlp"),
}


TOKENS = 4096  # counted tokens the synthetic sums stand for (more than n: Z is of full rank)


def synthetic_statistics(hidden: int, mlp: int, layers: int, device: str, seed: int = 0,
                         dtype: torch.dtype = torch.float64) -> Statistics:
    """Llama-shaped statistics with decaying spectra, stored in ``dtype`` (collection gives fp32;
    the CPU benchmark keeps fp64, the Llama-2-7B shapes take fp32 to fit 48 GB instead of 96)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sizes = {"hidden": hidden, "mlp": mlp}
    bases = {n: torch.linalg.qr(torch.randn(n, n, generator=gen, device=device, dtype=torch.float64))[0]
             for n in set(sizes.values())}
    inputs, modules = {}, {}
    for layer in range(layers):
        keys = {}
        for module, (group, out_key, in_key) in TYPES.items():
            name = f"model.layers.{layer}.{module}"
            m, n = sizes[out_key], sizes[in_key]
            if group not in keys:
                keys[group] = name
                decay = torch.arange(1, n + 1, device=device, dtype=torch.float64) ** -(1.5 + 0.1 * layer)
                q = bases[n]
                inputs[name] = InputStatistics((), ((q * decay) @ q.T * TOKENS).to(dtype), TOKENS)
            g = torch.randn(m, n, generator=gen, device=device, dtype=torch.float64)
            g = g * torch.arange(1, n + 1, device=device, dtype=torch.float64) ** -0.5 * 1e-3
            y = torch.rand(m, generator=gen, device=device, dtype=torch.float64) * 1e-6 + 1e-8
            modules[name] = ModuleStatistics(keys[group], g.to(dtype), (y * TOKENS).to(dtype))
    for key in inputs:
        inputs[key].modules = tuple(n for n, s in modules.items() if s.input_key == key)
    return Statistics(modules, inputs, num_sequences=1, population_size=100_000, token_mask="attention",
                      output_fisher="diagonal")


def subspace(factors, gamma):
    return factors.lora_A.T.double() * math.sqrt(gamma)


def sine(u, v):
    """Sine of the largest principal angle between span(u) and span(v): ||(I - Q_u Q_u^T) Q_v||_2
    (stable where sqrt(1 - cos^2) is not: fp32 factors would read ~1e-4 there)."""
    qu, qv = torch.linalg.qr(u.double())[0], torch.linalg.qr(v.double())[0]
    return float(torch.linalg.matrix_norm(qv - qu @ (qu.T @ qv), ord=2))


def ba_error(factors, reference):
    """Relative Frobenius error of B A (basis-free; what the adapter starts from)."""
    want = reference.lora_B.double() @ reference.lora_A.double()
    return float((factors.lora_B.double() @ factors.lora_A.double() - want).norm() / want.norm())


def shape_of(stats, name):
    m, n = stats.modules[name].g_sum.shape
    return f"{m}x{n}"


def lobpcg_10(stats, cfg, names):
    """The authors' setting: explicit Omega per module, 10 torch.lobpcg iterations."""
    inputs = InputFactors(stats, cfg.damping, stats.device)
    out = {}
    gen = torch.Generator().manual_seed(cfg.seed)
    for name in names:
        key = stats.modules[name].input_key
        ng = natural_gradient(stats, name, inputs.cholesky(key), cfg)
        c = ng.variance_coefficient(cfg, stats.population_size)
        omega = -cfg.bias_weight * ng.delta_hat.T @ ng.delta_hat + c * inputs.inverse(key)
        x0 = torch.randn(omega.shape[0], cfg.rank, generator=gen, dtype=omega.dtype).to(omega.device)
        _, v = torch.lobpcg(omega, k=cfg.rank, X=x0, niter=10, largest=False)
        out[name] = v
    return out


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def smollm2_statistics(layers=(0, 10, 20, 29), reviews: int = 64) -> Statistics:
    """Statistics of the embedded default (SmolLM2-135M-Instruct, Rotten Tomatoes verbalizer)."""
    from lora_da.embedded import Verbalizer, load_rotten_tomatoes, load_smollm2, split

    model, tokenizer = load_smollm2()
    verbalizer = Verbalizer(tokenizer)
    (calibration,) = split(load_rotten_tomatoes(), [reviews])
    batches = [verbalizer.model_inputs(b) for b in verbalizer.batches(calibration, 8)]
    targets = [f"model.layers.{layer}.{module}" for layer in layers for module in TYPES]
    return lora_da.collect_statistics(model, batches, target_modules=targets, population_size=480, progress=False)


def run_randomized_only(stats, ranks, say, save, compare_small_eigh: bool = False):
    """All modules in one ``solve`` call per rank, twice (the first includes kernel compilation
    and allocator warm-up): wall seconds, iterations and largest final residual per shape;
    ``save(records)`` after each rank. ``compare_small_eigh``: one more warm solve with the small
    projected eigenproblems left on the GPU (``solver_small_eigh="device"``), side by side."""
    records = []
    for rank in ranks:
        cfg = lora_da.LoraDAConfig(rank=rank)
        row = {"rank": rank, "modules": len(stats.modules), "seconds": []}
        for _ in range(2):
            factors, seconds = timed(lambda: lora_da.solve(stats, cfg, solver="randomized", progress=False))
            report = factors.report
            row["seconds"].append(seconds)
        row["iterations"] = max(entry.iterations for entry in report.shapes.values())
        row["max_residual"] = max(entry.residual for entry in report.shapes.values())
        say(f"r={rank:<3} {len(stats.modules)} modules, randomized: {row['seconds'][0]:.2f} s cold, "
            f"{row['seconds'][1]:.2f} s warm, iterations <= {row['iterations']}, residual <= {row['max_residual']:.1e}")
        if compare_small_eigh:
            _, row["seconds_small_eigh_on_device"] = timed(lambda: lora_da.solve(
                stats, cfg, solver="randomized", solver_small_eigh="device", progress=False))
            say(f"r={rank:<3} small eigenproblems on the device instead of the host: "
                f"{row['seconds_small_eigh_on_device']:.2f} s warm")
        records.append(row)
        save(records)
    return records


def profile_randomized(stats, rank: int, path: Path) -> None:
    """One randomized solve at ``rank`` under torch.profiler: the operations that take the time,
    written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    cfg = lora_da.LoraDAConfig(rank=rank)
    with profile(activities=activities) as prof:
        timed(lambda: lora_da.solve(stats, cfg, solver="randomized", progress=False))
    keys = ["self_cpu_time_total"] + (["self_cuda_time_total"] if torch.cuda.is_available() else [])
    averages = prof.key_averages()
    path.write_text("\n".join(f"sorted by {key}:\n" + averages.table(sort_by=key, row_limit=25, max_name_column_width=60)
                              for key in keys))


def run(stats, ranks, with_lobpcg, say, save):
    shapes = sorted({shape_of(stats, n) for n in stats.modules})
    records = []
    for rank in ranks:
        cfg = lora_da.LoraDAConfig(rank=rank)
        row = {"rank": rank, "modules": len(stats.modules), "seconds": {}, "max_sine": {}, "per_shape": {}}
        by_shape = {s: [n for n in stats.modules if shape_of(stats, n) == s] for s in shapes}
        exact, randomized, lob = {}, {}, {}
        for s, names in by_shape.items():
            sub = Statistics({n: stats.modules[n] for n in names},
                             {stats.modules[n].input_key: stats.inputs[stats.modules[n].input_key] for n in names},
                             1, stats.population_size, "attention", "diagonal")
            f_exact, t_exact = timed(lambda: lora_da.solve(sub, cfg, solver="exact", progress=False))
            f_rand, t_rand = timed(lambda: lora_da.solve(sub, cfg, solver="randomized", progress=False))
            report = f_rand.report
            entry = {"exact_s": t_exact, "randomized_s": t_rand, "report": report.to_json()}
            if with_lobpcg:
                v_lob, t_lob = timed(lambda: lobpcg_10(sub, cfg, names))
                entry["lobpcg10_s"] = t_lob
                lob.update(v_lob)
            exact.update(f_exact)
            randomized.update(f_rand)
            row["per_shape"][s] = entry
            say(f"r={rank:<3} {s:>10} x{len(names):<3} exact {t_exact:7.2f} s   randomized {t_rand:6.2f} s"
                + (f"   lobpcg-10 {entry['lobpcg10_s']:6.2f} s" if with_lobpcg else "")
                + f"   iterations {max(v.iterations for v in report.shapes.values())}")
        row["seconds"]["exact"] = sum(e["exact_s"] for e in row["per_shape"].values())
        row["seconds"]["randomized"] = sum(e["randomized_s"] for e in row["per_shape"].values())
        row["max_sine"]["randomized"] = max(sine(subspace(exact[n], cfg.gamma), subspace(randomized[n], cfg.gamma))
                                            for n in stats.modules)
        row["max_ba_error"] = max(ba_error(randomized[n], exact[n]) for n in stats.modules)
        if with_lobpcg:
            row["seconds"]["lobpcg10"] = sum(e["lobpcg10_s"] for e in row["per_shape"].values())
            row["max_sine"]["lobpcg10"] = max(sine(subspace(exact[n], cfg.gamma), lob[n].double()) for n in stats.modules)
        say(f"r={rank}: total exact {row['seconds']['exact']:.2f} s, randomized {row['seconds']['randomized']:.2f} s "
            f"({row['seconds']['exact'] / row['seconds']['randomized']:.1f}x), max sine randomized "
            f"{row['max_sine']['randomized']:.1e}, max B·A error {row['max_ba_error']:.1e}"
            + (f"; lobpcg-10 {row['seconds']['lobpcg10']:.2f} s, max sine {row['max_sine']['lobpcg10']:.1e}"
               if with_lobpcg else ""))
        records.append(row)
        save(records)
    return records


def eigh_threads(sizes=(216, 512, 1024, 1536, 2048), rounds: int = 2) -> None:
    """Median of 3 fp64 eigh of one random symmetric n x n matrix on all of torch's threads and on
    one, in ``rounds`` alternating rounds (where ``eigensolver.SINGLE_THREAD_EIGH_MAX_N`` comes from)."""
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    try:
        for n in sizes:
            a = torch.randn(n, n, generator=gen, dtype=torch.float64)
            a = a + a.T
            times = {threads: [], 1: []}
            for _ in range(rounds):
                for count in times:
                    torch.set_num_threads(count)
                    torch.linalg.eigh(a)
                    times[count].append(sorted(timed(lambda: torch.linalg.eigh(a))[1] for _ in range(3))[1])
            print(f"n = {n:<5}" + "   ".join(f"{count} thread(s): " + ", ".join(f"{t:.3f} s" for t in seconds)
                                               for count, seconds in times.items()), flush=True)
    finally:
        torch.set_num_threads(threads)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-7b", action="store_true", help="hidden 4096, MLP 11008, 32 layers")
    parser.add_argument("--smollm2", action="store_true", help="real statistics of the embedded model instead")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=2752)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--no-lobpcg", action="store_true", help="skip the torch.lobpcg baseline")
    parser.add_argument("--randomized-only", action="store_true",
                        help="time the batched solver alone on all modules (no exact path, no accuracy)")
    parser.add_argument("--compare-small-eigh", action="store_true",
                        help="with --randomized-only: also time the small eigenproblems left on the GPU")
    parser.add_argument("--profile", action="store_true",
                        help="with --randomized-only: profile one more solve at the last rank (profile.txt)")
    parser.add_argument("--eigh-threads", action="store_true",
                        help="only time one dense eigh on one CPU thread against all of them, n = 216 to 2048")
    args = parser.parse_args(argv)
    if args.eigh_threads:
        eigh_threads()
        return
    if args.llama_7b:
        args.hidden, args.mlp, args.layers = 4096, 11008, 32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(os.environ.get("OUT", ROOT / "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def say(line):
        print(line, flush=True)
        lines.append(line)

    if args.smollm2:
        stats = smollm2_statistics()
        say(f"device cpu, torch {torch.__version__}, threads {torch.get_num_threads()}, SmolLM2-135M statistics, "
            f"{len(stats.modules)} modules")
    else:
        stats = synthetic_statistics(args.hidden, args.mlp, args.layers, device,
                                     dtype=torch.float32 if args.llama_7b else torch.float64)
        say(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, hidden {args.hidden}, "
            f"mlp {args.mlp}, layers {args.layers}")

    def save(records):  # after each rank, so that a run cut short keeps what it measured
        (out / "eigensolver.json").write_text(json.dumps({"args": vars(args), "device": device, "records": records,
                                                          "log": lines}, indent=1))

    if args.randomized_only:
        run_randomized_only(stats, args.ranks, say, save, args.compare_small_eigh)
        if args.profile:
            profile_randomized(stats, args.ranks[-1], out / "profile.txt")
    else:
        run(stats, args.ranks, not args.no_lobpcg, say, save)


if __name__ == "__main__":
    main()
