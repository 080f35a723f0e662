"""The accumulators of one pass: per distinct input Z, per module G and y (and per-sequence sums),
filled by the statistics op through the dispatch layer, directly or from token buffers that
gather an input's tokens across micro-batches."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from . import dispatch
from .config import LoraDAConfig
from .kernels.reference import write_sequence_sums
from .memory import HELD_ROWS_PER_FEATURE, kernel_sums_fp64, z_dtype
from .statistics import Z_FP32_TILES, InputStatistics, ModuleStatistics, Statistics
from .targets import Target


class TokenBuffer:
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


def mirror_upper(z: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is that of z [n, n] (kernels fill only that)."""
    return torch.triu(z) + torch.triu(z, diagonal=1).T


class Accumulators:
    """Z per distinct input, G and y per module (and per-sequence sums) of one pass's targets;
    each input's tokens go to the statistics op at once or through its token buffer."""

    def __init__(self, targets: Dict[str, Target], cfg: LoraDAConfig, chunk: int = 0):
        self.targets = targets
        self.cfg = cfg
        # tokens per op call, gathered across micro-batches (0: each event at once); per-sequence
        # sums need each batch's layout, so sequence_lowrank runs each event at once
        self.chunk = 0 if cfg.output_fisher == "sequence_lowrank" else chunk
        self.fp32_tiles = False  # whether a kernel summed Z from fp32 tile sums (``kernels.massive``)
        self.held: Dict[str, List[torch.Tensor]] = {}  # input key -> its counted rows [t, n] on the host
        self.released = set()  # inputs whose rows passed what is held: the kernel sums their Z
        self.buffers: Dict[str, TokenBuffer] = {}  # input key -> its gathered tokens
        self.input_of: Dict[str, str] = {}  # module -> input key
        self.inputs: Dict[str, InputStatistics] = {}
        self.modules: Dict[str, ModuleStatistics] = {}
        self.token_tensors: Dict[str, torch.Tensor] = {}  # input key -> counted tokens (on device)
        self.seq_sums: Dict[str, List[torch.Tensor]] = {name: [] for name in targets}
        self.batch_seq_sums: Dict[str, torch.Tensor] = {}

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
    def add(self, modules: List[str], x: torch.Tensor, mask: torch.Tensor, grads: Dict[str, torch.Tensor]) -> None:
        """One input x [B, L, n] that ``modules`` read, its counted tokens mask [B, L] and the
        output gradients {module: [B, L, m]} of those that received one."""
        key = self._input_key(modules)
        dtype = torch.promote_types(torch.float32, x.dtype)
        if key not in self.inputs:
            n = x.shape[-1]
            self.inputs[key] = InputStatistics(tuple(modules), x.new_zeros((n, n), dtype=z_dtype(self.cfg, dtype)), 0)
            self.token_tensors[key] = torch.zeros((), dtype=torch.int64, device=x.device)
        self.token_tensors[key] += mask.sum()
        for m in grads:
            if m not in self.modules:
                t = self.targets[m]
                self.modules[m] = ModuleStatistics(
                    key, x.new_zeros((t.out_features, t.in_features), dtype=dtype), x.new_zeros(t.out_features, dtype=dtype)
                )
        if not self.chunk:  # padding (not counted, no gradient) adds nothing, also where its activations are not finite
            padding = ~(mask | carries_gradient(grads, mask))
            self._update(key, x.masked_fill(padding[..., None], 0) if bool(padding.any()) else x, mask, grads)
            return
        if key not in self.buffers:
            self.buffers[key] = TokenBuffer(self.chunk, x, lambda *chunk, key=key: self._update(key, *chunk))
        self.buffers[key].add(x, mask, grads)

    def _update(self, key: str, x: torch.Tensor, mask: torch.Tensor, grads: Dict[str, torch.Tensor],
                counted: Optional[int] = None) -> None:
        """The statistics op on x [B, L, n], mask [B, L] and the output gradients {module: [B, L, m]}
        of input ``key``'s modules: into Z, G and y, and this batch's per-sequence sums
        (``counted``: the mask is 1 on the first ``counted`` tokens only, see ``fisher_update``)."""
        names = list(grads)
        impl = dispatch.resolve("fisher_update", self.cfg.backend, x.device, x.dtype)
        z_sum = self.inputs[key].z_sum
        if z_sum.dtype == torch.float64 and impl.backend != "torch":
            if kernel_sums_fp64(self.cfg.input_factor_dtype, impl.backend, x.dtype):
                rest = self._hold_rows(key, x, mask, counted)
                if rest is not None:
                    self.fp32_tiles = True
                    rest_x, rest_mask, rest_counted = rest
                    impl.fn(rest_x, rest_mask, [], z_sum, [], [], counted=rest_counted)
            else:  # fp64 products through PyTorch
                dispatch.find("fisher_update", "torch").fn(x, mask, [], z_sum, [], [], counted=counted)
            z_sum = None
        impl.fn(x, mask, list(grads.values()), z_sum, [self.modules[m].g_sum for m in names],
                [self.modules[m].y_sum for m in names], counted=counted)
        if self.cfg.output_fisher == "sequence_lowrank":
            dtype = torch.promote_types(torch.float32, x.dtype)
            for m, grad in grads.items():
                sums = x.new_empty((x.shape[0], grad.shape[-1]), dtype=dtype)
                write_sequence_sums(grad, mask, sums)
                previous = self.batch_seq_sums.get(m)
                self.batch_seq_sums[m] = sums if previous is None else previous + sums

    def _hold_rows(self, key: str, x: torch.Tensor, mask: torch.Tensor, counted: Optional[int]):
        """Keep in host memory the counted rows of x [B, L, n] while input ``key`` has at most
        HELD_ROWS_PER_FEATURE * n of them (``statistics`` sums rows still held as fp64 products).
        Returns None while held, else (x, mask, counted) for the kernel: the held rows at once
        (compacted, back on x's device) when they pass that, the call's own after. Synchronises
        with the device per call while held."""
        if key in self.released:
            return x, mask, counted
        n = x.shape[-1]
        flat = x.reshape(-1, n)
        rows = flat[:counted] if counted is not None else flat[mask.reshape(-1)]
        self.held.setdefault(key, []).append(rows.to("cpu", copy=True))
        if sum(len(r) for r in self.held[key]) <= HELD_ROWS_PER_FEATURE * n:
            return None
        rows = torch.cat(self.held.pop(key)).to(x.device)
        self.released.add(key)
        return rows[None], torch.ones((1, len(rows)), dtype=torch.bool, device=rows.device), len(rows)

    def finish_batch(self, batch_size: int) -> None:
        """Close a batch of ``batch_size`` sequences: its per-sequence sums (zeros for a module
        that got no gradient in it) join those of the earlier batches."""
        for name in self.seq_sums:
            sums = self.batch_seq_sums.get(name)
            if sums is None and name in self.modules:
                stats = self.modules[name]
                sums = stats.y_sum.new_zeros((batch_size, stats.y_sum.shape[0]))
            if sums is not None:
                self.seq_sums[name].append(sums)
        self.batch_seq_sums = {}

    def statistics(self, num_sequences: int, population_size: int) -> Statistics:
        """The pass's Statistics, buffers flushed, Z mirrored, modules in the targets' order."""
        for buffer in self.buffers.values():
            buffer.flush()
        for key, rows in self.held.items():  # inputs with few tokens for their features: fp64 products
            rows = torch.cat(rows).to(self.inputs[key].z_sum.device)
            every = torch.ones((1, len(rows)), dtype=torch.bool, device=rows.device)
            dispatch.find("fisher_update", "torch").fn(rows[None], every, [], self.inputs[key].z_sum, [], [],
                                                       counted=len(rows))
        self.held = {}
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
