"""Tensor helpers that the optimizers (fastlars/optim) and the fused kernels' drivers
(fastlars/ops) both need: memory layout, CUDA-graph capture, state dtype, the weights a
trust ratio reads. Imports only torch (the bottom layer of the package)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers its storage span without gaps in some order of its dims
    (contiguous, channels_last, a transpose...): what kernels that walk storage linearly need."""
    if t.is_contiguous() or t.numel() <= 1:  # the common case, a flag torch keeps
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def is_capturing(device: torch.device) -> bool:
    """Whether work for ``device`` is being captured into a CUDA graph now (one home for
    the check, so that CPU tests can stand in a capture by replacing it)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def state_dtype(p: Tensor) -> torch.dtype:
    """The dtype of a parameter's optimizer state and arithmetic: fp64 for fp64, else fp32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def weights_for_norm(params: list[Tensor], states: list[Mapping], compute_dtype: torch.dtype,
                     master_weights: bool) -> list[Tensor]:
    """The weights whose norms the trust ratio uses, read-only (state may not exist yet).

    With master weights, a low-precision parameter without its master yet (its first step)
    reads as an fp32 copy, not as itself: a fused launch reads one weight dtype, and a
    late-joining bf16 parameter shares it with parameters that have fp32 masters.
    """
    if master_weights and params and params[0].dtype != compute_dtype:
        masters = (st.get("master_param") for st in states)
        return [p.to(compute_dtype) if m is None else m for p, m in zip(params, masters)]
    return params


def has_state(state: Mapping, key: str) -> bool:
    """Whether a parameter's ``state`` holds ``key``: an entry of None is absent (torch.optim.SGD
    checkpoints with momentum=0 store ``momentum_buffer=None``, and users set it to reset
    momentum). The one test of a state entry's existence, for every backend."""
    return state.get(key) is not None
