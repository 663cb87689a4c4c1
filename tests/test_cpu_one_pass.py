"""The one-pass CPU step (csrc/cpu_kernels.cpp, lars_step_cpu / lamb_step_cpu) against the
two passes the sharded path keeps (sumsq_cpu + lars_update_cpu, lamb_norms_cpu +
lamb_update_cpu): the same bits whatever the batch size, a tensor larger than a batch
included; the gate's read of the gradients skipped when GradScaler has decided; a non-finite
weight stops the step at its tensor with an error naming it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlars
from fastlars.ops import cpp_step

pytestmark = pytest.mark.skipif("cpu" not in fastlars.available_backends(), reason="the C++ extension is not built")

LARS_OPTIONS = {
    "default": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "no-momentum": dict(momentum=0.0),
    "momentum_update": dict(momentum=0.9, ratio_denominator="momentum_update"),
    "norm_of_sum": dict(momentum=0.9, ratio_denominator="norm_of_sum", lr_in_momentum=True),
    "plain_sgd": dict(momentum=0.9, zero_norm="plain_sgd", trust_bounds=(0.5, 2.0)),
}
LAMB_OPTIONS = {
    "default": dict(),
    "clipping": dict(max_grad_norm=0.5),
    "l2": dict(decay_mode="l2"),
    "direct": dict(decay_mode="direct", eps_inside_sqrt=True),
    "bias_correction_in_lr": dict(bias_correction_in_lr=True, trust_clip=True),
}
# one batch for everything, a few tensors per batch, and a batch smaller than the largest tensor
BATCH_BYTES = [1 << 30, 40_000, 4_000]
SHAPES = [(1,), (7,), (13, 29), (0,), (5, 7, 3, 3), (20011,), (3, 3)]


def _params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    if len(params) > 2:
        params[2].data.zero_()  # a zero-norm weight
    return params


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = (0.3 * p.detach().float() + torch.randn(p.shape, generator=g)).to(p.dtype)
        if i == 1:
            p.grad.zero_()  # an exactly zero gradient


def _run(name, options, shapes, dtype, steps=3, scaler_like=False, master=False, backend="cpu"):
    params = _params(shapes, dtype)
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 1e-2},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    lr = 0.5 if name == "LARS" else 0.02
    opt = getattr(fastlars, name)(groups, lr=lr, backend=backend, master_weights=master, **options)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (1.0 - 0.2 * step)
        _grads(params, step)
        if scaler_like:  # GradScaler's protocol: the scale and found_inf are handed to the step
            opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
            for p in params:
                p.grad.mul_(2.0)
        opt.step()
    states = [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]
    stats = opt.layer_stats()
    return [p.detach().clone() for p in params], states, stats


def _same(a, b):
    params_a, states_a, stats_a = a
    params_b, states_b, stats_b = b
    for x, y in zip(params_a, params_b):
        assert torch.equal(x, y)
    for sa, sb in zip(states_a, states_b):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    for field in ("weight_norm", "trust_ratio"):
        assert torch.equal(getattr(stats_a, field), getattr(stats_b, field)), field
    # LAMB's one pass reports ||g|| from the gate's read, summed in another lane order
    torch.testing.assert_close(stats_a.grad_norm, stats_b.grad_norm, rtol=1e-6, atol=0)


@pytest.fixture
def two_pass(monkeypatch):
    def use(flag: bool):
        monkeypatch.setattr(cpp_step, "_one_pass", lambda plan: not flag and plan.mesh is None)
    return use


@pytest.mark.parametrize("batch_bytes", BATCH_BYTES)
@pytest.mark.parametrize("name, option", [("LARS", o) for o in LARS_OPTIONS] + [("LAMB", o) for o in LAMB_OPTIONS])
def test_one_pass_equals_two_passes(name, option, batch_bytes, two_pass, monkeypatch):
    options = (LARS_OPTIONS if name == "LARS" else LAMB_OPTIONS)[option]
    # a ratio dividing by ||x|| both ways: the gate's read of the gradients, and GradScaler's found_inf
    scaler_like = option in ("momentum_update", "norm_of_sum") and batch_bytes == BATCH_BYTES[-1]
    two_pass(True)
    expected = _run(name, options, SHAPES, torch.float32, scaler_like=scaler_like)
    two_pass(False)
    monkeypatch.setattr(cpp_step, "BATCH_BYTES", batch_bytes)
    calls = []
    real = cpp_step._C.lars_step_cpu
    monkeypatch.setattr(cpp_step._C, "lars_step_cpu", lambda *a: calls.append(1) or real(*a), raising=False)
    _same(_run(name, options, SHAPES, torch.float32, scaler_like=scaler_like), expected)
    assert bool(calls) == (name == "LARS")  # the one pass ran


def test_lars_ratio_of_x_takes_the_one_pass_behind_the_gate_read(monkeypatch):
    """norm_of_sum / momentum_update with a gate that reads the gradients: the gate reads
    only the gradients and the one pass sums w^2 and x^2 per batch; the result is the
    reference's."""
    calls = []
    for name in ("lars_step_cpu", "grad_sumsq_cpu", "sumsq_cpu"):
        real = getattr(cpp_step._C, name)
        monkeypatch.setattr(cpp_step._C, name, lambda *a, real=real, name=name: calls.append(name) or real(*a),
                            raising=False)
    for option in ("momentum_update", "norm_of_sum"):
        calls.clear()
        params, _, _ = _run("LARS", LARS_OPTIONS[option], SHAPES, torch.float64)
        assert calls == ["grad_sumsq_cpu", "lars_step_cpu"] * 3
        reference, _, _ = _run("LARS", LARS_OPTIONS[option], SHAPES, torch.float64, backend="reference")
        for p, q in zip(params, reference):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_one_pass_dtypes(name, dtype, two_pass, monkeypatch):
    master = dtype == torch.bfloat16
    two_pass(True)
    expected = _run(name, {}, SHAPES, dtype, master=master)
    two_pass(False)
    monkeypatch.setattr(cpp_step, "BATCH_BYTES", 4_000)
    _same(_run(name, {}, SHAPES, dtype, master=master), expected)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(0, 40_000)), min_size=1, max_size=6),
       batch_bytes=st.integers(1, 1_000_000), name=st.sampled_from(["LARS", "LAMB"]))
