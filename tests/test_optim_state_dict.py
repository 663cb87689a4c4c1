"""state_dict: bitwise resume, fp32 state kept, checkpoints that move between
optimizers (SGD <-> LARS, AdamW -> LAMB) and between backends."""

import copy
import io

import pytest
import torch

import fastlars
from conftest import backend_marks, backend_params, model_inputs, small_cnn

BACKENDS = fastlars.available_backends()
OPTIMIZERS = [("LARS", dict(lr=0.5, weight_decay=1e-3, nesterov=True)),
              ("LAMB", dict(lr=0.01, max_grad_norm=1.0))]
OPT_IDS = [name for name, _ in OPTIMIZERS]


def train(model, opt, seed, steps, dtype=torch.float32):
    for step in steps:
        model(model_inputs(seed, step, dtype=dtype)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bitwise(backend, case, dtype):
    name, kwargs = case
    make = lambda m: getattr(fastlars, name)(fastlars.param_groups(m, 1e-3), backend=backend,
                                             master_weights=dtype != torch.float32, **kwargs)
    model = small_cnn(0, dtype=dtype)
    opt = make(model)
    train(model, opt, 0, range(3), dtype)
    checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, 0, range(3, 7), dtype)

    resumed = small_cnn(1, dtype=dtype)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(checkpoint["opt"])
    for p in resumed.parameters():
        for key, value in resumed_opt.state[p].items():
            assert value.dtype == torch.float32, f"{key} was cast to {value.dtype}"
    train(resumed, resumed_opt, 0, range(3, 7), dtype)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(resumed_opt.state[q][key], value), key


@pytest.mark.parametrize("source, target", [pytest.param(a, b, marks=backend_marks(a, b))
                                            for a in BACKENDS for b in BACKENDS if a != b])
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_checkpoint_moves_between_backends(source, target, case):
    name, kwargs = case
    model = small_cnn(2)
    opt = getattr(fastlars, name)(model.parameters(), backend=source, **kwargs)
    train(model, opt, 2, range(3))
    checkpoint = roundtrip(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = getattr(fastlars, name)(twin.parameters(), backend=target, **kwargs)
    twin_opt.load_state_dict(checkpoint)
    train(model, opt, 2, range(3, 6))
    train(twin, twin_opt, 2, range(3, 6))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_sgd_checkpoint_into_lars_and_back(backend):
    """LARS without trust ratio is SGD with momentum, so an SGD run resumed by LARS
    (trust_ratio=False) must continue as SGD does; the buffer name is shared."""
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, dampening=0.1)
    model = small_cnn(3)
    sgd = torch.optim.SGD(model.parameters(), **kwargs)
    train(model, sgd, 3, range(3))
    checkpoint = roundtrip(sgd.state_dict())
    twin = copy.deepcopy(model)
    lars = fastlars.LARS([{"params": twin.parameters(), "trust_ratio": False}], lr=1.0,
                         trust_coefficient=0.02, backend=backend)
    lars.load_state_dict(checkpoint)
    group = lars.param_groups[0]
    assert group["lr"] == 0.05 and group["dampening"] == 0.1  # from the checkpoint
    assert group["trust_coefficient"] == 0.02 and group["trust_ratio"] is False  # ours, kept
    train(model, sgd, 3, range(3, 6))
    train(twin, lars, 3, range(3, 6))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)

    back = torch.optim.SGD(model.parameters(), **kwargs)
    back.load_state_dict(roundtrip(lars.state_dict()))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(back.state[p]["momentum_buffer"], lars.state[q]["momentum_buffer"])


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_adamw_checkpoint_into_lamb(backend):
    """LAMB without trust ratio or clipping is AdamW (decoupled decay folded into u)."""
    kwargs = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    model = small_cnn(4)
    adamw = torch.optim.AdamW(model.parameters(), **kwargs)
    train(model, adamw, 4, range(3))
    checkpoint = roundtrip(adamw.state_dict())
    twin = copy.deepcopy(model)
    lamb = fastlars.LAMB([{"params": twin.parameters(), "trust_ratio": False}], backend=backend)
    lamb.load_state_dict(checkpoint)
    assert lamb.param_groups[0]["betas"] == (0.8, 0.99) and lamb.param_groups[0]["max_grad_norm"] == 0
    train(model, adamw, 4, range(3, 6))
    train(twin, lamb, 4, range(3, 6))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        assert lamb.state[q]["step"].item() == 6


def test_maximize_checkpoint_carries_on_as_sgd():
    """A torch.optim.SGD checkpoint saved with maximize=True keeps maximizing after it
    is loaded into LARS (its groups without trust ratio are SGD)."""
    model = small_cnn(5)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=True)
    train(model, sgd, 5, range(1))
    twin = copy.deepcopy(model)
    lars = fastlars.LARS([{"params": twin.parameters(), "trust_ratio": False}], lr=0.1)
    lars.load_state_dict(roundtrip(sgd.state_dict()))
    assert lars.param_groups[0]["maximize"] is True
    train(model, sgd, 5, range(1, 3))
    train(twin, lars, 5, range(1, 3))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_loaded_state_is_not_shared_with_the_checkpoint():
    model = small_cnn(6)
    opt = fastlars.LAMB(model.parameters())
    train(model, opt, 6, range(2))
    checkpoint = opt.state_dict()
    saved = {k: v.clone() for k, v in checkpoint["state"][0].items()}
    twin = copy.deepcopy(model)
    other = fastlars.LAMB(twin.parameters())
    other.load_state_dict(checkpoint)
    train(twin, other, 6, range(2, 3))
    assert other.state[next(twin.parameters())]["step"].item() == 3
    for key, value in saved.items():
        assert torch.equal(checkpoint["state"][0][key], value), key
