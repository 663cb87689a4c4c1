"""Gradient accumulation to a large global batch on one device.

One optimizer step at global batch B with micro-batches of b: B / b forward/backward
passes whose gradients add up to the gradient of the mean loss over B (each micro
loss is scaled by its share of the batch). Ghost BN, if the model has it, normalises
within each micro-batch (its ghosts must divide the micro-batch to match a single
pass over B).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["accumulate_gradients"]


def accumulate_gradients(model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor,
                         targets: Tensor, micro_batch_size: int, *, scaler: torch.amp.GradScaler | None = None,
                         autocast_dtype: torch.dtype | None = None,
                         memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Backward over ``inputs`` in micro-batches; gradients land in ``p.grad`` (added to
    what is there, as ``loss.backward()``). ``loss_fn`` must return the *mean* over its
    micro-batch. Returns the mean loss over the whole batch (a detached tensor).

    ``scaler`` scales each micro loss (call ``scaler.step(opt)`` afterwards);
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward under autocast;
    ``memory_format=torch.channels_last`` converts each micro-batch of images.
    """
    batch = inputs.shape[0]
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
    if batch % micro_batch_size:
        raise ValueError(f"the batch of {batch} samples is not a multiple of micro_batch_size {micro_batch_size}")
    if targets.shape[0] != batch:
        raise ValueError(f"inputs have {batch} samples but targets have {targets.shape[0]}")
    total = torch.zeros((), device=inputs.device)
    autocast = (torch.autocast(inputs.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    for x, y in zip(inputs.split(micro_batch_size), targets.split(micro_batch_size)):
        if x.ndim == 4:
            x = x.contiguous(memory_format=memory_format)
        with autocast:
            loss = loss_fn(model(x), y) * (x.shape[0] / batch)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float()
    return total
