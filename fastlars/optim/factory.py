"""``fastlars.make_optimizer``: the large-batch optimizer the examples, the benchmarks and
the study build, in one place."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._groups import param_groups
from .lamb import LAMB
from .lars import LARS

__all__ = ["make_optimizer"]

OPTIMIZERS = {"lars": LARS, "lamb": LAMB}


def make_optimizer(name: str, model: torch.nn.Module | Iterable, *, weight_decay: float,
                   exclude: Callable[[str, Tensor], bool] | None = None, **options: Any) -> LARS | LAMB:
    """LARS or LAMB (``name``, any case) for ``model``.

    A module gets the two usual groups of large-batch training (:func:`param_groups`:
    ``weight_decay`` and the trust ratio for weights, neither for biases, norm weights and
    what ``exclude`` selects); parameters or param groups are taken as they are, with
    ``weight_decay`` as the default of groups that do not set it. Other keywords (``lr``,
    ``momentum``, ``backend``...) go to the optimizer.
    """
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"optimizer {name!r} is unknown; choose one of {sorted(OPTIMIZERS)}") from None
    if isinstance(model, torch.nn.Module):
        return cls(param_groups(model, weight_decay=weight_decay, exclude=exclude), **options)
    if exclude is not None:
        raise ValueError("exclude= needs a module (it selects parameters by name)")
    return cls(model, weight_decay=weight_decay, **options)
