"""Scale-out figures on the main job's model (SmolLM2-135M-Instruct, every linear layer, rank 8):

    python benchmarks/scale_out.py ranks      # initialize: one process vs torchrun with two ranks
    python benchmarks/scale_out.py memory     # peak host memory without and with a memory budget

``ranks`` times ``lora_da.initialize`` (collect + solve) over the same calibration reviews in one
process (two threads, then one) and under ``torchrun --nproc_per_node=2`` (gloo, one thread per
rank), each run in a fresh process, and checks that both ranks' adapters equal the single process's.
``memory`` runs ``initialize`` in fresh processes without a budget and with budgets that force
several passes, and reports the resident set before ``initialize`` and its peak during it (Linux
VmHWM, reset after the model is loaded) with the accumulators' size and the number of passes.
Writes scale_out.json under $OUT (default ./outputs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from process_memory import reset_peak, resident_bytes  # noqa: E402


def initialize_once(reviews: int, max_memory, save: str) -> dict:
    """One initialize of the main job's model in this process (a worker role)."""
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    import lora_da
    from lora_da.embedded import Verbalizer, load_rotten_tomatoes, load_smollm2, split

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    base, tokenizer = load_smollm2()
    verbalizer = Verbalizer(tokenizer)
    (calibration,) = split(load_rotten_tomatoes(), [reviews])
    batches = [verbalizer.model_inputs(b) for b in verbalizer.batches(calibration, 8)]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"))
    before = resident_bytes("VmRSS")
    reset_peak()  # model loading peaks higher than what follows
    start = time.perf_counter()
    report = lora_da.initialize(model, batches, population_size=480, max_memory=max_memory, progress=False)
    seconds = time.perf_counter() - start
    peak = resident_bytes("VmHWM")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if save:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n},
                  f"{save}.rank{rank}.safetensors")
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"rank": rank, "seconds": seconds, "phases": report.seconds, "passes": report.passes,
            "statistics_bytes": report.statistics_bytes, "rss_before_bytes": before,
            "peak_rss_during_initialize_bytes": peak}



def fresh(args: list, env: dict, torchrun: bool = False) -> list:
    """Run this script's worker role in fresh process(es); the JSON lines they print."""
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    done = subprocess.run(prefix + [__file__, "worker"] + args, env=dict(os.environ, **env), capture_output=True,
                          text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def compare_adapters(prefix: str) -> float:
    """Largest relative Frobenius difference of a module's B·A between the single process and
    either rank (B·A, not A and B: a basis inside a nearly degenerate eigenspace is arbitrary)."""
    from safetensors.torch import load_file

    def products(path):
        weights = load_file(path)
        return {k: weights[k.replace("lora_A", "lora_B")].double() @ v.double() for k, v in weights.items() if "lora_A" in k}

    single = products(f"{prefix}-single.rank0.safetensors")
    worst = 0.0
    for rank in (0, 1):
        two = products(f"{prefix}-two.rank{rank}.safetensors")
        worst = max(worst, max(float((two[k] - v).norm() / v.norm()) for k, v in single.items()))
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["ranks", "memory", "worker"])
    parser.add_argument("--reviews", type=int, default=64)
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--save", default="")
    args = parser.parse_args(argv)
    if args.what == "worker":
        budget = None if args.max_memory is None else (args.max_memory if args.max_memory == "auto" else int(args.max_memory))
        print(json.dumps(initialize_once(args.reviews, budget, args.save)), flush=True)
        return
    out = Path(os.environ.get("OUT", ROOT / "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    common = ["--reviews", str(args.reviews)]
    records = {}
    if args.what == "ranks":
        with tempfile.TemporaryDirectory() as tmp:
            prefix = str(Path(tmp) / "adapter")
            records["one process, 2 threads"] = fresh(common + ["--save", f"{prefix}-single"], {"OMP_NUM_THREADS": "2"})
            records["one process, 1 thread"] = fresh(common, {"OMP_NUM_THREADS": "1"})
            records["torchrun, 2 ranks x 1 thread"] = fresh(common + ["--save", f"{prefix}-two"], {"OMP_NUM_THREADS": "1"},
                                                            torchrun=True)
            records["max relative difference of B·A, two ranks vs one process"] = compare_adapters(prefix)
    else:
        for budget in (None, 256 * 2**20, 128 * 2**20):
            extra = [] if budget is None else ["--max-memory", str(budget)]
            records[f"max_memory={budget}"] = fresh(common + extra, {"OMP_NUM_THREADS": "2"})
    for label, value in records.items():
        print(f"{label}: {json.dumps(value)}", flush=True)
    (out / f"scale_out_{args.what}.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
