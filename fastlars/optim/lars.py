"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017).

Layout as timm ``Lars`` / apex ``LARC``; the contract is docs/contract.md, "LARS":

    r   = eta * ||w|| / (||g|| + wd * ||w|| + eps)   (1 if ||w|| or ||g|| is 0; 1 if not adapted)
    r   = min(r / lr, 1)                              if trust_clip (LARC "clip" mode)
    d   = r * (g + wd * w)
    buf = d  (first step),  mu * buf + (1 - dampening) * d  (afterwards)
    d   = d + mu * buf  if nesterov  else buf
    w   = w - lr * d
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import backends
from ..ops import _tables
from ._buckets import Bucket, cache_sized_slices, where_
from ._checks import check_flag, check_number, scalar_lr
from ._common import TrustRatioOptimizer

__all__ = ["LARS", "lars_trust_ratio"]


def lars_trust_ratio(w_norm: Tensor, g_norm: Tensor, *, lr: float, trust_coefficient: float,
                     weight_decay: float, eps: float, trust_clip: bool) -> Tensor:
    """Trust ratio of each layer from its norms (tensors of any matching shape).

    The single definition every LARS backend uses.
    """
    r = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
    r = torch.where((w_norm > 0) & (g_norm > 0), r, torch.ones_like(r))
    if trust_clip:
        # min(r / lr, 1); as lr -> 0 the limit is 1, which also avoids 0/0.
        r = torch.clamp(r / lr, max=1.0) if lr > 0 else torch.ones_like(r)
    return r


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

    State per parameter: ``momentum_buffer`` (fp32, fp64 for fp64 parameters), the
    same name and meaning as ``torch.optim.SGD`` so checkpoints move between them.
    ``p.grad`` is never modified.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, dampening: float = 0.0,
                 nesterov: bool = False, trust_clip: bool = False, *, adapt_only_decayed: bool = False,
                 maximize: bool = False,
                 backend: str = "auto", master_weights: bool = False, skip_nonfinite: bool = False,
                 capturable: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 differentiable: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, dampening=dampening,
                        nesterov=nesterov, trust_clip=trust_clip, trust_ratio=True, adapt_only_decayed=adapt_only_decayed,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         skip_nonfinite=skip_nonfinite, capturable=capturable, foreach=foreach, fused=fused,
                         differentiable=differentiable)

    _kernel_prefix = "lars"

    def _validate_group(self, group: dict[str, Any], where: str, in_step: bool = False) -> None:
        self._validate_common(group, where, in_step)
        check_number("momentum", group["momentum"], high=1.0, high_open=True, where=where)
        check_number("dampening", group["dampening"], high=1.0, where=where)
        check_number("weight_decay", group["weight_decay"], where=where)
        check_number("trust_coefficient", group["trust_coefficient"], where=where)
        check_number("eps", group["eps"], where=where)
        for flag in ("nesterov", "trust_clip", "trust_ratio", "adapt_only_decayed"):
            check_flag(flag, group[flag], where=where)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"nesterov=True{where} requires momentum > 0 and dampening = 0")

    def _state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _new_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], dtype: torch.dtype) -> None:
        """The momentum buffer starts as the first update direction (SGD's rule): the
        reference and foreach updates make it from d; the fused kernels write d into a
        buffer that exists, made here (the plan's ``first`` flags that step)."""
        if group["momentum"] != 0 and "momentum_buffer" not in state and backends.get(self.backend).fused:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    _group_row = staticmethod(_tables.lars_group_row)

    def _first_steps(self, b: Bucket) -> list[bool]:
        momentum = b.group["momentum"] != 0
        return [momentum and "momentum_buffer" not in st for st in b.states]

    def _update(self, buckets: list[Bucket], norms, inv_scale: Tensor | None, ok: Tensor | None) -> None:
        step = _lars_reference if self.backend == "reference" else _lars_foreach
        for b, bucket_norms in zip(buckets, norms):
            group = b.group
            lr = scalar_lr(group["lr"])
            r = None
            if _tables.adapts(group):
                g_norm, w_norm = bucket_norms
                r = lars_trust_ratio(w_norm, g_norm, lr=lr, trust_coefficient=group["trust_coefficient"],
                                     weight_decay=group["weight_decay"], eps=group["eps"],
                                     trust_clip=group["trust_clip"])
            slices = [(b, r)] if self.backend == "reference" else cache_sized_slices(b, r)
            for part, r_part in slices:
                step(part, r_part, inv_scale, ok, lr=lr, momentum=group["momentum"],
                     dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"])


# the oracle runs as eager torch computes it, under torch.compile too: torch 2.11's dynamo
# rewrites t.add_(x, alpha=a) as t.add_(x * a), one more rounding than eager's fused kernel
@torch._disable_dynamo
def _lars_reference(b: Bucket, r: Tensor | None, inv_scale: Tensor | None, ok: Tensor | None, *,
                    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool) -> None:
    """One parameter at a time, line by line as docs/contract.md, "LARS". The oracle of every other backend."""
    if ok is not None and not bool(ok):  # the oracle may read the flag on the host
        return
    for i, (w, g, state) in enumerate(zip(b.weights, b.grads, b.states)):
        g = g.to(b.compute_dtype)
        if inv_scale is not None:
            g = g * inv_scale
        ratio = r[i] if r is not None else 1.0
        d = ratio * (g + weight_decay * w)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.clone(memory_format=torch.preserve_format)
            else:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d + momentum * buf if nesterov else buf
        w.add_(d, alpha=-lr)


def _lars_foreach(b: Bucket, r: Tensor | None, inv_scale: Tensor | None, ok: Tensor | None, *,
                  lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool) -> None:
    """Multi-tensor LARS on one bucket: a fixed sequence of ``torch._foreach_*`` ops,
    no host reads. ``ok`` (a 0-d bool tensor) makes the writes conditional."""
    weights = b.weights
    grads = b.grads if not b.low_precision else [g.to(b.compute_dtype) for g in b.grads]
    if inv_scale is not None:
        grads = torch._foreach_mul(grads, inv_scale)

    # d = r * (g + wd * w); never written into p.grad
    if weight_decay != 0:
        d = torch._foreach_add(grads, weights, alpha=weight_decay)
        if r is not None:
            torch._foreach_mul_(d, r.unbind())
    elif r is not None:
        d = torch._foreach_mul(grads, r.unbind())
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
                torch._foreach_add_(old_bufs, [d[i] for i in old], alpha=1 - dampening)
            for i, st in enumerate(b.states):
                if bufs[i] is None:
                    bufs[i] = st["momentum_buffer"] = d[i].clone(memory_format=torch.preserve_format)
        elif ok is None:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, d, alpha=1 - dampening)
        else:
            new_bufs = torch._foreach_mul(bufs, momentum)
            torch._foreach_add_(new_bufs, d, alpha=1 - dampening)
            where_(ok, new_bufs, bufs)
            bufs = new_bufs
        if nesterov:
            d = torch._foreach_add(d, bufs, alpha=momentum)
        else:
            d = bufs

    if ok is None:
        torch._foreach_add_(weights, d, alpha=-lr)
    else:
        where_(ok, torch._foreach_add(weights, d, alpha=-lr), weights)

