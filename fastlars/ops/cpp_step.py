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


def _on_cuda(merged) -> bool:
    return merged[0].device.type == "cuda"


def _group_table(rows, merged):
    """The group rows as a table for the entry points: on the host, pinned for CUDA (the
    entry points copy it to the device asynchronously; a copy from pageable memory would
    block the host). A tensor lr on the parameters' device (tb.group_table keeps it) is
    copied into the table on the device, after the host rows: reading it as a float would
    synchronise with the device at every step."""
    host = torch.tensor([[0.0 if isinstance(x, torch.Tensor) else x for x in row] for row in rows],
                        dtype=torch.float64, pin_memory=_on_cuda(merged))
    on_device = [(i, j, x) for i, row in enumerate(rows) for j, x in enumerate(row) if isinstance(x, torch.Tensor)]
    if not on_device:
        return host
    table = host.to(merged[0].device, non_blocking=True)  # the entry points take it as it is
    for i, j, x in on_device:
        table[i, j].copy_(x.reshape(()))
    return table


def _sumsq(weights, grads):
    """(n, 2) per-tensor sums of w^2 and g^2."""
    return (_C.sumsq_cuda if grads[0].is_cuda else _C.sumsq_cpu)(weights, grads)


def lars_norms(opt, buckets, inv_scale):
    contexts = []
    for merged in tb.merge_buckets(buckets):
        params, grads, weights = tb.operands(opt, merged, for_update=False)
        tb.check_state_layouts(merged, params, weights, ("master_param", "momentum_buffer"))
        contexts.append(tb.Merged(merged, _sumsq(weights, grads)))
    if opt._mesh is not None:  # sharded parameters: global sums, one all-reduce
        tb.reduce_partials(opt, contexts)
    return contexts, [c.partials for c in contexts]


def lars_update(opt, contexts, inv_scale, ok, creating_state: bool) -> None:
    if ok is not None and not ok.is_cuda and not bool(ok):
        return
    for ctx in contexts:
        params, grads, weights = tb.operands(opt, ctx.buckets, for_update=True)
        bufs, first = tb.lars_buffers(ctx.buckets)
        group_of, rows = tb.group_table(ctx.buckets, tb.lars_group_row)
        groups = _group_table(rows, ctx.buckets)
        if _on_cuda(ctx.buckets):  # the entry point moves the device scalars to the parameters' device
            _C.lars_update_cuda(weights, params, grads, bufs, first, group_of, groups, ctx.partials, inv_scale, ok)
        else:
            _C.lars_update_cpu(weights, params, grads, bufs, first, group_of, groups, ctx.partials,
                               _scalar(inv_scale))


def _moments(opt, merged):
    """LAMB state (tb.lamb_moments) with the steps as floats on the CPU: host memory,
    read for free; on CUDA the kernels read the 0-d step tensors."""
    exp_avgs, exp_avg_sqs, steps = tb.lamb_moments(opt, merged)
    return exp_avgs, exp_avg_sqs, [s if s.is_cuda else float(s) for s in steps]


def lamb_norms(opt, buckets, inv_scale):
    prepared = []
    for merged in tb.merge_buckets(buckets):
        params, grads, weights = tb.operands(opt, merged, for_update=False)
        exp_avgs, exp_avg_sqs, steps = _moments(opt, merged)
        tb.check_state_layouts(merged, params, weights, ("master_param",), (exp_avgs, exp_avg_sqs))
        prepared.append((merged, weights, grads, exp_avgs, exp_avg_sqs, steps))
    global_norm = None  # no clipping
    if any(b.group["max_grad_norm"] > 0 for b in buckets):
        global_norm = tb.global_grad_norm(opt, [(merged, _sumsq(w, g)) for merged, w, g, *_ in prepared],
                                          buckets[0].device)
    contexts = []
    for merged, weights, grads, exp_avgs, exp_avg_sqs, steps in prepared:
        group_of, rows = tb.group_table(merged, tb.lamb_group_row)
        groups = _group_table(rows, merged)
        if _on_cuda(merged):  # the entry point moves the device scalars to the parameters' device
            sums = _C.lamb_norms_cuda(weights, grads, exp_avgs, exp_avg_sqs, steps, group_of, groups, inv_scale,
                                      global_norm)
        else:
            sums = _C.lamb_norms_cpu(weights, grads, exp_avgs, exp_avg_sqs, steps, group_of, groups,
                                     _scalar(inv_scale), _scalar_or(global_norm, -1.0))
        contexts.append(tb.Merged(merged, sums))
    if opt._mesh is not None:  # sharded parameters: global ||w||, ||g||, ||u||, one all-reduce
        tb.reduce_partials(opt, contexts)
    return (contexts, global_norm), [c.partials for c in contexts]


def lamb_update(opt, norms, inv_scale, ok, creating_state: bool) -> None:
    if ok is not None and not ok.is_cuda and not bool(ok):
        return
    contexts, global_norm = norms
    for ctx in contexts:
        params, grads, weights = tb.operands(opt, ctx.buckets, for_update=True)
        exp_avgs, exp_avg_sqs, steps = _moments(opt, ctx.buckets)
        group_of, rows = tb.group_table(ctx.buckets, tb.lamb_group_row)
        groups = _group_table(rows, ctx.buckets)
        if _on_cuda(ctx.buckets):  # the entry point moves the device scalars to the parameters' device
            _C.lamb_update_cuda(weights, params, grads, exp_avgs, exp_avg_sqs, steps, group_of, groups,
                                ctx.partials, inv_scale, global_norm, ok)
        else:
            _C.lamb_update_cpu(weights, params, grads, exp_avgs, exp_avg_sqs, steps, group_of, groups,
                               ctx.partials, _scalar(inv_scale), _scalar_or(global_norm, -1.0))
        # after the kernel, which used step + 1 as this update's t
        step_tensors = [st["step"] for st in tb.flat(ctx.buckets, "states")]
        torch._foreach_add_(step_tensors,
                            1.0 if ok is None or not ok.is_cuda else tb.scalar_on(ok, params[0].device, torch.float32))
