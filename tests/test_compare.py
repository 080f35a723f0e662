"""``lora-da compare`` and ``lora_da.compare`` end to end on the golden tiny model: the outputs,
the table's columns, the verdict, the adapter it keeps, the one training loop, and bad input."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

import lora_da
from conftest import bad_input as bad, random_batches, tiny_llama, write_examples
from lora_da import cli
from lora_da.comparison import STARTS, Comparison, Run, fine_tune, mean_loss, save_adapter

LORA_DA = Path(sys.executable).with_name("lora-da")


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    return write_examples(tmp_path_factory.mktemp("data") / "examples.jsonl", 40, 1, 4, 10)


def test_the_command_end_to_end(model_dir, examples_file, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [str(LORA_DA), "compare", "--model", str(model_dir), "--data", str(examples_file), "--prompt-field", "prompt",
         "--starts", "peft_default,lora_da,lora_one,pissa", "--steps", "4", "--batch-size", "4", "--heldout", "8",
         "--calibration", "8", "--lr", "1e-2", "--seeds", "0", "1", "--output", str(out),
         "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("table.md", "table.csv", "heldout_loss.png", "runs.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "adapter" / ".starts").exists()
    header = (out / "table.md").read_text().splitlines()[0]
    assert header == "| start | seeds | loss step 0 | loss step 1 | loss step 2 | loss step 3 | loss step 4 | init s | train s |"
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert {row["start"] for row in rows} == {"peft_default", "lora_da", "lora_one", "pissa"}
    assert len(rows) == 4 * 2 * 5 and set(rows[0]) == {"start", "seed", "step", "heldout_loss", "init_seconds",
                                                       "train_seconds"}
    runs = json.loads((out / "runs.json").read_text())["runs"]
    comparison = Comparison([Run(**{**r, "heldout": {int(k): v for k, v in r["heldout"].items()}}) for r in runs])
    best, loss, _ = comparison.ranking()[0]
    verdict = done.stdout.strip().splitlines()[-1]
    assert verdict.startswith(f"best start: {best}, final held-out loss {loss:.4f}, ")
    assert "(mean of 2 seeds)" in verdict
    # every start began from the same held-out loss but for the data-aware ones, and from the same model
    assert len({r["heldout"]["0"]["loss"] for r in runs if r["start"] == "peft_default"}) == 1
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] in (8, 16)  # PiSSA's adapter is converted to rank 2r for the original base


def test_verdict_says_within_noise():
    def run(start, seed, loss):
        return Run(start, seed, 1.0, 2.0, [loss], {0: {"loss": 3.0}, 1: {"loss": loss}})

    close = Comparison([run("a", 0, 1.00), run("a", 1, 1.10), run("b", 0, 1.04), run("b", 1, 1.08)])
    assert close.verdict() == ("best start: a, final held-out loss 1.0500, 0.0100 below b (mean of 2 seeds): "
                               "within noise (spread across seeds 0.0707)")
    apart = Comparison([run("a", 0, 1.00), run("a", 1, 1.01), run("b", 0, 1.50), run("b", 1, 1.51)])
    assert apart.verdict() == "best start: a, final held-out loss 1.0050, 0.5000 below b (mean of 2 seeds)"
    assert Comparison([run("a", 0, 1.0), run("b", 0, 0.9)]).verdict() == \
        "best start: b, final held-out loss 0.9000, 0.1000 below a (one seed: --seeds 0 1 2 tells a margin from noise)"


def test_compare_equals_training_each_start_by_hand():
    """The API's records are what a hand-written loop gives: same seeds, batches, optimiser."""
    batches = random_batches([3, 2, 4, 3, 2], seed=8)
    train, heldout = batches[:3], batches[3:]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    got = lora_da.compare(lambda seed: tiny_llama(seed=2), train, heldout, lora_config=config,
                          starts=["peft_default", "lora_da"], calibration=train, population_size=30, steps=5, lr=1e-2,
                          eval_steps=[2], progress=False)
    assert [(r.start, sorted(r.heldout)) for r in got.runs] == [("peft_default", [0, 2, 5]), ("lora_da", [0, 2, 5])]
    for run in got.runs:
        base = tiny_llama(seed=2)  # seeds the global generator itself: made before the start's seed is set
        torch.manual_seed(0)
        model = STARTS[run.start].make(base, config, train, 30)
        torch.manual_seed(0)
        curve, figures = fine_tune(model, train, 5, 1e-2, lambda m: mean_loss(m, heldout), [2, 5])
        assert curve == run.train_loss and figures == run.heldout
    assert got.runs[0].heldout[0] != got.runs[1].heldout[0]  # LoRA-DA's start moves the model, PEFT's does not


