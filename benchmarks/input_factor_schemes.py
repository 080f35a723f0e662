"""Ways a GPU kernel can sum Z from bf16 activations, their arithmetic emulated on CPU and
measured against fp64 sums of the same activations:

    python benchmarks/input_factor_schemes.py                   # the main job's 128 reviews, SmolLM2 in bf16
    python benchmarks/input_factor_schemes.py --call-tokens 0   # one batch per call (buffer_tokens=0)
    python benchmarks/input_factor_schemes.py --schemes "fp32 per tile,(b),fp64, tile" --solvers auto,exact

SmolLM2-135M-Instruct cast to bf16, the main job's calibration reviews in batches of 8, every
distinct input of every linear layer but the head, its counted tokens in calls of the collector's
``buffer_tokens`` (4096; 0: one batch of 8 reviews per call, as collection without buffering) as the
kernels see them. Products of bf16 values are exact in fp32; the
schemes differ in how they are summed. ``tile`` is the kernels' BLOCK_T = 64 tokens: one
tensor-core product of a tile, summed in fp32 inside the instruction.
  fp32 (the kernels before)    tile products added into an fp32 accumulator per call, that into fp32 Z
  fp32 per call, fp64 Z        the same accumulator added into fp64 Z at the end of each call
  fp32 per tile, fp64          every tile product added into fp64 (fp64 registers)
  (a) int8 slices (Ozaki)      each feature scaled by a power of two and split into 3 int8 slices
                               (21 bits under the call's largest |x|), the 6 slice products of weight
                               2^-7k, k <= 2, summed exactly in int32, then into fp64 Z
  (b) massive features in fp64 the features whose largest |x| in a call is over MASSIVE times the
                               median feature's: their rows and columns as fp64 products and sums,
                               the rest as "fp32 per call, fp64 Z" (the chosen scheme,
                               ``lora_da.kernels.massive``)
  (c) flagged inputs in fp64   inputs with such a feature summed in fp64 whole, the rest per call
  (d) compensated pair         tile products added into an (hi, lo) fp32 pair with TwoSum, hi + lo
                               into fp64 Z at the end of each call
  (e) massive features in fp64, (b)'s massive rows and columns, every other tile product added
      the rest per tile        into fp64 ("fp32 per tile, fp64")
  (f) (e), flushed every 256    (e) with four tile products summed in fp32 before each fp64 addition
      tokens                   (a quarter of the fp64 additions: consumer GPUs' fp64 units are slow)
  (g) (e), fp64 where T <= 2n  the default (``input_factor_dtype="auto"`` with the Triton kernel):
                               an input with at most HELD_ROWS_PER_FEATURE tokens per feature in
                               fp64 (its rows held), the others as (e)
  fp64, tile order             fp64 products of each tile added into fp64 Z: fp64 sums in another
                               order (as a tiled GPU kernel sums), the solve's own sensitivity
Per scheme: the largest ||E||_2 / ||Z||_2 over the inputs, the inputs whose Z / T + 1e-6 I is not
positive definite, the modules the solve damps above 1e-6 (fp32 sums: at their rounding floor;
the other schemes' sums are marked as the kernels' fp32 tile sums, which the solve damps at
fp32's floor where 1e-6 leaves them indefinite), the largest relative B A difference from the
solve of fp64 sums over the 210 modules (each scheme's sums and the fp64 sums solved by the same
solver, ``--solvers``: "auto" is the library's default, "exact" takes the randomized solver's own
tolerance out), and the counted cost of summing Z relative to the
plain bf16 kernel at published peak rates (counts, not timings). Writes
input_factor_schemes_<call tokens>.json under $OUT (default ./outputs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import lora_da  # noqa: E402
from input_factor_precision import layer_inputs, main_job  # noqa: E402
from lora_da.kernels.massive import MASSIVE, add_massive_columns, massive_features, without_features  # noqa: E402
from lora_da.memory import HELD_ROWS_PER_FEATURE  # noqa: E402
from lora_da.statistics import Z_FP32_TILES  # noqa: E402

DAMPING = 1e-6
TILE = 64  # tokens per tensor-core product (the Triton kernel's BLOCK_T)
FLUSH_EVERY = 256  # tokens summed in fp32 before each fp64 addition in scheme (f)
SLICES, SLICE_BITS = 3, 7
# published dense peak rates, TFLOP/s (TOP/s for int8): bf16 tensor cores with fp32 accumulation,
# int8 tensor cores with int32 accumulation, fp32 and fp64 units (the H100's fp64 tensor cores)
RATES = {"H100 SXM": {"bf16": 989.4, "int8": 1978.9, "fp32": 66.9, "fp64": 66.9},
         "RTX 4090": {"bf16": 165.2, "int8": 660.6, "fp32": 82.6, "fp64": 1.29}}
SCHEMES = ("fp32 (the kernels before)", "fp32 per call, fp64 Z", "fp32 per tile, fp64", "(a) int8 slices (Ozaki)",
           "(b) massive features in fp64", "(c) flagged inputs in fp64", "(d) compensated pair",
           "(e) massive features in fp64, the rest per tile", "(f) (e), flushed every 256 tokens",
           "(g) (e), fp64 where T <= 2n", "fp64, tile order", "fp64")
PER_TILE, FLUSHED, HELD = SCHEMES[7:10]


def tile_products(x: torch.Tensor):
    """The fp32 products X_tile^T X_tile [n, n] of x [t, n]'s tiles of TILE tokens."""
    for start in range(0, len(x), TILE):
        tile = x[start:start + TILE]
        yield tile.T @ tile


