"""Properties the factors must have whatever the data."""
import dataclasses
import math
import warnings

import pytest
import torch

import lora_da
from conftest import assert_same_state, model_state, random_batches, tiny_gpt2, tiny_llama
from lora_da.batches import default_loss
from lora_da.input_factors import InputFactors
from lora_da.natural_gradient import natural_gradient
from lora_da.statistics import InputStatistics, ModuleStatistics, Statistics


@pytest.fixture(scope="module")
def stats():
    return lora_da.collect_statistics(tiny_llama(seed=3), random_batches([2, 3, 1], seed=4), progress=False)


def subspace(factors, gamma):
    """V [n, r] recovered from lora_A = V^T / sqrt(gamma)."""
    return factors.lora_A.T * math.sqrt(gamma)


@pytest.mark.parametrize("beta", [0.0, 0.03, 2.0])
def test_orthonormal_basis_and_projection(stats, beta):
    cfg = lora_da.LoraDAConfig(rank=4, variance_weight=beta, gamma=64.0, damping=1e-4, population_size=20)
    factors = lora_da.solve(stats, cfg, progress=False)
    inputs = InputFactors(stats, cfg.damping, stats.device)
    for name, f in factors.items():
        v = subspace(f, cfg.gamma)
        torch.testing.assert_close(v.T @ v, torch.eye(4, dtype=v.dtype), atol=1e-10, rtol=0)
        key = stats.modules[name].input_key
        ng = natural_gradient(stats, name, inputs.cholesky(key), cfg)
        torch.testing.assert_close(f.lora_B @ f.lora_A, ng.delta_hat @ v @ v.T / cfg.gamma, atol=1e-12, rtol=1e-9)
        # V spans the r eigenvectors of Omega with the smallest eigenvalues
        c = ng.variance_coefficient(cfg, 20)
        omega = -cfg.bias_weight * ng.delta_hat.T @ ng.delta_hat + c * inputs.inverse(key)
        smallest = torch.linalg.eigvalsh(omega)[:4]
        torch.testing.assert_close(torch.linalg.eigvalsh(v.T @ omega @ v), smallest, atol=1e-9, rtol=1e-9)
        # sign convention: each column's largest-magnitude entry is positive
        assert (v.gather(0, v.abs().argmax(0, keepdim=True)) > 0).all()


def test_no_variance_is_top_r_svd(stats):
    cfg = lora_da.LoraDAConfig(rank=3, variance_weight=0.0, gamma=4.0, damping=1e-4)
    factors = lora_da.solve(stats, cfg, progress=False)
    inputs = InputFactors(stats, cfg.damping, stats.device)
    for name, f in factors.items():
        dhat = natural_gradient(stats, name, inputs.cholesky(stats.modules[name].input_key), cfg).delta_hat
        u, s, vh = torch.linalg.svd(dhat, full_matrices=False)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        torch.testing.assert_close(f.lora_B @ f.lora_A * cfg.gamma, best, atol=1e-10, rtol=1e-8)


def test_batch_order_does_not_matter():
    model = tiny_llama(seed=5)
    batches = random_batches([1, 2, 3, 2], seed=6)
    cfg = lora_da.LoraDAConfig(rank=2, damping=1e-4, population_size=10)
    first = lora_da.solve(lora_da.collect_statistics(model, batches, cfg, progress=False), cfg, progress=False)
    second = lora_da.solve(lora_da.collect_statistics(model, batches[::-1], cfg, progress=False), cfg, progress=False)
    for name in first:
        torch.testing.assert_close(
            first[name].lora_B @ first[name].lora_A, second[name].lora_B @ second[name].lora_A, atol=1e-12, rtol=1e-8
        )


def test_factors_follow_the_statistics_dtype(stats):
    assert all(f.lora_A.dtype == torch.float64 for f in lora_da.solve(stats, rank=1, progress=False).values())


@dataclasses.dataclass
class TokenBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    texts: list


