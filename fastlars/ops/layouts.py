"""The layouts of the tables the fused optimizer kernels read, defined once.

Four tables describe a fused launch (see multi_tensor.py for the Triton side and
csrc/cuda_kernels.cu, csrc/cpu_kernels.cpp for the C++ side):

- the per-tensor launch table (int64, one row per tensor: pointers and sizes) and its
  chunk list (one row per chunk),
- the per-group hyper-parameter table (float64, one row per param group; one layout
  for LARS, one for LAMB),
- the per-tensor sums of a norms pass (one row per tensor: sums of squares).

The Triton kernels read these columns by name (constexpr copies of the values below);
the C++ kernels read them through csrc/layouts.h, whose X-macro lists name the same
columns in the same order and are exported by the extension
(``fastlars._C.tensor_columns`` ...). tests/test_layouts.py checks that the two agree:
a column read at the wrong index would read the wrong value with no error.
"""

from __future__ import annotations

import enum

__all__ = ["TensorColumn", "ChunkColumn", "LarsColumn", "LambColumn", "SumColumn", "LAYOUTS"]


class TensorColumn(enum.IntEnum):
    """Per-tensor launch table. Pointer columns a launch does not use repeat ``W``."""

    W = 0         # the weights the update writes: fp32 master copies or the parameters
    P = 1         # the parameter (written too when it is not W: master weights)
    G = 2         # the gradient, in the parameter's layout
    S0 = 3        # first state tensor: LARS momentum buffer, LAMB exp_avg
    S1 = 4        # second state tensor: LAMB exp_avg_sq
    STEP = 5      # LAMB: the 0-d float32 step counter
    NUMEL = 6     # elements of the tensor
    GROUP = 7     # row of the tensor's param group in the group table
    CHUNK0 = 8    # index of the tensor's first chunk
    NCHUNKS = 9   # number of chunks of the tensor
    FIRST = 10    # 1 on the tensor's first LARS step (the buffer is set to d)


class ChunkColumn(enum.IntEnum):
    """The chunk list of a launch: one row per CHUNK-element chunk, one program each."""

    ROW = 0    # the tensor's row in the launch table
    START = 1  # the chunk's first element


class LarsColumn(enum.IntEnum):
    """LARS group table (docs/contract.md, "LARS"). Flags are 0.0 / 1.0."""

    LR = 0
    WEIGHT_DECAY = 1
    TRUST_COEFFICIENT = 2
    EPS = 3
    TRUST_CLIP = 4
    ADAPT = 5                 # the group's trust_ratio
    MOMENTUM = 6
    ONE_MINUS_DAMPENING = 7   # formed in double on the host
    NESTEROV = 8


class LambColumn(enum.IntEnum):
    """LAMB group table (docs/contract.md, "LAMB"). Flags are 0.0 / 1.0."""

    LR = 0
    BETA1 = 1
    BETA2 = 2
    ONE_MINUS_BETA2 = 3
    BETA3 = 4            # 1 - beta1, or 1 without grad_averaging
    LOG_BETA1 = 5        # ln beta1 (-inf for 0): the kernels form 1 - beta1^t as 1 - exp(t ln beta1)
    LOG_BETA2 = 6
    BIAS_CORRECTION = 7
    EPS = 8
    WEIGHT_DECAY = 9
    MAX_GRAD_NORM = 10
    TRUST_CLIP = 11
    ADAPT = 12           # the group's trust_ratio


class SumColumn(enum.IntEnum):
    """Per-tensor sums of squares of a norms pass (LARS: the first two columns)."""

    W2 = 0  # sum of w^2
    G2 = 1  # sum of g^2 (of the gradient as stored: a scaled gradient is unscaled after)
    U2 = 2  # LAMB: sum of u^2, u the update direction


# name -> layout, as the extension exports them (test_layouts.py)
LAYOUTS = {"tensor_columns": TensorColumn, "chunk_columns": ChunkColumn, "lars_columns": LarsColumn,
           "lamb_columns": LambColumn, "sum_columns": SumColumn}


def row_of(layout: type[enum.IntEnum], values: dict) -> list:
    """A table row from ``{column: value}``, in the layout's order (KeyError for a column not given)."""
    return [values[column] for column in _ORDER[layout]]


_ORDER = {layout: tuple(layout) for layout in LAYOUTS.values()}
