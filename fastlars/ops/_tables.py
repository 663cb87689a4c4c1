"""Bookkeeping shared by the fused optimizer backends (Triton, C++): the per-group
hyper-parameter rows on a launch's device, the operands and state of a launch (from the
step's plan, plan.py), layout checks, the cross-rank reduction of the norms. Imports
neither Triton nor the C++ extension, and reads no param group: the optimizers hand
their groups over as rows (fastlars/optim/_hyper.py)."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _sharded, _tensors
from .launch import build_launch
from .layouts import LambColumn, LarsColumn, SumColumn
from .plan import LaunchPlan, StepPlan


class Operands(NamedTuple):
    """What a launch's tables point to besides the parameters and the state the optimizer
    holds: the gradients in the parameters' layout (copies where they differ), the weights
    (fp32 masters, copies made before a master exists, or the parameters) and the state
    lists the kernels read (LAMB: exp_avg, exp_avg_sq, step lists; the CPU LARS kernels:
    the momentum buffers). Kept alive until the kernels ran."""

    grads: list[Tensor]
    weights: list[Tensor]
    moments: tuple | None = None


@dataclass
class Merged:
    """One launch's plan (one (device, dtype) across param groups) and its norms pass's
    per-tensor sums (``sums``, one row per tensor in the layout SumColumn). GPU: also the
    norms pass's launch tables, which the update reuses when the step creates no state,
    and the operands they point to."""

    plan: LaunchPlan
    sums: Tensor | None
    launch: object = None
    operands: Operands | None = None


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


def group_rows(rows: list[list], device: torch.device) -> list[list]:
    """The hyper-parameter rows of a launch's groups on ``device``: floats, except a tensor
    (a tensor lr) on that device, which is left as it is for the drivers to copy on the
    device (set_group_rows): reading it as a float would synchronise with the device at
    every step. A tensor on another device (a CPU tensor lr with CUDA parameters) is read
    on the host instead: copying it to the device would be a copy from pageable memory,
    which blocks, and which a CUDA graph cannot capture (capturable=True refuses such an
    lr when the group is added)."""
    return [[x if isinstance(x, Tensor) and x.device == device else float(x) for x in row] for row in rows]


def check_layouts(named) -> None:
    """The kernels walk storage linearly: every tensor of a parameter (weight, grad,
    state) must be dense and share the parameter's strides. ``named``: (name, param,
    others) per parameter, the name a callable (formed only for an error message)."""
    for name, p, others in named:
        if not _tensors.is_dense(p):
            raise ValueError(f"{name()} is not dense in memory (a strided view); the fused backends (triton, cuda, "
                             "cpu) walk storage linearly: use backend='foreach' for such tensors")
        stride = p.stride()
        for t in others:
            if t is not None and t.stride() != stride and t.numel():
                raise ValueError(f"{name()}: a gradient or state tensor has strides {t.stride()} but the "
                                 f"parameter has {stride}")


def same_layout(g: Tensor, p: Tensor) -> Tensor:
    """The gradient in the parameter's memory layout (a copy only when they differ)."""
    if g.stride() == p.stride() or p.numel() <= 1:
        return g
    out = torch.empty_like(p, dtype=g.dtype)
    out.copy_(g)
    return out


