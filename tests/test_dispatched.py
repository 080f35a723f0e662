"""Models dispatched over devices with accelerate (device_map, CPU and disk offload): each module's
statistics accumulate where it runs, and the factors equal those of the same model undispatched."""
import pytest
import torch

import lora_da
from conftest import model_state, random_batches, tiny_llama

accelerate = pytest.importorskip("accelerate")

CFG = lora_da.LoraDAConfig(rank=3, population_size=50)
PLACES = {
    "second layer on disk": {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"},
    "first parameters on disk": {"model.embed_tokens": "disk", "model.layers.0": "disk", "model.layers.1": "cpu"},
}


@pytest.mark.parametrize("place", list(PLACES))
def test_offloaded_model_gives_the_factors_of_the_model_in_one_place(tmp_path, place):
    batches = random_batches([2, 3, 1], seed=1)
    want = lora_da.solve(lora_da.collect_statistics(tiny_llama(seed=2), batches, CFG, progress=False), CFG,
                         progress=False)
    device_map = {**PLACES[place], "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    model = accelerate.dispatch_model(tiny_llama(seed=2), device_map, offload_dir=str(tmp_path))
    assert any(p.device.type == "meta" for p in model.parameters())
    before = model_state(model)
    got = lora_da.solve(lora_da.collect_statistics(model, batches, CFG, progress=False), CFG, progress=False)
    after = model_state(model)
    assert before["modes"] == after["modes"] and before["hooks"] == after["hooks"]
    for name, (value, flag, _) in before["params"].items():  # offloaded weights stay on the meta device
        new_value, new_flag, _ = after["params"][name]
        assert flag == new_flag and value.device == new_value.device, name
        assert value.is_meta or torch.equal(value, new_value), name
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name].lora_B @ got[name].lora_A, want[name].lora_B @ want[name].lora_A,
                                   rtol=1e-10, atol=1e-12)


def test_initialize_with_the_embedding_offloaded(tmp_path):
    """The first parameter is on the meta device: the solve runs on the execution device."""
    from peft import LoraConfig, get_peft_model

    batches = random_batches([2, 3], seed=3)
    config = LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0, target_modules="all-linear")
    want = get_peft_model(tiny_llama(seed=2), config)
    lora_da.initialize(want, batches, CFG, progress=False)
    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu"}
    model = get_peft_model(accelerate.dispatch_model(tiny_llama(seed=2), device_map, offload_dir=str(tmp_path)), config)
    assert next(model.parameters()).device.type == "meta"
    lora_da.initialize(model, batches, CFG, progress=False)
    wanted = {n: p for n, p in want.named_parameters() if "lora_" in n}
    got = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert got.keys() == wanted.keys() and len(got) == 28
    for name, value in wanted.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12)