def test_one_pass_any_batching(shapes, batch_bytes, name, two_pass, monkeypatch):
    """Any tensor sizes (chunk edges, empty tensors) and any batch size: the same bits."""
    two_pass(True)
    expected = _run(name, {}, shapes, torch.float32, steps=2)
    two_pass(False)
    monkeypatch.setattr(cpp_step, "BATCH_BYTES", batch_bytes)
    _same(_run(name, {}, shapes, torch.float32, steps=2), expected)


@pytest.mark.parametrize("name, options", [("LARS", {}), ("LAMB", {}), ("LAMB", dict(max_grad_norm=1.0))])
def test_decided_gate_reads_no_gradient_first(name, options, monkeypatch):
    """With GradScaler's found_inf the step reads the gradients once (LAMB's clipping still
    needs their global norm first)."""
    calls = []
    real = cpp_step._C.grad_sumsq_cpu
    monkeypatch.setattr(cpp_step._C, "grad_sumsq_cpu", lambda grads: calls.append(len(grads)) or real(grads),
                        raising=False)
    decided = _run(name, options, SHAPES, torch.float32, scaler_like=True)
    assert len(calls) == (3 if options else 0)
    monkeypatch.setattr(cpp_step, "_one_pass", lambda plan: False)
    _same(decided, _run(name, options, SHAPES, torch.float32, scaler_like=True))


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_nonfinite_weight_stops_at_its_tensor(name, monkeypatch):
    monkeypatch.setattr(cpp_step, "BATCH_BYTES", 4_000)  # a batch per tensor or two
    params = _params([(64, 64), (64, 64), (64, 64)], torch.float32)
    opt = getattr(fastlars, name)(params, lr=0.1, backend="cpu", weight_decay=1e-2)
    _grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    params[1].data[3, 5] = float("inf")
    _grads(params, 1)
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(64, 64\)\)"):
        opt.step()
    assert not torch.equal(params[0], before[0])  # stepped before the stop, as the message says
    assert torch.equal(params[2], before[2])  # not reached


def test_lamb_counts_its_steps_in_one_call():
    """The CPU LAMB step adds 1 to every step counter after its kernel (_C.add_one_cpu, not one
    add per tensor): in place, with the version bumped as an in-place op does, and a counter of
    another dtype (set by hand) counted too; a skipped step counts nothing."""
    params = _params(SHAPES, torch.float32)
    opt = fastlars.LAMB(params, lr=0.01, backend="cpu", skip_nonfinite=True)
    _grads(params, 0)
    opt.step()
    counters = {id(p): opt.state[p]["step"] for p in params}
    versions = {id(p): counters[id(p)]._version for p in params}
    opt.state[params[0]]["step"] = torch.tensor(1.0, dtype=torch.float64)
    _grads(params, 1)
    opt.step()
    for p in params:
        assert float(opt.state[p]["step"]) == 2.0
        if p is not params[0]:
            assert opt.state[p]["step"] is counters[id(p)] and counters[id(p)]._version > versions[id(p)]
    params[1].grad[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and all(float(opt.state[p]["step"]) == 2.0 for p in params)
