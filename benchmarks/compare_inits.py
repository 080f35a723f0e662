"""Does LoRA-DA make the fine-tune better than the initialisers users already have?

    python benchmarks/compare_inits.py --quick     # rank 8, one seed, 30 steps: about 15 minutes on 2 CPU cores
    python benchmarks/compare_inits.py             # ranks 4, 8, 16, seeds 0-2, 100 steps (hours on a CPU)

Task: SmolLM2-135M-Instruct learns Rotten Tomatoes sentiment as a next-token verbalizer (the main
job's task): held-out label loss and accuracy. Every initialiser gets the same model, calibration
reviews (for those that read data), training batches in the same order, optimiser (AdamW, lr
2e-4), steps and evaluation; PEFT LoRA on every linear layer but the head, rsLoRA, alpha = 2r.

Initialisers: PEFT default (kaiming A, zero B), PEFT ``gaussian``, PiSSA, OLoRA, EVA, CorDA
(``ipm``), LoRA-GA (all from PEFT; PiSSA, OLoRA, CorDA and LoRA-GA rewrite the base weights as
W - s B A, as PEFT does), LoRA-One (the raw-gradient special case: V = top-r right singular vectors
of -G, no Fisher, no variance term, same scale as LoRA-DA) and LoRA-DA.

Outputs under $OUT (default ./outputs/compare_inits): runs.csv (one row per run and evaluation
step), runs.json (with loss curves), table.md (mean +- std over seeds at the last step, and
initialisation seconds), loss_<task>_r<rank>.png (training-loss curves, mean over seeds).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_da  # noqa: E402
from lora_da.embedded import Verbalizer, load_rotten_tomatoes, load_smollm2, split  # noqa: E402

INITS = ("peft_default", "gaussian", "pissa", "olora", "eva", "corda", "lora_ga", "lora_one", "lora_da")
PRESETS = {
    "quick": {"ranks": [8], "seeds": [0], "steps": 30, "calibration": 64, "eval": 128, "eval_every": 10},
    "full": {"ranks": [4, 8, 16], "seeds": [0, 1, 2], "steps": 100, "calibration": 128, "eval": 256, "eval_every": 25},
}


def lora_config(rank: int, **extra):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, use_rslora=True, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      **extra)


def import_preprocess_corda():
    """peft's CorDA module imports ``attr`` (the attrs package) without declaring it."""
    try:
        from peft.tuners.lora.corda import preprocess_corda
    except ModuleNotFoundError as error:
        raise RuntimeError("CorDA needs the attrs package: pip install attrs") from error
    return preprocess_corda