class OpaqueBatch:
    """A batch type lora_da cannot look into: its len() is its number of sequences."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]


def loss_per_text(model, batch: dict, texts) -> torch.Tensor:
    """The default loss scaled by the texts per sequence: 1 when num_samples cut the texts with the tensors."""
    return default_loss(model, batch) * len(texts) / batch["input_ids"].shape[0]


def batch_as(kind, batch):
    """``batch`` (a dict) in the form ``kind``, with the loss_fn that reads it."""
    keys = ("input_ids", "attention_mask", "labels")
    texts = [f"sequence {i}" for i in range(batch["input_ids"].shape[0])]
    if kind == "dict":
        return batch, None
    if kind == "BatchEncoding":
        from transformers import BatchEncoding

        return BatchEncoding(batch), None
    if kind in ("tuple", "list"):
        container = tuple if kind == "tuple" else list
        return container([*(batch[k] for k in keys), texts]), lambda m, b: loss_per_text(m, dict(zip(keys, b[:3])), b[3])
    if kind == "dataclass":
        return TokenBatch(*(batch[k] for k in keys), texts), lambda m, b: loss_per_text(
            m, {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}, b.texts)
    return OpaqueBatch(batch), lambda m, b: default_loss(m, b.batch)


@pytest.mark.parametrize("kind", ["dict", "BatchEncoding", "tuple", "list", "dataclass"])
def test_num_samples_truncates_every_batch_type_exactly(kind):
    """A batch cut at num_samples gives the statistics of its first sequences alone (per-sequence
    lists are cut with the tensors: the loss_fns scale by their length)."""
    model = tiny_llama()
    batches = random_batches([3, 3, 3])
    converted = [batch_as(kind, b) for b in batches]
    stats = lora_da.collect_statistics(model, [b for b, _ in converted], num_samples=5, loss_fn=converted[0][1],
                                       token_mask="all", progress=False)  # the attention mask is a dict key
    reference = lora_da.collect_statistics(model, [batches[0], {k: v[:2] for k, v in batches[1].items()}],
                                           token_mask="all", progress=False)
    assert stats.num_sequences == 5 and stats.num_tokens == reference.num_tokens
    for name in stats.modules:
        torch.testing.assert_close(stats.gradient(name), reference.gradient(name), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(stats.output_factor(name), reference.output_factor(name), rtol=1e-12, atol=1e-14)
    for key in stats.inputs:
        torch.testing.assert_close(stats.input_factor(key), reference.input_factor(key), rtol=1e-12, atol=1e-14)


def test_num_samples_refuses_a_batch_it_cannot_cut_before_collecting():
    model = tiny_llama()
    batches, loss_fn = zip(*(batch_as("opaque", b) for b in random_batches([3, 3])))
    calls = []

    def counting_loss(m, b):
        calls.append(1)
        return loss_fn[0](m, b)

    before = model_state(model)
    with pytest.raises(ValueError, match="cannot cut a OpaqueBatch"):
        lora_da.collect_statistics(model, list(batches), num_samples=4, loss_fn=counting_loss, progress=False)
    assert not calls
    assert_same_state(before, model_state(model))
    stats = lora_da.collect_statistics(model, list(batches), loss_fn=counting_loss, progress=False)
    assert stats.num_sequences == 6  # without num_samples the same batches are collected whole
    calls.clear()
    with pytest.raises(ValueError, match="cannot tell the batch size of a object.*len()"):
        lora_da.collect_statistics(model, [object()], loss_fn=counting_loss, progress=False)
    assert not calls
    assert_same_state(before, model_state(model))


def test_population_size_defaults_warn_with_the_value_and_the_fix():
    model = tiny_llama()
    batches = random_batches([2, 2])
    with pytest.warns(UserWarning, match=r"population_size is not set, so N = 4 \(the number of calibration "
                                         r"sequences\).*population_size=len\(train_set\)"):
        assert lora_da.collect_statistics(model, batches, progress=False).population_size == 4

    class Loader(list):
        dataset = list(range(1000))

    with pytest.warns(UserWarning, match=r"N = 1000 \(len\(loader.dataset\)"):
        assert lora_da.collect_statistics(model, Loader(batches), progress=False).population_size == 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lora_da.collect_statistics(model, batches, population_size=7, progress=False).population_size == 7


def test_report_opens_with_the_population_size_warning():
    from test_peft import peft_llama

    _, model = peft_llama()
    with pytest.warns(UserWarning, match="population_size is not set"):
        report = lora_da.initialize(model, random_batches([2, 3]), progress=False)
    assert str(report).splitlines()[0].startswith("WARNING: population_size is not set, so N = 5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = lora_da.initialize(model, random_batches([2, 3]), population_size=100, progress=False)
    assert not report.warnings and str(report).startswith("LoRA-DA initialisation")


def massive_activation_statistics(input_factor_dtype: torch.dtype) -> Statistics:
    """One module whose input has a massive feature (x[:, 0] ~ 1e4, as some LLM channels) that
    another nearly follows: Z's smallest eigenvalue is about 7e-7, and ||Z|| about 1e8. Summed in
    fp32, Z gets the rounding noise such sums carry (3 eps32 ||Z||_2, placed along that smallest
    eigenvector: deterministic, unlike BLAS rounding), which makes Z + 1e-6 I indefinite."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 48, generator=gen, dtype=torch.float64)
    x[:, 0] *= 1e4
    x[:, 1] = x[:, 0] * 0.5 + 1e-3 * x[:, 1]
    z = x.T @ x
    if input_factor_dtype == torch.float32:
        values, vectors = torch.linalg.eigh(z)
        z = z - 3 * torch.finfo(torch.float32).eps * values[-1] * torch.outer(vectors[:, 0], vectors[:, 0])
    g = torch.randn(20, 48, generator=gen)
    name = "layer.proj"
    return Statistics({name: ModuleStatistics(name, g, torch.rand(20, generator=gen) + 0.1)},
                      {name: InputStatistics((name,), z.to(input_factor_dtype), 400)}, num_sequences=4,
                      population_size=100, token_mask="attention", output_fisher="diagonal")


