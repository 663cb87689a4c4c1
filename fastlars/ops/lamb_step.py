"""Fused multi-tensor LAMB step in Triton, per (device, dtype) whatever the number of
tensors or param groups:

    [launch 0  sumsq_kernel        only with max_grad_norm > 0: global ||g||     reads g              4 B/elem]
    launch 1   lamb_norms_kernel   per chunk: sum w^2, g^2, u^2 (u recomputed    reads w, g, m, v    16 B/elem
                                   in registers; nothing written but partials)
               (+ tensor_totals_kernel after launches 0 and 1, per tensor: its chunks' sums, fixed order)
    launch 2   lamb_update_kernel  per chunk: r = ||w||/||u||, update            reads w, g, m, v;
                                                                                 writes w, m, v      28 B/elem

44 B per fp32 element (48 with clipping) against the floor of 28 B (docs/contract.md, "The floors"); apex's
FusedLAMB moves 44+ in four launches. Launch 1 writes no state, so a non-finite
gradient is caught before anything changes. The maths is fastlars.optim.lamb
(reference backend), written again element-wise; tests hold the two together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tables as tb
from . import multi_tensor as mt
from .layouts import LambColumn, SumColumn, constexprs

# the LAMB group table's columns (layouts.py) as constexprs the kernels read by name
# (LR, BETA1, ..., ADAPT; NCOL, its width)
globals().update(constexprs(LambColumn))


@triton.jit
def _lamb_hyper(groups, group, global_norm_ptr, inv_scale_ptr, step_ptr, ACC: tl.constexpr,
                HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr):
    """This tensor's scalars: gradient factor (unscale, clip), bias corrections, ..."""
    hp = groups + group * NCOL
    beta1 = tl.load(hp + BETA1).to(ACC)
    beta2 = tl.load(hp + BETA2).to(ACC)
    one_minus_beta2 = tl.load(hp + ONE_MINUS_BETA2).to(ACC)
    beta3 = tl.load(hp + BETA3).to(ACC)
    eps = tl.load(hp + EPS).to(ACC)
    weight_decay = tl.load(hp + WEIGHT_DECAY).to(ACC)
    grad_factor = 1.0
    if HAS_SCALE:
        grad_factor = tl.load(inv_scale_ptr).to(tl.float64)
    if HAS_CLIP:
        # global norm over every gradient of the step (scaled grads: unscale it too)
        max_norm = tl.load(hp + MAX_GRAD_NORM)
        global_norm = tl.load(global_norm_ptr).to(tl.float64) * grad_factor
        clip = tl.where(max_norm > 0, 1.0 / tl.maximum(global_norm / max_norm, 1.0), 1.0)
        grad_factor = grad_factor * clip
    # 1 - beta^t in fp64 for the step t this update makes (state step + 1)
    t = tl.load(step_ptr).to(tl.float64) + 1.0
    bias_correction = tl.load(hp + BIAS_CORRECTION) != 0
    bc1 = tl.where(bias_correction, 1.0 - tl.exp(t * tl.load(hp + LOG_BETA1)), 1.0).to(ACC)
    bc2 = tl.where(bias_correction, 1.0 - tl.exp(t * tl.load(hp + LOG_BETA2)), 1.0).to(ACC)
    return grad_factor.to(ACC), beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay


@triton.jit
def _lamb_direction(w, g, m, v, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay,
                    ACC: tl.constexpr):
    """New moments and the update direction u (fastlars.optim.lamb, per element), with
    IEEE-rounded sqrt and division as torch computes them (mt.sqrt_ieee: a subnormal v
    would otherwise be flushed to 0)."""
    m = beta1 * m + beta3 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    u = mt.div_ieee(mt.div_ieee(m, bc1, ACC), mt.sqrt_ieee(mt.div_ieee(v, bc2, ACC), ACC) + eps, ACC) + weight_decay * w
    return m, v, u


@triton.jit
def _lamb_norms_block(w_ptr, g_ptr, m_ptr, v_ptr, idx, numel, acc_w, acc_g, acc_u, grad_factor, beta1, beta2,
                      one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, ACC: tl.constexpr, MASKED: tl.constexpr):
    w = mt.load_block(w_ptr, idx, numel, MASKED).to(ACC)
    g = mt.load_block(g_ptr, idx, numel, MASKED).to(ACC)
    m = mt.load_block(m_ptr, idx, numel, MASKED)
    v = mt.load_block(v_ptr, idx, numel, MASKED)
    _, _, u = _lamb_direction(w, g * grad_factor, m, v, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps,
                              weight_decay, ACC)
    if MASKED:
        u = tl.where(idx < numel, u, 0.0)
    return acc_w + w * w, acc_g + g * g, acc_u + u * u


