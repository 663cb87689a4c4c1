"""Fused multi-tensor LARS step in Triton: two launches per (device, dtype), whatever
the number of tensors or param groups.

    launch 1  sumsq_kernel        per chunk: sum w^2, sum g^2            reads w, g        8 B/elem
              (+ tensor_totals_kernel, per tensor: its chunks' sums, in a fixed order)
    launch 2  lars_update_kernel  per chunk: tensor norms -> r, update   reads w, g, buf;
                                                                      writes w, buf      20 B/elem

(A group whose ratio divides by ||g s + wd w|| or ||u|| (docs/contract.md, "LARS variants")
makes launch 1 lars_sums_kernel, which also sums the squares of that vector, element by
element; "momentum_update" reads the buffer for it: +4 B/elem, still two passes.)

28 B per fp32 element against the floor of 20 B (docs/contract.md, "The floors") (the norms pass re-reads w
and g); see bench/NOTES.md. With one_launch=True, one launch instead (lars_one_launch_kernel:
each tensor's update follows its norms while it may still be in L2). The maths is fastlars.optim.lars (reference backend),
written again here element-wise; tests hold the two together.
"""

from __future__ import annotations

import enum

import torch
import triton
import triton.language as tl

from . import _tables as tb
from . import multi_tensor as mt
from .layouts import LarsColumn, SumColumn, constexprs

# the LARS group table's columns (layouts.py) as constexprs the kernels read by name
# (LR, WEIGHT_DECAY, ..., NESTEROV; NCOL, its width)
globals().update(constexprs(LarsColumn))


class LarsOption(enum.IntFlag):
    """What the groups of a launch use beyond the default step: the kernels' OPTIONS
    constexpr, so that each launch compiles only the code some group of it needs (an
    element loop with a branch on a group's flag costs the default step too). A launch of
    default groups (momentum, no nesterov, the sum-of-norms ratio) has MOMENTUM only."""

    NORM_OF_SUM = 1     # a ratio divides by ||g s + wd w||: the norms pass sums its squares
    AFTER_MOMENTUM = 2  # a ratio divides by ||u|| ("momentum_update"): the norms pass reads the buffer for u
    MOMENTUM = 4        # a group has momentum
    NO_MOMENTUM = 8     # a group has none (with MOMENTUM: the element loop tests the group's momentum)
    NESTEROV = 16       # a group has nesterov (the element loop selects on the group's flag)


# as constexprs the kernels test: OPT_NORM_OF_SUM, ...
globals().update({f"OPT_{o.name}": tl.constexpr(int(o)) for o in LarsOption})
SUMS = LarsOption.NORM_OF_SUM | LarsOption.AFTER_MOMENTUM  # the norms pass is lars_sums_kernel
OPT_SUMS = tl.constexpr(int(SUMS))


def lars_options(rows) -> int:
    """The LarsOption union of a launch's group rows (LarsColumn; the mode flags hold only
    where the group adapts, see fastlars/optim/_hyper.py, LarsHyper)."""
    options = 0
    for row in rows:
        momentum = row[LarsColumn.MOMENTUM] != 0
        options |= ((LarsOption.NORM_OF_SUM if row[LarsColumn.NORM_OF_SUM] else 0)
                    | (LarsOption.AFTER_MOMENTUM if row[LarsColumn.AFTER_MOMENTUM] else 0)
                    | (LarsOption.MOMENTUM if momentum else LarsOption.NO_MOMENTUM)
                    | (LarsOption.NESTEROV if row[LarsColumn.NESTEROV] else 0))
    return int(options)


@triton.jit
def _lars_sums_block(w_ptr, g_ptr, buf_ptr, idx, numel, acc_w, acc_g, acc_x, coef_buf, coef_d, s, wd,
                     ACC: tl.constexpr, WITH_BUF: tl.constexpr, MASKED: tl.constexpr):
    w = mt.load_block(w_ptr, idx, numel, MASKED).to(ACC)
    g = mt.load_block(g_ptr, idx, numel, MASKED).to(ACC)
    acc_w += w * w
    acc_g += g * g
    x = coef_d * (s * g + wd * w)  # csrc/fastlars_math.h, lars_denominator_element
    if WITH_BUF:
        x = coef_buf * mt.load_block(buf_ptr, idx, numel, MASKED).to(ACC) + x
    acc_x += x * x
    return acc_w, acc_g, acc_x


