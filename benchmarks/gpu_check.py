"""GPU check, one command: build the CUDA extension, run the GPU tests, benchmark the statistics op
and the batched solver.

    python benchmarks/gpu_check.py [--quick] [--skip-build] [--skip-tests] [--skip-solver]

Benchmarks ``fisher_update`` at Llama-2-7B layer shapes (n = 4096, 11008; m = 4096, 11008;
T = 2048..16384 tokens; 0% and 30% of tokens masked; bf16 inputs) for every kernel backend (as
called with a mask, and ``_compacted``: counted tokens first, as the token buffers pass them) against
the best plain-PyTorch paths: fp32 ``addmm_`` and a bf16 matmul with fp32 output then add (their
inputs cast and masked beforehand, outside the timing), and against Z summed in fp64 as
``input_factor_dtype="float64"`` sums it (``torch_fp64_z``: fp64 products through PyTorch). Each
kernel backend is also timed as ``input_factor_dtype="mixed"`` runs it, and the default ``"auto"``
with the Triton kernel (``_mixed_compacted``: Z in fp64, the Triton kernel's fp32 tile sums added
into fp64 registers every ``massive.flush_tokens`` tokens, the CUDA extension's every call, the
massive features' rows and columns in fp64; the inputs carry two massive features, as SmolLM2's
and Llama's down_proj inputs do). TFLOP/s count
useful work only: the triangle of Z (n^2 T_counted) and 2 m n T for G. Everything goes to $OUT (default ./outputs):
gpu_check.json (all figures), gpu_check.txt (this printout), gpu_tests.txt (pytest output),
eigensolver.json/.txt (the solver: all 224 Llama-2-7B-shaped modules at r = 8 and 64, target <= 5 s,
and once more with the small projected eigenproblems on the GPU instead of the host),
profile.txt (torch.profiler tables of one more solve at r = 64) and end_to_end.json/.txt (a
Llama-2-7B-shaped model initialised end to end: ``benchmarks/end_to_end.py``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS_TIMEOUT_S = 200


class Tee:
    def __init__(self, path: Path):
        self.file = path.open("w")

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def build(say) -> dict:
    started = time.perf_counter()
    env = {**os.environ, "LORA_DA_REQUIRE_CUDA": "1"}
    if Path("/usr/bin/g++").exists():
        # the system compiler: one CUDA image's CXX wrapper (/opt/gcc/bin/g++) built an extension
        # that crashed formatting its own error messages (a second libstdc++ in the library)
        env.update(CC="/usr/bin/gcc", CXX="/usr/bin/g++", LDSHARED="/usr/bin/g++ -shared")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    say(f"build: exit {proc.returncode} in {seconds:.0f} s")
    if proc.returncode != 0:
        say(proc.stdout[-3000:], proc.stderr[-3000:])
    return {"returncode": proc.returncode, "seconds": seconds}


def run_tests(out: Path, say) -> dict:
    started = time.perf_counter()
    # the embedded model and data packages are not on GPU images: their tests run in CI
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests",
           "--ignore=tests/test_embedded.py"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]  # two threads per worker
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S,
                              env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired as expired:
        (out / "gpu_tests.txt").write_text(f"{expired.stdout or ''}{expired.stderr or ''}")
        say(f"tests: stopped after {TESTS_TIMEOUT_S} s")
        return {"returncode": None, "summary": "timed out", "command": " ".join(cmd[1:])}
    (out / "gpu_tests.txt").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    say(f"tests: exit {proc.returncode} in {time.perf_counter() - started:.0f} s: {summary}")
    return {"returncode": proc.returncode, "summary": summary, "command": " ".join(cmd[1:])}


def bench_ms(fn, device: str) -> float:
    """Median milliseconds of fn (triton's do_bench on GPU, a wall-clock median on CPU)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=60))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[2]


def bf16_peak(say, device: str, size: int) -> float:
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ a, device)
    peak = 2 * size**3 / ms / 1e9
    say(f"measured bf16 matmul peak ({size}^3): {peak:.1f} TFLOP/s")
    return peak


