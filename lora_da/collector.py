"""Hook routing of one pass: forward hooks on the targets record each input tensor and the
modules that read it (an event), with its counted-token mask; gradient hooks complete the event
and hand it to the accumulators."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch

from .accumulators import Accumulators
from .batches import decoder_token_mask, token_mask
from .config import LoraDAConfig
from .statistics import Statistics
from .targets import Target


@dataclass(eq=False)
class _Event:
    """One forward use of one input tensor by one or more targeted modules."""

    x: torch.Tensor  # [B, L, n]
    mask: torch.Tensor  # [B, L]
    modules: List[str] = field(default_factory=list)
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, L, m]


class Collector:
    """Hooks on the targets; turns each batch's events into op calls on the accumulators."""

    def __init__(self, targets: Dict[str, Target], cfg: LoraDAConfig, chunk: int = 0,
                 encoder_targets: Optional[set] = None):
        self.targets = targets
        self.cfg = cfg
        self.accumulators = Accumulators(targets, cfg, chunk)
        # an encoder-decoder model: the targets inside its encoder (None for other models); the
        # encoder's outputs of this batch, which its decoder's cross-attention reads
        self.encoder_targets = encoder_targets
        self.encoder_outputs: List[torch.Tensor] = []
        self.decoder_mask: Optional[torch.Tensor] = None
        self.row_kinds: Dict[str, str] = {}  # module -> what its input's rows are: "tokens" or "sequences"
        self.events: List[_Event] = []
        self.batch_mask: Optional[torch.Tensor] = None
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

    def _flush(self, event: _Event) -> None:
        """Hand a completed event to the accumulators: x as [B, L, n], its mask [B, L] and the
        gradients that reached it."""
        if event in self.events:
            self.events.remove(event)
        x = event.x.detach()
        x = x.reshape(*event.mask.shape, x.shape[-1]) if x.dim() == 2 else x
        if x.dim() != 3:
            x = x.reshape(-1, 1, x.shape[-1])
        grads = {m: g.reshape(*x.shape[:2], -1) for m, g in event.grads.items()}
        self.accumulators.add(list(dict.fromkeys(event.modules)), x, event.mask.reshape(x.shape[:2]), grads)

    def start_batch(self, batch, batch_size_: int) -> None:
        self.events.clear()
        self.encoder_outputs.clear()
        if self.encoder_targets is None:
            self.batch_mask = token_mask(batch, self.cfg.token_mask)
        else:  # the encoder's tokens by its attention mask, the decoder's by its own (decoder_token_mask)
            self.batch_mask = token_mask(batch, "all" if self.cfg.token_mask == "all" else "attention")
            self.decoder_mask = None if self.cfg.token_mask == "all" else decoder_token_mask(batch, self.cfg.token_mask)
        self.current_batch_size = batch_size_

    def finish_batch(self) -> None:
        """Flush events whose modules did not all receive a gradient (their G gets nothing). Events
        that received none are dropped: a forward that no gradient reached, such as activation
        checkpointing's recomputation during backward (non-reentrant), repeats one that did."""
        for event in list(self.events):
            if event.grads:
                self._flush(event)
        self.events.clear()
        self.accumulators.finish_batch(self.current_batch_size)

    def no_grad_hint(self, modules: Iterable[str]) -> str:
        """Why ``modules`` may have missed their gradients, when some of them ran with gradients disabled."""
        if not self.forwards_without_grad.intersection(modules):
            return ""
        return ("; they ran with gradients disabled (torch.no_grad, or reentrant activation checkpointing, "
                "torch.utils.checkpoint(use_reentrant=True), whose inputs do not require grad): use "
                "use_reentrant=False, call model.enable_input_require_grads(), or disable checkpointing for collection")

    def statistics(self, num_sequences: int, population_size: int) -> Statistics:
        missing = [name for name in self.targets if name not in self.accumulators.modules]
        if missing:
            raise RuntimeError(f"targeted modules never received an output gradient during collection: {missing}"
                               + self.no_grad_hint(missing))
        return self.accumulators.statistics(num_sequences, population_size)
