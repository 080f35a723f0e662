"""Activation checkpointing: forwards run twice (reentrant and non-reentrant recomputation), each
use counted once, statistics equal to those without checkpointing; the QLoRA recipe's defaults."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import lora_da
from conftest import random_batches, tiny_llama

VOCAB = 50


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, h):
        return h + self.down(torch.tanh(self.up(h)))


class Toy(nn.Module):
    """Embedding, two residual MLP blocks run through ``run_block``, a head; per-sequence mean loss."""

    def __init__(self, run_block=None, width: int = 12):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(2)])
        self.head = nn.Linear(width, VOCAB)
        self.run_block = run_block or (lambda block, h: block(h))

    def forward(self, input_ids, attention_mask, labels):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = self.run_block(block, h)
        logits = self.head(h)[:, :-1]
        losses = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
        counts = (labels[:, 1:] != -100).sum(dim=1)
        return {"loss": (losses.sum(dim=1) / counts).mean()}


def wrapped(toy: Toy) -> Toy:
    """The same model with each block behind FSDP's checkpoint_wrapper (non-reentrant)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    toy.blocks = nn.ModuleList([checkpoint_wrapper(block) for block in toy.blocks])
    return toy


def inputs_require_grad(toy: Toy) -> Toy:
    toy.embed.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    return toy


def sum_of_sequence_means(model, batch):
    """The toy's loss is the mean over sequences of each one's mean token loss."""
    return model(**batch)["loss"] * batch["input_ids"].shape[0]


def statistics(model, **kw):
    return lora_da.collect_statistics(model, random_batches([3, 2, 4]), target_modules=["up", "down"],
                                      loss_fn=sum_of_sequence_means, progress=False, **kw)


def plain_names(mapping):
    """``mapping`` keyed by module names without checkpoint_wrapper's inner module."""
    return {key.replace("._checkpoint_wrapped_module", ""): value for key, value in mapping.items()}


def assert_same_statistics(got, want):
    assert got.num_tokens == want.num_tokens and got.num_sequences == want.num_sequences
    inputs, modules = plain_names(got.inputs), plain_names(got.modules)
    assert inputs.keys() == want.inputs.keys() and modules.keys() == want.modules.keys()
    for key, entry in want.inputs.items():
        assert inputs[key].num_tokens == entry.num_tokens, key
        assert not inputs[key].z_sum.requires_grad, key
        torch.testing.assert_close(inputs[key].z_sum, entry.z_sum, rtol=1e-5, atol=1e-6)
    for name, module in want.modules.items():
        torch.testing.assert_close(modules[name].g_sum, module.g_sum, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(modules[name].y_sum, module.y_sum, rtol=1e-5, atol=1e-9)


CHECKPOINTED = {
    "reentrant": lambda: inputs_require_grad(Toy(lambda block, h: checkpoint(block, h, use_reentrant=True))),
    "non_reentrant": lambda: Toy(lambda block, h: checkpoint(block, h, use_reentrant=False)),
    "checkpoint_wrapper": lambda: wrapped(Toy()),
}


@pytest.mark.parametrize("kind", CHECKPOINTED)
def test_checkpointed_model_gives_the_statistics_and_factors_without_checkpointing(kind):
    want = statistics(Toy())
    got = statistics(CHECKPOINTED[kind]())
    assert_same_statistics(got, want)
    cfg = lora_da.LoraDAConfig(rank=2, target_modules=["up", "down"], population_size=100)
    wanted, solved = lora_da.solve(want, cfg, progress=False), plain_names(lora_da.solve(got, cfg, progress=False))
    for name, factors in wanted.items():
        torch.testing.assert_close(solved[name].lora_B @ solved[name].lora_A, factors.lora_B @ factors.lora_A,
                                   rtol=1e-4, atol=1e-7)


def test_reentrant_checkpointing_with_frozen_inputs_names_the_cause():
    toy = Toy(lambda block, h: checkpoint(block, h, use_reentrant=True))
    with pytest.raises(RuntimeError, match="reentrant activation checkpointing.*enable_input_require_grads"):
        statistics(toy)


def test_hugging_face_checkpointing_flag_changes_nothing():
    """What prepare_model_for_kbit_training does to a quantized base by default (the QLoRA recipe,
    tests/test_quantized.py): checkpointing on (reentrant), input gradients on, training mode."""
    batches = random_batches([2, 3], seed=4)
    want = lora_da.collect_statistics(tiny_llama(seed=6, dtype=torch.float32), batches, progress=False)
    model = tiny_llama(seed=6, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert_same_statistics(lora_da.collect_statistics(model, batches, progress=False), want)
