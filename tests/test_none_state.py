"""A state entry of None is an absent entry, on every backend.

torch.optim.SGD checkpoints written with momentum=0 (torch < 2.1 stored the key for every
parameter) hold ``momentum_buffer=None``, and users set it by hand to reset momentum. The
reference then creates a buffer from the step's direction, as for a parameter without
state; every other backend must do the same (a fused kernel that took the key's presence
for a buffer would step without momentum, or on CUDA address the weights as the buffer).
"""

import pytest
import torch

import fastlars
from conftest import backend_params, model_inputs, small_cnn

BACKENDS = fastlars.available_backends()


def _steps(backend, device, none_buffer, steps=4, skip_first=False, **kwargs):
    """LARS with momentum on the small CNN for ``steps`` steps; with ``none_buffer`` each
    parameter's state starts as ``{"momentum_buffer": None}``, as an old SGD checkpoint
    loads. ``skip_first``: the first step's gradients hold a NaN (skip_nonfinite)."""
    model = small_cnn(0, device)
    opt = fastlars.LARS(fastlars.param_groups(model, weight_decay=1e-3), lr=0.5, momentum=0.9,
                        trust_coefficient=0.02, backend=backend, **kwargs)
    if none_buffer:
        for p in model.parameters():
            opt.state[p]["momentum_buffer"] = None
    for step in range(steps):
        model(model_inputs(0, step, device)).square().mean().backward()
        if skip_first and step == 0:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_none_buffer_steps_as_no_state(backend, device):
    """4 steps from a None buffer give what 4 steps from no state give on the reference
    (before the fix, cpu and triton stepped without momentum: 0.0135 off here)."""
    oracle, oracle_opt = _steps("reference", device, none_buffer=False)
    model, opt = _steps(backend, device, none_buffer=True)
    exact = backend == "reference"
    for p, q in zip(model.parameters(), oracle.parameters()):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        buf = opt.state[p]["momentum_buffer"]
        assert buf is not None and buf.dtype == torch.float32
        torch.testing.assert_close(buf, oracle_opt.state[q]["momentum_buffer"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_none_buffer_with_a_skipped_first_step(backend, device):
    """skip_nonfinite: a step that would create the buffer of a None entry reads the skip
    flag as a first step does; the skipped step leaves the entry None and changes nothing."""
    model, opt = _steps(backend, device, none_buffer=True, steps=1, skip_first=True, skip_nonfinite=True)
    assert opt.skipped_steps == 1
    assert all(opt.state[p].get("momentum_buffer") is None for p in model.parameters())
    fresh = small_cnn(0, device)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def test_sgd_checkpoint_with_none_buffers_loads():
    """A checkpoint in the format of torch.optim.SGD with momentum=0 (None buffers) loads
    into LARS with momentum, whose steps then match LARS without state."""
    model = small_cnn(0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    saved = sgd.state_dict()
    saved["state"] = {i: {"momentum_buffer": None} for i in range(len(list(model.parameters())))}
    for backend in BACKENDS:
        if backend not in fastlars.backends.usable_on("cpu"):
            continue
        runs = []
        for load in (False, True):
            m = small_cnn(0)
            opt = fastlars.LARS(m.parameters(), lr=0.5, momentum=0.9, trust_coefficient=0.02, backend=backend)
            if load:
                opt.load_state_dict({**saved, "param_groups": [{**saved["param_groups"][0], "momentum": 0.9,
                                                                 "lr": 0.5}]})
            for step in range(3):
                m(model_inputs(0, step)).square().mean().backward()
                opt.step()
                opt.zero_grad()
            runs.append(m)
        for p, q in zip(*(r.parameters() for r in runs)):
            assert torch.equal(p, q), backend


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in BACKENDS])
def test_none_buffer_never_writes_past_a_bf16_parameter(backend):
    """A bf16 parameter without master weights and a None buffer: the kernels must not take
    the parameter for an fp32 buffer (which would write 4 bytes per element from its start,
    past its end). The canary shares the parameter's allocation, right after it."""
    n = 4096
    storage = torch.zeros(2 * n, dtype=torch.bfloat16, device="cuda")
    p = torch.nn.Parameter(storage[:n])
    canary = storage[n:]
    canary.fill_(7.0)
    opt = fastlars.LARS([p], lr=0.5, momentum=0.9, trust_coefficient=0.02, backend=backend)
    opt.state[p]["momentum_buffer"] = None
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        p.copy_(torch.randn(n, generator=g, device="cuda"))
    for _ in range(3):
        p.grad = torch.randn(n, generator=g, device="cuda").to(torch.bfloat16)
        opt.step()
    torch.cuda.synchronize()
    assert torch.equal(canary, torch.full_like(canary, 7.0))
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32
