"""Bookkeeping shared by the fused optimizer backends (Triton, C++): per-group
hyper-parameter rows, the operands and state of a launch (from the step's plan,
plan.py), layout checks, the cross-rank reduction of the norms. Imports neither Triton
nor the C++ extension."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _sharded, _tensors
from .launch import build_launch
from .layouts import LambColumn, LarsColumn, SumColumn, row_of
from .plan import LaunchPlan, StepPlan


@dataclass
class Merged:
    """One launch's plan (one (device, dtype) across param groups) and its norms pass's
    sums, one row per tensor. Triton: also the norms pass's launch tables, which the
    update reuses when the step creates no state, and the tensors they point to (a
    gradient copied to the parameter's layout)."""

    plan: LaunchPlan
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


def group_rows(groups: list[dict], device: torch.device, row_of) -> list[list]:
    """One row of hyper-parameters (``row_of(group)``) per param group of a launch on
    ``device``: floats, except a tensor (a tensor lr) on that device, which is left as it
    is for the drivers to copy on the device (set_group_rows): reading it as a float
    would synchronise with the device at every step. A tensor on another device (a CPU
    tensor lr with CUDA parameters) is read on the host instead: copying it to the device
    would be a copy from pageable memory, which blocks, and which a CUDA graph cannot
    capture (capturable=True refuses such an lr when the group is added)."""
    return [[x if isinstance(x, Tensor) and x.device == device else float(x) for x in row_of(group)]
            for group in groups]


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


def adapts(group) -> bool:
    """Whether a param group's tensors get a trust ratio (docs/contract.md, "Which parameters
    adapt"): its ``trust_ratio`` flag, and with ``adapt_only_decayed`` only where its
    weight decay is not 0 (timm ``Lars``/``Lamb``, apex ``FusedLAMB``, lightly). Read at
    every step, so a group whose decay is changed later follows."""
    return bool(group["trust_ratio"]) and (not group["adapt_only_decayed"] or group["weight_decay"] != 0)


# Group-table rows, one per param group, in the layouts of layouts.py (LarsColumn,
# LambColumn), which the Triton and C++ kernels read. Differences such as
# 1 - dampening are formed here in double: 1 - float32(0.999) is 1.3e-5 off.
def lars_group_row(group) -> list:
    return row_of(LarsColumn, {
        LarsColumn.LR: group["lr"], LarsColumn.WEIGHT_DECAY: group["weight_decay"],
        LarsColumn.TRUST_COEFFICIENT: group["trust_coefficient"], LarsColumn.EPS: group["eps"],
        LarsColumn.TRUST_CLIP: group["trust_clip"], LarsColumn.ADAPT: adapts(group),
        LarsColumn.MOMENTUM: group["momentum"], LarsColumn.ONE_MINUS_DAMPENING: 1.0 - group["dampening"],
        LarsColumn.NESTEROV: group["nesterov"], **lars_variant_columns(group)})


def lars_variant_columns(group) -> dict:
    """The LARS variants' columns (docs/contract.md, "LARS variants") as the kernels use
    them: the denominator's decay and the mode flags of a group that adapts (one that does
    not steps as the default, r = 1), the bounds as numbers."""
    adapt = adapts(group)
    denominator = group["ratio_denominator"]
    low, high = trust_bounds(group)
    return {LarsColumn.DENOMINATOR_DECAY: group["weight_decay"] if denominator == "sum_of_norms" else 0.0,
            LarsColumn.NORM_OF_SUM: adapt and denominator == "norm_of_sum",
            LarsColumn.AFTER_MOMENTUM: adapt and denominator == "momentum_update",
            LarsColumn.PLAIN_SGD: adapt and group["zero_norm"] == "plain_sgd",
            LarsColumn.RATIO_MIN: low, LarsColumn.RATIO_MAX: high, LarsColumn.LR_IN_MOMENTUM: group["lr_in_momentum"]}


def lamb_decays(group) -> tuple[float, float, float]:
    """(added to u, added to the gradient, applied to w directly): the group's weight decay
    in the place its ``decay_mode`` puts it, 0 in the others (docs/contract.md, "LAMB"). The
    one reading of decay_mode, for the Python backends and the kernels' group table alike."""
    decay, mode = group["weight_decay"], group["decay_mode"]
    return (decay if mode == "update" else 0.0, decay if mode == "l2" else 0.0, decay if mode == "direct" else 0.0)


def trust_bounds(group) -> tuple[float, float]:
    """``trust_bounds`` as (low, high); (0, inf), which bound no ratio, without."""
    bounds = group["trust_bounds"]
    return (0.0, math.inf) if bounds is None else (float(bounds[0]), float(bounds[1]))


def lamb_group_row(group) -> list:
    beta1, beta2 = group["betas"]
    update_decay, grad_decay, direct_decay = lamb_decays(group)
    trust_low, trust_high = trust_bounds(group)
    return row_of(LambColumn, {
        LambColumn.LR: group["lr"], LambColumn.BETA1: beta1, LambColumn.BETA2: beta2,
        LambColumn.ONE_MINUS_BETA2: 1.0 - beta2, LambColumn.BETA3: 1.0 - beta1 if group["grad_averaging"] else 1.0,
        LambColumn.LOG_BETA1: math.log(beta1) if beta1 > 0 else -math.inf,
        LambColumn.LOG_BETA2: math.log(beta2) if beta2 > 0 else -math.inf,
        LambColumn.BIAS_CORRECTION: group["bias_correction"], LambColumn.EPS: group["eps"],
        LambColumn.WEIGHT_DECAY: update_decay, LambColumn.MAX_GRAD_NORM: group["max_grad_norm"],
        LambColumn.TRUST_CLIP: group["trust_clip"], LambColumn.ADAPT: adapts(group),
        LambColumn.GRAD_DECAY: grad_decay, LambColumn.DIRECT_DECAY: direct_decay,
        LambColumn.EPS_INSIDE_SQRT: group["eps_inside_sqrt"],
        LambColumn.BIAS_CORRECTION_IN_LR: group["bias_correction_in_lr"],
        LambColumn.TRUST_LOW: trust_low, LambColumn.TRUST_HIGH: trust_high,
        LambColumn.GRAD_NORM_EPS: group["grad_norm_eps"]})


def operands(lp: LaunchPlan, for_update: bool) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(params, grads in the params' layout, weights) of one launch. The weights are the
    fp32 masters where they exist, else the params; before the gate (``for_update``
    False) a master not created yet reads as an fp32 copy of the param (weights_for_norm)."""
    params = lp.params
    grads = [same_layout(g, p) for g, p in zip(lp.grads, params)]
    if for_update:
        weights = [st.get("master_param", p) for p, st in zip(params, lp.states)]
    else:
        weights = _tensors.weights_for_norm(params, lp.states, lp.compute_dtype, lp.master_weights)
    return params, grads, weights


def momentum_buffers(lp: LaunchPlan) -> list[Tensor | None]:
    """Each parameter's LARS momentum buffer, None without momentum or before the
    optimizer created it (its first step; the kernels then write d into it: ``lp.first``)."""
    return [st.get("momentum_buffer") if lp.rows[gi][LarsColumn.MOMENTUM] != 0 else None
            for st, gi in zip(lp.states, lp.group_of)]


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
    return launch, (grads, weights)


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
    return launch, (grads, weights, moments)


def update_launch(plan: StepPlan, ctx: Merged, chunk_size: int, tables):
    """The update's tables (``tables``: lars_launch or lamb_launch): the norms pass's, unless
    this step created state (new buffers, moments or masters: new tables). With
    capturable, a state-creating step also builds the next step's norms tables, so that
    "one eager step, then capture" finds every table it needs."""
    if not plan.creating_state:
        return ctx.launch, ctx.keep_alive
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


def reduce_partials(plan: StepPlan, contexts: list[Merged]) -> None:
    """Sharded parameters (FSDP2): make every launch's per-tensor sums global, in place,
    in one all-reduce for all launches."""
    device = contexts[0].partials.device
    total = _sharded.reduce_sums(torch.cat([c.partials for c in contexts]),
                                 _sharded_flags((c.plan for c in contexts), device), plan.mesh)
    for c, part in zip(contexts, total.split([c.partials.shape[0] for c in contexts])):
        c.partials.copy_(part)


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