def test_damping_is_chosen_once_at_the_rounding_floor_of_fp32_sums():
    """No retry: fp32 sums are damped at eps32 sqrt(T) ||Z||_F, fp64 sums keep the config's
    damping, and a factor that is not positive definite at its damping is an error."""
    from lora_da.input_factors import damped_cholesky, rounding_floor

    fp32, fp64 = massive_activation_statistics(torch.float32), massive_activation_statistics(torch.float64)
    with pytest.raises(RuntimeError, match="Cholesky of the input factor of my.module failed at damping 1e-06"):
        damped_cholesky(fp32.input_factor("layer.proj").double() + 1e-6 * torch.eye(48, dtype=torch.float64), 1e-6,
                        "my.module")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rough = lora_da.solve(fp32, rank=4, progress=False)
        exact = lora_da.solve(fp64, rank=4, progress=False)
    floor = rounding_floor(fp32.input_factor("layer.proj").double(), 400, torch.float32)
    assert floor > 1.0  # far above the config's 1e-6
    assert [info.dampings for info in rough.report.shapes.values()] == [{"layer.proj": pytest.approx(floor, rel=1e-6)}]
    assert [info.dampings for info in exact.report.shapes.values()] == [{"layer.proj": 1e-6}]
    assert all(torch.isfinite(f.lora_B).all() for f in rough.values())


def test_fp32_tile_sums_indefinite_at_the_damping_take_the_fp32_floor_with_a_warning():
    """fp64 sums that carry fp32 rounding (the kernels' tile sums, ``Z_FP32_TILES``) and are
    indefinite at 1e-6: damped at the rounding floor of fp32 sums, named in a warning; the same
    sums without the mark are an error, as any Z that is no sum of outer products."""
    from lora_da.input_factors import rounding_floor
    from lora_da.statistics import Z_FP32_TILES

    noisy = massive_activation_statistics(torch.float32)
    noisy.inputs["layer.proj"].z_sum = noisy.inputs["layer.proj"].z_sum.double()
    with pytest.raises(RuntimeError, match="failed at damping 1e-06"):
        lora_da.solve(noisy, rank=4, progress=False)
    noisy.config[Z_FP32_TILES] = True
    with pytest.warns(RuntimeWarning, match=r"layer.proj.*fp32 tile sums.*input_factor_dtype='float64'"):
        factors = lora_da.solve(noisy, rank=4, progress=False)
    floor = rounding_floor(noisy.input_factor("layer.proj").double(), 400, torch.float32)
    assert [info.dampings for info in factors.report.shapes.values()] == [{"layer.proj": pytest.approx(floor, rel=1e-6)}]
    assert all(torch.isfinite(f.lora_B).all() for f in factors.values())
    clean = massive_activation_statistics(torch.float64)
    clean.config[Z_FP32_TILES] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # definite at 1e-6: the config's damping, no warning
        assert [info.dampings for info in lora_da.solve(clean, rank=4, progress=False).report.shapes.values()] == [
            {"layer.proj": 1e-6}]


