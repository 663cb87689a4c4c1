"""LAMB: layer-wise adaptive moments (You et al. 2019, "Large Batch Optimization
for Deep Learning"). Layout as apex ``FusedLAMB``; the contract is docs/contract.md, "LAMB":

    g  = g / max(1, (||all grads|| + grad_norm_eps) / max_grad_norm)   if max_grad_norm > 0
    g  = g + wd * w                                       decay_mode "l2" only
    m  = b1 * m + (1 - b1) * g                            ((1 - b1) -> 1 without grad_averaging)
    v  = b2 * v + (1 - b2) * g^2
    u  = m_hat / (sqrt(v_hat) + eps) + wd * w             (hats: bias correction with step t; "+ wd * w"
                                                           in decay_mode "update" only; sqrt(v_hat + eps)
                                                           with eps_inside_sqrt)
    w  = w * (1 - lr * wd)                                decay_mode "direct" only
    r  = ||w|| / ||u||   (1 if either is 0 or not adapted);  r = min(r, 1) if trust_clip;
                                                          r = clamp(r, *trust_bounds) if computed
    w  = w - lr * r * u                                   (bias_correction_in_lr: hats off in u,
                                                           lr * sqrt(1 - b2^t) / (1 - b1^t) here)

The variants and the peers they come from are in docs/contract.md, "LAMB".
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .._tensors import has_state
from ..ops.layouts import SumColumn
from . import _layer_stats
from ._buckets import (Bucket, EagerPath, cache_sized_slices, descend, foreach_norms, one_at_a_time_norms, where_,
                       whole_bucket)
from ._checks import check_choice, check_flag, check_number, check_trust_bounds, scalar_lr
from ._common import TrustRatioOptimizer
from ._hyper import LambHyper, lamb_hyper

__all__ = ["LAMB", "lamb_trust_ratio"]


DECAY_MODES = ("update", "l2", "direct")


def lamb_trust_ratio(w_norm: Tensor, u_norm: Tensor, *, trust_clip: bool,
                     trust_bounds: tuple[float, float] | None = None) -> Tensor:
    """Trust ratio of each layer from its norms. The single definition every LAMB backend uses.

    ``trust_bounds`` clamps a computed ratio only, after trust_clip; the zero-norm ratio
    stays 1 (DeepSpeed csrc/lamb/fused_lamb_cuda_kernel.cu, lamb_cuda_kernel_part3: the
    clamp to [min_coeff, max_coeff] sits inside its ``reg_w != 0 && reg_u != 0`` branch).
    """
    computed = (w_norm > 0) & (u_norm > 0)
    r = torch.where(computed, w_norm / u_norm, torch.ones_like(w_norm))
    r = torch.clamp(r, max=1.0) if trust_clip else r
    if trust_bounds is not None:
        r = torch.where(computed, torch.clamp(r, min=trust_bounds[0], max=trust_bounds[1]), r)
    return r


class LAMB(TrustRatioOptimizer):
    r"""LAMB, as ``torch.optim.AdamW`` with a per-layer trust ratio.

    Args:
        params: parameters or param groups. A group may set ``trust_ratio=False``
            to apply plain AdamW-style updates to it (see :func:`fastlars.param_groups`).
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator :math:`\sqrt{\hat v}`.
        weight_decay: decoupled weight decay :math:`\lambda`, added to the update
            direction before the trust ratio.
        bias_correction: divide the moments by :math:`1-\beta^t`.
        grad_averaging: use :math:`1-\beta_1` as the gradient's weight in the first
            moment (else 1).
        max_grad_norm: when > 0, gradients are scaled by
            :math:`1/\max(1, \|g\|_{global}/\text{max\_grad\_norm})`, the global norm
            taken over every gradient of the step (all groups). ``p.grad`` is not modified.
        trust_clip: ``r = min(r, 1)``.
        adapt_only_decayed: adapt only groups whose ``weight_decay`` is not 0 (apex
            ``FusedLAMB`` without ``use_nvlamb``, timm ``Lamb`` without ``always_adapt``).
        decay_mode: where :math:`\lambda` acts. ``"update"``: :math:`+\lambda w` in the direction
            u (apex ``adam_w_mode=True``, timm's default). ``"l2"``: :math:`\lambda w` added to
            the gradient after unscaling and clipping, before the moments (apex
            ``adam_w_mode=False``). ``"direct"``: :math:`w \leftarrow w(1-\text{lr}\,\lambda)`
            before the trust ratio, whose :math:`\|w\|` is of the decayed weights, and no
            :math:`\lambda w` in u (timm ``decoupled_decay=True``).
        eps_inside_sqrt: the denominator is :math:`\sqrt{\hat v + \epsilon}` (DeepSpeed).
        trust_bounds: ``(low, high)``: a computed ratio is clamped to it after ``trust_clip``;
            the ratio 1 of a zero norm or of a group that does not adapt is kept (DeepSpeed's
            ``min_coeff``, ``max_coeff``).
        bias_correction_in_lr: the direction and the ratio use the uncorrected moments, and
            the step is :math:`\text{lr}\sqrt{1-\beta_2^t}/(1-\beta_1^t)\,r\,u` (DeepSpeed);
            needs ``bias_correction=True``.
        grad_norm_eps: clipping divides by :math:`\max(1, (\|g\|_{global} + \text{grad\_norm\_eps})
            / \text{max\_grad\_norm})` (DeepSpeed adds 1e-6).
        maximize, backend, master_weights, skip_nonfinite, capturable, foreach, fused,
            differentiable, one_launch: as :class:`fastlars.LARS` (one_launch refuses
            ``max_grad_norm > 0``: clipping needs the global gradient norm first).

    State per parameter: ``step`` (a float32 tensor on the parameter's device),
    ``exp_avg``, ``exp_avg_sq`` (fp32; fp64 for fp64 parameters): the names of
    ``torch.optim.AdamW``, so its checkpoints load here.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 grad_averaging: bool = True, max_grad_norm: float = 0.0, trust_clip: bool = False, *,
                 adapt_only_decayed: bool = False, decay_mode: str = "update", eps_inside_sqrt: bool = False,
                 trust_bounds: tuple[float, float] | None = None, bias_correction_in_lr: bool = False,
                 grad_norm_eps: float = 0.0, maximize: bool = False, backend: str = "auto", master_weights: bool = False,
                 skip_nonfinite: bool = False, capturable: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, differentiable: bool = False, one_launch: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, grad_averaging=grad_averaging,
                        max_grad_norm=max_grad_norm, trust_clip=trust_clip, trust_ratio=True,
                        adapt_only_decayed=adapt_only_decayed, decay_mode=decay_mode, eps_inside_sqrt=eps_inside_sqrt,
                        trust_bounds=trust_bounds, bias_correction_in_lr=bias_correction_in_lr,
                        grad_norm_eps=grad_norm_eps, maximize=maximize)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         skip_nonfinite=skip_nonfinite, capturable=capturable, foreach=foreach, fused=fused,
                         differentiable=differentiable, one_launch=one_launch)

    _kernel_prefix = "lamb"

    def _validate_group(self, group: dict[str, Any], where: str, in_step: bool = False) -> None:
        self._validate_common(group, where, in_step)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas{where} must be a pair of numbers, got {betas!r}")
        for i in (0, 1):
            check_number(f"betas[{i}]", betas[i], high=1.0, high_open=True, where=where,
                         label=f"beta parameter at index {i}")
        check_number("eps", group["eps"], where=where)
        check_number("weight_decay", group["weight_decay"], where=where)
        check_number("max_grad_norm", group["max_grad_norm"], where=where)
        check_number("grad_norm_eps", group["grad_norm_eps"], where=where)
        for flag in ("bias_correction", "grad_averaging", "trust_clip", "trust_ratio", "adapt_only_decayed",
                     "eps_inside_sqrt", "bias_correction_in_lr"):
            check_flag(flag, group[flag], where=where)
        check_choice("decay_mode", group["decay_mode"], DECAY_MODES, where=where)
        check_trust_bounds(group["trust_bounds"], where=where)
        if group["bias_correction_in_lr"] and not group["bias_correction"]:
            raise ValueError(f"bias_correction_in_lr=True{where} needs bias_correction=True: it moves the "
                             "bias corrections from the moments into the step size")

    _hyper_of = staticmethod(lamb_hyper)

    def _eager(self) -> EagerPath:
        return _EAGER_PATHS[self.backend]

    def _state_keys_for(self, hyper: LambHyper) -> tuple[str, ...]:
        return _STATE_KEYS

    def _new_state(self, p: Tensor, state: dict[str, Any], hyper: LambHyper, dtype: torch.dtype) -> None:
        if not has_state(state, "step"):
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in ("exp_avg", "exp_avg_sq"):
            if not has_state(state, key):
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _norms_phase(self, buckets: list[Bucket], inv_scale: Tensor | None):
        """Sharded parameters (FSDP2) need the global ||u|| as well as ||w|| and ||g||.

        u depends on the clipping factor, so with ``max_grad_norm > 0`` the step makes two
        all-reduces: ||g||, ||w|| of every tensor, then ||u|| of every adapted tensor.
        Without clipping u needs nothing global, and one all-reduce carries all three.
        u is computed here (read-only) and again in the update, as the fused kernels do.
        """
        if self._mesh is None:
            return super()._norms_phase(buckets, inv_scale)
        norms = [self._norms(b, inv_scale) for b in buckets]  # [||g||, ||w||], local
        clipping = _clipping(buckets)
        if clipping:
            norms = self._global_norms(buckets, norms)
        global_norm = _global_grad_norm(buckets, norms) if clipping else None
        path = self._eager()
        for b, bucket_norms in zip(buckets, norms):
            if b.hyper.adapt:
                fresh = replace(b, weights=[w.to(b.compute_dtype) for w in self._weights_for_norm(b)],
                                states=[self._state_or_fresh(p, st, b) for p, st in zip(b.params, b.states)])
                bucket_norms.append(torch.cat([path.step(part, None, _grad_factor(b, global_norm, inv_scale), None,
                                                         b.hyper, u_norm_only=True)
                                               for part, _ in path.pieces(fresh, None)]))
        norms = self._global_norms(buckets, norms, start=2 if clipping else 0)
        return norms, [n for bucket_norms in norms for n in bucket_norms]

    def _states_before_gate(self, b: Bucket) -> list:
        return [self._state_or_fresh(p, st, b) for p, st in zip(b.params, b.states)]

    def _state_or_fresh(self, p: Tensor, state, b: Bucket):
        """The parameter's state, or where some of it is not created yet, the state the
        update will find (not stored): what exists, and fresh zeros for the rest."""
        if all(has_state(state, key) for key in _STATE_KEYS):
            return state
        fresh: dict[str, Any] = {key: value for key, value in state.items() if value is not None}
        self._new_state(p, fresh, b.hyper, b.compute_dtype)
        return fresh

    def _update(self, buckets: list[Bucket], norms, inv_scale: Tensor | None, ok: Tensor | None) -> None:
        global_norm = _global_grad_norm(buckets, norms) if _clipping(buckets) else None
        path = self._eager()
        ratios = []  # per bucket, for layer_stats
        for b, bucket_norms in zip(buckets, norms):
            # per adapted tensor: ||w||, and the global ||u|| when sharded (else computed in the step)
            per_tensor = torch.stack(bucket_norms[1:], dim=1) if b.hyper.adapt else None
            parts = [path.step(part, part_norms, _grad_factor(b, global_norm, inv_scale), ok, b.hyper)
                     for part, part_norms in path.pieces(b, per_tensor)]
            ratios.append(None if per_tensor is None or parts[0] is None else parts)  # concatenated by layer_stats
        return ratios

    def _ratio_from_sums(self, h: LambHyper, fused, inv_scale: Tensor | None):
        """layer_stats of a fused step: ‖w‖, ‖g‖ and the trust ratio from the kernels' sums
        (W2, G2, U2), by lamb_trust_ratio as the kernels apply it."""
        w_norm, g_norm = _layer_stats.sum_norms(fused.sums, inv_scale)
        if not h.adapt:
            return w_norm, g_norm, None
        direct_decay = h.direct_decay
        w_ratio_norm = w_norm * abs(1 - scalar_lr(fused.lr) * direct_decay) if direct_decay != 0 else w_norm
        ratio = lamb_trust_ratio(w_ratio_norm, fused.sums[:, SumColumn.U2].sqrt(), trust_clip=h.trust_clip,
                                 trust_bounds=h.bounds)
        return w_norm, g_norm, ratio


