"""QLoRA bases: bitsandbytes NF4, FP4 and 8-bit layers under PEFT LoRA. Statistics come through
the quantized layers (x and g from the hooks, no weight de-quantised by lora_da), and the factors
equal those of an fp32 twin that holds the de-quantised weights."""
import warnings

import pytest
import torch

import lora_da
from conftest import assert_same_state, model_state, random_batches

bnb = pytest.importorskip("bitsandbytes", reason="the quant extra (bitsandbytes) is not installed")
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = lora_da.LoraDAConfig(rank=4, damping=1e-4, population_size=100)
KINDS = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    # LLM.int8() quantizes the activations too, except the columns above the outlier threshold: with a
    # threshold this small every column takes the de-quantised weights, so an fp32 twin exists
    "int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=1e-9),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer Llama saved as safetensors (widths that are multiples of 32, as bitsandbytes' kernels like)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def quantized(model_dir, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=KINDS[kind], device_map=DEVICE,
                                                    dtype=torch.float32)


def twin(model_dir, model):
    """The fp32 model whose targeted weights are the quantized model's, de-quantised."""
    out = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(DEVICE)
    layers = dict(out.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            elif isinstance(module, bnb.nn.Linear8bitLt):
                weight = bnb.functional.int8_vectorwise_dequant(module.weight.CB, module.weight.SCB)
            else:
                continue
            layers[name.removeprefix("base_model.model.")].weight.copy_(weight.float())
    return out


def batches():
    return [{k: v.to(DEVICE) for k, v in b.items()} for b in random_batches([2, 3, 2], seed=1)]


def relative_ba_errors(got, want):
    return {name: float((got[name].lora_B @ got[name].lora_A - want[name].lora_B @ want[name].lora_A).norm()
                        / (want[name].lora_B @ want[name].lora_A).norm()) for name in want}


@pytest.mark.parametrize("kind", list(KINDS))
def test_factors_equal_the_dequantised_twin(model_dir, kind):
    model = quantized(model_dir, kind)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit)
    fp32 = twin(model_dir, model)  # before any forward: bitsandbytes drops the 8-bit layers' CB after one
    before = model_state(model)
    got = lora_da.solve(lora_da.collect_statistics(model, batches(), CFG, progress=False), CFG, progress=False)
    assert_same_state(before, model_state(model))  # no weight repacked or de-quantised in place
    want = lora_da.solve(lora_da.collect_statistics(fp32, batches(), CFG, progress=False), CFG, progress=False)
    assert len(got) == 14 and max(relative_ba_errors(got, want).values()) <= 1e-3


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_recipe_writes_the_twins_factors(model_dir, kind):
    """prepare_model_for_kbit_training, get_peft_model, then initialize: the adapter holds the factors
    that the fp32 twin gets, in the adapter's dtype."""
    model = prepare_model_for_kbit_training(quantized(model_dir, kind))  # its defaults: checkpointing on
    fp32 = twin(model_dir, model)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    peft_model = get_peft_model(model, lora)
    report = lora_da.initialize(peft_model, batches(), CFG, progress=False)
    assert len(report.modules) == 14
    want = lora_da.solve(lora_da.collect_statistics(fp32, batches(), CFG, progress=False), CFG, progress=False)
    for name, factors in want.items():
        layer = peft_model.get_submodule(f"base_model.model.{name}")
        got_a, got_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        ba, want_ba = got_b.double() @ got_a.double(), factors.lora_B.double() @ factors.lora_A.double()
        assert float((ba - want_ba).norm() / want_ba.norm()) <= 1e-3, name
