"""Drivers of the C++ kernels (csrc/, built as fastlars._C): the ``"cpu"`` and
``"cuda"`` backends.

Same two phases as every backend: a read-only norms call whose output the gate
checks, then the fused update. On the CPU the gate's flag is host memory, so reading
it costs nothing; on CUDA the scalars (inverse grad scale, global norm, skip flag) stay
on the device. The maths is csrc/fastlars_math.h, shared by both.
"""

from __future__ import annotations

import torch

from . import _tables as tb

from .. import _extension

# prebuilt, cached or compiled now; None: the backends report themselves unavailable
_C = _extension.load()


def available() -> bool:
    return _C is not None


def _scalar(t) -> float:
    return 1.0 if t is None else float(t)


def _scalar_or(t, default: float) -> float:
    return default if t is None else float(t)


def _on_cuda(lp) -> bool:
    return lp.device.type == "cuda"


def _group_table(lp):
    """The group rows as a table for the entry points: on the host, pinned for CUDA (the
    entry points copy it to the device asynchronously; a copy from pageable memory would
    block the host). A tensor lr on the parameters' device (tb.group_rows keeps it) is
    copied into the table on the device, after the host rows: reading it as a float would
    synchronise with the device at every step."""
    rows = lp.rows
    host = torch.tensor([[0.0 if isinstance(x, torch.Tensor) else x for x in row] for row in rows],
                        dtype=torch.float64, pin_memory=_on_cuda(lp))
    on_device = [(i, j, x) for i, row in enumerate(rows) for j, x in enumerate(row) if isinstance(x, torch.Tensor)]
    if not on_device:
        return host
    table = host.to(lp.device, non_blocking=True)  # the entry points take it as it is
    for i, j, x in on_device:
        table[i, j].copy_(x.reshape(()))
    return table


def _sumsq(weights, grads):
    """(n, 2) per-tensor sums of w^2 and g^2."""
    return (_C.sumsq_cuda if grads[0].is_cuda else _C.sumsq_cpu)(weights, grads)


def lars_norms(plan, inv_scale):
    contexts = []
    for lp in plan.launches:
        params, grads, weights = tb.operands(lp, for_update=False)
        tb.check_state_layouts(lp, params, weights, ("master_param", "momentum_buffer"))
        contexts.append(tb.Merged(lp, _sumsq(weights, grads)))
    if plan.mesh is not None:  # sharded parameters: global sums, one all-reduce
        tb.reduce_partials(plan, contexts)
    return contexts, [c.partials for c in contexts]


def lars_update(plan, contexts, inv_scale, ok) -> None:
    if ok is not None and not ok.is_cuda and not bool(ok):
        return
    for ctx in contexts:
        lp = ctx.plan
        params, grads, weights = tb.operands(lp, for_update=True)
        bufs, groups = tb.momentum_buffers(lp), _group_table(lp)
        if _on_cuda(lp):  # the entry point moves the device scalars to the parameters' device
            _C.lars_update_cuda(weights, params, grads, bufs, lp.first, lp.group_of, groups, ctx.partials, inv_scale,
                                ok)
        else:
            _C.lars_update_cpu(weights, params, grads, bufs, lp.first, lp.group_of, groups, ctx.partials,
                               _scalar(inv_scale))


def _moments(states):
    """LAMB state (tb.lamb_moments) with the steps as floats on the CPU: host memory,
    read for free; on CUDA the kernels read the 0-d step tensors."""
    exp_avgs, exp_avg_sqs, steps = tb.lamb_moments(states)
    return exp_avgs, exp_avg_sqs, [s if s.is_cuda else float(s) for s in steps]


def lamb_norms(plan, inv_scale):
    prepared = []
    for lp in plan.launches:
        params, grads, weights = tb.operands(lp, for_update=False)
        exp_avgs, exp_avg_sqs, steps = _moments(lp.norm_states)
        tb.check_state_layouts(lp, params, weights, ("master_param",), (exp_avgs, exp_avg_sqs))
        prepared.append((lp, weights, grads, exp_avgs, exp_avg_sqs, steps))
    global_norm = None  # no clipping
    if tb.clipping(plan):
        global_norm = tb.global_grad_norm(plan, [(lp, _sumsq(w, g)) for lp, w, g, *_ in prepared],
                                          plan.launches[0].device)
    contexts = []
    for lp, weights, grads, exp_avgs, exp_avg_sqs, steps in prepared:
        groups = _group_table(lp)
        if _on_cuda(lp):  # the entry point moves the device scalars to the parameters' device
            sums = _C.lamb_norms_cuda(weights, grads, exp_avgs, exp_avg_sqs, steps, lp.group_of, groups, inv_scale,
                                      global_norm)
        else:
            sums = _C.lamb_norms_cpu(weights, grads, exp_avgs, exp_avg_sqs, steps, lp.group_of, groups,
                                     _scalar(inv_scale), _scalar_or(global_norm, -1.0))
        contexts.append(tb.Merged(lp, sums))
    if plan.mesh is not None:  # sharded parameters: global ||w||, ||g||, ||u||, one all-reduce
        tb.reduce_partials(plan, contexts)
    return (contexts, global_norm), [c.partials for c in contexts]


def lamb_update(plan, norms, inv_scale, ok) -> None:
    if ok is not None and not ok.is_cuda and not bool(ok):
        return
    contexts, global_norm = norms
    for ctx in contexts:
        lp = ctx.plan
        params, grads, weights = tb.operands(lp, for_update=True)
        exp_avgs, exp_avg_sqs, steps = _moments(lp.states)
        groups = _group_table(lp)
        if _on_cuda(lp):  # the entry point moves the device scalars to the parameters' device
            _C.lamb_update_cuda(weights, params, grads, exp_avgs, exp_avg_sqs, steps, lp.group_of, groups,
                                ctx.partials, inv_scale, global_norm, ok)
        else:
            _C.lamb_update_cpu(weights, params, grads, exp_avgs, exp_avg_sqs, steps, lp.group_of, groups,
                               ctx.partials, _scalar(inv_scale), _scalar_or(global_norm, -1.0))
        # after the kernel, which used step + 1 as this update's t
        step_tensors = [st["step"] for st in lp.states]
        torch._foreach_add_(step_tensors,
                            1.0 if ok is None or not ok.is_cuda else tb.scalar_on(ok, params[0].device, torch.float32))
