"""Sharpness of the loss: the Hessian's top eigenvalue by power iteration on
Hessian-vector products (Keskar et al. 2017 relate large batches to sharp minima;
Yao et al. 2018 steer the batch size with the Hessian spectrum), and Yao et al.'s
adaptive batch size that grows the batch when the top eigenvalue falls.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["top_eigenvalue", "top_eigenvalues", "AdaptiveBatchSize"]


def _hvp(loss: Tensor, params: list[Tensor], vector: list[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector))
    return list(torch.autograd.grad(dot, params))


def top_eigenvalue(model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                   batches: Iterable[tuple[Tensor, Tensor]], iters: int = 20, tol: float = 1e-4,
                   seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of the Hessian of the mean loss over ``batches``
    with respect to the trainable parameters (power iteration; double backward).

    Stops after ``iters`` iterations or when the estimate changes by less than
    ``tol`` (relative). BatchNorm layers should be in eval mode for a well-defined loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return top_eigenvalues(model, loss_fn, batches, [params], iters, tol, seed)[0]


def top_eigenvalues(model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                    batches: Iterable[tuple[Tensor, Tensor]], blocks: list[list[Tensor]], iters: int = 20,
                    tol: float = 1e-4, seed: int = 0) -> list[float]:
    """:func:`top_eigenvalue` of each diagonal block of a block-diagonal Hessian at once:
    ``blocks`` are disjoint parameter lists of independent sub-models whose losses add up
    in ``loss_fn`` (e.g. an ensemble trained as one model), so one Hessian-vector product
    serves every block; each block's part of the vector is normalised on its own. Stops
    when every block has converged."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    if not blocks or not all(blocks):
        raise ValueError("blocks must be a non-empty list of non-empty parameter lists")
    params = [p for block in blocks for p in block]
    bounds = list(itertools.accumulate((len(block) for block in blocks), initial=0))
    spans = list(zip(bounds, bounds[1:]))  # each block's slice of params
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    eigenvalues = [0.0] * len(blocks)
    for _ in range(iters):
        for start, stop in spans:
            norm = torch.sqrt(sum((v * v).sum() for v in vector[start:stop]))
            vector[start:stop] = [v / norm for v in vector[start:stop]]
        hv = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            for acc, h in zip(hv, _hvp(loss_fn(model(x), y) / len(batches), params, vector)):
                acc += h
        # Rayleigh quotient of each block
        estimates = [sum((h * v).sum() for h, v in zip(hv[start:stop], vector[start:stop])).item()
                     for start, stop in spans]
        converged = all(abs(e - old) <= tol * abs(e) for e, old in zip(estimates, eigenvalues))
        eigenvalues, vector = estimates, hv
        if converged:
            break
    return eigenvalues


class AdaptiveBatchSize:
    """Yao et al.'s adaptive batch size (ABS): when the top Hessian eigenvalue has fallen
    below ``threshold`` times the value at the last change (a flatter region), multiply
    the batch size by ``factor``, up to ``max_batch_size``. Stateful through state_dict."""

    def __init__(self, batch_size: int, max_batch_size: int, factor: int = 2, threshold: float = 0.5) -> None:
        if batch_size < 1 or max_batch_size < batch_size:
            raise ValueError(f"need 1 <= batch_size <= max_batch_size, got {batch_size} and {max_batch_size}")
        if factor < 2 or not 0 < threshold < 1:
            raise ValueError(f"need factor >= 2 and 0 < threshold < 1, got {factor} and {threshold}")
        self.batch_size, self.max_batch_size = batch_size, max_batch_size
        self.factor, self.threshold = factor, threshold
        self.reference: float | None = None

    def update(self, eigenvalue: float) -> int:
        """Feed the latest top eigenvalue; returns the batch size to use next."""
        if self.reference is None:
            self.reference = eigenvalue
        elif abs(eigenvalue) < self.threshold * abs(self.reference) and self.batch_size < self.max_batch_size:
            self.batch_size = min(self.batch_size * self.factor, self.max_batch_size)
            self.reference = eigenvalue
        return self.batch_size

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
