"""Counted cost of summing Z on a GPU at Llama-2 shapes: fp64 products through PyTorch
(``input_factor_dtype="float64"``) against the fp32 kernel (``"float32"``) and the default
(``"auto"``, the Triton kernel's ``"mixed"`` scheme):

    python benchmarks/input_factor_cost.py                  # 256 x 512 calibration tokens

Counts, not timings: flops per kind of unit, the bytes that must move to and from GPU memory
(X read once, Z's upper triangle read and written once per call, of the tokens ``lora-da plan``
gives the token buffers at that model's size; tiles that
read X again from L2 are not counted), the statistics' Z memory, and the seconds they imply at
published peak rates (the larger of compute and memory time). Per layer Llama has four distinct
linear inputs: attention (q, k, v), o_proj, the MLP's (gate, up), each n = hidden, and
down_proj's, n = intermediate.
  float64: the reference's upper-triangle panels (GRAM_PANEL rows): n^2 T (1 + GRAM_PANEL / n)
           fp64 flops; X also written and read as an fp64 copy.
  float32: the kernels' fp32 sums, upper-triangular 128 x 128 tiles on bf16 tensor cores,
           n^2 T (1 + 128 / n) flops, Z in fp32 (half the bytes).
  auto:    inputs with T <= 2n (``memory.HELD_ROWS_PER_FEATURE``) as float64 (their rows held in
           host memory until then: up to 2n^2 elements of the model's dtype, copied to the host
           and back once, not counted here); the others as float32's tiles whose
           fp32 sums are added into fp64 registers every ``massive.flush_tokens`` tokens (n^2 / 2
           fp64 additions each: 64 tokens on an H100, 256 on an RTX 4090), and the massive
           features' columns, 2 n |D| T fp64 flops on an fp64 copy of X. |D| = 2 on every
           down_proj input (as on SmolLM2's, RESULTS.md) and 0 elsewhere; "auto, |D| = 16
           everywhere" counts the cap (``massive.MAX_MASSIVE``) on every input. ``--sequences 16``
           gives a calibration set with at most 2n tokens per input.
Writes input_factor_cost.json under $OUT (default ./outputs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_da.kernels.massive import FLUSH_TOKENS, FLUSH_TOKENS_SLOW_FP64, MAX_MASSIVE  # noqa: E402
from lora_da.kernels.reference import GRAM_PANEL  # noqa: E402
from lora_da.memory import HELD_ROWS_PER_FEATURE  # noqa: E402

MODELS = {"Llama-2-7B": {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32},
          "Llama-2-70B": {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8}}
# published dense peak rates (TFLOP/s) and memory bandwidth (TB/s)
# and the tokens per fp64 addition of the Triton kernel's tile sums there (``massive.flush_tokens``)
GPUS = {"H100 SXM": {"bf16": 989.4, "fp64": 66.9, "bandwidth": 3.35, "flush": FLUSH_TOKENS},
        "RTX 4090": {"bf16": 165.2, "fp64": 1.29, "bandwidth": 1.008, "flush": FLUSH_TOKENS_SLOW_FP64}}
TILE = 128  # the Triton kernel's BLOCK_N on a GPU


def inputs(model: dict) -> list:
    """(n, massive features) of every distinct linear input of the model."""
    per_layer = [(model["hidden"], 0)] * 3 + [(model["intermediate"], 2)]
    return per_layer * model["layers"]


def plan(model: dict, input_factor_dtype: str):
    """``lora_da.plan_memory`` of the bf16 Llama with these shapes, built on the meta device, for a GPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_da

    config = LlamaConfig(hidden_size=model["hidden"], intermediate_size=model["intermediate"],
                         num_hidden_layers=model["layers"], num_attention_heads=model["heads"],
                         num_key_value_heads=model["kv_heads"], vocab_size=32000)
    with torch.device("meta"):
        llama = LlamaForCausalLM(config).to(torch.bfloat16)
    return lora_da.plan_memory(llama, input_factor_dtype=input_factor_dtype, device="cuda")


