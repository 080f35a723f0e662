"""When does LoRA-DA's start help? Its damping and gamma against the starts users pick, with the
input energy of every start beside its held-out loss.

    python benchmarks/start_study.py --tasks minilm smollm2 smollm2_lm --seeds 0 1 2   # hours on a CPU
    python benchmarks/start_study.py --quick --tasks minilm   # seed 0, 10 steps, few examples: a smoke run
    python benchmarks/start_study.py --report-only       # table and plots of $OUT/start_study/runs.json
    python benchmarks/start_study.py --report-only --merge a/runs.json b/runs.json   # of split runs, merged

Tasks (``--tasks``; rank 8, rsLoRA alpha = 2r, AdamW, the same batches for every start):
- ``minilm`` and ``smollm2``: the comparison's tasks (``compare_inits.py``, its full preset's
  calibration, steps and held-out sizes), Rotten Tomatoes sentiment;
- ``smollm2_lm``: domain adaptation, SmolLM2-135M-Instruct learning the reviews' text with the
  causal-LM loss on every token (64 calibration reviews, 100 steps of 8, 128 held out; accuracy is
  top-1 next-token accuracy).

Starts: PEFT's default, PiSSA and LoRA-One (``compare_inits.initialise``), and LoRA-DA at each
setting of ``SETTINGS``: the paper's (absolute damping lambda = 1e-6, gamma = 1024), gamma 64
and 16, ``damping_mode="relative"`` (lambda tr(Z) / n on each input, lambda mean(y) on each
output) at lambda 1e-2, 1e-1 and 1 with gamma 1024, and lambda 1e-1 with gamma 16. The LoRA-DA settings share one collection per task and seed
(``initialize(statistics=...)``).

Every run records the input energy of its lora_A, e(A) = tr(A Z A^T) / tr(A A^T) / (tr Z / n)
per module (Z from the calibration data; 1 for a random direction), as its median over modules.

Outputs under $OUT (default ./outputs)/start_study (start_study_quick for --quick): runs.json
(loss curves, per-module energies), runs.csv, table.md (per task and start: mean +- std over
seeds of e(A) and of the held-out loss and accuracy at step 0 and at the last step, and the rank
correlation of e(A) with the last loss over the starts' means and over all runs) and
loss_<task>.png (held-out loss curves, means over seeds).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_inits  # noqa: E402
from compare_inits import ROOT, TASKS, Task, evaluations, initialise, lora_config, run_starts  # noqa: E402
from peft import get_peft_model  # noqa: E402

import lora_da  # noqa: E402
from lora_da.embedded import load_rotten_tomatoes, load_smollm2, split  # noqa: E402
from lora_da.targets import lora_layers  # noqa: E402

RANK = 8
BASELINES = ("peft_default", "pissa", "lora_one")
SETTINGS = {  # LoRA-DA start -> its config overrides
    "lora_da": {},
    "lora_da_g64": {"gamma": 64.0},
    "lora_da_g16": {"gamma": 16.0},
    **{f"lora_da_rel{tag}": {"damping_mode": "relative", "damping": float(tag)} for tag in ("1e-2", "1e-1", "1")},
    "lora_da_rel1e-1_g16": {"damping_mode": "relative", "damping": 0.1, "gamma": 16.0},
}
STARTS = BASELINES + tuple(SETTINGS)


class ReviewText(compare_inits.SentenceClassifier):
    """Causal-LM batches of review text (loss on every token) and their evaluation."""

    def __init__(self, tokenizer, max_tokens: int = 48):
        super().__init__(tokenizer, max_tokens)
        if tokenizer is not None and tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def batch(self, examples) -> dict:
        """input_ids, attention_mask [B, L] (right-padded) and labels [B, L]: the ids, -100 on padding."""
        encoded = self.tokenizer([text for text, _ in examples], padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}

    @staticmethod
    def scores(model, batch) -> tuple:
        """(summed cross-entropy, correct top-1 next-token predictions, predicted tokens) of one batch."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        kept = labels != -100
        loss = float(torch.nn.functional.cross_entropy(logits[kept], labels[kept], reduction="sum"))
        return loss, int((logits[kept].argmax(dim=-1) == labels[kept]).sum()), int(kept.sum())


def load_review_text(seed: int):
    model, tokenizer = load_smollm2()
    return model, ReviewText(tokenizer)