_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _clipping(buckets: list[Bucket]) -> bool:
    return any(b.hyper.max_grad_norm > 0 for b in buckets)


def _global_grad_norm(buckets: list[Bucket], norms) -> Tensor:
    """One norm over every gradient of the step, whatever its group or device."""
    device = buckets[0].device
    return torch.stack([bucket_norms[0].double().square().sum().to(device) for bucket_norms in norms]).sum().sqrt()


def _grad_factor(b: Bucket, global_norm: Tensor | None, inv_scale: Tensor | None) -> Tensor | None:
    """What the bucket's gradients are multiplied by: unscaling and global-norm clipping."""
    if b.hyper.max_grad_norm <= 0:
        return inv_scale
    # g / max(1, (G + grad_norm_eps) / max): apex csrc/multi_tensor_lamb.cu, LAMBStage1Functor divides g by
    # G / max when G > max (the same, to rounding); DeepSpeed deepspeed/ops/lamb/fused_lamb.py, FusedLamb.step
    # adds 1e-6 to G before dividing by max_grad_norm
    norm = global_norm.to(b.device) + b.hyper.grad_norm_eps
    clip = torch.clamp(norm / b.hyper.max_grad_norm, min=1.0).reciprocal().to(b.compute_dtype)
    return clip if inv_scale is None else clip * inv_scale


