"""benchmarks/compare_inits.py: every initialiser it compares sets up a trainable adapter."""
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import classification_batches, random_batches, tiny_bert_classifier, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_inits  # noqa: E402


def tiny_task(kind: str):
    """The benchmark's two task shapes on tiny random models: a causal LM and a BERT classifier."""
    if kind == "llama":
        task = compare_inits.Task("tiny_llama", "", 1e-3, "CAUSAL_LM", compare_inits.TASKS["smollm2"].target_modules,
                                  lambda seed: (tiny_llama(seed=2, dtype=torch.float32), None))
        batches = random_batches([4, 4], seed=3)
    else:
        task = compare_inits.Task("tiny_bert", "", 1e-3, "SEQ_CLS", compare_inits.TASKS["minilm"].target_modules,
                                  lambda seed: (tiny_bert_classifier(seed=2, dtype=torch.float32), None))
        batches = classification_batches([4, 4], seed=3)
    base = task.base(0)
    task.encoder = compare_inits.SentenceClassifier(tokenizer=None)  # model_inputs passes batches through
    return task, base, batches


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("init", compare_inits.INITS)
def test_initialiser_gives_a_trainable_adapter(init, kind):
    task, base, batches = tiny_task(kind)
    model = compare_inits.initialise(init, task, base, 2, batches, population=50)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(torch.isfinite(p).all() for p in lora.values())
    if kind == "bert":
        assert not any("pooler" in n for n in lora)
    nonzero_b = [n for n, p in lora.items() if "lora_B" in n and p.abs().sum() > 0]
    if init in ("peft_default", "gaussian", "eva"):  # B starts at zero
        assert not nonzero_b
    else:
        assert nonzero_b
    loss = model(**batches[0]).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())


def test_sentence_classifier_evaluates_cross_entropy_and_accuracy():
    model = tiny_bert_classifier(seed=2, dtype=torch.float32)
    batches = classification_batches([4, 3], seed=3)
    loss, accuracy = compare_inits.SentenceClassifier(tokenizer=None).evaluate(model, batches)
    logits = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]).detach()
    labels = torch.cat([b["labels"] for b in batches])
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    assert accuracy == pytest.approx(float((logits.argmax(1) == labels).float().mean()))


def test_lora_one_is_the_top_singular_subspace_of_the_gradient():
    import lora_da

    batches = random_batches([4, 4], seed=3)
    task, _, _ = tiny_task("llama")
    model = compare_inits.initialise("lora_one", task, tiny_llama(seed=2, dtype=torch.float64), 2, batches, population=50)
    stats = lora_da.collect_statistics(tiny_llama(seed=2, dtype=torch.float64), batches, progress=False,
                                       target_modules=["q_proj"])
    name = "model.layers.0.self_attn.q_proj"
    layer = dict(model.base_model.model.named_modules())[name]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    u, s, vh = torch.linalg.svd(-stats.gradient(name), full_matrices=False)
    want = (u[:, :2] * s[:2]) @ vh[:2] / (s[0] * 1024)  # B A = (-G / sigma) V V^T / gamma
    torch.testing.assert_close(b @ a, want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(a @ a.T * 1024, torch.eye(2, dtype=a.dtype), rtol=0, atol=1e-10)
    assert math.isclose(float(torch.linalg.matrix_norm((b @ a).detach() * 1024, 2)), 1.0, rel_tol=1e-8)


def fake_record(task: str, init: str, rank: int, seed: int, last_loss: float) -> dict:
    preset = compare_inits.PRESETS["quick"]["minilm"]
    steps = preset["steps"]
    return {"task": task, "init": init, "rank": rank, "seed": seed, "preset": preset, "init_seconds": 2.0 + seed,
            "curve": [1.0] * steps, "evaluations": {"0": [0.7, 0.5], str(steps): [last_loss, 0.75]}}


def test_table_gives_mean_and_std_over_seeds_per_task_and_rank(tmp_path):
    records = [fake_record("minilm_rotten_tomatoes", "lora_da", 8, seed, loss)
               for seed, loss in enumerate([0.5, 0.6, 0.7])]
    records.append(fake_record("minilm_rotten_tomatoes", "peft_default", 8, 0, 0.4))
    table = compare_inits.summarise(records, tmp_path)
    rows = table.splitlines()[2:]
    assert rows[0] == ("| minilm_rotten_tomatoes | 20 | 8 | peft_default | 1 | 2.0 | 0.7000 | 0.5000 | 0.4000 | "
                       "0.7500 |")
    assert rows[1] == ("| minilm_rotten_tomatoes | 20 | 8 | lora_da | 3 | 3.0 | 0.7000 ± 0.0000 | 0.5000 ± 0.0000 | "
                       "0.6000 ± 0.1000 | 0.7500 ± 0.0000 |")
    assert (tmp_path / "table.md").read_text() == table


def test_resume_refuses_runs_of_another_preset(tmp_path, monkeypatch):
    import json

    record = fake_record("minilm_rotten_tomatoes", "lora_da", 8, 0, 0.5)  # a quick-preset run
    (tmp_path / "compare_inits").mkdir()
    (tmp_path / "compare_inits" / "runs.json").write_text(json.dumps({"records": [record]}))
    monkeypatch.setenv("OUT", str(tmp_path))
    with pytest.raises(SystemExit) as error:
        compare_inits.main(["--resume", "--tasks", "minilm"])
    assert error.value.code == 2