def operands(lp: LaunchPlan, for_update: bool) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(params, grads in the params' layout, weights) of one launch. The weights are the
    fp32 masters where they exist, else the params; before the gate (``for_update``
    False) a master not created yet reads as an fp32 copy of the param (weights_for_norm)."""
    params = lp.params
    return params, [same_layout(g, p) for g, p in zip(lp.grads, params)], weights_of(lp, for_update)


def weights_of(lp: LaunchPlan, for_update: bool) -> list[Tensor]:
    """The weights of operands(): the fp32 masters where they exist, else the params;
    before the gate a master not created yet reads as an fp32 copy of the param."""
    if for_update:
        return [st["master_param"] if _tensors.has_state(st, "master_param") else p
                for p, st in zip(lp.params, lp.states)]
    return _tensors.weights_for_norm(lp.params, lp.states, lp.compute_dtype, lp.master_weights)


def momentum_buffers(lp: LaunchPlan) -> list[Tensor | None]:
    """Each parameter's LARS momentum buffer, None without momentum or before the
    optimizer created it (its first step; the kernels then write d into it: ``lp.first``)."""
    return [_buffer(st) if lp.rows[gi][LarsColumn.MOMENTUM] != 0 else None for st, gi in zip(lp.states, lp.group_of)]


def _buffer(state) -> Tensor | None:
    """The state's momentum buffer; None where it has none (_tensors.has_state: an entry
    of None included)."""
    return state["momentum_buffer"] if _tensors.has_state(state, "momentum_buffer") else None


def lars_variants(lp: LaunchPlan) -> bool:
    """Whether some group of a LARS launch divides its ratio by ||x|| rather than ||g||, so
    that its norms pass sums x^2 too (csrc/fastlars_math.h, lars_denominator)."""
    return any(row[LarsColumn.NORM_OF_SUM] or row[LarsColumn.AFTER_MOMENTUM] for row in lp.rows)


def lamb_moments(states: list) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """exp_avg, exp_avg_sq and step of each parameter's LAMB state (``lp.states``, or
    before the gate ``lp.norm_states``, where a state not created yet is fresh zeros)."""
    return [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [st["step"] for st in states]


def clipping(plan: StepPlan) -> bool:
    """LAMB: whether some group clips by the global gradient norm (max_grad_norm > 0)."""
    return any(row[LambColumn.MAX_GRAD_NORM] > 0 for lp in plan.launches for row in lp.rows)


def check_state_layouts(lp: LaunchPlan, params, weights, keys: tuple[str, ...], extra=()) -> None:
    """check_layouts over each parameter's weights, the named state and ``extra`` lists."""
    check_layouts((functools.partial(name_of, lp, i), p, [w, *(st.get(k) for k in keys), *(e[i] for e in extra)])
                  for i, (p, w, st) in enumerate(zip(params, weights, lp.states)))


def names(lp: LaunchPlan) -> list[str]:
    """Each tensor of the launch as the user wrote it, for error messages."""
    return [name_of(lp, i) for i in range(len(lp.where))]


def name_of(lp: LaunchPlan, i: int) -> str:
    """Tensor ``i`` of the launch as the user wrote it."""
    gi, pos = lp.where[i]
    return f"param_groups[{gi}]['params'][{pos}]"


# ----------------------------------------------------------------------------
# launch tables, shared by the Triton and the CUDA kernels (launch.py caches them)

def lars_launch(plan: StepPlan, lp: LaunchPlan, for_update: bool, chunk_size: int):
    """LARS's tables: the norms pass's (before the gate; they hold the momentum buffers that
    exist, so that the update can reuse them), or the update's after this step created
    state. Returns the launch and the tensors it points to (alive until the kernels ran).
    FIRST marks the tensors whose buffer this step creates (the update sets it to d); in the
    norms tables, those whose buffer does not exist yet (their S0 is W: the norms pass of
    "momentum_update" must not read it), which is none in the next step's tables that a
    state-creating capturable step builds (update_launch)."""
    params, grads, weights = operands(lp, for_update)
    n = len(params)
    bufs = momentum_buffers(lp)
    validate = None
    if for_update:
        first = lp.first
    else:
        validate = lambda: check_state_layouts(lp, params, weights, ("master_param", "momentum_buffer"))
        first = [buf is None and lp.rows[gi][LarsColumn.MOMENTUM] != 0 for buf, gi in zip(bufs, lp.group_of)]
    launch = build_launch(weights, params, grads, bufs, [None] * n, [None] * n, lp.group_of,
                          first, lp.rows, lp.compute_dtype, plan.cache, chunk_size, validate)
    return launch, Operands(grads, weights)


