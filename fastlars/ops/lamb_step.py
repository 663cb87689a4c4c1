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
gradient is caught before anything changes. With one_launch=True, one launch instead
(lamb_one_launch_kernel), the gate deciding before it. The maths is fastlars.optim.lamb
(reference backend), written again element-wise; tests hold the two together.
"""

from __future__ import annotations

import enum

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
    """This tensor's scalars: gradient factor (unscale, clip), bias corrections, ..., the step
    scale (sqrt(bc2) / bc1 with bias_correction_in_lr, the corrections then 1; else 1)."""
    hp = groups + group * NCOL
    beta1 = tl.load(hp + BETA1).to(ACC)
    beta2 = tl.load(hp + BETA2).to(ACC)
    one_minus_beta2 = tl.load(hp + ONE_MINUS_BETA2).to(ACC)
    beta3 = tl.load(hp + BETA3).to(ACC)
    eps = tl.load(hp + EPS).to(ACC)
    weight_decay = tl.load(hp + WEIGHT_DECAY).to(ACC)
    grad_decay = tl.load(hp + GRAD_DECAY).to(ACC)
    eps_inside_sqrt = tl.load(hp + EPS_INSIDE_SQRT) != 0
    grad_factor = 1.0
    if HAS_SCALE:
        grad_factor = tl.load(inv_scale_ptr).to(tl.float64)
    if HAS_CLIP:
        # global norm over every gradient of the step (scaled grads: unscale it too)
        max_norm = tl.load(hp + MAX_GRAD_NORM)
        global_norm = tl.load(global_norm_ptr).to(tl.float64) * grad_factor
        global_norm = global_norm + tl.load(hp + GRAD_NORM_EPS)
        clip = tl.where(max_norm > 0, 1.0 / tl.maximum(global_norm / max_norm, 1.0), 1.0)
        grad_factor = grad_factor * clip
    # 1 - beta^t in fp64 for the step t this update makes (state step + 1)
    t = tl.load(step_ptr).to(tl.float64) + 1.0
    bias_correction = tl.load(hp + BIAS_CORRECTION) != 0
    bc1 = tl.where(bias_correction, 1.0 - tl.exp(t * tl.load(hp + LOG_BETA1)), 1.0)
    bc2 = tl.where(bias_correction, 1.0 - tl.exp(t * tl.load(hp + LOG_BETA2)), 1.0)
    in_lr = tl.load(hp + BIAS_CORRECTION_IN_LR) != 0  # fp64 sqrt and division are IEEE-rounded
    step_scale = tl.where(in_lr, tl.sqrt(bc2) / bc1, 1.0).to(ACC)
    bc1 = tl.where(in_lr, 1.0, bc1).to(ACC)
    bc2 = tl.where(in_lr, 1.0, bc2).to(ACC)
    return (grad_factor.to(ACC), beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, grad_decay,
            eps_inside_sqrt, step_scale)


class LambOption(enum.IntFlag):
    """What the groups of a launch use beyond the default step: the kernels' OPTIONS
    constexpr, so that each launch compiles only the element code some group needs (see
    lars_step.LarsOption). A launch of default groups has EPS_OUTSIDE_SQRT only."""

    GRAD_DECAY = 1        # decay_mode "l2": g + wd w (a select on the group's decay)
    DIRECT_DECAY = 2      # decay_mode "direct": w (1 - lr wd) (a select on the group's scale)
    EPS_OUTSIDE_SQRT = 4  # a group divides by sqrt(v_hat) + eps (the default)
    EPS_INSIDE_SQRT = 8   # a group divides by sqrt(v_hat + eps) (with the default: a select per group)


# as constexprs the kernels test: OPT_GRAD_DECAY, ...
globals().update({f"OPT_{o.name}": tl.constexpr(int(o)) for o in LambOption})


def lamb_options(rows) -> int:
    """The LambOption union of a launch's group rows (LambColumn)."""
    options = 0
    for row in rows:
        options |= ((LambOption.GRAD_DECAY if row[LambColumn.GRAD_DECAY] != 0 else 0)
                    | (LambOption.DIRECT_DECAY if row[LambColumn.DIRECT_DECAY] != 0 else 0)
                    | (LambOption.EPS_INSIDE_SQRT if row[LambColumn.EPS_INSIDE_SQRT] else LambOption.EPS_OUTSIDE_SQRT))
    return int(options)