def test_factors_do_not_depend_on_batch_order_or_size():
    """Z summed in fp64 (the default) on an fp32 model: the same sequences in other batches and
    another order give B A within 1e-4 (one supervised token per sequence, so that B times the
    batch's mean loss is the sum of the sequences' losses whatever the batching)."""
    model = tiny_llama(seed=8, dtype=torch.float32)
    sequences = [{k: v[i:i + 1] for k, v in batch.items()} for batch in random_batches([9], seed=9) for i in range(9)]
    for sequence in sequences:
        length = int(sequence["attention_mask"].sum())
        sequence["labels"][:, :length - 1] = -100

    def batched(order, sizes):
        chosen, start, batches = [sequences[i] for i in order], 0, []
        for size in sizes:
            batches.append({k: torch.cat([s[k] for s in chosen[start:start + size]]) for k in chosen[0]})
            start += size
        return batches

    cfg = lora_da.LoraDAConfig(rank=4, population_size=100)
    first = lora_da.solve(lora_da.collect_statistics(model, batched(range(9), [3, 3, 3]), cfg, progress=False), cfg,
                          progress=False)
    second = lora_da.solve(lora_da.collect_statistics(model, batched([8, 2, 5, 0, 7, 1, 3, 6, 4], [1, 5, 2, 1]), cfg,
                                                      progress=False), cfg, progress=False)
    for name in first:
        want = first[name].lora_B.double() @ first[name].lora_A.double()
        got = second[name].lora_B.double() @ second[name].lora_A.double()
        assert float((got - want).norm() / want.norm()) <= 1e-4, name


def test_balanced_factors_keep_ba_and_split_its_singular_values(stats):
    """balance_factors: B A unchanged; A A^T = B^T B = diag(singular values of B A) / gamma."""
    cfg = lora_da.LoraDAConfig(rank=3, gamma=4.0, damping=1e-4, population_size=20)
    plain = lora_da.solve(stats, cfg, progress=False)
    both = lora_da.solve(stats, cfg, balance_factors=True, progress=False)
    for name, f in both.items():
        torch.testing.assert_close(f.lora_B @ f.lora_A, plain[name].lora_B @ plain[name].lora_A, atol=1e-14, rtol=1e-10)
        s = torch.linalg.svdvals(f.lora_B @ f.lora_A)[:3]
        torch.testing.assert_close(f.lora_A @ f.lora_A.T, torch.diag(s), atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(f.lora_B.T @ f.lora_B, torch.diag(s), atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_default_loss_sums_per_sequence_means_whatever_the_batching(make_model):
    """Sequences with different numbers of labels, grouped three ways: G, y and Z are the same."""
    whole = random_batches([5], seed=11)[0]
    counts = (whole["labels"][:, 1:] != -100).sum(1)
    assert len(set(counts.tolist())) > 1
    groupings = {name: [{k: v[rows] for k, v in whole.items()} for rows in cuts]
                 for name, cuts in {"one batch": [slice(0, 5)], "two": [slice(0, 2), slice(2, 5)],
                                    "singles": [slice(i, i + 1) for i in range(5)]}.items()}
    model = make_model(seed=12)
    stats = {name: lora_da.collect_statistics(model, batches, population_size=5, progress=False)
             for name, batches in groupings.items()}
    want = stats["singles"]
    for name in ("one batch", "two"):  # the losses are fp32 (as Hugging Face's own): fp32 rounding apart
        for module, entry in want.modules.items():
            for got, wanted in ((stats[name].modules[module].g_sum, entry.g_sum),
                                (stats[name].modules[module].y_sum, entry.y_sum)):
                assert float((got - wanted).norm() / wanted.norm()) < 1e-5, (name, module)
    loss = lora_da.batches.default_loss(model, groupings["one batch"][0])
    per_sequence = sum(model(**batch).loss for batch in groupings["singles"])
    torch.testing.assert_close(loss.double(), per_sequence.double(), rtol=1e-6, atol=0)


def test_default_loss_refuses_a_loss_it_cannot_split():
    class SmoothedLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama(seed=3)

        def forward(self, **batch):
            logits = self.inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                     label_smoothing=0.1)
            return {"loss": loss, "logits": logits}

    batch = random_batches([5], seed=11)[0]
    with pytest.raises(ValueError, match="different numbers of labels.*loss_fn"):
        lora_da.batches.default_loss(SmoothedLoss(), batch)