def lamb_launch(plan: StepPlan, lp: LaunchPlan, for_update: bool, states: list, chunk_size: int):
    """LAMB's tables over ``states`` (``lp.norm_states`` before the gate, else ``lp.states``);
    returns the launch and the tensors it points to, as lars_launch."""
    params, grads, weights = operands(lp, for_update)
    moments = lamb_moments(states)
    validate = None
    if not for_update:
        validate = lambda: check_state_layouts(lp, params, weights, ("master_param",), moments[:2])
    launch = build_launch(weights, params, grads, *moments, lp.group_of, [False] * len(params), lp.rows,
                          lp.compute_dtype, plan.cache, chunk_size, validate)
    return launch, Operands(grads, weights, moments)


def update_launch(plan: StepPlan, ctx: Merged, chunk_size: int, tables):
    """The update's tables (``tables``: lars_launch or lamb_launch): the norms pass's, unless
    this step created state (new buffers, moments or masters: new tables). With
    capturable, a state-creating step also builds the next step's norms tables, so that
    "one eager step, then capture" finds every table it needs."""
    if not plan.creating_state:
        return ctx.launch, ctx.operands
    states = () if tables is lars_launch else (ctx.plan.states,)
    built = tables(plan, ctx.plan, True, *states, chunk_size)
    if plan.capturable:
        tables(plan, ctx.plan, False, *states, chunk_size)
    return built


# ----------------------------------------------------------------------------
# norms: one row of sums per tensor (each fused backend finalizes its chunk partials)

@functools.lru_cache(maxsize=32)
def _flags_on(flags: tuple[bool, ...], device: torch.device) -> Tensor:
    """A constant flag vector on the device, copied there once per value (a run repeats its
    layout at every step): no blocking host-to-device copy per step. Never written."""
    return torch.tensor(flags, dtype=torch.bool).to(device)


def _sharded_flags(launches, device: torch.device) -> Tensor:
    """Per tensor of every launch: whether its sums add up across ranks (see _sharded.reduce_sums)."""
    return _flags_on(tuple(s for lp in launches for s in lp.sharded), device)


def reduce_tensor_sums(plan: StepPlan, contexts: list[Merged]) -> None:
    """Sharded parameters (FSDP2): make every launch's per-tensor sums global, in place,
    in one all-reduce for all launches."""
    device = contexts[0].sums.device
    total = _sharded.reduce_sums(torch.cat([c.sums for c in contexts]),
                                 _sharded_flags((c.plan for c in contexts), device), plan.mesh)
    for c, part in zip(contexts, total.split([c.sums.shape[0] for c in contexts])):
        c.sums.copy_(part)


def one_launch_checks(plan: StepPlan) -> list[Tensor]:
    """What the gate checks before a one-launch step (one_launch=True), whose kernel writes
    each tensor as soon as that tensor's norms are known: nothing when GradScaler's
    found_inf decides the step (``plan.gate_known``), else each launch's gradient norms, a
    pre-read of every gradient (4 B per fp32 element). Refuses what one launch cannot step
    (before anything changes)."""
    if plan.mesh is not None:
        raise ValueError("one_launch=True cannot step sharded (FSDP2) parameters: a layer's norm needs every "
                         "rank's sums (an all-reduce) before its update can start")
    if plan.gate_known:
        return []
    return [torch.stack(torch._foreach_norm(lp.grads, 2, dtype=lp.compute_dtype)) for lp in plan.launches]


def global_grad_norm(plan: StepPlan, launches: list[tuple[LaunchPlan, Tensor]], device) -> Tensor:
    """||g|| over every gradient of the step from (merged, per-tensor sums) pairs (layout
    SumColumn); across ranks for sharded parameters (one all-reduce)."""
    if plan.mesh is None:
        squares = [sums[:, SumColumn.G2].double().sum().to(device) for _, sums in launches]
        return torch.stack(squares).sum().sqrt()
    sums = torch.cat([sums[:, SumColumn.G2].to(device) for _, sums in launches])
    flags = _sharded_flags((lp for lp, _ in launches), device)
    return _sharded.reduce_sums(sums, flags, plan.mesh).sum().sqrt()
