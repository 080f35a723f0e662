"""What summing Z in fp32 instead of fp64 costs in accuracy and saves in time, on the main job:

    python benchmarks/input_factor_precision.py              # 128 calibration reviews, as the main job
    python benchmarks/input_factor_precision.py --reviews 64

SmolLM2-135M-Instruct on Rotten Tomatoes reviews (batches of 8), every linear layer but the head.

1. Rounding noise: every distinct layer input's counted tokens are summed into Z three ways, batch
   by batch as collection does: fp32 products and sums, fp32 products added into fp64 sums, and
   fp64 throughout (the truth). Per input: ||Z||_2, the noise ||E||_2 / ||Z||_2 of the first two,
   the smallest eigenvalue of each, and whether Z + 1e-6 I (the authors' damping) is positive
   definite; then the rounding floor ``input_factors.rounding_floor`` puts on fp32 sums against the noise.
2. Collection time with ``input_factor_dtype`` float32 and float64, alternated in one process.
3. One batch's update of Z (243 tokens, the main job's batch) as one full product against the
   reference's upper-triangle panels (``reference.add_upper_gram``), in both dtypes.

Prints both and writes input_factor_precision.json under $OUT (default ./outputs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import lora_da  # noqa: E402
from lora_da.embedded import Verbalizer, load_rotten_tomatoes, load_smollm2, split  # noqa: E402
from lora_da.input_factors import rounding_floor  # noqa: E402
from lora_da.targets import find_targets  # noqa: E402

DAMPING = 1e-6


def main_job(reviews: int):
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    verbalizer = Verbalizer(tokenizer)
    (calibration,) = split(load_rotten_tomatoes(), [reviews])
    return model, [verbalizer.model_inputs(b) for b in verbalizer.batches(calibration, 8)]


def layer_inputs(model, batches) -> dict:
    """First reader's name -> [counted tokens of one batch, n] per batch, one entry per distinct
    input (the modules that read one tensor share it)."""
    rows, current = {}, {}
    handles = [t.module.register_forward_hook(lambda module, args, output, name=name: current.__setitem__(name, args[0]))
               for name, t in find_targets(model, None).items()]
    try:
        with torch.no_grad():
            for batch in batches:
                current.clear()
                model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
                mask = batch["attention_mask"].bool()
                first = {}
                for name, x in current.items():
                    if first.setdefault(id(x), name) == name:
                        rows.setdefault(name, []).append(x[mask].float())
    finally:
        for handle in handles:
            handle.remove()
    return rows


def noise(rows: list) -> dict:
    n = rows[0].shape[1]
    tokens = sum(r.shape[0] for r in rows)
    exact, single, mixed = (torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n), torch.zeros(n, n, dtype=torch.float64))
    for r in rows:
        exact += r.double().T @ r.double()
        single.addmm_(r.T, r)
        mixed += (r.T @ r).double()
    sums = {"fp64": exact, "fp32": single.double(), "fp32 products, fp64 sums": mixed}
    factors = {k: 0.5 * (v + v.T) / tokens for k, v in sums.items()}
    norm = float(torch.linalg.matrix_norm(factors["fp64"], 2))
    record = {"n": n, "tokens": tokens, "norm": norm}
    for kind, z in factors.items():
        record[f"{kind}: smallest eigenvalue"] = float(torch.linalg.eigvalsh(z)[0])
        if kind != "fp64":
            record[f"{kind}: noise / norm"] = float(torch.linalg.matrix_norm(z - factors["fp64"], 2)) / norm
    record["fp32 floor / noise"] = rounding_floor(factors["fp32"], tokens, torch.float32) / (
        record["fp32: noise / norm"] * norm)
    return record


def collection_seconds(model, batches, rounds: int) -> dict:
    lora_da.collect_statistics(model, batches[:2], progress=False)  # warm-up
    seconds = {"float32": [], "float64": []}
    for _ in range(rounds):
        for dtype in seconds:
            start = time.perf_counter()
            lora_da.collect_statistics(model, batches, input_factor_dtype=dtype, population_size=480, progress=False)
            seconds[dtype].append(time.perf_counter() - start)
    return seconds


def gram_update_ms(tokens: int = 243) -> dict:
    """Median ms of Z [n, n] += X^T X for X [tokens, n]: one full product against the panels."""
    from gpu_check import bench_ms
    from lora_da.kernels.reference import add_upper_gram

    def median_ms(fn):
        fn()  # warm-up
        return bench_ms(fn, "cpu")

    records = {}
    for n in (576, 1536):
        for dtype in (torch.float32, torch.float64):
            x, z, mask = torch.randn(tokens, n, dtype=dtype), torch.zeros(n, n, dtype=dtype), torch.ones(tokens)
            records[f"n={n} {dtype}"] = {"full": median_ms(lambda: z.addmm_(x.T, x)),
                                         "panels": median_ms(lambda: add_upper_gram(z, x, mask))}
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviews", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternated collections per dtype")
    args = parser.parse_args(argv)
    model, batches = main_job(args.reviews)
    records = {name: noise(rows) for name, rows in layer_inputs(model, batches).items()}
    for kind in ("fp32", "fp32 products, fp64 sums"):
        worst = max(r[f"{kind}: noise / norm"] for r in records.values())
        broken = [name for name, r in records.items() if r[f"{kind}: smallest eigenvalue"] + DAMPING <= 0]
        print(f"{kind:<25} largest noise ||E||_2 / ||Z||_2 {worst:.2e} ({worst / torch.finfo(torch.float32).eps:.2f} eps32); "
              f"Z + {DAMPING:g} I indefinite for {len(broken)} of {len(records)} inputs: {broken}")
    exact_broken = [name for name, r in records.items() if r["fp64: smallest eigenvalue"] + DAMPING <= 0]
    print(f"{'fp64':<25} Z + {DAMPING:g} I indefinite for {len(exact_broken)} inputs")
    print(f"rounding floor of the fp32 sums over their noise: smallest {min(r['fp32 floor / noise'] for r in records.values()):.1f}x")
    for name, r in records.items():
        if r["fp32: smallest eigenvalue"] + DAMPING <= 0:
            print(f"  {name}: n {r['n']}, T {r['tokens']}, ||Z||_2 {r['norm']:.3e}, smallest eigenvalue "
                  f"fp64 {r['fp64: smallest eigenvalue']:.2e}, fp32 {r['fp32: smallest eigenvalue']:.2e}")
    gram = gram_update_ms()
    for case, ms in gram.items():
        print(f"Z update, {case}: full product {ms['full']:.2f} ms, upper panels {ms['panels']:.2f} ms")
    seconds = collection_seconds(model, batches, args.rounds)
    print("collection seconds: " + "; ".join(f"Z summed in {k}: " + ", ".join(f"{s:.2f}" for s in v)
                                              for k, v in seconds.items()))
    out = Path(os.environ.get("OUT", ROOT / "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "input_factor_precision.json").write_text(json.dumps(
        {"args": vars(args), "inputs": records, "gram_update_ms": gram, "collection_seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
