"""Conformance with torch.optim: what PyTorch's generic optimizer tests (test/test_optim.py,
``TestOptimRenewed``) check, for LARS and LAMB, written for this project.

LARS and LAMB are described as ``OptimizerInfo`` entries (torch's own machinery in
``torch.testing._internal.common_optimizers``) with a few kwarg sets each; the tests
below walk them on every CPU backend (Triton under its interpreter, on small tensors).
Where LARS and LAMB coincide with a torch optimizer (a LARS group with
``trust_ratio=False`` is SGD, a LAMB group with ``trust_ratio=False`` is AdamW), the
results are compared with torch's.

What does not apply, and why (the one list; the report repeats it):

- ``differentiable=True``: refused with ValueError. The step runs under ``no_grad`` and
  the fused kernels have no autograd formula (test_differentiable_and_complex_are_refused).
- complex parameters: refused with TypeError at construction (torch views them as real
  pairs; a per-layer trust ratio of a complex layer is not defined by the papers).
- sparse gradients: refused with ValueError at step (tests/test_optim_bad_input.py); as
  torch's SGD-with-momentum/AdamW, no sparse path.
- ``capturable=True`` on backends other than triton, and without ``skip_nonfinite``:
  refused (tests/test_capturable.py); torch's capturable means "no host sync", which
  the triton backend gives, the others read flags on the host. ``capturable=True`` with
  ``maximize=True``, or with a strided-view parameter, is refused too: the negated
  gradients, and the dense copy of such a parameter, are new tensors at each step.
- A ``set`` of parameters given directly (not inside a group): torch turns it into a list
  without complaint, and so do we (a set inside a group is refused, as by torch).
- ``foreach=True`` with ``fused=True``: ValueError with torch's message (torch raises
  RuntimeError); a backend that contradicts the flags: ValueError.
- The fused kernels under ``torch.compile``: they run eagerly (``torch._dynamo.disable``
  around the drivers), the rest of the step is traced; torch's fused optimizers are
  compiled as whole graphs. Results are the same as eager (test_compiled_step_matches_eager).
- ``LRScheduler`` tests of torch (StepLR, ReduceLROnPlateau) only touch ``group["lr"]``,
  which is torch's; covered by tests/test_schedules.py, not repeated here.
- Mixed-device param groups in one optimizer (torch's ``supports_multiple_devices``):
  each group must be on one device; two devices in one optimizer need a GPU, see
  tests/test_fused_gpu.py.
- ``state_dict`` of a LAMB ``step``: a float32 tensor on the parameter's device (torch
  keeps CPU ``step`` tensors unless fused/capturable); a plain-number ``step`` loads.
- torch's ``test_step_is_noop_for_zero_grads`` on LAMB: skipped through the
  ``OptimizerInfo`` (``LAMB_DECAYS_AT_ZERO_GRAD``). The test keeps inputs that do not set
  ``weight_decay`` and lowers ``lr`` only for a class named AdamW; LAMB's default
  ``weight_decay=0.01`` (AdamW's) moves ``p`` to ``(1 - lr) * p`` at a zero gradient, as
  the paper's update does. Without weight decay a zero gradient is a no-op
  (test_zero_gradients_are_a_no_op).
- torch's CUDA-only, multi-GPU and large-memory tests (``onlyCUDA``, ``TEST_MULTIGPU``,
  ``largeTensorTest``), ``test_cpu_load_state_dict`` (non-CPU devices only), and those
  gated on ``supports_complex``/``supports_sparse``/``step_requires_closure`` (false for
  both): not run on CPU; GPU behaviour is in tests/test_fused_gpu.py.

Checked by running torch's own ``TestOptimRenewed`` (test/test_optim.py, not shipped in
the wheel) on these two entries, CPU: everything else passes.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import unittest
import warnings

import pytest
import torch
from torch.testing._internal.common_methods_invocations import DecorateInfo
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import fastlars
from conftest import backend_marks, backend_params

BACKENDS = fastlars.available_backends()
FUSED_CPU = [b for b in ("cpu",) if b in BACKENDS]
HOST = [b for b in BACKENDS if b != "triton"]  # reference, foreach, cpu


def name_backend(triton_for=("LARS",)):
    """(optimizer, backend) pairs: both optimizers on every backend but Triton, which runs
    slowly under its interpreter: there only the optimizers named (small cases)."""
    pairs = [(name, b) for name in ("LARS", "LAMB") for b in HOST]
    pairs += [(name, "triton") for name in triton_for if "triton" in BACKENDS]
    return [pytest.param(name, b, marks=backend_marks(b)) for name, b in pairs]
SHAPES = [(4, 3), (5,), (1,), (2, 3, 2)]


# ----------------------------------------------------------------------------
# LARS and LAMB as torch's OptimizerInfo entries

def lars_inputs(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.1, "weight_decay": 1e-2}, desc="momentum and weight_decay"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.05), "nesterov": True}, desc="tensor lr, nesterov"),
        OptimizerInput(params=None, kwargs={"lr": 0.1, "momentum": 0.0, "trust_clip": True},
                       desc="no momentum, trust_clip"),
        OptimizerInput(params=None, kwargs={"lr": 0.1, "weight_decay": 0.1, "dampening": 0.3, "maximize": True},
                       desc="maximize, dampening"),
    ]


def lamb_inputs(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.01, "max_grad_norm": 1.0, "trust_clip": True},
                       desc="clipping, trust_clip"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01), "bias_correction": False, "weight_decay": 0.0},
                       desc="tensor lr, no bias correction"),
        OptimizerInput(params=None, kwargs={"lr": 0.01, "weight_decay": 0.1, "maximize": True}, desc="maximize"),
    ]


def _common_errors(device, dtype):
    """torch's errors for every optimizer, and those of the flags we refuse."""
    p = torch.nn.Parameter(torch.randn(2, 2))
    return get_error_inputs_for_all_optims(device, dtype) + [
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"lr": -0.1}, desc="negative lr"),
                            error_type=ValueError, error_regex="Invalid learning rate: -0.1"),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"differentiable": True}, desc="differentiable"),
                            error_type=ValueError, error_regex="differentiable=True is not supported"),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"foreach": True, "fused": True}, desc="both flags"),
                            error_type=ValueError, error_regex="`fused` and `foreach` cannot be `True` together."),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"foreach": True, "backend": "reference"},
                                           desc="backend against flag"),
                            error_type=ValueError, error_regex="contradicts foreach=True"),
        ErrorOptimizerInput(OptimizerInput(params=[torch.randn(2, dtype=torch.complex64, requires_grad=True)],
                                           kwargs={}, desc="complex parameters"),
                            error_type=TypeError, error_regex="complex parameters are not supported"),
        ErrorOptimizerInput(OptimizerInput(params=[{"params": {p}}], kwargs={}, desc="a set in a group"),
                            error_type=TypeError, error_regex="ordered collections"),
    ]


