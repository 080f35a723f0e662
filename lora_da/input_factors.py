"""The input side of the Fisher: per distinct layer input, its damped factor Zd = Z + damping I
(ALGORITHM.md step 2), the damping chosen once, the Cholesky factor and the inverse."""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .eigensolver import on_host_threads, on_one_thread
from .statistics import Z_FP32_TILES, Statistics


def rounding_floor(z: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> float:
    """The smallest damping that Z [n, n] summed over ``num_tokens`` tokens in ``dtype`` can take:
    eps(dtype) * sqrt(T) * ||Z||_F. The rounding noise E of such sums can make Z + lambda I
    indefinite when ||E||_2 > lambda; on the main job's 120 inputs, ||E||_2 stays below
    2 eps * ||Z||_2 in fp32, 35 times or more below this floor (RESULTS.md), and sqrt(T) covers
    the growth of summation errors with the number of terms."""
    return torch.finfo(dtype).eps * math.sqrt(num_tokens) * float(torch.linalg.matrix_norm(z))


def damped_cholesky(zd: torch.Tensor, damping: float, what: str) -> torch.Tensor:
    """zd [n, n] = Z + damping*I (its lower triangle is read) overwritten with its lower Cholesky
    factor L, which is returned; RuntimeError when zd is not positive definite (Z is then not
    the sum of outer products its statistics claim: corrupted, or edited)."""
    _, info = torch.linalg.cholesky_ex(zd, out=(zd, torch.empty((), dtype=torch.int32, device=zd.device)))
    if int(info) != 0:
        raise RuntimeError(f"lora_da: Cholesky of the input factor of {what} failed at damping {damping:g}: "
                           "Z + damping I is not positive definite, so Z is no sum of outer products")
    return zd


def scaled_damping(damping: float, scale: float) -> float:
    """``damping`` * ``scale``, the mean eigenvalue of a factor (``damping_mode="relative"``), or
    ``damping`` where that factor is 0."""
    return damping * scale if scale > 0 else damping


class InputFactors:
    """Per distinct input of ``stats``, in fp64 on ``device``: the lower Cholesky factor L of
    Zd = Z + damping I [n, n], Zd^-1 and Zd, each made once, one-threaded (the same bits however
    it is reached), and kept while a module still to be solved reads them: ``readers`` are the
    modules to solve, and each solver says ``done`` with the modules it has solved. The damping of
    each input is chosen once (``damping``): the config's (times tr(Z) / n where it is
    ``relative``), or the rounding floor of Z's sums where that is larger (``rounding_floor``). On
    CPUs ``stacked_inverses`` makes the factors of several inputs side by side on host threads."""

    def __init__(self, stats: Statistics, damping: float, device: torch.device, relative: bool = False,
                 readers: Iterable[str] = ()):
        self.stats, self.config_damping, self.device, self.relative = stats, damping, device, relative
        self.readers = Counter(stats.modules[name].input_key for name in readers)  # key -> modules still to read it
        self.on_release: List[Callable[[str], None]] = []  # called with each released input (``TokenBases``)
        self.factors: Dict[str, torch.Tensor] = {}  # key -> L (or the buffer ``stacked_inverses`` factors into)
        self.inverses: Dict[str, torch.Tensor] = {}  # key -> Zd^-1
        self.floors: Dict[str, float] = {}  # key -> the rounding floor of Z's sums
        self.dampings: Dict[str, float] = {}  # key -> its damping (kept after ``release``: the report reads it)
        self.redamped: List[str] = []  # inputs of fp32 tile sums damped at fp32's rounding floor (``_factor``)

    def z(self, key: str) -> torch.Tensor:
        """Z [n, n] of input ``key``: the symmetrised mean of its sums, in fp64 on the device."""
        return self.stats.input_factor(key, self.device).double()

    def damping(self, key: str, z: Optional[torch.Tensor] = None) -> float:
        """The damping of input ``key``, chosen at its first call from its Z [n, n] (``z``, where
        the caller has it; else ``self.z``): the config's (relative: times tr(Z) / n), or the
        rounding floor of Z's sums where that is larger."""
        if key not in self.dampings:
            entry = self.stats.inputs[key]
            z = self.z(key) if z is None else z
            self.floors[key] = rounding_floor(z, entry.num_tokens, entry.z_sum.dtype)
            damping = (scaled_damping(self.config_damping, float(z.diagonal().sum()) / z.shape[0]) if self.relative
                       else self.config_damping)
            self.dampings[key] = max(damping, self.floors[key])
        return self.dampings[key]

    def floor(self, key: str, z: Optional[torch.Tensor] = None) -> float:
        """The rounding floor of input ``key``'s sums (its damping chosen on the way)."""
        self.damping(key, z)
        return self.floors[key]

    def damped(self, key: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Zd [n, n] of input ``key`` in fp64 on the device, at its damping: its sums copied in
        (into ``out`` where given), scaled and damped in place."""
        entry = self.stats.inputs[key]
        zd = entry.z_sum.to(self.device, torch.float64, copy=True) if out is None else out.copy_(entry.z_sum)
        zd /= entry.num_tokens
        zd.diagonal().add_(self.damping(key, zd))
        return zd

    def _factor(self, key: str) -> torch.Tensor:
        """Factor input ``key`` into ``self.factors[key]`` (made here unless it is there already,
        e.g. allocated by ``stacked_inverses``), in place; returns L. Z's sums are symmetric:
        Cholesky reads their lower triangle. Sums of fp32 tiles (``Z_FP32_TILES``) that are not
        positive definite at the chosen damping take the rounding floor of fp32 sums instead
        (listed in ``redamped``); any other such Z is an error."""
        entry = self.stats.inputs[key]
        what = "/".join(entry.modules)
        zd = self.damped(key, self.factors.get(key))
        try:
            self.factors[key] = damped_cholesky(zd, self.dampings[key], what)
        except RuntimeError:
            if not self.stats.config.get(Z_FP32_TILES):
                raise
            self.dampings[key] = max(self.dampings[key], rounding_floor(self.z(key), entry.num_tokens, torch.float32))
            self.redamped.append(key)
            self.factors[key] = damped_cholesky(self.damped(key, zd), self.dampings[key], what)
        return self.factors[key]

    def cholesky(self, key: str) -> torch.Tensor:
        """L [n, n] of input ``key``."""
        if key not in self.factors:
            on_one_thread(self._factor, key)
        return self.factors[key]

    def inverse(self, key: str) -> torch.Tensor:
        """Zd^-1 [n, n] of input ``key``."""
        if key not in self.inverses:
            self.inverses[key] = on_one_thread(torch.cholesky_inverse, self.cholesky(key))
        return self.inverses[key]

    def stacked_inverses(self, keys: Sequence[str]) -> torch.Tensor:
        """Zd^-1 of the inputs ``keys`` (one n) stacked [u, n, n]. Those not made yet are written
        into the stack itself, on CPUs side by side on host threads (their factors in tensors made
        here: see ``eigensolver._host_eigh``), and ``inverse`` hands out views of it until
        ``release``."""
        n = self.stats.inputs[keys[0]].z_sum.shape[0]
        out = torch.empty(len(keys), n, n, dtype=torch.float64, device=self.device)
        missing = []
        for j, key in enumerate(keys):
            if key in self.inverses:
                out[j] = self.inverses[key]
            else:
                missing.append(j)
                self.factors[keys[j]] = torch.empty(n, n, dtype=torch.float64, device=self.device)

        def factor_and_invert(j: int) -> None:
            torch.cholesky_inverse(self._factor(keys[j]), out=out[j])
            self.inverses[keys[j]] = out[j]

        if self.device.type == "cpu":
            on_host_threads(factor_and_invert, missing)
        else:
            for j in missing:
                factor_and_invert(j)
        return out

    def done(self, names: Iterable[str]) -> None:
        """The modules ``names`` are solved: release the inputs that no module still to be solved reads."""
        for name in names:
            key = self.stats.modules[name].input_key
            self.readers[key] -= 1
            if self.readers[key] <= 0:
                self.release(key)

    def release(self, key: str) -> None:
        """Forget the factors of input ``key`` (its damping stays: the report reads it)."""
        for cache in (self.factors, self.inverses):
            cache.pop(key, None)
        for release in self.on_release:
            release(key)
