"""Fused multi-tensor LARS step in Triton: two launches per (device, dtype), whatever
the number of tensors or param groups.

    launch 1  sumsq_kernel        per chunk: sum w^2, sum g^2            reads w, g        8 B/elem
              (+ tensor_totals_kernel, per tensor: its chunks' sums, in a fixed order)
    launch 2  lars_update_kernel  per chunk: tensor norms -> r, update   reads w, g, buf;
                                                                      writes w, buf      20 B/elem

28 B per fp32 element against SPEC.md's floor of 20 B (the norms pass re-reads w
and g); see bench/NOTES.md. The maths is fastlars.optim.lars (reference backend),
written again here element-wise; tests hold the two together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tables as tb
from . import multi_tensor as mt



@triton.jit
def _lars_block(w_ptr, p_ptr, g_ptr, buf_ptr, idx, numel, first, ratio, inv_scale, lr, weight_decay, momentum,
                one_minus_dampening, nesterov, W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr,
                WRITE_P: tl.constexpr, MASKED: tl.constexpr):
    """The update of one block of elements (SPEC.md, LARS)."""
    w = mt.load_block(w_ptr, idx, numel, MASKED).to(ACC)
    g = mt.load_block(g_ptr, idx, numel, MASKED).to(ACC) * inv_scale
    d = ratio * (g + weight_decay * w)
    if momentum != 0:
        buf = mt.load_block(buf_ptr, idx, numel, MASKED)
        buf = tl.where(first != 0, d, momentum * buf + one_minus_dampening * d)
        mt.store_block(buf_ptr, idx, buf, numel, MASKED)
        d = tl.where(nesterov != 0, d + momentum * buf, buf)
    w = w - lr * d
    mt.store_block(w_ptr, idx, mt.cast_rne(w, W_DTYPE), numel, MASKED)
    if WRITE_P:
        mt.store_block(p_ptr, idx, mt.cast_rne(w, P_DTYPE), numel, MASKED)


@triton.jit
def lars_update_kernel(table, chunks, totals, groups, ok_ptr, inv_scale_ptr,
                       W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr,
                       WRITE_P: tl.constexpr, HAS_OK: tl.constexpr, HAS_SCALE: tl.constexpr,
                       ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, numel, group, _, _, first = mt.this_chunk(table, chunks, True, CHUNK)
    w_ptr = mt.row_pointer(table, row, 0, W_DTYPE, ALIGNED)
    p_ptr = mt.row_pointer(table, row, 1, P_DTYPE, ALIGNED)
    g_ptr = mt.row_pointer(table, row, 2, P_DTYPE, ALIGNED)
    buf_ptr = mt.row_pointer(table, row, 3, ACC, ALIGNED)

    hp = groups + group * 9
    lr = tl.load(hp + 0).to(ACC)
    weight_decay = tl.load(hp + 1).to(ACC)
    eta = tl.load(hp + 2).to(ACC)
    eps = tl.load(hp + 3).to(ACC)
    trust_clip = tl.load(hp + 4)
    adapt = tl.load(hp + 5)
    momentum = tl.load(hp + 6).to(ACC)
    one_minus_dampening = tl.load(hp + 7).to(ACC)  # columns: csrc/fastlars_math.h, LarsColumn
    nesterov = tl.load(hp + 8)

    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.load(inv_scale_ptr).to(ACC)
    # whole-tensor norms: launch 1's per-tensor totals
    # (IEEE-rounded sqrt and division: the compiler's defaults flush subnormals, see mt.sqrt_ieee)
    w_norm = mt.sqrt_ieee(tl.load(totals + 3 * row), ACC)
    g_norm = mt.sqrt_ieee(tl.load(totals + 3 * row + 1), ACC) * inv_scale

    # trust ratio: fastlars.optim.lars.lars_trust_ratio
    ratio = mt.div_ieee(eta * w_norm, g_norm + weight_decay * w_norm + eps, ACC)
    ratio = tl.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
    clipped = tl.where(lr > 0, tl.minimum(mt.div_ieee(ratio, tl.where(lr > 0, lr, 1.0), ACC), 1.0), 1.0)
    ratio = tl.where(trust_clip != 0, clipped, ratio)
    ratio = tl.where(adapt != 0, ratio, 1.0)

    go = True
    if HAS_OK:  # skip on the device (skip_nonfinite / GradScaler): nothing loaded or stored
        go = tl.load(ok_ptr) != 0
    if go:
        full, n = mt.full_blocks(start, numel, CHUNK, BLOCK)
        for offset in range(0, full, BLOCK):
            _lars_block(w_ptr, p_ptr, g_ptr, buf_ptr, start + offset + tl.arange(0, BLOCK), numel, first, ratio,
                        inv_scale, lr, weight_decay, momentum, one_minus_dampening, nesterov, W_DTYPE, P_DTYPE, ACC,
                        WRITE_P, False)
        if full < n:
            _lars_block(w_ptr, p_ptr, g_ptr, buf_ptr, start + full + tl.arange(0, BLOCK), numel, first, ratio,
                        inv_scale, lr, weight_decay, momentum, one_minus_dampening, nesterov, W_DTYPE, P_DTYPE, ACC,
                        WRITE_P, True)


def _launch(opt, merged, params, grads, weights, bufs, first, validate=None):
    n = len(params)
    group_of, rows = tb.group_table(merged, tb.lars_group_row)
    return mt.build_launch(weights, params, grads, bufs, [None] * n, [None] * n, group_of, first, rows,
                           merged[0].compute_dtype, mt.launch_cache(opt), validate)


def _norms_launch(opt, merged):
    """Launch 1's tables, and the tensors they point to. They hold the momentum buffers
    already, so that the update can reuse them."""
    params, grads, weights = tb.operands(opt, merged, for_update=False)
    validate = lambda: tb.check_state_layouts(merged, params, weights, ("master_param", "momentum_buffer"))
    launch = _launch(opt, merged, params, grads, weights, tb.existing_buffers(merged), [False] * len(params),
                     validate)
    return launch, (grads, weights)


def lars_norms(opt, buckets, inv_scale):
    """Launch 1 for every (device, dtype): returns the context and the partials to check."""
    contexts = []
    for merged in tb.merge_buckets(buckets):
        launch, keep_alive = _norms_launch(opt, merged)
        contexts.append(tb.Merged(merged, mt.launch_sumsq(launch), launch, keep_alive))
    if opt._mesh is not None:  # sharded parameters: global sums, one all-reduce
        tb.reduce_partials(opt, contexts)
    return contexts, [c.partials[:, :2] for c in contexts]


def lars_update(opt, contexts, inv_scale, ok, creating_state: bool) -> None:
    """Launch 2 for every (device, dtype)."""
    for ctx in contexts:
        launch = ctx.launch
        if creating_state:  # new buffers or master weights: new tables (`grads` keeps their copies alive)
            params, grads, weights = tb.operands(opt, ctx.buckets, for_update=True)
            bufs, first = tb.lars_buffers(ctx.buckets)
            launch = _launch(opt, ctx.buckets, params, grads, weights, bufs, first)
            if opt.capturable:
                _norms_launch(opt, ctx.buckets)  # the next step's tables: "one eager step, then capture"
        if not launch.n_chunks:
            continue
        device = launch.table.device
        with tb.on_device(device):
            lars_update_kernel[(launch.n_chunks,)](
                launch.table, launch.chunks, ctx.partials, launch.groups,
                tb.scalar_on(ok, device, torch.int32) if ok is not None else launch.groups,
                tb.scalar_on(inv_scale, device) if inv_scale is not None else launch.groups,
                W_DTYPE=mt.TL_DTYPES[launch.weights_dtype], P_DTYPE=mt.TL_DTYPES[launch.param_dtype],
                ACC=mt.TL_DTYPES[launch.acc_dtype], WRITE_P=launch.write_param, HAS_OK=ok is not None,
                HAS_SCALE=inv_scale is not None, ALIGNED=launch.aligned, CHUNK=mt.CHUNK, BLOCK=mt.BLOCK)