def lars_errors(device, dtype):
    return _common_errors(device, dtype) + [
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"lr": 1e-2, "momentum": -0.5}, desc="momentum"),
                            error_type=ValueError, error_regex="Invalid momentum value: -0.5"),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"weight_decay": -0.5}, desc="weight_decay"),
                            error_type=ValueError, error_regex="Invalid weight_decay value: -0.5"),
    ]


def lamb_errors(device, dtype):
    return _common_errors(device, dtype) + [
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"betas": (1.0, 0.999)}, desc="beta1"),
                            error_type=ValueError, error_regex="Invalid beta parameter at index 0: 1.0"),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"betas": (0.9, -0.1)}, desc="beta2"),
                            error_type=ValueError, error_regex="Invalid beta parameter at index 1: -0.1"),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"eps": -1e-8}, desc="eps"),
                            error_type=ValueError, error_regex="Invalid eps value: -1e-08"),
    ]


# torch's test_step_is_noop_for_zero_grads leaves out inputs that set weight_decay, and
# lowers lr for the class named AdamW only: LAMB's default weight_decay (0.01, AdamW's)
# moves the parameters by lr*p at a zero gradient, as it should (the trust ratio rescales
# the decay to ||p||). Its weight_decay=0 inputs are no-ops (test_zero_gradients_are_a_no_op).
LAMB_DECAYS_AT_ZERO_GRAD = ("LAMB's default weight_decay=0.01 decays the parameters at a zero gradient, "
                            "as AdamW's does; torch's test only special-cases AdamW")