# the oracle runs as eager torch computes it, under torch.compile too: torch 2.11's dynamo
# rewrites t.add_(x, alpha=a) as t.add_(x * a), one more rounding than eager's fused kernel
@torch._disable_dynamo
def _lamb_reference(b: Bucket, norms: Tensor | None, grad_factor: Tensor | None, ok: Tensor | None, h: LambHyper,
                    u_norm_only: bool = False) -> Tensor | None:
    """One parameter at a time, line by line as docs/contract.md, "LAMB". The oracle of every other backend.

    ``norms`` (adapted groups): column 0 ||w||, and column 1 the global ||u|| of sharded
    parameters. ``u_norm_only``: return the local ||u|| per tensor and change nothing.
    ``h.weight_decay``, ``h.grad_decay``, ``h.direct_decay``: the group's decay where its
    decay_mode puts it.
    """
    if ok is not None and not bool(ok):  # the oracle may read the flag on the host
        return None
    lr, beta1, beta2, beta3, eps = h.lr, h.beta1, h.beta2, h.beta3, h.eps
    weight_decay, grad_decay, direct_decay = h.weight_decay, h.grad_decay, h.direct_decay
    moments, directions, step_scales = [], [], []
    for w, g, state in zip(b.weights, b.grads, b.states):
        g = g.to(b.compute_dtype)
        if grad_factor is not None:  # unscaling and global-norm clipping
            g = g * grad_factor
        if grad_decay != 0:  # "l2": after clipping, before the moments (apex csrc/multi_tensor_lamb.cu,
            g = g + grad_decay * w  # LAMBStage1Functor, MOMENT_MODE_0: scaled_grad + decay * p)
        t = state["step"].item() + 1  # reference only
        m = state["exp_avg"].mul(beta1).add_(g, alpha=beta3)
        v = state["exp_avg_sq"].mul(beta2).addcmul_(g, g, value=h.one_minus_beta2)
        if h.bias_correction_in_lr:  # DeepSpeed csrc/lamb/fused_lamb_cuda_kernel.cu, fused_lamb_cuda: step_size =
            m_hat, v_hat = m, v  # lr sqrt(bc2) / bc1, and lamb_cuda_kernel_part1/3 use m, v uncorrected
            step_scales.append(math.sqrt(1 - beta2**t) / (1 - beta1**t))
        else:
            m_hat, v_hat = (m / (1 - beta1**t), v / (1 - beta2**t)) if h.bias_correction else (m, v)
        moments.append((m, v))
        # eps_inside_sqrt: DeepSpeed lamb_cuda_kernel_part1/3, ADAM_MODE_0: sqrtf(v + eps)
        denom = (v_hat + eps).sqrt() if h.eps_inside_sqrt else v_hat.sqrt() + eps
        directions.append(m_hat / denom + weight_decay * w)
    if u_norm_only:
        return _stacked_norms(directions)
    # "direct": timm timm/optim/lamb.py, _single_tensor_lamb: p decayed by lr * wd before p.norm() of the
    # trust ratio, and no wd * p in the update; ||w (1 - lr wd)|| formed as |1 - lr wd| ||w||
    decay = 1 - lr * direct_decay
    ratios = [1.0] * len(directions)
    if norms is not None:
        u_norm = norms[:, 1] if norms.shape[1] > 1 else _stacked_norms(directions)
        w_norm = norms[:, 0] * abs(decay) if direct_decay != 0 else norms[:, 0]
        trust = lamb_trust_ratio(w_norm, u_norm, trust_clip=h.trust_clip, trust_bounds=h.bounds)
        ratios = trust.unbind()
    if step_scales:
        ratios = [r * s for r, s in zip(ratios, step_scales)]
    for w, state, (m, v), u, r in zip(b.weights, b.states, moments, directions, ratios):
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
        state["step"] += 1
        if direct_decay != 0:
            w.mul_(decay)
        w.add_(r * u, alpha=-lr)
    return trust if norms is not None else None  # the trust ratios, for layer_stats


