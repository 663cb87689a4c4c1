"""The compat constructors, one per peer (see fastlars/compat/__init__.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from ..optim import LAMB, LARS
from ._groups import PeerLayout, as_groups, split_groups

__all__ = ["timm_lars", "timm_lamb", "larc", "ssl_lars", "simclr_lars", "mlperf_lars", "apex_fused_lamb",
           "deepspeed_lamb", "FASTLARS_OPTIONS"]

# the fastlars keywords a compat constructor passes through (the others are the peer's)
FASTLARS_OPTIONS = frozenset({"backend", "master_weights", "skip_nonfinite", "capturable", "foreach", "fused",
                              "maximize"})


def _options(peer: str, options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - FASTLARS_OPTIONS)
    if unknown:
        raise TypeError(f"{peer}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: it takes "
                        f"the peer's own arguments and the fastlars options {sorted(FASTLARS_OPTIONS)}")
    return options


def _refuse(peer: str, name: str, value: Any, why: str) -> None:
    raise ValueError(f"{peer}({name}={value!r}) is not reproduced by fastlars: {why}")


def _attach(optimizer, peer: str, groups: list[dict], group_of: list[int]):
    optimizer.peer_layout = PeerLayout(peer, [p for g in groups for p in _tensors_of(g)], group_of)
    return optimizer


def _tensors_of(group: dict) -> list[Tensor]:
    return [entry[1] if isinstance(entry, tuple) else entry for entry in group["params"]]


def _unsplit(groups: list[dict]) -> list[int]:
    return list(range(len(groups)))


# -- LARS ----------------------------------------------------------------------------


def timm_lars(params, lr: float = 1.0, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
              nesterov: bool = False, trust_coeff: float = 0.001, eps: float = 1e-8, trust_clip: bool = False,
              always_adapt: bool = False, **fastlars_options) -> LARS:
    """timm ``timm.optim.Lars``: adapts where ``weight_decay != 0`` or ``always_adapt``;
    ``trust_clip`` is LARC's ``min(r / lr, 1)``; momentum as ``torch.optim.SGD``. Its
    checkpoints (``momentum_buffer``) load as they are."""
    groups = as_groups(params)
    opt = LARS(groups, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
               trust_coefficient=trust_coeff, eps=eps, trust_clip=trust_clip, adapt_only_decayed=not always_adapt,
               **_options("timm_lars", fastlars_options))
    return _attach(opt, "timm_lars", groups, _unsplit(groups))


def larc(params, lr: float, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
         nesterov: bool = False, trust_coefficient: float = 0.02, clip: bool = True, eps: float = 1e-8,
         **fastlars_options) -> LARS:
    """apex ``LARC(torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov),
    trust_coefficient, clip, eps)`` (VISSL, solo-learn, lightly): every parameter adapts,
    ``clip=True`` is ``min(r / lr, 1)``, and where ``‖w‖`` or ``‖g‖`` is 0 the tensor
    takes a plain SGD step (neither adaptation nor weight decay). Checkpoints are SGD's."""
    groups = as_groups(params)
    for group in groups:
        group.setdefault("trust_ratio", True)  # LARC adapts every parameter with a gradient
    opt = LARS(groups, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
               trust_coefficient=trust_coefficient, eps=eps, trust_clip=clip, zero_norm="plain_sgd",
               **_options("larc", fastlars_options))
    return _attach(opt, "larc", groups, _unsplit(groups))


def _filter(name: str, value: bool | Callable[[Tensor], bool] | None) -> Callable[[Tensor], bool]:
    """Barlow Twins passes bools (True: exclude ``ndim == 1``); VICReg passes the function."""
    if value is None or value is False:
        return lambda p: False
    if value is True:
        return lambda p: p.ndim == 1
    if callable(value):
        return value
    raise TypeError(f"ssl_lars: {name} must be a bool or a callable(param) -> bool, got {type(value).__name__}")


def ssl_lars(params, lr: float, weight_decay: float = 0, momentum: float = 0.9, eta: float = 0.001,
             weight_decay_filter: bool | Callable[[Tensor], bool] = False,
             lars_adaptation_filter: bool | Callable[[Tensor], bool] = False, **fastlars_options) -> LARS:
    """The LARS of Barlow Twins and VICReg (and their copies): ``r = η‖w‖ / ‖g + λw‖`` (no
    eps), ratio 1 where either norm is 0; a filter that is True (or returns True for a
    parameter, VICReg's callables) excludes ``ndim == 1`` parameters from weight decay /
    adaptation. Momentum buffer ``mu`` (loaded by :func:`load_peer_state_dict`)."""
    no_decay, no_adapt = _filter("weight_decay_filter", weight_decay_filter), _filter(
        "lars_adaptation_filter", lars_adaptation_filter)
    groups = as_groups(params)

    def treatment(name, p, group):
        decay = group.get("weight_decay", weight_decay) if not no_decay(p) else 0.0
        return {"weight_decay": decay, "trust_ratio": not no_adapt(p)}

    split, group_of = split_groups(groups, treatment)
    opt = LARS(split, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=eta, eps=0.0,
               ratio_denominator="norm_of_sum", **_options("ssl_lars", fastlars_options))
    return _attach(opt, "ssl_lars", groups, group_of)


