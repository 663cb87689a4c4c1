"""Ghost Batch Normalization forward and backward in Triton, one program per
(ghost, channel) group.

Bytes per activation element (x, y, dy, dx of the activation dtype):

    forward   one pass   (group fits on chip): read x, write y             2x  (floor: docs/contract.md, "The floors")
              two passes (larger groups):      stats, then normalise       3x
    backward  one pass:                        read x, dy; write dx         3x  (floor)
              two passes:                      sums, then dx                5x

A group fits when it has at most ONE_PASS_MAX values (a register tile of one
program). The maths is fastlars.nn.ghost_bn's reference (F.batch_norm per ghost),
written element-wise; tests hold the two together.

Limits (CUDA's, not the interpreter's): the grid is one-dimensional, channels varying
fastest (program = ghost * C + channel), since grid axes 1 and 2 stop at 65,535 and
axis 0 at 2^31 - 1; memory offsets are int64, since products of int32 strides wrap for
activations of 2^31 elements or more. Warps grow with the block (num_warps_for) so
that a one-pass tile stays in registers: ptxas figures in bench/NOTES.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _tables as tb
from .multi_tensor import TL_DTYPES, cast_rne

ONE_PASS_MAX = 8192  # values per (ghost, channel) kept in registers for the one-pass kernels
TILE = 2048          # tile of the two-pass kernels
GRID_MAX = 2**31 - 1  # programs on CUDA's grid axis 0


def num_warps_for(block: int) -> int:
    """Warps for a BLOCK-wide tile: 8 values per thread, from 4 to 16 warps. At 4 warps a
    one-pass block of 8192 takes 255 registers and spills (bench/NOTES.md)."""
    return max(4, min(16, block // 256))


@triton.jit
def _group_offsets(k, S, stride_n, stride_s):
    """Memory offset of the k-th value of a (ghost, channel) group: sample k // S, position k % S.
    The division stays in int32 (k < the group's size < 2^31); the products are int64."""
    return (k // S).to(tl.int64) * stride_n + (k % S).to(tl.int64) * stride_s


@triton.jit
def _group(N, C, vbs, n_ghosts, S):
    """This program's (ghost, channel, first sample, value count); channels vary fastest."""
    pid = tl.program_id(0)
    ghost = pid // C
    c = pid % C
    start = ghost * vbs
    count = tl.where(ghost == n_ghosts - 1, N - start, vbs) * S  # the last ghost takes the remainder
    return pid, c.to(tl.int64), start.to(tl.int64), count


@triton.jit
def ghost_bn_forward_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, var_ptr,
                            N, C, S, vbs, n_ghosts, eps,
                            sx_n, sx_c, sx_s, sy_n, sy_c, sy_s,
                            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                            ONE_PASS: tl.constexpr, BLOCK: tl.constexpr):
    pid, c, start, count = _group(N, C, vbs, n_ghosts, S)
    x_base = x_ptr + start * sx_n + c * sx_c
    y_base = y_ptr + start * sy_n + c * sy_c
    if ONE_PASS:
        k = tl.arange(0, BLOCK)
        mask = k < count
        x = tl.load(x_base + _group_offsets(k, S, sx_n, sx_s), mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, axis=0) / count
        centered = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centered * centered, axis=0) / count
    else:
        # per-tile mean and M2 merged with Chan et al.'s update (stable for large groups)
        mean = tl.zeros([], dtype=ACC)
        m2 = tl.zeros([], dtype=ACC)
        seen = tl.zeros([], dtype=ACC)
        for t0 in range(0, count, BLOCK):
            k = t0 + tl.arange(0, BLOCK)
            mask = k < count
            x = tl.load(x_base + _group_offsets(k, S, sx_n, sx_s), mask=mask, other=0.0).to(ACC)
            n_tile = tl.minimum(count - t0, BLOCK).to(ACC)
            tile_mean = tl.sum(x, axis=0) / n_tile
            d = tl.where(mask, x - tile_mean, 0.0)
            delta = tile_mean - mean
            total = seen + n_tile
            mean += delta * n_tile / total
            m2 += tl.sum(d * d, axis=0) + delta * delta * seen * n_tile / total
            seen = total
        var = m2 / count
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c).to(ACC)
    shift = -mean * scale
    if HAS_BIAS:
        shift += tl.load(b_ptr + c).to(ACC)
    tl.store(mean_ptr + pid, mean)
    tl.store(var_ptr + pid, var)
    if ONE_PASS:
        tl.store(y_base + _group_offsets(k, S, sy_n, sy_s), cast_rne(x * scale + shift, y_ptr.dtype.element_ty),
                 mask=mask)
    else:
        for t0 in range(0, count, BLOCK):
            k = t0 + tl.arange(0, BLOCK)
            mask = k < count
            x = tl.load(x_base + _group_offsets(k, S, sx_n, sx_s), mask=mask, other=0.0).to(ACC)
            tl.store(y_base + _group_offsets(k, S, sy_n, sy_s), cast_rne(x * scale + shift, y_ptr.dtype.element_ty),
                     mask=mask)


