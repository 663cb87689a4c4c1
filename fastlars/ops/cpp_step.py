"""Drivers of the C++ kernels (csrc/, built as fastlars._C): the ``"cpu"`` and
``"cuda"`` backends.

Same two phases as every backend: a read-only norms call whose output the gate
checks, then the fused update. On the CPU the kernels take tensor lists and a host
group table, and the gate's flag is host memory, so reading it costs nothing. The CPU
step is one pass over memory where the maths allows (csrc/cpu_kernels.cpp,
lars_step_cpu / lamb_step_cpu): the norms phase is then only the gate's read of the
gradients (their sums of squares, which the ratios and LAMB's clipping use too), or
nothing when GradScaler has decided; the update phase sums each cache-sized batch's
norms and updates it while it is in cache. Sharded parameters keep the two passes,
since their norms are reduced across ranks between them. On CUDA
the kernels read the launch tables the Triton kernels read (tb.lars_launch /
tb.lamb_launch: built once per layout, cached in the plan's LaunchCache, changed
hyper-parameters uploaded from pinned memory), and the scalars (inverse grad scale,
global norm, skip flag) stay on the device: no host copy, so the step can be captured
in a CUDA graph (capturable=True). The maths is csrc/fastlars_math.h, shared by both.
"""

from __future__ import annotations

import torch

from . import _tables as tb

from .. import _extension

# prebuilt, cached or compiled now; None: the backends report themselves unavailable
_C = _extension.load()

# Bytes of one cache-sized batch of the CPU step (0: the kernels' default, from the cache sizes;
# FASTLARS_CPU_BATCH_BYTES also sets it): a tensor larger than a batch is read twice
BATCH_BYTES = 0


def _one_pass(plan) -> bool:
    """Whether the CPU launches step in one pass: not where norms are reduced across ranks."""
    return plan.mesh is None


def _check_stopped(lp, stopped: int) -> None:
    """A one-pass step stops at the first tensor whose norms are not finite although every
    gradient was (the gate read them): its weights or state are not finite."""
    if stopped < 0:
        return
    group, position = lp.where[stopped]
    raise FloatingPointError(
        f"param_groups[{group}]['params'][{position}] (shape {tuple(lp.params[stopped].shape)}) has a finite "
        "gradient but a non-finite weight or optimizer state norm; the step stopped at it (tensors stepped "
        "before it in this step were updated), skipping cannot repair a non-finite weight")


def _scalar_or(t, default: float) -> float:
    """A step scalar (the inverse grad scale, the global norm) for the CPU kernels: host
    memory, read for free; ``default`` where the step has none."""
    return default if t is None else float(t)


def _check_layouts(lp, params, weights, keys, lists) -> None:
    """tb.check_state_layouts for the CPU kernels, in C++ over the lists they are handed
    (``lists``: the weights and the state the kernels read, one entry per parameter): the
    per-parameter Python check costs more host time than the kernels of small tensors. Where
    C++ finds a mismatch, the Python check names it."""
    bad = _C.first_layout_mismatch(params, lists)
    if bad < 0:
        return
    tb.check_state_layouts(lp, params, weights, keys, [lst for lst in lists if lst is not weights])
    raise ValueError(f"{tb.name_of(lp, bad)}: a weight or state tensor is not laid out as the parameter "
                     f"(strides {tuple(params[bad].stride())}); the fused backends walk storage linearly")


def _operands(lp, for_update: bool):
    """tb.operands with the gradients' layouts compared in C++: the gradient list as it is
    where every gradient has its parameter's strides (one call instead of a Python loop,
    the larger part of the step's host time on many small tensors), else tb.operands."""
    if _C.first_layout_mismatch(lp.params, [lp.grads]) >= 0:
        return tb.operands(lp, for_update)
    return lp.params, lp.grads, tb.weights_of(lp, for_update)


def _reused(plan, ctx) -> tb.Operands | None:
    """The norms phase's operands for the update, where this step created no state (new
    buffers, moments or masters change them), as the GPU drivers reuse their tables."""
    return None if plan.creating_state else ctx.operands


def _on_cuda(lp) -> bool:
    return lp.device.type == "cuda"


def _host_group_table(lp):
    """The CPU kernels' group table: the group rows on the host, a tensor lr (a CPU tensor:
    tb.group_rows keeps it) read into it."""
    return torch.tensor([[float(x) for x in row] for row in lp.rows], dtype=torch.float64)


