"""Each targeted input is matched to the token mask of its own tokens, by where it comes from and
not by its shape alone: an encoder-decoder model's encoder and decoder (padded to one length), the
flattened tokens of an MoE block, and inputs that match nothing (tokens routed to an expert)."""
import pytest
import torch

import lora_da


def t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config).double().eval()


def qwen_moe(seed: int = 0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(vocab_size=50, hidden_size=16, intermediate_size=24, moe_intermediate_size=12,
                            shared_expert_intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                            pad_token_id=0, decoder_sparse_step=1)
    return Qwen2MoeForCausalLM(config).eval()  # fp32: the experts' grouped products take no fp64


def seq2seq_batch(lengths, width: int, seed: int):
    """Encoder inputs and labels of (encoder length, label length) per sequence, both padded to ``width``."""
    generator = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.zeros(len(lengths), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(lengths), width, dtype=torch.long),
             "labels": torch.full((len(lengths), width), -100, dtype=torch.long),
             "decoder_attention_mask": torch.zeros(len(lengths), width, dtype=torch.long)}
    for row, (source, target) in enumerate(lengths):
        batch["input_ids"][row, :source] = torch.randint(1, 50, (source,), generator=generator)
        batch["attention_mask"][row, :source] = 1
        batch["labels"][row, :target] = torch.randint(1, 50, (target,), generator=generator)
        batch["decoder_attention_mask"][row, :target] = 1
    return batch


def alone(batch, row: int):
    """Sequence ``row`` of ``batch`` by itself, without padding on either side."""
    source, target = int(batch["attention_mask"][row].sum()), int(batch["decoder_attention_mask"][row].sum())
    return {"input_ids": batch["input_ids"][row:row + 1, :source],
            "attention_mask": batch["attention_mask"][row:row + 1, :source],
            "labels": batch["labels"][row:row + 1, :target],
            "decoder_attention_mask": batch["decoder_attention_mask"][row:row + 1, :target]}


def assert_same_statistics(got, want, rtol=1e-8, atol=1e-12):
    assert got.inputs.keys() == want.inputs.keys()
    for key, entry in want.inputs.items():
        assert got.inputs[key].num_tokens == entry.num_tokens, key
        torch.testing.assert_close(got.inputs[key].z_sum, entry.z_sum, rtol=rtol, atol=atol)
    for name, entry in want.modules.items():
        torch.testing.assert_close(got.modules[name].g_sum, entry.g_sum, rtol=rtol, atol=atol)
        torch.testing.assert_close(got.modules[name].y_sum.double(), entry.y_sum.double(), rtol=rtol, atol=atol ** 2)


def test_encoder_decoder_padded_to_one_length_counts_each_stack_by_its_own_mask():
    model = t5()
    batch = seq2seq_batch([(7, 3), (4, 6), (7, 5)], width=7, seed=1)
    kwargs = dict(target_modules=["q", "k", "v", "o", "wi", "wo"], population_size=3, progress=False)
    got = lora_da.collect_statistics(model, [batch], **kwargs)
    want = lora_da.collect_statistics(model, [alone(batch, row) for row in range(3)], **kwargs)
    assert_same_statistics(got, want)
    cross = got.inputs[got.modules["decoder.block.0.layer.1.EncDecAttention.k"].input_key]
    assert cross.num_tokens == 18 and set(cross.modules) >= {"decoder.block.0.layer.1.EncDecAttention.k",
                                                              "decoder.block.0.layer.1.EncDecAttention.v"}
    assert got.inputs[got.modules["decoder.block.0.layer.0.SelfAttention.q"].input_key].num_tokens == 14


def test_moe_block_reading_flattened_tokens_counts_the_batch_mask():
    """Qwen2-MoE's shared expert reads the batch's tokens flattened to [B*L, d]: padded or alone, the same."""
    from conftest import random_batches

    model = qwen_moe()
    batch = random_batches([3], seed=2, max_len=9)[0]
    singles = [{k: v[row:row + 1, :int(batch["attention_mask"][row].sum())] for k, v in batch.items()}
               for row in range(3)]
    kwargs = dict(population_size=3, progress=False)
    got = lora_da.collect_statistics(model, [batch], **kwargs)
    assert any("shared_expert" in name for name in got.modules)
    assert_same_statistics(got, lora_da.collect_statistics(model, singles, **kwargs), rtol=1e-5, atol=1e-6)


class RoutedExpert(torch.nn.Module):
    """An embedding, then an expert Linear that reads the tokens a router sends it: those whose id
    is even, gathered (a copy, in the batch's token order)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(50, 8)
        self.expert = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 50)

    def forward(self, input_ids, attention_mask, labels):
        h = self.embed(input_ids)
        flat = h.reshape(-1, 8)
        routed = (input_ids.reshape(-1) % 2 == 0).nonzero().flatten()
        out = flat.index_add(0, routed, self.expert(flat[routed]))
        logits = self.head(out.reshape(h.shape))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:])
        return {"loss": loss, "logits": logits}


def routed_batches():
    """Two batches of two sequences: the first sends the expert exactly 2 tokens (as many as it has
    sequences), the second 3."""
    ids = [torch.tensor([[1, 2, 3, 5], [7, 9, 4, 11]]), torch.tensor([[2, 4, 3, 5], [6, 9, 11, 13]])]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def test_tokens_routed_to_an_expert_are_refused_under_a_mask_and_counted_whole_without():
    kwargs = dict(target_modules=["expert"], population_size=4, progress=False)
    with pytest.raises(ValueError, match="read the batch's sequences in one batch and rows of shape \\(3, 8\\).*MoE "
                                         "expert.*token_mask='all'"):
        lora_da.collect_statistics(RoutedExpert(), routed_batches(), **kwargs)
    with pytest.raises(ValueError, match="neither the batch's tokens.*MoE expert.*token_mask='all'"):
        lora_da.collect_statistics(RoutedExpert(), routed_batches()[1:], **kwargs)
    stats = lora_da.collect_statistics(RoutedExpert(), routed_batches(), token_mask="all", **kwargs)
    assert stats.num_tokens == 5
