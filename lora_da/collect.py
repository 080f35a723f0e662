"""``collect_statistics``: the passes over the calibration batches (one per memory group), each
with hooks on its targets, reduced over ranks under torch.distributed and checked."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterable
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import dispatch, distributed
from .batches import batch_size, default_loss, execution_device, to_device, truncate
from .collector import Collector
from .config import LoraDAConfig, resolve_config
from .memory import plan_memory
from .statistics import Z_FP32_TILES, Statistics
from .targets import Target, find_targets, is_bitsandbytes_4bit

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, object], torch.Tensor]


@contextlib.contextmanager
def frozen_eval(model: nn.Module):
    """Freeze every parameter and put every module in eval mode; restore both on exit.

    bitsandbytes' 4-bit layers stay in training mode, which changes nothing in their output: in
    eval mode, on CPU inputs without grad, they repack their weight in place for an inference
    kernel (which also computes in bf16), and the model would not come back as it was."""
    # by name: accelerate's offload hooks put new parameter objects in the modules as they run
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for module in model.modules():
            if is_bitsandbytes_4bit(module):
                module.training = True
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        for m, mode in modes:
            m.training = mode


def collect_statistics(
    model: nn.Module,
    loader: Iterable,
    cfg: Optional[LoraDAConfig] = None,
    loss_fn: Optional[LossFn] = None,
    *,
    max_memory: Union[int, str, None] = None,
    progress: bool = True,
    **overrides,
) -> Statistics:
    """One forward+backward per batch with hooks; returns the sums and counts ``solve`` needs.

    ``loader`` is any iterable of batches (dicts for Hugging Face models). ``loss_fn(model,
    batch)`` returns the sum over the batch's sequences of each sequence's mean token loss
    (default: B * model(**batch).loss). The model comes back exactly as it was, also on error.
    ``max_memory`` (bytes, or "auto" = half the device's free memory) bounds the accumulators:
    the targets are planned into groups of whole blocks (a layer's attention, its MLP) that fit,
    one pass over ``loader`` per group (so it must be re-iterable when there are several), and
    each finished group's statistics move to host memory. ``Statistics.passes`` says how many.
    Token buffers (``cfg.buffer_tokens``) take at most an eighth of a pass's accumulator bytes, and
    no more than those leave of the budget.
    Inside a torch.distributed process group every rank must call this: each collects its shard
    (the loader's DistributedSampler, else every world-size-th batch) and all get the sums over
    all ranks; if one rank fails, every rank raises.
    """
    cfg = resolve_config(cfg, overrides)
    dispatch.requested_backend(cfg.backend)  # fail early on a bad LORA_DA_BACKEND
    targets = find_targets(model, cfg.target_modules)
    device = execution_device(model)
    memory = plan_memory(model, cfg, max_memory, targets)
    if memory.passes > 1 and iter(loader) is loader:
        raise ValueError(f"max_memory needs {memory.passes} passes over the calibration data: "
                         "pass a re-iterable loader (a list or a DataLoader), not an iterator")
    parts = []
    for index, (group, chunk) in enumerate(zip(memory.groups, memory.chunks)):
        label = "lora_da collect" + (f" (pass {index + 1}/{memory.passes})" if memory.passes > 1 else "")
        with dispatch.pinned("torch" if cfg.deterministic else None):
            part = _collect_pass(model, loader, cfg, {name: targets[name] for name in group},
                                 loss_fn or default_loss, device, label, progress, chunk)
        parts.append(part.to("cpu") if memory.passes > 1 else part)
    stats = Statistics.union(parts) if len(parts) > 1 else parts[0]
    if cfg.population_size is None and distributed.is_main_process():
        source = _population_size(cfg, loader, stats.num_sequences)[1]
        warnings.warn(f"lora_da: {population_size_warning(stats.population_size, source)}", UserWarning, stacklevel=2)
    stats.passes = memory.passes
    stats.config = {**config_record(cfg), Z_FP32_TILES: any(part.config.get(Z_FP32_TILES, False) for part in parts)}
    return stats


def encoder_of(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of an encoder-decoder model (``config.is_encoder_decoder``, e.g. T5, BART), else None."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        return None
    return model.get_encoder()


def _collect_pass(model: nn.Module, loader: Iterable, cfg: LoraDAConfig, targets: Dict[str, Target], loss_fn: LossFn,
                  device: torch.device, label: str, progress: bool, chunk: int) -> Statistics:
    """One pass over ``loader`` with hooks on ``targets``, the op on ``chunk`` tokens at a time;
    reduced over ranks when distributed."""
    place = distributed.world()
    by_index = place is not None and not distributed.presharded(loader)
    if place is not None:
        if not by_index and cfg.num_samples is not None:
            raise ValueError("num_samples with a DistributedSampler loader: size the sampler's dataset instead")
        if by_index:
            logger.info("lora_da: rank %d of %d takes calibration batches %d, %d + %d, ... (no DistributedSampler)",
                        place[0], place[1], place[0], place[0], place[1])
    encoder = encoder_of(model)
    in_encoder = None if encoder is None else {id(m) for m in encoder.modules()}
    collector = Collector(targets, cfg, chunk, None if encoder is None else
                          {name for name, t in targets.items() if id(t.module) in in_encoder})
    handles = []
    error = None
    with frozen_eval(model), torch.enable_grad():
        try:
            handles = [t.module.register_forward_hook(collector.hook(name)) for name, t in targets.items()]
            if encoder is not None:
                handles.append(encoder.register_forward_hook(collector.record_encoder_output))
            num_sequences = _run_batches(model, loader, cfg, collector, loss_fn, device, label, progress,
                                         place if by_index else None)
            if num_sequences == 0:
                raise ValueError("the calibration loader produced no batches" if place is None else
                                 f"rank {place[0]} of {place[1]} received no calibration batch: "
                                 "use fewer ranks or more batches")
            stats = collector.statistics(num_sequences, 0)
        except BaseException as exc:
            if place is None:
                raise
            error = exc
        finally:
            for handle in handles:
                handle.remove()
            collector.events.clear()
    if place is not None:
        distributed.agree_on_failure(error, device)
        distributed.check_same_layout(stats, device)
        distributed.reduce_statistics(stats, to_owners=cfg.shard_statistics)
    _check_finite(stats, place, device)
    stats.population_size = _population_size(cfg, loader, stats.num_sequences)[0]
    return stats


def _run_batches(model: nn.Module, loader: Iterable, cfg: LoraDAConfig, collector: Collector, loss_fn: LossFn,
                 device: torch.device, label: str, progress: bool, place: Optional[Tuple[int, int]]) -> int:
    """Forward and backward of this process's batches of ``loader`` (every world-size-th from its
    rank where ``place`` = (rank, world size) is given, else all), cut to ``cfg.num_samples``
    sequences over every rank; returns the sequences this process collected."""
    num_sequences = 0  # collected by this process
    seen = 0  # sequences of every rank so far (num_samples counts these)
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(loader, total=total, desc=label, unit="batch", disable=not progress or not distributed.is_main_process())
    for index, batch in enumerate(bar):
        size = batch_size(batch)
        if cfg.num_samples is not None:  # every batch: a type that cannot be cut fails at the first
            keep = min(size, cfg.num_samples - seen)
            batch, size = truncate(batch, size, keep), keep
        seen += size
        if place is None or distributed.owns_batch(index, place):
            _collect_batch(model, batch, index, size, device, collector, loss_fn)
            num_sequences += size
        if cfg.num_samples is not None and seen >= cfg.num_samples:
            break
    bar.close()
    return num_sequences


def _check_finite(stats: Statistics, place: Optional[Tuple[int, int]], device: torch.device) -> None:
    """FloatingPointError naming the modules with NaN or Inf sums (with shard_statistics, this
    rank's own), agreed over ranks when distributed."""
    error = None
    try:
        bad = stats.non_finite()
        if bad:
            raise FloatingPointError(f"non-finite statistics (NaN/Inf activations or gradients with a finite loss) "
                                     f"in modules {bad}")
    except FloatingPointError as exc:
        if place is None:
            raise
        error = exc
    if place is not None:
        distributed.agree_on_failure(error, device, "the checks of the reduced statistics")


def _collect_batch(model: nn.Module, batch, index: int, size: int, device: torch.device, collector: Collector,
                   loss_fn: LossFn) -> None:
    """Forward and backward of one batch with the hooks on."""
    batch = to_device(batch, device)
    collector.start_batch(batch, size)
    loss = loss_fn(model, batch)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)} at batch {index}")
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at batch {index}")
    if not loss.requires_grad:
        raise RuntimeError(f"the loss at batch {index} does not depend on any targeted module"
                           + collector.no_grad_hint(collector.targets))
    loss.backward()
    collector.finish_batch()


def config_record(cfg: LoraDAConfig) -> Dict[str, object]:
    """The config's fields as JSON values (what statistics files record)."""
    record = dataclasses.asdict(cfg)
    if isinstance(record["target_modules"], tuple):
        record["target_modules"] = list(record["target_modules"])
    return record


def _population_size(cfg: LoraDAConfig, loader, num_sequences: int) -> Tuple[int, str]:
    """(N, where it comes from): the config's, else the calibration data's size."""
    if cfg.population_size is not None:
        return cfg.population_size, "population_size"
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset), "len(loader.dataset), the calibration set"
    return num_sequences, "the number of calibration sequences"


def population_size_warning(size: int, source: str) -> str:
    """What a user who did not set N reads: the value used and the fix."""
    return (f"population_size is not set, so N = {size} ({source}); N is the size of the fine-tuning set and "
            f"scales the variance term c = beta * sum(d) / (N sigma^2): pass population_size=len(train_set) "
            f"(lora-da init --population-size)")
