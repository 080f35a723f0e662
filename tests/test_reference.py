"""The library against an independent, slow fp64 reference: per-token loops for the statistics,
explicit inverses and a dense m x m output Fisher for the factors."""
import math

import pytest
import torch

import lora_da
from conftest import classification_batches, random_batches, tiny_bert_classifier, tiny_gpt2, tiny_llama
from lora_da.batches import default_loss
from lora_da.targets import find_targets, linear_shape


def reference_mask(batch, kind):
    if kind == "attention":
        return batch["attention_mask"].bool()
    if kind == "all":
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)
    labels = batch["labels"]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            mask[b, t] = bool(labels[b, t + 1] != -100)
    return mask


def reference_statistics(model, batches, names, kind):
    """Per module: G/S, Z/T, y/T, P (m x K) from explicit per-token loops."""
    modules = dict(model.named_modules())
    sums = {}
    for name in names:
        m, n = linear_shape(modules[name])
        f64 = {"dtype": torch.float64}
        sums[name] = {"G": torch.zeros(m, n, **f64), "Z": torch.zeros(n, n, **f64), "y": torch.zeros(m, **f64), "T": 0, "seq": []}
    num_sequences = 0
    for batch in batches:
        records = {}

        def make_hook(name):
            def hook(module, args, output):
                output.retain_grad()
                records[name] = (args[0].detach(), output)
            return hook

        handles = [modules[name].register_forward_hook(make_hook(name)) for name in names]
        model.zero_grad(set_to_none=True)
        size = batch["input_ids"].shape[0]
        default_loss(model, batch).backward()  # the sum of per-sequence means: test_invariants checks it
        for h in handles:
            h.remove()
        mask = reference_mask(batch, kind)
        for name in names:
            x, out = records[name]
            g = out.grad
            rows = mask
            if x.dim() == 2:  # one pooled vector per sequence: a sequence of one token, always counted
                x, g, rows = x[:, None], g[:, None], torch.ones((size, 1), dtype=torch.bool)
            entry = sums[name]
            for b in range(size):
                s = torch.zeros(g.shape[-1], dtype=torch.float64)
                for t in range(x.shape[1]):
                    entry["G"] += torch.outer(g[b, t], x[b, t])
                    if rows[b, t]:
                        entry["Z"] += torch.outer(x[b, t], x[b, t])
                        entry["y"] += g[b, t] ** 2
                        entry["T"] += 1
                        s += g[b, t]
                entry["seq"].append(s)
        num_sequences += size
    model.zero_grad(set_to_none=True)
    out = {}
    for name, e in sums.items():
        seq = torch.stack(e["seq"], dim=1)
        out[name] = {"G": e["G"] / num_sequences, "Z": e["Z"] / e["T"], "y": e["y"] / e["T"],
                     "P": seq / math.sqrt(seq.shape[1]), "T": e["T"]}
    return out, num_sequences


def reference_ba(stat, cfg, population):
    """B A = dhat V V^T / gamma with explicit inverses and a dense output Fisher."""
    relative = cfg.damping_mode == "relative"
    n = stat["Z"].shape[0]
    lam = cfg.damping * float(torch.trace(stat["Z"])) / n if relative else cfg.damping
    zd_inv = torch.linalg.inv(0.5 * (stat["Z"] + stat["Z"].T) + lam * torch.eye(n, dtype=torch.float64))
    lam_y = cfg.damping * float(stat["y"].mean()) if relative else cfg.damping
    if cfg.output_damping_ratio is not None:
        lam_y = cfg.output_damping_ratio * float(stat["y"].median())
    if cfg.output_fisher == "diagonal":
        d = 1.0 / (stat["y"] + lam_y)
    else:
        p = stat["P"]
        d = torch.diagonal(torch.linalg.inv(lam_y * torch.eye(p.shape[0], dtype=torch.float64) + p @ p.T))
    delta = -torch.diag(d) @ stat["G"] @ zd_inv
    power, reference = cfg.delta_normalization_power, cfg.delta_normalization_reference
    s = torch.linalg.svdvals(delta)[0] ** power * reference ** (1 - power)
    dhat = delta / s
    c = d.sum() / (population * s**2)
    if cfg.normalize_variance_guidance:
        c = c * torch.linalg.norm(cfg.bias_weight * dhat.T @ dhat) / torch.linalg.norm(c * zd_inv)
    omega = -cfg.bias_weight * dhat.T @ dhat + cfg.variance_weight * c * zd_inv
    v = torch.linalg.eigh(omega).eigenvectors[:, : cfg.rank]
    return dhat @ v @ v.T / cfg.gamma


