"""Data-parallel collection and split solve under torchrun (gloo, two CPU ranks)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lora_da
from conftest import TARGETS, golden_dir

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def torchrun(tmp_path: Path, mode: str, count: int, expect_success: bool = True, timeout: int = 600):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(golden_dir()), str(tmp_path), mode, str(count)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if not expect_success:
        return done
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path


def single_process(golden, count):
    path, manifest, batches = golden
    cfg = lora_da.LoraDAConfig(target_modules=TARGETS, **manifest["variants"]["default"])
    model = AutoModelForCausalLM.from_pretrained(str(path / "model")).double()
    return model, cfg, batches[:count]


def assert_close_relative(got, want, bound):
    assert float((got - want).norm() / want.norm()) <= bound


@pytest.mark.parametrize("count", [12, 11], ids=["even", "uneven"])
def test_two_ranks_equal_one_process(golden, tmp_path, count):
    model, cfg, batches = single_process(golden, count)
    want = lora_da.solve(lora_da.collect_statistics(model, batches, cfg, progress=False), cfg, progress=False)
    out = torchrun(tmp_path, "index", count)
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    for name, factors in want.items():
        for key in ("lora_A", "lora_B"):
            assert torch.equal(ranks[0][f"{name}.{key}"], ranks[1][f"{name}.{key}"]), name
        got = ranks[0][f"{name}.lora_B"] @ ranks[0][f"{name}.lora_A"]
        assert_close_relative(got, factors.lora_B @ factors.lora_A, 1e-6)
    assert int(ranks[0]["num_sequences"]) == count
    # every rank's report covers every rank's modules: the whole solve's, and each unconverged module named
    reports = [json.loads((out / f"rank{r}.reports.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1]
    exact = lora_da.SolveReport.from_json(reports[0]["exact"])
    figures, wanted = ({name: dataclasses.asdict(module.diagnostics) for name, module in report.modules().items()}
                       for report in (exact, want.report))
    for report in (exact, want.report):
        for module in report.modules().values():
            module.diagnostics = None
    assert exact == want.report
    assert figures.keys() == wanted.keys()
    for name, values in wanted.items():  # from sums reduced in another order: equal to rounding
        assert figures[name] == pytest.approx(values, rel=1e-8, abs=1e-12), name
    stalled = lora_da.SolveReport.from_json(reports[0]["stalled"])
    assert {k: len(v.modules) for k, v in stalled.shapes.items()} == {k: len(v.modules) for k, v in want.report.shapes.items()}
    assert set(stalled.sigma_unconverged()) == set(want)


def test_distributed_sampler_through_initialize(golden, tmp_path):
    model, cfg, batches = single_process(golden, 12)
    peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, target_modules=TARGETS))
    lora_da.initialize(peft_model, batches, cfg, progress=False)
    want = {n: p.detach() for n, p in peft_model.named_parameters() if "lora_" in n}
    ranks = [load_file(str(torchrun(tmp_path, "sampler", 12) / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert_close_relative(ranks[0][name], value, 1e-6)


def test_statistics_sharded_by_owner_give_the_factors_of_one_process(golden, tmp_path):
    """shard_statistics: each rank keeps the sums of its own inputs' modules, none holds every
    module's, and every rank ends with every factor."""
    model, cfg, batches = single_process(golden, 12)
    stats = lora_da.collect_statistics(model, batches, cfg, progress=False)
    want = lora_da.solve(stats, cfg, progress=False)
    out = torchrun(tmp_path, "sharded", 12)
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    held = [json.loads((out / f"rank{r}.held.json").read_text()) for r in (0, 1)]
    assert held[0]["layout"] == held[1]["layout"] and held[0]["layout"].keys() == want.keys()
    assert {name for r in (0, 1) for name in held[r]["modules"]} == set(want)
    assert not set(held[0]["modules"]) & set(held[1]["modules"]) and all(h["modules"] for h in held)
    assert all(name in held[owner]["modules"] for name, (owner, _, _) in held[0]["layout"].items())
    assert held[0]["bytes"] + held[1]["bytes"] == stats.nbytes()
    for name, factors in want.items():
        for key in ("lora_A", "lora_B"):
            assert torch.equal(ranks[0][f"{name}.{key}"], ranks[1][f"{name}.{key}"]), name
        assert_close_relative(ranks[0][f"{name}.lora_B"] @ ranks[0][f"{name}.lora_A"],
                              factors.lora_B @ factors.lora_A, 1e-6)


def test_fsdp2_sharded_model_gets_the_factors_of_one_process(golden, tmp_path):
    """fully_shard on every decoder layer and the PEFT model, statistics sharded by owner:
    collection over each rank's half of the data, the split solve, and the factors written into
    each rank's shard of the adapter."""
    model, cfg, batches = single_process(golden, 12)
    peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, target_modules=TARGETS))
    lora_da.initialize(peft_model, batches, cfg, progress=False)
    want = {n: p.detach() for n, p in peft_model.named_parameters() if "lora_" in n}
    ranks = [load_file(str(torchrun(tmp_path, "fsdp2", 12) / f"rank{r}.safetensors")) for r in (0, 1)]
    for name, value in want.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert_close_relative(ranks[0][name], value, 1e-6)
        # each rank holds its own rows (FSDP2 shards dim 0): together they are the whole factor
        assert torch.equal(torch.cat([ranks[0][f"{name}.local"], ranks[1][f"{name}.local"]]), ranks[0][name]), name


