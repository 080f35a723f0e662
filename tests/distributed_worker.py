"""One rank of the torchrun tests (tests/test_distributed.py): collects and solves on the golden
model and writes what it got to OUT/rank<r>.safetensors (or, for ``fail``, what it raised).

    torchrun --nproc_per_node=2 tests/distributed_worker.py GOLDEN OUT MODE [BATCHES]

MODE: ``index`` (a list of batches: the library shards; also writes OUT/rank<r>.reports.json, the
solver reports of that solve and of a randomized one stopped after one iteration), ``sampler`` (a DataLoader with a
DistributedSampler, through ``initialize`` on a PEFT model), ``fail`` (rank 1's loader raises),
``die`` (rank 1's process exits mid-collection), ``solve_nan`` / ``solve_cholesky`` (the
statistics of a module that rank 1 solves hold a NaN in G, or an input factor no damping makes
positive definite), and checks that fail on rank 1 alone: ``unreached`` (a module none of its
batches reach), ``other_targets`` (it targets other modules), ``reduced_nan`` (its share of the
sharded sums holds a NaN), ``solve_silent`` (an input of its share has no counted token).
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from transformers import AutoModelForCausalLM

import lora_da

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TARGETS, assert_same_state, golden_batches, model_state  # noqa: E402


BROKEN = "model.layers.1.mlp.down_proj"  # the second of the two down_proj: rank 1 solves it


def failing(batches, die: bool):
    for index, batch in enumerate(batches):
        if index == 1 and dist.get_rank() == 1:
            if die:
                os._exit(3)
            raise OSError("calibration shard unreadable")
        yield batch


def write_outcome(out: Path, rank: int, call) -> None:
    """Run ``call`` and write what it raised (or "no error") to OUT/rank<r>.json; leave the group."""
    try:
        call()
        outcome = "no error"
    except Exception as error:  # noqa: BLE001 - the test reads what was raised
        outcome = f"{type(error).__name__}: {error}"
    (out / f"rank{rank}.json").write_text(json.dumps({"error": outcome}))
    dist.destroy_process_group()


def main(golden: Path, out: Path, mode: str, count: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    manifest = json.loads((golden / "manifest.json").read_text())
    cfg = lora_da.LoraDAConfig(target_modules=TARGETS, **manifest["variants"]["default"])
    model = AutoModelForCausalLM.from_pretrained(str(golden / "model")).double()
    batches = golden_batches(golden, count)
    if mode == "index":
        stats = lora_da.collect_statistics(model, batches, cfg, progress=False)
        factors = lora_da.solve(stats, cfg, progress=False)
        tensors = {f"{n}.{k}": getattr(f, k) for n, f in factors.items() for k in ("lora_A", "lora_B")}
        tensors["num_sequences"] = torch.tensor(stats.num_sequences)
        stalled = lora_da.solve(stats, cfg, solver="randomized", solver_max_iterations=1, progress=False)
        (out / f"rank{rank}.reports.json").write_text(json.dumps({"exact": factors.report.to_json(), "stalled": stalled.report.to_json()}))
    elif mode == "sampler":
        sequences = [{k: v[0] for k, v in b.items()} for b in batches]
        loader = DataLoader(sequences, batch_size=1, sampler=DistributedSampler(sequences, shuffle=False))
        peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, target_modules=TARGETS))
        lora_da.initialize(peft_model, loader, cfg, progress=False)
        tensors = {n: p.detach() for n, p in peft_model.named_parameters() if "lora_" in n}
    elif mode == "sharded":  # statistics reduced to their owners only
        stats = lora_da.collect_statistics(model, batches, cfg, shard_statistics=True, progress=False)
        factors = lora_da.solve(stats, cfg, progress=False)
        tensors = {f"{n}.{k}": getattr(f, k) for n, f in factors.items() for k in ("lora_A", "lora_B")}
        (out / f"rank{rank}.held.json").write_text(json.dumps({"modules": list(stats.modules),
                                                               "layout": stats.layout, "bytes": stats.nbytes()}))
    elif mode == "fsdp2":  # the PEFT model sharded with FSDP2, statistics sharded by owner: the sharded adapter
        from torch.distributed.fsdp import fully_shard

        peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, target_modules=TARGETS))
        for layer in peft_model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(peft_model)
        lora_da.initialize(peft_model, batches, cfg, shard_statistics=True, progress=False)  # rank r: batches r, r + 2, ...
        tensors = {n: p.full_tensor() for n, p in peft_model.named_parameters() if "lora_" in n}
        tensors.update({f"{n}.local": p.to_local() for n, p in peft_model.named_parameters() if "lora_" in n})
    elif mode in ("unreached", "other_targets", "reduced_nan"):  # a check that fails on rank 1 alone
        if mode == "unreached" and rank == 1:  # like an MoE expert that none of rank 1's batches reach
            model.get_submodule(BROKEN).register_forward_hook(lambda module, args, output: output.detach())
        if mode == "other_targets" and rank == 1:
            cfg = cfg.replace(target_modules=[t for t in TARGETS if t != "down_proj"])
        if mode == "reduced_nan":
            reduce = lora_da.distributed.reduce_statistics

            def reduce_then_spoil(stats, to_owners=False):  # a NaN in sums that only rank 1 holds
                reduce(stats, to_owners)
                if rank == 1:
                    next(iter(stats.modules.values())).g_sum[0, 0] = float("nan")

            lora_da.distributed.reduce_statistics = reduce_then_spoil
        write_outcome(out, rank, lambda: lora_da.collect_statistics(model, batches, cfg, shard_statistics=True,
                                                                    progress=False))
        return
    elif mode == "solve_silent":  # sharded statistics of which rank 1's hold an input without counted tokens
        stats = lora_da.collect_statistics(model, batches, cfg, shard_statistics=True, progress=False)
        if rank == 1:
            next(iter(stats.inputs.values())).num_tokens = 0
        write_outcome(out, rank, lambda: lora_da.solve(stats, cfg, progress=False))
        return
    elif mode.startswith("solve_"):
        stats = lora_da.collect_statistics(model, batches, cfg, progress=False)
        if mode == "solve_nan":
            stats.modules[BROKEN].g_sum[0, 0] = float("nan")
        else:
            entry = stats.inputs[stats.modules[BROKEN].input_key]
            entry.z_sum.copy_(-1e12 * entry.num_tokens * torch.eye(entry.z_sum.shape[0], dtype=entry.z_sum.dtype))
        write_outcome(out, rank, lambda: lora_da.solve(stats, cfg, progress=False))
        return
    else:
        before = model_state(model)
        write_outcome(out, rank, lambda: lora_da.collect_statistics(model, failing(batches, mode == "die"), cfg,
                                                                    progress=False))
        assert_same_state(before, model_state(model))
        return
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 10**9)