OPTIM_DB = [
    OptimizerInfo(fastlars.LARS, optim_inputs_func=lars_inputs, optim_error_inputs_func=lars_errors,
                  supported_impls=("foreach", "fused"), supports_fused_on=("cpu", "cuda"), has_capturable_arg=True,
                  supports_complex=False, supports_multiple_devices=False),
    OptimizerInfo(fastlars.LAMB, optim_inputs_func=lamb_inputs, optim_error_inputs_func=lamb_errors,
                  supported_impls=("foreach", "fused"), supports_fused_on=("cpu", "cuda"), has_capturable_arg=True,
                  supports_complex=False, supports_multiple_devices=False,
                  skips=(DecorateInfo(unittest.skip(LAMB_DECAYS_AT_ZERO_GRAD), "TestOptimRenewed",
                                      "test_step_is_noop_for_zero_grads"),)),
]
CASES = [pytest.param(info, inp, id=f"{info.name}-{inp.desc}") for info in OPTIM_DB
         for inp in info.optim_inputs_func("cpu")]
MAXIMIZE_CASES = [case for case in CASES if case.values[1].kwargs.get("maximize")]
ERROR_CASES = [pytest.param(info, err, id=f"{info.name}-{err.optimizer_error_input.desc}") for info in OPTIM_DB
               for err in info.optim_error_inputs_func("cpu", torch.float32)]


# ----------------------------------------------------------------------------
# helpers

def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def groups_of(params, names=None):
    """Two groups, the second without trust ratio and with its own lr (torch's per-group options)."""
    items = params if names is None else list(zip(names, params))
    return [{"params": items[:2]}, {"params": items[2:], "trust_ratio": False, "weight_decay": 0.0}]


def set_grads(params, seed, step):
    g = torch.Generator().manual_seed(1000 * seed + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def train(opt, params, steps, seed=1, step_fn=None):
    for s in steps:
        set_grads(params, seed, s)
        (step_fn or opt.step)()


def build(info, inp, backend="auto", params=None, named=False, **extra):
    params = make_params() if params is None else params
    names = [f"p{i}" for i in range(len(params))] if named else None
    kwargs = {**copy.deepcopy(inp.kwargs), **extra}
    return params, info.optim_cls(groups_of(params, names), backend=backend, **kwargs)


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same(params, others, state=None, other_state=None, exact=True):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    for p, q in zip(params, others):
        torch.testing.assert_close(q.detach(), p.detach(), **tol)
        if state is not None:
            assert state[p].keys() == other_state[q].keys()
            for key, value in state[p].items():
                torch.testing.assert_close(other_state[q][key], value, **tol)


# ----------------------------------------------------------------------------
# construction: errors, defaults, groups, names, repr

@pytest.mark.parametrize("info, err", ERROR_CASES)
def test_errors_as_torch_expects(info, err):
    inp = err.optimizer_error_input
    params = make_params()[:2] if inp.params is None else inp.params
    assert err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    if err.error_type is UserWarning:
        with pytest.warns(UserWarning, match=err.error_regex):
            info.optim_cls(params, **inp.kwargs)
    else:
        with pytest.raises(err.error_type, match=re.escape(err.error_regex) if "`" in err.error_regex
                           else err.error_regex):
            info.optim_cls(params, **inp.kwargs)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(lr=0.1, momentum=-0.5), dict(lr=0.1, weight_decay=-1.0)])
@pytest.mark.parametrize("params", [None, 3])
def test_arguments_checked_before_parameters(kwargs, params):
    """Bad settings give the same exception type as torch.optim.SGD, whatever params is:
    both check settings before walking the parameters."""
    with pytest.raises(Exception) as theirs:
        torch.optim.SGD(params, **kwargs)
    with pytest.raises(theirs.type):
        fastlars.LARS(params, **kwargs)


