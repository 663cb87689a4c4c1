"""The fused kernels' table layouts: one definition (fastlars/ops/layouts.py), read by the
Triton kernels by name and by the C++ kernels through csrc/layouts.h. A column that the
two sides number differently would read the wrong hyper-parameter or pointer with no
error, so the extension's exported layouts must equal the Python ones."""

import math

import pytest

from fastlars import _extension
from fastlars.ops import layouts
from fastlars.optim import _hyper


@pytest.mark.parametrize("name", list(layouts.LAYOUTS))
def test_cpp_layouts_agree_with_the_python_definition(name):
    ext = _extension.load()
    if ext is None:
        pytest.skip(f"the C++ extension is unavailable: {_extension.why_unavailable('cpu')}")
    python = {column.name: int(column) for column in layouts.LAYOUTS[name]}
    assert dict(getattr(ext, name)) == python


@pytest.mark.parametrize("layout", list(layouts.LAYOUTS.values()))
def test_columns_number_a_dense_row(layout):
    assert sorted(int(c) for c in layout) == list(range(len(layout)))


def lars_row(group):
    return _hyper.lars_hyper(group).row()


def lamb_row(group):
    return _hyper.lamb_hyper(group).row()


@pytest.mark.parametrize("record, layout", [(_hyper.LarsHyper, layouts.LarsColumn),
                                            (_hyper.LambHyper, layouts.LambColumn)])
def test_records_are_the_group_table_columns(record, layout):
    """A group's record (what the Python backends read) has a field per column of the
    kernels' group table, named as the column, in its order: row() is the record."""
    assert _hyper.record_fields(record) == [column.name.lower() for column in layout]


def test_group_rows_put_each_value_in_its_named_column():
    lars = {"lr": 0.1, "weight_decay": 0.2, "trust_coefficient": 0.3, "eps": 0.4, "trust_clip": True,
            "trust_ratio": False, "momentum": 0.7, "dampening": 0.25, "nesterov": True,
            "adapt_only_decayed": False, "ratio_denominator": "norm_of_sum", "zero_norm": "plain_sgd",
            "trust_bounds": (0.5, 2.0), "lr_in_momentum": True}
    row = lars_row(lars)
    L = layouts.LarsColumn
    assert len(row) == len(L)
    assert (row[L.LR], row[L.WEIGHT_DECAY], row[L.TRUST_COEFFICIENT], row[L.EPS]) == (0.1, 0.2, 0.3, 0.4)
    assert (row[L.TRUST_CLIP], row[L.ADAPT], row[L.NESTEROV]) == (True, False, True)
    assert (row[L.MOMENTUM], row[L.ONE_MINUS_DAMPENING]) == (0.7, 0.75)
    # the variants' effective values: the mode flags only where the group adapts (it does not here)
    assert (row[L.DENOMINATOR_DECAY], row[L.RATIO_MIN], row[L.RATIO_MAX], row[L.LR_IN_MOMENTUM]) == (0.0, 0.5, 2.0, True)
    assert (row[L.NORM_OF_SUM], row[L.AFTER_MOMENTUM], row[L.PLAIN_SGD]) == (False, False, False)
    row = lars_row({**lars, "trust_ratio": True, "trust_bounds": None})
    assert (row[L.NORM_OF_SUM], row[L.AFTER_MOMENTUM], row[L.PLAIN_SGD]) == (True, False, True)
    assert (row[L.RATIO_MIN], row[L.RATIO_MAX]) == (0.0, math.inf)
    row = lars_row({**lars, "trust_ratio": True, "ratio_denominator": "sum_of_norms"})
    assert (row[L.DENOMINATOR_DECAY], row[L.NORM_OF_SUM], row[L.AFTER_MOMENTUM]) == (0.2, False, False)
    assert lars_row({**lars, "trust_ratio": True, "ratio_denominator": "momentum_update"})[
        L.AFTER_MOMENTUM] is True

    lamb = {"lr": 0.1, "betas": (0.5, 0.25), "eps": 0.3, "weight_decay": 0.4, "bias_correction": True,
            "grad_averaging": False, "max_grad_norm": 0.6, "trust_clip": False, "trust_ratio": True,
            "adapt_only_decayed": True, "decay_mode": "update", "eps_inside_sqrt": True, "trust_bounds": (0.01, 10.0),
            "bias_correction_in_lr": True, "grad_norm_eps": 1e-6}
    row = lamb_row(lamb)
    B = layouts.LambColumn
    assert len(row) == len(B)
    assert (row[B.LR], row[B.BETA1], row[B.BETA2], row[B.ONE_MINUS_BETA2], row[B.BETA3]) == (0.1, 0.5, 0.25, 0.75, 1.0)
    assert (row[B.LOG_BETA1], row[B.LOG_BETA2]) == (math.log(0.5), math.log(0.25))
    assert (row[B.EPS], row[B.WEIGHT_DECAY], row[B.MAX_GRAD_NORM]) == (0.3, 0.4, 0.6)
    assert (row[B.BIAS_CORRECTION], row[B.TRUST_CLIP], row[B.ADAPT]) == (True, False, True)
    # adapt_only_decayed: the ADAPT column follows the group's weight decay at every step
    assert lamb_row({**lamb, "weight_decay": 0.0})[B.ADAPT] is False
    assert (row[B.EPS_INSIDE_SQRT], row[B.BIAS_CORRECTION_IN_LR]) == (True, True)
    assert (row[B.TRUST_LOW], row[B.TRUST_HIGH], row[B.GRAD_NORM_EPS]) == (0.01, 10.0, 1e-6)
    # the group's weight decay sits in the column of its decay_mode, 0 in the others
    for mode, column in (("update", B.WEIGHT_DECAY), ("l2", B.GRAD_DECAY), ("direct", B.DIRECT_DECAY)):
        moded = lamb_row({**lamb, "decay_mode": mode})
        assert [moded[c] for c in (B.WEIGHT_DECAY, B.GRAD_DECAY, B.DIRECT_DECAY)] == [
            0.4 if c == column else 0.0 for c in (B.WEIGHT_DECAY, B.GRAD_DECAY, B.DIRECT_DECAY)]
    assert lamb_row({**lamb, "trust_bounds": None})[B.TRUST_HIGH] == math.inf


def test_triton_constants_are_the_layouts():
    pytest.importorskip("triton")
    from fastlars.ops import lamb_step, lars_step, multi_tensor

    for module, layout, prefix in ((multi_tensor, layouts.TensorColumn, "COL_"),
                                   (multi_tensor, layouts.ChunkColumn, "CHUNK_"),
                                   (multi_tensor, layouts.SumColumn, "SUM_"),
                                   (lars_step, layouts.LarsColumn, ""), (lamb_step, layouts.LambColumn, "")):
        assert getattr(module, f"{prefix}NCOL") == len(layout)
        for column in layout:
            assert getattr(module, prefix + column.name) == int(column)
