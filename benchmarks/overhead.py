"""What LoRA-DA costs on the main job's model, measured side by side in one process:

    python benchmarks/overhead.py                    # 128 calibration reviews (the main job's), 3 rounds
    python benchmarks/overhead.py --reviews 64 --repeats 5

SmolLM2-135M-Instruct with a PEFT LoRA adapter (r = 8, every linear layer but the head). Three
variants, run in turns in one process (one round = each variant once, so the machine's drift
reaches them alike), one discarded warm-up round, medians over ``--repeats`` rounds:

* ``train``: one plain LoRA training forward + backward per calibration batch (no optimizer step),
  the unit of the overhead ratio;
* ``lora_da``: ``lora_da.initialize`` over the same batches (collect, solve, apply);
* ``multi_pass``: a straightforward implementation of the same algorithm with the cost profile of
  the authors' script: one pass with weight ``.grad`` for G, then one pass per group of 8 layers
  with hooks for Z and y, explicit inverses, dense Omega per module and ``torch.lobpcg`` with
  10 iterations per module.

Prints the ratios time(lora_da) / time(train) and time(multi_pass) / time(lora_da), the phases,
and the floor of collection: a training pass plus the products that only collection makes, G
(2 T m n per module over every token) and the upper triangle of Z (the reference's panels of 192
rows: T n (n + 192) per distinct input over the counted tokens), at this machine's measured
matrix-product rates in their dtypes. Peak memory is not measured here: in one process each
variant reuses what the one before freed (``benchmarks/scale_out.py`` measures it in processes
of their own). Writes overhead.json under $OUT (default ./outputs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("train", "lora_da", "multi_pass")
LAYERS_PER_PASS = 8


def setup(reviews: int):
    """(PEFT model, calibration batches) of the main job."""
    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(ROOT))
    from lora_da.embedded import Verbalizer, load_rotten_tomatoes, load_smollm2, split

    torch.manual_seed(0)
    base, tokenizer = load_smollm2()
    verbalizer = Verbalizer(tokenizer)
    (calibration,) = split(load_rotten_tomatoes(), [reviews])
    batches = [verbalizer.model_inputs(b) for b in verbalizer.batches(calibration, 8)]
    lora = LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(base, lora), batches


def train_pass(model, batches) -> dict:
    """Forward and backward of every batch with the LoRA parameters trainable."""
    model.train()
    start = time.perf_counter()
    for batch in batches:
        (model(**batch).loss * batch["input_ids"].shape[0]).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return {"total": seconds}


def lora_da_pass(model, batches) -> dict:
    import lora_da

    report = lora_da.initialize(model, batches, population_size=480, progress=False)
    return dict(report.seconds, total=sum(report.seconds.values()))


def multi_pass(model, batches) -> dict:
    """The same algorithm computed the straightforward way (see the module docstring)."""
    import torch

    from lora_da.targets import lora_layers

    layers = {name: layer.get_base_layer() for name, layer in lora_layers(model).items()}
    seconds = {}
    start = time.perf_counter()
    with model.disable_adapter():
        # pass 1: G from the weights' .grad (sum over sequences of each sequence's mean loss)
        for p in model.parameters():
            p.requires_grad_(False)
        for module in layers.values():
            module.weight.requires_grad_(True)
        for batch in batches:
            (model(**batch).loss * batch["input_ids"].shape[0]).backward()
        sequences = sum(b["input_ids"].shape[0] for b in batches)
        gradient = {name: module.weight.grad / sequences for name, module in layers.items()}
        for module in layers.values():
            module.weight.grad = None
            module.weight.requires_grad_(False)
        seconds["gradient pass"] = time.perf_counter() - start
        # passes 2..: Z (inputs) and y (output gradients) for 8 layers at a time
        start = time.perf_counter()
        z, y, tokens = {}, {}, {}
        groups = sorted({int(name.split(".layers.")[1].split(".")[0]) for name in layers})
        for first in range(0, len(groups), LAYERS_PER_PASS):
            chosen = {n: m for n, m in layers.items()
                      if int(n.split(".layers.")[1].split(".")[0]) in groups[first: first + LAYERS_PER_PASS]}
            handles = []
            mask = {}

            def forward_hook(name):
                def hook(module, args, output):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]) * mask["m"][:, None]
                    z[name] = z.get(name, 0) + x.T @ x
                    tokens[name] = tokens.get(name, 0) + mask["m"].sum()
                    output.requires_grad_(True)
                    output.register_hook(lambda g: y.__setitem__(
                        name, y.get(name, 0) + (g.reshape(-1, g.shape[-1]) ** 2 * mask["m"][:, None]).sum(0)))
                return hook

            for name, module in chosen.items():
                handles.append(module.register_forward_hook(forward_hook(name)))
            for batch in batches:
                mask["m"] = batch["attention_mask"].reshape(-1).float()
                (model(**batch).loss * batch["input_ids"].shape[0]).backward()
            for handle in handles:
                handle.remove()
        seconds["fisher passes"] = time.perf_counter() - start
    # solve: explicit inverses, dense Omega, 10 LOBPCG iterations per module
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    for name in layers:
        zd = (z[name] / tokens[name]).double() + 1e-6 * torch.eye(z[name].shape[0], dtype=torch.float64)
        zd_inv = torch.linalg.inv(zd)
        d = 1.0 / ((y[name] / tokens[name]).double() + 1e-6)
        delta = -(d[:, None] * gradient[name].double()) @ zd_inv
        sigma = torch.linalg.matrix_norm(delta, ord=2)
        delta = delta / sigma
        omega = -delta.T @ delta + 0.03 * float(d.sum()) / (480 * float(sigma) ** 2) * zd_inv
        start_block = torch.randn(omega.shape[0], 8, generator=generator, dtype=torch.float64)
        torch.lobpcg(omega, k=8, X=start_block, niter=10, largest=False)
    seconds["solve"] = time.perf_counter() - start
    return dict(seconds, total=sum(seconds.values()))


def collection_floor(model, batches) -> dict:
    """Seconds of the products only collection makes (G in fp32 over every token, Z's upper panels
    in its accumulation dtype over the counted tokens), from flop counts and the rates of one
    representative product of each kind measured here. The layer inputs come from collecting
    one batch."""
    import torch

    import lora_da
    from lora_da.kernels.reference import GRAM_PANEL
    from lora_da.targets import lora_layers

    with model.disable_adapter():
        layout = lora_da.collect_statistics(model, batches[:1], target_modules=tuple(lora_layers(model)), progress=False)
    tokens = sum(b["input_ids"].numel() for b in batches)
    counted = sum(int(b["attention_mask"].sum()) for b in batches)
    g_flops = 2 * tokens * sum(s.g_sum.numel() for s in layout.modules.values())
    widths = [e.z_sum.shape[0] for e in layout.inputs.values()]
    z_flops = sum(counted * n * (n + GRAM_PANEL) for n in widths)  # panels of 192 rows: 2 T n (n + 192) / 2
    z_dtype = next(iter(layout.inputs.values())).z_sum.dtype

    def rate(dtype, m, n, k):
        a, b, c = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype), torch.zeros(m, n, dtype=dtype)
        c.addmm_(a, b)
        start = time.perf_counter()
        for _ in range(5):
            c.addmm_(a, b)
        return 5 * 2 * m * n * k / (time.perf_counter() - start)

    batch_tokens = tokens // len(batches)
    g_rate, z_rate = rate(torch.float32, 1536, 576, batch_tokens), rate(z_dtype, 576, 576, batch_tokens)
    return {"G GFLOP": g_flops / 1e9, "Z GFLOP": z_flops / 1e9, "G GFLOP/s": g_rate / 1e9, "Z GFLOP/s": z_rate / 1e9,
            "seconds": g_flops / g_rate + z_flops / z_rate}


RUNS = {"train": train_pass, "lora_da": lora_da_pass, "multi_pass": multi_pass}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviews", type=int, default=128, help="calibration reviews (default 128, as the main job)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds after the warm-up round")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    model, batches = setup(args.reviews)
    runs = {variant: [] for variant in args.variants}
    for round_index in range(args.repeats + 1):
        for variant in args.variants:
            record = RUNS[variant](model, batches)
            if round_index:  # the first round warms up
                runs[variant].append(record)
    records = {}
    for variant in args.variants:
        medians = {key: statistics.median(r[key] for r in runs[variant]) for key in runs[variant][0]}
        records[variant] = {"median_seconds": medians, "runs": runs[variant]}
        print(f"{variant:<11} median {medians['total']:8.2f} s  runs " + ", ".join(f"{r['total']:.2f}" for r in runs[variant])
              + "  " + "  ".join(f"{k} {v:.2f}" for k, v in medians.items() if k != "total"), flush=True)
    total = {v: records[v]["median_seconds"]["total"] for v in records}
    if {"train", "lora_da"} <= total.keys():
        floor = collection_floor(model, batches)
        records["collection_floor"] = floor
        collect = records["lora_da"]["median_seconds"]["collect"]
        print(f"overhead ratio lora_da / train: {total['lora_da'] / total['train']:.2f}; collection alone "
              f"{collect / total['train']:.2f}; its floor (train + G {floor['G GFLOP']:.0f} GFLOP at "
              f"{floor['G GFLOP/s']:.0f} GFLOP/s + Z {floor['Z GFLOP']:.0f} GFLOP at {floor['Z GFLOP/s']:.0f} GFLOP/s) "
              f"{(total['train'] + floor['seconds']) / total['train']:.2f}")
    if {"multi_pass", "lora_da"} <= total.keys():
        print(f"speedup over the multi-pass baseline: {total['multi_pass'] / total['lora_da']:.2f}x")
    out = Path(os.environ.get("OUT", ROOT / "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({"args": vars(args), "records": records}, indent=1))


if __name__ == "__main__":
    main()
