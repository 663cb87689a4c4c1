"""Each param group's hyper-parameters as the step uses them: one decode of the group dict
into a typed record per optimizer, read by every backend.

``LarsHyper`` and ``LambHyper`` mirror the structs of csrc/fastlars_math.h: a field per
column of the kernels' group tables (fastlars/ops/layouts.py, ``LarsColumn`` and
``LambColumn``; tests/test_layouts.py checks that the fields are the columns, in order), each
holding the value the maths uses, so that the reference, the foreach path and the fused
kernels read one meaning of every option: a LARS variant's mode flags only where the group
adapts, ``1 - dampening`` formed in double (1 - float32(0.999) is 1.3e-5 off), LAMB's decay
in the place its ``decay_mode`` puts it. ``row()`` is the group's row of the kernels' table.

A group dict is a user's to edit between steps (a scheduler sets ``group["lr"]``):
``GroupRecords`` decodes a group again only when it changed (``snapshot``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from ..ops.layouts import LambColumn, LarsColumn
from ._checks import scalar_lr


def adapts(group: dict[str, Any]) -> bool:
    """Whether a param group's tensors get a trust ratio (docs/contract.md, "Which parameters
    adapt"): its ``trust_ratio`` flag, and with ``adapt_only_decayed`` only where its
    weight decay is not 0 (timm ``Lars``/``Lamb``, apex ``FusedLAMB``, lightly)."""
    return bool(group["trust_ratio"]) and (not group["adapt_only_decayed"] or group["weight_decay"] != 0)


def trust_bounds(group: dict[str, Any]) -> tuple[float, float]:
    """``trust_bounds`` as (low, high); (0, inf), which bound no ratio, without."""
    bounds = group["trust_bounds"]
    return (0.0, math.inf) if bounds is None else (float(bounds[0]), float(bounds[1]))


def _row(record, layout) -> list:
    return [getattr(record, column.name.lower()) for column in layout]


def _bounds(low: float, high: float) -> tuple[float, float] | None:
    """A record's trust-ratio bounds (low, high) for the eager paths, None where they bound
    nothing (the defaults 0 and inf)."""
    return None if (low, high) == (0.0, math.inf) else (low, high)


@dataclass(frozen=True)
class LarsHyper:
    """A LARS param group (docs/contract.md, "LARS" and "LARS variants"); the fields are
    LarsColumn's, in its order. ``lr``: a number or a 0-d view of a tensor lr (never read
    on the host). ``denominator_decay``: the wd of the ratio's denominator (0 unless
    "sum_of_norms"); ``norm_of_sum``, ``after_momentum`` ("momentum_update"),
    ``plain_sgd`` (zero_norm): only where the group adapts; ``ratio_min``, ``ratio_max``:
    trust_bounds, (0, inf) without."""

    lr: float | Tensor
    weight_decay: float
    trust_coefficient: float
    eps: float
    trust_clip: bool
    adapt: bool
    momentum: float
    one_minus_dampening: float
    nesterov: bool
    denominator_decay: float
    norm_of_sum: bool
    after_momentum: bool
    plain_sgd: bool
    ratio_min: float
    ratio_max: float
    lr_in_momentum: bool

    def row(self) -> list:
        return _row(self, LarsColumn)

    @property
    def bounds(self) -> tuple[float, float] | None:
        return _bounds(self.ratio_min, self.ratio_max)


def lars_hyper(group: dict[str, Any]) -> LarsHyper:
    adapt = adapts(group)
    denominator = group["ratio_denominator"]
    low, high = trust_bounds(group)
    return LarsHyper(
        lr=scalar_lr(group["lr"]), weight_decay=group["weight_decay"], trust_coefficient=group["trust_coefficient"],
        eps=group["eps"], trust_clip=group["trust_clip"], adapt=adapt, momentum=group["momentum"],
        one_minus_dampening=1.0 - group["dampening"], nesterov=group["nesterov"],
        denominator_decay=group["weight_decay"] if denominator == "sum_of_norms" else 0.0,
        norm_of_sum=adapt and denominator == "norm_of_sum", after_momentum=adapt and denominator == "momentum_update",
        plain_sgd=adapt and group["zero_norm"] == "plain_sgd", ratio_min=low, ratio_max=high,
        lr_in_momentum=group["lr_in_momentum"])


@dataclass(frozen=True)
class LambHyper:
    """A LAMB param group (docs/contract.md, "LAMB"); the fields are LambColumn's, in its
    order. ``beta3``: 1 - beta1, or 1 without grad_averaging; ``log_beta1/2``: ln beta
    (-inf for 0), 1 - beta^t is formed as -expm1(t ln beta). The group's weight decay is in
    one of three fields by its decay_mode (the others 0): ``weight_decay``, added to u
    ("update"); ``grad_decay``, added to the gradient ("l2"); ``direct_decay``,
    w = w (1 - lr direct_decay) ("direct")."""

    lr: float | Tensor
    beta1: float
    beta2: float
    one_minus_beta2: float
    beta3: float
    log_beta1: float
    log_beta2: float
    bias_correction: bool
    eps: float
    weight_decay: float
    max_grad_norm: float
    trust_clip: bool
    adapt: bool
    grad_decay: float
    direct_decay: float
    eps_inside_sqrt: bool
    bias_correction_in_lr: bool
    trust_low: float
    trust_high: float
    grad_norm_eps: float

    def row(self) -> list:
        return _row(self, LambColumn)

    @property
    def bounds(self) -> tuple[float, float] | None:
        return _bounds(self.trust_low, self.trust_high)


def lamb_hyper(group: dict[str, Any]) -> LambHyper:
    beta1, beta2 = group["betas"]
    decay, mode = group["weight_decay"], group["decay_mode"]
    low, high = trust_bounds(group)
    return LambHyper(
        lr=scalar_lr(group["lr"]), beta1=beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
        beta3=1.0 - beta1 if group["grad_averaging"] else 1.0,
        log_beta1=math.log(beta1) if beta1 > 0 else -math.inf, log_beta2=math.log(beta2) if beta2 > 0 else -math.inf,
        bias_correction=group["bias_correction"], eps=group["eps"],
        weight_decay=decay if mode == "update" else 0.0, max_grad_norm=group["max_grad_norm"],
        trust_clip=group["trust_clip"], adapt=adapts(group), grad_decay=decay if mode == "l2" else 0.0,
        direct_decay=decay if mode == "direct" else 0.0, eps_inside_sqrt=group["eps_inside_sqrt"],
        bias_correction_in_lr=group["bias_correction_in_lr"], trust_low=low, trust_high=high,
        grad_norm_eps=group["grad_norm_eps"])


def record_fields(record_type) -> list[str]:
    """A record's field names, in order (tests/test_layouts.py compares them to the columns)."""
    return [f.name for f in fields(record_type)]


