"""Ghost Batch Normalization (Hoffer, Hubara, Soudry 2017; Keras ``virtual_batch_size``).

In training, the batch is cut into consecutive "ghost" batches of
``virtual_batch_size`` samples, each normalised with its own per-channel mean and
biased variance; ``weight``/``bias`` are shared (docs/contract.md, "Ghost Batch Normalization"):

- the last ghost holds the remainder, except that a remainder of one sample joins the
  previous ghost (one-sample statistics are degenerate);
- a batch of at most one ghost is plain batch norm;
- running statistics are updated once per forward with the mean over ghosts of the
  ghost means and of the *unbiased* ghost variances; ``momentum=None`` is a
  cumulative average, as in ``nn.BatchNorm``;
- eval (and ``track_running_stats=False`` outside training) is ``nn.BatchNorm``'s.

Backends: ``"reference"`` (a loop of ``F.batch_norm`` over the ghosts; the oracle),
``"native"`` (torch's own batch-norm kernels run on each ghost, writing into one
output buffer: no concatenation copies, statistics for free; the CPU default),
``"vectorized"`` (one set of tensor ops over all ghosts with a closed-form
backward) and ``"triton"`` (fused one-pass kernels, ``fastlars/ops/ghost_bn.py``;
the CUDA default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends

__all__ = ["GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "convert_ghost_batchnorm", "ghost_sizes"]

BACKENDS = ("auto", "triton", "native", "vectorized", "reference")


def ghost_sizes(batch: int, virtual_batch_size: int) -> list[int]:
    """Samples per ghost batch, by docs/contract.md, "The remainder rule"."""
    if batch <= virtual_batch_size:
        return [batch]
    full, remainder = divmod(batch, virtual_batch_size)
    if remainder == 1:
        return [virtual_batch_size] * (full - 1) + [virtual_batch_size + 1]
    return [virtual_batch_size] * full + ([remainder] if remainder else [])


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def ghost_bn_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, sizes: list[int],
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The oracle: F.batch_norm on each ghost. Returns y and the (G, C) fp32 ghost
    means and biased variances."""
    chunks = x.split(sizes)
    y = torch.cat([F.batch_norm(c, None, None, weight, bias, True, 0.0, eps) for c in chunks])
    with torch.no_grad():
        stats = [torch.var_mean(c.to(_acc_dtype(x)), dim=_reduce_dims(c), unbiased=False) for c in chunks]
    var = torch.stack([v for v, _ in stats])
    mean = torch.stack([m for _, m in stats])
    return y, mean, var


def _as_ghosts(x: Tensor, sizes: list[int]) -> list[Tensor]:
    """Views of x as (G, n, C, *spatial) blocks: all full ghosts in one, the last apart."""
    if len(set(sizes)) == 1:
        return [x.view(len(sizes), sizes[0], *x.shape[1:])]
    head = sum(sizes[:-1])
    return [x[:head].view(len(sizes) - 1, sizes[0], *x.shape[1:]), x[head:].unsqueeze(0)]


