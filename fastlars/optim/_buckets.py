"""The unit of work of the non-fused backends: a param group's parameters of one dtype
(Bucket), cut into cache-sized slices on the CPU, the device-side select that applies a
skip flag without reading it, and the functions of each non-fused backend (EagerPath)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Bucket:
    """Parameters of one param group that share a dtype (a group has one device).

    ``hyper`` is the group's record (fastlars/optim/_hyper.py: LarsHyper, LambHyper).
    ``positions`` index ``param_groups[group_index]['params']`` so that errors can name
    a parameter. ``compute_dtype`` is the dtype of the state and of the arithmetic:
    float32, or float64 for float64 parameters.
    """

    group_index: int
    hyper: Any
    params: list[Tensor]
    grads: list[Tensor]
    positions: list[int]
    states: list[dict[str, Any]]
    compute_dtype: torch.dtype
    # fp32 tensors the update reads and writes: master weights, the parameters
    # themselves (fp32/fp64), or fp32 copies of low-precision parameters.
    weights: list[Tensor] = field(default_factory=list)
    # per parameter: its global norm is a sum over ranks (a Shard-placed DTensor)
    sharded: list[bool] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def low_precision(self) -> bool:
        return self.params[0].dtype != self.compute_dtype


# On the CPU a foreach op sweeps its whole tensor list before the next op starts,
# so a sequence of ops streams the bucket through memory once per op. Running the
# sequence on slices of about this many elements keeps the slice in cache.
CPU_SLICE_ELEMENTS = 1 << 18  # 1 MiB of fp32 per tensor list


def cache_sized_slices(b: Bucket, per_tensor: Tensor | None) -> Iterator[tuple[Bucket, Tensor | None]]:
    """Split a CPU bucket (and a per-tensor vector beside it) into cache-sized slices.

    Other devices get the whole bucket: there each foreach op is one launch.
    """
    if b.device.type != "cpu":
        yield b, per_tensor
        return
    start, elements = 0, 0
    for i, p in enumerate(b.params):
        elements += p.numel()
        if elements >= CPU_SLICE_ELEMENTS or i == len(b.params) - 1:
            s = slice(start, i + 1)
            yield (replace(b, params=b.params[s], grads=b.grads[s], positions=b.positions[s],
                           states=b.states[s], weights=b.weights[s]),
                   None if per_tensor is None else per_tensor[s])
            start, elements = i + 1, 0


def where_(ok: Tensor, new: list[Tensor], dst: list[Tensor]) -> None:
    """dst = new if ok else dst, for each pair, without reading ok on the host.

    torch has no foreach select; arithmetic masking (dst + ok * (new - dst)) would
    turn the NaNs of a skipped step into NaN state, so this is one where per tensor.
    """
    for n, t in zip(new, dst):
        torch.where(ok, n, t, out=t)


def descend(base: list[Tensor], updates: list[Tensor], lr: float | Tensor, *, in_place: bool) -> list[Tensor]:
    """base - lr·u for each pair: written into ``base`` (in_place), or as new tensors; returned.

    A number is torch's ``alpha=`` (one multiply-add per element). A tensor lr on the
    tensors' device multiplies the updates there: ``alpha=`` takes a number, and a tensor
    given there is read on the host, which on CUDA synchronises (torch.optim's capturable
    Adam multiplies too; the product is rounded once more than alpha's multiply-add). A
    tensor lr on another device (a CPU lr with CUDA parameters) is host memory, read for free.
    """
    if isinstance(lr, Tensor) and base and lr.device != base[0].device:
        lr = lr.item()
    if isinstance(lr, Tensor):
        steps = torch._foreach_mul(updates, lr)
        if not in_place:
            return torch._foreach_sub(base, steps)
        torch._foreach_sub_(base, steps)
    elif not in_place:
        return torch._foreach_add(base, updates, alpha=-lr)
    else:
        torch._foreach_add_(base, updates, alpha=-lr)
    return base


def launch_groups(buckets: list[Bucket]) -> list[list[Bucket]]:
    """The buckets one fused launch takes each: merged per (device, dtype) across param
    groups, in the order the step meets them."""
    merged: dict[tuple, list[Bucket]] = {}
    for b in buckets:
        merged.setdefault((b.device, b.params[0].dtype), []).append(b)
    return list(merged.values())


@dataclass(frozen=True)
class EagerPath:
    """One non-fused backend of an optimizer, as torch.optim's ``_single_tensor_*`` and
    ``_multi_tensor_*`` functions: how it takes per-tensor norms, how it cuts a bucket
    (cache-sized slices on the CPU, or the whole bucket), and its step on one piece."""

    norms: Callable[[list[Tensor], torch.dtype], Tensor]  # (tensors, dtype) -> 1-D tensor of their norms
    pieces: Callable[[Bucket, Tensor | None], Any]         # (bucket, per-tensor vector) -> [(bucket, vector)]
    step: Callable[..., Any]


def one_at_a_time_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors])


def foreach_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))


def whole_bucket(b: Bucket, per_tensor: Tensor | None) -> list[tuple[Bucket, Tensor | None]]:
    return [(b, per_tensor)]
