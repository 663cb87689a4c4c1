"""Fused multi-tensor LARS step in Triton: two launches per (device, dtype), whatever
the number of tensors or param groups.

    launch 1  sumsq_kernel        per chunk: sum w^2, sum g^2            reads w, g        8 B/elem
              (+ tensor_totals_kernel, per tensor: its chunks' sums, in a fixed order)
    launch 2  lars_update_kernel  per chunk: tensor norms -> r, update   reads w, g, buf;
                                                                      writes w, buf      20 B/elem

28 B per fp32 element against the floor of 20 B (docs/contract.md, "The floors") (the norms pass re-reads w
and g); see bench/NOTES.md. The maths is fastlars.optim.lars (reference backend),
written again here element-wise; tests hold the two together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tables as tb
from . import multi_tensor as mt
from .layouts import LarsColumn, SumColumn, constexprs

# the LARS group table's columns (layouts.py) as constexprs the kernels read by name
# (LR, WEIGHT_DECAY, ..., NESTEROV; NCOL, its width)
globals().update(constexprs(LarsColumn))



@triton.jit
def _lars_block(w_ptr, p_ptr, g_ptr, buf_ptr, idx, numel, first, ratio, inv_scale, lr, weight_decay, momentum,
                one_minus_dampening, nesterov, W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr,
                WRITE_P: tl.constexpr, MASKED: tl.constexpr):
    """The update of one block of elements (docs/contract.md, "LARS")."""
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
    w_ptr = mt.row_pointer(table, row, mt.COL_W, W_DTYPE, ALIGNED)
    p_ptr = mt.row_pointer(table, row, mt.COL_P, P_DTYPE, ALIGNED)
    g_ptr = mt.row_pointer(table, row, mt.COL_G, P_DTYPE, ALIGNED)
    buf_ptr = mt.row_pointer(table, row, mt.COL_S0, ACC, ALIGNED)

    hp = groups + group * NCOL
    lr = tl.load(hp + LR).to(ACC)
    weight_decay = tl.load(hp + WEIGHT_DECAY).to(ACC)
    eta = tl.load(hp + TRUST_COEFFICIENT).to(ACC)
    eps = tl.load(hp + EPS).to(ACC)
    trust_clip = tl.load(hp + TRUST_CLIP)
    adapt = tl.load(hp + ADAPT)
    momentum = tl.load(hp + MOMENTUM).to(ACC)
    one_minus_dampening = tl.load(hp + ONE_MINUS_DAMPENING).to(ACC)
    nesterov = tl.load(hp + NESTEROV)

    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.load(inv_scale_ptr).to(ACC)
    # whole-tensor norms: launch 1's per-tensor totals
    # (IEEE-rounded sqrt and division: the compiler's defaults flush subnormals, see mt.sqrt_ieee)
    w_norm = mt.sqrt_ieee(tl.load(totals + mt.SUM_NCOL * row + mt.SUM_W2), ACC)
    g_norm = mt.sqrt_ieee(tl.load(totals + mt.SUM_NCOL * row + mt.SUM_G2), ACC) * inv_scale

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


def lars_norms(plan, inv_scale):
    """Launch 1 for every (device, dtype): returns the context and the partials to check."""
    contexts = []
    for lp in plan.launches:
        launch, keep_alive = tb.lars_launch(plan, lp, False, mt.CHUNK)
        contexts.append(tb.Merged(lp, mt.launch_sumsq(launch), launch, keep_alive))
    if plan.mesh is not None:  # sharded parameters: global sums, one all-reduce
        tb.reduce_partials(plan, contexts)
    return contexts, [c.partials[:, :SumColumn.G2 + 1] for c in contexts]  # sums of w^2 and g^2


def lars_update(plan, contexts, inv_scale, ok) -> None:
    """Launch 2 for every (device, dtype)."""
    for ctx in contexts:
        launch, keep_alive = tb.update_launch(plan, ctx, mt.CHUNK, tb.lars_launch)  # alive until the kernel ran
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
