"""What gathering tokens across micro-batches (``buffer_tokens``) changes in collection, on the main job:

    python benchmarks/buffering.py                    # 128 calibration reviews, batches of 8
    python benchmarks/buffering.py --buffer-tokens 0 1024 4096 --rounds 3

SmolLM2-135M-Instruct on Rotten Tomatoes reviews, every linear layer but the head. For each
``buffer_tokens`` value (0: one statistics op call per micro-batch and distinct input), alternated
in one process: collection seconds, the number of op calls, the rows they read (buffering drops
padding) and the most in one call (the chunk, after the cap on the buffers' memory), and the
largest relative difference of the sums from the unbuffered ones.
Writes buffering.json under $OUT (default ./outputs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_da  # noqa: E402
from lora_da import dispatch  # noqa: E402
from lora_da.embedded import Verbalizer, load_rotten_tomatoes, load_smollm2, split  # noqa: E402


class CallCounter:
    """Counts the statistics op's calls and the token rows they read, through ``dispatch.resolve``."""

    def __init__(self):
        self.calls = self.rows = self.largest = self.compacted = 0  # compacted: calls with counted tokens first
        self.resolve = dispatch.resolve

    def __enter__(self):
        def counting(op, *args, **kwargs):
            impl = self.resolve(op, *args, **kwargs)
            if op != "fisher_update":
                return impl

            def counting_call(x, *rest, counted=None):
                self.calls += 1
                self.rows += x.shape[0] * x.shape[1]
                self.largest = max(self.largest, x.shape[0] * x.shape[1])
                self.compacted += counted is not None
                return impl.fn(x, *rest, counted=counted)

            return dataclasses.replace(impl, fn=counting_call)

        dispatch.resolve = counting
        return self

    def __exit__(self, *exc):
        dispatch.resolve = self.resolve


def largest_difference(got: lora_da.Statistics, want: lora_da.Statistics) -> float:
    pairs = [(got.inputs[k].z_sum, e.z_sum) for k, e in want.inputs.items()]
    pairs += [(got.modules[k].g_sum, e.g_sum) for k, e in want.modules.items()]
    pairs += [(got.modules[k].y_sum, e.y_sum) for k, e in want.modules.items()]
    return max(float((a - b).norm() / b.norm()) for a, b in pairs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviews", type=int, default=128)
    parser.add_argument("--buffer-tokens", type=int, nargs="+", default=[0, 4096])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    verbalizer = Verbalizer(tokenizer)
    (calibration,) = split(load_rotten_tomatoes(), [args.reviews])
    batches = [verbalizer.model_inputs(b) for b in verbalizer.batches(calibration, 8)]
    lora_da.collect_statistics(model, batches[:2], progress=False)  # warm-up
    records = {size: {"seconds": []} for size in args.buffer_tokens}
    reference = None
    for _ in range(args.rounds):
        for size in args.buffer_tokens:
            with CallCounter() as counter:
                start = time.perf_counter()
                stats = lora_da.collect_statistics(model, batches, buffer_tokens=size, population_size=480,
                                                   progress=False)
                records[size]["seconds"].append(time.perf_counter() - start)
            records[size].update(calls=counter.calls, rows=counter.rows, largest_call=counter.largest,
                                 compacted_calls=counter.compacted,
                                 tokens=stats.num_tokens)
            reference = reference or stats
            records[size]["largest relative difference"] = largest_difference(stats, reference)
    first = args.buffer_tokens[0]
    for size, record in records.items():
        median = statistics.median(record["seconds"])
        print(f"buffer_tokens {size:>6}: collection {', '.join(f'{s:.2f}' for s in record['seconds'])} s "
              f"(median {median:.2f}, {median / statistics.median(records[first]['seconds']):.3f}x of "
              f"buffer_tokens {first}); {record['calls']} op calls over {record['rows']} rows, at most "
              f"{record['largest_call']} per call, {record['compacted_calls']} compacted "
              f"({record['tokens']} counted tokens); sums differ by {record['largest relative difference']:.1e}")
    out = Path(os.environ.get("OUT", ROOT / "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "buffering.json").write_text(json.dumps({"args": vars(args), "records": records}, indent=1))


if __name__ == "__main__":
    main()
