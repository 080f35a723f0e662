"""benchmarks/start_study.py: the input energy it records, its causal-LM evaluation, its statistics."""
import statistics
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lora_da
from conftest import random_batches, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import start_study  # noqa: E402


@pytest.mark.parametrize("start", ["lora_da", "lora_da_rel1e-1"])
def test_input_energies_equal_the_solve_report(start):
    """e(A) computed from the adapter's lora_A is the solve's own diagnostic, module by module."""
    model = get_peft_model(tiny_llama(seed=4), LoraConfig(r=2, target_modules=["q_proj", "up_proj", "down_proj"]))
    batches = random_batches([3, 4], seed=5)
    with model.disable_adapter():
        stats = lora_da.collect_statistics(model, batches, population_size=20, progress=False)
    report = lora_da.initialize(model, None, statistics=stats, progress=False, **start_study.SETTINGS[start])
    diagnostics = {name: figures.input_energy for info in report.solver.shapes.values()
                   for name, figures in info.diagnostics.items()}
    energies = start_study.input_energies(model, stats)
    assert energies.keys() == diagnostics.keys()
    for name, energy in energies.items():
        assert energy == pytest.approx(diagnostics[name], rel=1e-9), name


def test_relative_damping_raises_the_input_energy():
    """The study's premise on a small model: a damping relative to the input scale whitens less."""
    model = get_peft_model(tiny_llama(seed=4, dtype=torch.float32), LoraConfig(r=2, target_modules="all-linear"))
    batches = random_batches([4, 4, 4], seed=6)
    with model.disable_adapter():
        stats = lora_da.collect_statistics(model, batches, population_size=20, progress=False)
    medians = {}
    for start in ("lora_da", "lora_da_rel1"):
        lora_da.initialize(model, None, statistics=stats, progress=False, **start_study.SETTINGS[start])
        medians[start] = statistics.median(start_study.input_energies(model, stats).values())
    assert medians["lora_da_rel1"] > medians["lora_da"]


def test_review_text_evaluates_the_mean_token_loss():
    """The causal-LM evaluation is the model's own mean loss over the predicted tokens."""
    model = tiny_llama(seed=7, dtype=torch.float32)
    batches = random_batches([3, 2], seed=8)
    for batch in batches:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss, accuracy = start_study.ReviewText(tokenizer=None).evaluate(model, batches)
    with torch.no_grad():
        total = sum(float(model(**b).loss) * int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert loss == pytest.approx(total / sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), rel=1e-6)
    assert 0 <= accuracy <= 1


def test_rank_correlation():
    assert start_study.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert start_study.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert start_study.rank_correlation([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4/120


def test_every_setting_is_a_valid_config():
    for overrides in start_study.SETTINGS.values():
        lora_da.LoraDAConfig(**overrides)
