"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", appendix A.1): ``B_simple = tr(Σ) / |G|²``, the predicted critical batch size.

From the squared norms of two gradient estimates of the same step, one at a small batch
``b`` and one at a big batch ``B`` (docs/contract.md, "Measuring the recipe"):

    |G|²_est = (B·|G_B|² − b·|G_b|²) / (B − b)        (unbiased for |G|²)
    S_est    = (|G_b|² − |G_B|²) / (1/b − 1/B)         (unbiased for tr(Σ))

Each estimate is noisy (either can be negative); the published statistic is the ratio of
their exponential moving averages. Both batch sizes come for free in large-batch
training: with gradient accumulation the gradient after the first micro-batch is a
batch-``b`` gradient and the accumulated one is batch ``B`` (pass the tracker to
:func:`fastlars.train.accumulate_gradients`); under DDP without accumulation, the local
gradient before the all-reduce (batch ``b``) and the averaged one (``world_size · b``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["GradientNoiseScale", "grad_sq_norm"]


def grad_sq_norm(params: Iterable[Tensor]) -> Tensor:
    """Squared L2 norm of the ``.grad`` of ``params`` (those without one count as 0), fp32."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float() ** 2


class GradientNoiseScale:
    """EMA tracker of McCandlish et al.'s two-batch-size estimator.

    Args:
        beta: EMA decay in [0, 1) (0 keeps only the latest estimate).
        params: the parameters whose gradient :func:`fastlars.train.accumulate_gradients`
            measures for this tracker (default: all of the model's trainable ones). Give
            one tracker per independent sub-model to track each on its own.

    Feed :meth:`update` the two squared norms each step (Python floats or 0-dim tensors;
    with tensors nothing is read back to the host until you read a property).
    """

    def __init__(self, beta: float = 0.99, params: Iterable[Tensor] | None = None) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.params = None if params is None else list(params)
        self.steps = 0
        self._ema_g2: float | Tensor = 0.0
        self._ema_trace: float | Tensor = 0.0

    def update(self, small_sq_norm: float | Tensor, small_batch: int, big_sq_norm: float | Tensor,
               big_batch: int) -> None:
        """One pair of measurements: ``|G_b|²`` at batch ``small_batch`` and ``|G_B|²`` at
        ``big_batch`` (> small_batch)."""
        for name, value in (("small_batch", small_batch), ("big_batch", big_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if big_batch <= small_batch:
            raise ValueError(f"big_batch ({big_batch}) must be larger than small_batch ({small_batch})")
        b, B = small_batch, big_batch
        g2 = (B * big_sq_norm - b * small_sq_norm) / (B - b)
        trace = (small_sq_norm - big_sq_norm) / (1.0 / b - 1.0 / B)
        self._ema_g2 = self.beta * self._ema_g2 + (1.0 - self.beta) * g2
        self._ema_trace = self.beta * self._ema_trace + (1.0 - self.beta) * trace
        self.steps += 1

    def _corrected(self, ema: float | Tensor) -> float:
        # Adam-style bias correction: the EMAs start at 0. It cancels in b_simple.
        return float(ema) / (1.0 - self.beta ** self.steps) if self.steps else math.nan

    @property
    def grad_sq_norm(self) -> float:
        """EMA of the unbiased ``|G|²`` estimate (nan before the first update)."""
        return self._corrected(self._ema_g2)

    @property
    def trace_covariance(self) -> float:
        """EMA of the unbiased ``tr(Σ)`` estimate (per-sample gradient covariance)."""
        return self._corrected(self._ema_trace)

    @property
    def b_simple(self) -> float:
        """``tr(Σ) / |G|²`` from the EMAs; nan before the first update, inf if ``|G|²`` <= 0."""
        g2 = self.grad_sq_norm
        if math.isnan(g2):
            return math.nan
        return self.trace_covariance / g2 if g2 > 0 else math.inf

    def state_dict(self) -> dict:
        return {"beta": self.beta, "steps": self.steps, "ema_g2": float(self._ema_g2),
                "ema_trace": float(self._ema_trace)}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.steps = float(state["beta"]), int(state["steps"])
        self._ema_g2, self._ema_trace = float(state["ema_g2"]), float(state["ema_trace"])
