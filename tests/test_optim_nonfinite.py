"""Non-finite gradients: raise, skip on the device, or let GradScaler decide
(docs/contract.md, "Non-finite gradients")."""

import copy

import pytest
import torch

import fastlars
from conftest import backend_params, model_inputs, small_cnn

BACKENDS = fastlars.available_backends()
OPTIMIZERS = [("LARS", dict(lr=0.5, weight_decay=1e-3)), ("LAMB", dict(lr=0.01))]
OPT_IDS = [name for name, _ in OPTIMIZERS]


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state}
    return params, state


def assert_unchanged(model, opt, snap):
    params, state = snap
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    now = {id(p): opt.state[p] for p in model.parameters() if p in opt.state and opt.state[p]}
    assert now.keys() == {k for k, v in state.items() if v}
    for key, values in state.items():
        for name, before in values.items():
            assert torch.equal(now[key][name], before), name


def step_once(model, opt, seed, step, device="cpu"):
    model(model_inputs(seed, step, device)).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_raises_before_any_change(backend, case, bad, device):
    name, kwargs = case
    model = small_cnn(0, device)
    opt = getattr(fastlars, name)(model.parameters(), backend=backend, **kwargs)
    step_once(model, opt, 0, 0, device)
    model(model_inputs(0, 1, device)).square().mean().backward()
    params = list(model.parameters())
    params[3].grad.view(-1)[2] = bad
    snap = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[3\] \(shape \(5, 7, 3, 3\)"):
        opt.step()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_skip_nonfinite_skips_and_counts(backend, case, device):
    name, kwargs = case
    model = small_cnn(1, device)
    twin = copy.deepcopy(model)
    opt = getattr(fastlars, name)(model.parameters(), backend=backend, skip_nonfinite=True, **kwargs)
    twin_opt = getattr(fastlars, name)(twin.parameters(), backend=backend, **kwargs)
    # first step: nothing to skip yet, but a NaN on the step that creates state is skipped too
    model(model_inputs(1, 0, device)).square().mean().backward()
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1 and not any(opt.state[p] for p in model.parameters())
    for step in range(1, 6):
        model(model_inputs(1, step, device)).square().mean().backward()
        if step == 3:
            list(model.parameters())[-1].grad.fill_(float("inf"))
            snap = snapshot(model, opt)
            opt.step()
            assert_unchanged(model, opt, snap)
            opt.zero_grad()
            continue
        opt.step()
        opt.zero_grad()
        step_once(twin, twin_opt, 1, step, device)
    assert opt.skipped_steps == 2
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_skip_nonfinite_does_not_read_the_device(backend, case, monkeypatch):
    """After state exists, a skip_nonfinite step reads no tensor on the host (foreach, triton)."""
    if backend == "reference":
        pytest.skip("the oracle reads flags on the host by design")
    if backend == "cpu":
        pytest.skip("the CPU kernels read the flag from host memory: no synchronisation to avoid")
    name, kwargs = case
    model = small_cnn(2)
    opt = getattr(fastlars, name)(model.parameters(), backend=backend, skip_nonfinite=True, **kwargs)
    step_once(model, opt, 2, 0)
    model(model_inputs(2, 1)).square().mean().backward()

    def host_read(*args, **kwargs):
        raise AssertionError("host synchronisation inside step()")

    for method in ("item", "__bool__", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    opt.step()
    monkeypatch.undo()
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_grad_scaler(backend, case):
    """Under GradScaler: scaled gradients give the unscaled step; an Inf skips it and
    leaves parameters and state untouched; the scaler backs off."""
    name, kwargs = case
    model = small_cnn(3)
    twin = copy.deepcopy(model)
    opt = getattr(fastlars, name)(model.parameters(), backend=backend, **kwargs)
    twin_opt = getattr(fastlars, name)(twin.parameters(), backend=backend, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    for step in range(4):
        scaler.scale(model(model_inputs(3, step)).square().mean()).backward()
        if step == 2:
            list(model.parameters())[0].grad.view(-1)[1] = float("inf")
            snap = snapshot(model, opt)
            scaler.step(opt)
            assert_unchanged(model, opt, snap)
            scaler.update()
            assert scaler.get_scale() == 512.0
            opt.zero_grad()
            continue
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        step_once(twin, twin_opt, 3, step)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_grad_scaler_after_unscale(backend):
    """scaler.unscale_ (e.g. for clip_grad_norm_) then scaler.step: grads are not unscaled twice."""
    model = small_cnn(4)
    twin = copy.deepcopy(model)
    opt = fastlars.LARS(model.parameters(), lr=0.5, backend=backend)
    twin_opt = fastlars.LARS(twin.parameters(), lr=0.5, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for step in range(3):
        scaler.scale(model(model_inputs(4, step)).square().mean()).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        step_once(twin, twin_opt, 4, step)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# a fused backend steps one device type: a group on another is refused

def test_a_fused_backend_refuses_a_group_of_another_device_type():
    """The rule on CPU tensors (the whole optimizer needs a GPU, see
    test_cuda_backends_refuse_a_group_of_another_device_type): backend="cuda" steps CUDA
    tensors only, and a CPU parameter beside them is named; meta tensors (a deferred init,
    no device yet) and the unfused backends, which step any device, pass."""
    from fastlars.optim._checks import check_backend_devices

    groups = [(0, {"params": [torch.nn.Parameter(torch.ones(2, device="meta"))]}),
              (1, {"params": [torch.nn.Parameter(torch.ones(3, device="meta")), torch.nn.Parameter(torch.ones(3))]})]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] \(shape \(3,\).*is on cpu, but "
                                         r"backend='cuda' steps cuda tensors"):
        check_backend_devices("cuda", groups)
    check_backend_devices("cuda", groups[:1])
    for unfused in ("foreach", "reference"):
        check_backend_devices(unfused, groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda", "cpu") if b in BACKENDS])
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_cuda_backends_refuse_a_group_of_another_device_type(backend, case):
    """CPU parameters beside CUDA ones on backend="cuda" were stepped by the CPU kernels, which
    do not see the device-side skip flag: a non-finite step was applied to them. A group of
    another device type than the backend's is refused, naming its first parameter, at
    construction, at add_param_group, and at the step after a group's parameters moved (before
    anything changes)."""
    name, kwargs = case
    own, other = ("cpu", "cuda") if backend == "cpu" else ("cuda", "cpu")
    g = torch.Generator().manual_seed(3)
    make = lambda device: [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in ((5, 3), (4,))]  # noqa: E731
    mine, theirs = make(own), make(other)
    cls = getattr(fastlars, name)
    named = rf"param_groups\[1\]\['params'\]\[0\] \(shape \(5, 3\).*is on {other}, but backend='{backend}'"
    with pytest.raises(ValueError, match=named):
        cls([{"params": mine}, {"params": theirs}], backend=backend, skip_nonfinite=True, **kwargs)
    opt = cls(mine, backend=backend, skip_nonfinite=True, **kwargs)
    with pytest.raises(ValueError, match=named):
        opt.add_param_group({"params": theirs})
    assert len(opt.param_groups) == 1
    moved = make(own)
    opt.add_param_group({"params": moved})
    for p in mine + moved:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)
    opt.step()
    for p in moved:  # the whole group moves (a group mixing devices is refused by another check)
        p.data = p.data.to(other)
        p.grad = torch.full(p.shape, float("nan"), device=other)
    before = [p.detach().clone() for p in mine + moved]
    with pytest.raises(ValueError, match=named):
        opt.step()
    for p, b in zip(mine + moved, before):
        assert torch.equal(p, b)