def test_default_lr_is_sgds():
    params = make_params()
    assert fastlars.LARS(params).defaults["lr"] == torch.optim.SGD(params).defaults["lr"] == 1e-3


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_group_dicts_are_the_callers(name):
    params = make_params()
    first, second = {"params": params[:2]}, {"params": params[2:], "lr": 0.5}
    opt = getattr(fastlars, name)([first])
    opt.add_param_group(second)
    assert opt.param_groups[0] is first and opt.param_groups[1] is second
    assert second["lr"] == 0.5 and second["trust_ratio"] is True and second["maximize"] is False


@pytest.mark.parametrize("info", OPTIM_DB, ids=lambda i: i.name)
def test_named_parameters_as_torch(info):
    """model.named_parameters(), also through add_param_group; names in the state_dict as
    torch.optim.SGD puts them; mixing named and unnamed groups refused as torch does."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    named = list(model.named_parameters())
    ours = info.optim_cls(named[:2])
    ours.add_param_group({"params": named[2:]})
    theirs = torch.optim.SGD(named[:2])
    theirs.add_param_group({"params": named[2:]})
    for mine, torchs in zip(ours.state_dict()["param_groups"], theirs.state_dict()["param_groups"]):
        assert mine["param_names"] == torchs["param_names"] and mine["params"] == torchs["params"]
    assert ours.param_groups[1]["param_names"] == ["1.weight", "1.bias"]
    model(torch.randn(5, 3)).sum().backward()
    ours.step()  # steps like unnamed parameters
    with pytest.raises(ValueError, match="cannot add param group without names"):
        ours.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_repr_is_torchs_format(name):
    params = make_params()
    opt = getattr(fastlars, name)([{"params": params[:2], "lr": torch.tensor(0.1)}, {"params": params[2:]}])
    text = repr(opt)
    assert text.startswith(f"{name} (\nParameter Group 0\n") and "\nParameter Group 1\n" in text
    assert f"    lr: {torch.tensor(0.1)}\n" in text and "    maximize: False\n" in text and text.endswith(")")
    assert text == torch.optim.Optimizer.__repr__(opt)


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_differentiable_and_complex_are_refused(name):
    cls = getattr(fastlars, name)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        cls(make_params(), differentiable=True)
    with pytest.raises(TypeError, match=r"\['params'\]\[0\].*complex parameters are not supported"):
        cls([torch.randn(3, dtype=torch.complex64, requires_grad=True)])
    opt = cls(make_params())
    opt.param_groups[0]["differentiable"] = True  # e.g. from a loaded torch checkpoint
    set_grads(opt.param_groups[0]["params"], 0, 0)
    with pytest.raises(ValueError, match=r"differentiable=True in param_groups\[0\] is not supported"):
        opt.step()


# ----------------------------------------------------------------------------
# state_dict, deepcopy, pickle

@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
@pytest.mark.parametrize("info, inp", CASES)
def test_state_dict_roundtrip(info, inp, named):
    """Save (weights_only torch.load), load into a fresh optimizer, carry on: bitwise the same."""
    params, opt = build(info, inp, named=named)
    train(opt, params, range(2))
    saved = roundtrip(opt.state_dict())
    assert ("param_names" in saved["param_groups"][0]) == named
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    _, other = build(info, inp, params=twins, named=named)
    other.load_state_dict(saved)
    train(opt, params, range(2, 4))
    train(other, twins, range(2, 4))
    assert_same(params, twins, opt.state, other.state)


@pytest.mark.parametrize("saved_named, loading_named", [(True, False), (False, True)])
def test_names_on_load_as_torch(saved_named, loading_named):
    """A state_dict saved with (without) names loads into an optimizer without (with)
    them, and the names that remain are torch.optim.SGD's."""
    results = []
    for cls in (torch.optim.SGD, fastlars.LARS):
        params = make_params()
        names = [f"p{i}" for i in range(len(params))]
        saver = cls(groups_of(params, names if saved_named else None), lr=0.1, momentum=0.9)
        loader = cls(groups_of(params, names if loading_named else None), lr=0.1, momentum=0.9)
        train(saver, params, range(1))
        loader.load_state_dict(roundtrip(saver.state_dict()))
        results.append([g.get("param_names") for g in loader.param_groups])
        if cls is fastlars.LARS:
            assert loader.state[params[0]]["momentum_buffer"].equal(saver.state[params[0]]["momentum_buffer"])
    assert results[0] == results[1]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name, backend", name_backend())
