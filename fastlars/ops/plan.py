"""What a fused step hands the kernels' drivers: a plain record, built by the optimizer
once per step (TrustRatioOptimizer._plan). The drivers read the tensors, states and
hyper-parameter rows from it and never see the optimizer.

State is created by the optimizer, before the update phase (its momentum buffers,
moments and master weights); the drivers read ``states`` at the update, when it exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .launch import LaunchCache


@dataclass
class LaunchPlan:
    """The tensors of one (device, dtype) across param groups: one fused launch."""

    params: list[Tensor]         # the local tensors to step (dense copies of strided views)
    grads: list[Tensor]          # their gradients (negated copies for maximize=True groups)
    states: list[Mapping]        # each parameter's state, as the update will find it
    norm_states: list[Mapping]   # what the norms pass reads before the gate (LAMB: fresh zeros before state)
    group_of: list[int]          # per tensor: its row in ``rows``
    rows: list[list[Any]]        # per param group of the launch: its record's row (layouts.py; fastlars/optim/_hyper.py)
    where: list[tuple[int, int]]  # per tensor: (param group index, position in it), for error messages
    sharded: list[bool]          # per tensor: Shard-placed, its sums add up across ranks
    compute_dtype: torch.dtype   # state and arithmetic dtype
    master_weights: bool         # low-precision parameters keep fp32 masters in state["master_param"]
    first: list[bool]            # LARS: the tensor's momentum buffer is created by this step

    @property
    def device(self) -> torch.device:
        return self.params[0].device


@dataclass
class StepPlan:
    """One optimizer step of a fused backend."""

    launches: list[LaunchPlan]   # by (device, dtype), in the order the groups first meet them
    mesh: Any                    # the device mesh of sharded parameters; None without
    creating_state: bool         # some parameter gets state this step: the update's tables are new
    capturable: bool             # build the next step's tables now ("one eager step, then capture")
    cache: LaunchCache           # the optimizer's launch tables, kept across steps
    one_launch: bool = False     # Triton: norms and update in one launch (LARS/LAMB one_launch=True)
    gate_known: bool = False     # found_inf (GradScaler) decides the step: the one-pass kernels need no pre-read
