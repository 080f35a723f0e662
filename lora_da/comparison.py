"""Does LoRA-DA's start help on this data? ``compare`` fine-tunes the same model from several
starts (PEFT's default, LoRA-DA, PiSSA, LoRA-One, ...) with the same adapter config, batches,
optimiser and seed, and records held-out loss along the way: the project's one training loop."""
from __future__ import annotations

import copy
import csv
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .peft_adapters import apply_factors, initialize
from .quiet import dependency_noise_filtered
from .subspaces import LoraFactors
from .targets import lora_layers

Batch = Dict[str, torch.Tensor]
# (base model, its LoRA config, calibration batches, population size N) -> the PEFT model of the start
MakeStart = Callable[[nn.Module, object, Sequence[Batch], int], nn.Module]


def _no_refusal(model: nn.Module) -> Optional[str]:
    return None


def _rewrite_refusal(model: nn.Module) -> Optional[str]:
    """Why PEFT cannot rewrite this base's weights as W - s B A (PiSSA), or None."""
    if any(p.dtype in (torch.uint8, torch.int8) for p in model.parameters()):
        return "its base is quantized, and a quantized base cannot hold W - s B A"
    if any(p.dtype == torch.float64 for p in model.parameters()):
        return "PEFT makes it in float32, float16 or bfloat16 only, and the base is float64"
    return None


@dataclass(frozen=True)
class Start:
    """A way to start the adapter. ``rewrites_base``: the start also rewrites the base weights
    (W - s B A, as PiSSA does): its adapter is saved converted for the original base.
    ``refuses(base)``: why it cannot be made for this base, or None."""

    name: str
    make: MakeStart
    rewrites_base: bool = False
    refuses: Callable[[nn.Module], Optional[str]] = _no_refusal


def _peft_start(init_lora_weights) -> MakeStart:
    def make(base, lora_config, calibration, population):
        from peft import get_peft_model

        config = copy.deepcopy(lora_config)
        config.init_lora_weights = init_lora_weights
        with dependency_noise_filtered():
            return get_peft_model(base, config)
    return make


def _lora_da_start(**overrides) -> MakeStart:
    def make(base, lora_config, calibration, population):
        model = _peft_start(True)(base, lora_config, calibration, population)
        initialize(model, calibration, population_size=population, progress=False, **overrides)
        return model
    return make


def chosen_starts(starts: Sequence[Union[str, Start]]) -> List[Start]:
    """``starts`` as ``Start`` objects: names of ``STARTS`` looked up; ValueError for unknown names."""
    unknown = [s for s in starts if isinstance(s, str) and s not in STARTS]
    if unknown or not starts:
        raise ValueError(f"unknown starts {unknown or list(starts)}; choose from {list(STARTS)}")
    return [STARTS[s] if isinstance(s, str) else s for s in starts]


def refusals(starts: Sequence[Start], base: nn.Module) -> List[str]:
    """"start: reason" for each of ``starts`` that cannot be made for ``base``."""
    return [f"{start.name}: {reason}" for start in starts for reason in [start.refuses(base)] if reason]


def lora_one(model: nn.Module, calibration: Sequence[Batch], population_size: int, gamma: float = 1024.0) -> None:
    """LoRA-One in place on a PEFT model: the top-r right singular vectors V of -G (G from one pass,
    no Fisher, no variance term), A = V^T / sqrt(gamma), B = (-G / sigma_1) V / sqrt(gamma): LoRA-DA's scale."""
    from .collect import collect_statistics

    with model.disable_adapter():
        stats = collect_statistics(model, calibration, population_size=population_size, progress=False)
    layers = lora_layers(model)
    factors = {}
    for name, layer in layers.items():
        rank = layer.r["default"]
        delta = -stats.gradient(name).double()
        _, s, vh = torch.linalg.svd(delta, full_matrices=False)
        v = vh[:rank].T
        factors[name] = LoraFactors(v.T / math.sqrt(gamma), (delta / s[0]) @ v / math.sqrt(gamma))
    apply_factors(layers, factors, "default")


def _lora_one_start(base, lora_config, calibration, population):
    model = _peft_start(True)(base, lora_config, calibration, population)
    lora_one(model, calibration, population)
    return model