def test_copied_optimizer_steps_as_the_original(name, backend, how):
    """deepcopy or pickle of (params, optimizer), then both step: the same results, and the
    settings torch.optim does not carry (backend, master weights, skip mode, skip counter)
    come along."""
    params = make_params(dtype=torch.bfloat16)
    opt = getattr(fastlars, name)(groups_of(params), lr=0.05, backend=backend, master_weights=True,
                                  skip_nonfinite=True)
    train(opt, params, range(1))
    params[0].grad[0, 0] = float("nan")
    opt.step()  # skipped, counted
    pair = (params, opt)
    params2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    for key in ("backend", "master_weights", "skip_nonfinite", "capturable"):
        assert getattr(opt2, key) == getattr(opt, key), key
    assert opt2.skipped_steps == opt.skipped_steps == 1
    assert opt2.param_groups[0]["params"][0] is params2[0]
    train(opt, params, range(3, 4))
    train(opt2, params2, range(3, 4))
    assert_same(params, params2, opt.state, opt2.state)
    assert opt2.state[params2[0]]["master_param"].dtype == torch.float32


# ----------------------------------------------------------------------------
# hooks

@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_every_hook(name):
    params = make_params(dtype=torch.bfloat16)
    opt = getattr(fastlars, name)(groups_of(params), lr=0.05, master_weights=True)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    handles = (register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", o is opt))),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", o is opt))))
    try:
        train(opt, params, range(1))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [("global pre", True), ("pre", True), ("post", True), ("global post", True)]

    opt.register_state_dict_pre_hook(lambda o: calls.append("sd pre"))

    def tag(o, state_dict):
        state_dict["tag"] = "ours"
        return state_dict

    opt.register_state_dict_post_hook(tag)
    saved = opt.state_dict()
    assert saved["tag"] == "ours" and calls[-1] == "sd pre"

    def halve_moment(o, state_dict):  # a pre-hook that returns a changed state dict
        key = "momentum_buffer" if name == "LARS" else "exp_avg"
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0][key] = state_dict["state"][0][key] / 2
        return state_dict

    seen = {}

    def check(o):  # post-hooks see the state as it will stay: fp32, what the pre-hook made
        key = "momentum_buffer" if name == "LARS" else "exp_avg"
        seen["state"] = o.state[params[0]][key].clone()

    opt.register_load_state_dict_pre_hook(halve_moment)
    opt.register_load_state_dict_post_hook(check)
    key = "momentum_buffer" if name == "LARS" else "exp_avg"
    before = opt.state[params[0]][key].clone()
    opt.load_state_dict(saved)
    assert opt.state[params[0]][key].dtype == torch.float32
    assert torch.equal(opt.state[params[0]][key], before / 2) and torch.equal(seen["state"], before / 2)
    # the optimizer's own load hooks are removed after the load: the user's two remain
    assert len(opt._optimizer_load_state_dict_pre_hooks) == len(opt._optimizer_load_state_dict_post_hooks) == 1


# ----------------------------------------------------------------------------
# learning rates, backends, flags

@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("name, backend", name_backend())
def test_tensor_lr(name, backend, shape):
    """A one-element lr tensor of any shape steps as the same lr given as a number."""
    results = []
    for lr in (0.05, torch.full(shape, 0.05)):
        params = make_params()
        opt = getattr(fastlars, name)(groups_of(params), lr=lr, backend=backend, weight_decay=1e-2)
        train(opt, params, range(1))
        results.append(params)
    assert_same(*results, exact=False)


