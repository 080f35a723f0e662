"""One small registry between the algorithm and the kernels.

Collect and solve ask for an op by name; the registry picks the implementation for the
requested backend (``auto`` | ``torch`` | ``triton`` | ``cuda``, or ``LORA_DA_BACKEND`` when the
config says ``auto``) and the tensors' device, or says why the requested one cannot run.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .config import BACKENDS

logger = logging.getLogger(__name__)

# A check returns None when the implementation can run on (device, dtype), else the reason.
Check = Callable[[torch.device, torch.dtype], Optional[str]]


@dataclass(frozen=True)
class Implementation:
    backend: str
    fn: Callable
    check: Check
    priority: int  # higher wins under "auto"
    auto_devices: tuple  # device types on which "auto" may pick it


_REGISTRY: Dict[str, List[Implementation]] = {}
_announced = set()


def register(op: str, backend: str, fn: Callable, check: Optional[Check] = None, priority: int = 0,
             auto_devices: tuple = ("cpu", "cuda")) -> None:
    """Make ``fn`` the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}")
    impls = [i for i in _REGISTRY.get(op, []) if i.backend != backend]
    impls.append(Implementation(backend, fn, check or (lambda device, dtype: None), priority, tuple(auto_devices)))
    _REGISTRY[op] = sorted(impls, key=lambda i: -i.priority)


def requested_backend(backend: str) -> str:
    """``backend``, or ``LORA_DA_BACKEND`` when ``backend`` is ``auto`` and the variable is set."""
    if backend == "auto":
        backend = os.environ.get("LORA_DA_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (from LORA_DA_BACKEND?); choose one of {list(BACKENDS)}")
    return backend


def find(op: str, backend: str) -> Implementation:
    """The registered ``backend`` implementation of ``op``; KeyError when there is none."""
    for impl in _REGISTRY.get(op, []):
        if impl.backend == backend:
            return impl
    raise KeyError(f"no {backend!r} implementation of {op!r}")


_pinned: contextvars.ContextVar = contextvars.ContextVar("lora_da_pinned_backend", default=None)


@contextlib.contextmanager
def pinned(backend: Optional[str]):
    """Within the block, every op resolves to ``backend`` (None: as asked): ``deterministic``
    runs pin the plain PyTorch ops, whose reductions never depend on autotuning or atomics."""
    token = _pinned.set(backend)
    try:
        yield
    finally:
        _pinned.reset(token)


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype, *,
            missing_is_auto: bool = False) -> Implementation:
    """The implementation of ``op`` for ``backend`` on tensors of ``device``/``dtype``.

    ``auto`` takes the highest-priority implementation that can run and logs its choice once;
    an explicit backend that cannot run raises RuntimeError saying why (``missing_is_auto``: one
    without an implementation of ``op`` at all is treated as ``auto``).
    """
    backend = _pinned.get() or requested_backend(backend)
    impls = _REGISTRY.get(op, [])
    if missing_is_auto and backend not in {impl.backend for impl in impls}:
        backend = "auto"
    if backend == "auto":
        for impl in impls:
            if device.type in impl.auto_devices and impl.check(device, dtype) is None:
                key = (op, device.type, dtype)
                if key not in _announced:
                    _announced.add(key)
                    logger.info("lora_da: op %s on %s/%s uses backend %r", op, device.type, dtype, impl.backend)
                return impl
        raise RuntimeError(f"no backend can run op {op!r} on {device}/{dtype}")
    for impl in impls:
        if impl.backend == backend:
            reason = impl.check(device, dtype)
            if reason is not None:
                raise RuntimeError(f"backend {backend!r} cannot run op {op!r} on {device}/{dtype}: {reason}")
            return impl
    available = [i.backend for i in impls]
    raise RuntimeError(
        f"backend {backend!r} has no implementation of op {op!r} in this version; available: {available}"
    )


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lazy(module: str, name: str) -> Callable:
    """``module.name``, imported on first call (keeps Triton and CUDA code out of import time)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


def triton_check(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in KERNEL_DTYPES:
        return f"the Triton kernels take {[str(d) for d in KERNEL_DTYPES]}; {dtype} stays on the torch backend"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before lora_da's kernels are imported)"
    return f"Triton does not run on {device.type}"


def triton_fp64_check(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """The solver kernels: fp32 or fp64 operands, accumulated in fp64."""
    if dtype not in (torch.float32, torch.float64):
        return f"the solver's Triton kernels take float32 or float64, not {dtype}"
    return triton_check(device, torch.float32)


def cuda_check(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    from . import _extension

    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors, not {device.type}"
    if dtype not in KERNEL_DTYPES:
        return f"the CUDA kernels take {[str(d) for d in KERNEL_DTYPES]}; {dtype} stays on the torch backend"
    return _extension.load_error()


def _register_builtin() -> None:
    from .kernels import reference

    register("fisher_update", "torch", reference.fisher_update, priority=0)
    # Triton first: faster than the extension on an H200 (RESULTS.md, "GPU")
    register("fisher_update", "triton", lazy("lora_da.kernels.fisher_triton", "fisher_update"), triton_check,
             priority=2, auto_devices=("cuda",))
    register("fisher_update", "cuda", lazy("lora_da._extension", "fisher_update"), cuda_check,
             priority=1, auto_devices=("cuda",))
    register("inner_products", "torch", reference.inner_products, priority=0)
    register("inner_products", "triton", lazy("lora_da.kernels.gram_triton", "inner_products"), triton_fp64_check,
             priority=1, auto_devices=("cuda",))


_register_builtin()
