"""Token buffering: the statistics op runs on chunks of counted tokens gathered across
micro-batches, and the sums equal those of one op call per micro-batch."""
import dataclasses

import pytest
import torch

import lora_da
from conftest import classification_batches, random_batches, tiny_bert_classifier, tiny_gpt2, tiny_llama
from lora_da import collect, dispatch, memory
from lora_da.memory import accumulator_bytes, chunk_tokens
from lora_da.targets import find_targets

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_classifier}


def batches_for(model_name, padding="right"):
    if model_name == "bert":
        return classification_batches([3, 2, 4, 1], seed=2)
    batches = random_batches([3, 2, 4, 1], seed=2, padding=padding)
    batches[1]["labels"][0] = -100  # a sequence without a supervised token: none of it counts under "labels"
    return batches


@pytest.fixture
def roomy_buffers(monkeypatch):
    """Buffers as large as ``buffer_tokens`` asks on the tiny models, whose accumulators would cap them near 6 tokens."""
    monkeypatch.setattr(memory, "BUFFER_SHARE_OF_ACCUMULATORS", 1e6)


@pytest.fixture
def op_calls(monkeypatch):
    """The (tokens, sequences) of every statistics op call; each call that says its counted
    tokens come first (``counted``) must keep that promise."""
    calls = []
    resolve = dispatch.resolve

    def spying(op, *args, **kwargs):
        impl = resolve(op, *args, **kwargs)

        def spy(x, mask, *rest, counted=None):
            calls.append((x.shape[0] * x.shape[1], x.shape[0]))
            if counted is not None:
                assert torch.equal(mask.flatten(), torch.arange(mask.numel()) < counted)
            return impl.fn(x, mask, *rest, counted=counted)

        return dataclasses.replace(impl, fn=spy) if op == "fisher_update" else impl

    monkeypatch.setattr(dispatch, "resolve", spying)
    return calls