@triton.jit
def ghost_bn_backward_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, var_ptr, dw_ptr, db_ptr,
                             N, C, S, vbs, n_ghosts, eps,
                             sx_n, sx_c, sx_s, sdy_n, sdy_c, sdy_s, sdx_n, sdx_c, sdx_s,
                             HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, ONE_PASS: tl.constexpr,
                             BLOCK: tl.constexpr):
    """dx = w * rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)); per-(ghost, channel)
    sums of dy * x_hat and dy go to dw_ptr/db_ptr (G, C), summed over ghosts by torch."""
    pid, c, start, count = _group(N, C, vbs, n_ghosts, S)
    x_base = x_ptr + start * sx_n + c * sx_c
    dy_base = dy_ptr + start * sdy_n + c * sdy_c
    dx_base = dx_ptr + start * sdx_n + c * sdx_c
    mean = tl.load(mean_ptr + pid)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + pid) + eps)
    if ONE_PASS:
        k = tl.arange(0, BLOCK)
        mask = k < count
        x_hat = (tl.load(x_base + _group_offsets(k, S, sx_n, sx_s), mask=mask, other=0.0).to(ACC) - mean) * rstd
        dy = tl.load(dy_base + _group_offsets(k, S, sdy_n, sdy_s), mask=mask, other=0.0).to(ACC)
        sum_dy = tl.sum(dy, axis=0)
        sum_dy_xhat = tl.sum(tl.where(mask, dy * x_hat, 0.0), axis=0)
    else:
        sum_dy = tl.zeros([], dtype=ACC)
        sum_dy_xhat = tl.zeros([], dtype=ACC)
        for t0 in range(0, count, BLOCK):
            k = t0 + tl.arange(0, BLOCK)
            mask = k < count
            x_hat = (tl.load(x_base + _group_offsets(k, S, sx_n, sx_s), mask=mask, other=0.0).to(ACC) - mean) * rstd
            dy = tl.load(dy_base + _group_offsets(k, S, sdy_n, sdy_s), mask=mask, other=0.0).to(ACC)
            sum_dy += tl.sum(dy, axis=0)
            sum_dy_xhat += tl.sum(tl.where(mask, dy * x_hat, 0.0), axis=0)
    tl.store(dw_ptr + pid, sum_dy_xhat)
    tl.store(db_ptr + pid, sum_dy)
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c).to(ACC)
    mean_dy = sum_dy / count
    mean_dy_xhat = sum_dy_xhat / count
    if ONE_PASS:
        dx = scale * (dy - mean_dy - x_hat * mean_dy_xhat)
        tl.store(dx_base + _group_offsets(k, S, sdx_n, sdx_s), cast_rne(dx, dx_ptr.dtype.element_ty), mask=mask)
    else:
        for t0 in range(0, count, BLOCK):
            k = t0 + tl.arange(0, BLOCK)
            mask = k < count
            x_hat = (tl.load(x_base + _group_offsets(k, S, sx_n, sx_s), mask=mask, other=0.0).to(ACC) - mean) * rstd
            dy = tl.load(dy_base + _group_offsets(k, S, sdy_n, sdy_s), mask=mask, other=0.0).to(ACC)
            dx = scale * (dy - mean_dy - x_hat * mean_dy_xhat)
            tl.store(dx_base + _group_offsets(k, S, sdx_n, sdx_s), cast_rne(dx, dx_ptr.dtype.element_ty), mask=mask)


