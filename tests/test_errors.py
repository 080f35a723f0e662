"""Bad input: a clear error, and the model exactly as it was."""
import pytest
import torch

import lora_da
from conftest import assert_same_state, model_state, random_batches, tiny_llama
from test_peft import peft_llama


@pytest.fixture
def model():
    m = tiny_llama(seed=20, dtype=torch.float32)
    m.train()
    m.model.layers[0].eval()  # mixed modes must come back as they were
    for p in m.model.layers[1].parameters():
        p.requires_grad_(False)
    return m


def collect(model, batches, **kw):
    return lora_da.collect_statistics(model, batches, progress=False, **kw)


def check(model, call, error, match):
    before = model_state(model)
    with pytest.raises(error, match=match):
        call()
    assert_same_state(before, model_state(model))


def test_empty_loader(model):
    check(model, lambda: collect(model, []), ValueError, "no batches")


def test_batch_without_labels(model):
    batch = {k: v for k, v in random_batches([2])[0].items() if k != "labels"}
    check(model, lambda: collect(model, [batch]), ValueError, "no 'labels'.*loss_fn")


def test_non_finite_loss_names_the_batch(model):
    def loss_fn(m, batch):
        loss = m(**batch).loss
        return loss * float("nan") if batch["input_ids"].shape[0] == 3 else loss

    check(model, lambda: collect(model, random_batches([2, 2, 3]), loss_fn=loss_fn), FloatingPointError, "batch 2")


def test_no_module_matches_lists_what_exists(model):
    check(model, lambda: collect(model, random_batches([2]), target_modules=["qkv"]), ValueError,
          r"no module matches.*model\.layers\.0\.self_attn\.q_proj")


def test_rank_too_large(model):
    stats = collect(model, random_batches([2]))
    with pytest.raises(ValueError, match=r"rank larger.*k_proj \(r=13, weight 12x24\)"):
        lora_da.solve(stats, rank=13, progress=False)


def test_rank_too_large_for_peft_fails_before_collection():
    _, peft_model = peft_llama(r=13)
    check(peft_model, lambda: lora_da.initialize(peft_model, random_batches([2]), progress=False), ValueError,
          "rank larger")


@pytest.mark.parametrize("field,value", [("token_mask", "padding"), ("output_fisher", "full"), ("backend", "tpu")])
def test_unknown_choices(field, value):
    with pytest.raises(ValueError, match=f"unknown {field} '{value}'"):
        lora_da.LoraDAConfig(**{field: value})


@pytest.mark.parametrize("options,match", [
    ({"output_damping_ratio": -0.1}, "output_damping_ratio must be >= 0"),
    ({"damping_mode": "scaled"}, "unknown damping_mode 'scaled'"),
    ({"delta_normalization_power": 0.0}, r"delta_normalization_power must be in \(0, 2\]"),
    ({"delta_normalization_power": 2.5}, r"delta_normalization_power must be in \(0, 2\]"),
    ({"delta_normalization_reference": 0.0}, "delta_normalization_reference must be > 0"),
    ({"delta_normalization_reference": -2.0}, "delta_normalization_reference must be > 0"),
    ({"normalize_variance_guidance": True, "bias_weight": 0.0}, "needs bias_weight > 0"),
])
def test_bad_values_of_the_authors_options(options, match):
    """Refused before anything runs: initialize leaves the PEFT model as it was."""
    _, peft_model = peft_llama(r=2)
    check(peft_model, lambda: lora_da.initialize(peft_model, random_batches([2]), progress=False, **options),
          ValueError, match)


def test_unknown_override(model):
    check(model, lambda: collect(model, random_batches([2]), token_masks="labels"), TypeError, "unknown LoraDAConfig")


def test_interrupt_and_loader_errors_restore_the_model(model):
    batches = random_batches([2, 2])

    def interrupted():
        yield batches[0]
        raise KeyboardInterrupt

    def broken():
        yield batches[0]
        raise OSError("disk gone")

    check(model, lambda: collect(model, interrupted()), KeyboardInterrupt, None)
    check(model, lambda: collect(model, broken()), OSError, "disk gone")


def test_plain_model_to_initialize_points_to_the_backend(model):
    check(model, lambda: lora_da.initialize(model, random_batches([2]), progress=False), TypeError,
          "collect_statistics \\+ lora_da.solve")


def test_unknown_adapter_name():
    _, peft_model = peft_llama()
    check(peft_model, lambda: lora_da.initialize(peft_model, random_batches([2]), adapter_name="nope", progress=False),
          ValueError, r"adapters present: \['default'\]")


def test_bad_backend_from_environment(model, monkeypatch):
    monkeypatch.setenv("LORA_DA_BACKEND", "fastest")
    check(model, lambda: collect(model, random_batches([2])), ValueError, "LORA_DA_BACKEND")


def test_labels_mask_needs_labels(model):
    batch = {k: v for k, v in random_batches([2])[0].items() if k != "labels"}
    loss_fn = lambda m, b: m(**b).logits.float().pow(2).mean()  # noqa: E731
    check(model, lambda: collect(model, [batch], loss_fn=loss_fn, token_mask="labels"), ValueError, "needs 'labels'")


def test_dora_is_refused():
    _, peft_model = peft_llama(use_dora=True)
    check(peft_model, lambda: lora_da.initialize(peft_model, random_batches([2]), progress=False), ValueError, "DoRA")


def test_successful_collection_leaves_the_model_as_it_was(model):
    before = model_state(model)
    collect(model, random_batches([2, 3]))
    assert_same_state(before, model_state(model))  # no .grad either


def test_non_finite_gradients_behind_a_finite_loss_are_named(model):
    def loss_fn(m, batch):  # sqrt at 0: a loss of 0 whose gradient is infinite
        logits = m(input_ids=batch["input_ids"]).logits
        return torch.sqrt((logits - logits.detach()).sum().abs())

    check(model, lambda: collect(model, random_batches([2]), loss_fn=loss_fn), FloatingPointError,
          r"non-finite statistics .* in modules \['model.layers.0.self_attn.q_proj'")
