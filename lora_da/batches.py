"""Calibration batches: their size, their counted-token masks, the loss they are collected under,
and moving or cutting them (dicts, lists, tuples and dataclasses of tensors alike)."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Callable, Optional

import torch
from torch import nn


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
