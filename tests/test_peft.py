"""initialize() on real PEFT models: in place, saved and reloaded, base weights untouched."""
import copy
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lora_da
from conftest import classification_batches, random_batches, tiny_bert_classifier, tiny_gpt2, tiny_llama


def peft_llama(dtype=torch.float32, adapter_name="default", **lora):
    """(base, PEFT model) with LoRA weights in the base dtype."""
    base = tiny_llama(seed=7, dtype=dtype)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0, **lora})
    return base, get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name, autocast_adapter_dtype=False)


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def merged_reference(base, peft_model, adapter):
    """A copy of ``base`` with W0 + s * B A written into every adapted weight."""
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    for name, layer in lora_da.targets.lora_layers(peft_model).items():
        delta = layer.scaling[adapter] * layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
        weight = modules[name].weight
        with torch.no_grad():
            weight += delta.T if weight.shape != delta.shape else delta
    return merged


@pytest.mark.parametrize("use_rslora", [False, True])
def test_initialize_writes_factors_and_step0_output(use_rslora):
    base, model = peft_llama(use_rslora=use_rslora)
    batches = random_batches([2, 3], seed=8)
    before = base_weights(model)
    cfg = lora_da.LoraDAConfig(damping=1e-4, gamma=4.0, population_size=100)
    report = lora_da.initialize(model, batches, cfg, progress=False)
    assert report.num_sequences == 5 and len(report.modules) == 14 and set(report.ranks.values()) == {4}
    assert report.seconds.keys() == {"collect", "solve", "apply"}
    assert {info.solver for info in report.solver.shapes.values()} == {"exact"}  # n = 24 < 1024
    assert "solve       24x24, r=4: 4 modules, exact" in str(report)  # q_proj, o_proj x 2 layers
    after = base_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # the adapter holds exactly the factors solve() gives on the plain model
    stats = lora_da.collect_statistics(base, batches, cfg.replace(rank=4), progress=False)
    expected = lora_da.solve(stats, cfg.replace(rank=4), progress=False)
    layers = lora_da.targets.lora_layers(model)
    for name, f in expected.items():
        torch.testing.assert_close(layers[name].lora_A["default"].weight, f.lora_A)
        torch.testing.assert_close(layers[name].lora_B["default"].weight, f.lora_B)
        scaling = 8 / math.sqrt(4) if use_rslora else 8 / 4
        assert layers[name].scaling["default"] == scaling
    # the model's output at step 0 is that of W0 + s * B A
    ids = random_batches([2], seed=9)[0]
    with torch.no_grad():
        got = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        want = merged_reference(base, model, "default")(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        plain = base(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, rtol=1e-5, atol=1e-5)  # the step is not nothing


def test_save_and_reload_give_identical_outputs(tmp_path):
    base, model = peft_llama()
    lora_da.initialize(model, random_batches([3]), damping=1e-4, gamma=4.0, progress=False)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    ids = random_batches([2], seed=10)[0]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids["input_ids"]).logits, reloaded(input_ids=ids["input_ids"]).logits, rtol=0, atol=0
        )


def test_rank_pattern_and_named_adapter():
    _, model = peft_llama(adapter_name="sentiment", rank_pattern={"q_proj": 2, "down_proj": 6})
    model.add_adapter("other", LoraConfig(r=3, target_modules=["v_proj"]))
    other_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".other." in n}
    report = lora_da.initialize(model, random_batches([2, 2]), adapter_name="sentiment", damping=1e-4, progress=False)
    assert report.adapter_name == "sentiment"
    layers = lora_da.targets.lora_layers(model)
    for name, r in report.ranks.items():
        want = 2 if name.endswith("q_proj") else 6 if name.endswith("down_proj") else 4
        assert r == want
        assert layers[name].lora_A["sentiment"].weight.shape[0] == want
        assert layers[name].lora_B["sentiment"].weight.abs().sum() > 0
    assert all(torch.equal(p, other_before[n]) for n, p in model.named_parameters() if ".other." in n)


def test_adapter_dtype_and_target_subset():
    _, model = peft_llama(dtype=torch.bfloat16)
    report = lora_da.initialize(model, random_batches([2]), target_modules=["o_proj"], progress=False)
    assert sorted(report.modules) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    layers = lora_da.targets.lora_layers(model)
    assert layers["model.layers.0.self_attn.o_proj"].lora_A["default"].weight.dtype == torch.bfloat16
    assert layers["model.layers.0.self_attn.o_proj"].lora_B["default"].weight.abs().sum() > 0
    assert layers["model.layers.0.self_attn.q_proj"].lora_B["default"].weight.abs().sum() == 0


def test_conv1d_gpt2_step0_output():
    base = tiny_gpt2(seed=11, dtype=torch.float32)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    lora_da.initialize(model, random_batches([2, 2]), damping=1e-4, gamma=4.0, progress=False)
    ids = random_batches([2], seed=12)[0]["input_ids"]
    with torch.no_grad():
        want = merged_reference(base, model, "default")(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_collected_statistics_ignore_current_adapter_values():
    """Statistics are those of the base model, whatever the adapter holds before initialisation."""
    base, model = peft_llama()
    batches = random_batches([3], seed=13)
    lora_da.initialize(model, batches, damping=1e-4, progress=False)
    first = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    lora_da.initialize(model, batches, damping=1e-4, progress=False)
    for n, p in model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, first[n])


def test_sequence_classifier_with_an_adapted_pooler():
    """A PEFT BERT classifier with LoRA on the pooler too: its input is one vector per sequence."""
    base = tiny_bert_classifier(seed=3, dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "dense"], lora_dropout=0.0,
                        task_type="SEQ_CLS")
    model = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    batches = classification_batches([3, 4], seed=5)
    cfg = lora_da.LoraDAConfig(damping=1e-4, gamma=4.0, population_size=100)
    report = lora_da.initialize(model, batches, cfg, progress=False)
    layers = lora_da.targets.lora_layers(model)
    # per layer query, value and three dense layers (attention output, intermediate, output); the pooler
    assert "bert.pooler.dense" in layers and len(report.modules) == len(layers) == 2 * 5 + 1
    stats = lora_da.collect_statistics(base, batches, cfg.replace(rank=2), progress=False,
                                       target_modules=list(layers))
    assert stats.inputs[stats.modules["bert.pooler.dense"].input_key].num_tokens == 7  # one per sequence
    expected = lora_da.solve(stats, cfg.replace(rank=2), progress=False)
    for name, f in expected.items():
        torch.testing.assert_close(layers[name].lora_B["default"].weight @ layers[name].lora_A["default"].weight,
                                   f.lora_B @ f.lora_A)


def test_report_names_unconverged_modules():
    """initialize's report carries solve's: converged or not per shape, and the modules that are not."""
    _, model = peft_llama()
    with pytest.warns(RuntimeWarning, match="stopped at solver_max_iterations=1"):
        report = lora_da.initialize(model, random_batches([3, 2]), solver="randomized", solver_max_iterations=1,
                                    damping=1e-4, progress=False)
    stalled = {name for info in report.solver.shapes.values() for name in {**info.unconverged, **info.sigma_unconverged}}
    assert stalled and stalled <= set(report.modules)
    assert not any(info.converged for info in report.solver.shapes.values())
    assert "NOT CONVERGED: model.layers.0" in str(report)
    converged = lora_da.initialize(model, random_batches([3, 2]), solver="randomized", damping=1e-4, progress=False)
    assert all(info.converged for info in converged.solver.shapes.values()) and "NOT CONVERGED" not in str(converged)
