"""The command line's inputs: JSONL examples, a model folder and its tokenizer, batches with labels."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import List, Optional, Sequence

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


class BadInput(Exception):
    """A problem with what the user gave us: reported in one line, never as a traceback."""


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


def check_numbers(args, names: Sequence[str]) -> None:
    """BadInput for an option of ``names`` below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def target_modules(args):
    """--target-modules as PEFT takes them: "all-linear" alone is a string."""
    return args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules


def add_adapter_options(parser) -> None:
    """The LoRA adapter's options (``init`` and ``compare`` share them)."""
    lora = parser.add_argument_group("adapter")
    lora.add_argument("--rank", metavar="R", type=int, default=8, help="LoRA rank r (default 8)")
    lora.add_argument("--lora-alpha", metavar="ALPHA", type=float, default=16.0, help="LoRA alpha (default 16)")
    lora.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    lora.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                      help="PEFT target_modules (default: all-linear)")