@pytest.mark.parametrize("name, backend", name_backend(triton_for=()))
def test_group_lrs_are_independent(name, backend):
    """Per-group lr: one optimizer with two groups equals two optimizers of one group each."""
    params, solo = make_params(), make_params()
    cls = getattr(fastlars, name)
    opt = cls([{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.01}], backend=backend)
    one, two = cls(solo[:2], lr=0.1, backend=backend), cls(solo[2:], lr=0.01, backend=backend)
    for s in range(2):
        set_grads(params, 2, s)
        set_grads(solo, 2, s)
        opt.step()
        one.step()
        two.step()
    assert_same(params, solo, exact=False)


@pytest.mark.parametrize("flags, expected", [
    (dict(foreach=True), "foreach"),
    (dict(foreach=False), "cpu" if FUSED_CPU else "reference"),
    (dict(fused=True), "cpu"),
    (dict(fused=False), "foreach"),
    (dict(foreach=False, fused=False), "reference"),
    (dict(foreach=None, fused=None), "cpu" if FUSED_CPU else "foreach"),
])
def test_torch_flags_choose_the_backend(flags, expected):
    if expected == "cpu" and not FUSED_CPU:
        pytest.skip("the C++ extension is not built")
    assert fastlars.LARS(make_params(), **flags).backend == expected


@pytest.mark.parametrize("info, inp", CASES)
def test_foreach_and_fused_match_the_for_loop(info, inp):
    """torch's foreach/fused equivalence: each implementation flag against foreach=False,
    fused=False (the one-tensor-at-a-time reference)."""
    params, reference = build(info, inp, foreach=False, fused=False)
    assert reference.backend == "reference"
    train(reference, params, range(3))
    for flags in (dict(foreach=True), dict(fused=True)) if FUSED_CPU else (dict(foreach=True),):
        others, opt = build(info, inp, **flags)
        train(opt, others, range(3))
        assert_same(params, others, reference.state, opt.state, exact=False)


@pytest.mark.parametrize("info, inp, backend", [
    pytest.param(*case.values, b, id=f"{case.id}-{b}", marks=backend_marks(b)) for case in MAXIMIZE_CASES
    for b in (BACKENDS if case.values[0].name == "LARS" else HOST)])
def test_maximize_against_the_reference(info, inp, backend):
    """maximize=True on every backend: as the reference, and as minimizing -f (negated
    gradients) without maximize."""
    params, ref = build(info, inp, backend="reference")
    train(ref, params, range(3))
    others, opt = build(info, inp, backend=backend)
    train(opt, others, range(3))
    assert_same(params, others, ref.state, opt.state, exact=False)
    negated, plain = build(info, inp, backend=backend, maximize=False)
    for s in range(3):
        set_grads(negated, 1, s)
        for p in negated:
            p.grad.neg_()
        plain.step()
    assert_same(params, negated, exact=False)


@pytest.mark.parametrize("backend", backend_params(HOST))
@pytest.mark.parametrize("maximize", [False, True])
def test_lars_without_trust_ratio_is_sgd(backend, maximize):
    params, twins = make_params(), make_params()
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=1e-2, maximize=maximize)
    lars = fastlars.LARS([{"params": params, "trust_ratio": False}], backend=backend, **kwargs)
    sgd = torch.optim.SGD(twins, **kwargs)
    train(lars, params, range(3))
    train(sgd, twins, range(3))
    assert_same(twins, params, sgd.state, lars.state, exact=False)


@pytest.mark.parametrize("backend", backend_params(HOST))
@pytest.mark.parametrize("maximize", [False, True])
def test_lamb_without_trust_ratio_is_adamw(backend, maximize):
    params, twins = make_params(), make_params()
    kwargs = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, maximize=maximize)
    lamb = fastlars.LAMB([{"params": params, "trust_ratio": False}], backend=backend, **kwargs)
    adamw = torch.optim.AdamW(twins, **kwargs)
    train(lamb, params, range(3))
    train(adamw, twins, range(3))
    assert_same(twins, params, exact=False)