def relative(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def assert_matches_reference(stats, expected, cfg):
    """Every module's statistics and B A (population 40) against the slow reference's."""
    for name, want in expected.items():
        key = stats.modules[name].input_key
        assert stats.inputs[key].num_tokens == want["T"]
        torch.testing.assert_close(stats.gradient(name), want["G"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.input_factor(key), want["Z"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.output_factor(name), want["y"], rtol=1e-10, atol=1e-14)
        if cfg.output_fisher == "sequence_lowrank":
            torch.testing.assert_close(stats.sequence_factor(name), want["P"], rtol=1e-10, atol=1e-14)
    factors = lora_da.solve(stats, cfg, progress=False)
    # the randomized solver stops at a residual of solver_tolerance: B A follows within the eigengap's factor
    bound = 10 * cfg.solver_tolerance if cfg.solver == "randomized" else 1e-7
    for name in expected:
        ba = factors[name].lora_B @ factors[name].lora_A
        assert relative(ba, reference_ba(expected[name], cfg, 40)) < bound, name


CASES = [
    ("llama", "right", "attention", "diagonal"),
    ("llama", "left", "attention", "sequence_lowrank"),
    ("llama", "right", "labels", "diagonal"),
    ("llama", "left", "labels", "sequence_lowrank"),
    ("llama", "right", "all", "diagonal"),
    ("gpt2", "right", "attention", "sequence_lowrank"),
    ("gpt2", "left", "labels", "diagonal"),
]


@pytest.mark.parametrize("arch,padding,kind,fisher", CASES)
def test_statistics_and_factors_match_slow_reference(arch, padding, kind, fisher):
    model = (tiny_llama if arch == "llama" else tiny_gpt2)(seed=1)
    batches = random_batches([1, 3, 4, 2], seed=2, padding=padding)
    cfg = lora_da.LoraDAConfig(
        rank=3, variance_weight=0.5, damping=1e-4, gamma=16.0, population_size=40, token_mask=kind,
        output_fisher=fisher,
    )
    stats = lora_da.collect_statistics(model, batches, cfg, progress=False)
    names = list(find_targets(model))
    assert list(stats.modules) == names
    expected, num_sequences = reference_statistics(model, batches, names, kind)
    assert stats.num_sequences == num_sequences == 10
    assert_matches_reference(stats, expected, cfg)


@pytest.mark.parametrize("fisher", ["diagonal", "sequence_lowrank"])
def test_classifier_with_pooled_inputs_matches_slow_reference(fisher):
    """BERT's pooler and head read one vector per sequence: each counts as one token, unmasked."""
    model = tiny_bert_classifier(seed=1)
    batches = classification_batches([3, 4, 2], seed=2)
    cfg = lora_da.LoraDAConfig(rank=2, variance_weight=0.5, damping=1e-4, gamma=16.0, population_size=40,
                               output_fisher=fisher)
    names = ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.output.dense",
             "bert.pooler.dense", "classifier"]
    stats = lora_da.collect_statistics(model, batches, cfg, progress=False, target_modules=names)
    expected, num_sequences = reference_statistics(model, batches, names, "attention")
    assert stats.num_sequences == num_sequences == 9
    assert stats.inputs[stats.modules["bert.pooler.dense"].input_key].num_tokens == 9
    assert_matches_reference(stats, expected, cfg)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("fisher", ["diagonal", "sequence_lowrank"])
def test_the_authors_options_match_slow_reference(fisher, solver):
    """The output damping ratio (in the Woodbury solve too), the delta normalisation power and the
    normalised variance term together, against dense matrices."""
    model = tiny_llama(seed=2)
    batches = random_batches([3, 2, 4], seed=5)
    cfg = lora_da.LoraDAConfig(rank=3, variance_weight=0.5, damping=1e-4, gamma=16.0, population_size=40,
                               output_fisher=fisher, output_damping_ratio=0.3, delta_normalization_power=1.5,
                               delta_normalization_reference=0.2, normalize_variance_guidance=True,
                               solver=solver)
    names = ["model.layers.1.self_attn.k_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    stats = lora_da.collect_statistics(model, batches, cfg, progress=False, target_modules=names)
    expected, _ = reference_statistics(model, batches, names, "attention")
    assert_matches_reference(stats, expected, cfg)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("fisher", ["diagonal", "sequence_lowrank"])
def test_relative_damping_matches_slow_reference(fisher, solver):
    """damping_mode="relative": lambda tr(Z) / n on each input, lambda mean(y) on each output."""
    model = tiny_llama(seed=3)
    batches = random_batches([3, 2, 4], seed=6)
    cfg = lora_da.LoraDAConfig(rank=3, variance_weight=0.5, damping=0.05, damping_mode="relative", gamma=16.0,
                               population_size=40, output_fisher=fisher, solver=solver)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"]
    stats = lora_da.collect_statistics(model, batches, cfg, progress=False, target_modules=names)
    expected, _ = reference_statistics(model, batches, names, "attention")
    assert_matches_reference(stats, expected, cfg)
    absolute = lora_da.solve(stats, cfg, damping_mode="absolute", progress=False)
    relative_factors = lora_da.solve(stats, cfg, progress=False)
    dampings = {name: d for info in relative_factors.report.shapes.values() for name, d in info.dampings.items()}
    for name in names:
        z = stats.input_factor(stats.modules[name].input_key)
        assert dampings[name] == pytest.approx(0.05 * float(torch.trace(z)) / z.shape[0], rel=1e-12)
        assert relative(absolute[name].lora_B @ absolute[name].lora_A,
                        relative_factors[name].lora_B @ relative_factors[name].lora_A) > 1e-3, name


def test_shared_inputs_detected_from_tensors():
    """q/k/v and gate/up read one tensor each: one input factor per group, found without names."""
    stats = lora_da.collect_statistics(tiny_llama(), random_batches([2, 3]), progress=False)
    groups = [entry.modules for entry in stats.inputs.values()]
    assert groups[:4] == [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ("model.layers.0.self_attn.o_proj",),
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
        ("model.layers.0.mlp.down_proj",),
    ]
    assert len(groups) == 8


@pytest.mark.parametrize("input_factor_dtype", ["float32", "float64"])
def test_statistics_of_a_bf16_model_accumulate_in_fp32_and_z_in_its_own_dtype(input_factor_dtype):
    model = tiny_llama(dtype=torch.bfloat16)
    stats = lora_da.collect_statistics(model, random_batches([2]), input_factor_dtype=input_factor_dtype,
                                       progress=False)
    assert stats.dtype == torch.float32
    assert all(e.z_sum.dtype == getattr(torch, input_factor_dtype) for e in stats.inputs.values())
    factors = lora_da.solve(stats, progress=False, rank=2)
    assert all(f.lora_A.dtype == torch.float32 and torch.isfinite(f.lora_B).all() for f in factors.values())
