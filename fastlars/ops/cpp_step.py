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

try:
    from .. import _C
except ImportError:  # built without the extension: the backend reports itself unavailable
    _C = None


def available() -> bool:
    return _C is not None


def _prepare(opt, merged, for_update: bool):
    params = tb.flat(merged, "params")
    grads = [tb.same_layout(g, p) for g, p in zip(tb.flat(merged, "grads"), params)]
    if for_update:
        weights = [st.get("master_param", p) for p, st in zip(params, tb.flat(merged, "states"))]
    else:
        weights = [w for b in merged for w in opt._weights_for_norm(b)]
    return params, grads, weights


def _scalar(t) -> float:
    return 1.0 if t is None else float(t)


def _scalar_or(t, default: float) -> float:
    return default if t is None else float(t)


def _on_cuda(merged) -> bool:
    return merged[0].device.type == "cuda"


def _sumsq(weights, grads):
    """CPU: (n, 2) per-tensor sums; CUDA: (n_chunks, 2) partials, re-summed by the update."""
    return (_C.sumsq_cuda if grads[0].is_cuda else _C.sumsq_cpu)(weights, grads)


def lars_norms(opt, buckets, inv_scale):
    contexts = []
    for merged in tb.merge_buckets(buckets):
        params, grads, weights = _prepare(opt, merged, for_update=False)
        states = [[st.get(k) for k in ("master_param", "momentum_buffer")] for st in tb.flat(merged, "states")]
        tb.check_layouts([(n, p, [w, *s]) for n, p, w, s in zip(tb.names_of(merged), params, weights, states)])
        contexts.append(tb.Merged(merged, _sumsq(weights, grads)))
    return contexts, [c.partials for c in contexts]


def lars_update(opt, contexts, inv_scale, ok) -> None:
    if ok is not None and not ok.is_cuda and not bool(ok):
        return
    for ctx in contexts:
        params, grads, weights = _prepare(opt, ctx.buckets, for_update=True)
        bufs, first = [], []
        for b in ctx.buckets:
            for p, st in zip(b.params, b.states):
                if b.group["momentum"] == 0:
                    bufs.append(None)
                    first.append(False)
                    continue
                first.append("momentum_buffer" not in st)
                if first[-1]:
                    st["momentum_buffer"] = torch.zeros_like(p, dtype=b.compute_dtype,
                                                             memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
        group_of, rows = tb.group_table(ctx.buckets, tb.lars_group_row)
        groups = torch.tensor(rows, dtype=torch.float64)
        if _on_cuda(ctx.buckets):
            _C.lars_update_cuda(weights, params, grads, bufs, first, group_of, groups, ctx.partials, inv_scale, ok)
        else:
            _C.lars_update_cpu(weights, params, grads, bufs, first, group_of, groups, ctx.partials,
                               _scalar(inv_scale))


def _moments(merged, fresh_ok: bool):
    """exp_avg, exp_avg_sq and step of each parameter (steps as floats on the CPU, as
    the 0-d state tensors on CUDA); before the gate, zeros for state not created yet."""
    exp_avgs, exp_avg_sqs, steps = [], [], []
    for b in merged:
        for p, st in zip(b.params, b.states):
            if "exp_avg" in st:
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                step = st["step"]
            else:
                assert fresh_ok
                zeros = torch.zeros_like(p, dtype=b.compute_dtype, memory_format=torch.preserve_format)
                exp_avgs.append(zeros)
                exp_avg_sqs.append(zeros)
                step = torch.zeros((), dtype=torch.float32, device=p.device)
            steps.append(step if p.is_cuda else float(step))
    return exp_avgs, exp_avg_sqs, steps


def lamb_norms(opt, buckets, inv_scale):
    prepared = []
    for merged in tb.merge_buckets(buckets):
        params, grads, weights = _prepare(opt, merged, for_update=False)
        exp_avgs, exp_avg_sqs, steps = _moments(merged, fresh_ok=True)
        masters = [st.get("master_param") for st in tb.flat(merged, "states")]
        tb.check_layouts([(n, p, [w, m, v, s]) for n, p, w, m, v, s in
                          zip(tb.names_of(merged), params, weights, exp_avgs, exp_avg_sqs, masters)])
        prepared.append((merged, weights, grads, exp_avgs, exp_avg_sqs, steps))
    global_norm = None  # no clipping
    if any(b.group["max_grad_norm"] > 0 for b in buckets):
        device = buckets[0].device
        squares = [_sumsq(w, g)[:, 1].double().sum().to(device) for _, w, g, *_ in prepared]
        global_norm = torch.stack(squares).sum().sqrt()
    contexts = []
    for merged, weights, grads, exp_avgs, exp_avg_sqs, steps in prepared:
        group_of, rows = tb.group_table(merged, tb.lamb_group_row)
        groups = torch.tensor(rows, dtype=torch.float64)
        if _on_cuda(merged):
            sums = _C.lamb_norms_cuda(weights, grads, exp_avgs, exp_avg_sqs, steps, group_of, groups, inv_scale,
                                      global_norm)
        else:
            sums = _C.lamb_norms_cpu(weights, grads, exp_avgs, exp_avg_sqs, steps, group_of, groups,
                                     _scalar(inv_scale), _scalar_or(global_norm, -1.0))
        contexts.append(tb.Merged(merged, sums))
    return (contexts, global_norm), [c.partials for c in contexts]


def lamb_update(opt, norms, inv_scale, ok) -> None:
    if ok is not None and not ok.is_cuda and not bool(ok):
        return
    contexts, global_norm = norms
    for ctx in contexts:
        params, grads, weights = _prepare(opt, ctx.buckets, for_update=True)
        exp_avgs, exp_avg_sqs, steps = _moments(ctx.buckets, fresh_ok=False)
        group_of, rows = tb.group_table(ctx.buckets, tb.lamb_group_row)
        groups = torch.tensor(rows, dtype=torch.float64)
        if _on_cuda(ctx.buckets):
            _C.lamb_update_cuda(weights, params, grads, exp_avgs, exp_avg_sqs, steps, group_of, groups,
                                ctx.partials, inv_scale, global_norm, ok)
        else:
            _C.lamb_update_cpu(weights, params, grads, exp_avgs, exp_avg_sqs, steps, group_of, groups,
                               ctx.partials, _scalar(inv_scale), _scalar_or(global_norm, -1.0))
        # after the kernel, which used step + 1 as this update's t
        step_tensors = [st["step"] for st in tb.flat(ctx.buckets, "states")]
        torch._foreach_add_(step_tensors, 1.0 if ok is None or not ok.is_cuda else ok.to(torch.float32))
