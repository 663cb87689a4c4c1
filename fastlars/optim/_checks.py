"""Argument checks of the optimizers: the messages start as torch.optim's, and name the
parameter or the option."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .. import backends


def describe(group_index: int, position: int, p: Tensor) -> str:
    return f"param_groups[{group_index}]['params'][{position}] (shape {tuple(p.shape)}, {p.dtype}, {p.device})"


def check_number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                 high_open: bool = False, where: str = "", label: str | None = None) -> None:
    """Raise unless ``value`` is a finite number with ``low <= value <= high`` (``< high`` if high_open).

    The message starts as torch.optim's (``Invalid <label>: <value>``; label defaults to
    ``"<name> value"``) so that code matching torch's errors matches ours.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element{where}, got shape {tuple(value.shape)}")
        value = value.item()  # argument check at construction / group validation, not per element
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}{where} must be a number, got {type(value).__name__}")
    upper_ok = value < high if high_open else value <= high
    if not math.isfinite(value) or not (value >= low and upper_ok):
        bracket = ")" if high_open else "]"
        raise ValueError(f"Invalid {label or name + ' value'}{where}: {value} "
                         f"(expected {name} in [{low}, {high}{bracket})")


def scalar_lr(lr: float | Tensor) -> float | Tensor:
    """A one-element lr tensor of any shape ((1,), (1, 1)) as a 0-d view of it, which
    broadcasts like a number (a scheduler's in-place updates still reach it)."""
    return lr.reshape(()) if isinstance(lr, Tensor) and lr.dim() else lr


def check_flag(name: str, value: Any, where: str = "") -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}{where} must be a bool, got {type(value).__name__}")


def check_choice(name: str, value: Any, choices: tuple[str, ...], where: str = "") -> None:
    """Raise unless ``value`` is one of the strings ``choices`` (a per-group mode option)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_trust_bounds(value: Any, where: str = "") -> None:
    """``trust_bounds``: None, or ``(low, high)`` with ``0 <= low <= high`` (high may be inf)."""
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"trust_bounds{where} must be None or a pair (low, high), got {value!r}")
    low, high = value
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) or x < 0:
            raise ValueError(f"trust_bounds[{i}]{where} must be a number >= 0, got {x!r}")
    if not math.isfinite(low) or low > high:
        raise ValueError(f"trust_bounds{where} must have a finite low <= high, got {value!r}")


def check_backend_devices(backend: str, groups) -> None:
    """A fused backend steps the device type it was chosen for (docs/contract.md, "Bad input"):
    refuse a parameter of ``groups`` ((index, group) pairs) on another, before anything changes.
    CPU parameters beside CUDA ones on backend="cuda" would be stepped by the CPU kernels,
    which do not see the step's device-side skip flag. Meta tensors (a deferred init) have
    no device yet."""
    record = backends.get(backend)
    if not record.fused:
        return
    for index, group in groups:
        for position, p in enumerate(group["params"]):
            if p.device.type != "meta" and not record.steps(p.device.type):
                raise ValueError(f"{describe(index, position, p)} is on {p.device.type}, but backend={backend!r} "
                                 f"steps {' or '.join(record.devices)} tensors (the other parameters' device "
                                 "type): give the parameters of each device type their own optimizer")