STUDY_TASKS = {
    "minilm": TASKS["minilm"],
    "smollm2": TASKS["smollm2"],
    "smollm2_lm": Task("smollm2_review_text", "SmolLM2-135M, Rotten Tomatoes text (causal LM, every token)", 2e-4,
                       "CAUSAL_LM", TASKS["smollm2"].target_modules, load_review_text),
}
PRESETS = {
    "minilm": dict(compare_inits.PRESETS["full"]["minilm"], ranks=[RANK]),
    "smollm2": dict(compare_inits.PRESETS["full"]["smollm2"], ranks=[RANK]),
    "smollm2_lm": {"ranks": [RANK], "seeds": [0, 1, 2], "steps": 100, "calibration": 64, "eval": 128, "eval_every": 20},
}
QUICK = {"ranks": [RANK], "seeds": [0], "steps": 10, "calibration": 16, "eval": 32, "eval_every": 5}


def input_energies(model, stats) -> dict:
    """Module -> e(A) of its lora_A [r, n] against the input factor Z [n, n] of ``stats``."""
    energies = {}
    for name, layer in lora_layers(model).items():
        a = layer.lora_A["default"].weight.detach().double()
        z = stats.input_factor(stats.modules[name].input_key).double()
        energies[name] = float((a @ z * a).sum() / a.square().sum() / (z.diagonal().sum() / z.shape[0]))
    return energies


def run_task(key: str, seed: int, preset: dict, starts, reviews, done, record) -> None:
    """Every start of ``starts`` not in ``done`` on task ``key`` and ``seed``; ``record`` gets each run."""
    task = STUDY_TASKS[key]
    starts = [name for name in starts if (task.name, name, seed) not in done]
    if not starts:
        return
    base = task.base(seed)
    calibration, train, held_out = split(reviews, [preset["calibration"], 8 * preset["steps"], preset["eval"]], seed=seed)
    calibration_batches = task.encoder.batches(calibration, 8)
    train_batches, eval_batches = task.encoder.batches(train, 8), task.encoder.batches(held_out, 32)
    inputs = [task.encoder.model_inputs(b) for b in calibration_batches]
    probe = get_peft_model(copy.deepcopy(base), lora_config(task, RANK))
    start = time.perf_counter()
    with probe.disable_adapter():
        stats = lora_da.collect_statistics(probe, inputs, population_size=len(train), progress=False)
    collect_seconds = time.perf_counter() - start

    def make_start(name: str) -> lora_da.Start:
        """A LoRA-DA setting solves the shared statistics; the baselines are ``initialise``'s."""
        def make(model, config, calibration, population):
            if name not in SETTINGS:
                return initialise(name, task, model, RANK, calibration, population)
            model = get_peft_model(model, lora_config(task, RANK))
            lora_da.initialize(model, None, statistics=stats, progress=False, **SETTINGS[name])
            return model
        return lora_da.Start(name, make)

    runs = run_starts(task, base, RANK, seed, starts, calibration_batches, train_batches, eval_batches, preset,
                      len(train), make_start, observe=lambda name, model: {"energies": input_energies(model, stats)})
    for run in runs:
        energies = run.extra["energies"]
        init_seconds = run.init_seconds + (collect_seconds if run.start in SETTINGS else 0.0)
        last = run.heldout[preset["steps"]]
        energy = statistics.median(energies.values())
        print(f"{task.name} seed {seed} {run.start:<20} e(A) {energy:9.3g}  step 0 loss {run.heldout[0]['loss']:.4f}  "
              f"step {preset['steps']} loss {last['loss']:.4f} acc {last['accuracy']:.3f}  init {init_seconds:.1f} s",
              flush=True)
        record({"task": task.name, "init": run.start, "rank": RANK, "seed": seed, "preset": preset, "lr": task.lr,
                "settings": SETTINGS.get(run.start), "init_seconds": init_seconds, "input_energy": energy,
                "input_energies": energies, "curve": run.train_loss, "evaluations": evaluations(run)})