class _GhostBNVectorized(torch.autograd.Function):
    """All ghosts at once with tensor ops; backward in closed form:
    dx = w * rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) per (ghost, channel)."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes, eps):
        acc = _acc_dtype(x)
        ys, means, variances = [], [], []
        for xg in _as_ghosts(x, sizes):
            dims = (1,) + tuple(range(3, xg.ndim))
            var, mean = torch.var_mean(xg.to(acc), dim=dims, unbiased=False, keepdim=True)
            scale = torch.rsqrt(var + eps)
            if weight is not None:
                scale = scale * _channel_view(weight.to(acc), xg)
            shift = -mean * scale
            if bias is not None:
                shift = shift + _channel_view(bias.to(acc), xg)
            ys.append(torch.addcmul(shift, xg, scale).to(x.dtype))  # one pass: x * scale + shift
            means.append(mean.reshape(mean.shape[0], -1))
            variances.append(var.reshape(var.shape[0], -1))
        y = ys[0].reshape(x.shape) if len(ys) == 1 else torch.cat([t.flatten(0, 1) for t in ys])
        mean, var = torch.cat(means), torch.cat(variances)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.sizes, ctx.eps = sizes, eps
        ctx.mark_non_differentiable(mean, var)
        return y.contiguous(memory_format=_memory_format(x)), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, var = ctx.saved_tensors
        sizes, eps = ctx.sizes, ctx.eps
        acc = _acc_dtype(x)
        dxs, dws, dbs = [], [], []
        row = 0
        for xg, dyg in zip(_as_ghosts(x, sizes), _as_ghosts(dy, sizes)):
            g = xg.shape[0]
            shape = (g, 1, xg.shape[2]) + (1,) * (xg.ndim - 3)
            m = mean[row:row + g].view(shape)
            rstd = torch.rsqrt(var[row:row + g].view(shape) + eps)
            row += g
            dims = (1,) + tuple(range(3, xg.ndim))
            n = xg[0, :, 0].numel()  # values per (ghost, channel)
            xf, dyf = xg.to(acc), dyg.to(acc)
            sum_dy = dyf.sum(dim=dims, keepdim=True)
            sum_dy_xhat = ((xf - m) * dyf).sum(dim=dims, keepdim=True) * rstd
            a = rstd if weight is None else rstd * _channel_view(weight.to(acc), xg)
            # dx = a * dy + b * x + c, two fused passes
            b = -a * rstd * sum_dy_xhat / n
            c = -a * sum_dy / n - b * m
            dxs.append(torch.addcmul(torch.addcmul(c, dyf, a), xf, b).to(x.dtype))
            dws.append(sum_dy_xhat.sum(0).flatten())
            dbs.append(sum_dy.sum(0).flatten())
        dx = dxs[0].reshape(x.shape) if len(dxs) == 1 else torch.cat([t.flatten(0, 1) for t in dxs])
        dw = torch.stack(dws).sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = torch.stack(dbs).sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx.contiguous(memory_format=_memory_format(x)), dw, db, None, None


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Statistics and arithmetic in fp32 (fp64 for fp64 input, e.g. gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _GhostBNNative(torch.autograd.Function):
    """torch's native batch-norm forward/backward on each ghost, through their out=
    variants into slices of one output: the chunk loop without its cat/split copies."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes, eps):
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            # native_batch_norm.out reads other strides wrongly (torch 2.14 on the CPU: a transposed
            # (N, C, L) input gives wrong y and garbage statistics); its backward handles any dy
            x = x.contiguous()
        acc = _acc_dtype(x)
        C = x.shape[1]
        # fp32 (fp64) affine parameters select the kernels' mixed-precision path: fp32 statistics
        w = weight.to(acc) if weight is not None else torch.ones(C, dtype=acc, device=x.device)
        b = bias.to(acc) if bias is not None else torch.zeros(C, dtype=acc, device=x.device)
        y = torch.empty_like(x)
        mean = torch.empty(len(sizes), C, dtype=acc, device=x.device)
        invstd = torch.empty_like(mean)
        for g, (xs, ys) in enumerate(zip(x.split(sizes), y.split(sizes))):
            torch.ops.aten.native_batch_norm.out(xs, w, b, None, None, True, 0.0, eps,
                                                 out=ys, save_mean=mean[g], save_invstd=invstd[g])
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.sizes, ctx.eps, ctx.weight_dtype = sizes, eps, None if weight is None else weight.dtype
        var = invstd.pow(-2) - eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, w, mean, invstd = ctx.saved_tensors
        dx = torch.empty_like(x)
        dw, db = torch.empty_like(mean), torch.empty_like(mean)
        for g, (xs, dys, dxs) in enumerate(zip(x.split(ctx.sizes), dy.split(ctx.sizes), dx.split(ctx.sizes))):
            torch.ops.aten.native_batch_norm_backward.out(
                dys, xs, w, None, None, mean[g], invstd[g], True, ctx.eps, [True, True, True],
                out0=dxs, out1=dw[g], out2=db[g])
        if ctx.weight_dtype is None:
            return dx, None, None, None, None
        return dx, dw.sum(0).to(ctx.weight_dtype), db.sum(0).to(ctx.weight_dtype), None, None