def test_a_start_that_rewrites_the_base_is_saved_for_the_original_base(tmp_path):
    batches = random_batches([3, 2], seed=3)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = STARTS["pissa"].make(tiny_llama(seed=5, dtype=torch.float32), config, batches, 10)
    model.peft_config["default"].init_lora_weights = True
    save_adapter(model, tmp_path / "initial")
    fine_tune(model, batches, 3, 1e-2, lambda m: {}, [])
    save_adapter(model, tmp_path / "final", tmp_path / "initial")
    loaded = PeftModel.from_pretrained(tiny_llama(seed=5, dtype=torch.float32), str(tmp_path / "final"))
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, model(**batches[0]).logits, rtol=1e-4, atol=1e-5)


def test_bad_input_is_one_line_before_any_training(model_dir, examples_file, tmp_path, capsys, monkeypatch):
    import lora_da.comparison

    monkeypatch.setattr(lora_da.comparison, "fine_tune", lambda *a, **k: pytest.fail("training started"))
    base = ["compare", "--model", str(model_dir), "--data", str(examples_file), "--prompt-field", "prompt",
            "--output", str(tmp_path / "out"), "--quiet"]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": "the film was good"}) + "\n" for _ in range(5)))
    assert "5 examples: too few to hold out 1 and keep a batch of 8" in bad(
        [*base[:3], "--data", str(small), *base[7:]], capsys)
    assert "no string field 'body'" in bad([*base, "--text-field", "body"], capsys)
    assert "--starts pissa rewrites the base weights" in bad([*base, "--starts", "lora_da,pissa", "--load-in-4bit"],
                                                              capsys)
    assert "--starts: pissa: PEFT makes it in float32, float16 or bfloat16 only, and the base is float64" in bad(
        [*base, "--starts", "lora_da,pissa", "--dtype", "float64"], capsys)
    assert "--starts: unknown starts ['loraga']; choose from ['peft_default', 'lora_da', 'pissa'" in bad(
        [*base, "--starts", "lora_da,loraga"], capsys)
    assert "--heldout must be a share" in bad([*base, "--heldout", "ten"], capsys)
    assert "--model and --data go together" in bad(["compare", "--model", str(model_dir)], capsys)
    monkeypatch.setattr(lora_da.compare_command, "available_bytes", lambda device: 1)
    assert "GiB for two copies of its weights in float32, cpu has 0.0 GiB free" in bad(base, capsys)


def test_help_lists_the_options():
    done = subprocess.run([str(LORA_DA), "compare", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for option in ("--model DIR", "--data FILE.jsonl", "--text-field", "--prompt-field", "--starts", "--rank",
                   "--lora-alpha", "--rslora", "--steps", "--lr", "--batch-size", "--heldout", "--device", "--dtype",
                   "--seeds", "--output DIR"):
        assert option in done.stdout, option


def test_the_model_loads_the_kept_adapter(model_dir, examples_file, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["compare", "--model", str(model_dir), "--data", str(examples_file), "--steps", "2",
                     "--batch-size", "4", "--calibration", "8", "--output", str(out), "--quiet"]) == 0
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = PeftModel.from_pretrained(base, str(out / "adapter"), is_trainable=True)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_the_starts_run_on_a_4bit_base(model_dir, examples_file, tmp_path, capsys):
    """QLoRA: the base in NF4 (bitsandbytes' CPU backend here); the starts that keep the base run."""
    out = tmp_path / "out"
    assert cli.main(["compare", "--model", str(model_dir), "--data", str(examples_file), "--prompt-field", "prompt",
                     "--starts", "peft_default,lora_da,lora_one", "--steps", "2", "--batch-size", "4",
                     "--calibration", "8", "--load-in-4bit", "--output", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert {row["start"] for row in rows} == {"peft_default", "lora_da", "lora_one"}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("best start: ")