@pytest.mark.parametrize("name, backend", name_backend())
def test_zero_gradients_are_a_no_op(name, backend):
    """Zero gradients without weight decay leave the parameters as they are (torch's
    test_step_is_noop_for_zero_grads); LAMB's default weight decay alone moves p to
    (1 - lr) * p: the trust ratio ||p|| / ||wd * p|| undoes wd (see LAMB_DECAYS_AT_ZERO_GRAD)."""
    for kwargs in [dict(weight_decay=0.0)] + ([{}] if name == "LAMB" else []):
        params = make_params()
        before = [p.detach().clone() for p in params]
        opt = getattr(fastlars, name)(params, lr=0.1, backend=backend, **kwargs)
        for _ in range(2):
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
        factor = 1.0 if kwargs else (1 - 0.1) ** 2
        for p, b in zip(params, before):
            torch.testing.assert_close(p.detach(), b * factor, rtol=0 if kwargs else 1e-6, atol=0)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_no_state_without_momentum(backend):
    """LARS with momentum=0 keeps nothing per parameter: state stays empty, as SGD's."""
    params = make_params()
    opt = fastlars.LARS(params, lr=0.1, momentum=0.0, backend=backend)
    sgd = torch.optim.SGD(make_params(), lr=0.1, momentum=0.0)
    train(opt, params, range(1))
    train(sgd, sgd.param_groups[0]["params"], range(1))
    assert len(opt.state) == len(sgd.state) == 0
    assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize("backend", backend_params(HOST))
def test_lamb_loads_a_plain_number_step(backend):
    """Older torch checkpoints store AdamW's step as a number; LAMB loads and continues."""
    params, twins = make_params(), make_params()
    opt = fastlars.LAMB(params, backend=backend)
    train(opt, params, range(2))
    saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state dicts
    for state in saved["state"].values():
        state["step"] = int(state["step"].item())
    other = fastlars.LAMB(twins, backend=backend)
    other.load_state_dict(saved)
    for p, q in zip(params, twins):
        q.data.copy_(p.data)
    assert all(other.state[q]["step"].dtype == torch.float32 for q in twins)
    train(opt, params, range(2, 4))
    train(other, twins, range(2, 4))
    assert_same(params, twins, opt.state, other.state)


# ----------------------------------------------------------------------------
# deferred init, strided parameters, torch.compile

def materialise_on_cpu(model):
    """model.to_empty(device="cpu") that keeps the Parameter objects (the optimizer holds them)."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


@pytest.mark.parametrize("requested", ["auto"] + [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_deferred_init_on_meta(name, requested):
    """Parameters on the meta device at construction (deferred init): the backend is
    chosen at the first step, for the device the parameters were materialised on."""
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    opt = getattr(fastlars, name)(model.parameters(), lr=0.1, backend=requested)
    materialise_on_cpu(model)
    assert opt.param_groups[0]["params"][0] is model.weight and model.weight.device.type == "cpu"
    torch.nn.init.normal_(model.weight, generator=torch.Generator().manual_seed(0))
    torch.nn.init.zeros_(model.bias)
    twin = copy.deepcopy(model)
    eager = getattr(fastlars, name)(twin.parameters(), lr=0.1, backend=requested)
    for m, o in ((model, opt), (twin, eager)):
        train(o, list(m.parameters()), range(2))
    assert opt.backend == eager.backend
    assert_same(list(twin.parameters()), list(model.parameters()), eager.state, opt.state)


@pytest.mark.skipif(not FUSED_CPU, reason="no fused CPU backend in this installation")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_fused_flag_with_params_on_meta(name):
    """fused=True with parameters on the meta device: constructing is fine, a step on them
    raises torch.optim's RuntimeError (no fused kernels for meta), and once materialised on
    the CPU the optimizer steps with the fused CPU backend."""
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
        twin = torch.nn.Linear(4, 3)
    ours = getattr(fastlars, name)(model.parameters(), fused=True)
    theirs = torch.optim.AdamW(twin.parameters(), fused=True)
    for m in (model, twin):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        theirs.step()
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        ours.step()
    materialise_on_cpu(model)
    params = list(model.parameters())
    for p in params:
        torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(0))
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = getattr(fastlars, name)(twins, backend="reference")
    train(ours, params, range(2))
    train(reference, twins, range(2))
    assert ours.backend == "cpu"
    assert_same(twins, params, reference.state, ours.state, exact=False)


def strided_params():
    """Leaf parameters that are strided views (every other column), transposed, and plain."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 14, generator=g)
    return [torch.nn.Parameter(base[:, ::2]), torch.nn.Parameter(torch.randn(6, 4, generator=g).t()),
            torch.nn.Parameter(torch.randn(7, generator=g))]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("name, backend", name_backend())