def _channel_view(v: Tensor, xg: Tensor) -> Tensor:
    return v.view((1, 1, -1) + (1,) * (xg.ndim - 3))


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def ghost_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, virtual_batch_size: int,
                     eps: float, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Training-mode Ghost BN: y, the (G, C) fp32 ghost means and biased variances, and
    the ghost sizes (in samples)."""
    if x.ndim > 4:
        # (N, C, D, H, W): the statistics are per (ghost, channel) whatever the spatial shape, so
        # the 2d path runs on (N, C, D, H*W): a view, NCHW for contiguous input and channels_last
        # for channels_last_3d
        y, mean, var, sizes = ghost_batch_norm(x.flatten(3), weight, bias, virtual_batch_size, eps, backend)
        return y.unflatten(3, x.shape[3:]), mean, var, sizes
    sizes = ghost_sizes(x.shape[0], virtual_batch_size)
    backend = _resolve(backend, x)
    if backend == "reference":
        y, mean, var = ghost_bn_reference(x, weight, bias, sizes, eps)
    elif backend == "native":
        y, mean, var = _GhostBNNative.apply(x, weight, bias, sizes, eps)
    elif backend == "vectorized":
        y, mean, var = _GhostBNVectorized.apply(x, weight, bias, sizes, eps)
    else:
        from ..ops.ghost_bn import ghost_bn_triton

        y, mean, var = ghost_bn_triton(x, weight, bias, sizes, eps)
    return y, mean, var, sizes


def _resolve(backend: str, x: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
    triton = backends.get("triton")  # the optimizers' rule for where Triton kernels run
    if backend == "auto":
        return "triton" if x.is_cuda and triton.available() else "native"
    if backend == "triton":
        if not triton.available():
            raise ValueError("backend='triton' needs Triton installed")
        if not triton.steps(x.device.type):
            raise ValueError("backend='triton' needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
    return backend


class _GhostBatchNormMixin:
    """Training forward and running statistics shared by the 1d and 2d modules."""

    def _init_ghost(self, virtual_batch_size: int, backend: str) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be an integer >= 1, got {virtual_batch_size!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
        self.virtual_batch_size = virtual_batch_size
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")
        if not self.training:
            return super().forward(x)  # nn.BatchNorm's eval, whatever the batch size
        if x.shape[0] < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 samples per batch in training, got input of "
                             f"shape {tuple(x.shape)} (one-sample statistics are degenerate)")
        if self.virtual_batch_size == 1 and x[0, 0].numel() == 1:
            # every ghost holds one value per channel: its variance is 0 and its unbiased variance
            # undefined (nn.BatchNorm refuses one value per channel in training likewise)
            raise ValueError(f"{type(self).__name__}(virtual_batch_size=1) on input of shape {tuple(x.shape)} "
                             "has one value per channel in each ghost; use virtual_batch_size >= 2")
        y, mean, var, sizes = ghost_batch_norm(x, self.weight, self.bias, self.virtual_batch_size, self.eps,
                                               self.backend)
        if self.track_running_stats:
            self._update_running_stats(mean, var, sizes, x[0, 0].numel())
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, sizes: list[int], per_sample: int) -> None:
        """No host-device traffic: the unbiasing factors n / (n - 1) are Python scalars (a tensor
        of the ghost sizes would be a pageable host-to-device copy, synchronising every layer's
        forward), and the cumulative average's 1 / num_batches_tracked stays on the device
        (nn.BatchNorm reads it back to the host)."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else self.num_batches_tracked.reciprocal()
        full, last = sizes[0] * per_sample, sizes[-1] * per_sample  # only the last ghost may differ
        unbiased = var * (full / (full - 1))
        if last != full:
            unbiased[-1] = var[-1] * (last / (last - 1))
        self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.mean(0).to(self.running_var.dtype), factor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNormMixin, nn.BatchNorm1d):
    """Ghost BN over (N, C) or (N, C, L) input; ``nn.BatchNorm1d`` plus ``virtual_batch_size``."""

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 backend: str = "auto") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_ghost(virtual_batch_size, backend)


class GhostBatchNorm2d(_GhostBatchNormMixin, nn.BatchNorm2d):
    """Ghost BN over (N, C, H, W) input (NCHW or channels_last); ``nn.BatchNorm2d`` plus ``virtual_batch_size``."""

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 backend: str = "auto") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_ghost(virtual_batch_size, backend)


class GhostBatchNorm(_GhostBatchNormMixin, nn.modules.batchnorm._BatchNorm):
    """Ghost BN over any (N, C, *) input (2-D to 5-D and beyond), as ``nn.SyncBatchNorm``
    accepts: what ``convert_ghost_batchnorm(..., include_sync=True)`` makes of an
    ``nn.SyncBatchNorm``, whose input dimensionality is not known until it runs. Input of
    more than 4 dimensions is normalised as its (N, C, L) view. The ghosts are cut from
    each process's own batch; nothing is synchronised across processes."""

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 backend: str = "auto") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_ghost(virtual_batch_size, backend)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")


def convert_ghost_batchnorm(module: nn.Module, virtual_batch_size: int, *, include_sync: bool = False,
                            backend: str = "auto") -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d`` (and ``nn.SyncBatchNorm`` when ``include_sync``: for a
    ``GhostBatchNorm``, which accepts any input the SyncBatchNorm did) for the ghost version,
    keeping weights, buffers, device, dtype and training mode.
    Returns the converted module (a new one if ``module`` itself is a BatchNorm), like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``."""
    converted = module
    kinds = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}
    target = kinds.get(type(module))
    if target is None and include_sync and type(module) is nn.SyncBatchNorm:
        target = GhostBatchNorm
    if target is not None:
        ref = module.weight if module.affine else module.running_mean
        converted = target(module.num_features, virtual_batch_size, module.eps, module.momentum, module.affine,
                           module.track_running_stats, device=ref.device if ref is not None else None,
                           dtype=ref.dtype if ref is not None else None, backend=backend)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_ghost_batchnorm(child, virtual_batch_size, include_sync=include_sync,
                                                          backend=backend))
    del module
    return converted
