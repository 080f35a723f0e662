"""One streaming pass over calibration batches: hooks feed the statistics op."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import dispatch, distributed
from .config import LoraDAConfig, resolve_config
from .statistics import Z_FP32_TILES, InputStatistics, ModuleStatistics, Statistics
from .targets import Target, find_targets, is_bitsandbytes_4bit

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, object], torch.Tensor]
# token buffers take at most this fraction of the accumulators' bytes (a deterministic chunk:
# sums in fp32 depend on it), and no more than max_memory leaves (RESULTS.md, "Token buffering")
BUFFER_SHARE_OF_ACCUMULATORS = 0.125


@dataclass(eq=False)
class _Event:
    """One forward use of one input tensor by one or more targeted modules."""

    x: torch.Tensor  # [B, L, n]
    mask: torch.Tensor  # [B, L]
    modules: List[str] = field(default_factory=list)
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, L, m]


class _TokenBuffer:
    """The tokens of one distinct input gathered across micro-batches, so that the statistics op
    runs on chunks of ``capacity`` tokens: x rows [capacity, n] and per module its g rows
    [capacity, m]. Only tokens that count or carry a gradient are kept (padding, whose g is zero,
    adds nothing to any sum). Counted tokens fill the rows from the front and the others from the
    back, so that a chunk holds its counted tokens first (compacted once, here) and the op reads
    them without an index list; a micro-batch with at least ``capacity`` of them runs at once."""

    def __init__(self, capacity: int, x: torch.Tensor, run: Callable):
        self.x = x.new_empty((capacity, x.shape[-1]))
        self.mask = torch.empty(capacity, dtype=torch.bool, device=x.device)
        self.grads: Dict[str, torch.Tensor] = {}  # made at a module's first gradient, in its dtype
        self.front, self.back = 0, capacity  # counted tokens in [0, front), the others in [back, capacity)
        self.run = run  # run(x [1, t, n], mask [1, t], {name: g [1, t, m]}, counted) on the first t rows

    def add(self, x: torch.Tensor, mask: torch.Tensor, grads: Dict[str, torch.Tensor]) -> None:
        """Append the kept tokens of x [B, L, n], mask [B, L], grads {name: [B, L, m]} (modules
        missing from ``grads`` get zero rows), running the op on every full chunk."""
        for name, g in grads.items():
            if name not in self.grads:
                self.grads[name] = g.new_zeros((len(self.x), g.shape[-1]))
        counted_rows = mask.flatten().nonzero().flatten()
        other_rows = (carries_gradient(grads, mask) & ~mask).flatten().nonzero().flatten()
        x = x.reshape(-1, x.shape[-1])
        grads = {name: g.reshape(-1, g.shape[-1]) for name, g in grads.items()}
        if len(counted_rows) + len(other_rows) >= len(self.x):  # a chunk's worth at once: no copy into the buffer
            self.flush()
            rows = torch.cat([counted_rows, other_rows])
            kept_mask = torch.arange(len(rows), device=rows.device) < len(counted_rows)
            self.run(x[rows][None], kept_mask[None], {name: g[rows][None] for name, g in grads.items()},
                     len(counted_rows))
            return
        while len(counted_rows) or len(other_rows):
            take, counted_rows = counted_rows[:self.back - self.front], counted_rows[self.back - self.front:]
            self._copy(x, grads, take, self.front)
            self.front += len(take)
            take, other_rows = other_rows[:self.back - self.front], other_rows[self.back - self.front:]
            self._copy(x, grads, take, self.back - len(take))
            self.back -= len(take)
            if self.front == self.back:
                self.flush()

    def _copy(self, x: torch.Tensor, grads: Dict[str, torch.Tensor], rows: torch.Tensor, start: int) -> None:
        """Rows ``rows`` of x [T, n] and of each g [T, m] into the buffers from row ``start``."""
        span = slice(start, start + len(rows))
        torch.index_select(x, 0, rows, out=self.x[span])
        for name, buffer in self.grads.items():
            if name in grads:
                torch.index_select(grads[name], 0, rows, out=buffer[span])
            else:
                buffer[span].zero_()

    def flush(self) -> None:
        """Run the op on the tokens held, if any: the counted ones, then the others moved up to them."""
        others = len(self.x) - self.back
        used = self.front + others
        if used:
            if others and self.back > self.front:
                for buffer in (self.x, *self.grads.values()):
                    buffer[self.front:used] = buffer[self.back:].clone()
            self.mask[:used] = torch.arange(used, device=self.mask.device) < self.front
            counted, self.front, self.back = self.front, 0, len(self.x)
            self.run(self.x[None, :used], self.mask[None, :used], {name: g[None, :used] for name, g in self.grads.items()},
                     counted)


def carries_gradient(grads: Dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: tokens whose output gradient {name: [B, L, m]} is non-zero for some module."""
    carries = torch.zeros_like(mask)
    for g in grads.values():
        carries |= (g != 0).any(dim=-1)
    return carries


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """The sum over the batch's sequences of each one's mean token loss.

    Hugging Face models return the mean over every label token of the batch, which weighs a
    sequence by its number of labels. Where sequences carry different numbers of labels [B, L],
    the per-token cross-entropy is taken from the logits [B, L, V], aligned as the model's own loss
    is (shifted by one for language models, as is for token classifiers: the alignment whose mean
    equals ``model(**batch).loss``), in fp32 or the logits' wider dtype. Otherwise (the same number
    of labels in every sequence, one label per sequence) B * loss is that sum."""
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError("batch has no 'labels': pass loss_fn=... or add labels to every batch")
    output = model(**batch)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError(f"{type(model).__name__} returned no loss for a batch with labels: pass loss_fn=...")
    labels = batch["labels"]
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return loss * batch_size(batch)
    labelled = labels != -100
    if all(bool((row_counts == row_counts[0]).all()) for row_counts in (labelled.sum(1), labelled[:, 1:].sum(1))):
        return loss * batch_size(batch)  # every sequence weighs the same, whatever the alignment
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.shape[:2] == labels.shape:
        for shift in (1, 0):
            scores = logits[:, : logits.shape[1] - shift]
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            token_losses = nn.functional.cross_entropy(scores.transpose(1, 2), labels[:, shift:], reduction="none")
            counts = labelled[:, shift:].sum(dim=1)
            if torch.allclose(token_losses.sum() / counts.sum(), loss.to(token_losses.dtype), rtol=1e-4, atol=1e-6):
                return (token_losses.sum(dim=1) / counts.clamp(min=1)).sum()
    raise ValueError(f"sequences carry different numbers of labels and {type(model).__name__}'s loss is not the "
                     "mean cross-entropy of its logits, shifted or not: pass loss_fn=... returning the sum over "
                     "sequences of each one's mean token loss")


