"""The ``lora-da`` command: initialise a PEFT LoRA adapter from a JSONL file, or run the main job.

    lora-da init --model DIR --data FILE.jsonl --rank 8 --output ADAPTER_DIR
    lora-da compare [--model DIR --data FILE.jsonl] [--starts peft_default,lora_da,pissa ...]
    lora-da plan --model DIR [--max-memory auto]
    lora-da demo [--steps 60 ...]

Bad input (missing files, a line that is not JSON or lacks the field, a model folder without
weights or tokenizer) is one line on stderr and exit status 2; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import compare_command
from .cli_data import (BadInput, add_adapter_options, calibration_batches, check_numbers, load_model, read_examples,
                       target_modules)
from .config import INPUT_FACTOR_DTYPES

EXIT_BAD_INPUT = 2


# over 60 lines: the command line's option declarations, one after another, read as one list
def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="lora-da",
        description="LoRA-DA: data-aware initialisation of LoRA adapters from a few hundred examples.",
    )
    top.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init", help="initialise a LoRA adapter from calibration text and save it as a PEFT adapter folder",
        description="Initialise a LoRA adapter of a causal language model from calibration examples (one JSON "
                    "object per line) and save it with save_pretrained; load it with PeftModel.from_pretrained.",
    )
    where = init.add_argument_group("input and output")
    where.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model folder (config and weights)")
    where.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: --model)")
    where.add_argument("--data", required=True, metavar="FILE.jsonl", help="calibration examples, one JSON object per line")
    where.add_argument("--output", required=True, metavar="ADAPTER_DIR", help="where the PEFT adapter is written")
    where.add_argument("--save-statistics", metavar="FILE", help="also save the statistics (safetensors) for later solves")
    data = init.add_argument_group("calibration data")
    data.add_argument("--text-field", metavar="FIELD", default="text", help="field holding the text to learn (default: text)")
    data.add_argument("--prompt-field", metavar="FIELD", help="field holding a prompt prepended to the text; its tokens carry no loss")
    data.add_argument("--samples", metavar="N", type=int, default=256, help="calibration examples used, from the top (default 256)")
    data.add_argument("--batch-size", metavar="N", type=int, default=8, help="calibration batch size (default 8)")
    data.add_argument("--max-length", metavar="N", type=int, default=512, help="tokens per example, longer ones are cut (default 512)")
    data.add_argument("--population-size", metavar="N", type=int,
                      help="size of the fine-tuning set N (default: the number of lines in --data)")
    add_adapter_options(init)
    method = init.add_argument_group("LoRA-DA")
    method.add_argument("--variance-weight", metavar="BETA", type=float, default=0.03, help="beta (default 0.03)")
    method.add_argument("--bias-weight", metavar="ALPHA", type=float, default=1.0, help="alpha of the bias term (default 1)")
    method.add_argument("--damping", metavar="LAMBDA", type=float, default=1e-6, help="lambda (default 1e-6)")
    method.add_argument("--damping-mode", default="absolute", choices=["absolute", "relative"],
                        help="relative: lambda times each factor's mean eigenvalue (default absolute, the paper's)")
    method.add_argument("--gamma", metavar="GAMMA", type=float, default=1024.0, help="step size gamma (default 1024)")
    method.add_argument("--balance-factors", action="store_true",
                        help="split B A as U S^1/2, S^1/2 W^T (independent of the subspace's basis)")
    method.add_argument("--output-damping-ratio", metavar="RHO", type=float,
                        help="damp the output factor by RHO * median(y) instead of lambda")
    method.add_argument("--normalize-variance-guidance", action="store_true",
                        help="give the variance term the bias term's Frobenius norm before beta weighs it")
    method.add_argument("--delta-normalization-power", metavar="P", type=float, default=1.0,
                        help="divide Delta by sigma^P * REF^(1-P) (default 1: by sigma)")
    method.add_argument("--delta-normalization-reference", metavar="REF", type=float, default=1.0,
                        help="REF of --delta-normalization-power (default 1)")
    method.add_argument("--solver", default="auto", choices=["auto", "exact", "randomized"])
    method.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    method.add_argument("--max-memory", metavar="BYTES", help="bytes for the statistics, or 'auto' (default: unbounded)")
    run = init.add_argument_group("run")
    run.add_argument("--device", metavar="DEVICE", default="cpu", help="torch device (default cpu)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                     help="model dtype (default float32)")
    run.add_argument("--load-in-4bit", action="store_true",
                     help="QLoRA: load the base in bitsandbytes NF4 (computing in --dtype), as it will be fine-tuned")
    run.add_argument("--seed", metavar="N", type=int, default=0)
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    plan = commands.add_parser(
        "plan", help="what collection will hold for a model and a memory budget, from its config alone",
        description="Print the statistics' size per pass, the passes --max-memory needs and the expected peak, "
                    "for a model built on the meta device from its config.json (no weights are read).",
    )
    plan.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model folder (config.json is enough)")
    plan.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                      help="modules to adapt (default: all-linear)")
    plan.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16", "float64"],
                      help="model dtype (default bfloat16)")
    plan.add_argument("--max-memory", metavar="BYTES", help="bytes for the statistics, or 'auto' (default: unbounded)")
    plan.add_argument("--input-factor-dtype", default="auto", choices=list(INPUT_FACTOR_DTYPES))
    plan.add_argument("--buffer-tokens", metavar="N", type=int, default=4096)
    plan.add_argument("--device", metavar="DEVICE", default="cpu",
                      help="torch device collection will run on, e.g. cuda (default cpu): how Z is summed there")

    compare_command.add_parser(commands)

    # listed for --help; main() hands everything after "demo" to the demo's own parser
    commands.add_parser("demo", help="the main job: SmolLM2-135M on Rotten Tomatoes, LoRA-DA vs PEFT default "
                                     "(lora-da demo --help for its options)")
    return top


def run_init(args) -> None:
    import torch

    import lora_da

    from .quiet import dependency_noise_filtered

    with dependency_noise_filtered():
        from peft import LoraConfig, get_peft_model

    check_numbers(args, ("rank", "samples", "batch_size", "max_length", "population_size"))
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise BadInput(f"--model {model_dir}: no such folder")
    examples = read_examples(Path(args.data), args.text_field, args.prompt_field)
    max_memory = _max_memory(args)
    cfg = _config(  # before the model is loaded
        population_size=args.population_size or len(examples), variance_weight=args.variance_weight,
        bias_weight=args.bias_weight, damping=args.damping, damping_mode=args.damping_mode,
        gamma=args.gamma, solver=args.solver,
        backend=args.backend, seed=args.seed, balance_factors=args.balance_factors,
        output_damping_ratio=args.output_damping_ratio,
        normalize_variance_guidance=args.normalize_variance_guidance,
        delta_normalization_power=args.delta_normalization_power,
        delta_normalization_reference=args.delta_normalization_reference,
    )
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(model_dir, Path(args.tokenizer or args.model), args.dtype, args.device,
                                  args.load_in_4bit)
    batches = calibration_batches(examples[: args.samples], tokenizer, args)
    with dependency_noise_filtered():
        peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora,
                                                      target_modules=target_modules(args), lora_dropout=0.0,
                                                      task_type="CAUSAL_LM"))
    statistics = None
    if args.save_statistics:  # collect here (adapters off, as initialize does) to keep the statistics
        with peft_model.disable_adapter():
            statistics = lora_da.collect_statistics(peft_model, batches, cfg, max_memory=max_memory,
                                                    progress=not args.quiet)
        statistics.save(args.save_statistics)
        print(f"statistics written to {args.save_statistics}")
    report = lora_da.initialize(peft_model, batches, cfg, statistics=statistics, max_memory=max_memory,
                                progress=not args.quiet)
    print(report)
    peft_model.save_pretrained(args.output, save_embedding_layers=False)  # LoRA-DA never changes the vocabulary
    print(f"adapter written to {args.output} (load it with PeftModel.from_pretrained)")


def run_plan(args) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import lora_da

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise BadInput(f"--model {model_dir}: no config.json (not a Hugging Face model folder)")
    cfg = _config(target_modules=target_modules(args), input_factor_dtype=args.input_factor_dtype,
                  buffer_tokens=args.buffer_tokens)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    print(lora_da.plan_memory(model, cfg, _max_memory(args), device=args.device))


def _config(**fields):
    """LoraDAConfig(**fields), its ValueError a BadInput."""
    import lora_da

    try:
        return lora_da.LoraDAConfig(**fields)
    except ValueError as error:
        raise BadInput(str(error)) from None


def _max_memory(args):
    """--max-memory: None, "auto" or a number of bytes."""
    return args.max_memory if args.max_memory in (None, "auto") else _bytes(args.max_memory)


def _bytes(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        raise BadInput(f"--max-memory must be a number of bytes or 'auto', got {text!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from . import demo

        demo.main(argv[1:])
        return 0
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        {"init": run_init, "plan": run_plan, "compare": compare_command.run}[args.command](args)
    except BadInput as error:
        if args.debug:
            raise
        print(f"lora-da: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        if args.debug:
            raise
        print(f"lora-da: error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
