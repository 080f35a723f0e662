"""The ``lora-da`` command on the golden tiny model with a JSONL written here."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import lora_da
from conftest import bad_input as bad, write_examples
from lora_da import cli
from lora_da.memory import HELD_ROWS_PER_FEATURE

LORA_DA = Path(sys.executable).with_name("lora-da")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_examples(tmp_path_factory.mktemp("data") / "calibration.jsonl", 13, 0, 4, 12, id=7)


def test_init_writes_an_adapter_that_peft_loads_and_equals_the_library(model_dir, data_file, tmp_path):
    out, saved = tmp_path / "adapter", tmp_path / "stats.safetensors"
    args = ["init", "--model", str(model_dir), "--data", str(data_file), "--rank", "4", "--output", str(out),
            "--prompt-field", "prompt", "--batch-size", "4", "--dtype", "float64", "--rslora", "--quiet"]
    done = subprocess.run([str(LORA_DA), *args, "--save-statistics", str(saved)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LoRA-DA initialisation" in done.stdout and "adapter written to" in done.stdout
    assert "Warning" not in done.stderr, done.stderr  # PEFT's FutureWarning is filtered at get_peft_model
    stats = lora_da.Statistics.load(saved)
    assert len(stats.modules) == 14 and stats.num_sequences == 13
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)).double(), str(out))
    assert loaded.peft_config["default"].r == 4 and loaded.peft_config["default"].use_rslora

    # the same initialisation through the library
    parsed = cli.parser().parse_args(args)
    model, tokenizer = cli.load_model(model_dir, model_dir, "float64", "cpu")
    batches = cli.calibration_batches(cli.read_examples(data_file, "text", "prompt"), tokenizer, parsed)
    assert all(int((b["labels"] != -100).sum()) > 0 for b in batches)
    want = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear"))
    lora_da.initialize(want, batches, population_size=13, progress=False)
    wanted = {n: p for n, p in want.named_parameters() if "lora_" in n}
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert wanted.keys() == got.keys() and len(got) == 28
    for name, value in wanted.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12)


def test_the_authors_options_reach_the_factors(model_dir, data_file, tmp_path):
    """The options' flags give the library's factors with the same config fields."""
    out = tmp_path / "adapter"
    options = {"balance_factors": True, "output_damping_ratio": 0.1, "normalize_variance_guidance": True,
               "delta_normalization_power": 0.5, "delta_normalization_reference": 2.0,
               "damping_mode": "relative", "damping": 1e-2}
    flags = ["--balance-factors", "--output-damping-ratio", "0.1", "--normalize-variance-guidance",
             "--delta-normalization-power", "0.5", "--delta-normalization-reference", "2",
             "--damping-mode", "relative", "--damping", "1e-2"]
    args = ["init", "--model", str(model_dir), "--data", str(data_file), "--rank", "4", "--output", str(out),
            "--dtype", "float64", "--quiet", *flags]
    assert cli.main(args) == 0
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)).double(), str(out))
    model, tokenizer = cli.load_model(model_dir, model_dir, "float64", "cpu")
    batches = cli.calibration_batches(cli.read_examples(data_file, "text", None), tokenizer, cli.parser().parse_args(args))
    want = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    lora_da.initialize(want, batches, population_size=13, progress=False, **options)
    plain = get_peft_model(cli.load_model(model_dir, model_dir, "float64", "cpu")[0],
                           LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    lora_da.initialize(plain, batches, population_size=13, progress=False)
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    for name, value in want.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(got[n], p) for n, p in plain.named_parameters() if "lora_" in n)
    # PEFT reloads an adapter frozen unless asked: is_trainable=True gives the same factors, trainable
    assert not any(p.requires_grad for p in got.values())
    trainable = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)).double(), str(out),
                                          is_trainable=True)
    for name, value in trainable.named_parameters():
        if "lora_" in name:
            assert value.requires_grad and torch.equal(value, got[name]), name


def test_load_in_4bit_initialises_the_nf4_base(model_dir, data_file, tmp_path):
    """--load-in-4bit: the adapter holds the factors that the library gets on the same NF4 base."""
    pytest.importorskip("bitsandbytes", reason="the quant extra (bitsandbytes) is not installed")
    out = tmp_path / "adapter"
    args = ["init", "--model", str(model_dir), "--data", str(data_file), "--rank", "4", "--output", str(out),
            "--quiet", "--load-in-4bit"]
    assert cli.main(args) == 0
    model, tokenizer = cli.load_model(model_dir, model_dir, "float32", "cpu", load_in_4bit=True)
    assert type(model.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "Linear4bit"
    batches = cli.calibration_batches(cli.read_examples(data_file, "text", None), tokenizer, cli.parser().parse_args(args))
    want = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    lora_da.initialize(want, batches, population_size=13, progress=False)
    loaded = PeftModel.from_pretrained(cli.load_model(model_dir, model_dir, "float32", "cpu", load_in_4bit=True)[0],
                                       str(out))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    wanted = {n: p for n, p in want.named_parameters() if "lora_" in n}
    assert got.keys() == wanted.keys() and len(got) == 28
    for name, value in wanted.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-8)


def test_bad_input_is_one_line_and_exit_status_2(model_dir, data_file, tmp_path, capsys):
    base = ["init", "--model", str(model_dir), "--data", str(data_file), "--output", str(tmp_path / "a"), "--quiet"]
    assert "no such file" in bad([*base[:3], "--data", str(tmp_path / "missing.jsonl"), *base[5:]], capsys)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "the film"}\n{"text": oops}\n')
    assert "line 2: not JSON" in bad([*base[:3], "--data", str(broken), *base[5:]], capsys)
    assert "line 1: no string field 'body' (fields: id, prompt, text)" in bad([*base, "--text-field", "body"], capsys)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    assert "no weights" in bad(["init", "--model", str(no_weights), *base[3:]], capsys)
    assert "no such folder" in bad(["init", "--model", str(tmp_path / "nowhere"), *base[3:]], capsys)
    assert "--rank must be at least 1" in bad([*base, "--rank", "0"], capsys)
    assert "delta_normalization_power must be in (0, 2]" in bad([*base, "--delta-normalization-power", "3"], capsys)
    assert "output_damping_ratio must be >= 0" in bad([*base, "--output-damping-ratio", "-1"], capsys)
    assert not (tmp_path / "a").exists()


def test_help_reads_well():
    done = subprocess.run([str(LORA_DA), "init", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for option in ("--model DIR", "--data FILE.jsonl", "--rank", "--output ADAPTER_DIR", "--prompt-field",
                   "--variance-weight", "--backend", "--rslora", "--samples", "--balance-factors",
                   "--output-damping-ratio RHO", "--normalize-variance-guidance", "--delta-normalization-power P",
                   "--delta-normalization-reference REF", "--load-in-4bit", "--damping-mode"):
        assert option in done.stdout, option
    top = subprocess.run([str(LORA_DA), "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and "init" in top.stdout and "demo" in top.stdout


def test_demo_forwards_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--calibration" in capsys.readouterr().out


def test_plan_matches_the_passes_collection_takes(model_dir, capsys):
    """lora-da plan on the golden model: the passes and chunks collection uses under the same budget."""
    from lora_da.memory import plan_memory

    budget = 300_000
    assert cli.main(["plan", "--model", str(model_dir), "--dtype", "float64", "--max-memory", str(budget)]) == 0
    printed = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).double()
    memory = plan_memory(model, max_memory=budget, target_modules="all-linear")
    stats = lora_da.collect_statistics(model, cli.calibration_batches(
        [{"text": "the film was good"}] * 3, cli.load_model(model_dir, model_dir, "float64", "cpu")[1],
        cli.parser().parse_args(["init", "--model", "m", "--data", "d", "--output", "o"])),
        max_memory=budget, target_modules="all-linear", progress=False)
    assert memory.passes == stats.passes > 1 and f"14 modules in {memory.passes} pass(es)" in printed
    assert stats.nbytes() <= sum(memory.accumulator_bytes)


def test_plan_for_a_70b_shape_runs_from_its_config(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000).save_pretrained(str(tmp_path))
    assert cli.main(["plan", "--model", str(tmp_path), "--max-memory", str(80 * 2**30)]) == 0
    printed = capsys.readouterr().out
    assert "560 modules in" in printed and "expected peak on the device" in printed
    assert "Z summed as auto (float64 sums)" in printed  # the default's memory

    def total_gib(text: str) -> float:
        return float(re.search(r"statistics ([0-9.]+) GiB in all", text).group(1))

    assert cli.main(["plan", "--model", str(tmp_path), "--input-factor-dtype", "float32"]) == 0
    single = capsys.readouterr().out
    assert "Z summed as float32 (float32 sums)" in single and total_gib(single) < total_gib(printed)

    # on a GPU the Triton kernel sums Z, and each input's first 2n bf16 rows wait in host memory
    assert cli.main(["plan", "--model", str(tmp_path), "--device", "cuda"]) == 0
    gpu = capsys.readouterr().out
    assert "Z summed as auto (float64 sums, the kernels' fp32 tiles added into them every few tokens)" in gpu
    assert cli.main(["plan", "--model", str(tmp_path)]) == 0
    assert total_gib(gpu) == total_gib(capsys.readouterr().out)  # the device holds the same
    # 2n bf16 rows of n per module (q, k, v, o, gate, up; down), the plan's one pass
    held_gib = 80 * (6 * 8192 ** 2 + 28672 ** 2) * 2 * HELD_ROWS_PER_FEATURE / 2**30
    assert f"rows held in host memory while an input has few tokens: up to {held_gib:.2f} GiB" in gpu