def _name_rule(peer: str, argument: str, patterns: Iterable[str] | None, match: Callable[[str, str], bool]):
    """A predicate on parameter names from the peer's list (None: matches nothing)."""
    patterns = list(patterns or ())

    def matches(name: str | None) -> bool:
        if not patterns:
            return False
        if name is None:
            raise ValueError(f"{peer}: {argument} needs parameter names; pass model.named_parameters() "
                             "or (name, tensor) pairs")
        return any(match(pattern, name) for pattern in patterns)

    return matches


def simclr_lars(params, lr: float, momentum: float = 0.9, use_nesterov: bool = False, weight_decay: float = 0.0,
                exclude_from_weight_decay: Iterable[str] | None = None,
                exclude_from_layer_adaptation: Iterable[str] | None = None, classic_momentum: bool = True,
                eeta: float = 0.001, **fastlars_options) -> LARS:
    """SimCLR's LARS (google-research/simclr ``lars_optimizer.py``): ``r = η‖w‖ / ‖g + λw‖``;
    with ``classic_momentum`` the lr and the ratio go inside the momentum buffer, without
    it the ratio is taken on the momentum update. Exclusions are regular expressions
    searched in the names of ``named_parameters()`` (``exclude_from_layer_adaptation``
    falls back to ``exclude_from_weight_decay``, as SimCLR's)."""
    no_decay = _name_rule("simclr_lars", "exclude_from_weight_decay", exclude_from_weight_decay,
                          lambda pattern, name: re.search(pattern, name) is not None)
    no_adapt = _name_rule("simclr_lars", "exclude_from_layer_adaptation",
                          exclude_from_layer_adaptation or exclude_from_weight_decay,
                          lambda pattern, name: re.search(pattern, name) is not None)
    groups = as_groups(params)

    def treatment(name, p, group):
        decay = group.get("weight_decay", weight_decay)
        return {"weight_decay": 0.0 if (not decay or no_decay(name)) else decay, "trust_ratio": not no_adapt(name)}

    split, group_of = split_groups(groups, treatment)
    mode = (dict(lr_in_momentum=True, ratio_denominator="norm_of_sum") if classic_momentum
            else dict(ratio_denominator="momentum_update"))
    opt = LARS(split, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=use_nesterov,
               trust_coefficient=eeta, eps=0.0, **mode, **_options("simclr_lars", fastlars_options))
    return _attach(opt, "simclr_lars", groups, group_of)


# Keras turns a zero epsilon into its backend default (mlcommons/training,
# image_classification/tensorflow2/lars_optimizer.py: `epsilon or backend_config.epsilon()`)
_KERAS_EPSILON = 1e-7


def mlperf_lars(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0001, eeta: float = 0.001,
                epsilon: float = 0.0, skip_list: Iterable[str] | None = None, use_nesterov: bool = False,
                **fastlars_options) -> LARS:
    """The MLPerf ResNet-50 reference's LARS (mlcommons/training, TF2): ``r = η‖w‖ / (‖g‖ +
    λ‖w‖ + ε)`` with ``ε = 0`` read as Keras' 1e-7, lr and ratio inside the momentum buffer,
    and one substring ``skip_list`` whose parameters get neither decay nor adaptation. The
    peer stores the negative velocity; :func:`load_peer_state_dict` negates it."""
    skipped = _name_rule("mlperf_lars", "skip_list", skip_list, lambda pattern, name: pattern in name)
    groups = as_groups(params)

    def treatment(name, p, group):
        skip = skipped(name)
        return {"weight_decay": 0.0 if skip else group.get("weight_decay", weight_decay), "trust_ratio": not skip}

    split, group_of = split_groups(groups, treatment)
    opt = LARS(split, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=use_nesterov,
               trust_coefficient=eeta, eps=epsilon or _KERAS_EPSILON, lr_in_momentum=True,
               **_options("mlperf_lars", fastlars_options))
    return _attach(opt, "mlperf_lars", groups, group_of)


# -- LAMB ----------------------------------------------------------------------------