def _strides(t: Tensor) -> tuple[int, int, int]:
    """(sample, channel, spatial) strides of a tensor whose spatial dims flatten to one
    stride (contiguous NCHW, channels_last, (N, C, L), broadcast gradients)."""
    if t.ndim == 2:
        return t.stride(0), t.stride(1), 1
    return t.stride(0), t.stride(1), t.stride(-1)


def _walkable(t: Tensor) -> Tensor:
    """t itself if its spatial dims flatten to one stride, else a contiguous copy."""
    stride = t.stride(-1)
    for dim in range(t.ndim - 1, 2, -1):
        stride *= t.shape[dim]
        if t.shape[dim - 1] != 1 and t.stride(dim - 1) != stride:
            return t.contiguous()
    return t


def _plan(x: Tensor, sizes: list[int]) -> tuple[int, bool, int, tuple[int]]:
    """Values per sample and channel, one or two passes, the block, the grid."""
    spatial = x[0, 0].numel()
    largest = max(sizes) * spatial
    if largest > 2**31 - 1:  # the kernels count a group's values in int32
        raise ValueError(f"a ghost batch of {max(sizes)} samples x {spatial} values per channel has {largest} values "
                         "per channel, more than the Triton kernels index (2^31 - 1); use a smaller virtual_batch_size")
    programs = len(sizes) * x.shape[1]
    if programs > GRID_MAX:
        raise ValueError(f"{len(sizes)} ghosts x {x.shape[1]} channels is more than CUDA's {GRID_MAX} programs")
    one_pass = largest <= ONE_PASS_MAX
    block = triton.next_power_of_2(largest) if one_pass else TILE
    return spatial, one_pass, block, (programs,)


class GhostBatchNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sizes, eps):
        x = _walkable(x)
        N, C = x.shape[:2]
        S, one_pass, block, grid = _plan(x, sizes)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = torch.empty_like(x)
        mean = torch.empty(len(sizes), C, dtype=acc, device=x.device)
        var = torch.empty_like(mean)
        vbs = sizes[0]
        with tb.on_device(x.device):  # Triton launches on the current device, not x's
            ghost_bn_forward_kernel[grid](
                x, y, weight if weight is not None else x, bias if bias is not None else x, mean, var,
                N, C, S, vbs, len(sizes), eps, *_strides(x), *_strides(y),
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC=TL_DTYPES[acc],
                ONE_PASS=one_pass, BLOCK=block, num_warps=num_warps_for(block))
        ctx.save_for_backward(x, weight, mean, var)
        ctx.sizes, ctx.eps = sizes, eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, var = ctx.saved_tensors
        sizes = ctx.sizes
        dy = _walkable(dy)
        N, C = x.shape[:2]
        S, one_pass, block, grid = _plan(x, sizes)
        dx = torch.empty_like(x)
        dw = torch.empty_like(mean)
        db = torch.empty_like(mean)
        with tb.on_device(x.device):
            ghost_bn_backward_kernel[grid](
                x, dy, dx, weight if weight is not None else x, mean, var, dw, db,
                N, C, S, sizes[0], len(sizes), ctx.eps, *_strides(x), *_strides(dy), *_strides(dx),
                HAS_WEIGHT=weight is not None, ACC=TL_DTYPES[mean.dtype], ONE_PASS=one_pass, BLOCK=block,
                num_warps=num_warps_for(block))
        grad_w = dw.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = db.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx, grad_w, grad_b, None, None


def ghost_bn_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, sizes: list[int], eps: float):
    """Training-mode Ghost BN through the Triton kernels: y, (G, C) means and biased variances."""
    return GhostBatchNormTriton.apply(x, weight, bias, sizes, eps)
