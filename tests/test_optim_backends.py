"""Every backend against the `reference` oracle: same gradients in, same weights out."""

import copy
import math

import pytest
import torch

import fastlars
from conftest import backend_params, model_inputs, small_cnn

# (optimizer, constructor kwargs) cases covering every option of docs/contract.md, "LARS" and "LAMB"
CASES = [
    ("LARS", dict(lr=0.8, momentum=0.9, trust_coefficient=0.02)),
    ("LARS", dict(lr=0.8, momentum=0.9, trust_coefficient=0.02, nesterov=True)),
    ("LARS", dict(lr=0.8, momentum=0.9, trust_coefficient=0.02, trust_clip=True)),
    ("LARS", dict(lr=0.8, momentum=0.8, trust_coefficient=0.02, dampening=0.3)),
    ("LARS", dict(lr=0.8, momentum=0.0, trust_coefficient=0.02)),
    ("LAMB", dict(lr=0.01)),
    ("LAMB", dict(lr=0.01, max_grad_norm=0.05)),
    ("LAMB", dict(lr=0.01, bias_correction=False, grad_averaging=False, eps=1e-4)),
    ("LAMB", dict(lr=0.01, trust_clip=True, betas=(0.8, 0.99))),
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items() if k != 'lr') or 'default'}" for name, kw in CASES]
FUSED_BACKENDS = [b for b in fastlars.available_backends() if b != "reference"]


def make_optimizer(name, model, backend, weight_decay=1e-3, **kwargs):
    groups = fastlars.param_groups(model, weight_decay=weight_decay)
    return getattr(fastlars, name)(groups, backend=backend, **kwargs)


def train_side_by_side(name, kwargs, backend, seed, steps=30, device="cpu", dtype=torch.float32,
                       oracle_dtype=None, master_weights=False):
    """Step a `reference` optimizer and a `backend` optimizer on the same gradients.

    The gradients come from the oracle's model and are copied to the other one, so
    the comparison measures the optimizers, not the chaos of training.
    """
    oracle_dtype = oracle_dtype or dtype
    model = small_cnn(seed, device, dtype)
    oracle_model = copy.deepcopy(model).to(oracle_dtype)
    opt = make_optimizer(name, model, backend, master_weights=master_weights, **kwargs)
    oracle = make_optimizer(name, oracle_model, "reference", master_weights=master_weights, **kwargs)
    base_lr = kwargs["lr"]
    for step in range(steps):
        lr = base_lr * (1.0 + 0.5 * math.sin(step))  # the lr changes every step
        for o in (opt, oracle):
            for group in o.param_groups:
                group["lr"] = lr
        x = model_inputs(seed, step, device, oracle_dtype)
        oracle_model(x).square().mean().backward()
        for p, q in zip(model.parameters(), oracle_model.parameters()):
            p.grad = q.grad.to(dtype)
        grads_before = [p.grad.clone() for p in model.parameters()]
        opt.step()
        oracle.step()
        for p, g in zip(model.parameters(), grads_before):
            assert torch.equal(p.grad, g), "step() modified p.grad"
        opt.zero_grad()
        oracle.zero_grad()
    return model, oracle_model, opt, oracle


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(params=[None, 50], ids=["slices-default", "slices-50"])
def cpu_slices(request, monkeypatch):
    """Also run the CPU foreach path on many small cache slices (see cache_sized_slices)."""
    if request.param is not None:
        monkeypatch.setattr(fastlars.optim._buckets, "CPU_SLICE_ELEMENTS", request.param)
    return request.param


def use_chunks(monkeypatch, chunk, block, partial_block):
    if "triton" in fastlars.available_backends():
        from fastlars.ops import multi_tensor

        monkeypatch.setattr(multi_tensor, "CHUNK", chunk)
        monkeypatch.setattr(multi_tensor, "BLOCK", block)
        monkeypatch.setattr(multi_tensor, "PARTIAL_BLOCK", partial_block)