def test_a_failing_rank_makes_every_rank_raise_with_models_untouched(tmp_path):
    out = torchrun(tmp_path, "fail", 12)
    errors = [json.loads((out / f"rank{r}.json").read_text())["error"] for r in (0, 1)]
    assert errors[1] == "OSError: calibration shard unreadable"
    assert errors[0].startswith("RuntimeError: lora_da: 1 other rank(s) failed during collection")


@pytest.mark.parametrize("mode,error", [
    ("solve_nan", r"FloatingPointError: non-finite statistics .* of modules \['model.layers.1.mlp.down_proj'\]"),
    ("solve_cholesky", r"RuntimeError: lora_da: Cholesky of the input factor of model.layers.1.mlp.down_proj failed"),
], ids=["nan", "cholesky"])
def test_a_rank_whose_solve_fails_makes_every_rank_raise(tmp_path, mode, error):
    """Only rank 1 solves the broken module; rank 0 raises too instead of waiting for its factors
    (a hang would end in the subprocess timeout)."""
    out = torchrun(tmp_path, mode, 12, timeout=180)
    errors = [json.loads((out / f"rank{r}.json").read_text())["error"] for r in (0, 1)]
    assert re.match(error, errors[1]), errors[1]
    assert errors[0] == "RuntimeError: lora_da: 1 other rank(s) failed during the solve; see their errors"


@pytest.mark.parametrize("mode,error,others", [
    ("unreached", r"RuntimeError: targeted modules never received an output gradient during collection: "
                  r"\['model.layers.1.mlp.gate_proj', 'model.layers.1.mlp.up_proj'\]", "collection"),
    ("reduced_nan", r"FloatingPointError: non-finite statistics", "the checks of the reduced statistics"),
    ("solve_silent", r"ValueError: no counted token reached modules", "the solve"),
], ids=["unreached module", "non-finite share", "silent share"])
def test_a_check_that_fails_on_one_rank_makes_every_rank_raise(tmp_path, mode, error, others):
    """A check that only rank 1's statistics fail: rank 0 raises too instead of waiting in the next
    collective (a hang would end in the subprocess timeout)."""
    out = torchrun(tmp_path, mode, 12, timeout=180)
    errors = [json.loads((out / f"rank{r}.json").read_text())["error"] for r in (0, 1)]
    assert re.match(error, errors[1]), errors[1]
    assert errors[0] == f"RuntimeError: lora_da: 1 other rank(s) failed during {others}; see their errors", errors[0]


def test_ranks_with_different_statistics_all_say_how_before_reducing(tmp_path):
    out = torchrun(tmp_path, "other_targets", 12, timeout=180)
    errors = [json.loads((out / f"rank{r}.json").read_text())["error"] for r in (0, 1)]
    assert errors[0] == errors[1], errors
    assert errors[0].startswith("ValueError: ranks collected different statistics"), errors[0]
    assert "input model.layers.0.mlp.down_proj: rank 0 [['model.layers.0.mlp.down_proj'], [80, 80]" in errors[0]
    assert ", rank 1 None" in errors[0]


def test_a_dying_rank_ends_the_job_with_its_name(tmp_path):
    """torchrun stops the other ranks (no hang in a collective) and names the one that died."""
    done = torchrun(tmp_path, "die", 12, expect_success=False)
    assert done.returncode != 0
    assert "exitcode  : 3" in done.stderr and "rank      : 1" in done.stderr, done.stderr[-3000:]


def test_input_owners_split_the_bytes_in_runs_and_leave_no_rank_without_an_input():
    from types import SimpleNamespace

    from lora_da.distributed import input_owners

    def statistics(sizes):
        return SimpleNamespace(inputs={f"input{i}": SimpleNamespace(z_sum=torch.empty(size), modules=())
                                       for i, size in enumerate(sizes)}, modules={})

    assert list(input_owners(statistics([1] * 8), 2).values()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert list(input_owners(statistics([100, 1, 1, 1]), 2).values()) == [0, 1, 1, 1]
    assert list(input_owners(statistics([1, 1, 1, 100]), 3).values()) == [0, 0, 1, 2]
    assert list(input_owners(statistics([5, 5, 5]), 3).values()) == [0, 1, 2]
    with pytest.raises(ValueError, match="2 distinct inputs cannot be shared by 3 ranks"):
        input_owners(statistics([1, 1]), 3)


def test_sharded_statistics_are_refused_where_they_cannot_serve(tmp_path):
    from conftest import random_batches, tiny_llama

    stats = lora_da.collect_statistics(tiny_llama(seed=1), random_batches([2], seed=2), progress=False)
    stats.layout = {name: [0, *entry.g_sum.shape] for name, entry in stats.modules.items()}
    with pytest.raises(ValueError, match="cannot save statistics sharded by owner"):
        stats.save(tmp_path / "stats.safetensors")
    with pytest.raises(ValueError, match="cannot merge statistics sharded by owner"):
        lora_da.Statistics.merge(stats, stats)
    with pytest.raises(ValueError, match="solved by the ranks that hold them"):
        lora_da.solve(stats, progress=False)