@triton.jit
def _lars_sums_range(w_ptr, g_ptr, buf_ptr, start, numel, coef_buf, coef_d, s, wd, ACC: tl.constexpr,
                     WITH_BUF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The three sums over one chunk: its whole BLOCKs unmasked, so that aligned pointers
    give vector loads, as mt.sumsq_chunk; the tail masked."""
    acc_w = tl.zeros([BLOCK], dtype=ACC)
    acc_g = tl.zeros([BLOCK], dtype=ACC)
    acc_x = tl.zeros([BLOCK], dtype=ACC)
    full, n = mt.full_blocks(start, numel, CHUNK, BLOCK)
    for offset in range(0, full, BLOCK):
        acc_w, acc_g, acc_x = _lars_sums_block(w_ptr, g_ptr, buf_ptr, start + offset + tl.arange(0, BLOCK), numel,
                                               acc_w, acc_g, acc_x, coef_buf, coef_d, s, wd, ACC, WITH_BUF, False)
    if full < n:
        acc_w, acc_g, acc_x = _lars_sums_block(w_ptr, g_ptr, buf_ptr, start + full + tl.arange(0, BLOCK), numel,
                                               acc_w, acc_g, acc_x, coef_buf, coef_d, s, wd, ACC, WITH_BUF, True)
    return tl.sum(acc_w, axis=0), tl.sum(acc_g, axis=0), tl.sum(acc_x, axis=0)


@triton.jit
def lars_sums_chunk(table, row, start, numel, group, first, groups, inv_scale_ptr, W_DTYPE: tl.constexpr,
                    G_DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_SCALE: tl.constexpr, OPTIONS: tl.constexpr,
                    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The variants' sums over one chunk (see lars_sums_kernel): (w^2, g^2, x^2), x the vector
    the ratio divides by (csrc/fastlars_math.h, lars_denominator; 0 for a group that divides
    by ||g||). Whether the buffer is read is decided once per chunk, outside the element loop."""
    w_ptr = mt.row_pointer(table, row, mt.COL_W, W_DTYPE, ALIGNED)
    g_ptr = mt.row_pointer(table, row, mt.COL_G, G_DTYPE, ALIGNED)
    buf_ptr = mt.row_pointer(table, row, mt.COL_S0, ACC, ALIGNED)
    hp = groups + group * NCOL
    s = 1.0
    if HAS_SCALE:
        s = tl.load(inv_scale_ptr).to(ACC)
    wd = tl.load(hp + WEIGHT_DECAY).to(ACC)
    measured = (tl.load(hp + NORM_OF_SUM) != 0) | (tl.load(hp + AFTER_MOMENTUM) != 0)
    coef_d = tl.where(measured, 1.0, 0.0).to(ACC)
    coef_buf = tl.zeros([], dtype=ACC)
    if OPT_AFTER_MOMENTUM & OPTIONS:
        momentum = tl.load(hp + MOMENTUM).to(ACC)
        one_minus_dampening = tl.load(hp + ONE_MINUS_DAMPENING).to(ACC)
        nesterov = tl.load(hp + NESTEROV) != 0
        after = (tl.load(hp + AFTER_MOMENTUM) != 0) & (momentum != 0)
        # buf' = d (first step) or mu buf + (1 - dampening) d; u = buf' or d + mu buf' (nesterov)
        a = tl.where(first != 0, 0.0, tl.where(nesterov, momentum * momentum, momentum))
        b = tl.where(nesterov, 1.0 + momentum * tl.where(first != 0, 1.0, one_minus_dampening),
                     tl.where(first != 0, 1.0, one_minus_dampening))
        coef_buf = tl.where(after, a, coef_buf).to(ACC)
        coef_d = tl.where(after, b, coef_d).to(ACC)
        # the buffer exists (FIRST 0; else S0 is W and never read) and the ratio needs it
        if after & (first == 0):
            sum_w, sum_g, sum_x = _lars_sums_range(w_ptr, g_ptr, buf_ptr, start, numel, coef_buf, coef_d, s, wd, ACC,
                                                   True, CHUNK, BLOCK)
        else:
            sum_w, sum_g, sum_x = _lars_sums_range(w_ptr, g_ptr, buf_ptr, start, numel, coef_buf, coef_d, s, wd, ACC,
                                                   False, CHUNK, BLOCK)
    else:
        sum_w, sum_g, sum_x = _lars_sums_range(w_ptr, g_ptr, buf_ptr, start, numel, coef_buf, coef_d, s, wd, ACC,
                                               False, CHUNK, BLOCK)
    return sum_w, sum_g, sum_x


@triton.jit
def lars_sums_kernel(table, chunks, partials, groups, inv_scale_ptr, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                     ACC: tl.constexpr, HAS_SCALE: tl.constexpr, OPTIONS: tl.constexpr, ALIGNED: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The norms pass of a launch where some group's ratio divides by ||x|| rather than
    ||g|| (OPT_SUMS), in place of mt.sumsq_kernel: per chunk, sums of w^2, g^2 and x^2
    (lars_sums_chunk). The update takes ||x|| from them (csrc/fastlars_math.h,
    lars_denominator_norm)."""
    chunk = tl.program_id(0)
    row, start, numel, group, _, _, first = mt.this_chunk(table, chunks, False, CHUNK)
    sum_w, sum_g, sum_x = lars_sums_chunk(table, row, start, numel, group, first, groups, inv_scale_ptr, W_DTYPE,
                                          G_DTYPE, ACC, HAS_SCALE, OPTIONS, ALIGNED, CHUNK, BLOCK)
    mt.store_sums(partials, chunk, sum_w, sum_g, sum_x)


@triton.jit
def _momentum_block(buf_ptr, idx, numel, d, first, momentum, one_minus_dampening, nesterov, OPTIONS: tl.constexpr,
                    MASKED: tl.constexpr):
    """buf = d (the tensor's first step) or mu buf + (1 - dampening) d, stored; returns the
    update u (buf, or d + mu buf with nesterov). FIRST is per tensor, a select: a constexpr
    would compile the first step apart from the later ones, which a CUDA graph captured
    after one eager step must not do."""
    buf = mt.load_block(buf_ptr, idx, numel, MASKED)
    buf = tl.where(first != 0, d, momentum * buf + one_minus_dampening * d)
    mt.store_block(buf_ptr, idx, buf, numel, MASKED)
    if OPT_NESTEROV & OPTIONS:
        u = tl.where(nesterov != 0, d + momentum * buf, buf)
    else:
        u = buf
    return u


@triton.jit
def _lars_block(w_ptr, p_ptr, g_ptr, buf_ptr, idx, numel, first, pre, inv_scale, step, decay, momentum,
                one_minus_dampening, nesterov, W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr,
                WRITE_P: tl.constexpr, OPTIONS: tl.constexpr, MASKED: tl.constexpr):
    """The update of one block of elements (docs/contract.md, "LARS"): d = pre (g + decay w),
    momentum, w - step u (pre, decay, step: csrc/fastlars_math.h, lars_factors). Momentum is
    compiled in only where a group of the launch has it, and tested per group only where
    another has none (OPTIONS)."""
    w = mt.load_block(w_ptr, idx, numel, MASKED).to(ACC)
    g = mt.load_block(g_ptr, idx, numel, MASKED).to(ACC) * inv_scale
    d = pre * (g + decay * w)
    if OPT_MOMENTUM & OPTIONS:
        if OPT_NO_MOMENTUM & OPTIONS:
            if momentum != 0:
                d = _momentum_block(buf_ptr, idx, numel, d, first, momentum, one_minus_dampening, nesterov, OPTIONS,
                                    MASKED)
        else:
            d = _momentum_block(buf_ptr, idx, numel, d, first, momentum, one_minus_dampening, nesterov, OPTIONS,
                                MASKED)
    w = w - step * d
    mt.store_block(w_ptr, idx, mt.cast_rne(w, W_DTYPE), numel, MASKED)
    if WRITE_P:
        mt.store_block(p_ptr, idx, mt.cast_rne(w, P_DTYPE), numel, MASKED)


@triton.jit
def lars_update_chunk(table, row, start, numel, group, first, totals, groups, inv_scale_ptr, go,
                      W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr, WRITE_P: tl.constexpr,
                      HAS_SCALE: tl.constexpr, OPTIONS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK: tl.constexpr):
    """The update of one chunk of tensor ``row`` from its norms (``totals``, one row of sums
    per tensor); nothing loaded or stored unless ``go``."""
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
    denominator_decay = tl.load(hp + DENOMINATOR_DECAY).to(ACC)
    plain_sgd = tl.load(hp + PLAIN_SGD) != 0
    after = tl.load(hp + AFTER_MOMENTUM) != 0

    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.load(inv_scale_ptr).to(ACC)
    # whole-tensor norms: the norms pass's per-tensor totals
    # (IEEE-rounded sqrt and division: the compiler's defaults flush subnormals, see mt.sqrt_ieee)
    w_norm = mt.sqrt_ieee(tl.load(totals + mt.SUM_NCOL * row + mt.SUM_W2), ACC)
    g_norm = mt.sqrt_ieee(tl.load(totals + mt.SUM_NCOL * row + mt.SUM_G2), ACC) * inv_scale
    x_norm = g_norm  # the norm the ratio's denominator holds
    if OPT_SUMS & OPTIONS:  # some group of the launch divides by ||x|| (lars_sums_kernel ran)
        measured = (tl.load(hp + NORM_OF_SUM) != 0) | after
        x_norm = tl.where(measured, mt.sqrt_ieee(tl.load(totals + mt.SUM_NCOL * row + mt.SUM_U2), ACC), g_norm)

    # trust ratio and factors: fastlars.optim.lars.lars_trust_ratio, csrc/fastlars_math.h lars_factors
    computed = (w_norm > 0) & (x_norm > 0)
    ratio = mt.div_ieee(eta * w_norm, x_norm + denominator_decay * w_norm + eps, ACC)
    ratio = tl.where(computed, ratio, 1.0)
    clipped = tl.where(lr > 0, tl.minimum(mt.div_ieee(ratio, tl.where(lr > 0, lr, 1.0), ACC), 1.0), 1.0)
    ratio = tl.where(trust_clip != 0, clipped, ratio)
    bounded = tl.minimum(tl.maximum(ratio, tl.load(hp + RATIO_MIN).to(ACC)), tl.load(hp + RATIO_MAX).to(ACC))
    ratio = tl.where(computed, bounded, ratio)
    ratio = tl.where(plain_sgd & ~computed, 1.0, ratio)
    ratio = tl.where(adapt != 0, ratio, 1.0)
    decay = tl.where(plain_sgd & ~computed, 0.0, weight_decay)
    pre = tl.where(after, 1.0, ratio)
    lr_in_momentum = tl.load(hp + LR_IN_MOMENTUM) != 0
    step = tl.where(lr_in_momentum, 1.0, tl.where(after, lr * ratio, lr))
    pre = tl.where(lr_in_momentum, lr * pre, pre)

    if go:
        full, n = mt.full_blocks(start, numel, CHUNK, BLOCK)
        for offset in range(0, full, BLOCK):
            _lars_block(w_ptr, p_ptr, g_ptr, buf_ptr, start + offset + tl.arange(0, BLOCK), numel, first, pre,
                        inv_scale, step, decay, momentum, one_minus_dampening, nesterov, W_DTYPE, P_DTYPE, ACC,
                        WRITE_P, OPTIONS, False)
        if full < n:
            _lars_block(w_ptr, p_ptr, g_ptr, buf_ptr, start + full + tl.arange(0, BLOCK), numel, first, pre,
                        inv_scale, step, decay, momentum, one_minus_dampening, nesterov, W_DTYPE, P_DTYPE, ACC,
                        WRITE_P, OPTIONS, True)


@triton.jit
def lars_update_kernel(table, chunks, totals, groups, ok_ptr, inv_scale_ptr,
                       W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr,
                       WRITE_P: tl.constexpr, HAS_OK: tl.constexpr, HAS_SCALE: tl.constexpr,
                       OPTIONS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, numel, group, _, _, first = mt.this_chunk(table, chunks, True, CHUNK)
    lars_update_chunk(table, row, start, numel, group, first, totals, groups, inv_scale_ptr,
                      mt.step_ok(ok_ptr, HAS_OK), W_DTYPE, P_DTYPE, ACC, WRITE_P, HAS_SCALE, OPTIONS, ALIGNED,
                      CHUNK, BLOCK)


@triton.jit
def _lars_item(chunk, is_update, table, chunks, partials, totals, counters, groups, ok_ptr, inv_scale_ptr,
               W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr, WRITE_P: tl.constexpr,
               HAS_OK: tl.constexpr, HAS_SCALE: tl.constexpr, OPTIONS: tl.constexpr, ALIGNED: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr, PARTIAL_BLOCK: tl.constexpr):
    """One work item of lars_one_launch_kernel: a chunk's norms, or its update."""
    row, start, numel, group, chunk0, n_chunks, first = mt.chunk_at(table, chunks, chunk, CHUNK)
    if is_update:
        go = mt.update_goes(counters, totals, row, n_chunks, ok_ptr, HAS_OK)
        lars_update_chunk(table, row, start, numel, group, first, totals, groups, inv_scale_ptr, go, W_DTYPE,
                          P_DTYPE, ACC, WRITE_P, HAS_SCALE, OPTIONS, ALIGNED, CHUNK, BLOCK)
    else:
        if OPT_SUMS & OPTIONS:
            sum_w, sum_g, sum_x = lars_sums_chunk(table, row, start, numel, group, first, groups, inv_scale_ptr,
                                                  W_DTYPE, P_DTYPE, ACC, HAS_SCALE, OPTIONS, ALIGNED, CHUNK, BLOCK)
            mt.store_sums(partials, chunk, sum_w, sum_g, sum_x)
            mt.norm_item_done(partials, totals, counters, row, chunk0, n_chunks, mt.ALL_SUM_COLUMNS, ACC, PARTIAL_BLOCK)
        else:
            sum_w, sum_g = mt.sumsq_chunk(table, row, start, numel, W_DTYPE, P_DTYPE, ACC, ALIGNED, CHUNK, BLOCK)
            tl.store(partials + mt.SUM_NCOL * chunk + mt.SUM_W2, sum_w)
            tl.store(partials + mt.SUM_NCOL * chunk + mt.SUM_G2, sum_g)
            mt.norm_item_done(partials, totals, counters, row, chunk0, n_chunks, mt.W2_G2_COLUMNS, ACC, PARTIAL_BLOCK)


@triton.jit(do_not_specialize=["n_items"])  # one binary whatever the item count's divisibility
def lars_one_launch_kernel(table, chunks, partials, totals, counters, groups, ok_ptr, inv_scale_ptr, n_items,
                           W_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, ACC: tl.constexpr, WRITE_P: tl.constexpr,
                           HAS_OK: tl.constexpr, HAS_SCALE: tl.constexpr, OPTIONS: tl.constexpr,
                           ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                           PARTIAL_BLOCK: tl.constexpr):
    """The LARS step in one launch (one_launch=True), two items per chunk taken by ticket
    (mt.next_ticket, mt.item_chunk) until ``n_items`` are out: a norm item sums its chunk
    (as the norms pass) and the tensor's last one forms its totals; an update item waits
    for them (mt.wait_for_norms) and updates its chunk (as lars_update_kernel) while the
    tensor's w and g may still be in L2. The step's decision (``ok``) is known before the
    launch; a tensor whose sums are not finite is left unchanged (the gate could not see them)."""
    item = mt.next_ticket(counters)
    while item < n_items:
        chunk, is_update = mt.item_chunk(item, table, chunks)
        _lars_item(chunk, is_update, table, chunks, partials, totals, counters, groups, ok_ptr, inv_scale_ptr,
                   W_DTYPE, P_DTYPE, ACC, WRITE_P, HAS_OK, HAS_SCALE, OPTIONS, ALIGNED, CHUNK, BLOCK, PARTIAL_BLOCK)
        item = mt.next_ticket(counters)


def lars_norms(plan, inv_scale):
    """Launch 1 for every (device, dtype): returns the context and the partials to check.
    With one_launch, the tables and the gate's pre-read only (tb.one_launch_checks)."""
    checks = tb.one_launch_checks(plan) if plan.one_launch else None
    contexts = []
    for lp in plan.launches:
        launch, operands = tb.lars_launch(plan, lp, False, mt.chunk_size(plan))
        if plan.one_launch:  # the sums are formed by the update's launch (lars_one_launch_kernel)
            sums = torch.zeros(launch.n_tensors, len(SumColumn), dtype=launch.acc_dtype, device=launch.table.device)
        else:
            options = lars_options(lp.rows)
            sums = _variant_sums(launch, options, inv_scale) if options & SUMS else mt.launch_sumsq(launch)
        contexts.append(tb.Merged(lp, sums, launch, operands))
    if plan.one_launch:
        return contexts, checks
    if plan.mesh is not None:  # sharded parameters: global sums, one all-reduce
        tb.reduce_tensor_sums(plan, contexts)
    return contexts, [c.sums for c in contexts]  # the sums (0 in the columns not summed)


def _variant_sums(launch, options: int, inv_scale):
    """Launch 1 where a LARS variant needs x^2 beside w^2 and g^2 (lars_sums_kernel)."""
    device = launch.table.device
    partials = torch.empty(launch.n_chunks, len(SumColumn), dtype=launch.acc_dtype, device=device)
    if launch.n_chunks:
        with tb.on_device(device):
            lars_sums_kernel[(launch.n_chunks,)](
                launch.table, launch.chunks, partials, launch.groups,
                tb.scalar_on(inv_scale, device) if inv_scale is not None else launch.groups,
                W_DTYPE=mt.TL_DTYPES[launch.weights_dtype], G_DTYPE=mt.TL_DTYPES[launch.param_dtype],
                ACC=mt.TL_DTYPES[launch.acc_dtype], HAS_SCALE=inv_scale is not None, OPTIONS=options,
                ALIGNED=launch.aligned, CHUNK=mt.CHUNK, BLOCK=mt.BLOCK)
    return mt.tensor_totals(launch, partials, len(SumColumn))


def lars_update(plan, contexts, inv_scale, ok) -> None:
    """Launch 2 for every (device, dtype); with one_launch, the whole step's one launch."""
    for ctx in contexts:
        chunk = mt.chunk_size(plan)
        launch, operands = tb.update_launch(plan, ctx, chunk, tb.lars_launch)  # alive until the kernel ran
        if not launch.n_chunks:
            continue
        device = launch.table.device
        scalars = (tb.scalar_on(ok, device, torch.int32) if ok is not None else launch.groups,
                   tb.scalar_on(inv_scale, device) if inv_scale is not None else launch.groups)
        flags = dict(W_DTYPE=mt.TL_DTYPES[launch.weights_dtype], P_DTYPE=mt.TL_DTYPES[launch.param_dtype],
                     ACC=mt.TL_DTYPES[launch.acc_dtype], WRITE_P=launch.write_param, HAS_OK=ok is not None,
                     HAS_SCALE=inv_scale is not None, OPTIONS=lars_options(ctx.plan.rows), ALIGNED=launch.aligned,
                     CHUNK=chunk, BLOCK=mt.BLOCK)
        with tb.on_device(device):
            if plan.one_launch:
                partials, counters = mt.item_buffers(launch)
                lars_one_launch_kernel[(mt.one_launch_grid(launch),)](
                    launch.table, launch.chunks, partials, ctx.sums, counters, launch.groups, *scalars,
                    2 * launch.n_chunks, **flags, PARTIAL_BLOCK=mt.PARTIAL_BLOCK)
            else:
                lars_update_kernel[(launch.n_chunks,)](launch.table, launch.chunks, ctx.sums, launch.groups,
                                                       *scalars, **flags)
