"""Adversarial training with FGSM (Goodfellow et al. 2015), the second ingredient of Yao
et al.'s ABSA (2018, "Large batch size training of neural networks with adversarial
training and second-order information"): adversarial examples of the current model mixed
into the batch (docs/contract.md, "Measuring the recipe").

    x_adv = clamp(x + eps · sign(∇_x L(f(x), y)))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["fgsm", "adversarial_loss"]


def _check(eps: float, clamp: tuple[float, float] | None) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if clamp is not None and (len(clamp) != 2 or not clamp[0] <= clamp[1]):
        raise ValueError(f"clamp must be None or (low, high) with low <= high, got {clamp!r}")


def fgsm(model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor,
         eps: float, *, clamp: tuple[float, float] | None = None) -> Tensor:
    """FGSM adversarial examples of ``model`` at ``inputs`` (a new detached tensor).

    The gradient is taken with respect to the input only: no parameter's ``.grad``
    changes. The model stays in its mode; its buffers (batch-norm running statistics)
    are restored after the attack's forward, so the attack leaves no trace in the model.
    ``clamp=(low, high)`` keeps the examples in the data range.
    """
    _check(eps, clamp)
    x = inputs.detach().requires_grad_(True)
    saved = [b.detach().clone() for b in model.buffers()]
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_fn(model(x), targets), x)
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)
        adv = inputs.detach() + eps * grad.sign()
        return adv.clamp(*clamp) if clamp is not None else adv


def adversarial_loss(model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor,
                     targets: Tensor, eps: float, *, weight: float = 0.5,
                     clamp: tuple[float, float] | None = None) -> Tensor:
    """Training loss mixing clean and FGSM examples: ``(1 - weight) · L(x) + weight · L(x_adv)``
    (the mean of the two by default). Call ``.backward()`` on it as on any loss."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be a number in [0, 1], got {weight!r}")
    adv = fgsm(model, loss_fn, inputs, targets, eps, clamp=clamp)
    return (1.0 - weight) * loss_fn(model(inputs), targets) + weight * loss_fn(model(adv), targets)