STARTS = {
    "peft_default": Start("peft_default", _peft_start(True)),
    "lora_da": Start("lora_da", _lora_da_start()),
    "pissa": Start("pissa", _peft_start("pissa"), rewrites_base=True, refuses=_rewrite_refusal),
    "lora_one": Start("lora_one", _lora_one_start),
    "lora_da_relative": Start("lora_da_relative", _lora_da_start(damping_mode="relative", damping=0.1)),
}
DEFAULT_STARTS = ("peft_default", "lora_da")


def mean_loss(model: nn.Module, batches: Sequence[Batch]) -> Dict[str, float]:
    """{"loss": the model's loss over ``batches``, each batch weighted by its supervised labels}
    (labels [B] of a classifier, or [B, L] of a causal LM, shifted by one, -100 ignored); eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            labels = batch["labels"]
            weight = labels.numel() if labels.dim() == 1 else int((labels[..., 1:] != -100).sum())
            total += float(model(**batch).loss) * weight
            count += weight
    model.train(was_training)
    return {"loss": total / max(count, 1)}


def fine_tune(model: nn.Module, train: Sequence[Batch], steps: int, lr: float, evaluate: Callable[[nn.Module], object],
              eval_steps: Sequence[int], model_inputs: Callable[[Batch], Batch] = lambda batch: batch,
              desc: Optional[str] = None) -> Tuple[List[float], Dict[int, object]]:
    """AdamW on the trainable parameters, one step per batch of ``train`` (cycled); returns the
    training loss per step and {step: ``evaluate(model)``} at step 0 and ``eval_steps``."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    evaluations = {0: evaluate(model)}
    curve = []
    model.train()
    for step in tqdm(range(1, steps + 1), desc=desc, unit="step", disable=desc is None, leave=False):
        loss = model(**model_inputs(train[(step - 1) % len(train)])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
        if step in eval_steps:
            evaluations[step] = evaluate(model)
    return curve, evaluations


def evaluation_steps(steps: int, points: int = 5) -> List[int]:
    """About ``points`` evenly spaced steps after 0, the last one included."""
    every = max(1, math.ceil(steps / points))
    return sorted({*range(every, steps, every), steps})


@dataclass
class Run:
    """One start fine-tuned from one seed."""

    start: str
    seed: int
    init_seconds: float
    train_seconds: float  # the training steps, without the held-out evaluations
    train_loss: List[float]  # per step
    heldout: Dict[int, dict]  # step -> what ``evaluate`` measured ("loss", ...)
    extra: dict = field(default_factory=dict)  # what ``observe`` returned after the start was made

    @property
    def final_loss(self) -> float:
        return self.heldout[max(self.heldout)]["loss"]


@dataclass
class Comparison:
    """The runs of ``compare``, and what they say."""

    runs: List[Run]

    def starts(self) -> List[str]:
        return list(dict.fromkeys(run.start for run in self.runs))

    def final_losses(self, start: str) -> List[float]:
        return [run.final_loss for run in self.runs if run.start == start]

    def ranking(self) -> List[Tuple[str, float, float]]:
        """(start, mean final held-out loss over seeds, its standard deviation), best first."""
        rows = []
        for start in self.starts():
            losses = self.final_losses(start)
            rows.append((start, statistics.fmean(losses), statistics.stdev(losses) if len(losses) > 1 else 0.0))
        return sorted(rows, key=lambda row: row[1])

    def verdict(self) -> str:
        """One line: the start with the lowest final held-out loss and its margin over the next,
        "within noise" where the margin is below the spread across seeds."""
        ranking = self.ranking()
        best, loss, spread = ranking[0]
        if len(ranking) == 1:
            return f"only {best} was run: final held-out loss {loss:.4f}"
        runner_up, other, other_spread = ranking[1]
        margin = other - loss
        noise = max(spread, other_spread)
        seeds = len(self.final_losses(best))
        line = (f"best start: {best}, final held-out loss {loss:.4f}, {margin:.4f} below {runner_up}"
                + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
        if seeds == 1:
            line += " (one seed: --seeds 0 1 2 tells a margin from noise)"
        elif margin < noise:
            line += f": within noise (spread across seeds {noise:.4f})"
        return line

    def table(self) -> str:
        """Markdown: per start, mean held-out loss at every evaluated step, init and train seconds."""
        steps = sorted({step for run in self.runs for step in run.heldout})
        lines = ["| start | seeds | " + " | ".join(f"loss step {s}" for s in steps) + " | init s | train s |",
                 "| --- | --- | " + " | ".join("---" for _ in steps) + " | --- | --- |"]
        for start in self.starts():
            runs = [run for run in self.runs if run.start == start]
            losses = [statistics.fmean(run.heldout[s]["loss"] for run in runs) for s in steps]
            lines.append(f"| {start} | {len(runs)} | " + " | ".join(f"{v:.4f}" for v in losses)
                         + f" | {statistics.fmean(r.init_seconds for r in runs):.1f}"
                         + f" | {statistics.fmean(r.train_seconds for r in runs):.1f} |")
        return "\n".join(lines)

    def write_csv(self, path: Path) -> None:
        """One row per run and evaluated step."""
        keys = sorted({key for run in self.runs for figures in run.heldout.values() for key in figures})
        with Path(path).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["start", "seed", "step", *[f"heldout_{key}" for key in keys], "init_seconds",
                             "train_seconds"])
            for run in self.runs:
                for step, figures in sorted(run.heldout.items()):
                    writer.writerow([run.start, run.seed, step, *[figures.get(key, "") for key in keys],
                                     f"{run.init_seconds:.3f}", f"{run.train_seconds:.3f}"])

    def plot(self, path: Path) -> bool:
        """Held-out loss against step, one line per start (mean over seeds); False without matplotlib."""
        try:
            import matplotlib
        except ImportError:
            return False

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        for start in self.starts():
            runs = [run for run in self.runs if run.start == start]
            steps = sorted(runs[0].heldout)
            axes.plot(steps, [statistics.fmean(run.heldout[s]["loss"] for run in runs) for s in steps],
                      marker="o", label=start)
        axes.set_xlabel("step")
        axes.set_ylabel("held-out loss")
        axes.set_yscale("log")
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return True

    def to_json(self) -> dict:
        return {"runs": [asdict(run) for run in self.runs]}


def save_adapter(model: nn.Module, folder: Path, initial: Optional[Path] = None) -> None:
    """``model``'s adapter for ``PeftModel.from_pretrained`` on the original base; with ``initial``
    (a start that rewrote the base weights) converted against that initial adapter (PEFT's conversion)."""
    options = {"save_embedding_layers": False}
    if initial is not None:
        options["path_initial_model_for_weight_conversion"] = str(initial)
    with dependency_noise_filtered():
        model.save_pretrained(str(folder), **options)


@dataclass
class _Trial:
    """What every start of a comparison shares (``compare``'s arguments)."""

    train: Sequence[Batch]
    heldout: Sequence[Batch]
    lora_config: object
    calibration: Sequence[Batch]
    population: int
    steps: int
    lr: float
    eval_steps: List[int]
    evaluate: Callable[[nn.Module, Sequence[Batch]], dict]
    model_inputs: Callable[[Batch], Batch]
    observe: Optional[Callable[[str, nn.Module], dict]]
    progress: bool

    def run(self, start: Start, base: nn.Module, seed: int, saved: Optional[Path]) -> Run:
        """``start`` made from a copy of ``base`` and fine-tuned, both from ``seed``; its adapter
        written to ``saved / start.name`` where ``saved`` is given."""
        torch.manual_seed(seed)
        began = time.perf_counter()
        model = start.make(copy.deepcopy(base), self.lora_config, self.calibration, self.population)
        init_seconds = time.perf_counter() - began
        extra = self.observe(start.name, model) if self.observe is not None else {}
        if saved is not None and start.rewrites_base:
            model.peft_config["default"].init_lora_weights = True  # the initial adapter, loaded as it is
            save_adapter(model, saved / f"{start.name}_initial")
        evaluating = [0.0]  # seconds of the held-out evaluations, not counted as training

        def timed_evaluation(m):
            began_evaluation = time.perf_counter()
            figures = self.evaluate(m, self.heldout)
            evaluating[0] += time.perf_counter() - began_evaluation
            return figures

        torch.manual_seed(seed)
        began = time.perf_counter()
        curve, heldout = fine_tune(model, self.train, self.steps, self.lr, timed_evaluation, self.eval_steps,
                                   self.model_inputs, desc=f"{start.name} (seed {seed})" if self.progress else None)
        train_seconds = time.perf_counter() - began - evaluating[0]
        if saved is not None:
            save_adapter(model, saved / start.name, saved / f"{start.name}_initial" if start.rewrites_base else None)
        return Run(start.name, seed, init_seconds, train_seconds, curve, heldout, extra)


def compare(
    model_factory: Callable[[int], nn.Module],
    train: Sequence[Batch],
    heldout: Sequence[Batch],
    *,
    lora_config=None,
    starts: Sequence[Union[str, Start]] = DEFAULT_STARTS,
    calibration: Optional[Sequence[Batch]] = None,
    population_size: Optional[int] = None,
    steps: int = 50,
    lr: float = 2e-4,
    seeds: Sequence[int] = (0,),
    eval_steps: Optional[Sequence[int]] = None,
    evaluate: Optional[Callable[[nn.Module, Sequence[Batch]], dict]] = None,
    model_inputs: Callable[[Batch], Batch] = lambda batch: batch,
    observe: Optional[Callable[[str, nn.Module], dict]] = None,
    adapter_folder: Optional[Union[str, Path]] = None,
    progress: bool = True,
) -> Comparison:
    """Fine-tune the model from each start and record held-out loss.

    ``model_factory(seed)`` gives the base model (made once per seed; each start gets a deep copy);
    ``lora_config``: the PEFT ``LoraConfig`` every start shares, its ``init_lora_weights`` set per
    start (default: r=8, alpha=16, every linear layer but the head). ``train``: batches (dicts for
    ``model(**model_inputs(batch))`` with ``labels``), one per step, cycled; ``heldout``: batches
    ``evaluate(model, heldout)`` reads (default ``mean_loss``: {"loss"}); ``calibration``: the
    batches data-reading starts see (default: the first of ``train``, up to 8); ``population_size``:
    N for LoRA-DA (default: the training examples). ``starts``: names of ``STARTS`` or ``Start``
    objects. Every start gets the same seed before it is made and before it trains
    (torch.manual_seed), the same batches in the same order and the same optimiser.
    ``eval_steps``: default ``evaluation_steps(steps)``. ``observe(start, model)`` after each start
    is made: its dict goes into the run's ``extra``. ``adapter_folder``: the adapter of the best
    start (lowest mean final held-out loss) of the first seed is written there.
    """
    chosen = chosen_starts(starts)
    if steps < 1 or not train or not heldout:
        raise ValueError("compare needs steps >= 1, training batches and held-out batches")
    calibration = list(calibration) if calibration is not None else [model_inputs(b) for b in train[:8]]
    population = population_size or sum(len(b["labels"]) for b in train)
    evaluate = evaluate or (lambda model, batches: mean_loss(model, [model_inputs(b) for b in batches]))
    if lora_config is None:
        from peft import LoraConfig

        lora_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    evaluated = sorted(set(eval_steps or evaluation_steps(steps)) | {steps})
    trial = _Trial(train, heldout, lora_config, calibration, population, steps, lr, evaluated, evaluate, model_inputs,
                   observe, progress)
    runs = []
    saved = Path(adapter_folder) / ".starts" if adapter_folder is not None else None
    for seed in seeds:
        base = model_factory(seed)
        refused = refusals(chosen, base)
        if refused:
            raise ValueError(f"starts that cannot be made for this model: {'; '.join(refused)}")
        runs += [trial.run(start, base, seed, saved if seed == seeds[0] else None) for start in chosen]
    comparison = Comparison(runs)
    if saved is not None:
        best = comparison.ranking()[0][0]
        target = Path(adapter_folder)
        for item in (saved / best).iterdir():
            shutil.move(str(item), str(target / item.name))
        shutil.rmtree(saved)
    return comparison