def mm_fp32_out(a, b):
    import torch

    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return (a @ b).float()


def plain_paths(x, w, grad, z, g, y):
    """The plain-PyTorch versions of the op; grad None times Z alone. Inputs prepared here.
    ``torch_fp64_z``: Z summed in fp64 as ``input_factor_dtype="float64"`` does it (the reference's
    upper-triangle panels on the bf16 inputs), G and y as in fp32."""
    import torch

    from lora_da.kernels.reference import add_upper_gram

    xm = x * w[:, None].to(x.dtype)
    x32, xm32 = x.float(), xm.float()
    g32 = grad.float() if grad is not None else None
    z64 = torch.zeros_like(z, dtype=torch.float64)

    def g_and_y():
        g.addmm_(g32.T, x32)
        y.add_((g32.square() * w[:, None]).sum(0))

    def fp32():
        z.addmm_(xm32.T, x32)
        if grad is not None:
            g_and_y()

    def fp64_z():
        add_upper_gram(z64, x, w)
        if grad is not None:
            g_and_y()

    def bf16():
        z.add_(mm_fp32_out(xm.T, x))
        if grad is not None:
            g.add_(mm_fp32_out(grad.T, x))
            y.add_((g32.square() * w[:, None]).sum(0))

    return {"torch_fp32_addmm": fp32, "torch_bf16_mm": bf16, "torch_fp64_z": fp64_z}


LLAMA_SHAPES = [(4096, None), (11008, None), (4096, 4096), (4096, 11008), (11008, 4096)]  # (n, m); m None: Z only


def benchmark(device: str, shapes, tokens_list, say, peak: float) -> list:
    import torch

    from lora_da import dispatch

    backends = []
    for name in ("triton", "cuda"):
        reason = dispatch.find("fisher_update", name).check(torch.device(device), torch.bfloat16)
        if reason is None:
            backends.append(name)
        else:
            say(f"backend {name} skipped: {reason}")
    records = []
    say(f"{'op':<6}{'n':>6}{'m':>6}{'T':>6}{'mask':>6}  " + "  ".join(f"{k:>18}" for k in
        ["torch_fp32_addmm", "torch_bf16_mm", "torch_fp64_z"]
        + [b + s for b in backends for s in ("", "_compacted", "_mixed_compacted")])
        + "   (TFLOP/s, % of peak)")
    for n, m in shapes:
        for tokens in tokens_list:
            for masked in (0.0, 0.3):
                gen = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(tokens, n, device=device, dtype=torch.bfloat16, generator=gen)
                x[::64, 3], x[::64, n - 5] = 2784.0, 948.0  # a massive activation in two features
                w = (torch.rand(tokens, device=device, generator=gen) >= masked).float()
                grad = None if m is None else torch.randn(tokens, m, device=device, dtype=torch.bfloat16, generator=gen)
                counted = int(w.sum())
                flops = n * n * counted + (0 if m is None else 2 * m * n * tokens)
                z = torch.zeros(n, n, device=device)
                z64 = torch.zeros(n, n, device=device, dtype=torch.float64)
                g = None if m is None else torch.zeros(m, n, device=device)
                y = None if m is None else torch.zeros(m, device=device)
                impls = plain_paths(x, w, grad, z, g, y)
                order = torch.argsort((w == 0).to(torch.int8), stable=True)  # counted tokens first
                layouts = {"": (x, w, grad, None), "_compacted": (x[order], w[order], None if grad is None else grad[order],
                                                                  counted)}
                for name in backends:
                    fn = dispatch.find("fisher_update", name).fn
                    for suffix, (xl, wl, gl, prefix) in layouts.items():
                        # "_compacted": counted tokens first, as the collector's token buffers pass them
                        x3, mask3 = xl[None], wl[None].bool()
                        grads = [] if gl is None else [gl[None]]
                        gs, ys = ([] if g is None else [g]), ([] if y is None else [y])
                        impls[name + suffix] = (lambda fn=fn, x3=x3, mask3=mask3, grads=grads, z=z, gs=gs, ys=ys,
                                                prefix=prefix: fn(x3, mask3, grads, z, gs, ys, counted=prefix))
                    x3, mask3 = x[order][None], w[order][None].bool()
                    grads = [] if grad is None else [grad[order][None]]
                    gs, ys = ([] if g is None else [g]), ([] if y is None else [y])
                    impls[name + "_mixed_compacted"] = (lambda fn=fn, x3=x3, mask3=mask3, grads=grads, z64=z64, gs=gs,
                                                       ys=ys: fn(x3, mask3, grads, z64, gs, ys, counted=counted))
                row = {"op": "Z" if m is None else "Z+G+y", "n": n, "m": m, "tokens": tokens, "masked": masked,
                       "counted_tokens": counted, "useful_flops": flops, "ms": {}, "tflops": {}}
                for name, fn in impls.items():
                    fn()  # warm-up and autotune outside the timing
                    if device == "cuda":
                        torch.cuda.synchronize()
                    ms = bench_ms(fn, device)
                    row["ms"][name] = ms
                    row["tflops"][name] = flops / ms / 1e9
                records.append(row)
                say(f"{row['op']:<6}{n:>6}{m or '-':>6}{tokens:>6}{masked:>6.0%}  " + "  ".join(
                    f"{row['tflops'][k]:>9.0f} ({row['tflops'][k] / peak:>4.0%})" for k in row["tflops"]))
                del x, grad, z, z64, g, y, impls, layouts
                if device == "cuda":
                    torch.cuda.empty_cache()
    return records


