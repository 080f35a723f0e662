"""``lora-da compare``: the starts fine-tuned on the user's own model and data (``lora_da.compare``).

    lora-da compare                                          # the embedded default: SmolLM2, Rotten Tomatoes
    lora-da compare --model DIR --data FILE.jsonl --prompt-field prompt --starts peft_default,lora_da,pissa
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .cli_data import (BadInput, add_adapter_options, calibration_batches, check_numbers, load_model, read_examples,
                       target_modules)

EMBEDDED_EXAMPLES = 512  # reviews of the embedded default: a tenth held out, 50 steps of 8 from the rest
HELDOUT_SHARE = 0.1  # --heldout's default


def add_parser(commands) -> None:
    """The ``compare`` subcommand and its options."""
    compare = commands.add_parser(
        "compare", help="fine-tune from several starts (PEFT default, LoRA-DA, ...) and compare held-out loss",
        description="Fine-tune the same model from each start with the same adapter, batches, optimiser and seed; "
                    "print held-out loss along the way and name the best start. Without --model and --data: "
                    "SmolLM2-135M on Rotten Tomatoes sentiment (the embedded default).")
    where = compare.add_argument_group("model, data and output")
    where.add_argument("--model", metavar="DIR", help="Hugging Face causal LM folder (default: the embedded SmolLM2)")
    where.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: --model)")
    where.add_argument("--data", metavar="FILE.jsonl", help="examples, one JSON object per line (with --model)")
    where.add_argument("--text-field", metavar="FIELD", default="text",
                       help="field with the text to learn (default: text)")
    where.add_argument("--prompt-field", metavar="FIELD",
                       help="field with a prompt before the text; its tokens carry no loss")
    where.add_argument("--max-length", metavar="N", type=int, default=512, help="tokens per example (default 512)")
    where.add_argument("--output", metavar="DIR", default="outputs/compare",
                       help="table (CSV, markdown), plot, runs.json and the best start's adapter "
                            "(default outputs/compare)")
    runs = compare.add_argument_group("the comparison")
    runs.add_argument("--starts", default="peft_default,lora_da", metavar="A,B,...",
                      help="comma-separated: peft_default, lora_da, pissa, lora_one, lora_da_relative "
                           "(default peft_default,lora_da)")
    runs.add_argument("--heldout", metavar="P%|N",
                      help="held-out share (a number and %%) or count of examples (default: a tenth)")
    runs.add_argument("--calibration", metavar="N", type=int, default=64,
                      help="calibration examples for the starts that read data, from the training part (default 64)")
    runs.add_argument("--steps", metavar="N", type=int, default=50, help="training steps per start (default 50)")
    runs.add_argument("--batch-size", metavar="N", type=int, default=8, help="batch size (default 8)")
    runs.add_argument("--lr", metavar="LR", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    runs.add_argument("--seeds", "--seed", metavar="N", type=int, nargs="+", default=[0],
                      help="one run per start and seed; the verdict says 'within noise' where the margin is below "
                           "the spread across seeds (default 0)")
    add_adapter_options(compare)
    where = compare.add_argument_group("run")
    where.add_argument("--device", metavar="DEVICE", default="cpu", help="torch device (default cpu)")
    where.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                       help="model dtype (default float32)")
    where.add_argument("--load-in-4bit", action="store_true", help="QLoRA: the base in bitsandbytes NF4")
    where.add_argument("--quiet", action="store_true", help="no progress bars")


def heldout_count(text: Optional[str], examples: int) -> int:
    """--heldout as a number of examples: a share (P%) of ``examples``, rounded up, or a count;
    None: HELDOUT_SHARE of them."""
    if text is None:
        return math.ceil(HELDOUT_SHARE * examples)
    try:
        return math.ceil(float(text[:-1]) / 100 * examples) if text.endswith("%") else int(text)
    except ValueError:
        raise BadInput(f"--heldout must be a share (a number and %) or a number of examples, got {text!r}") from None


def split_examples(examples: Sequence[dict], args) -> Tuple[list, list, list]:
    """(training, held-out, calibration) examples: a shuffle by the first seed, the held-out part
    disjoint from training, the calibration examples the first of the training part."""
    held = heldout_count(args.heldout, len(examples))
    train = len(examples) - held
    if held < 1 or train < args.batch_size:
        raise BadInput(f"--data has {len(examples)} examples: too few to hold out {held} and keep "
                       f"a batch of {args.batch_size} to train on")
    order = list(range(len(examples)))
    random.Random(args.seeds[0]).shuffle(order)
    shuffled = [examples[i] for i in order]
    training, heldout = shuffled[:train], shuffled[train:]
    return training, heldout, training[: args.calibration]


def embedded_examples() -> List[dict]:
    """The embedded default's examples: a Rotten Tomatoes review as the prompt, its label word as the text."""
    from .embedded import PROMPT, VERBALIZER, load_rotten_tomatoes

    return [{"prompt": PROMPT.format(text=text), "text": VERBALIZER[label]}
            for text, label in load_rotten_tomatoes()[:EMBEDDED_EXAMPLES]]


