"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017).

Layout as timm ``Lars`` / apex ``LARC``; the contract is docs/contract.md, "LARS":

    r   = eta * ||w|| / (||g|| + wd * ||w|| + eps)   (1 if ||w|| or ||g|| is 0; 1 if not adapted)
    r   = min(r / lr, 1)                              if trust_clip (LARC "clip" mode)
    d   = r * (g + wd * w)
    buf = d  (first step),  mu * buf + (1 - dampening) * d  (afterwards)
    d   = d + mu * buf  if nesterov  else buf
    w   = w - lr * d

and the variants of the options ratio_denominator, zero_norm, trust_bounds and
lr_in_momentum (the class docstring; docs/contract.md, "LARS variants").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import backends
from .._tensors import has_state
from ..ops.layouts import SumColumn
from . import _layer_stats
from ._buckets import (Bucket, EagerPath, cache_sized_slices, descend, foreach_norms, one_at_a_time_norms, where_,
                       whole_bucket)
from ._checks import check_choice, check_flag, check_number, check_trust_bounds, scalar_lr
from ._common import TrustRatioOptimizer
from ._hyper import LarsHyper, lars_hyper

__all__ = ["LARS", "lars_trust_ratio"]

RATIO_DENOMINATORS = ("sum_of_norms", "norm_of_sum", "momentum_update")
ZERO_NORM_RULES = ("ratio_one", "plain_sgd")


def lars_ratio_computed(w_norm: Tensor, x_norm: Tensor) -> Tensor:
    """Where the trust ratio is computed: both norms of its test are > 0 (elsewhere the
    zero-norm rule applies). ``x_norm``: the norm of the ratio's denominator (see lars_trust_ratio)."""
    return (w_norm > 0) & (x_norm > 0)


def lars_trust_ratio(w_norm: Tensor, g_norm: Tensor, *, lr: float, trust_coefficient: float,
                     weight_decay: float, eps: float, trust_clip: bool, ratio_denominator: str = "sum_of_norms",
                     zero_norm: str = "ratio_one", trust_bounds: tuple[float, float] | None = None) -> Tensor:
    """Trust ratio of each layer from its norms (tensors of any matching shape).

    The single definition every LARS backend uses. ``g_norm`` is the norm the denominator
    holds: ||g|| ("sum_of_norms", which adds wd ||w||), ||g + wd w|| ("norm_of_sum") or
    ||u||, the update after momentum ("momentum_update"). Where a norm is 0 the ratio
    is 1 ("ratio_one": still clipped by trust_clip; "plain_sgd": exactly 1, the caller
    also drops the decay, see lars_decay). trust_bounds clamps a computed ratio only.
    """
    return _trust_ratio(w_norm, g_norm, lr, trust_coefficient=trust_coefficient,
                        denominator_decay=weight_decay if ratio_denominator == "sum_of_norms" else 0.0, eps=eps,
                        trust_clip=trust_clip, plain_sgd=zero_norm == "plain_sgd", bounds=trust_bounds)


def group_trust_ratio(h: LarsHyper, w_norm: Tensor, x_norm: Tensor, lr: float | Tensor) -> Tensor:
    """lars_trust_ratio of a group from its record (x_norm: the norm its denominator holds)."""
    return _trust_ratio(w_norm, x_norm, lr, trust_coefficient=h.trust_coefficient,
                        denominator_decay=h.denominator_decay, eps=h.eps, trust_clip=h.trust_clip,
                        plain_sgd=h.plain_sgd, bounds=h.bounds)


def _trust_ratio(w_norm: Tensor, x_norm: Tensor, lr, *, trust_coefficient: float, denominator_decay: float,
                 eps: float, trust_clip: bool, plain_sgd: bool, bounds: tuple[float, float] | None) -> Tensor:
    r = trust_coefficient * w_norm / (x_norm + denominator_decay * w_norm + eps)
    computed = lars_ratio_computed(w_norm, x_norm)
    r = torch.where(computed, r, torch.ones_like(r))
    if trust_clip:
        # min(r / lr, 1); as lr -> 0 the limit is 1, which also avoids 0/0. A tensor lr is
        # tested on its device: reading it would synchronise (the step and layer_stats() read nothing)
        clipped = torch.clamp(r / lr, max=1.0)
        if isinstance(lr, Tensor) and lr.device == r.device:
            r = torch.where(lr > 0, clipped, 1.0)
        else:  # a number, or a CPU tensor lr with CUDA norms (host memory: read for free)
            r = clipped if lr > 0 else torch.ones_like(r)
    if bounds is not None:
        r = torch.where(computed, torch.clamp(r, *bounds), r)
    if plain_sgd and trust_clip:
        r = torch.where(computed, r, torch.ones_like(r))
    return r