def two_sum(hi: torch.Tensor, lo: torch.Tensor, value: torch.Tensor) -> None:
    """(hi, lo) += value in fp32, lo carrying each addition's rounding error (Knuth's TwoSum)."""
    total = hi + value
    virtual = total - hi
    lo += (hi - (total - virtual)) + (value - virtual)
    hi.copy_(total)


def int8_slices(x: torch.Tensor) -> tuple:
    """(slices [SLICES, t, n] of integers in [-127, 127] held in fp64, per-feature scale [n]):
    x ~ scale * sum_k slices[k] 2^(-SLICE_BITS k), the scale a power of two over the call's largest |x|."""
    top = x.abs().amax(dim=0).double().clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.exp2(torch.ceil(torch.log2(top / 127)))
    rest, slices = x.double() / scale, []
    for k in range(SLICES):
        q = torch.round(rest * 2 ** (SLICE_BITS * k)).clamp(-127, 127)
        slices.append(q)
        rest = rest - q / 2 ** (SLICE_BITS * k)
    return torch.stack(slices), scale


def add_tile_sums(out: dict, x: torch.Tensor, schemes: set) -> None:
    """Add one call's tile products of x [t, n] into ``out``'s Z of the ``schemes`` that sum them
    in fp32 per call, per tile into fp64, or in a compensated (hi, lo) pair."""
    n = x.shape[1]
    acc, hi, lo = torch.zeros(n, n), torch.zeros(n, n), torch.zeros(n, n)
    pairs, tiles = "(d) compensated pair" in schemes, "fp32 per tile, fp64" in schemes
    for product in tile_products(x):
        acc += product
        if tiles:
            out["fp32 per tile, fp64"] += product.double()
        if pairs:
            two_sum(hi, lo, product)
    if "fp32 per call, fp64 Z" in schemes:
        out["fp32 per call, fp64 Z"] += acc.double()
    if "fp32 (the kernels before)" in schemes:
        out["fp32 (the kernels before)"] += acc
    if pairs:
        out["(d) compensated pair"] += hi.double() + lo.double()