def batch_size(batch) -> int:
    """Number of sequences in ``batch``: dim 0 of its first tensor (an ``input_ids``-like key first
    in a dict, then its values; the fields of a dataclass; the items of a list or tuple), else
    ``len(batch)`` for other objects that define it, else dim 0 of the first tensor they yield."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        for key in ("input_ids", "attention_mask", "labels", "inputs_embeds"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key].shape[0]
        values = batch.values()
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        values = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    elif isinstance(batch, (list, tuple)):
        values = batch
    elif hasattr(batch, "__len__"):
        return len(batch)
    elif isinstance(batch, Iterable):
        values = batch
    else:
        values = ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError(f"cannot tell the batch size of a {type(batch).__name__}: yield dicts, lists, tuples or "
                     "dataclasses of tensors whose first dimension is the sequence, or objects whose len() is "
                     "their number of sequences")


def decoder_token_mask(batch, kind: str) -> Optional[torch.Tensor]:
    """[B, L_dec] bool mask of an encoder-decoder model's counted decoder tokens (None: every one):
    ``decoder_attention_mask`` where the batch has one, and for ``labels`` the positions with a
    label (a decoder position predicts the label at its own position)."""
    if kind == "labels":
        return batch["labels"] != -100
    mask = batch.get("decoder_attention_mask") if kind == "attention" else None
    return None if mask is None else mask.bool()


def token_mask(batch, kind: str) -> Optional[torch.Tensor]:
    """[B, L] bool mask of counted tokens; None means every position counts."""
    if kind == "all" or not isinstance(batch, Mapping):
        if kind == "labels":
            raise ValueError("token_mask='labels' needs batches that are dicts with 'labels'")
        return None
    if kind == "attention":
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("token_mask='labels' needs 'labels' in every batch")
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


_PLAIN = (str, bytes, int, float, bool, type(None))


def map_batch(batch, leaf: Callable):
    """``batch`` rebuilt with its own container types (dicts, ``BatchEncoding`` and other
    mappings, lists, tuples, namedtuples, dataclasses) and ``leaf(value)`` in place of every
    value that is not one: tensors, plain values, lists or tuples of plain values, other objects."""
    if isinstance(batch, Mapping):
        items = {k: map_batch(v, leaf) for k, v in batch.items()}
        if type(batch) is dict:
            return items
        try:
            return type(batch)(items)
        except TypeError:  # a mapping type that cannot be built from a dict: any mapping unpacks as **batch
            return items
    if isinstance(batch, (list, tuple)) and not all(isinstance(v, _PLAIN) for v in batch):
        items = [map_batch(v, leaf) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: map_batch(getattr(batch, f.name), leaf)
                                             for f in dataclasses.fields(batch) if f.init})
    return leaf(batch)


def to_device(batch, device: torch.device):
    """``batch`` with every tensor moved to ``device``."""
    return map_batch(batch, lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)


def truncate(batch, size: int, keep: int):
    """The first ``keep`` of the ``size`` sequences of ``batch`` (see ``map_batch`` for the
    containers): tensors whose dim 0 is ``size`` are sliced, and so are lists and tuples of
    ``size`` plain values (one per sequence); other tensors and plain values stay whole.
    ValueError for any other object, which may hold sequences lora_da cannot find."""

    def cut(value):
        if isinstance(value, torch.Tensor):
            return value[:keep] if value.dim() and value.shape[0] == size else value
        if isinstance(value, (list, tuple)):
            return value[:keep] if len(value) == size else value
        if isinstance(value, _PLAIN):
            return value
        raise ValueError(
            f"num_samples needs the first sequences of each batch, and lora_da cannot cut a {type(value).__name__}: "
            "yield dicts, lists, tuples or dataclasses of tensors, or stop the loader yourself and leave "
            "num_samples=None"
        )

    return map_batch(batch, cut)


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


class _Collector:
    """Hooks on the targets; turns each batch's events into op calls on the accumulators."""

    def __init__(self, targets: Dict[str, Target], cfg: LoraDAConfig, chunk: int = 0,
                 encoder_targets: Optional[set] = None):
        self.targets = targets
        self.cfg = cfg
        # an encoder-decoder model: the targets inside its encoder (None for other models); the
        # encoder's outputs of this batch, which its decoder's cross-attention reads
        self.encoder_targets = encoder_targets
        self.encoder_outputs: List[torch.Tensor] = []
        self.decoder_mask: Optional[torch.Tensor] = None
        self.row_kinds: Dict[str, str] = {}  # module -> what its input's rows are: "tokens" or "sequences"
        # tokens per op call, gathered across micro-batches (0: each event at once); per-sequence
        # sums need each batch's layout, so sequence_lowrank runs each event at once
        self.chunk = 0 if cfg.output_fisher == "sequence_lowrank" else chunk
        self.fp32_tiles = False  # whether a kernel summed Z from fp32 tile sums (``kernels.massive``)
        self.buffers: Dict[str, _TokenBuffer] = {}  # input key -> its gathered tokens
        self.events: List[_Event] = []
        self.batch_mask: Optional[torch.Tensor] = None
        self.batch_seq_sums: Dict[str, torch.Tensor] = {}
        self.input_of: Dict[str, str] = {}  # module -> input key
        self.inputs: Dict[str, InputStatistics] = {}
        self.modules: Dict[str, ModuleStatistics] = {}
        self.token_tensors: Dict[str, torch.Tensor] = {}  # input key -> counted tokens (on device)
        self.seq_sums: Dict[str, List[torch.Tensor]] = {name: [] for name in targets}
        self.current_batch_size = 0
        self.forwards_without_grad: set = set()  # modules that ran with gradients disabled

    def hook(self, name: str):
        def forward_hook(module, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                raise TypeError(f"module {name!r}: expected a tensor input and output")
            if not torch.is_grad_enabled():  # no gradient can reach this use (reentrant checkpointing's first pass)
                self.forwards_without_grad.add(name)
                return
            if not output.requires_grad:
                output.requires_grad_(True)  # a leaf: frozen weights and no upstream graph
            event = next((e for e in self.events if e.x is x), None)
            if event is None:
                event = _Event(x, self._event_mask(name, x))
                self.events.append(event)
            event.modules.append(name)
            output.register_hook(lambda g: self._on_grad(event, name, g))

        return forward_hook

    def record_encoder_output(self, module, args, output) -> None:
        """Forward hook on an encoder-decoder model's encoder: the hidden states its decoder reads."""
        hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
        if isinstance(hidden, torch.Tensor):
            self.encoder_outputs.append(hidden)

    def _event_mask(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The counted tokens of input x [B, L, n] (or [B*L, n] flattened, or [B, n] pooled) of
        module ``name``: its stack's mask, matched by where x comes from, not by its shape alone."""
        lead = x.shape[:-1]
        mask = self.batch_mask
        if self.encoder_targets is not None and not (name in self.encoder_targets
                                                     or any(x is out for out in self.encoder_outputs)):
            mask = self.decoder_mask  # a decoder's own tokens; cross-attention reads the encoder's
        if mask is None:
            return torch.ones(lead, dtype=torch.bool, device=x.device)
        kind, counted = None, None
        if mask.shape == lead:
            kind, counted = "tokens", mask
        elif len(lead) == 1 and lead[0] == mask.numel():
            kind, counted = "tokens", mask.reshape(-1)  # the batch's tokens flattened to [B*L, n], in order
        elif len(lead) == 1 and mask.dim() == 2 and lead[0] == mask.shape[0]:
            # one pooled vector per sequence (a classifier's pooler or head): one token each
            kind, counted = "sequences", torch.ones((lead[0], 1), dtype=torch.bool)
        if name in self.row_kinds and self.row_kinds[name] != kind:  # an expert that once got B tokens is no pooler
            raise ValueError(
                f"module {name!r} read the batch's {self.row_kinds[name]} in one batch and rows of shape "
                f"{tuple(x.shape)} in another, e.g. tokens routed to an MoE expert; use token_mask='all' to count "
                "every row it reads")
        if kind is None:
            raise ValueError(
                f"module {name!r}: its input of shape {tuple(x.shape)} is neither the batch's tokens (mask of shape "
                f"{tuple(mask.shape)}, or them flattened) nor one vector per sequence, e.g. tokens routed to an MoE "
                "expert; use token_mask='all' to count every row it reads")
        self.row_kinds[name] = kind
        return counted.to(x.device)

    def _on_grad(self, event: _Event, name: str, g: torch.Tensor) -> None:
        event.grads[name] = g.detach()
        if len(event.grads) == len(event.modules):
            self._flush(event)

    def _input_key(self, modules: List[str]) -> str:
        keys = {self.input_of.get(m) for m in modules}
        if keys == {None}:
            key = modules[0]
            for m in modules:
                self.input_of[m] = key
            return key
        if len(keys) == 1 and set(self._modules_of(keys.pop())) == set(modules):
            return self.input_of[modules[0]]
        raise RuntimeError(
            f"modules {modules} shared one input tensor in this batch but not in an earlier one; "
            "input sharing must be the same in every batch"
        )

    def _modules_of(self, key: str) -> List[str]:
        return [m for m, k in self.input_of.items() if k == key]

    @torch.no_grad()
    def _flush(self, event: _Event) -> None:
        if event in self.events:
            self.events.remove(event)
        modules = list(dict.fromkeys(event.modules))
        key = self._input_key(modules)
        x = event.x.detach()
        x = x.reshape(*event.mask.shape, x.shape[-1]) if x.dim() == 2 else x
        if x.dim() != 3:
            x = x.reshape(-1, 1, x.shape[-1])
        mask = event.mask.reshape(x.shape[:2])
        dtype = torch.promote_types(torch.float32, x.dtype)
        if key not in self.inputs:
            n = x.shape[-1]
            self.inputs[key] = InputStatistics(tuple(modules), x.new_zeros((n, n), dtype=z_dtype(self.cfg, dtype)), 0)
            self.token_tensors[key] = torch.zeros((), dtype=torch.int64, device=x.device)
        self.token_tensors[key] += mask.sum()
        names = [m for m in event.grads]
        for m in names:
            if m not in self.modules:
                t = self.targets[m]
                self.modules[m] = ModuleStatistics(
                    key, x.new_zeros((t.out_features, t.in_features), dtype=dtype), x.new_zeros(t.out_features, dtype=dtype)
                )
        grads = {m: event.grads[m].reshape(*x.shape[:2], -1) for m in names}
        if not self.chunk:  # padding (not counted, no gradient) adds nothing, also where its activations are not finite
            padding = ~(mask | carries_gradient(grads, mask))
            self._update(key, x.masked_fill(padding[..., None], 0) if bool(padding.any()) else x, mask, grads)
            return
        if key not in self.buffers:
            self.buffers[key] = _TokenBuffer(self.chunk, x, lambda *chunk, key=key: self._update(key, *chunk))
        self.buffers[key].add(x, mask, grads)

    def _update(self, key: str, x: torch.Tensor, mask: torch.Tensor, grads: Dict[str, torch.Tensor],
                counted: Optional[int] = None) -> None:
        """The statistics op on x [B, L, n], mask [B, L] and the output gradients {module: [B, L, m]}
        of input ``key``'s modules: into Z, G and y, and this batch's per-sequence sums
        (``counted``: the mask is 1 on the first ``counted`` tokens only, see ``fisher_update``)."""
        names = list(grads)
        dtype = torch.promote_types(torch.float32, x.dtype)
        seq = None
        if self.cfg.output_fisher == "sequence_lowrank":
            seq = [x.new_empty((x.shape[0], g.shape[-1]), dtype=dtype) for g in grads.values()]
        impl = dispatch.resolve("fisher_update", self.cfg.backend, x.device, x.dtype)
        z_sum = self.inputs[key].z_sum
        if z_sum.dtype == torch.float64 and impl.backend != "torch" and (
                self.cfg.input_factor_dtype == "float64" or x.dtype == torch.float32):
            # fp64 products through PyTorch: asked for, or fp32 inputs, whose products the kernels
            # would round (the kernels' fp64 path needs products that are exact in fp32: fp16, bf16)
            dispatch.find("fisher_update", "torch").fn(x, mask, [], z_sum, [], [], counted=counted)
            z_sum = None
        self.fp32_tiles |= z_sum is not None and z_sum.dtype == torch.float64 and impl.backend != "torch"
        impl.fn(x, mask, list(grads.values()), z_sum, [self.modules[m].g_sum for m in names],
                [self.modules[m].y_sum for m in names], seq, counted=counted)
        if seq is not None:
            for m, s in zip(names, seq):
                previous = self.batch_seq_sums.get(m)
                self.batch_seq_sums[m] = s if previous is None else previous + s

    def start_batch(self, batch, batch_size_: int) -> None:
        self.events.clear()
        self.encoder_outputs.clear()
        if self.encoder_targets is None:
            self.batch_mask = token_mask(batch, self.cfg.token_mask)
        else:  # the encoder's tokens by its attention mask, the decoder's by its own (decoder_token_mask)
            self.batch_mask = token_mask(batch, "all" if self.cfg.token_mask == "all" else "attention")
            self.decoder_mask = None if self.cfg.token_mask == "all" else decoder_token_mask(batch, self.cfg.token_mask)
        self.batch_seq_sums = {}
        self.current_batch_size = batch_size_

    def finish_batch(self) -> None:
        """Flush events whose modules did not all receive a gradient (their G gets nothing). Events
        that received none are dropped: a forward that no gradient reached, such as activation
        checkpointing's recomputation during backward (non-reentrant), repeats one that did."""
        for event in list(self.events):
            if event.grads:
                self._flush(event)
        self.events.clear()
        for name in self.seq_sums:
            sums = self.batch_seq_sums.get(name)
            if sums is None and name in self.modules:
                stats = self.modules[name]
                sums = stats.y_sum.new_zeros((self.current_batch_size, stats.y_sum.shape[0]))
            if sums is not None:
                self.seq_sums[name].append(sums)

    def no_grad_hint(self, modules: Iterable[str]) -> str:
        """Why ``modules`` may have missed their gradients, when some of them ran with gradients disabled."""
        if not self.forwards_without_grad.intersection(modules):
            return ""
        return ("; they ran with gradients disabled (torch.no_grad, or reentrant activation checkpointing, "
                "torch.utils.checkpoint(use_reentrant=True), whose inputs do not require grad): use "
                "use_reentrant=False, call model.enable_input_require_grads(), or disable checkpointing for collection")

    def statistics(self, num_sequences: int, population_size: int) -> Statistics:
        missing = [name for name in self.targets if name not in self.modules]
        if missing:
            raise RuntimeError(f"targeted modules never received an output gradient during collection: {missing}"
                               + self.no_grad_hint(missing))
        for buffer in self.buffers.values():
            buffer.flush()
        for key, entry in self.inputs.items():
            entry.num_tokens = int(self.token_tensors[key])
            entry.z_sum = mirror_upper(entry.z_sum)
        if self.cfg.output_fisher == "sequence_lowrank":
            for name, stats in self.modules.items():
                stats.sequence_sums = torch.cat(self.seq_sums[name])
        order = {name: i for i, name in enumerate(self.targets)}
        return Statistics(
            modules={name: self.modules[name] for name in self.targets},
            inputs=dict(sorted(self.inputs.items(), key=lambda item: order[item[0]])),
            num_sequences=num_sequences,
            population_size=population_size,
            token_mask=self.cfg.token_mask,
            output_fisher=self.cfg.output_fisher,
            config={Z_FP32_TILES: self.fp32_tiles},
        )


def mirror_upper(z: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is that of z [n, n] (kernels fill only that)."""
    return torch.triu(z) + torch.triu(z, diagonal=1).T


def execution_device(model: nn.Module) -> torch.device:
    """Where batches go and the solve runs: the execution device of accelerate's first hook (a model
    dispatched with a device map, whose offloaded weights sit on the meta device), else the first
    parameter's device that is not meta, else the CPU."""
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    param = next((p for p in model.parameters() if p.device.type != "meta"), None)
    return param.device if param is not None else torch.device("cpu")


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
    stats = Statistics.combine(parts) if len(parts) > 1 else parts[0]
    if cfg.population_size is None and distributed.is_main_process():
        source = _population_size(cfg, loader, stats.num_sequences)[1]
        warnings.warn(f"lora_da: {population_size_warning(stats.population_size, source)}", UserWarning, stacklevel=2)
    stats.passes = memory.passes
    stats.config = {**config_record(cfg), Z_FP32_TILES: any(part.config.get(Z_FP32_TILES, False) for part in parts)}
    return stats


@dataclass
class MemoryPlan:
    """What collection will hold, from the model's shapes alone (a model on the meta device will
    do): the passes' target groups and their token chunks, with bytes per pass (upper bounds:
    Z counted per module, where modules sharing an input hold one)."""

    groups: List[List[str]]  # per pass: the target names
    chunks: List[int]  # per pass: tokens per statistics op call
    accumulator_bytes: List[int]  # per pass: Z, G and y
    buffer_bytes: List[int]  # per pass: the token buffers at their chunk
    model_bytes: int  # the model's parameters and buffers (from their shapes: on the meta device too)
    budget: Optional[int]  # max_memory in bytes, None = unbounded
    z_summation: str = "float64"  # input_factor_dtype, with the dtype of Z's sums

    @property
    def passes(self) -> int:
        return len(self.groups)

    @property
    def peak_bytes(self) -> int:
        """The model and the largest pass's accumulators and buffers on its device (one batch's
        activations come on top; finished passes wait in host memory)."""
        return self.model_bytes + max(a + b for a, b in zip(self.accumulator_bytes, self.buffer_bytes))

    def __str__(self) -> str:
        gib = 2**30
        budget = "unbounded" if self.budget is None else f"{self.budget / gib:.2f} GiB"
        lines = [f"LoRA-DA collection plan: {sum(map(len, self.groups))} modules in {self.passes} pass(es), "
                 f"max_memory {budget}; Z summed as {self.z_summation}"]
        for index, group in enumerate(self.groups):
            lines.append(f"  pass {index + 1}: {len(group)} modules ({group[0]} .. {group[-1]}), statistics "
                         f"{self.accumulator_bytes[index] / gib:.2f} GiB, buffers {self.buffer_bytes[index] / gib:.2f} GiB "
                         f"({self.chunks[index]} tokens per op call)")
        lines.append(f"  statistics {sum(self.accumulator_bytes) / gib:.2f} GiB in all; expected peak on the device "
                     f"{self.peak_bytes / gib:.2f} GiB (model {self.model_bytes / gib:.2f} GiB, plus one batch's "
                     "activations)")
        return "\n".join(lines)


def z_dtype(cfg: LoraDAConfig, element: torch.dtype) -> torch.dtype:
    """The dtype of Z's sums for inputs whose statistics are summed in ``element``: fp64 for
    ``input_factor_dtype`` float64 and auto, else the wider of fp32 and ``element``."""
    wanted = torch.float32 if cfg.input_factor_dtype == "float32" else torch.float64
    return torch.promote_types(wanted, element)


def plan_memory(model: nn.Module, cfg: Optional[LoraDAConfig] = None, max_memory: Union[int, str, None] = None,
                targets: Optional[Dict[str, Target]] = None, **overrides) -> MemoryPlan:
    """The passes, chunks and bytes that ``collect_statistics(model, ..., max_memory=max_memory)``
    will use (``targets``: found from ``cfg.target_modules`` when not given). Only shapes and
    dtypes are read: build a model on the meta device to plan for one that fits nowhere here."""
    cfg = resolve_config(cfg, overrides)
    targets = find_targets(model, cfg.target_modules) if targets is None else targets
    param = next(model.parameters(), None)
    x_dtype = param.dtype if param is not None else torch.float32
    element = torch.promote_types(torch.float32, x_dtype)
    z_element = z_dtype(cfg, element)
    budget = memory_budget(max_memory, execution_device(model))
    groups = plan_groups(targets, element.itemsize, z_element.itemsize, budget)
    chunks, accumulators, buffers = [], [], []
    for group in groups:
        members = [targets[name] for name in group]
        accumulators.append(accumulator_bytes(members, element.itemsize, z_element.itemsize))
        left = int(accumulators[-1] * BUFFER_SHARE_OF_ACCUMULATORS)
        if budget is not None:
            left = min(left, budget - accumulators[-1])
        chunks.append(chunk_tokens(members, cfg.buffer_tokens, x_dtype.itemsize, left))
        buffers.append(chunks[-1] * buffer_token_bytes(members, x_dtype.itemsize))
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    summation = f"{cfg.input_factor_dtype} ({str(z_element).replace('torch.', '')} sums)"
    return MemoryPlan(groups, chunks, accumulators, buffers, model_bytes, budget, summation)


def memory_budget(max_memory: Union[int, str, None], device: torch.device) -> Optional[int]:
    """Bytes the accumulators may take: ``max_memory``, or for "auto" half the free memory of
    ``device`` (host memory for CPUs); None = unbounded."""
    if max_memory is None:
        return None
    if max_memory == "auto":
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return free // 2
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory <= 0:
        raise ValueError(f"max_memory must be a positive number of bytes or 'auto', got {max_memory!r}")
    return max_memory


def plan_groups(targets: Dict[str, Target], element_size: int, z_element_size: int,
                budget: Optional[int]) -> List[List[str]]:
    """Target names in model order, split into groups whose accumulators fit ``budget`` bytes.

    Modules under one parent (a layer's attention or MLP block) stay in one group, so inputs they
    share are seen together. The estimate is an upper bound: Z [n, n] (``z_element_size`` bytes
    each) counted for every module (shared inputs hold one), plus G [m, n] and y [m]
    (``element_size``); per-sequence sums are not counted.
    """
    blocks: Dict[str, List[str]] = {}
    for name in targets:
        blocks.setdefault(name.rpartition(".")[0], []).append(name)
    groups: List[List[str]] = []
    used = 0
    for names in blocks.values():
        need = accumulator_bytes([targets[name] for name in names], element_size, z_element_size)
        if budget is not None and need > budget:
            raise ValueError(f"max_memory={budget} bytes cannot hold the accumulators of {names} (up to {need} bytes)")
        if groups and (budget is None or used + need <= budget):
            groups[-1] += names
            used += need
        else:
            groups.append(list(names))
            used = need
    return groups


def accumulator_bytes(targets: List[Target], element_size: int, z_element_size: int) -> int:
    """Upper bound of the accumulators' bytes: Z [n, n] per module (shared inputs hold one) and
    G [m, n], y [m]."""
    return sum(z_element_size * t.in_features ** 2 + element_size * t.out_features * (t.in_features + 1)
               for t in targets)


def chunk_tokens(targets: List[Target], wanted: int, x_element_size: int, left: int) -> int:
    """Tokens per statistics op call for a pass over ``targets``: ``wanted`` (the config's
    ``buffer_tokens``), fewer where the buffers would not fit the ``left`` bytes. A buffered token
    takes n + m elements of the model's dtype per module (an upper bound: modules that share an
    input share its rows) and a flag; 0 runs each micro-batch at once."""
    return min(wanted, max(0, left) // buffer_token_bytes(targets, x_element_size))


def buffer_token_bytes(targets: List[Target], x_element_size: int) -> int:
    """Bytes one buffered token takes: n + m elements per module and a flag (an upper bound)."""
    return sum(x_element_size * (t.in_features + t.out_features) + 1 for t in targets)


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
    collector = _Collector(targets, cfg, chunk, None if encoder is None else
                           {name for name, t in targets.items() if id(t.module) in in_encoder})
    num_sequences = 0  # collected by this process
    seen = 0  # sequences of every rank so far (num_samples counts these)
    total = len(loader) if hasattr(loader, "__len__") else None
    handles = []
    error = None
    with frozen_eval(model), torch.enable_grad():
        try:
            handles = [t.module.register_forward_hook(collector.hook(name)) for name, t in targets.items()]
            if encoder is not None:
                handles.append(encoder.register_forward_hook(collector.record_encoder_output))
            bar = tqdm(loader, total=total, desc=label, unit="batch",
                       disable=not progress or not distributed.is_main_process())
            for index, batch in enumerate(bar):
                size = batch_size(batch)
                if cfg.num_samples is not None:  # every batch: a type that cannot be cut fails at the first
                    keep = min(size, cfg.num_samples - seen)
                    batch, size = truncate(batch, size, keep), keep
                seen += size
                if not by_index or distributed.owns_batch(index, place):
                    _collect_batch(model, batch, index, size, device, collector, loss_fn)
                    num_sequences += size
                if cfg.num_samples is not None and seen >= cfg.num_samples:
                    break
            bar.close()
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
    error = None
    try:
        bad = stats.non_finite()  # with shard_statistics, of this rank's own modules
        if bad:
            raise FloatingPointError(f"non-finite statistics (NaN/Inf activations or gradients with a finite loss) "
                                     f"in modules {bad}")
    except FloatingPointError as exc:
        if place is None:
            raise
        error = exc
    if place is not None:
        distributed.agree_on_failure(error, device, "the checks of the reduced statistics")
    stats.population_size = _population_size(cfg, loader, stats.num_sequences)[0]
    return stats


def _collect_batch(model: nn.Module, batch, index: int, size: int, device: torch.device, collector: _Collector,
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
