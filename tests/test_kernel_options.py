"""The Triton kernels are compiled per launch for the options its groups use (OPTIONS,
lars_step.LarsOption / lamb_step.LambOption): a launch of default groups gets the lean
default body, a launch mixing groups with and without an option gets that option's
per-group select. Checked: the option union each launch is given, and launches that mix
groups (the selects) against the reference through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

import fastlars
from test_gpu_readiness import _record_launches
from test_optim_backends import use_chunks

pytest.importorskip("triton")


def _options_of(log, kernel):
    return {int(dict(kwargs)["OPTIONS"]) for name, _, kwargs in log if name == kernel}


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
            for shape in [(37, 11), (1,), (53,), (3, 3, 3)]]


def _step(opt, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
    opt.step()


@pytest.mark.usefixtures("triton_interpreter")
def test_default_groups_launch_the_default_options(monkeypatch):
    from fastlars.ops.lamb_step import LambOption
    from fastlars.ops.lars_step import LarsOption

    log = _record_launches(monkeypatch)
    params = _params()
    lars = fastlars.LARS([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "trust_ratio": False}],
                         lr=0.1, weight_decay=1e-4, backend="triton")
    _step(lars, params, 0)
    assert _options_of(log, "lars_update_kernel") == {int(LarsOption.MOMENTUM)}
    assert not _options_of(log, "lars_sums_kernel")  # the plain norms pass (sumsq_kernel)
    log.clear()
    lamb = fastlars.LAMB([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=0.01,
                         weight_decay=0.01, backend="triton")
    _step(lamb, params, 0)
    assert _options_of(log, "lamb_norms_kernel") == _options_of(log, "lamb_update_kernel") == {
        int(LambOption.EPS_OUTSIDE_SQRT)}


@pytest.mark.usefixtures("triton_interpreter")
def test_a_launch_gets_the_union_of_its_groups_options(monkeypatch):
    from fastlars.ops.lamb_step import LambOption
    from fastlars.ops.lars_step import LarsOption

    log = _record_launches(monkeypatch)
    params = _params()
    lars = fastlars.LARS([{"params": params[:1], "nesterov": True}, {"params": params[1:2], "momentum": 0.0},
                          {"params": params[2:], "ratio_denominator": "momentum_update"}], lr=0.1, backend="triton")
    _step(lars, params, 0)
    expected = int(LarsOption.NESTEROV | LarsOption.MOMENTUM | LarsOption.NO_MOMENTUM | LarsOption.AFTER_MOMENTUM)
    assert _options_of(log, "lars_sums_kernel") == _options_of(log, "lars_update_kernel") == {expected}
    log.clear()
    lamb = fastlars.LAMB([{"params": params[:1], "eps_inside_sqrt": True}, {"params": params[1:2]},
                          {"params": params[2:3], "decay_mode": "l2"}, {"params": params[3:], "decay_mode": "direct"}],
                         lr=0.01, weight_decay=0.01, backend="triton")
    _step(lamb, params, 0)
    assert _options_of(log, "lamb_update_kernel") == {int(sum(LambOption))}
    log.clear()
    for group in lamb.param_groups:  # options are read at every step: the union follows the groups
        group.update(eps_inside_sqrt=True, decay_mode="update")
    _step(lamb, params, 1)
    assert _options_of(log, "lamb_update_kernel") == {int(LambOption.EPS_INSIDE_SQRT)}


MIXED = {
    "LARS": [dict(nesterov=True), dict(momentum=0.0, zero_norm="plain_sgd"), dict(ratio_denominator="momentum_update"),
             dict(ratio_denominator="norm_of_sum", dampening=0.2)],
    "LAMB": [dict(eps_inside_sqrt=True, eps=1e-3), dict(), dict(decay_mode="l2"), dict(decay_mode="direct")],
}


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_mixed_groups_match_the_reference(name, monkeypatch):
    """Each group in one launch with another option (the per-group selects of the mixed
    option sets), several chunks per tensor, fp64, against the reference."""
    use_chunks(monkeypatch, 32, 16, 2)
    base = dict(lr=0.5, weight_decay=0.05, trust_coefficient=0.02) if name == "LARS" else dict(lr=0.02,
                                                                                            weight_decay=0.05)
    runs = {}
    for backend in ("reference", "triton"):
        params = _params(torch.float64)
        opt = getattr(fastlars, name)([{"params": [p], **options} for p, options in zip(params, MIXED[name])],
                                      backend=backend, **base)
        for step in range(4):
            _step(opt, params, step)
        runs[backend] = params
    for p, q in zip(runs["triton"], runs["reference"]):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
