"""The layouts of the tables the fused optimizer kernels read, defined once.

The tables of a fused launch (see launch.py and multi_tensor.py for the Triton side,
csrc/cuda_kernels.cu and csrc/cpu_kernels.cpp for the C++ side):

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


def _layout(name: str, columns: str, doc: str) -> type[enum.IntEnum]:
    """An IntEnum of ``columns`` (space-separated names) numbered from 0, in that order."""
    layout = enum.IntEnum(name, columns.split(), start=0, module=__name__)
    layout.__doc__ = doc
    return layout


TensorColumn = _layout("TensorColumn", "W P G S0 S1 STEP NUMEL GROUP CHUNK0 NCHUNKS FIRST", """
    Per-tensor launch table (int64). W: the weights the update writes (fp32 master copies
    or the parameters); P: the parameter (written too when it is not W: master weights);
    G: the gradient, in the parameter's layout; S0, S1: state tensors (LARS momentum
    buffer; LAMB exp_avg, exp_avg_sq); STEP: LAMB's 0-d float32 step counter; NUMEL;
    GROUP: the tensor's row in the group table; CHUNK0, NCHUNKS: its first chunk and chunk
    count; FIRST: 1 on the tensor's first LARS step (the buffer is set to d). Pointer
    columns a launch does not use repeat W.""")

ChunkColumn = _layout("ChunkColumn", "ROW START", """
    The chunk list of a launch, one row per chunk (one program or block each): ROW, the
    tensor's row in the launch table; START, the chunk's first element.""")

LarsColumn = _layout("LarsColumn", "LR WEIGHT_DECAY TRUST_COEFFICIENT EPS TRUST_CLIP ADAPT MOMENTUM "
                     "ONE_MINUS_DAMPENING NESTEROV DENOMINATOR_DECAY NORM_OF_SUM AFTER_MOMENTUM PLAIN_SGD "
                     "RATIO_MIN RATIO_MAX LR_IN_MOMENTUM", """
    LARS group table (docs/contract.md, "LARS" and "LARS variants"), float64. ADAPT: the
    group's trust_ratio; ONE_MINUS_DAMPENING is formed in double on the host; flags are
    0.0 / 1.0. The variants' effective values, formed on the host (fastlars/optim/_hyper.py, LarsHyper):
    DENOMINATOR_DECAY, the wd of the ratio's denominator (0 unless "sum_of_norms");
    NORM_OF_SUM, AFTER_MOMENTUM ("momentum_update"), PLAIN_SGD (zero_norm): only where the
    group adapts; RATIO_MIN, RATIO_MAX: trust_bounds (0, inf without); LR_IN_MOMENTUM.""")

LambColumn = _layout("LambColumn", "LR BETA1 BETA2 ONE_MINUS_BETA2 BETA3 LOG_BETA1 LOG_BETA2 BIAS_CORRECTION EPS "
                     "WEIGHT_DECAY MAX_GRAD_NORM TRUST_CLIP ADAPT GRAD_DECAY DIRECT_DECAY EPS_INSIDE_SQRT "
                     "BIAS_CORRECTION_IN_LR TRUST_LOW TRUST_HIGH GRAD_NORM_EPS", """
    LAMB group table (docs/contract.md, "LAMB"), float64. BETA3: 1 - beta1, or 1 without
    grad_averaging; LOG_BETA1/2: ln beta (-inf for 0), the kernels form 1 - beta^t as
    1 - exp(t ln beta); ADAPT: the group's trust_ratio; flags are 0.0 / 1.0. The group's
    weight decay sits in one of three columns by its decay_mode (the others 0;
    fastlars/optim/_hyper.py, LambHyper): WEIGHT_DECAY, added to u ("update"); GRAD_DECAY, added to the
    gradient ("l2"); DIRECT_DECAY, w = w (1 - lr DIRECT_DECAY) ("direct"). TRUST_LOW/HIGH:
    trust_bounds (0, inf without).""")

SumColumn = _layout("SumColumn", "W2 G2 U2", """
    Per-tensor sums of a norms pass: W2 of w^2, G2 of the gradient's squares as stored (a
    scaled gradient is unscaled after), U2 of the squares of the vector the trust ratio
    measures besides w: LAMB's direction u; for LARS, d = g s + wd w (ratio_denominator
    "norm_of_sum") or the update after momentum ("momentum_update"), summed element by
    element (csrc/fastlars_math.h, lars_denominator), 0 where the group divides by ||g||.""")


# name -> layout, as the extension exports them (test_layouts.py)
LAYOUTS = {"tensor_columns": TensorColumn, "chunk_columns": ChunkColumn, "lars_columns": LarsColumn,
           "lamb_columns": LambColumn, "sum_columns": SumColumn}


def row_of(layout: type[enum.IntEnum], values: dict) -> list:
    """A table row from ``{column: value}``, in the layout's order (KeyError for a column not given)."""
    return [values[column] for column in _ORDER[layout]]


_ORDER = {layout: tuple(layout) for layout in LAYOUTS.values()}


def constexprs(layout: type[enum.IntEnum], prefix: str = "") -> dict:
    """The layout's columns as Triton constexprs, ``{prefix + name: index}``, and its width
    as ``prefix + "NCOL"``: a kernel module adds them to its globals, and its kernels read
    the columns by those names (Triton kernels can read only constexpr globals)."""
    import triton.language as tl  # only the Triton modules call this

    return {f"{prefix}NCOL": tl.constexpr(len(layout)),
            **{prefix + column.name: tl.constexpr(int(column)) for column in layout}}
