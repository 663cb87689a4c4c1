"""Every backend against the `reference` oracle: same gradients in, same weights out."""

import contextlib
import copy
import math
import sys

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


# ----------------------------------------------------------------------------
# a tensor lr is never read on the host by a step or by layer_stats()

class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each read of tensor data on the host (``item()``, ``bool()``, ``float()``, a
    tensor given where torch takes a number: all ``aten._local_scalar_dense``) with the
    fastlars function that made it. On the CPU a read costs nothing, but the same line
    on CUDA tensors is a synchronisation: this finds it without a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frame = sys._getframe(1)
            while frame is not None and "/fastlars/" not in frame.f_code.co_filename.replace("\\", "/"):
                frame = frame.f_back
            self.reads.append("<not fastlars>" if frame is None else frame.f_code.co_name)
        return func(*args, **(kwargs or {}))


def tensor_lr_run(name, backend, lr, device="cpu", steps=4, watch_step=None, watch_stats=None):
    """A trust-clipped LARS or LAMB in skipping mode on odd parameters, with ``lr`` halved after
    every step (in place for a tensor). The steps after the first (which creates state and reads
    the skip flag) run inside ``watch_step()``, and a layer_stats() after each step inside
    ``watch_stats()``, when given. Returns the parameters and the last stats."""
    params = [torch.nn.Parameter(p.detach().to(device)) for p in odd_parameters("cpu")[:4]]
    kwargs = dict(momentum=0.9, trust_coefficient=0.02, weight_decay=1e-2) if name == "LARS" else {}
    opt = getattr(fastlars, name)(params, lr=lr, backend=backend, trust_clip=True, skip_nonfinite=True, **kwargs)
    g = torch.Generator().manual_seed(8)
    stats = None
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        with watch_step() if step and watch_step else contextlib.nullcontext():
            opt.step()
        with watch_stats() if watch_stats else contextlib.nullcontext():
            stats = opt.layer_stats()
        if isinstance(lr, torch.Tensor):
            lr.mul_(0.5)
        else:
            opt.param_groups[0]["lr"] *= 0.5
    return params, stats


TENSOR_LR = {"LARS": 0.4, "LAMB": 0.02}


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
@pytest.mark.parametrize("backend", [b for b in ("foreach", "cpu") if b in fastlars.available_backends()])
def test_a_tensor_lr_is_not_read_on_the_host(name, backend):
    """With skip_nonfinite the steps after the first read nothing on the host (docs/contract.md,
    "Non-finite gradients"), nor does layer_stats() ("Per-layer telemetry"): a tensor lr with
    trust_clip is tested for lr > 0 on its device, and the foreach update scales by it on the
    device (torch's ``alpha=`` takes a number: a tensor given there is read). Observed on the
    CPU, where the same line on CUDA tensors would synchronise. The C++ CPU kernels take a
    host group table, read by design: only their layer_stats() is observed. The values are
    the reference's with the same lrs given as numbers."""
    mode = HostReads()
    watch = lambda: mode  # noqa: E731
    params, stats = tensor_lr_run(name, backend, torch.tensor(TENSOR_LR[name]), watch_stats=watch,
                                  watch_step=watch if backend == "foreach" else None)
    # a CPU tensor lr is range-checked at every step (host memory; a device lr is not, _check_lr)
    assert [r for r in mode.reads if r != "check_number"] == []
    expected, expected_stats = tensor_lr_run(name, "reference", TENSOR_LR[name])
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.trust_ratio, expected_stats.trust_ratio, rtol=1e-5, atol=1e-6,
                               check_dtype=False)  # the C++ kernels' sums are float64


@contextlib.contextmanager
def no_host_sync():
    """torch's sync debug mode "error": any host synchronisation inside raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
@pytest.mark.parametrize("backend", [b for b in ("foreach", "triton", "cuda") if b in fastlars.available_backends()])
def test_a_cuda_tensor_lr_with_trust_clip_syncs_nothing(name, backend):
    """test_a_tensor_lr_is_not_read_on_the_host on CUDA tensors, under the sync debug mode:
    the skipping-mode steps after the first and every layer_stats() synchronise nothing."""
    params, stats = tensor_lr_run(name, backend, torch.tensor(TENSOR_LR[name], device="cuda"), device="cuda",
                                  watch_step=no_host_sync, watch_stats=no_host_sync)
    expected, expected_stats = tensor_lr_run(name, "reference", TENSOR_LR[name], device="cuda")
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.trust_ratio, expected_stats.trust_ratio, rtol=1e-5, atol=1e-6,
                               check_dtype=False)