def initialise(name: str, base, rank: int, batches, population: int):
    """A PEFT model of ``base`` (modified in place) initialised by ``name``."""
    from peft import EvaConfig, LoraGAConfig, get_peft_model, initialize_lora_eva_weights, preprocess_loraga
    from peft.tuners.lora.config import CordaConfig

    inputs = [Verbalizer.model_inputs(b) for b in batches]
    if name in ("peft_default", "gaussian", "pissa", "olora"):
        init = {"peft_default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[name]
        return get_peft_model(base, lora_config(rank, init_lora_weights=init))
    if name == "eva":
        # every attended token feeds EVA's SVD: with its default label mask a verbalizer batch has one
        # token per sequence, fewer than EVA needs, and its loop over the data would never end
        model = get_peft_model(base, lora_config(rank, init_lora_weights="eva", eva_config=EvaConfig(use_label_mask=False)),
                               low_cpu_mem_usage=True)
        initialize_lora_eva_weights(model, dataloader=inputs, show_progress_bar=False)
        return model
    if name == "corda":
        config = lora_config(rank, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))

        @torch.no_grad()
        def run_model():  # CorDA's hooks take one sequence per forward
            for batch in inputs:
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                    base(input_ids=ids[mask.bool()][None])

        import_preprocess_corda()(base, config, run_model=run_model)
        model = get_peft_model(base, config)
        model.train()
        return model
    if name == "lora_ga":
        config = lora_config(rank, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step():
            for batch in inputs:
                base(**batch).loss.backward()

        preprocess_loraga(base, config, train_step)
        return get_peft_model(base, config)
    model = get_peft_model(base, lora_config(rank))
    if name == "lora_da":
        lora_da.initialize(model, inputs, population_size=population, progress=False)
    elif name == "lora_one":
        lora_one(model, inputs)
    else:
        raise ValueError(f"unknown initialiser {name!r}")
    return model


def lora_one(model, inputs, gamma: float = 1024.0) -> None:
    """LoRA-One: the top-r right singular vectors V of -G (G from one pass, no Fisher, no variance
    term), A = V^T / sqrt(gamma), B = (-G / sigma) V / sqrt(gamma): LoRA-DA's scale."""
    from lora_da.initialize import apply_factors
    from lora_da.solve import LoraFactors
    from lora_da.targets import lora_layers

    with model.disable_adapter():
        stats = lora_da.collect_statistics(model, inputs, progress=False)
    layers = lora_layers(model)
    factors = {}
    for name, layer in layers.items():
        rank = layer.r["default"]
        delta = -stats.gradient(name).double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        v = vh[:rank].T
        factors[name] = LoraFactors(v.T / math.sqrt(gamma), (delta / s[0]) @ v / math.sqrt(gamma))
    apply_factors(layers, factors, "default")


def fine_tune(model, train, held_out, verbalizer, steps: int, eval_every: int, lr: float):
    """AdamW over ``train`` batches; (training loss per step, {step: (held-out loss, accuracy)})."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    evaluations = {0: verbalizer.evaluate(model, held_out)}
    curve = []
    model.train()
    for step, batch in enumerate(train[:steps], start=1):
        loss = model(**verbalizer.model_inputs(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
        if step % eval_every == 0 or step == steps:
            evaluations[step] = verbalizer.evaluate(model, held_out)
    return curve, evaluations


def summarise(records, out: Path, steps: int) -> str:
    """table.md: per rank and initialiser, mean +- std over seeds at step 0 and the last step."""
    lines = ["| rank | initialiser | init s | loss step 0 | acc step 0 | loss step %d | acc step %d |" % (steps, steps),
             "| --- | --- | --- | --- | --- | --- | --- |"]

    def spread(values):
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"

    for rank in sorted({r["rank"] for r in records}):
        for init in INITS:
            runs = [r for r in records if r["rank"] == rank and r["init"] == init]
            if not runs:
                continue
            first = [r["evaluations"]["0"] for r in runs]
            last = [r["evaluations"][str(steps)] for r in runs]
            lines.append(f"| {rank} | {init} | {statistics.mean(r['init_seconds'] for r in runs):.1f} | "
                         f"{spread([f[0] for f in first])} | {spread([f[1] for f in first])} | "
                         f"{spread([x[0] for x in last])} | {spread([x[1] for x in last])} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def plot(records, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for rank in sorted({r["rank"] for r in records}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for init in INITS:
            curves = [r["curve"] for r in records if r["rank"] == rank and r["init"] == init]
            if curves:
                mean = [statistics.mean(values) for values in zip(*curves)]
                ax.plot(range(1, len(mean) + 1), mean, label=init, linewidth=2.2 if init == "lora_da" else 1.2)
        ax.set(xlabel="step", ylabel="training label loss (mean over seeds)", yscale="log",
               title=f"SmolLM2-135M, Rotten Tomatoes verbalizer, r = {rank}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"loss_smollm2_r{rank}.png", dpi=120)
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="rank 8, one seed, 30 steps")
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    out = Path(os.environ.get("OUT", ROOT / "outputs")) / "compare_inits"
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_smollm2()
    verbalizer = Verbalizer(tokenizer)
    records = []
    for seed in preset["seeds"]:
        calibration, train, held_out = split(load_rotten_tomatoes(),
                                             [preset["calibration"], 8 * preset["steps"], preset["eval"]], seed=seed)
        calibration_batches = verbalizer.batches(calibration, 8)
        train_batches, eval_batches = verbalizer.batches(train, 8), verbalizer.batches(held_out, 32)
        for rank in preset["ranks"]:
            for init in args.inits:
                torch.manual_seed(seed)
                start = time.perf_counter()
                model = initialise(init, copy.deepcopy(base), rank, calibration_batches, population=len(train))
                init_seconds = time.perf_counter() - start
                torch.manual_seed(seed)
                curve, evaluations = fine_tune(model, train_batches, eval_batches, verbalizer, preset["steps"],
                                               preset["eval_every"], args.lr)
                record = {"task": "smollm2_rotten_tomatoes", "init": init, "rank": rank, "seed": seed,
                          "init_seconds": init_seconds, "curve": curve,
                          "evaluations": {str(k): v for k, v in evaluations.items()}}
                records.append(record)
                last = evaluations[preset["steps"]]
                print(f"seed {seed} r={rank:<2} {init:<12} init {init_seconds:6.1f} s  step 0 loss "
                      f"{evaluations[0][0]:.4f} acc {evaluations[0][1]:.3f}  step {preset['steps']} loss {last[0]:.4f} "
                      f"acc {last[1]:.3f}", flush=True)
                (out / "runs.json").write_text(json.dumps({"preset": preset, "lr": args.lr, "records": records}))
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "init", "rank", "seed", "init_seconds", "step", "held_out_loss", "held_out_accuracy"])
        for r in records:
            for step, (loss, accuracy) in r["evaluations"].items():
                writer.writerow([r["task"], r["init"], r["rank"], r["seed"], f"{r['init_seconds']:.3f}", step,
                                 f"{loss:.6f}", f"{accuracy:.4f}"])
    print(summarise(records, out, preset["steps"]))
    plot(records, out)


if __name__ == "__main__":
    main()