def assert_same_sums(got, want, dtype):
    tolerance = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-7}
    assert got.num_sequences == want.num_sequences
    for key, entry in want.inputs.items():
        assert got.inputs[key].num_tokens == entry.num_tokens
        torch.testing.assert_close(got.inputs[key].z_sum, entry.z_sum, **tolerance)
    for name, entry in want.modules.items():
        torch.testing.assert_close(got.modules[name].g_sum, entry.g_sum, **tolerance)
        torch.testing.assert_close(got.modules[name].y_sum, entry.y_sum, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("model_name,token_mask,padding", [
    ("llama", "attention", "right"), ("llama", "labels", "left"), ("llama", "all", "right"),
    ("gpt2", "attention", "left"), ("bert", "attention", "right"),
])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_buffered_sums_equal_one_op_call_per_micro_batch(op_calls, roomy_buffers, model_name, token_mask, padding, dtype, chunk):
    model = MODELS[model_name](seed=1, dtype=dtype)
    batches = batches_for(model_name, padding)
    want = lora_da.collect_statistics(model, batches, progress=False, buffer_tokens=0, token_mask=token_mask)
    unbuffered = list(op_calls)
    op_calls.clear()
    got = lora_da.collect_statistics(model, batches, progress=False, buffer_tokens=chunk, token_mask=token_mask)
    assert_same_sums(got, want, dtype)
    assert all(sequences == 1 for _, sequences in op_calls)
    assert sum(t for t, _ in op_calls) <= sum(t for t, _ in unbuffered)  # padding rows are dropped
    if chunk == 1:  # every micro-batch has a chunk's worth: each runs at once
        assert len(op_calls) == len(unbuffered)
    if chunk == 4096:  # one call per distinct input
        assert len(op_calls) == len(got.inputs)


def test_padding_is_not_buffered(op_calls, roomy_buffers):
    """Right-padded batches: the op sees the real tokens only."""
    model, batches = tiny_llama(seed=3), random_batches([4, 3], seed=4)
    stats = lora_da.collect_statistics(model, batches, progress=False, buffer_tokens=10**6)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert [tokens for tokens, _ in op_calls] == [real] * len(stats.inputs)
    assert real < sum(b["attention_mask"].numel() for b in batches)


def test_sequence_lowrank_runs_each_micro_batch_at_once(op_calls):
    model, batches = tiny_llama(seed=3), random_batches([4, 3], seed=4)
    stats = lora_da.collect_statistics(model, batches, progress=False, output_fisher="sequence_lowrank")
    assert {sequences for _, sequences in op_calls} == {4, 3}
    assert stats.modules["model.layers.0.mlp.up_proj"].sequence_sums.shape == (7, 40)


def short_batches():
    """Single sequences of 3 or 4 tokens: micro-batches smaller than the chunks below."""
    batches = random_batches([1] * 8, seed=4, max_len=4)
    assert {int(b["attention_mask"].sum()) for b in batches} == {3, 4}
    return batches


def chunks_of_each_pass(monkeypatch) -> list:
    """The chunk size ``collect_statistics`` gives each of its passes."""
    chunks, collect_pass = [], collect._collect_pass

    def spy(*args):
        chunks.append(args[-1])
        return collect_pass(*args)

    monkeypatch.setattr(collect, "_collect_pass", spy)
    return chunks


def test_max_memory_bounds_the_chunk(op_calls, roomy_buffers, monkeypatch):
    model, batches = tiny_llama(seed=3), short_batches()
    targets = list(find_targets(model, None).values())
    per_token = sum(8 * (t.in_features + t.out_features) + 1 for t in targets)
    assert chunk_tokens(targets, 4096, 8, 10**12) == 4096
    assert chunk_tokens(targets, 4096, 8, 5 * per_token + 3) == 5
    assert chunk_tokens(targets, 4096, 8, -1) == 0
    want = lora_da.collect_statistics(model, batches, progress=False, buffer_tokens=0)
    op_calls.clear()
    chunks = chunks_of_each_pass(monkeypatch)
    got = lora_da.collect_statistics(model, batches, progress=False,
                                     max_memory=accumulator_bytes(targets, 8, 8) + 5 * per_token)
    assert got.passes == 1 and chunks == [5]
    assert max(tokens for tokens, _ in op_calls) == 5  # micro-batches of 3 and 4 tokens, gathered
    assert_same_sums(got, want, torch.float64)


def test_buffers_take_at_most_a_share_of_the_accumulators(monkeypatch):
    """A deterministic chunk, whatever memory is free: an eighth of the accumulators' bytes at most."""
    model = tiny_llama(seed=3)
    targets = list(find_targets(model, None).values())
    per_token = sum(8 * (t.in_features + t.out_features) + 1 for t in targets)
    share = int(accumulator_bytes(targets, 8, 8) * memory.BUFFER_SHARE_OF_ACCUMULATORS) // per_token
    chunks = chunks_of_each_pass(monkeypatch)
    lora_da.collect_statistics(model, short_batches(), progress=False)
    assert chunks == [share] and 0 < share < 4096


def test_buffer_tokens_is_checked():
    with pytest.raises(ValueError, match="buffer_tokens must be an integer >= 0"):
        lora_da.LoraDAConfig(buffer_tokens=-1)


class PaddingOfNaN(torch.nn.Module):
    """Embedding, one targeted layer, a head; activations at padded positions are NaN (or ``fill``)
    and the layer's output there is dropped, so its gradient there is exactly zero."""

    def __init__(self, fill=float("nan")):
        super().__init__()
        torch.manual_seed(5)
        self.embed = torch.nn.Embedding(50, 8)
        self.layer = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 50)
        self.fill = fill

    def forward(self, input_ids, attention_mask, labels):
        keep = attention_mask.bool()[..., None]
        h = torch.where(keep, self.embed(input_ids), self.fill)
        h = torch.where(keep, self.layer(h), 0.0)
        logits = self.head(torch.tanh(h))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:])
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("buffer_tokens", [0, 7, 4096])
def test_non_finite_padding_adds_nothing_buffered_or_not(buffer_tokens):
    batches = random_batches([3, 2, 4], seed=8)
    kwargs = dict(target_modules=["layer"], buffer_tokens=buffer_tokens, population_size=9, progress=False)
    got = lora_da.collect_statistics(PaddingOfNaN(), batches, **kwargs)
    want = lora_da.collect_statistics(PaddingOfNaN(fill=0.0), batches, **kwargs)
    torch.testing.assert_close(got.modules["layer"].g_sum, want.modules["layer"].g_sum, rtol=0, atol=0)
    torch.testing.assert_close(got.inputs["layer"].z_sum, want.inputs["layer"].z_sum, rtol=0, atol=0)
    torch.testing.assert_close(got.modules["layer"].y_sum, want.modules["layer"].y_sum, rtol=0, atol=0)