# -- which groups changed ------------------------------------------------------

class _Tensor:
    """A tensor in a group's snapshot: equal to another while it is the same tensor. Its
    value is never read (on CUDA a read would synchronise): the record holds the tensor,
    whose value the kernels read on the device at every step, so a scheduler may change it
    in place; it was checked when it was put in the group."""

    __slots__ = ("tensor",)

    def __init__(self, t: Tensor) -> None:
        self.tensor = t

    def __eq__(self, other) -> bool:
        return isinstance(other, _Tensor) and other.tensor is self.tensor

    __hash__ = None


def _frozen(value):
    if isinstance(value, Tensor):
        return _Tensor(value)
    if isinstance(value, (list, tuple)):  # betas, trust_bounds: a list may be edited in place
        return tuple(_frozen(x) for x in value)
    return value


_PLAIN = frozenset((float, int, bool, str, type(None)))  # values compared as they are
_NOT_OPTIONS = frozenset(("params", "param_names"))


def snapshot(group: dict[str, Any]) -> tuple:
    """What a group's record depends on: every option (not the parameters), and the device
    of its first parameter (a capturable tensor lr must be on it). Equal snapshots, equal
    records. Reads no device memory; about 3 us for a group of 16 options, half of
    checking and decoding the group (the plain values are taken as they are)."""
    params = group["params"]
    return (params[0].device if params else None,
            *[(key, value if type(value) in _PLAIN else _frozen(value))
              for key, value in group.items() if key not in _NOT_OPTIONS])


class GroupRecords:
    """The records of an optimizer's param groups, each validated and decoded when its group
    is new or changed since the last step, else reused."""

    def __init__(self) -> None:
        self._entries: list[tuple[dict, tuple, Any]] = []  # per group index: (group, snapshot, record)

    def of(self, groups: list[dict[str, Any]], decode: Callable[[dict[str, Any]], Any],
           validate: Callable[[int, dict[str, Any]], None]) -> list:
        entries = self._entries
        del entries[len(groups):]
        records = []
        for index, group in enumerate(groups):
            key = snapshot(group)
            if index < len(entries) and entries[index][0] is group and entries[index][1] == key:
                records.append(entries[index][2])
                continue
            validate(index, group)
            entry = (group, key, decode(group))
            if index < len(entries):
                entries[index] = entry
            else:
                entries.append(entry)
            records.append(entry[2])
        return records
