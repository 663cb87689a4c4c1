"""``fastlars.param_groups``: the two parameter groups of large-batch training
(docs/contract.md, "Which parameters adapt")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["param_groups"]


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    exclude: Callable[[str, Tensor], bool] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """The two usual parameter groups of large-batch training.

    Parameters with ``ndim <= 1`` (biases, norm-layer weights) and those for which
    ``exclude(name, param)`` returns True get ``weight_decay=0`` and
    ``trust_ratio=False``; every other trainable parameter gets ``weight_decay``
    and ``trust_ratio=True`` (MLPerf / Goyal et al. practice). Extra keyword
    arguments (e.g. ``lr``) are copied into both groups. Empty groups are dropped.
    """
    adapted: list[Tensor] = []
    excluded: list[Tensor] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or (exclude is not None and exclude(name, param)):
            excluded.append(param)
        else:
            adapted.append(param)
    groups = [
        {"params": adapted, "weight_decay": weight_decay, "trust_ratio": True, **group_options},
        {"params": excluded, "weight_decay": 0.0, "trust_ratio": False, **group_options},
    ]
    return [g for g in groups if g["params"]]