def _sumsq_cuda(launch, operands, lp, lars_groups=None, inv_scale=None):
    """(n, SumColumn) per-tensor sums of w^2 and g^2 over a launch's tables; given the LARS
    group table, the sums of x^2 where a group's ratio divides by ||x||. The first weight
    and the first parameter give the entry point the tables' dtypes and device."""
    return _C.sumsq_cuda(launch.table, launch.chunks, operands.weights[0], lp.params[0], lars_groups, inv_scale)


def lars_norms(plan, inv_scale):
    contexts = []
    for lp in plan.launches:
        if _on_cuda(lp):  # the launch tables the Triton kernels read, cached (tb.lars_launch)
            launch, operands = tb.lars_launch(plan, lp, False, _C.chunk_elements)
            sums = _sumsq_cuda(launch, operands, lp, launch.groups if tb.lars_variants(lp) else None, inv_scale)
            contexts.append(tb.Merged(lp, sums, launch, operands))
            continue
        params, grads, weights = _operands(lp, for_update=False)
        buffers = tb.momentum_buffers(lp)
        _check_layouts(lp, params, weights, ("master_param",), [weights, buffers])
        operands = tb.Operands(grads, weights, buffers)
        if _one_pass(plan):  # the gate's read of the gradients, unless GradScaler decided
            contexts.append(tb.Merged(lp, None if plan.gate_known else _C.grad_sumsq_cpu(grads), operands=operands))
            continue
        contexts.append(tb.Merged(lp, _C.sumsq_cpu(weights, grads, buffers, lp.first, lp.group_of,
                                                   _host_group_table(lp), _scalar_or(inv_scale, 1.0)),
                                  operands=operands))
    if plan.mesh is not None:  # sharded parameters: global sums, one all-reduce
        tb.reduce_tensor_sums(plan, contexts)
    return contexts, [c.sums for c in contexts if c.sums is not None]


def lars_update(plan, contexts, inv_scale, ok) -> None:
    if ok is not None and not ok.is_cuda and not bool(ok):
        return
    for ctx in contexts:
        lp = ctx.plan
        if _on_cuda(lp):  # the entry point moves the device scalars to the parameters' device
            launch, operands = tb.update_launch(plan, ctx, _C.chunk_elements, tb.lars_launch)
            _C.lars_update_cuda(launch.table, launch.chunks, launch.groups, ctx.sums, operands.weights[0],
                                lp.params[0], inv_scale, ok)
            continue
        params, reused = lp.params, _reused(plan, ctx)
        if reused is not None:
            grads, weights, buffers = reused
        else:  # new state: buffers (or masters) made since the norms phase
            params, grads, weights = _operands(lp, for_update=True)
            buffers = tb.momentum_buffers(lp)
            _check_layouts(lp, params, weights, ("master_param",), [weights, buffers])
        if _one_pass(plan):
            ctx.sums, stopped = _C.lars_step_cpu(weights, params, grads, buffers, lp.first, lp.group_of,
                                                 _host_group_table(lp), ctx.sums, _scalar_or(inv_scale, 1.0),
                                                 BATCH_BYTES)
            _check_stopped(lp, stopped)
            continue
        _C.lars_update_cpu(weights, params, grads, buffers, lp.first, lp.group_of, _host_group_table(lp), ctx.sums,
                           _scalar_or(inv_scale, 1.0))


def _cpu_moments(states):
    """LAMB state (tb.lamb_moments): exp_avg and exp_avg_sq lists, the steps as floats (host
    memory, read for free) and the step tensors, which the update then counts on."""
    exp_avgs, exp_avg_sqs, steps = tb.lamb_moments(states)
    return exp_avgs, exp_avg_sqs, [float(s) for s in steps], steps


