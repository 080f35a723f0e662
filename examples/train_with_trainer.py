"""LoRA-DA with a Hugging Face Trainer: initialise the adapter before the optimizer is built, then train.

Run: python examples/train_with_trainer.py [--steps 2]

A tiny random Llama and random token sequences, so it runs anywhere in seconds. The same recipe
holds for a real model and data set: wrap the model with PEFT, call ``lora_da.initialize`` on a
few hundred training examples, then hand the model to the Trainer. The script trains twice from
the same base, once from PEFT's zero start (lora_B = 0) and once from LoRA-DA's, and prints the
first logged loss of each: LoRA-DA's start has moved the model, the zero start has not.
"""
import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

import lora_da


class RandomSequences(torch.utils.data.Dataset):
    """``size`` examples of ``length`` random tokens, labels = inputs (causal LM)."""

    def __init__(self, size: int, length: int, vocab: int):
        self.ids = torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def first_logged_loss(lora_da_start: bool, steps: int, train_set) -> float:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    if lora_da_start:  # before the Trainer builds its optimizer
        calibration = DataLoader(train_set, batch_size=8, collate_fn=default_data_collator)
        # gamma 16: a larger first step than the default 1024, so that it shows on a tiny random model
        print(lora_da.initialize(model, calibration, population_size=len(train_set), gamma=16.0, progress=False))
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
                                      logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                      disable_tqdm=True)
        trainer = Trainer(model=model, args=arguments, train_dataset=train_set, data_collator=default_data_collator)
        trainer.train()
    return next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    train_set = RandomSequences(64, 16, 64)
    zero = first_logged_loss(False, args.steps, train_set)
    data_aware = first_logged_loss(True, args.steps, train_set)
    print(f"first logged loss: zero start {zero:.6f}, LoRA-DA start {data_aware:.6f}")
    if data_aware == zero:
        raise SystemExit("the LoRA-DA start did not move the model")


if __name__ == "__main__":
    main()
