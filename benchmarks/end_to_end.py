"""LoRA-DA end to end on a Llama-2-7B-shaped model, measured in one process:

    python benchmarks/end_to_end.py                           # on a GPU: 32 layers, 256 x 512 tokens
    python benchmarks/end_to_end.py --layers 4                # the same shapes on a smaller GPU
    python benchmarks/end_to_end.py --layers 1 --hidden-size 64 --intermediate-size 172 --heads 4 \\
        --vocab 128 --sequences 16 --length 32 --device cpu --dtype float32   # a smoke test

A ``LlamaForCausalLM`` with random weights made on the device (no download; default bf16), PEFT
LoRA r = 8 on all seven projections, calibration sequences of random tokens. In order: one LoRA
training forward + backward over the calibration batches (``train_seconds``, after one warm-up
batch), then ``lora_da.initialize`` on the same batches: its phases, the accelerator's peak memory
during it, and the statistics' bytes. The collection floor is counted beside them: a LoRA
training pass over frozen base weights costs a forward (2 P T flops for P base weights of the
targeted layers and T tokens) plus the input gradients (2 P T); collection adds G (2 P T, a
weight gradient) and the upper triangle of each distinct input's Z (n^2 T), so the floor of
collect / train is (6 P + sum n^2) / (4 P) (attention scores and the head left out on both sides).
Writes the JSON record to ``--output`` (default benchmarks/results/gpu_<model>/end_to_end.json, e.g.
gpu_h200, or benchmarks/results/cpu/),
keys: init_seconds, train_seconds, collect_seconds, solve_seconds, apply_seconds, peak_bytes,
model_bytes, statistics_bytes, collect_floor_ratio and the set-up.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_da  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args, device: torch.device):
    """(PEFT model, batches) made on ``device``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(args.length, 64))
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=16, use_rslora=True, lora_dropout=0.0,
                                            target_modules=PROJECTIONS))
    generator = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, args.sequences, args.batch_size):
        size = min(args.batch_size, args.sequences - start)
        ids = torch.randint(0, args.vocab, (size, args.length), generator=generator).to(device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return model, batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_seconds(model, batches, device: torch.device) -> float:
    """One LoRA training forward + backward over ``batches`` (the LoRA weights trainable), after one warm-up batch."""
    model.train()
    for batch in batches[:1]:
        (model(**batch).loss * batch["input_ids"].shape[0]).backward()
    model.zero_grad(set_to_none=True)
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        (model(**batch).loss * batch["input_ids"].shape[0]).backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def collect_floor_ratio(model) -> float:
    """(6 P + sum over distinct inputs of n^2) / (4 P) over the targeted linear layers."""
    from lora_da.targets import find_targets

    targets = find_targets(model, PROJECTIONS)
    weights = sum(t.in_features * t.out_features for t in targets.values())
    # q/k/v read one input and gate/up another: one Z per attention input, o input, MLP input, down input
    inputs = sum(t.in_features ** 2 for name, t in targets.items() if name.endswith(("q_proj", "o_proj", "gate_proj",
                                                                                    "down_proj")))
    return (6 * weights + inputs) / (4 * weights)


def results_folder(device: torch.device) -> str:
    """benchmarks/results/ subfolder of a device: gpu_<model> for GPUs ("NVIDIA H200": gpu_h200), else its type."""
    if device.type != "cuda":
        return device.type
    return "gpu_" + torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip().replace(" ", "_")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--intermediate-size", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model, batches = build(args, device)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    record = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "modules": 7 * args.layers, "model_bytes": model_bytes, "collect_floor_ratio": collect_floor_ratio(model)}
    record["train_seconds"] = train_seconds(model, batches, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    report = lora_da.initialize(model, batches, population_size=args.sequences, progress=False)
    synchronize(device)
    record["init_seconds"] = time.perf_counter() - start
    record.update({f"{phase}_seconds": seconds for phase, seconds in report.seconds.items()})
    record.update(peak_bytes=report.peak_memory_bytes, statistics_bytes=report.statistics_bytes,
                  counted_tokens=report.num_tokens, solver=report.solver)
    record["collect_over_train"] = record["collect_seconds"] / record["train_seconds"]
    output = args.output or ROOT / "benchmarks" / "results" / results_folder(device) / "end_to_end.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1, default=str))
    print(report)
    print(f"train {record['train_seconds']:.2f} s, init {record['init_seconds']:.2f} s; collect / train "
          f"{record['collect_over_train']:.2f} (counted floor {record['collect_floor_ratio']:.2f}); model "
          f"{model_bytes / 2**30:.2f} GiB, statistics {report.statistics_bytes / 2**30:.2f} GiB"
          + (f", peak {report.peak_memory_bytes / 2**30:.2f} GiB" if report.peak_memory_bytes else "")
          + f"; written to {output}")


if __name__ == "__main__":
    main()