def lars_decay(h: LarsHyper, w_norm: Tensor | None, x_norm: Tensor | None) -> float | Tensor:
    """The weight decay added to the gradient: the group's, or per tensor 0 where
    zero_norm="plain_sgd" finds a zero norm (that tensor steps as plain SGD on g)."""
    if w_norm is None or not h.plain_sgd:
        return h.weight_decay
    return lars_ratio_computed(w_norm, x_norm).to(w_norm.dtype) * h.weight_decay  # wd or 0, exactly


def creates_buffer(h: LarsHyper, state) -> bool:
    """Whether this step creates the parameter's momentum buffer (its group has momentum and
    its state no buffer, a None entry included): every backend's one test."""
    return h.momentum != 0 and not has_state(state, "momentum_buffer")


class LARS(TrustRatioOptimizer):
    r"""LARS with momentum, as ``torch.optim.SGD`` with a per-layer trust ratio.

    Args:
        params: parameters or param groups. A group may set ``trust_ratio=False``
            to apply plain SGD to it (see :func:`fastlars.param_groups`).
        lr: learning rate (default 1e-3, as ``torch.optim.SGD``): a number or a
            one-element tensor.
        momentum: momentum factor :math:`\mu` in [0, 1). 0 keeps no buffer.
        weight_decay: L2 penalty :math:`\lambda`, added to the gradient before the
            trust ratio is applied and used in its denominator.
        trust_coefficient: :math:`\eta` of the paper.
        eps: added to the trust ratio's denominator.
        dampening: dampening of the momentum, in [0, 1]; not applied on the first step.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        trust_clip: LARC "clip" mode, ``r = min(r / lr, 1)``.
        adapt_only_decayed: adapt only groups whose ``weight_decay`` is not 0 (timm
            ``Lars`` without ``always_adapt``, lightly); default: every group whose
            ``trust_ratio`` is True.
        ratio_denominator: what the trust ratio divides by. ``"sum_of_norms"``
            (default, the paper, timm, apex LARC): ``||g|| + wd ||w|| + eps``;
            ``"norm_of_sum"`` (Barlow Twins, VICReg, SimCLR): ``||g + wd w|| + eps``;
            ``"momentum_update"`` (SimCLR ``classic_momentum=False``): the ratio is applied
            after momentum, ``d = g + wd w`` goes into the buffer unscaled, ``u`` is the
            buffer (or ``d + mu buf`` with nesterov, ``d`` without momentum),
            ``r = eta ||w|| / (||u|| + eps)`` and ``w -= lr r u``. The zero-norm test
            reads the same norm (``||g||``, ``||g + wd w||``, ``||u||``).
        zero_norm: where the ratio's test finds a zero norm: ``"ratio_one"`` (default):
            ``r = 1``, the decay is still applied (and trust_clip still clips it);
            ``"plain_sgd"`` (apex LARC): the tensor steps with ``d = g``, neither
            adapted nor decayed (momentum as usual). Only adapted groups are concerned.
        trust_bounds: ``(low, high)`` with ``0 <= low <= high`` (high may be inf): a
            computed ratio is clamped to it, after trust_clip; the ratio 1 of the
            zero-norm rule and groups that do not adapt are left alone. None: no clamp.
        lr_in_momentum: the learning rate goes into the momentum buffer (SimCLR
            ``classic_momentum=True``, MLPerf ResNet-50): ``d = lr r (g + wd w)``,
            ``buf = d`` then ``mu buf + (1 - dampening) d``, ``w -= buf`` (``d + mu buf``
            with nesterov, ``d`` without momentum). The same steps as the default only
            at a constant lr; the buffer then holds lr times SGD's. Not combinable with
            ``ratio_denominator="momentum_update"``.
        backend: ``"auto"`` (the fastest available for the parameters' device),
            ``"triton"`` / ``"cuda"`` (fused multi-tensor kernels, CUDA), ``"cpu"``
            (fused C++ kernels), ``"foreach"`` (multi-tensor ``torch._foreach_*``) or
            ``"reference"`` (one tensor at a time; the oracle).
        master_weights: keep an fp32 copy of every bf16/fp16 parameter in
            ``state["master_param"]`` and update that copy.
        skip_nonfinite: skip (and count in :attr:`skipped_steps`) a step whose
            gradients or norms are not finite, instead of raising
            ``FloatingPointError``. The decision is taken on the device.
        capturable: the step can be captured in a CUDA graph (``backend="triton"`` or
            ``"cuda"``, ``skip_nonfinite=True``; take one eager step first, which creates
            the state). Give ``lr`` as a one-element tensor on the device so that a
            scheduler's in-place updates reach the graph. Without this flag the
            fused GPU steps are host-sync free as well; the flag adds the checks.
        maximize: maximize the objective (ascend the gradient), per group, as torch.optim.
        foreach, fused: torch.optim's implementation flags, as a way to choose the
            backend: ``foreach=True`` is ``"foreach"``, ``fused=True`` the fused backend
            of the parameters' device; False rules one out of ``"auto"``.
        differentiable: must be False (the step is not differentiable).
        one_launch: ``backend="triton"`` steps each (device, dtype) in one kernel launch
            instead of two passes (norms, then update): a tensor is updated right after
            its own norms, while it is likely still in L2. Off by default; GPU speed not
            yet measured. The decision to step must be known before the kernel: from
            GradScaler's ``found_inf``, else from a read of every gradient before it (the
            gate's pre-read); a tensor whose sums of squares overflow although its
            gradient is finite is left unchanged (the other tensors step). Refused with
            sharded (FSDP2) parameters and, for LAMB, ``max_grad_norm > 0``
            (docs/contract.md, "one_launch").

    State per parameter: ``momentum_buffer`` (fp32, fp64 for fp64 parameters), the
    same name and meaning as ``torch.optim.SGD`` so checkpoints move between them.
    ``p.grad`` is never modified.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, dampening: float = 0.0,
                 nesterov: bool = False, trust_clip: bool = False, *, adapt_only_decayed: bool = False,
                 ratio_denominator: str = "sum_of_norms", zero_norm: str = "ratio_one",
                 trust_bounds: tuple[float, float] | None = None, lr_in_momentum: bool = False,
                 maximize: bool = False,
                 backend: str = "auto", master_weights: bool = False, skip_nonfinite: bool = False,
                 capturable: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 differentiable: bool = False, one_launch: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, dampening=dampening,
                        nesterov=nesterov, trust_clip=trust_clip, trust_ratio=True, adapt_only_decayed=adapt_only_decayed,
                        ratio_denominator=ratio_denominator, zero_norm=zero_norm, trust_bounds=trust_bounds,
                        lr_in_momentum=lr_in_momentum, maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         skip_nonfinite=skip_nonfinite, capturable=capturable, foreach=foreach, fused=fused,
                         differentiable=differentiable, one_launch=one_launch)

    _kernel_prefix = "lars"

    def _validate_group(self, group: dict[str, Any], where: str, in_step: bool = False) -> None:
        self._validate_common(group, where, in_step)
        check_number("momentum", group["momentum"], high=1.0, high_open=True, where=where)
        check_number("dampening", group["dampening"], high=1.0, where=where)
        check_number("weight_decay", group["weight_decay"], where=where)
        check_number("trust_coefficient", group["trust_coefficient"], where=where)
        check_number("eps", group["eps"], where=where)
        for flag in ("nesterov", "trust_clip", "trust_ratio", "adapt_only_decayed", "lr_in_momentum"):
            check_flag(flag, group[flag], where=where)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"nesterov=True{where} requires momentum > 0 and dampening = 0")
        check_choice("ratio_denominator", group["ratio_denominator"], RATIO_DENOMINATORS, where=where)
        check_choice("zero_norm", group["zero_norm"], ZERO_NORM_RULES, where=where)
        check_trust_bounds(group["trust_bounds"], where=where)
        if group["lr_in_momentum"] and group["ratio_denominator"] == "momentum_update":
            raise ValueError(f"lr_in_momentum=True{where} cannot be combined with ratio_denominator="
                             "'momentum_update' (the ratio of the update would scale a buffer holding lr)")

    _hyper_of = staticmethod(lars_hyper)

    def _eager(self) -> EagerPath:
        return _EAGER_PATHS[self.backend]

    def _state_keys_for(self, hyper: LarsHyper) -> tuple[str, ...]:
        return ("momentum_buffer",) if hyper.momentum != 0 else ()

    def _new_state(self, p: Tensor, state: dict[str, Any], hyper: LarsHyper, dtype: torch.dtype) -> None:
        """The momentum buffer starts as the first update direction (SGD's rule): the
        reference and foreach updates make it from d; the fused kernels write d into a
        buffer that exists, made here (the plan's ``first`` flags that step)."""
        if creates_buffer(hyper, state) and backends.get(self.backend).fused:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _first_steps(self, b: Bucket) -> list[bool]:
        return [creates_buffer(b.hyper, st) for st in b.states]

    def _norms(self, b: Bucket, inv_scale: Tensor | None) -> list[Tensor]:
        """[||g||, ||w||] (see TrustRatioOptimizer._norms), and for an adapted group whose
        ratio_denominator is not "sum_of_norms" the norm its ratio divides by: ||g + wd w||
        or ||u||, the update after momentum (read-only: the buffers are not written)."""
        norms = super()._norms(b, inv_scale)
        h = b.hyper
        if len(norms) == 1 or not (h.norm_of_sum or h.after_momentum):
            return norms
        grads = [g.to(b.compute_dtype) for g in b.grads]
        if inv_scale is not None:
            grads = torch._foreach_mul(grads, inv_scale)
        d = torch._foreach_add(grads, self._weights_for_norm(b), alpha=h.weight_decay)
        if h.after_momentum and h.momentum != 0:
            d = _momentum_direction(d, [st.get("momentum_buffer") for st in b.states], h)
        return [*norms, self._eager().norms(d, b.compute_dtype)]

    def _update(self, buckets: list[Bucket], norms, inv_scale: Tensor | None, ok: Tensor | None) -> None:
        path = self._eager()
        ratios = []  # per bucket, for layer_stats
        for b, bucket_norms in zip(buckets, norms):
            h = b.hyper
            r = w_norm = x_norm = None
            if h.adapt:
                g_norm, w_norm = bucket_norms[:2]
                x_norm = bucket_norms[2] if len(bucket_norms) > 2 else g_norm  # the denominator's norm
                r = group_trust_ratio(h, w_norm, x_norm, h.lr)
            ratios.append(r)
            decay = lars_decay(h, w_norm, x_norm)
            # the ratio scales d before momentum, or the update after it ("momentum_update")
            pre, post = (None, r) if h.after_momentum else (r, None)
            if h.lr_in_momentum:  # d = (lr r) (g + wd w), w -= buf
                pre = h.lr if pre is None else h.lr * pre
            factors = (pre, post, decay)
            vectors = [x for x in factors if _per_tensor(x)]  # sliced with the bucket
            packed = None if not vectors else vectors[0] if len(vectors) == 1 else torch.stack(vectors, 1)
            for part, packed_part in path.pieces(b, packed):
                parts = iter([packed_part] if len(vectors) == 1 else packed_part.unbind(1) if vectors else ())
                pre_p, post_p, decay_p = (next(parts) if _per_tensor(x) else x for x in factors)
                path.step(part, pre_p, post_p, decay_p, inv_scale, ok, h)
        return ratios

    def _ratio_from_sums(self, h: LarsHyper, fused, inv_scale: Tensor | None):
        """layer_stats of a fused step: ‖w‖, ‖g‖ and the ratio from the kernels' per-tensor
        sums; for the denominators "norm_of_sum" and "momentum_update", the kernels' sum of
        the squares of the vector measured (SumColumn.U2, csrc/fastlars_math.h lars_denominator)."""
        sums = fused.sums
        w_norm, g_norm = _layer_stats.sum_norms(sums, inv_scale)
        if not h.adapt:
            return w_norm, g_norm, None
        x_norm = sums[:, SumColumn.U2].sqrt() if h.norm_of_sum or h.after_momentum else g_norm
        return w_norm, g_norm, group_trust_ratio(h, w_norm, x_norm, scalar_lr(fused.lr))


def _per_tensor(x) -> bool:
    """A factor with one value per tensor (a 1-D tensor), not one for the bucket."""
    return isinstance(x, Tensor) and x.dim() == 1


def _momentum_direction(d: list[Tensor], bufs: list[Tensor | None], h: LarsHyper) -> list[Tensor]:
    """The update after momentum, u, as the step will form it from d, without writing the
    buffers (the norms phase of ratio_denominator="momentum_update"): buf' = d on the
    first step, else mu buf + (1 - dampening) d; u = d + mu buf' (nesterov) or buf'."""
    momentum = h.momentum
    new = [di if buf is None else buf * momentum + h.one_minus_dampening * di for di, buf in zip(d, bufs)]
    return torch._foreach_add(d, new, alpha=momentum) if h.nesterov else new


# the oracle runs as eager torch computes it, under torch.compile too: torch 2.11's dynamo
# rewrites t.add_(x, alpha=a) as t.add_(x * a), one more rounding than eager's fused kernel
@torch._disable_dynamo
def _lars_reference(b: Bucket, pre, post: Tensor | None, decay, inv_scale: Tensor | None, ok: Tensor | None,
                    h: LarsHyper) -> None:
    """One parameter at a time, line by line as docs/contract.md, "LARS". The oracle of every other backend.

    ``pre``: the ratio applied to d (lr r with lr_in_momentum), per tensor, one number or
    None (1); ``post``: the ratio applied after momentum ("momentum_update") or None;
    ``decay``: the weight decay, one number or per tensor (zero_norm="plain_sgd")."""
    if ok is not None and not bool(ok):  # the oracle may read the flag on the host
        return
    lr, momentum, nesterov = h.lr, h.momentum, h.nesterov
    for i, (w, g, state) in enumerate(zip(b.weights, b.grads, b.states)):
        g = g.to(b.compute_dtype)
        if inv_scale is not None:
            g = g * inv_scale
        ratio = 1.0 if pre is None else pre[i] if _per_tensor(pre) else pre
        d = ratio * (g + (decay[i] if _per_tensor(decay) else decay) * w)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.clone(memory_format=torch.preserve_format)
            else:
                buf.mul_(momentum).add_(d, alpha=h.one_minus_dampening)
            d = d + momentum * buf if nesterov else buf
        if post is not None:
            d = post[i] * d
        if h.lr_in_momentum:
            w.sub_(d)
        else:
            w.add_(d, alpha=-lr)


def _lars_foreach(b: Bucket, pre, post: Tensor | None, decay, inv_scale: Tensor | None, ok: Tensor | None,
                  h: LarsHyper) -> None:
    """Multi-tensor LARS on one bucket: a fixed sequence of ``torch._foreach_*`` ops,
    no host reads. ``ok`` (a 0-d bool tensor) makes the writes conditional. ``pre``,
    ``post``, ``decay``: as _lars_reference."""
    lr, momentum, nesterov, lr_in_momentum = h.lr, h.momentum, h.nesterov, h.lr_in_momentum
    weights = b.weights
    grads = b.grads if not b.low_precision else [g.to(b.compute_dtype) for g in b.grads]
    if inv_scale is not None:
        grads = torch._foreach_mul(grads, inv_scale)
    if pre is not None:
        pre = pre.unbind() if _per_tensor(pre) else pre

    # d = r * (g + wd * w); never written into p.grad
    if _per_tensor(decay):  # zero_norm="plain_sgd": 0 for the tensors that step as plain SGD
        d = torch._foreach_add(grads, torch._foreach_mul(weights, decay.unbind()))
        if pre is not None:
            torch._foreach_mul_(d, pre)
    elif decay != 0:
        d = torch._foreach_add(grads, weights, alpha=decay)
        if pre is not None:
            torch._foreach_mul_(d, pre)
    elif pre is not None:
        d = torch._foreach_mul(grads, pre)
    else:
        d = grads  # read-only from here on

    if momentum != 0:
        bufs = [st.get("momentum_buffer") for st in b.states]
        if any(buf is None for buf in bufs):
            # first step of some parameters (never with a device-side `ok`, see _gate)
            old = [i for i, buf in enumerate(bufs) if buf is not None]
            if old:
                old_bufs = [bufs[i] for i in old]
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, [d[i] for i in old], alpha=h.one_minus_dampening)
            for i, st in enumerate(b.states):
                if bufs[i] is None:
                    bufs[i] = st["momentum_buffer"] = d[i].clone(memory_format=torch.preserve_format)
        elif ok is None:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, d, alpha=h.one_minus_dampening)
        else:
            new_bufs = torch._foreach_mul(bufs, momentum)
            torch._foreach_add_(new_bufs, d, alpha=h.one_minus_dampening)
            where_(ok, new_bufs, bufs)
            bufs = new_bufs
        if nesterov:
            d = torch._foreach_add(d, bufs, alpha=momentum)
        else:
            d = bufs
    if post is not None:  # ratio_denominator="momentum_update"
        d = torch._foreach_mul(d, post.unbind())

    step_lr = 1.0 if lr_in_momentum else lr  # lr_in_momentum: w -= buf, which holds lr
    if ok is None:
        descend(weights, d, step_lr, in_place=True)
    else:
        where_(ok, descend(weights, d, step_lr, in_place=False), weights)


_EAGER_PATHS = {"reference": EagerPath(one_at_a_time_norms, whole_bucket, _lars_reference),
                "foreach": EagerPath(foreach_norms, cache_sized_slices, _lars_foreach)}