def _stacked_norms(tensors: list[Tensor]) -> Tensor:
    return torch.stack([torch.linalg.vector_norm(t) for t in tensors])


def _lamb_foreach(b: Bucket, norms: Tensor | None, grad_factor: Tensor | None, ok: Tensor | None, h: LambHyper,
                  u_norm_only: bool = False) -> Tensor | None:
    """Multi-tensor LAMB on one bucket: a fixed sequence of ``torch._foreach_*`` ops,
    no host reads (the bias corrections are computed from the device ``step``s).
    ``ok`` (a 0-d bool tensor) makes the writes conditional; ``norms`` and
    ``u_norm_only`` as in ``_lamb_reference``."""
    lr, beta1, beta2, beta3, eps = h.lr, h.beta1, h.beta2, h.beta3, h.eps
    weight_decay, grad_decay, direct_decay = h.weight_decay, h.grad_decay, h.direct_decay
    bias_correction, bias_correction_in_lr = h.bias_correction, h.bias_correction_in_lr
    weights = b.weights
    grads = b.grads if not b.low_precision else [g.to(b.compute_dtype) for g in b.grads]
    if grad_factor is not None:
        grads = torch._foreach_mul(grads, grad_factor)
    if grad_decay != 0:  # "l2", as _lamb_reference
        grads = torch._foreach_add(grads, weights, alpha=grad_decay)
    steps = [st["step"] for st in b.states]
    exp_avgs = [st["exp_avg"] for st in b.states]
    exp_avg_sqs = [st["exp_avg_sq"] for st in b.states]

    in_place = ok is None and not u_norm_only
    if in_place:
        torch._foreach_add_(steps, 1.0)
        t, m, v = steps, exp_avgs, exp_avg_sqs
        torch._foreach_mul_(m, beta1)
    else:  # new values beside the state: a skipped step leaves step, m, v, w as they were
        t = torch._foreach_add(steps, 1.0)
        m = torch._foreach_mul(exp_avgs, beta1)
        v = torch._foreach_mul(exp_avg_sqs, 1.0)
    torch._foreach_add_(m, grads, alpha=beta3)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=h.one_minus_beta2)

    # u = (m / bc1) / (sqrt(v / bc2) + eps) + wd * w, in the reference's order of operations
    step_scales = None
    if bias_correction:
        # 1 - beta^t as -expm1(t * ln beta): pow in fp32 loses ~1e-4 of 1 - 0.999^t to cancellation
        # in the compute dtype: t * ln(beta) rounded to fp32 would leave fp64 parameters 1e-8 off
        t_acc = [x.to(b.compute_dtype) for x in t]
        bc1 = torch._foreach_mul(t_acc, h.log_beta1)
        bc2 = torch._foreach_mul(t_acc, h.log_beta2)
        for bc in (bc1, bc2):
            torch._foreach_expm1_(bc)
            torch._foreach_neg_(bc)
    if bias_correction and not bias_correction_in_lr:
        u = torch._foreach_div(m, bc1)
        v_hat = torch._foreach_div(v, bc2)
    else:
        u = torch._foreach_mul(m, 1.0)
        v_hat = v
        if bias_correction:  # bias_correction_in_lr: sqrt(bc2) / bc1 scales the step
            step_scales = torch._foreach_sqrt(bc2)
            torch._foreach_div_(step_scales, bc1)
    if h.eps_inside_sqrt:
        denom = torch._foreach_add(v_hat, eps)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(v_hat)
        torch._foreach_add_(denom, eps)
    torch._foreach_div_(u, denom)
    if weight_decay != 0:
        torch._foreach_add_(u, weights, alpha=weight_decay)

    if u_norm_only:
        return torch.stack(torch._foreach_norm(u, 2))
    decay = 1 - lr * direct_decay  # "direct", as _lamb_reference
    ratios = step_scales
    if norms is not None:
        u_norm = norms[:, 1] if norms.shape[1] > 1 else torch.stack(torch._foreach_norm(u, 2))
        w_norm = norms[:, 0] * abs(decay) if direct_decay != 0 else norms[:, 0]
        trust = lamb_trust_ratio(w_norm, u_norm, trust_clip=h.trust_clip, trust_bounds=h.bounds)
        ratios = trust.unbind()
        if step_scales is not None:
            ratios = torch._foreach_mul(ratios, step_scales)
    if ratios is not None:
        torch._foreach_mul_(u, ratios)

    if ok is None:
        if direct_decay != 0:
            torch._foreach_mul_(weights, decay)
        descend(weights, u, lr, in_place=True)
    else:
        # one 0-d addend per step tensor: torch's CPU path reads a single tensor addend on the host
        torch._foreach_add_(steps, [ok.to(torch.float32)] * len(steps))
        where_(ok, m, exp_avgs)
        where_(ok, v, exp_avg_sqs)
        decayed = torch._foreach_mul(weights, decay) if direct_decay != 0 else weights
        where_(ok, descend(decayed, u, lr, in_place=False), weights)
    return trust if norms is not None else None  # the trust ratios, for layer_stats


_EAGER_PATHS = {"reference": EagerPath(one_at_a_time_norms, whole_bucket, _lamb_reference),
                "foreach": EagerPath(foreach_norms, cache_sized_slices, _lamb_foreach)}
