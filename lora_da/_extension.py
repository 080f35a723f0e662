"""Lazy access to the optional CUDA extension ``lora_da._C`` (never loaded at import)."""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch

_state: dict = {}


def load_error() -> Optional[str]:
    """None when ``lora_da._C`` is loaded (its ops registered under ``torch.ops.lora_da``), else why not."""
    if "error" not in _state:
        try:
            importlib.import_module("lora_da._C")
            _state["error"] = None
        except ImportError as error:
            _state["error"] = (
                f"the CUDA extension lora_da._C is not built ({error}); reinstall with a CUDA build of torch, "
                "nvcc and pip install --no-build-isolation"
            )
    return _state["error"]


def ops():
    """``torch.ops.lora_da``, loading the extension first; RuntimeError saying why it cannot."""
    error = load_error()
    if error is not None:
        raise RuntimeError(error)
    return torch.ops.lora_da


def fisher_update(
    x: torch.Tensor,
    mask: torch.Tensor,
    grads: Sequence[torch.Tensor],
    input_factor: Optional[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    output_factors: Sequence[torch.Tensor],
    counted: Optional[int] = None,
) -> None:
    """CUDA version of ``reference.fisher_update`` (cuBLAS GEMMs for G and for Z's upper-triangular
    blocks, y in a fixed order; Z is written on and above its diagonal blocks only; with
    ``counted`` Z's products read the first ``counted`` rows, else the inputs times the mask).
    x: [B, L, n]; mask: [B, L]; grads[k]: [B, L, m_k]. The op sums Z into fp32 only (cuBLAS
    writes fp32 outputs): an fp64 Z gets each call's fp32 sums from a zeroed fp32 [n, n] scratch,
    the massive features summed in fp64 apart (``massive.add_split_gram``)."""
    from .kernels.massive import add_split_gram

    batch, length, n = x.shape
    tokens = batch * length

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(tokens, t.shape[-1])
        return t if t.stride(-1) == 1 else t.contiguous()

    xs, gs = rows(x), [rows(g) for g in grads]
    flat_mask = mask.reshape(tokens)
    if input_factor is not None and input_factor.dtype == torch.float64:
        def add_rest(rest: torch.Tensor) -> None:
            partial = torch.zeros_like(input_factor, dtype=torch.float32)
            ops().fisher_update_(rest, flat_mask, [], partial, [], [], counted)
            input_factor.add_(partial)

        add_split_gram(input_factor, xs, flat_mask, counted, add_rest)
        input_factor = None
    ops().fisher_update_(xs, flat_mask, gs, input_factor, list(gradients), list(output_factors), counted)