@triton.jit
def _lamb_direction(w, g, m, v, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, grad_decay,
                    eps_inside_sqrt, ACC: tl.constexpr, OPTIONS: tl.constexpr):
    """New moments and the update direction u (fastlars.optim.lamb, per element), with
    IEEE-rounded sqrt and division as torch computes them (mt.sqrt_ieee: a subnormal v
    would otherwise be flushed to 0). decay_mode "l2" decays g first (a select, not
    + 0 * w: a non-finite w would poison g); eps_inside_sqrt: sqrt(v_hat + eps). Each
    variant is compiled in only where a group of the launch uses it (OPTIONS)."""
    if OPT_GRAD_DECAY & OPTIONS:
        g = tl.where(grad_decay != 0, g + grad_decay * w, g)
    m = beta1 * m + beta3 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    v_hat = mt.div_ieee(v, bc2, ACC)
    if OPT_EPS_INSIDE_SQRT & OPTIONS:
        if OPT_EPS_OUTSIDE_SQRT & OPTIONS:
            denom = tl.where(eps_inside_sqrt, mt.sqrt_ieee(v_hat + eps, ACC), mt.sqrt_ieee(v_hat, ACC) + eps)
        else:
            denom = mt.sqrt_ieee(v_hat + eps, ACC)
    else:
        denom = mt.sqrt_ieee(v_hat, ACC) + eps
    u = mt.div_ieee(mt.div_ieee(m, bc1, ACC), denom, ACC) + weight_decay * w
    return m, v, u


@triton.jit
def _lamb_norms_block(w_ptr, g_ptr, m_ptr, v_ptr, idx, numel, acc_w, acc_g, acc_u, grad_factor, beta1, beta2,
                      one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, grad_decay, eps_inside_sqrt,
                      ACC: tl.constexpr, OPTIONS: tl.constexpr, MASKED: tl.constexpr):
    w = mt.load_block(w_ptr, idx, numel, MASKED).to(ACC)
    g = mt.load_block(g_ptr, idx, numel, MASKED).to(ACC)
    m = mt.load_block(m_ptr, idx, numel, MASKED)
    v = mt.load_block(v_ptr, idx, numel, MASKED)
    _, _, u = _lamb_direction(w, g * grad_factor, m, v, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps,
                              weight_decay, grad_decay, eps_inside_sqrt, ACC, OPTIONS)
    if MASKED:
        u = tl.where(idx < numel, u, 0.0)
    return acc_w + w * w, acc_g + g * g, acc_u + u * u


@triton.jit
def lamb_norms_chunk(table, row, start, numel, group, groups, global_norm_ptr, inv_scale_ptr,
                     W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_CLIP: tl.constexpr,
                     HAS_SCALE: tl.constexpr, OPTIONS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK: tl.constexpr):
    """(sum w^2, sum g^2, sum u^2) over one chunk of tensor ``row``; writes nothing."""
    w_ptr = mt.row_pointer(table, row, mt.COL_W, W_DTYPE, ALIGNED)
    g_ptr = mt.row_pointer(table, row, mt.COL_G, P_DTYPE, ALIGNED)
    m_ptr = mt.row_pointer(table, row, mt.COL_S0, ACC, ALIGNED)
    v_ptr = mt.row_pointer(table, row, mt.COL_S1, ACC, ALIGNED)
    step_ptr = mt.row_pointer(table, row, mt.COL_STEP, tl.float32, False)
    grad_factor, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, grad_decay, eps_inside_sqrt, _ = \
        _lamb_hyper(groups, group, global_norm_ptr, inv_scale_ptr, step_ptr, ACC, HAS_CLIP, HAS_SCALE)
    acc_w = tl.zeros([BLOCK], dtype=ACC)
    acc_g = tl.zeros([BLOCK], dtype=ACC)
    acc_u = tl.zeros([BLOCK], dtype=ACC)
    full, n = mt.full_blocks(start, numel, CHUNK, BLOCK)
    for offset in range(0, full, BLOCK):
        acc_w, acc_g, acc_u = _lamb_norms_block(w_ptr, g_ptr, m_ptr, v_ptr, start + offset + tl.arange(0, BLOCK),
                                                numel, acc_w, acc_g, acc_u, grad_factor, beta1, beta2,
                                                one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, grad_decay,
                                                eps_inside_sqrt, ACC, OPTIONS, False)
    if full < n:
        acc_w, acc_g, acc_u = _lamb_norms_block(w_ptr, g_ptr, m_ptr, v_ptr, start + full + tl.arange(0, BLOCK),
                                                numel, acc_w, acc_g, acc_u, grad_factor, beta1, beta2,
                                                one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, grad_decay,
                                                eps_inside_sqrt, ACC, OPTIONS, True)
    return tl.sum(acc_w, axis=0), tl.sum(acc_g, axis=0), tl.sum(acc_u, axis=0)