def add_split_tiles(z: torch.Tensor, x: torch.Tensor, massive: torch.Tensor, flush: int) -> None:
    """z [n, n] (fp64) += (e)'s sums of x [t, n]: the ``massive`` features' rows and columns in
    fp64, every other entry as tile products summed in fp32 over ``flush`` tokens, then into z."""
    n = x.shape[1]
    acc = torch.zeros(n, n)
    for i, product in enumerate(tile_products(without_features(x, massive)), start=1):
        acc += product
        if i % (flush // TILE) == 0:
            z += acc.double()
            acc.zero_()
    z += acc.double()
    add_massive_columns(z, x, torch.ones(len(x)), massive)


def sums(calls: list, schemes: tuple) -> dict:
    """Scheme -> what it sums as Z [n, n] (fp64; fp32 for the fp32 accumulator) over the calls'
    counted rows [t, n] (bf16 values held in fp32), for ``schemes`` and "fp64", and "massive": the
    features (b) takes."""
    n = calls[0].shape[1]
    wanted = (set(schemes) | {"fp64"} | ({"fp32 per call, fp64 Z"} if "(c) flagged inputs in fp64" in schemes else set())
              | ({PER_TILE} if HELD in schemes else set()))
    per_call = wanted & {"fp32 (the kernels before)", "fp32 per call, fp64 Z", "fp32 per tile, fp64",
                         "(d) compensated pair"}
    out = {s: torch.zeros(n, n, dtype=torch.float32 if s.startswith("fp32 (") else torch.float64) for s in wanted}
    flagged = torch.zeros(n, dtype=torch.bool)
    for x in calls:
        wide = x.double()
        out["fp64"] += wide.T @ wide
        if "fp64, tile order" in wanted:
            for start in range(0, len(x), TILE):
                out["fp64, tile order"] += wide[start:start + TILE].T @ wide[start:start + TILE]
        if per_call:
            add_tile_sums(out, x, per_call)
        if "(a) int8 slices (Ozaki)" in wanted:
            slices, scale = int8_slices(x)
            exact = torch.zeros(n, n, dtype=torch.float64)
            for a in range(SLICES):
                for b in range(a, SLICES - a):  # (b, a) is the transpose of (a, b)
                    product = 2.0 ** (-SLICE_BITS * (a + b)) * (slices[a].T @ slices[b])
                    exact += product if a == b else product + product.T
            out["(a) int8 slices (Ozaki)"] += scale[:, None] * exact * scale[None, :]
        massive = massive_features(x)
        flagged[massive] = True
        if "(b) massive features in fp64" in wanted:
            acc = sum(tile_products(without_features(x, massive)), torch.zeros(n, n))
            out["(b) massive features in fp64"] += acc.double()
            add_massive_columns(out["(b) massive features in fp64"], x, torch.ones(len(x)), massive)
        if PER_TILE in wanted:
            add_split_tiles(out[PER_TILE], x, massive, TILE)
        if FLUSHED in wanted:
            add_split_tiles(out[FLUSHED], x, massive, FLUSH_EVERY)
    if HELD in wanted:
        out[HELD] = out["fp64"] if sum(len(x) for x in calls) <= HELD_ROWS_PER_FEATURE * n else out[PER_TILE]
    if "(c) flagged inputs in fp64" in wanted:
        out["(c) flagged inputs in fp64"] = out["fp64"] if bool(flagged.any()) else out["fp32 per call, fp64 Z"]
    out["massive"] = flagged.nonzero().flatten()
    return out


def counted_seconds(shapes: list, scheme: str, rates: dict) -> float:
    """Seconds at peak rates of one scheme's Z over ``shapes`` [(n, T, calls, massive count)]:
    products on the upper triangle (n^2 T / 2 multiply-adds), additions into Z or registers."""
    seconds = 0.0
    for n, tokens, calls, massive in shapes:
        products = n * n * tokens  # flops of the upper-triangular products
        bf16 = products / rates["bf16"]
        flush = n * n / 2 * calls / rates["fp64"]
        massive_columns = 2 * n * massive * tokens / rates["fp64"]
        per_tile = bf16 + n * n / 2 * tokens / TILE / rates["fp64"] + massive_columns
        seconds += {
            "fp32 (the kernels before)": bf16,
            "fp32 per call, fp64 Z": bf16 + flush,
            "fp32 per tile, fp64": bf16 + n * n / 2 * tokens / TILE / rates["fp64"],
            "(a) int8 slices (Ozaki)": 6 * products / rates["int8"] + flush,
            "(b) massive features in fp64": bf16 + flush + massive_columns,
            PER_TILE: per_tile,
            FLUSHED: bf16 + n * n / 2 * tokens / FLUSH_EVERY / rates["fp64"] + massive_columns,
            HELD: products / rates["fp64"] if tokens <= HELD_ROWS_PER_FEATURE * n else per_tile,
            "(c) flagged inputs in fp64": products / rates["fp64"] if massive else bf16 + flush,
            "(d) compensated pair": bf16 + 4 * n * n / 2 * tokens / TILE / rates["fp32"] + flush,
            "fp64, tile order": products / rates["fp64"],
            "fp64": products / rates["fp64"],
        }[scheme]
    return seconds / 1e12


def spectral_norm(z: torch.Tensor) -> float:
    """||z||_2 of a symmetric z."""
    return float(torch.linalg.eigvalsh(z).abs().max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviews", type=int, default=128)
    parser.add_argument("--call-tokens", type=int, default=4096, help="tokens per kernel call; 0: one batch")
    parser.add_argument("--schemes", default="", help="comma-separated prefixes of the schemes to sum (default all)")
    parser.add_argument("--solvers", default="auto", help="comma-separated LoraDAConfig.solver values to solve with")
    args = parser.parse_args(argv)
    prefixes = [p.strip() for p in args.schemes.split(",") if p.strip()]
    schemes = tuple(s for s in SCHEMES if not prefixes or s == "fp64" or any(s.startswith(p) for p in prefixes))
    start = time.perf_counter()
    model, batches = main_job(args.reviews)
    model = model.to(torch.bfloat16)
    truth = lora_da.collect_statistics(model, batches, population_size=480, progress=False)  # Z: fp64 sums
    per_input, found = {}, {}
    for key, rows in layer_inputs(model, batches).items():
        x = torch.cat(rows)
        calls = list(x.split(args.call_tokens)) if args.call_tokens else rows
        summed = sums(calls, schemes)
        massive = summed.pop("massive")
        tokens = len(x)
        assert tokens == truth.inputs[key].num_tokens, key
        exact = summed["fp64"] / tokens
        norm = spectral_norm(exact)
        record = {"n": x.shape[1], "tokens": tokens, "calls": len(calls), "massive": massive.tolist(), "norm": norm}
        for scheme in schemes:
            z = summed[scheme].double() / tokens
            record[scheme] = {"error": spectral_norm(z - exact) / norm,
                              "smallest eigenvalue": float(torch.linalg.eigvalsh(z)[0])}
        per_input[key], found[key] = record, summed
    shapes = [(r["n"], r["tokens"], r["calls"], len(r["massive"])) for r in per_input.values()]
    out = Path(os.environ.get("OUT", ROOT / "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"input_factor_schemes_{args.call_tokens}.json"
    path.write_text(json.dumps({"args": vars(args), "inputs": per_input}, indent=1))  # kept should a solve fail
    tables = {solver: scheme_table(truth, found, per_input, shapes, schemes, solver)
              for solver in args.solvers.split(",")}
    flagged = {k: r["massive"] for k, r in per_input.items() if r["massive"]}
    print(f"{len(per_input)} inputs, {shapes[0][1]} tokens each, in {shapes[0][2]} call(s) of at most "
          f"{args.call_tokens or 'one batch'}; {len(flagged)} with massive "
          f"features (largest |x| over {MASSIVE}x the median feature's): {flagged}")
    for key, r in per_input.items():
        if r.get("fp32 (the kernels before)", r["fp64"])["smallest eigenvalue"] + DAMPING <= 0:
            print(f"  {key}: ||Z||_2 {r['norm']:.3g}, smallest eigenvalue fp64 {r['fp64']['smallest eigenvalue']:.3g}")
    for solver, table in tables.items():
        print(f"solver={solver}")
        print("| scheme | largest ||E||_2 / ||Z||_2 (eps32) | Z / T + 1e-6 I indefinite | modules damped above 1e-6 "
              "(largest damping) | largest B A difference (module) | counted cost, H100 | counted cost, RTX 4090 |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for scheme, row in table.items():
            module, largest = next(iter(row["largest B A differences by module"].items()))
            print(f"| {scheme} | {row['largest error / eps32']:.3g} | {len(row['indefinite at 1e-6'])} | "
                  f"{row['modules damped above 1e-6']} ({row['largest damping']:.2g}) | "
                  f"{largest:.2e} ({module}) | {row['counted cost, H100 SXM']:.2f} | "
                  f"{row['counted cost, RTX 4090']:.2f} |")
    print(f"{time.perf_counter() - start:.0f} s")
    path.write_text(json.dumps({"args": vars(args), "inputs": per_input, "tables": tables}, indent=1, default=str))


def scheme_table(truth, found: dict, per_input: dict, shapes: list, schemes: tuple, solver: str) -> dict:
    """Scheme -> its figures, each scheme's sums solved with ``solver`` against the fp64 sums' solve."""
    cfg = lora_da.LoraDAConfig(population_size=480, solver=solver)
    want = lora_da.solve(truth, cfg, progress=False)
    want_ba = {name: f.lora_B.double() @ f.lora_A.double() for name, f in want.items()}
    table = {}
    for scheme in schemes:
        stats = truth.to("cpu")
        for key in found:
            stats.inputs[key].z_sum = found[key][scheme]
        # as kernel sums are marked
        stats.config[Z_FP32_TILES] = scheme not in ("fp64", "fp64, tile order", "fp32 (the kernels before)")
        with warnings.catch_warnings(record=True):  # the inputs damped at fp32's floor: counted below
            got = lora_da.solve(stats, cfg, progress=False)
        differences = {name: float((g.lora_B.double() @ g.lora_A.double() - want_ba[name]).norm()
                                   / want_ba[name].norm()) for name, g in got.items()}
        dampings = {name: d for info in got.report.shapes.values() for name, d in info.dampings.items()}
        eps32 = torch.finfo(torch.float32).eps
        table[scheme] = {
            "largest error / eps32": max(r[scheme]["error"] for r in per_input.values()) / eps32,
            "indefinite at 1e-6": [k for k, r in per_input.items() if r[scheme]["smallest eigenvalue"] + DAMPING <= 0],
            "largest damping": max(dampings.values()),
            "modules damped above 1e-6": sum(d > DAMPING for d in dampings.values()),
            "largest B A difference": max(differences.values()),
            "modules over 1e-3": sum(d > 1e-3 for d in differences.values()),
            "largest B A differences by module": dict(sorted(differences.items(), key=lambda item: -item[1])[:5]),
            **{f"counted cost, {gpu}": counted_seconds(shapes, scheme, rates)
               / counted_seconds(shapes, "fp32 (the kernels before)", rates) for gpu, rates in RATES.items()}}
    return table


if __name__ == "__main__":
    main()