@pytest.fixture
def small_chunks(monkeypatch):
    """Triton kernels with small chunks and blocks, so that the CNN's larger tensors
    span several chunks (exercising the partial-norm reduction) and block boundaries,
    at a size the interpreter runs quickly."""
    use_chunks(monkeypatch, 512, 128, 4)


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks smaller than most odd-shaped tensors: many chunks per tensor."""
    use_chunks(monkeypatch, 32, 16, 2)


def interpreted(backend, device) -> bool:
    return backend == "triton" and device.type == "cpu"


def skip_redundant(backend, device, slices=None, seed=0):
    """The interpreter is slow: Triton on the CPU runs one seed, and slices are foreach-only."""
    if interpreted(backend, device) and (seed != 0 or slices is not None):
        pytest.skip("covered by seed 0 under the Triton interpreter")


def steps_for(backend, device, steps):
    """Fewer steps under the Triton interpreter (100-500x slower than torch)."""
    return max(steps // 3, 4) if interpreted(backend, device) else steps


def assert_weights_close(model, oracle_model, tolerance):
    """max |w - w_ref| <= tolerance * max |w_ref| over the whole model, per tensor.

    Scaled by the model's largest weight: a weight that ends near 0 after large
    moves carries the rounding of those moves, not of its final value."""
    scale = max(q.abs().max().item() for q in oracle_model.parameters())
    for (pname, p), q in zip(model.named_parameters(), oracle_model.parameters()):
        err = (p.double() - q.double()).abs().max().item() if p.numel() else 0.0
        assert err <= tolerance * scale, (pname, err / scale)


@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp32_matches_reference(backend, case, seed, device, cpu_slices, small_chunks):
    skip_redundant(backend, device, cpu_slices, seed)
    name, kwargs = case
    model, oracle_model, opt, oracle = train_side_by_side(name, kwargs, backend, seed, device=device,
                                                          steps=steps_for(backend, device, 30))
    assert_weights_close(model, oracle_model, 1e-6)
    for p, q in zip(model.parameters(), oracle_model.parameters()):
        for key, value in oracle.state[q].items():
            assert rel_err(opt.state[p][key], value) < 1e-5, key


@pytest.mark.parametrize("backend", backend_params(["reference", "foreach"]))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fp32_matches_float64_oracle(backend, case):
    """fp32 arithmetic of each backend stays close to the reference run in float64."""
    name, kwargs = case
    model, oracle_model, _, _ = train_side_by_side(name, kwargs, backend, seed=3, oracle_dtype=torch.float64)
    assert_weights_close(model, oracle_model, 2e-5)


@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=[CASE_IDS[1], CASE_IDS[6]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("master_weights", [True, False])
def test_low_precision_matches_reference(backend, case, dtype, master_weights, device, cpu_slices,
                                         small_chunks):
    skip_redundant(backend, device, cpu_slices)
    """bf16/fp16 parameters, fp32 state. Documented tolerance: fp32 state and master
    weights to 1e-5 relative; the low-precision parameters to 2 ulps of their dtype."""
    name, kwargs = case
    model, oracle_model, opt, oracle = train_side_by_side(
        name, kwargs, backend, seed=4, steps=steps_for(backend, device, 15), device=device, dtype=dtype,
        master_weights=master_weights)
    ulp = torch.finfo(dtype).eps
    for (pname, p), q in zip(model.named_parameters(), oracle_model.parameters()):
        assert p.dtype == dtype
        torch.testing.assert_close(p.float(), q.float(), rtol=2 * ulp, atol=2 * ulp * q.abs().max().item())
        for key, value in oracle.state[q].items():
            assert value.dtype == torch.float32, key
            assert rel_err(opt.state[p][key], value) < 1e-5, (pname, key)
        if master_weights:
            assert torch.equal(opt.state[p]["master_param"].to(dtype), p)


def odd_parameters(device):
    """1 element, primes, an empty tensor, a non-contiguous and a channels_last leaf, zero weights."""
    torch.manual_seed(5)
    transposed = torch.nn.Parameter(torch.randn(11, 5, device=device).t())
    assert not transposed.is_contiguous()
    channels_last = torch.nn.Parameter(torch.randn(4, 3, 5, 5, device=device).to(memory_format=torch.channels_last))
    params = [torch.nn.Parameter(torch.randn(*shape, device=device)) for shape in [(1,), (7,), (13, 17), (3, 1, 2)]]
    params += [transposed, channels_last, torch.nn.Parameter(torch.zeros(0, device=device)),
               torch.nn.Parameter(torch.zeros(6, device=device))]
    return params


@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_odd_shapes_and_empty_group(backend, case, device, cpu_slices, tiny_chunks):
    skip_redundant(backend, device, cpu_slices)
    name, kwargs = case
    params = odd_parameters(device)
    oracle_params = [p.detach().clone().requires_grad_() for p in params]
    def groups(ps):
        return [{"params": ps[:4], "weight_decay": 1e-2}, {"params": []},
                {"params": ps[4:], "trust_ratio": False}]
    opt = getattr(fastlars, name)(groups(params), backend=backend, **kwargs)
    oracle = getattr(fastlars, name)(groups(oracle_params), backend="reference", **kwargs)
    g = torch.Generator().manual_seed(6)
    for step in range(5):
        for i, (p, q) in enumerate(zip(params, oracle_params)):
            grad = torch.randn(p.shape, generator=g).to(device)
            if i == 7:
                grad.zero_()  # zero-norm gradient on a zero-norm weight
            p.grad, q.grad = grad.clone(), grad.clone()
        params[3].grad = oracle_params[3].grad = None  # grad=None: skipped
        opt.step()
        oracle.step()
    for p, q in zip(params, oracle_params):
        assert rel_err(p, q) < 1e-6 if p.numel() else p.shape == q.shape
    assert params[4].stride() == oracle_params[4].stride() and not params[4].is_contiguous()
    assert params[3] not in opt.state or not opt.state[params[3]]


def test_auto_backend_and_errors():
    p = torch.nn.Parameter(torch.randn(3))
    expected_cpu = "cpu" if "cpu" in fastlars.available_backends() else "foreach"
    assert fastlars.LARS([p], lr=0.1).backend == expected_cpu  # "auto" on CPU tensors
    if torch.cuda.is_available() and "triton" in fastlars.available_backends():
        assert fastlars.LARS([torch.nn.Parameter(torch.ones(3, device="cuda"))], lr=0.1).backend == "triton"
    with pytest.raises(ValueError, match="available backends"):
        fastlars.LARS([p], lr=0.1, backend="nonsense")
    for missing in {"triton", "cuda", "cpu"} - set(fastlars.available_backends()):
        with pytest.raises(ValueError, match="not available"):
            fastlars.LAMB([p], backend=missing)
