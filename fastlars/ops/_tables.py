"""Bookkeeping shared by the fused optimizer backends (Triton, C++): grouping the
optimizer's buckets per launch, per-group hyper-parameter rows, layout checks.
Imports neither Triton nor the C++ extension."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Merged:
    """The optimizer buckets of one (device, dtype) across param groups, which one
    launch handles, and its norms pass's sums, one row per tensor. Triton: also the norms
    pass's launch tables, which the update reuses when the step creates no state, and
    the tensors they point to (a gradient copied to the parameter's layout)."""

    buckets: list
    partials: Tensor
    launch: object = None
    keep_alive: object = None


def on_device(device: torch.device):
    """The context of a launch for tensors on ``device``: their CUDA device made current.
    Triton launches on the current device, not the tensors' (a model on cuda:1 while
    cuda:0 is current); C++ launches guard themselves (c10::cuda::CUDAGuard)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def scalar_on(t: Tensor | None, device: torch.device, dtype: torch.dtype | None = None) -> Tensor | None:
    """A device scalar of the step (ok, inv_scale, the global norm; None stays None) on the
    launch's device: the gate makes ``ok`` on the first group's device, which a group on
    another device does not share."""
    return None if t is None else t.to(device=device, dtype=dtype)


def merge_buckets(buckets) -> list[list]:
    """Optimizer buckets grouped by (device, dtype): one launch each."""
    merged: dict[tuple, list] = {}
    for b in buckets:
        merged.setdefault((b.device, b.params[0].dtype), []).append(b)
    return list(merged.values())


def flat(buckets, attr: str) -> list:
    return [x for b in buckets for x in getattr(b, attr)]


def names_of(buckets) -> list[str]:
    return [f"param_groups[{b.group_index}]['params'][{pos}]" for b in buckets for pos in b.positions]


def group_table(buckets, row_of) -> tuple[list[int], list[list]]:
    """Per-tensor group index, and one row of hyper-parameters (``row_of(group)``) per
    bucket: floats, except a tensor (a tensor lr) on the bucket's device, which is left as
    it is for the drivers to copy on the device (set_group_rows): reading it as a float
    would synchronise with the device at every step. A tensor on another device (a CPU
    tensor lr with CUDA parameters) is read on the host instead: copying it to the device
    would be a copy from pageable memory, which blocks, and which a CUDA graph cannot
    capture (capturable=True refuses such an lr when the group is added)."""
    group_of, rows = [], []
    for gi, b in enumerate(buckets):
        rows.append([x if isinstance(x, Tensor) and x.device == b.device else float(x) for x in row_of(b.group)])
        group_of.extend([gi] * len(b.params))
    return group_of, rows



def check_layouts(named: list[tuple[str, Tensor, list[Tensor | None]]]) -> None:
    """The kernels walk storage linearly: every tensor of a parameter (weight, grad,
    state) must be dense and share the parameter's strides."""
    for name, p, others in named:
        if not _dense(p):
            raise ValueError(f"{name} is not dense in memory (a strided view); the fused backends (triton, cuda, cpu) "
                             "walk storage linearly: use backend='foreach' for such tensors")
        for t in others:
            if t is not None and t.numel() and t.stride() != p.stride():
                raise ValueError(f"{name}: a gradient or state tensor has strides {t.stride()} but the "
                                 f"parameter has {p.stride()}")


def _dense(t: Tensor) -> bool:
    if t.numel() <= 1:
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(g: Tensor, p: Tensor) -> Tensor:
    """The gradient in the parameter's memory layout (a copy only when they differ)."""
    if g.stride() == p.stride() or p.numel() <= 1:
        return g
    out = torch.empty_like(p, dtype=g.dtype)
    out.copy_(g)
    return out


# Group-table rows, one per param group, in the column order of csrc/fastlars_math.h
# (LarsColumn, LambColumn), which the Triton kernels read too. Differences such as
# 1 - dampening are formed here in double: 1 - float32(0.999) is 1.3e-5 off.
def lars_group_row(group) -> list:
    return [group["lr"], group["weight_decay"], group["trust_coefficient"], group["eps"], group["trust_clip"],
            group["trust_ratio"], group["momentum"], 1.0 - group["dampening"], group["nesterov"]]


def lamb_group_row(group) -> list:
    beta1, beta2 = group["betas"]
    return [group["lr"], beta1, beta2, 1.0 - beta2, 1.0 - beta1 if group["grad_averaging"] else 1.0,
            math.log(beta1) if beta1 > 0 else -math.inf, math.log(beta2) if beta2 > 0 else -math.inf,
            group["bias_correction"], group["eps"], group["weight_decay"], group["max_grad_norm"],
            group["trust_clip"], group["trust_ratio"]]


def operands(opt, merged, for_update: bool) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(params, grads in the params' layout, weights) of one launch. The weights are the
    fp32 masters where they exist, else the params; before the gate (``for_update``
    False) a master not created yet reads as the param."""
    params = flat(merged, "params")
    grads = [same_layout(g, p) for g, p in zip(flat(merged, "grads"), params)]
    if for_update:
        weights = [st.get("master_param", p) for p, st in zip(params, flat(merged, "states"))]
    else:
        weights = [w for b in merged for w in opt._weights_for_norm(b)]
    return params, grads, weights


def existing_buffers(merged) -> list[Tensor | None]:
    """Each parameter's momentum buffer, None where there is none (yet)."""
    return [st.get("momentum_buffer") if b.group["momentum"] != 0 else None for b in merged for st in b.states]


def lars_buffers(merged) -> tuple[list[Tensor | None], list[bool]]:
    """Each parameter's momentum buffer (None without momentum) and whether this is its
    first step; first-step buffers are created as zeros (the kernels write d into them)."""
    bufs, first = [], []
    for b in merged:
        for p, st in zip(b.params, b.states):
            if b.group["momentum"] == 0:
                bufs.append(None)
                first.append(False)
                continue
            first.append("momentum_buffer" not in st)
            if first[-1]:
                st["momentum_buffer"] = torch.zeros_like(p, dtype=b.compute_dtype, memory_format=torch.preserve_format)
            bufs.append(st["momentum_buffer"])
    return bufs, first


def lamb_moments(opt, merged) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """exp_avg, exp_avg_sq and step of each parameter; before the gate, state not
    created yet is the optimizer's fresh state (zeros at step 0), not stored."""
    exp_avgs, exp_avg_sqs, steps = [], [], []
    for b in merged:
        for p, st in zip(b.params, b.states):
            if "exp_avg" not in st:
                st = {}
                opt._new_state(p, st, b.group, b.compute_dtype)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
    return exp_avgs, exp_avg_sqs, steps


def check_state_layouts(merged, params, weights, keys: tuple[str, ...], extra=()) -> None:
    """check_layouts over each parameter's weights, the named state and ``extra`` lists."""
    states = flat(merged, "states")
    check_layouts([(name, p, [w, *(st.get(k) for k in keys), *(e[i] for e in extra)])
                   for i, (name, p, w, st) in enumerate(zip(names_of(merged), params, weights, states))])


# ----------------------------------------------------------------------------
# norms: one row of sums per tensor (each fused backend finalizes its chunk partials)

@functools.lru_cache(maxsize=32)
def _flags_on(flags: tuple[bool, ...], device: torch.device) -> Tensor:
    """A constant flag vector on the device, copied there once per value (a run repeats its
    layout at every step): no blocking host-to-device copy per step. Never written."""
    return torch.tensor(flags, dtype=torch.bool).to(device)


def _sharded_flags(launches, device: torch.device) -> Tensor:
    """Per tensor of every launch: whether its sums add up across ranks (see _sharded.reduce_sums)."""
    return _flags_on(tuple(s for merged in launches for s in flat(merged, "sharded")), device)


def reduce_partials(opt, contexts: list[Merged]) -> None:
    """Sharded parameters (FSDP2): make every launch's per-tensor sums global, in place,
    in one all-reduce for all launches."""
    from ..optim import _sharded

    device = contexts[0].partials.device
    total = _sharded.reduce_sums(torch.cat([c.partials for c in contexts]),
                                 _sharded_flags((c.buckets for c in contexts), device), opt._mesh)
    for c, part in zip(contexts, total.split([c.partials.shape[0] for c in contexts])):
        c.partials.copy_(part)


def global_grad_norm(opt, launches: list[tuple[list, Tensor]], device) -> Tensor:
    """||g|| over every gradient of the step from (merged, per-tensor sums) pairs whose
    column 1 holds sums of g^2; across ranks for sharded parameters (one all-reduce)."""
    if opt._mesh is None:
        squares = [sums[:, 1].double().sum().to(device) for _, sums in launches]
        return torch.stack(squares).sum().sqrt()
    from ..optim import _sharded

    sums = torch.cat([sums[:, 1].to(device) for _, sums in launches])
    flags = _sharded_flags((merged for merged, _ in launches), device)
    return _sharded.reduce_sums(sums, flags, opt._mesh).sum().sqrt()
