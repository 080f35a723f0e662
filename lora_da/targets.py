"""Which layers LoRA-DA targets, and how they are named."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

from torch import nn


@dataclass(frozen=True)
class Target:
    """A targeted linear layer: ``module`` computes ``y = x W^T (+ b)`` with W of shape [m, n]."""

    name: str
    module: nn.Module
    out_features: int  # m
    in_features: int  # n


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but plain torch models work without it
        return None
    return Conv1D


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def is_bitsandbytes_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (NF4 or FP4; an ``nn.Linear``)."""
    bnb = sys.modules.get("bitsandbytes")  # no such layer exists unless bitsandbytes was imported
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def linear_shape(module: nn.Module) -> Optional[tuple]:
    """(m, n) of an ``nn.Linear`` (bitsandbytes' 4- and 8-bit layers among them) or HF ``Conv1D``
    (weight stored [n, m]); None for other modules."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        n, m = module.weight.shape
        return m, n
    return None


def naming_root(model: nn.Module) -> nn.Module:
    """The module whose ``named_modules()`` names are the public names (PEFT's prefix stripped)."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        return model
    if isinstance(model, PeftModel):
        return model.get_base_model()
    if isinstance(model, BaseTuner):
        return model.model
    return model


def lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Public name -> PEFT ``LoraLayer`` for every LoRA layer in ``model``."""
    lora_cls = _lora_layer_class()
    if lora_cls is None:
        return {}
    return {name: m for name, m in naming_root(model).named_modules() if isinstance(m, lora_cls)}


def matches(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    """PEFT's matching rules: a string is a full-match regex, a list matches names equal to an
    entry or ending with ``.`` + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, target_modules=None) -> Dict[str, Target]:
    """Targeted layers in ``named_modules()`` order.

    LoRA layers contribute their base layer under the LoRA layer's name. ``target_modules``:
    None = every LoRA layer if the model has any, else every linear-like layer but the output
    head; ``"all-linear"`` = every linear-like layer but the output head; else PEFT's rules.
    Raises ValueError (listing what exists) when nothing matches.
    """
    root = naming_root(model)
    lora_cls = _lora_layer_class()
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    candidates: Dict[str, nn.Module] = {}
    inside_lora = []
    has_lora = False
    for name, module in root.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_lora):
            continue
        if lora_cls is not None and isinstance(module, lora_cls):
            inside_lora.append(name)
            has_lora = True
            candidates[name] = module.get_base_layer()
        elif linear_shape(module) is not None and module is not head:
            candidates[name] = module
    if target_modules is None and has_lora:
        lora_names = set(inside_lora)
        selected = {n: m for n, m in candidates.items() if n in lora_names}
    elif target_modules is None or target_modules == "all-linear":
        selected = candidates
    else:
        selected = {n: m for n, m in candidates.items() if matches(n, target_modules)}
    targets = {}
    for name, module in selected.items():
        shape = linear_shape(module)
        if shape is None:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) is not nn.Linear or Conv1D; "
                "LoRA-DA initialises linear layers only"
            )
        targets[name] = Target(name, module, *shape)
    if not targets:
        available = ", ".join(candidates) or "(none)"
        raise ValueError(
            f"no module matches target_modules={target_modules!r}; linear layers in the model: {available}"
        )
    return targets