def test_non_contiguous_parameters(name, backend, maximize):
    """Strided-view leaves are legal torch parameters: every backend steps them as the
    reference, also with maximize (its negated gradients are copied to dense ones too)."""
    results = []
    for b in ("reference", backend):
        params = strided_params()
        assert not params[0].is_contiguous() and not params[1].is_contiguous()
        opt = getattr(fastlars, name)(params, lr=0.05, weight_decay=1e-2, maximize=maximize, backend=b)
        train(opt, params, range(2))
        results.append((params, opt.state))
    (ref, ref_state), (got, got_state) = results
    assert got[0].stride() == (14, 2)  # still the same view
    assert_same(ref, got, ref_state, got_state, exact=False)


def test_strided_parameter_with_capturable_is_refused(triton_interpreter):
    """A strided view is stepped through a new copy each step, which a captured graph cannot follow."""
    params = strided_params()
    set_grads(params, 0, 0)
    opt = fastlars.LARS(params, lr=0.1, backend="triton", capturable=True, skip_nonfinite=True)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"\['params'\]\[0\].*strided view.*capturable=True"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("name, backend", [pytest.param(name, b, marks=backend_marks(b)) for name, b in [
    *(("LARS", b) for b in BACKENDS), ("LAMB", fastlars.LAMB(make_params()).backend), ("LAMB", "reference")]])
def test_compiled_step_matches_eager(name, backend):
    """torch.compile(opt.step) on every CPU backend (dynamo traces the step; the fused
    drivers run eagerly): the same parameters and state as eager steps, including the
    first step that creates the state and a maximize group. LAMB shares the traced code
    outside its maths: its default backend only (dynamo takes ~4 s per case here)."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        params = make_params()
        groups = groups_of(params)
        groups[1]["maximize"] = True
        opt = getattr(fastlars, name)(groups, lr=0.05, weight_decay=1e-2, backend=backend)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo's notes about untraceable C++ functions
            train(opt, params, range(2), step_fn=step)  # the step that creates the state, and one after
        results.append((params, opt.state))
    (ref, ref_state), (got, got_state) = results
    assert_same(ref, got, ref_state, got_state)


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_compiled_step_in_skipping_mode(name):
    """skip_nonfinite=True under torch.compile: the skip counter's first value is the one
    optimizer attribute a step assigns, which torch 2.11's dynamo refuses to trace; a NaN
    step is skipped and counted as in eager steps."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        params = make_params()
        opt = getattr(fastlars, name)(groups_of(params), lr=0.05, backend="foreach", skip_nonfinite=True)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for s in range(3):
                set_grads(params, 1, s)
                if s == 1:
                    params[0].grad[0] = float("nan")
                step()
        assert opt.skipped_steps == 1
        results.append((params, opt.state))
    (ref, ref_state), (got, got_state) = results
    assert_same(ref, got, ref_state, got_state)


@pytest.mark.parametrize("backend", backend_params([next(b for b in ("cpu", "foreach") if b in BACKENDS)]))
def test_compiled_step_with_inductor(backend):
    """The default torch.compile backend (inductor generates C++ for the traced part), on
    the default CPU backend (the others are traced alike above; inductor's code generation
    costs ~10 s per graph here)."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        params = make_params()
        opt = fastlars.LARS(groups_of(params), lr=0.05, backend=backend)
        train(opt, params, range(2), step_fn=torch.compile(opt.step) if compiled else opt.step)
        results.append(params)
    assert_same(*results, exact=False)
