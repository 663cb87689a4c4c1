"""Bookkeeping shared by the fused optimizer backends (Triton, C++): grouping the
optimizer's buckets per launch, per-group hyper-parameter rows, layout checks.
Imports neither Triton nor the C++ extension."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Merged:
    """The optimizer buckets of one (device, dtype) across param groups, which one
    launch handles, and the chunk partials of its norms pass. Triton: also the norms
    pass's launch tables, which the update reuses when the step creates no state, and
    the tensors they point to (a gradient copied to the parameter's layout)."""

    buckets: list
    partials: Tensor
    launch: object = None
    keep_alive: object = None


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


def group_table(buckets, row_of, keep_tensors: bool = False) -> tuple[list[int], list[list]]:
    """Per-tensor group index, and one row of hyper-parameters (``row_of(group)``) per
    bucket: floats, or with ``keep_tensors`` tensors (a tensor lr) left as they are."""
    group_of, rows = [], []
    for gi, b in enumerate(buckets):
        rows.append([x if keep_tensors and isinstance(x, Tensor) else float(x) for x in row_of(b.group)])
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
# norms partials: one row per chunk (Triton, CUDA) or per tensor (C++ CPU)

def _row_layout(merged, chunk: int | None) -> tuple[Tensor, Tensor]:
    """How many partials rows each tensor of a launch has (ceil(numel / chunk), none for an
    empty tensor, which the launch skips; one each when ``chunk`` is None), and its first row."""
    numels = torch.tensor([p.numel() for p in flat(merged, "params")], dtype=torch.int64)
    counts = torch.ones_like(numels) if chunk is None else (numels + chunk - 1) // chunk
    return counts, counts.cumsum(0) - counts


def _sharded_flags(launches) -> Tensor:
    """Per tensor of every launch: whether its sums add up across ranks (see _sharded.reduce_sums)."""
    return torch.tensor([s for merged in launches for s in flat(merged, "sharded")], dtype=torch.bool)


def tensor_sums(partials: Tensor, merged, chunk: int | None) -> Tensor:
    """Per-tensor sums of a launch's partials rows, added in a fixed order (deterministic)."""
    if chunk is None:
        return partials
    counts, starts = _row_layout(merged, chunk)
    width = int(counts.max()) if counts.numel() else 0
    offsets = torch.arange(width)
    # a (tensor, row) gather; slots past a tensor's rows point at an appended zero row
    index = torch.where(offsets < counts[:, None], starts[:, None] + offsets, partials.shape[0])
    padded = torch.cat([partials, partials.new_zeros(1, partials.shape[1])])
    return padded[index.to(partials.device)].sum(dim=1)


def reduce_partials(opt, contexts: list[Merged], chunk: int | None) -> None:
    """Sharded parameters (FSDP2): make every launch's norms partials global, in one
    all-reduce for all launches. Each tensor's global sums go to its first row and its
    other rows become 0, so the update kernels, which add a tensor's rows, read them."""
    from ..optim import _sharded

    sums = [tensor_sums(c.partials, c.buckets, chunk) for c in contexts]
    total = _sharded.reduce_sums(torch.cat(sums), _sharded_flags(c.buckets for c in contexts), opt._mesh)
    for c, part in zip(contexts, total.split([s.shape[0] for s in sums])):
        counts, starts = _row_layout(c.buckets, chunk)
        c.partials.zero_()
        c.partials[starts[counts > 0].to(c.partials.device)] = part[counts > 0].to(c.partials)


def global_grad_norm(opt, launches: list[tuple[list, Tensor]], chunk: int | None, device) -> Tensor:
    """||g|| over every gradient of the step from (merged, partials) pairs whose column 1
    holds sums of g^2; across ranks for sharded parameters (one all-reduce)."""
    if opt._mesh is None:
        squares = [partials[:, 1].double().sum().to(device) for _, partials in launches]
        return torch.stack(squares).sum().sqrt()
    from ..optim import _sharded

    sums = torch.cat([tensor_sums(partials, merged, chunk)[:, 1] for merged, partials in launches])
    flags = _sharded_flags(merged for merged, _ in launches)
    return _sharded.reduce_sums(sums, flags, opt._mesh).sum().sqrt().to(device)