@triton.jit
def lamb_norms_kernel(table, chunks, partials, groups, global_norm_ptr, inv_scale_ptr,
                      W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr,
                      HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    row, start, numel, group, _, _, _ = mt.this_chunk(table, chunks, False, CHUNK)
    w_ptr = mt.row_pointer(table, row, mt.COL_W, W_DTYPE, ALIGNED)
    g_ptr = mt.row_pointer(table, row, mt.COL_G, P_DTYPE, ALIGNED)
    m_ptr = mt.row_pointer(table, row, mt.COL_S0, ACC, ALIGNED)
    v_ptr = mt.row_pointer(table, row, mt.COL_S1, ACC, ALIGNED)
    step_ptr = mt.row_pointer(table, row, mt.COL_STEP, tl.float32, False)
    grad_factor, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay = _lamb_hyper(
        groups, group, global_norm_ptr, inv_scale_ptr, step_ptr, ACC, HAS_CLIP, HAS_SCALE)
    acc_w = tl.zeros([BLOCK], dtype=ACC)
    acc_g = tl.zeros([BLOCK], dtype=ACC)
    acc_u = tl.zeros([BLOCK], dtype=ACC)
    full, n = mt.full_blocks(start, numel, CHUNK, BLOCK)
    for offset in range(0, full, BLOCK):
        acc_w, acc_g, acc_u = _lamb_norms_block(w_ptr, g_ptr, m_ptr, v_ptr, start + offset + tl.arange(0, BLOCK),
                                                numel, acc_w, acc_g, acc_u, grad_factor, beta1, beta2,
                                                one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, ACC, False)
    if full < n:
        acc_w, acc_g, acc_u = _lamb_norms_block(w_ptr, g_ptr, m_ptr, v_ptr, start + full + tl.arange(0, BLOCK),
                                                numel, acc_w, acc_g, acc_u, grad_factor, beta1, beta2,
                                                one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, ACC, True)
    tl.store(partials + mt.SUM_NCOL * chunk + mt.SUM_W2, tl.sum(acc_w, axis=0))
    tl.store(partials + mt.SUM_NCOL * chunk + mt.SUM_G2, tl.sum(acc_g, axis=0))
    tl.store(partials + mt.SUM_NCOL * chunk + mt.SUM_U2, tl.sum(acc_u, axis=0))


@triton.jit
def _lamb_block(w_ptr, p_ptr, g_ptr, m_ptr, v_ptr, idx, numel, ratio, lr, grad_factor, beta1, beta2,
                one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr,
                ACC: tl.constexpr, WRITE_P: tl.constexpr, MASKED: tl.constexpr):
    """The update of one block of elements (docs/contract.md, "LAMB")."""
    w = mt.load_block(w_ptr, idx, numel, MASKED).to(ACC)
    g = mt.load_block(g_ptr, idx, numel, MASKED).to(ACC) * grad_factor
    m = mt.load_block(m_ptr, idx, numel, MASKED)
    v = mt.load_block(v_ptr, idx, numel, MASKED)
    m, v, u = _lamb_direction(w, g, m, v, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, ACC)
    mt.store_block(m_ptr, idx, m, numel, MASKED)
    mt.store_block(v_ptr, idx, v, numel, MASKED)
    w = w - lr * (ratio * u)
    mt.store_block(w_ptr, idx, mt.cast_rne(w, W_DTYPE), numel, MASKED)
    if WRITE_P:
        mt.store_block(p_ptr, idx, mt.cast_rne(w, P_DTYPE), numel, MASKED)


@triton.jit
def lamb_update_kernel(table, chunks, totals, groups, global_norm_ptr, inv_scale_ptr, ok_ptr,
                       W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr,
                       WRITE_P: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr,
                       HAS_OK: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, numel, group, _, _, _ = mt.this_chunk(table, chunks, True, CHUNK)
    w_ptr = mt.row_pointer(table, row, mt.COL_W, W_DTYPE, ALIGNED)
    p_ptr = mt.row_pointer(table, row, mt.COL_P, P_DTYPE, ALIGNED)
    g_ptr = mt.row_pointer(table, row, mt.COL_G, P_DTYPE, ALIGNED)
    m_ptr = mt.row_pointer(table, row, mt.COL_S0, ACC, ALIGNED)
    v_ptr = mt.row_pointer(table, row, mt.COL_S1, ACC, ALIGNED)
    step_ptr = mt.row_pointer(table, row, mt.COL_STEP, tl.float32, False)
    grad_factor, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay = _lamb_hyper(
        groups, group, global_norm_ptr, inv_scale_ptr, step_ptr, ACC, HAS_CLIP, HAS_SCALE)
    hp = groups + group * NCOL
    lr = tl.load(hp + LR).to(ACC)
    trust_clip = tl.load(hp + TRUST_CLIP)
    adapt = tl.load(hp + ADAPT)

    # trust ratio: fastlars.optim.lamb.lamb_trust_ratio, norms from launch 1's per-tensor totals
    # (IEEE-rounded sqrt and division: the compiler's defaults flush subnormals, see mt.sqrt_ieee)
    w_norm = mt.sqrt_ieee(tl.load(totals + mt.SUM_NCOL * row + mt.SUM_W2), ACC)
    u_norm = mt.sqrt_ieee(tl.load(totals + mt.SUM_NCOL * row + mt.SUM_U2), ACC)
    ratio = tl.where((w_norm > 0) & (u_norm > 0), mt.div_ieee(w_norm, tl.where(u_norm > 0, u_norm, 1.0), ACC), 1.0)
    ratio = tl.where(trust_clip != 0, tl.minimum(ratio, 1.0), ratio)
    ratio = tl.where(adapt != 0, ratio, 1.0)

    go = True
    if HAS_OK:  # skip on the device (skip_nonfinite / GradScaler): nothing loaded or stored
        go = tl.load(ok_ptr) != 0
    if go:
        full, n = mt.full_blocks(start, numel, CHUNK, BLOCK)
        for offset in range(0, full, BLOCK):
            _lamb_block(w_ptr, p_ptr, g_ptr, m_ptr, v_ptr, start + offset + tl.arange(0, BLOCK), numel, ratio, lr,
                        grad_factor, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, W_DTYPE,
                        P_DTYPE, ACC, WRITE_P, False)
        if full < n:
            _lamb_block(w_ptr, p_ptr, g_ptr, m_ptr, v_ptr, start + full + tl.arange(0, BLOCK), numel, ratio, lr,
                        grad_factor, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, W_DTYPE,
                        P_DTYPE, ACC, WRITE_P, True)


def _scalar_args(launch, global_norm, inv_scale):
    device, dummy = launch.groups.device, launch.groups
    return (tb.scalar_on(global_norm, device) if global_norm is not None else dummy,
            tb.scalar_on(inv_scale, device) if inv_scale is not None else dummy)


def lamb_norms(plan, inv_scale):
    """Launches 0 and 1 for every (device, dtype); returns the contexts and the partials to check."""
    prepared = [(lp, *tb.lamb_launch(plan, lp, False, lp.norm_states, mt.CHUNK)) for lp in plan.launches]
    global_norm = None
    if tb.clipping(plan):
        global_norm = tb.global_grad_norm(plan, [(lp, mt.launch_sumsq(launch)) for lp, launch, _ in prepared],
                                          plan.launches[0].device)
    contexts = []
    for lp, launch, keep_alive in prepared:
        partials = torch.empty(launch.n_chunks, len(SumColumn), dtype=launch.acc_dtype, device=launch.table.device)
        if launch.n_chunks:
            with tb.on_device(launch.table.device):
                lamb_norms_kernel[(launch.n_chunks,)](
                    launch.table, launch.chunks, partials, launch.groups, *_scalar_args(launch, global_norm, inv_scale),
                    W_DTYPE=mt.TL_DTYPES[launch.weights_dtype], P_DTYPE=mt.TL_DTYPES[launch.param_dtype],
                    ACC=mt.TL_DTYPES[launch.acc_dtype], HAS_CLIP=global_norm is not None,
                    HAS_SCALE=inv_scale is not None, ALIGNED=launch.aligned, CHUNK=mt.CHUNK, BLOCK=mt.BLOCK)
        contexts.append(tb.Merged(lp, mt.tensor_totals(launch, partials, SumColumn.U2 + 1), launch, keep_alive))
    if plan.mesh is not None:  # sharded parameters: global ||w||, ||g||, ||u||, one all-reduce
        tb.reduce_partials(plan, contexts)
    return (contexts, global_norm), [c.partials for c in contexts]


def lamb_update(plan, norms, inv_scale, ok) -> None:
    """Launch 2 for every (device, dtype), then the step counters."""
    contexts, global_norm = norms
    for ctx in contexts:
        # the norms pass's tables, unless this step created the moments or master weights;
        # `keep_alive` holds what new tables point to until the kernel has run
        launch, keep_alive = tb.update_launch(plan, ctx, mt.CHUNK, tb.lamb_launch)
        device = launch.table.device
        if launch.n_chunks:
            with tb.on_device(device):
                lamb_update_kernel[(launch.n_chunks,)](
                    launch.table, launch.chunks, ctx.partials, launch.groups,
                    *_scalar_args(launch, global_norm, inv_scale),
                    tb.scalar_on(ok, device, torch.int32) if ok is not None else launch.groups,
                    W_DTYPE=mt.TL_DTYPES[launch.weights_dtype], P_DTYPE=mt.TL_DTYPES[launch.param_dtype],
                    ACC=mt.TL_DTYPES[launch.acc_dtype], WRITE_P=launch.write_param,
                    HAS_CLIP=global_norm is not None, HAS_SCALE=inv_scale is not None, HAS_OK=ok is not None,
                    ALIGNED=launch.aligned, CHUNK=mt.CHUNK, BLOCK=mt.BLOCK)
        # after the kernel, which read step + 1 as this update's t
        steps = [st["step"] for st in ctx.plan.states]
        torch._foreach_add_(steps, 1.0 if ok is None else tb.scalar_on(ok, device, torch.float32))