def rank_correlation(xs, ys) -> float:
    """Spearman's rho of two equally long sequences (no ties expected)."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for position, index in enumerate(order):
            out[index] = float(position)
        return out

    rx, ry = ranks(list(xs)), ranks(list(ys))
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def summarise(records, out: Path) -> str:
    """table.md: per task and start, mean +- std over seeds; per task, Spearman's rho of the
    median e(A) with the last held-out loss, over the starts' means and over all runs."""
    def spread(values, digits=4):
        if len(values) > 1:
            return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
        return f"{values[0]:.{digits}f}"

    lines = []
    for task in sorted({r["task"] for r in records}):
        runs_of = {start: [r for r in records if r["task"] == task and r["init"] == start] for start in STARTS}
        steps = next(iter(r for r in records if r["task"] == task))["preset"]["steps"]
        lines += [f"### {task}, {steps} steps, rank {RANK}", "",
                  "| start | seeds | e(A) median | loss step 0 | loss last step | acc last step |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for start, runs in runs_of.items():
            if runs:
                lines.append(f"| {start} | {len(runs)} | {spread([r['input_energy'] for r in runs], 3)} | "
                             f"{spread([r['evaluations']['0'][0] for r in runs])} | "
                             f"{spread([r['evaluations'][str(steps)][0] for r in runs])} | "
                             f"{spread([r['evaluations'][str(steps)][1] for r in runs])} |")
        means = [(statistics.mean(r["input_energy"] for r in runs),
                  statistics.mean(r["evaluations"][str(steps)][0] for r in runs)) for runs in runs_of.values() if runs]
        runs = [r for r in records if r["task"] == task]
        if len(means) > 2:
            by_start = rank_correlation(*zip(*means))
            by_run = rank_correlation([r["input_energy"] for r in runs], [r["evaluations"][str(steps)][0] for r in runs])
            lines += ["", f"Spearman's rho of e(A) with the last held-out loss: {by_start:+.2f} over the {len(means)} "
                          f"starts' means, {by_run:+.2f} over all {len(runs)} runs"]
        lines.append("")
    table = "\n".join(lines)
    (out / "table.md").write_text(table)
    return table


def plot(records, out: Path) -> None:
    """loss_<task>.png: held-out loss at the evaluation steps, means over seeds, one line per start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, task in STUDY_TASKS.items():
        if not any(r["task"] == task.name for r in records):
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        seeds = set()
        for start in STARTS:
            runs = [r for r in records if r["task"] == task.name and r["init"] == start]
            if not runs:
                continue
            seeds.add(len(runs))
            steps = sorted(int(k) for k in runs[0]["evaluations"])
            held = [statistics.mean(r["evaluations"][str(k)][0] for r in runs) for k in steps]
            style = {"linestyle": "-" if start in SETTINGS else "--", "linewidth": 2.2 if start == "lora_da" else 1.2}
            ax.plot(steps, held, marker="o", markersize=3, label=start, **style)
        ax.set(xlabel="step", ylabel="held-out loss", yscale="log")
        ax.set_title(f"{task.title}, r = {RANK} (means over {'-'.join(map(str, sorted(seeds)))} seed(s))", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"loss_{key}.png", dpi=110)
        plt.close(fig)


def write_csv(records, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "init", "seed", "input_energy", "step", "held_out_loss", "held_out_accuracy"])
        for r in records:
            for step, (loss, accuracy) in r["evaluations"].items():
                writer.writerow([r["task"], r["init"], r["seed"], f"{r['input_energy']:.6g}", step, f"{loss:.6f}",
                                 f"{accuracy:.4f}"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(STUDY_TASKS), default=list(STUDY_TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the preset's (0, 1, 2; 0 for --quick)")
    parser.add_argument("--starts", nargs="+", choices=STARTS, default=list(STARTS))
    parser.add_argument("--quick", action="store_true", help="smoke run of each task: seed 0, 10 steps, few examples")
    parser.add_argument("--report-only", action="store_true",
                        help="no runs: table, CSV and plots of runs.json (runs already there are never redone)")
    parser.add_argument("--merge", nargs="+", type=Path, default=[], metavar="RUNS_JSON",
                        help="add the runs of these files (of runs split over processes) to runs.json first")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT", ROOT / "outputs")) / ("start_study_quick" if args.quick else "start_study")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.json"
    records = json.loads(path.read_text())["records"] if path.exists() else []
    done = {(r["task"], r["init"], r["seed"]) for r in records}
    for other in args.merge:
        for run in json.loads(other.read_text())["records"]:
            if (run["task"], run["init"], run["seed"]) not in done:
                records.append(run)
                done.add((run["task"], run["init"], run["seed"]))
    if args.merge:
        path.write_text(json.dumps({"records": records}))

    def record(run):
        records.append(run)
        path.write_text(json.dumps({"records": records}))

    if not args.report_only:
        reviews = load_rotten_tomatoes()
        for key in args.tasks:
            preset = QUICK if args.quick else PRESETS[key]
            for seed in args.seeds or preset["seeds"]:
                run_task(key, seed, preset, args.starts, reviews, done, record)
    if records:
        write_csv(records, out / "runs.csv")
        print(summarise(records, out))
        plot(records, out)


if __name__ == "__main__":
    main()