@triton.jit
def lamb_norms_kernel(table, chunks, partials, groups, global_norm_ptr, inv_scale_ptr,
                      W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr,
                      HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, OPTIONS: tl.constexpr, ALIGNED: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    row, start, numel, group, _, _, _ = mt.this_chunk(table, chunks, False, CHUNK)
    sum_w, sum_g, sum_u = lamb_norms_chunk(table, row, start, numel, group, groups, global_norm_ptr, inv_scale_ptr,
                                           W_DTYPE, P_DTYPE, ACC, HAS_CLIP, HAS_SCALE, OPTIONS, ALIGNED, CHUNK, BLOCK)
    mt.store_sums(partials, chunk, sum_w, sum_g, sum_u)


@triton.jit
def _lamb_block(w_ptr, p_ptr, g_ptr, m_ptr, v_ptr, idx, numel, ratio, lr, weight_scale, grad_factor, beta1, beta2,
                one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, grad_decay, eps_inside_sqrt,
                W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr, WRITE_P: tl.constexpr,
                OPTIONS: tl.constexpr, MASKED: tl.constexpr):
    """The update of one block of elements (docs/contract.md, "LAMB"); weight_scale: 1 - lr wd
    in decay_mode "direct", else 1."""
    w = mt.load_block(w_ptr, idx, numel, MASKED).to(ACC)
    g = mt.load_block(g_ptr, idx, numel, MASKED).to(ACC) * grad_factor
    m = mt.load_block(m_ptr, idx, numel, MASKED)
    v = mt.load_block(v_ptr, idx, numel, MASKED)
    m, v, u = _lamb_direction(w, g, m, v, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay,
                              grad_decay, eps_inside_sqrt, ACC, OPTIONS)
    mt.store_block(m_ptr, idx, m, numel, MASKED)
    mt.store_block(v_ptr, idx, v, numel, MASKED)
    if OPT_DIRECT_DECAY & OPTIONS:
        # a select, not w * 1: the default step stays w - lr (r u), which the compiler would
        # otherwise contract with the scaling into an fma of another rounding
        w = tl.where(weight_scale != 1.0, w * weight_scale, w)
    w = w - lr * (ratio * u)
    mt.store_block(w_ptr, idx, mt.cast_rne(w, W_DTYPE), numel, MASKED)
    if WRITE_P:
        mt.store_block(p_ptr, idx, mt.cast_rne(w, P_DTYPE), numel, MASKED)


@triton.jit
def lamb_update_chunk(table, row, start, numel, group, totals, groups, global_norm_ptr, inv_scale_ptr, go,
                      W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr, WRITE_P: tl.constexpr,
                      HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, OPTIONS: tl.constexpr,
                      ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The update of one chunk of tensor ``row`` from its norms (``totals``); nothing loaded
    or stored unless ``go``."""
    w_ptr = mt.row_pointer(table, row, mt.COL_W, W_DTYPE, ALIGNED)
    p_ptr = mt.row_pointer(table, row, mt.COL_P, P_DTYPE, ALIGNED)
    g_ptr = mt.row_pointer(table, row, mt.COL_G, P_DTYPE, ALIGNED)
    m_ptr = mt.row_pointer(table, row, mt.COL_S0, ACC, ALIGNED)
    v_ptr = mt.row_pointer(table, row, mt.COL_S1, ACC, ALIGNED)
    step_ptr = mt.row_pointer(table, row, mt.COL_STEP, tl.float32, False)
    (grad_factor, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, grad_decay, eps_inside_sqrt,
     step_scale) = _lamb_hyper(groups, group, global_norm_ptr, inv_scale_ptr, step_ptr, ACC, HAS_CLIP, HAS_SCALE)
    hp = groups + group * NCOL
    lr = tl.load(hp + LR).to(ACC)
    trust_clip = tl.load(hp + TRUST_CLIP)
    adapt = tl.load(hp + ADAPT)
    # decay_mode "direct": w (1 - lr wd), formed in fp64; ||w (1 - lr wd)|| = |1 - lr wd| ||w||
    weight_scale = 1.0 - tl.load(hp + LR) * tl.load(hp + DIRECT_DECAY)
    norm_scale = tl.abs(weight_scale).to(ACC)
    weight_scale = weight_scale.to(ACC)

    # trust ratio: fastlars.optim.lamb.lamb_trust_ratio, norms from the per-tensor totals
    # (IEEE-rounded sqrt and division: the compiler's defaults flush subnormals, see mt.sqrt_ieee)
    w_norm = mt.sqrt_ieee(tl.load(totals + mt.SUM_NCOL * row + mt.SUM_W2), ACC) * norm_scale
    u_norm = mt.sqrt_ieee(tl.load(totals + mt.SUM_NCOL * row + mt.SUM_U2), ACC)
    computed = (w_norm > 0) & (u_norm > 0)
    ratio = tl.where(computed, mt.div_ieee(w_norm, tl.where(u_norm > 0, u_norm, 1.0), ACC), 1.0)
    ratio = tl.where(trust_clip != 0, tl.minimum(ratio, 1.0), ratio)
    bounded = tl.minimum(tl.maximum(ratio, tl.load(hp + TRUST_LOW).to(ACC)), tl.load(hp + TRUST_HIGH).to(ACC))
    ratio = tl.where(computed, bounded, ratio)  # trust_bounds: a computed ratio only
    ratio = tl.where(adapt != 0, ratio, 1.0) * step_scale

    if go:
        full, n = mt.full_blocks(start, numel, CHUNK, BLOCK)
        for offset in range(0, full, BLOCK):
            _lamb_block(w_ptr, p_ptr, g_ptr, m_ptr, v_ptr, start + offset + tl.arange(0, BLOCK), numel, ratio, lr,
                        weight_scale, grad_factor, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay,
                        grad_decay, eps_inside_sqrt, W_DTYPE, P_DTYPE, ACC, WRITE_P, OPTIONS, False)
        if full < n:
            _lamb_block(w_ptr, p_ptr, g_ptr, m_ptr, v_ptr, start + full + tl.arange(0, BLOCK), numel, ratio, lr,
                        weight_scale, grad_factor, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay,
                        grad_decay, eps_inside_sqrt, W_DTYPE, P_DTYPE, ACC, WRITE_P, OPTIONS, True)


@triton.jit
def lamb_update_kernel(table, chunks, totals, groups, global_norm_ptr, inv_scale_ptr, ok_ptr,
                       W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr,
                       WRITE_P: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr,
                       HAS_OK: tl.constexpr, OPTIONS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK: tl.constexpr):
    row, start, numel, group, _, _, _ = mt.this_chunk(table, chunks, True, CHUNK)
    lamb_update_chunk(table, row, start, numel, group, totals, groups, global_norm_ptr, inv_scale_ptr,
                      mt.step_ok(ok_ptr, HAS_OK), W_DTYPE, P_DTYPE, ACC, WRITE_P, HAS_CLIP, HAS_SCALE, OPTIONS,
                      ALIGNED, CHUNK, BLOCK)


@triton.jit
def _lamb_item(chunk, is_update, table, chunks, partials, totals, counters, groups, inv_scale_ptr, ok_ptr,
               W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr, WRITE_P: tl.constexpr,
               HAS_SCALE: tl.constexpr, HAS_OK: tl.constexpr, OPTIONS: tl.constexpr, ALIGNED: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr, PARTIAL_BLOCK: tl.constexpr):
    """One work item of lamb_one_launch_kernel: a chunk's norms, or its update."""
    row, start, numel, group, chunk0, n_chunks, _ = mt.chunk_at(table, chunks, chunk, CHUNK)
    if is_update:
        go = mt.update_goes(counters, totals, row, n_chunks, ok_ptr, HAS_OK)
        lamb_update_chunk(table, row, start, numel, group, totals, groups, groups, inv_scale_ptr, go, W_DTYPE,
                          P_DTYPE, ACC, WRITE_P, False, HAS_SCALE, OPTIONS, ALIGNED, CHUNK, BLOCK)
    else:
        sum_w, sum_g, sum_u = lamb_norms_chunk(table, row, start, numel, group, groups, groups, inv_scale_ptr,
                                               W_DTYPE, P_DTYPE, ACC, False, HAS_SCALE, OPTIONS, ALIGNED, CHUNK,
                                               BLOCK)
        mt.store_sums(partials, chunk, sum_w, sum_g, sum_u)
        mt.norm_item_done(partials, totals, counters, row, chunk0, n_chunks, mt.ALL_SUM_COLUMNS, ACC, PARTIAL_BLOCK)


@triton.jit(do_not_specialize=["n_items"])  # one binary whatever the item count's divisibility
def lamb_one_launch_kernel(table, chunks, partials, totals, counters, groups, inv_scale_ptr, ok_ptr, n_items,
                           W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr, WRITE_P: tl.constexpr,
                           HAS_SCALE: tl.constexpr, HAS_OK: tl.constexpr, OPTIONS: tl.constexpr,
                           ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                           PARTIAL_BLOCK: tl.constexpr):
    """The LAMB step in one launch (one_launch=True; see lars_step.lars_one_launch_kernel):
    a norm item sums w^2, g^2, u^2 of its chunk (as lamb_norms_kernel), an update item
    waits for its tensor's totals and updates its chunk (as lamb_update_kernel). No
    clipping: its factor needs every gradient's norm before any update."""
    item = mt.next_ticket(counters)
    while item < n_items:
        chunk, is_update = mt.item_chunk(item, table, chunks)
        _lamb_item(chunk, is_update, table, chunks, partials, totals, counters, groups, inv_scale_ptr, ok_ptr,
                   W_DTYPE, P_DTYPE, ACC, WRITE_P, HAS_SCALE, HAS_OK, OPTIONS, ALIGNED, CHUNK, BLOCK, PARTIAL_BLOCK)
        item = mt.next_ticket(counters)


def _scalar_args(launch, global_norm, inv_scale):
    device, dummy = launch.groups.device, launch.groups
    return (tb.scalar_on(global_norm, device) if global_norm is not None else dummy,
            tb.scalar_on(inv_scale, device) if inv_scale is not None else dummy)


def lamb_norms(plan, inv_scale):
    """Launches 0 and 1 for every (device, dtype); returns the contexts and the partials to
    check. With one_launch, the tables and the gate's pre-read only (tb.one_launch_checks)."""
    if plan.one_launch:
        if tb.clipping(plan):
            raise ValueError("one_launch=True cannot be combined with max_grad_norm > 0: the clip factor needs the "
                             "global gradient norm before any tensor is updated")
        checks = tb.one_launch_checks(plan)
    prepared = [(lp, *tb.lamb_launch(plan, lp, False, lp.norm_states, mt.chunk_size(plan))) for lp in plan.launches]
    if plan.one_launch:  # the sums are formed by the update's launch (lamb_one_launch_kernel)
        contexts = [tb.Merged(lp, torch.zeros(launch.n_tensors, len(SumColumn), dtype=launch.acc_dtype,
                                              device=launch.table.device), launch, operands)
                    for lp, launch, operands in prepared]
        return (contexts, None), checks
    global_norm = None
    if tb.clipping(plan):
        global_norm = tb.global_grad_norm(plan, [(lp, mt.launch_sumsq(launch)) for lp, launch, _ in prepared],
                                          plan.launches[0].device)
    contexts = []
    for lp, launch, operands in prepared:
        partials = torch.empty(launch.n_chunks, len(SumColumn), dtype=launch.acc_dtype, device=launch.table.device)
        if launch.n_chunks:
            with tb.on_device(launch.table.device):
                lamb_norms_kernel[(launch.n_chunks,)](
                    launch.table, launch.chunks, partials, launch.groups, *_scalar_args(launch, global_norm, inv_scale),
                    W_DTYPE=mt.TL_DTYPES[launch.weights_dtype], P_DTYPE=mt.TL_DTYPES[launch.param_dtype],
                    ACC=mt.TL_DTYPES[launch.acc_dtype], HAS_CLIP=global_norm is not None,
                    HAS_SCALE=inv_scale is not None, OPTIONS=lamb_options(lp.rows), ALIGNED=launch.aligned,
                    CHUNK=mt.CHUNK, BLOCK=mt.BLOCK)
        contexts.append(tb.Merged(lp, mt.tensor_totals(launch, partials, SumColumn.U2 + 1), launch, operands))
    if plan.mesh is not None:  # sharded parameters: global ||w||, ||g||, ||u||, one all-reduce
        tb.reduce_tensor_sums(plan, contexts)
    return (contexts, global_norm), [c.sums for c in contexts]


def lamb_update(plan, norms, inv_scale, ok) -> None:
    """Launch 2 for every (device, dtype) (with one_launch, the whole step's one launch),
    then the step counters."""
    contexts, global_norm = norms
    for ctx in contexts:
        # the norms pass's tables, unless this step created the moments or master weights;
        # `operands` holds what new tables point to until the kernel has run
        chunk = mt.chunk_size(plan)
        launch, operands = tb.update_launch(plan, ctx, chunk, tb.lamb_launch)
        device = launch.table.device
        if launch.n_chunks:
            global_norm_arg, inv_scale_arg = _scalar_args(launch, global_norm, inv_scale)
            ok_arg = tb.scalar_on(ok, device, torch.int32) if ok is not None else launch.groups
            flags = dict(W_DTYPE=mt.TL_DTYPES[launch.weights_dtype], P_DTYPE=mt.TL_DTYPES[launch.param_dtype],
                         ACC=mt.TL_DTYPES[launch.acc_dtype], WRITE_P=launch.write_param,
                         HAS_SCALE=inv_scale is not None, HAS_OK=ok is not None, OPTIONS=lamb_options(ctx.plan.rows),
                         ALIGNED=launch.aligned, CHUNK=chunk, BLOCK=mt.BLOCK)
            with tb.on_device(device):
                if plan.one_launch:
                    partials, counters = mt.item_buffers(launch)
                    lamb_one_launch_kernel[(mt.one_launch_grid(launch),)](
                        launch.table, launch.chunks, partials, ctx.sums, counters, launch.groups, inv_scale_arg,
                        ok_arg, 2 * launch.n_chunks, **flags, PARTIAL_BLOCK=mt.PARTIAL_BLOCK)
                else:
                    lamb_update_kernel[(launch.n_chunks,)](
                        launch.table, launch.chunks, ctx.sums, launch.groups, global_norm_arg, inv_scale_arg,
                        ok_arg, **flags, HAS_CLIP=global_norm is not None)
        # after the kernel, which read step + 1 as this update's t
        steps = [st["step"] for st in ctx.plan.states]
        torch._foreach_add_(steps, 1.0 if ok is None else tb.scalar_on(ok, device, torch.float32))
