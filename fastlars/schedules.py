"""The large-batch recipe's schedules (docs/contract.md, "Large-batch recipe (schedules)").

- Learning-rate scaling: linear (Goyal et al. 2017, "Accurate, Large Minibatch SGD")
  and square-root (Krizhevsky 2014; Hoffer et al. 2017) rules: :func:`scale_lr`.
- Gradual warmup from the small-batch lr, then polynomial decay (You et al.; MLPerf
  ResNet-50 uses power 2) or cosine: :class:`WarmupPolyDecay`, :class:`WarmupCosine`.
- Batch-size ramps instead of lr decay (Smith et al. 2018, "Don't Decay the Learning
  Rate, Increase the Batch Size"): :class:`BatchSizeRamp` tells the training loop how many
  micro-batches to accumulate at each step and decays the lr once the batch is capped.
- "Train longer" regime adaptation (Hoffer et al. 2017): :func:`train_longer`.

Every lr schedule is a ``torch.optim.lr_scheduler.LRScheduler`` counting optimizer
steps (call ``scheduler.step()`` after ``optimizer.step()``), stateful through
``state_dict``. Factors multiply each param group's ``initial_lr`` (the peak lr).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["scale_lr", "train_longer", "WarmupPolyDecay", "WarmupCosine", "BatchSizeRamp"]


def _positive_int(name: str, value, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {value!r}")
    return value


def scale_lr(base_lr: float, batch_size: int, base_batch_size: int = 256, rule: str = "linear") -> float:
    """lr for ``batch_size`` from the lr tuned at ``base_batch_size``:
    linear ``base_lr * B / B_ref`` or sqrt ``base_lr * sqrt(B / B_ref)``."""
    _positive_int("batch_size", batch_size)
    _positive_int("base_batch_size", base_batch_size)
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}")


def train_longer(epochs: int, batch_size: int, base_batch_size: int = 256,
                 milestones: list[int] | tuple[int, ...] = ()) -> tuple[int, list[int]]:
    """Hoffer et al.'s regime adaptation: as many *steps* as the small-batch regime, i.e.
    epochs (and lr milestones) multiplied by ``B / B_ref``. Returns (epochs, milestones)."""
    _positive_int("epochs", epochs)
    factor = _positive_int("batch_size", batch_size) / _positive_int("base_batch_size", base_batch_size)
    return math.ceil(epochs * factor), [math.ceil(m * factor) for m in milestones]


class _Warmup(LRScheduler):
    """Linear warmup from ``warmup_start_factor * peak`` to the peak over
    ``warmup_steps``, then ``decay(progress)`` of the remaining steps."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                 warmup_start_factor: float | None = None, last_epoch: int = -1) -> None:
        self.total_steps = _positive_int("total_steps", total_steps)
        self.warmup_steps = _positive_int("warmup_steps", warmup_steps, allow_zero=True)
        if warmup_steps >= total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be shorter than total_steps ({total_steps})")
        self.warmup_start_factor = 0.0 if warmup_start_factor is None else float(warmup_start_factor)
        if not 0.0 <= self.warmup_start_factor <= 1.0:
            raise ValueError(f"warmup_start_factor must be in [0, 1], got {warmup_start_factor!r}")
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def small_batch_factor(batch_size: int, base_batch_size: int) -> float:
        """Goyal et al.'s warmup start: the small-batch lr, i.e. peak * B_ref / B."""
        return min(1.0, _positive_int("base_batch_size", base_batch_size) / _positive_int("batch_size", batch_size))

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.decay(progress)

    def decay(self, progress: float) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [group["initial_lr"] * f for group in self.optimizer.param_groups]


class WarmupPolyDecay(_Warmup):
    """Warmup, then ``peak * (min_factor + (1 - min_factor) * (1 - progress) ** power)``
    (power 2: MLPerf ResNet-50 with LARS, which ends at lr 1e-4: ``min_factor = 1e-4 / peak``)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                 warmup_start_factor: float | None = None, power: float = 2.0, last_epoch: int = -1, *,
                 min_factor: float = 0.0) -> None:
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power!r}")
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"min_factor must be in [0, 1], got {min_factor!r}")
        self.power, self.min_factor = float(power), float(min_factor)
        super().__init__(optimizer, total_steps, warmup_steps, warmup_start_factor, last_epoch)

    def decay(self, progress: float) -> float:
        return self.min_factor + (1.0 - self.min_factor) * (1.0 - progress) ** self.power


class WarmupCosine(_Warmup):
    """Warmup, then cosine from the peak to ``min_factor * peak``."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                 warmup_start_factor: float | None = None, min_factor: float = 0.0, last_epoch: int = -1) -> None:
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"min_factor must be in [0, 1], got {min_factor!r}")
        self.min_factor = float(min_factor)
        super().__init__(optimizer, total_steps, warmup_steps, warmup_start_factor, last_epoch)

    def decay(self, progress: float) -> float:
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BatchSizeRamp(LRScheduler):
    """Smith et al.: at each milestone multiply the batch size by ``factor`` instead of
    dividing the lr by it, up to ``max_batch_size``; milestones past the cap divide the lr.

    The batch is realised on one device by gradient accumulation: read
    :attr:`accumulation_steps` (micro-batches of ``micro_batch_size``) before each step.
    Milestones count optimizer steps (call ``step()`` after each optimizer step).
    """

    def __init__(self, optimizer: Optimizer, base_batch_size: int, micro_batch_size: int,
                 milestones: list[int] | tuple[int, ...], factor: int = 5, max_batch_size: int | None = None,
                 last_epoch: int = -1) -> None:
        self.base_batch_size = _positive_int("base_batch_size", base_batch_size)
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.factor = _positive_int("factor", factor)
        self.max_batch_size = _positive_int("max_batch_size", max_batch_size or base_batch_size * factor ** len(milestones))
        self.milestones = sorted(_positive_int("milestone", m) for m in milestones)
        for size in (base_batch_size, self.max_batch_size):
            if size % micro_batch_size:
                raise ValueError(f"batch size {size} is not a multiple of micro_batch_size {micro_batch_size}")
        if self.max_batch_size < base_batch_size:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) is below base_batch_size ({base_batch_size})")
        super().__init__(optimizer, last_epoch)

    def _split(self, step: int) -> tuple[int, int]:
        """(batch size, lr divisor) after the milestones passed by ``step``."""
        batch, divisor = self.base_batch_size, 1
        for milestone in self.milestones:
            if step < milestone:
                break
            if batch * self.factor <= self.max_batch_size:
                batch *= self.factor
            else:
                divisor *= self.factor
        return batch, divisor

    @property
    def batch_size(self) -> int:
        return self._split(max(self.last_epoch, 0))[0]

    @property
    def accumulation_steps(self) -> int:
        batch = self.batch_size
        if batch % self.micro_batch_size:
            raise ValueError(f"batch size {batch} is not a multiple of micro_batch_size {self.micro_batch_size}")
        return batch // self.micro_batch_size

    def get_lr(self) -> list[float]:
        divisor = self._split(max(self.last_epoch, 0))[1]
        return [group["initial_lr"] / divisor for group in self.optimizer.param_groups]
