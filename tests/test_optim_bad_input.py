"""Bad input raises a clear ValueError/TypeError naming the culprit, before anything changes."""

import math

import pytest
import torch

import fastlars
from conftest import backend_params

BACKENDS = fastlars.available_backends()


def fresh(backend, name="LARS", **kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p)
    defaults = dict(lr=0.1) if name == "LARS" else {}
    opt = getattr(fastlars, name)(params, backend=backend, **{**defaults, **kwargs})
    return params, opt


def stepped(backend, name="LARS", **kwargs):
    """An optimizer one step in, so that state exists and must stay untouched."""
    params, opt = fresh(backend, name, **kwargs)
    opt.step()
    return params, opt


def assert_nothing_changes(params, opt, match, error=ValueError):
    before = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.clone().to_dense() for p in params]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    with pytest.raises(error, match=match):
        opt.step()
    for p, b, g in zip(params, before, grads):
        assert torch.equal(p.detach(), b)
        assert (p.grad is None and g is None) or torch.equal(p.grad.to_dense(), g)
        for k, v in state[id(p)].items():
            assert torch.equal(opt.state[p][k], v)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_sparse_gradient(backend, name):
    params, opt = stepped(backend, name)
    params[1].grad = params[1].grad.to_sparse()
    assert_nothing_changes(params, opt, r"param_groups\[0\]\['params'\]\[1\] \(shape \(5,\).*sparse gradient")


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_mixed_devices_in_one_group(backend):
    params, opt = stepped(backend)
    with pytest.raises(ValueError, match="mixes devices"):
        fastlars.LARS([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, device="meta"))], lr=0.1)
    # a group edited after construction to hold a parameter of another device
    stranger = torch.nn.Parameter(torch.ones(5, device="meta"))
    stranger.grad = torch.ones(5, device="meta")
    opt.param_groups[0]["params"].append(stranger)
    assert_nothing_changes(params, opt, r"param_groups\[0\]\['params'\]\[2\] \(shape \(5,\).*meta.*already has parameters on cpu")


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_gradient_shape_mismatch(backend):
    params, opt = stepped(backend)
    params[0].data = torch.randn(3, 4)  # torch checks shapes when .grad is set, not when .data is
    assert_nothing_changes(params, opt, r"\[0\]\['params'\]\[0\].*gradient of shape \(4, 3\)")


FUSED = [b for b in BACKENDS if b in ("cpu", "triton", "cuda")]


@pytest.mark.parametrize("backend", backend_params(FUSED))
def test_fused_backends_refuse_state_of_another_layout(backend):
    """A momentum buffer whose strides differ from its parameter's (a checkpoint saved from
    a transposed layout) is refused, naming the parameter: the kernels would pair the wrong
    elements."""
    params, opt = stepped(backend)
    opt.state[params[0]]["momentum_buffer"] = torch.randn(3, 4).t()
    assert_nothing_changes(params, opt, r"param_groups\[0\]\['params'\]\[0\]: a gradient or state tensor has "
                                        r"strides \(1, 4\) but the parameter has \(3, 1\)")


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "Invalid learning rate"),
    (dict(lr=float("nan")), "Invalid learning rate"),
    (dict(lr=0.1, momentum=1.0), "Invalid momentum value"),
    (dict(lr=0.1, momentum=-0.5), "Invalid momentum value"),
    (dict(lr=0.1, weight_decay=-1e-4), "Invalid weight_decay value"),
    (dict(lr=0.1, trust_coefficient=float("nan")), "Invalid trust_coefficient value"),
    (dict(lr=0.1, eps=-1.0), "Invalid eps value"),
    (dict(lr=0.1, dampening=1.5), "Invalid dampening value"),
    (dict(lr=0.1, nesterov=True, momentum=0.0), "nesterov=True.*requires momentum"),
    (dict(lr=0.1, nesterov=True, dampening=0.1), "nesterov=True.*requires momentum"),
    (dict(lr="fast"), "lr.*must be a number"),
    (dict(lr=0.1, trust_clip=1), "trust_clip.*must be a bool"),
])
def test_lars_invalid_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastlars.LARS([torch.nn.Parameter(torch.ones(2))], **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "Invalid learning rate"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, float("nan"))), "Invalid beta parameter at index 1"),
    (dict(betas=(0.9,)), "betas.*pair"),
    (dict(eps=-1e-6), "Invalid eps value"),
    (dict(weight_decay=float("inf")), "Invalid weight_decay value"),
    (dict(max_grad_norm=-1.0), "Invalid max_grad_norm value"),
    (dict(bias_correction="yes"), "bias_correction.*bool"),
])
def test_lamb_invalid_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastlars.LAMB([torch.nn.Parameter(torch.ones(2))], **kwargs)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_invalid_hyperparameter_set_between_steps(backend):
    """A group edited after construction (e.g. by a buggy scheduler) is checked at step()."""
    params, opt = stepped(backend)
    opt.param_groups[0]["lr"] = math.nan
    assert_nothing_changes(params, opt, r"Invalid learning rate.*param_groups\[0\]")


def test_invalid_group_is_named():
    with pytest.raises(ValueError, match=r"Invalid weight_decay value.*param_groups\[1\]"):
        fastlars.LARS([{"params": [torch.nn.Parameter(torch.ones(2))]},
                       {"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": -1}], lr=0.1)


def test_non_leaf_and_non_float_parameters():
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\] \(shape \(3,\).*not a leaf"):
        fastlars.LARS([torch.nn.Parameter(torch.ones(2)), leaf * 2], lr=0.1)
    with pytest.raises(TypeError, match="floating-point"):
        fastlars.LAMB([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="floating-point"):
        fastlars.LAMB([torch.ones(3, dtype=torch.complex64, requires_grad=True)])


def test_invalid_optimizer_options():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(TypeError, match="master_weights"):
        fastlars.LARS(p, lr=0.1, master_weights="yes")
    with pytest.raises(TypeError, match="skip_nonfinite"):
        fastlars.LAMB(p, skip_nonfinite=None)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_grad_none_is_skipped(backend, name):
    params, opt = stepped(backend, name)
    before = params[1].detach().clone()
    state = {k: v.clone() for k, v in opt.state[params[1]].items()}
    params[1].grad = None
    opt.step()
    assert torch.equal(params[1], before)
    for k, v in state.items():
        assert torch.equal(opt.state[params[1]][k], v)
    # no gradient anywhere: a no-op, not an error
    params[0].grad = None
    opt.step()