def targets(records: list, peak: float, say) -> dict:
    """The issue's two targets, as measured."""
    result = {}
    z = [r for r in records if r["op"] == "Z" and r["n"] == 4096 and r["tokens"] == 8192 and r["masked"] == 0.0]
    if z:
        r = z[0]
        best_plain = min(r["ms"]["torch_fp32_addmm"], r["ms"]["torch_bf16_mm"])
        kernels = {k: v for k, v in r["ms"].items() if not k.startswith("torch")}
        if kernels:
            best = min(kernels, key=kernels.get)
            result["z_speedup_n4096_T8192"] = {"backend": best, "speedup": best_plain / kernels[best], "target": 1.5}
    for r in records:  # mixed Z against the fp32 kernel and against fp64 products through PyTorch
        for backend in sorted({k[:-len("_mixed_compacted")] for k in r["ms"] if k.endswith("_mixed_compacted")}):
            case = f"{r['op']} n{r['n']}-m{r['m']}-T{r['tokens']}-mask{r['masked']} {backend}"
            mixed = r["ms"][backend + "_mixed_compacted"]
            result.setdefault("mixed_over_fp32_kernel", {"target": 1.5})[case] = mixed / r["ms"][backend + "_compacted"]
            result.setdefault("fp64_torch_over_mixed", {})[case] = r["ms"]["torch_fp64_z"] / mixed
    whole = [r for r in records if r["op"] == "Z+G+y" and r["tokens"] >= 4096]
    fractions = {}
    for r in whole:
        kernels = {k: v for k, v in r["tflops"].items() if not k.startswith("torch")}
        if kernels:
            fractions[f"n{r['n']}-m{r['m']}-T{r['tokens']}-mask{r['masked']}"] = max(kernels.values()) / peak
    if fractions:
        result["whole_op_fraction_of_peak"] = {"min": min(fractions.values()), "by_shape": fractions, "target": 0.6}
    say("targets:", json.dumps(result, indent=1))
    return result