def available_bytes(device: str) -> int:
    """Free memory of ``device``: the accelerator's free memory, or the host's available pages."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def weight_values(model_dir: Path) -> int:
    """Values stored in the folder's weights: counted from the safetensors headers, else the .bin
    files' bytes over 4 (fp32)."""
    from safetensors import safe_open

    values = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as tensors:
            values += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
    return values or sum(p.stat().st_size for p in model_dir.glob("*.bin")) // 4


def check_fits(model_dir: Path, dtype: str, device: str, load_in_4bit: bool) -> None:
    """BadInput when two copies of the weights in ``dtype`` (the base and the copy being trained)
    are over the device's free memory."""
    import torch

    need = 2 * weight_values(model_dir) * (0.5 if load_in_4bit else torch.finfo(getattr(torch, dtype)).bits / 8)
    free = available_bytes(device)
    if need > free:
        raise BadInput(f"--model {model_dir}: about {need / 2**30:.1f} GiB for two copies of its weights in {dtype}, "
                       f"{device} has {free / 2**30:.1f} GiB free")


def check_starts(names: List[str], load_in_4bit: bool) -> list:
    """The ``Start`` of each of ``names``; BadInput for an unknown one, or one that rewrites the base
    weights on a 4-bit base."""
    from .comparison import chosen_starts

    try:
        starts = chosen_starts(names)
    except ValueError as error:
        raise BadInput(f"--starts: {error}") from None
    rewriting = [start.name for start in starts if start.rewrites_base]
    if load_in_4bit and rewriting:
        raise BadInput(f"--starts {','.join(rewriting)} rewrites the base weights (W - s B A), which a 4-bit base "
                       "cannot hold: drop it or --load-in-4bit")
    return starts


def read_user_examples(args) -> List[dict]:
    """The examples of --data, for --model."""
    if args.data is None:
        raise BadInput("--model and --data go together (neither: the embedded default)")
    if not Path(args.model).is_dir():
        raise BadInput(f"--model {args.model}: no such folder")
    return read_examples(Path(args.data), args.text_field, args.prompt_field)


def load(args) -> tuple:
    """(model on --device, tokenizer): --model's, checked to fit first, or the embedded SmolLM2."""
    import torch

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.model is not None:
        check_fits(Path(args.model), args.dtype, args.device, args.load_in_4bit)
        return load_model(Path(args.model), Path(args.tokenizer or args.model), args.dtype, args.device,
                          args.load_in_4bit)
    from .embedded import load_smollm2

    model, tokenizer = load_smollm2(getattr(torch, args.dtype))
    return model.to(args.device), tokenizer


def run(args) -> None:
    """``lora-da compare``: bad input refused before any training, then ``compare`` and its outputs."""
    from .comparison import compare, refusals
    from .quiet import dependency_noise_filtered

    check_numbers(args, ("rank", "max_length", "batch_size", "steps", "calibration"))
    starts = [name.strip() for name in args.starts.split(",") if name.strip()]
    chosen = check_starts(starts, args.load_in_4bit)
    if args.data is not None and args.model is None:
        raise BadInput("--model and --data go together (neither: the embedded default)")
    examples = read_user_examples(args) if args.model is not None else embedded_examples()
    if args.model is None:
        args.text_field, args.prompt_field = "text", "prompt"
    training, heldout, calibration = split_examples(examples, args)
    model, tokenizer = load(args)
    refused = refusals(chosen, model)
    if refused:
        raise BadInput(f"--starts: {'; '.join(refused)}")
    batches = {name: calibration_batches(part, tokenizer, args)
               for name, part in (("train", training), ("heldout", heldout), ("calibration", calibration))}
    device = next(model.parameters()).device
    batches = {name: [{k: v.to(device) for k, v in b.items()} for b in part] for name, part in batches.items()}
    with dependency_noise_filtered():
        from peft import LoraConfig

        lora_config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora, lora_dropout=0.0,
                                 target_modules=target_modules(args), task_type="CAUSAL_LM")
    output = Path(args.output)
    (output / "adapter").mkdir(parents=True, exist_ok=True)
    print(f"{len(training)} training examples ({args.steps} steps of {args.batch_size}), {len(heldout)} held out, "
          f"{len(calibration)} for calibration; starts {', '.join(starts)}; seeds {args.seeds}", flush=True)
    comparison = compare(lambda seed: model, batches["train"], batches["heldout"], lora_config=lora_config,
                         starts=chosen, calibration=batches["calibration"], population_size=len(training),
                         steps=args.steps, lr=args.lr, seeds=args.seeds, adapter_folder=output / "adapter",
                         progress=not args.quiet)
    table = comparison.table()
    (output / "table.md").write_text(table + "\n")
    comparison.write_csv(output / "table.csv")
    if not comparison.plot(output / "heldout_loss.png"):
        print("no plot: pip install matplotlib")
    (output / "runs.json").write_text(json.dumps({"args": vars(args), **comparison.to_json()}, indent=1))
    best = comparison.ranking()[0][0]
    print(table)
    print(f"table, plot and runs in {output}; the adapter of {best} in {output / 'adapter'} "
          "(PeftModel.from_pretrained(base, folder, is_trainable=True) goes on from it)")
    print(comparison.verdict())
