"""The statistics one calibration pass produces (sums and counts; means on request)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch


@dataclass
class InputStatistics:
    """One distinct layer input, shared by every module in ``modules`` (e.g. q/k/v)."""

    modules: Tuple[str, ...]
    z_sum: torch.Tensor  # [n, n]: sum over counted tokens of x^T x
    num_tokens: int  # counted tokens T


@dataclass
class ModuleStatistics:
    """One targeted module (weight [m, n])."""

    input_key: str  # key into Statistics.inputs
    g_sum: torch.Tensor  # [m, n]: sum over every token of g^T x
    y_sum: torch.Tensor  # [m]: sum over counted tokens of g * g
    sequence_sums: Optional[torch.Tensor] = None  # [K, m]: per sequence, sum over counted tokens of g


@dataclass
class Statistics:
    """Everything ``solve`` needs: per-module G and y, per-input Z, counts."""

    modules: Dict[str, ModuleStatistics]
    inputs: Dict[str, InputStatistics]
    num_sequences: int  # S
    population_size: int  # N used by solve unless the config sets one
    token_mask: str
    output_fisher: str

    @property
    def num_tokens(self) -> int:
        """Counted tokens T (the largest count over the distinct inputs)."""
        return max(entry.num_tokens for entry in self.inputs.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).g_sum.dtype

    def gradient(self, name: str) -> torch.Tensor:
        """G [m, n]: mean over sequences of the weight gradient."""
        return self.modules[name].g_sum / self.num_sequences

    def input_factor(self, key: str) -> torch.Tensor:
        """Z [n, n]: symmetrised mean of x^T x over counted tokens."""
        entry = self.inputs[key]
        z = entry.z_sum / entry.num_tokens
        return 0.5 * (z + z.T)

    def output_factor(self, name: str) -> torch.Tensor:
        """y [m]: mean of g * g over counted tokens."""
        return self.modules[name].y_sum / self.inputs[self.modules[name].input_key].num_tokens

    def sequence_factor(self, name: str) -> torch.Tensor:
        """P [m, K]: per-sequence output-gradient sums / sqrt(K) (``sequence_lowrank`` only)."""
        sums = self.modules[name].sequence_sums
        if sums is None:
            raise ValueError("statistics were collected without output_fisher='sequence_lowrank'")
        return sums.T / math.sqrt(sums.shape[0])

    def nbytes(self) -> int:
        """Bytes held by the accumulators."""
        tensors = [s.z_sum for s in self.inputs.values()]
        for s in self.modules.values():
            tensors += [s.g_sum, s.y_sum] + ([s.sequence_sums] if s.sequence_sums is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)