def solver_benchmark(out: Path, say, smoke: bool) -> dict:
    """benchmarks/eigensolver.py --randomized-only on the 224 Llama-2-7B-shaped modules (tiny
    shapes with --smoke): the batched solver's wall seconds per rank, cold and warm."""
    shape = (["--hidden", "48", "--mlp", "80", "--layers", "2", "--ranks", "2"] if smoke
             else ["--llama-7b", "--ranks", "8", "64", "--profile"])
    env = {**os.environ, "OUT": str(out)}
    if smoke:  # on CPU like the rest of the smoke run (the Triton interpreter cannot take CUDA tensors)
        env["CUDA_VISIBLE_DEVICES"] = ""
    with (out / "eigensolver.txt").open("w") as log:  # written as it runs: kept if the run is cut short
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eigensolver.py"), *shape,
                               "--randomized-only", "--compare-small-eigh"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    for line in (out / "eigensolver.txt").read_text().splitlines():
        say(line)
    if proc.returncode != 0:
        say(f"solver benchmark failed (exit {proc.returncode}); see eigensolver.txt")
        return {"returncode": proc.returncode}
    records = json.loads((out / "eigensolver.json").read_text())["records"]
    for row in records:
        say(f"target: all {row['modules']} modules solved in <= 5 s at r = {row['rank']}: "
            f"{'met' if row['seconds'][1] <= 5.0 else 'not met'} ({row['seconds'][1]:.2f} s warm)")
    return {"returncode": 0, "records": records}


def end_to_end(out: Path, say, smoke: bool) -> dict:
    """benchmarks/end_to_end.py: a Llama-2-7B-shaped model initialised end to end (one layer of
    tiny width on CPU with --smoke); its JSON record."""
    shape = (["--layers", "1", "--hidden-size", "64", "--intermediate-size", "172", "--heads", "4", "--vocab", "128",
              "--sequences", "16", "--length", "32", "--device", "cpu", "--dtype", "float32"] if smoke else [])
    record = out / "end_to_end.json"
    with (out / "end_to_end.txt").open("w") as log:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "end_to_end.py"), *shape, "--output", str(record)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    for line in (out / "end_to_end.txt").read_text().splitlines()[-12:]:
        say(line)
    if proc.returncode != 0:
        say(f"end to end failed (exit {proc.returncode}); see end_to_end.txt")
        return {"returncode": proc.returncode}
    result = json.loads(record.read_text())
    say(f"target: init <= 30 s: {'met' if result['init_seconds'] <= 30 else 'not met'} ({result['init_seconds']:.1f} s); "
        f"collect <= 2x train: {result['collect_over_train']:.2f}x (counted floor {result['collect_floor_ratio']:.2f}x)")
    return {"returncode": 0, **result}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 4096 and 8192 only")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-solver", action="store_true", help="skip the batched solver on Llama-2-7B shapes")
    parser.add_argument("--skip-end-to-end", action="store_true", help="skip the 7B-shaped model initialised end to end")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, PyTorch paths only (checks the script)")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT", ROOT / "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    say = Tee(out / "gpu_check.txt")
    sys.path.insert(0, str(ROOT))
    import torch
    import triton

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (--smoke runs tiny shapes on CPU)")
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "command": "python benchmarks/gpu_check.py " + " ".join(argv or sys.argv[1:])}
    say(json.dumps(report))
    started = time.perf_counter()

    def save():  # after every phase, so that a run cut short keeps what it measured
        report["seconds"] = time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    if not (args.skip_build or args.smoke):
        report["build"] = build(say)
        save()
    if not (args.skip_tests or args.smoke):
        report["tests"] = run_tests(out, say)
        save()
    peak = bf16_peak(say, device, 256 if args.smoke else 8192)
    report["bf16_peak_tflops"] = peak
    if args.smoke:
        shapes, tokens_list = [(40, None), (40, 24)], [64]
    else:
        shapes, tokens_list = LLAMA_SHAPES, ([4096, 8192] if args.quick else [2048, 4096, 8192, 16384])
    report["records"] = benchmark(device, shapes, tokens_list, say, peak)
    report["targets"] = targets(report["records"], peak, say)
    save()
    if not args.skip_solver:
        report["solver"] = solver_benchmark(out, say, args.smoke)
        save()
    if not args.skip_end_to_end:
        report["end_to_end"] = end_to_end(out, say, args.smoke)
    save()
    say(f"done in {report['seconds']:.0f} s; figures in {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
