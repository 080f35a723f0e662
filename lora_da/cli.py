"""The ``lora-da`` command: initialise a PEFT LoRA adapter from a JSONL file, or run the main job.

    lora-da init --model DIR --data FILE.jsonl --rank 8 --output ADAPTER_DIR
    lora-da demo [--steps 60 ...]

Bad input (missing files, a line that is not JSON or lacks the field, a model folder without
weights or tokenizer) is one line on stderr and exit status 2; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .config import INPUT_FACTOR_DTYPES

EXIT_BAD_INPUT = 2
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


class BadInput(Exception):
    """A problem with what the user gave us: reported in one line, never as a traceback."""


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
    lora = init.add_argument_group("adapter")
    lora.add_argument("--rank", metavar="R", type=int, default=8, help="LoRA rank r (default 8)")
    lora.add_argument("--lora-alpha", metavar="ALPHA", type=float, default=16.0, help="LoRA alpha (default 16)")
    lora.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    lora.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                      help="PEFT target_modules (default: all-linear)")
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

    # listed for --help; main() hands everything after "demo" to the demo's own parser
    commands.add_parser("demo", help="the main job: SmolLM2-135M on Rotten Tomatoes, LoRA-DA vs PEFT default "
                                     "(lora-da demo --help for its options)")
    return top


def read_examples(path: Path, text_field: str, prompt_field: Optional[str]) -> List[dict]:
    """The JSONL lines as dicts with the fields checked (line numbers in the errors)."""
    if not path.is_file():
        raise BadInput(f"--data {path}: no such file")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BadInput(f"--data {path}, line {number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise BadInput(f"--data {path}, line {number}: expected a JSON object, got {type(record).__name__}")
            for field in filter(None, (text_field, prompt_field)):
                if not isinstance(record.get(field), str):
                    raise BadInput(f"--data {path}, line {number}: no string field {field!r} "
                                   f"(fields: {', '.join(sorted(record)) or 'none'})")
            examples.append(record)
    if not examples:
        raise BadInput(f"--data {path}: no examples")
    return examples


def load_model(model_dir: Path, tokenizer_dir: Path, dtype_name: str, device: str, load_in_4bit: bool = False):
    """(model on ``device``, tokenizer); with ``load_in_4bit`` the base's linear layers in NF4,
    prepared for k-bit training (PEFT's ``prepare_model_for_kbit_training``, without gradient
    checkpointing) as a QLoRA run prepares it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise BadInput(f"--model {model_dir}: no config.json (not a Hugging Face model folder)")
    if not any(any(model_dir.glob(pattern)) for pattern in WEIGHT_FILES):
        raise BadInput(f"--model {model_dir}: no weights (*.safetensors, *.bin) in the folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        raise BadInput(f"--tokenizer {tokenizer_dir}: no usable tokenizer ({str(error).splitlines()[0]}); "
                       "pass --tokenizer DIR") from None
    dtype = getattr(torch, dtype_name)
    if not load_in_4bit:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype)
        return model.to(device), tokenizer
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BadInput("--load-in-4bit needs bitsandbytes: pip install 'lora-da[quant]'")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype,
                                                 quantization_config=quantization, device_map=device)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), tokenizer


def calibration_batches(examples: Sequence[dict], tokenizer, args) -> List[dict]:
    """Right-padded batches with labels; prompt tokens and padding carry label -100."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise BadInput("the tokenizer has neither a pad nor an end-of-sequence token")
    rows = []
    for example in examples:
        if args.prompt_field:
            prompt = tokenizer(example[args.prompt_field]).input_ids
            ids = prompt + tokenizer(example[args.text_field], add_special_tokens=False).input_ids
        else:
            prompt, ids = [], tokenizer(example[args.text_field]).input_ids
        ids = ids[: args.max_length]
        if len(ids) <= len(prompt):
            raise BadInput(f"an example's text is empty after its prompt at --max-length {args.max_length}")
        rows.append((ids, len(prompt)))
    batches = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start: start + args.batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, prompt_length: len(ids)] = torch.tensor(ids[prompt_length:])
        batches.append({"input_ids": input_ids, "attention_mask": attention, "labels": labels})
    return batches


def check_numbers(args) -> None:
    for name in ("rank", "samples", "batch_size", "max_length", "population_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def run_init(args) -> None:
    import torch

    import lora_da

    from .quiet import dependency_noise_filtered

    with dependency_noise_filtered():
        from peft import LoraConfig, get_peft_model

    check_numbers(args)
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
                                                      target_modules=_target_modules(args), lora_dropout=0.0,
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
    cfg = _config(target_modules=_target_modules(args), input_factor_dtype=args.input_factor_dtype,
                  buffer_tokens=args.buffer_tokens)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    print(lora_da.plan_memory(model, cfg, _max_memory(args)))


def _config(**fields):
    """LoraDAConfig(**fields), its ValueError a BadInput."""
    import lora_da

    try:
        return lora_da.LoraDAConfig(**fields)
    except ValueError as error:
        raise BadInput(str(error)) from None


def _target_modules(args):
    """--target-modules as PEFT takes them: "all-linear" alone is a string."""
    return args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules


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
        {"init": run_init, "plan": run_plan}[args.command](args)
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