def count(path: str, shapes: list, tokens: int, call: int, flush: int) -> dict:
    """Flops by unit, bytes that must move and Z's bytes of one way of summing Z over ``tokens``
    tokens in calls of ``call`` tokens (``flush``: tokens per fp64 addition of auto's tile sums)."""
    calls = -(-tokens // call)
    bf16 = fp64 = moved = 0.0
    for n, massive in shapes:
        moved += 2 * tokens * n + calls * 16 * n * n / 2  # X in bf16 once; Z's upper triangle in and out per call
        if path == "float32":  # the kernels' plain fp32 sums
            bf16 += n * n * tokens * (1 + TILE / n)
            moved -= calls * 8 * n * n / 2
            continue
        first = tokens if path == "float64" or tokens <= HELD_ROWS_PER_FEATURE * n else 0  # as fp64 products
        fp64 += n * n * first * (1 + GRAM_PANEL / n)
        moved += 16 * first * n  # their fp64 copy, written and read
        rest = tokens - first
        if not rest:
            continue
        massive = MAX_MASSIVE if path.endswith("everywhere") else massive
        bf16 += n * n * rest * (1 + TILE / n)
        fp64 += n * n / 2 * -(-rest // flush) + 2 * n * massive * rest
        if massive:
            moved += 16 * rest * n + calls * 32 * n * massive  # the fp64 copy; Z's massive rows and columns
    width = 4 if path == "float32" else 8
    return {"bf16 flops": bf16, "fp64 flops": fp64, "bytes moved": moved, "Z bytes": sum(width * n * n for n, _ in shapes)}


def seconds(counted: dict, gpu: dict) -> dict:
    compute = counted["bf16 flops"] / (gpu["bf16"] * 1e12) + counted["fp64 flops"] / (gpu["fp64"] * 1e12)
    memory = counted["bytes moved"] / (gpu["bandwidth"] * 1e12)
    return {"compute": compute, "memory": memory, "implied": max(compute, memory)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args(argv)
    tokens = args.sequences * args.length
    report = {}
    print(f"{tokens} tokens; counts at published peak rates, not timings; calls of the tokens lora-da plan gives")
    print("| model | Z summed as | tokens per call | Z (GiB) | statistics, lora-da plan (GiB) | "
          + " | ".join(f"{gpu}: bf16 PFLOP, fp64 PFLOP, TB moved, s" for gpu in GPUS) + " |")
    print("| --- | --- | --- | --- | --- |" + " --- |" * len(GPUS))
    for name, model in MODELS.items():
        for path in ("float64", "float32", "auto", "auto, |D| = 16 everywhere"):
            planned = plan(model, path.split(",")[0])
            call = planned.chunks[0]
            counted = {gpu: count(path, inputs(model), tokens, call, rates["flush"]) for gpu, rates in GPUS.items()}
            times = {gpu: seconds(counted[gpu], rates) for gpu, rates in GPUS.items()}
            report[f"{name}, {path}"] = {"counts": counted, "call tokens": call, "seconds": times,
                                         "planned statistics bytes": sum(planned.accumulator_bytes)}
            cells = [f"{c['bf16 flops'] / 1e15:.3f}, {c['fp64 flops'] / 1e15:.4f}, {c['bytes moved'] / 1e12:.2f}, "
                     f"{times[gpu]['implied']:.1f}" for gpu, c in counted.items()]
            z_bytes = next(iter(counted.values()))["Z bytes"]
            print(f"| {name} | {path} | {call} | {z_bytes / 2**30:.1f} | {sum(planned.accumulator_bytes) / 2**30:.1f} | "
                  + " | ".join(cells) + " |")
    out = Path(os.environ.get("OUT", ROOT / "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "input_factor_cost.json").write_text(json.dumps({"args": vars(args), "counts": report}, indent=1))


if __name__ == "__main__":
    main()