def lamb_norms(plan, inv_scale):
    prepared = []
    for lp in plan.launches:
        if _on_cuda(lp):  # the launch tables the Triton kernels read, cached (tb.lamb_launch)
            launch, operands = tb.lamb_launch(plan, lp, False, lp.norm_states, _C.chunk_elements)
            prepared.append((lp, launch, operands))
            continue
        params, grads, weights = _operands(lp, for_update=False)
        moments = _cpu_moments(lp.norm_states)
        _check_layouts(lp, params, weights, ("master_param",), [weights, *moments[:2]])
        prepared.append((lp, None, tb.Operands(grads, weights, moments)))
    one_pass = _one_pass(plan)
    # the one-pass CPU step's gate reads the gradients' sums, which clipping needs too
    grad_sums = {id(lp): _C.grad_sumsq_cpu(operands.grads) for lp, launch, operands in prepared
                 if launch is None and one_pass and (tb.clipping(plan) or not plan.gate_known)}
    global_norm = None  # no clipping
    if tb.clipping(plan):
        sums = [(lp, _sumsq_cuda(launch, operands, lp) if launch is not None else grad_sums[id(lp)] if one_pass
                 else _C.sumsq_cpu(operands.weights, operands.grads, [], [], [], None, 1.0))
                for lp, launch, operands in prepared]
        global_norm = tb.global_grad_norm(plan, sums, plan.launches[0].device)
    contexts = []
    for lp, launch, operands in prepared:
        if launch is None and one_pass:  # the update sums the norms, batch by batch
            contexts.append(tb.Merged(lp, grad_sums.get(id(lp)), operands=operands))
            continue
        if launch is not None:  # the entry point moves the device scalars to the parameters' device
            sums = _C.lamb_norms_cuda(launch.table, launch.chunks, launch.groups, operands.weights[0],
                                      lp.params[0], inv_scale, global_norm)
            contexts.append(tb.Merged(lp, sums, launch, operands))
            continue
        grads, weights, (exp_avgs, exp_avg_sqs, steps, _) = operands
        sums = _C.lamb_norms_cpu(weights, grads, exp_avgs, exp_avg_sqs, steps, lp.group_of, _host_group_table(lp),
                                 _scalar_or(inv_scale, 1.0), _scalar_or(global_norm, -1.0))
        contexts.append(tb.Merged(lp, sums, operands=operands))
    if plan.mesh is not None:  # sharded parameters: global ||w||, ||g||, ||u||, one all-reduce
        tb.reduce_tensor_sums(plan, contexts)
    return (contexts, global_norm), [c.sums for c in contexts if c.sums is not None]


def lamb_update(plan, norms, inv_scale, ok) -> None:
    if ok is not None and not ok.is_cuda and not bool(ok):
        return
    contexts, global_norm = norms
    for ctx in contexts:
        lp = ctx.plan
        if _on_cuda(lp):  # the entry point moves the device scalars to the parameters' device
            launch, operands = tb.update_launch(plan, ctx, _C.chunk_elements, tb.lamb_launch)
            _C.lamb_update_cuda(launch.table, launch.chunks, launch.groups, ctx.sums, operands.weights[0],
                                lp.params[0], inv_scale, global_norm, ok)
        else:
            params, reused = lp.params, _reused(plan, ctx)
            if reused is not None:
                grads, weights, (exp_avgs, exp_avg_sqs, steps, step_tensors) = reused
            else:  # new state: moments (or masters) made since the norms phase
                params, grads, weights = _operands(lp, for_update=True)
                exp_avgs, exp_avg_sqs, steps, step_tensors = _cpu_moments(lp.states)
                _check_layouts(lp, params, weights, ("master_param",), [weights, exp_avgs, exp_avg_sqs])
            scalars = (_scalar_or(inv_scale, 1.0), _scalar_or(global_norm, -1.0))
            if _one_pass(plan):
                ctx.sums, stopped = _C.lamb_step_cpu(weights, params, grads, exp_avgs, exp_avg_sqs, steps,
                                                     lp.group_of, _host_group_table(lp), ctx.sums, *scalars,
                                                     BATCH_BYTES)
                _check_stopped(lp, stopped)
            else:
                _C.lamb_update_cpu(weights, params, grads, exp_avgs, exp_avg_sqs, steps, lp.group_of,
                                   _host_group_table(lp), ctx.sums, *scalars)
            # after the kernel, which used step + 1 as this update's t; one call (torch's
            # foreach add dispatches one add per tensor on the CPU: 3 ms for 2,000 counters)
            _C.add_one_cpu(step_tensors)
            continue
        # after the kernel, which used step + 1 as this update's t
        torch._foreach_add_([st["step"] for st in lp.states],
                            1.0 if ok is None or not ok.is_cuda else tb.scalar_on(ok, lp.device, torch.float32))