def timm_lamb(params, lr: float = 1e-3, bias_correction: bool = True, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-6, weight_decay: float = 0.01, grad_averaging: bool = True,
              max_grad_norm: float | None = 1.0, trust_clip: bool = False, always_adapt: bool = False,
              caution: bool = False, decoupled_decay: bool = False, corrected_weight_decay: bool = False,
              **fastlars_options) -> LAMB:
    """timm ``timm.optim.Lamb``: global-norm clipping at ``max_grad_norm`` (None: off),
    adaptation where ``weight_decay != 0`` or ``always_adapt``, ``trust_clip`` is
    ``min(r, 1)``, ``decoupled_decay`` multiplies w by ``1 - lr·λ`` outside the ratio.
    Its checkpoints keep ``step`` per group (loaded by :func:`load_peer_state_dict`)."""
    if max_grad_norm is not None and max_grad_norm <= 0:
        _refuse("timm_lamb", "max_grad_norm", max_grad_norm, "timm divides every gradient by max(G / max_grad_norm, 1) "
                "= inf (0 for G > 0, NaN for G = 0), i.e. throws the gradient away; pass max_grad_norm=None to "
                "turn clipping off")
    if caution:
        _refuse("timm_lamb", "caution", caution, "the cautious mask (Liang et al. 2024) is not implemented")
    if corrected_weight_decay:
        _refuse("timm_lamb", "corrected_weight_decay", corrected_weight_decay,
                "the lr^2 / max_lr decay correction is not implemented")
    groups = as_groups(params)
    opt = LAMB(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
               grad_averaging=grad_averaging, max_grad_norm=max_grad_norm or 0.0, trust_clip=trust_clip,
               adapt_only_decayed=not always_adapt, decay_mode="direct" if decoupled_decay else "update",
               **_options("timm_lamb", fastlars_options))
    return _attach(opt, "timm_lamb", groups, _unsplit(groups))


def apex_fused_lamb(params, lr: float = 1e-3, bias_correction: bool = True, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-6, weight_decay: float = 0.01, amsgrad: bool = False, adam_w_mode: bool = True,
                    grad_averaging: bool = True, set_grad_none: bool = True, max_grad_norm: float = 1.0,
                    use_nvlamb: bool = False, **fastlars_options) -> LAMB:
    """apex ``apex.optimizers.FusedLAMB``: global-norm clipping at ``max_grad_norm``,
    adaptation where ``weight_decay != 0`` or ``use_nvlamb``, ``adam_w_mode=False`` for L2
    decay (added to the gradient before the moments). ``step`` is kept per group in its
    checkpoints (loaded by :func:`load_peer_state_dict`)."""
    if amsgrad:
        _refuse("apex_fused_lamb", "amsgrad", amsgrad, "apex's FusedLAMB refuses it too (no AMSGrad variant)")
    if max_grad_norm <= 0:
        _refuse("apex_fused_lamb", "max_grad_norm", max_grad_norm, "apex divides every gradient by G / max_grad_norm "
                "= inf when G > 0, i.e. throws the gradient away; fastlars.LAMB(max_grad_norm=0) turns clipping off")
    groups = as_groups(params)
    opt = LAMB(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
               grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, adapt_only_decayed=not use_nvlamb,
               decay_mode="update" if adam_w_mode else "l2", **_options("apex_fused_lamb", fastlars_options))
    # set_grad_none: apex's zero_grad then calls torch's, whose default (torch >= 2.0) sets
    # gradients to None as well, so both values behave as fastlars's zero_grad does
    return _attach(opt, "apex_fused_lamb", groups, _unsplit(groups))


def deepspeed_lamb(params, lr: float = 1e-3, bias_correction: bool = True, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, eps_inside_sqrt: bool = False, weight_decay: float = 0.0,
                   max_grad_norm: float = 0.0, max_coeff: float = 10.0, min_coeff: float = 0.01,
                   amsgrad: bool = False, **fastlars_options) -> LAMB:
    """DeepSpeed ``deepspeed.ops.lamb.FusedLamb``: every parameter adapts, the coefficient
    bounded to ``[min_coeff, max_coeff]`` (exactly 1 where a norm is 0), the ratio taken
    on the uncorrected direction with the bias corrections in the step size, clipping by
    ``max(1, (G + 1e-6) / max_grad_norm)`` with G computed here over every gradient (DeepSpeed
    takes it from its engine through ``step(grad_norms=...)``)."""
    if amsgrad:
        _refuse("deepspeed_lamb", "amsgrad", amsgrad, "DeepSpeed's FusedLamb refuses it too (no AMSGrad variant)")
    groups = as_groups(params)
    opt = LAMB(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
               max_grad_norm=max_grad_norm, grad_norm_eps=1e-6, eps_inside_sqrt=eps_inside_sqrt,
               trust_bounds=(min_coeff, max_coeff), bias_correction_in_lr=bias_correction,
               **_options("deepspeed_lamb", fastlars_options))
    return _attach(opt, "deepspeed_lamb", groups, _unsplit(groups))
