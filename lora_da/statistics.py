"""The statistics one calibration pass produces (sums and counts; means on request), and their
files: safetensors tensors plus JSON metadata, never pickle."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

FORMAT_VERSION = 1
# key of ``Statistics.config``: True where the kernels summed Z from fp32 tile sums into fp64
# (``input_factor_dtype="mixed"`` on bf16/fp16 GPU inputs, ``kernels.massive``)
Z_FP32_TILES = "z_fp32_tiles"


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
    config: Dict[str, object] = field(default_factory=dict)  # the collection's LoraDAConfig fields and Z_FP32_TILES
    passes: int = 1  # passes over the calibration data that collected these (memory budget)
    # sharded by owner (``shard_statistics`` under torch.distributed): every module of the model ->
    # [rank that holds its sums and solves it, m, n]; this rank's ``modules`` and ``inputs`` are its own
    layout: Optional[Dict[str, list]] = None

    @property
    def population_size_assumed(self) -> bool:
        """Whether collection took N from the calibration data because the config left it unset."""
        return "population_size" in self.config and self.config["population_size"] is None

    @property
    def num_tokens(self) -> int:
        """Counted tokens T (the largest count over the distinct inputs)."""
        return max(entry.num_tokens for entry in self.inputs.values())

    @property
    def device(self) -> torch.device:
        """Where the sums live."""
        return next(iter(self.inputs.values())).z_sum.device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).g_sum.dtype

    def gradient(self, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
        """G [m, n]: mean over sequences of the weight gradient (on ``device``, default the sums')."""
        return _moved(self.modules[name].g_sum, device) / self.num_sequences

    def input_factor(self, key: str, device: Optional[torch.device] = None) -> torch.Tensor:
        """Z [n, n]: symmetrised mean of x^T x over counted tokens (on ``device``)."""
        entry = self.inputs[key]
        z = _moved(entry.z_sum, device) / entry.num_tokens
        return 0.5 * (z + z.T)

    def output_factor(self, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
        """y [m]: mean of g * g over counted tokens (on ``device``)."""
        return _moved(self.modules[name].y_sum, device) / self.inputs[self.modules[name].input_key].num_tokens

    def sequence_factor(self, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
        """P [m, K]: per-sequence output-gradient sums / sqrt(K) (``sequence_lowrank`` only; on ``device``)."""
        sums = self.modules[name].sequence_sums
        if sums is None:
            raise ValueError("statistics were collected without output_fisher='sequence_lowrank'")
        return _moved(sums, device).T / math.sqrt(sums.shape[0])

    def nbytes(self) -> int:
        """Bytes held by the accumulators."""
        tensors = [s.z_sum for s in self.inputs.values()]
        for s in self.modules.values():
            tensors += [s.g_sum, s.y_sum] + ([s.sequence_sums] if s.sequence_sums is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: Union[str, torch.device]) -> "Statistics":
        """A copy with every tensor on ``device`` (the same object's tensors when already there)."""
        return Statistics(
            {name: ModuleStatistics(e.input_key, e.g_sum.to(device), e.y_sum.to(device),
                                    None if e.sequence_sums is None else e.sequence_sums.to(device))
             for name, e in self.modules.items()},
            {key: InputStatistics(e.modules, e.z_sum.to(device), e.num_tokens) for key, e in self.inputs.items()},
            self.num_sequences, self.population_size, self.token_mask, self.output_fisher, dict(self.config), self.passes,
            self.layout)

    @staticmethod
    def union(parts) -> "Statistics":
        """One Statistics holding the modules of every part: passes over the same data that each
        collected other modules (``merge`` sums the same modules over other data)."""
        first = parts[0]
        if any(p.num_sequences != first.num_sequences for p in parts):
            raise ValueError("statistics of different passes saw different numbers of sequences")
        modules = {name: entry for part in parts for name, entry in part.modules.items()}
        inputs = {key: entry for part in parts for key, entry in part.inputs.items()}
        layouts = [p.layout for p in parts if p.layout is not None]
        layout = {name: place for part in layouts for name, place in part.items()} if layouts else None
        return Statistics(modules, inputs, first.num_sequences, first.population_size, first.token_mask,
                          first.output_fisher, dict(first.config), len(parts), layout)

    def non_finite(self, names: Optional[Sequence[str]] = None) -> list:
        """Those of ``names`` (default: every module) whose G, y or input Z hold NaN or Inf."""
        names = list(self.modules) if names is None else names
        keys = {self.modules[name].input_key for name in names}
        bad_inputs = {key for key in keys if not bool(torch.isfinite(self.inputs[key].z_sum).all())}
        return [name for name in names if self.modules[name].input_key in bad_inputs
                or not bool(torch.isfinite(self.modules[name].g_sum).all() & torch.isfinite(self.modules[name].y_sum).all())]

    def fingerprint(self) -> Dict[str, list]:
        """Module name -> [m, n]: what a model must have for these statistics to apply to it
        (every module of the model, also those whose sums other ranks hold)."""
        if self.layout is not None:
            return {name: [m, n] for name, (_, m, n) in self.layout.items()}
        return {name: list(entry.g_sum.shape) for name, entry in self.modules.items()}

    def _refuse_sharded(self, what: str) -> None:
        if self.layout is not None:
            raise ValueError(f"cannot {what} statistics sharded by owner (each rank holds its own modules' sums); "
                             "collect with shard_statistics=False")

    def check_matches(self, shapes: Mapping[str, Tuple[int, int]], against: str = "the model") -> None:
        """Raise ValueError unless ``shapes`` (module name -> (m, n), e.g. a model's targets)
        names exactly these modules with these shapes."""
        mine = {name: tuple(shape) for name, shape in self.fingerprint().items()}
        theirs = {name: tuple(shape) for name, shape in shapes.items()}
        problems = [f"missing from the statistics: {sorted(set(theirs) - set(mine))}"] if set(theirs) - set(mine) else []
        if set(mine) - set(theirs):
            problems.append(f"not in {against}: {sorted(set(mine) - set(theirs))}")
        problems += [f"{name}: statistics {mine[name]}, {against} {theirs[name]}"
                     for name in sorted(mine.keys() & theirs.keys()) if mine[name] != theirs[name]]
        if problems:
            raise ValueError(f"statistics do not match {against}: " + "; ".join(problems))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write a safetensors file: the sums as tensors, counts/config/fingerprint as JSON metadata."""
        self._refuse_sharded("save")
        from safetensors.torch import save_file

        from . import __version__

        tensors = {f"inputs/{key}/z_sum": entry.z_sum for key, entry in self.inputs.items()}
        for name, entry in self.modules.items():
            tensors[f"modules/{name}/g_sum"] = entry.g_sum
            tensors[f"modules/{name}/y_sum"] = entry.y_sum
            if entry.sequence_sums is not None:
                tensors[f"modules/{name}/sequence_sums"] = entry.sequence_sums
        meta = {
            "format": FORMAT_VERSION,
            "library_version": __version__,
            "num_sequences": self.num_sequences,
            "population_size": self.population_size,
            "token_mask": self.token_mask,
            "output_fisher": self.output_fisher,
            "config": self.config,
            "fingerprint": self.fingerprint(),
            "inputs": {key: {"modules": list(e.modules), "num_tokens": e.num_tokens} for key, e in self.inputs.items()},
            "input_of": {name: entry.input_key for name, entry in self.modules.items()},
        }
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"lora_da": json.dumps(meta)})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "Statistics":
        """Read a file written by ``save``; ValueError when it is not one."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = (f.metadata() or {}).get("lora_da")
            if raw is None:
                raise ValueError(f"{path} is not a lora_da statistics file (no 'lora_da' metadata)")
            meta = json.loads(raw)
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"{path}: statistics format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        inputs = {key: InputStatistics(tuple(e["modules"]), tensors[f"inputs/{key}/z_sum"], e["num_tokens"])
                  for key, e in meta["inputs"].items()}
        modules = {name: ModuleStatistics(key, tensors[f"modules/{name}/g_sum"], tensors[f"modules/{name}/y_sum"],
                                          tensors.get(f"modules/{name}/sequence_sums"))
                   for name, key in meta["input_of"].items()}
        return cls(modules, inputs, meta["num_sequences"], meta["population_size"], meta["token_mask"],
                   meta["output_fisher"], meta["config"])

    @staticmethod
    def merge(first: "Statistics", *others: "Statistics") -> "Statistics":
        """Statistics of the union of the calibration data behind each argument (sums and counts
        add, per-sequence sums concatenate, population sizes add: set ``population_size`` in the
        config when the parts are shards of one fine-tuning set). ValueError when they differ in
        modules, shapes, inputs, dtype, token_mask or output_fisher."""
        for part in (first, *others):
            part._refuse_sharded("merge")
        merged = Statistics(
            {name: ModuleStatistics(e.input_key, e.g_sum.clone(), e.y_sum.clone(),
                                    None if e.sequence_sums is None else e.sequence_sums.clone())
             for name, e in first.modules.items()},
            {key: InputStatistics(e.modules, e.z_sum.clone(), e.num_tokens) for key, e in first.inputs.items()},
            first.num_sequences, first.population_size, first.token_mask, first.output_fisher, dict(first.config))
        for other in others:
            merged._check_compatible(other)
            for key, entry in other.inputs.items():
                merged.inputs[key].z_sum += entry.z_sum.to(merged.inputs[key].z_sum.device)
                merged.inputs[key].num_tokens += entry.num_tokens
            for name, entry in other.modules.items():
                mine = merged.modules[name]
                mine.g_sum += entry.g_sum.to(mine.g_sum.device)
                mine.y_sum += entry.y_sum.to(mine.y_sum.device)
                if mine.sequence_sums is not None:
                    mine.sequence_sums = torch.cat([mine.sequence_sums, entry.sequence_sums.to(mine.sequence_sums.device)])
            merged.num_sequences += other.num_sequences
            merged.population_size += other.population_size
        return merged

    def _check_compatible(self, other: "Statistics") -> None:
        self.check_matches(other.fingerprint(), against="the other statistics")
        for what in ("token_mask", "output_fisher", "dtype"):
            if getattr(self, what) != getattr(other, what):
                raise ValueError(f"cannot merge statistics with different {what}: "
                                 f"{getattr(self, what)} and {getattr(other, what)}")
        mine = {key: set(e.modules) for key, e in self.inputs.items()}
        theirs = {key: set(e.modules) for key, e in other.inputs.items()}
        if mine != theirs:
            raise ValueError("cannot merge statistics whose modules share inputs differently")


def _moved(t: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    """``t`` on ``device`` (itself when None)."""
    return t if device is None else t.to(device)
