"""Gradient accumulation to a large global batch on one device.

One optimizer step at global batch B with micro-batches of b: B / b forward/backward
passes whose gradients add up to the gradient of the mean loss over B (each micro
loss is scaled by its share of the batch). Ghost BN, if the model has it, normalises
within each micro-batch (its ghosts must divide the micro-batch to match a single
pass over B).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .noise_scale import GradientNoiseScale, grad_sq_norm

__all__ = ["accumulate_gradients"]


def accumulate_gradients(model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor,
                         targets: Tensor, micro_batch_size: int, *, scaler: torch.amp.GradScaler | None = None,
                         autocast_dtype: torch.dtype | None = None,
                         memory_format: torch.memory_format = torch.contiguous_format,
                         noise_scale: GradientNoiseScale | Sequence[GradientNoiseScale] | None = None) -> Tensor:
    """Backward over ``inputs`` in micro-batches; gradients land in ``p.grad`` (added to
    what is there, as ``loss.backward()``). ``loss_fn`` must return the *mean* over its
    micro-batch. Returns the mean loss over the whole batch (a detached tensor).

    ``scaler`` scales each micro loss (call ``scaler.step(opt)`` afterwards);
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward under autocast;
    ``memory_format=torch.channels_last`` converts each micro-batch of images.

    ``noise_scale`` (a :class:`~fastlars.noise_scale.GradientNoiseScale`, or several, each
    measuring its own ``params``) gets McCandlish et al.'s two measurements of this step
    for free: the gradient after the first micro-batch (batch ``micro_batch_size``) and
    the accumulated one (batch ``len(inputs)``); under DDP, which averages every
    micro-batch's gradient over the ranks, both batches count ``world_size`` times
    as many samples. Needs at least two micro-batches and no gradient in ``.grad`` before
    the call (zero it first), since the first micro-batch's gradient is read from there.
    """
    batch = inputs.shape[0]
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
    if batch % micro_batch_size:
        raise ValueError(f"the batch of {batch} samples is not a multiple of micro_batch_size {micro_batch_size}")
    if targets.shape[0] != batch:
        raise ValueError(f"inputs have {batch} samples but targets have {targets.shape[0]}")
    trackers = _trackers(model, noise_scale, batch // micro_batch_size)
    total = torch.zeros((), device=inputs.device)
    autocast = (torch.autocast(inputs.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    for i, (x, y) in enumerate(zip(inputs.split(micro_batch_size), targets.split(micro_batch_size))):
        if x.ndim == 4:
            x = x.contiguous(memory_format=memory_format)
        with autocast:
            loss = loss_fn(model(x), y) * (x.shape[0] / batch)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float()
        if i == 0 and trackers:
            # First micro-batch: .grad holds (b / B) * G_b (the micro loss was scaled by b / B).
            unscale = (batch / micro_batch_size) / (scaler.get_scale() if scaler is not None else 1.0)
            trackers = [(t, params, grad_sq_norm(params) * unscale ** 2) for t, params in trackers]
    if trackers:
        world = _world_size(model)
        unscale = 1.0 / (scaler.get_scale() if scaler is not None else 1.0)
        for tracker, params, small in trackers:
            tracker.update(small, micro_batch_size * world, grad_sq_norm(params) * unscale ** 2, batch * world)
    return total


def _trackers(model: torch.nn.Module, noise_scale, micro_batches: int) -> list[tuple]:
    """(tracker, params) pairs to feed, after checking the preconditions."""
    if noise_scale is None:
        return []
    trackers = [noise_scale] if isinstance(noise_scale, GradientNoiseScale) else list(noise_scale)
    if not all(isinstance(t, GradientNoiseScale) for t in trackers):
        raise TypeError("noise_scale must be a GradientNoiseScale or a sequence of them")
    if micro_batches < 2:
        raise ValueError("noise_scale needs at least two micro-batches (a small and a big batch)")
    pairs = [(t, t.params if t.params is not None else [p for p in model.parameters() if p.requires_grad])
             for t in trackers]
    if any(float(grad_sq_norm(params)) != 0.0 for _, params in pairs):
        raise ValueError("noise_scale needs zero gradients before the call (call optimizer.zero_grad() first)")
    return pairs


def _world_size(model: torch.nn.Module) -> int:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return torch.distributed.get_world_size(model.process_group)
    return 1
