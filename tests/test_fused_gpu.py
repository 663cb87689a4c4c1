"""Fused GPU backends (triton, cuda) on a GPU: large shapes against the reference and
against each other, determinism. Skipped without CUDA (on the CPU, the interpreter
tests and the CPU C++ backend's tests in test_optim_backends.py cover the maths)."""

import pytest
import torch

import fastlars
from conftest import assert_within_ulps

GPU_BACKENDS = [b for b in ("triton", "cuda") if b in fastlars.available_backends()]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not GPU_BACKENDS, reason="needs CUDA and a GPU backend")


def resnet50_params(dtype=torch.float32):
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        shapes = [p.shape for p in torchvision.models.resnet50().parameters()]
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g).to(dtype)) for s in shapes]
    return params, g


def step_pair(name, kwargs, dtype=torch.float32, steps=3, master_weights=False, backend="triton",
              oracle_backend="reference"):
    params, g = resnet50_params(dtype)
    oracle_params = [p.detach().clone().requires_grad_() for p in params]
    groups = lambda ps: [{"params": [p for p in ps if p.ndim > 1], "weight_decay": 1e-4},
                         {"params": [p for p in ps if p.ndim <= 1], "trust_ratio": False}]
    opt = getattr(fastlars, name)(groups(params), backend=backend, master_weights=master_weights, **kwargs)
    oracle = getattr(fastlars, name)(groups(oracle_params), backend=oracle_backend, master_weights=master_weights,
                                     **kwargs)
    for _ in range(steps):
        for p, q in zip(params, oracle_params):
            grad = (torch.randn(p.shape, device="cuda", generator=g) * 1e-2).to(dtype)
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        oracle.step()
    return params, oracle_params, opt, oracle


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name, kwargs", [("LARS", dict(lr=1.0, nesterov=True, trust_clip=True)),
                                          ("LAMB", dict(lr=1e-2, max_grad_norm=1.0))])
def test_resnet50_shapes_match_reference(backend, name, kwargs):
    params, oracle_params, _, _ = step_pair(name, kwargs, backend=backend)
    scale = max(q.abs().max().item() for q in oracle_params)
    for p, q in zip(params, oracle_params):
        assert (p - q).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name, kwargs", [("LARS", dict(lr=1.0)), ("LAMB", dict(lr=1e-2))])
def test_bf16_master_weights(backend, name, kwargs):
    """The masters within 1e-5 of the reference's (of each tensor's largest value), the bf16
    parameters within 2 ulps element-wise (plus that 1e-5) and equal to their masters rounded.
    Every reference master moved by over 1e-4 of its largest value in the 3 steps, so a
    tensor the backend left unchanged (a 2-D weight, say) fails."""
    first, _ = resnet50_params(torch.bfloat16)  # the values step_pair starts from (the same seed)
    params, oracle_params, opt, oracle = step_pair(name, kwargs, dtype=torch.bfloat16, master_weights=True,
                                                   backend=backend)
    for i, (p, q, p0) in enumerate(zip(params, oracle_params, first)):
        master, oracle_master = opt.state[p]["master_param"], oracle.state[q]["master_param"]
        scale = oracle_master.abs().max().item()
        assert (master - oracle_master).abs().max().item() <= 1e-5 * scale, i
        assert_within_ulps(p, q, 2, atol=1e-5 * scale, msg=f"parameter {i} {tuple(p.shape)}")
        assert torch.equal(master.to(torch.bfloat16), p), i
        assert (oracle_master - p0.float()).abs().max().item() > 1e-4 * scale, f"parameter {i} did not move"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name, kwargs", [("LARS", dict(lr=1.0)), ("LAMB", dict(lr=1e-2, max_grad_norm=1.0))])
def test_deterministic(backend, name, kwargs):
    """The same inputs give bitwise the same parameters and state, run to run."""
    runs = [step_pair(name, kwargs, steps=2, backend=backend) for _ in range(2)]
    (a, _, opt_a, _), (b, _, opt_b, _) = runs
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


@pytest.mark.skipif(len(GPU_BACKENDS) < 2, reason="needs both triton and cuda")
@pytest.mark.parametrize("name, kwargs", [("LARS", dict(lr=1.0, momentum=0.9)), ("LAMB", dict(lr=1e-2))])
def test_cuda_matches_triton(name, kwargs):
    params, other, _, _ = step_pair(name, kwargs, backend="cuda", oracle_backend="triton")
    scale = max(q.abs().max().item() for q in other)
    for p, q in zip(params, other):
        assert (p - q).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name, kwargs, lr0", [("LARS", dict(nesterov=True, trust_clip=True), 0.5),
                                               ("LAMB", dict(max_grad_norm=1.0), 1 / 64)])
def test_cuda_graph_capture_and_replay(backend, name, kwargs, lr0):
    """capturable=True: the step is captured once and replayed with new gradients and a
    new lr (a tensor updated in place), equal to eager steps; an eager step makes no host
    synchronisation (torch's sync debug mode raises on one). backend="cuda" reads the
    same cached launch tables as "triton"."""
    if backend not in GPU_BACKENDS:
        pytest.skip(f"needs {backend}")
    params, g = resnet50_params()
    eager_params = [p.detach().clone().requires_grad_() for p in params]
    groups = lambda ps: [{"params": [p for p in ps if p.ndim > 1], "weight_decay": 1e-4},
                         {"params": [p for p in ps if p.ndim <= 1], "trust_ratio": False}]
    cls = getattr(fastlars, name)
    lr = torch.tensor(lr0, device="cuda")
    opt = cls(groups(params), lr=lr, backend=backend, capturable=True, skip_nonfinite=True, **kwargs)
    eager = cls(groups(eager_params), lr=lr0, backend=backend, skip_nonfinite=True, **kwargs)
    for p, q in zip(params, eager_params):  # static gradients: the graph reads these tensors
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)

    def new_grads():
        for p, q in zip(params, eager_params):
            value = torch.randn(p.shape, device="cuda", generator=g) * 1e-2
            p.grad.copy_(value)
            q.grad.copy_(value)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up steps create the state
        for _ in range(2):
            new_grads()
            opt.step()
            eager.step()
        new_grads()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        eager.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for k in range(1, 4):
        new_grads()
        lr.fill_(lr0 / 2**k)
        for group in eager.param_groups:
            group["lr"] = lr0 / 2**k
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(params, eager_params):
        assert torch.equal(p, q)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name, kwargs", [("LARS", dict(momentum=0.9, nesterov=True, trust_coefficient=0.02)),
                                          ("LAMB", dict(max_grad_norm=1.0))])
def test_capture_after_one_eager_step(backend, name, kwargs):
    """The documented recipe exactly: one eager step (bf16 with master weights, which
    creates the state), then capture. Then more eager steps than the launch cache holds,
    each with new gradient tensors (new tables, evicting the captured ones), and replays
    with and without a NaN: the graph must still read its own (pinned) tables, and the
    skip counter must count every skipped replay."""
    if backend not in GPU_BACKENDS:
        pytest.skip(f"needs {backend}")
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 33), (129,), (1,), (5, 3, 3, 3)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g).bfloat16()) for s in shapes]
    twin = [p.detach().clone().requires_grad_() for p in params]
    cls = getattr(fastlars, name)
    lr = 1 / 16  # exact in float32: the tensor lr and the float lr are the same number
    opt = cls(params, lr=torch.tensor(lr, device="cuda"), backend=backend, capturable=True, skip_nonfinite=True,
              master_weights=True, **kwargs)
    eager = cls(twin, lr=lr, backend=backend, skip_nonfinite=True, master_weights=True, **kwargs)
    static = [torch.zeros_like(p) for p in params]  # the gradients the graph reads

    def set_grads(grads, nan=False):
        for p, q, s, gr in zip(params, twin, static, grads):
            s.copy_(gr)
            p.grad, q.grad = s, gr.clone()
        if nan:
            static[0][0, 0] = float("nan")
            twin[0].grad[0, 0] = float("nan")

    def random_grads():
        return [torch.randn(p.shape, device="cuda", generator=g).bfloat16() for p in params]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        set_grads(random_grads())
        opt.step()  # the one eager step
        eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(opt._launch_cache.size + 2):  # new gradient tensors: new tables, the captured ones evicted
        grads = random_grads()
        for p, q, gr in zip(params, twin, grads):
            p.grad, q.grad = gr, gr.clone()
        opt.step()
        eager.step()
    for nan in (False, True, False, True, False):
        set_grads(random_grads(), nan)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    assert opt.skipped_steps == eager.skipped_steps == 2
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], eager.state[q]["master_param"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name, kwargs", [("LARS", dict(lr=0.5, momentum=0.9, trust_coefficient=0.02)),
                                          ("LAMB", dict(lr=1e-2, max_grad_norm=1.0))])
def test_parameters_on_a_second_gpu(backend, name, kwargs):
    """Launches run on the parameters' device, not the current one (cuda:0 here), and the
    step's device scalars (ok, inv_scale, global norm) follow them: one group on cuda:1
    alone, then groups on cuda:0 and cuda:1 in one optimizer; skipping mode (device ok)."""
    assert torch.cuda.current_device() == 0
    g = torch.Generator().manual_seed(0)
    shapes = [(33, 17), (129,), (1,)]
    for devices in (["cuda:1"], ["cuda:0", "cuda:1"]):
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(d)) for d in devices for s in shapes]
        oracle_params = [p.detach().clone().requires_grad_() for p in params]
        groups = lambda ps: [{"params": ps[i * len(shapes):(i + 1) * len(shapes)]} for i in range(len(devices))]
        opt = getattr(fastlars, name)(groups(params), backend=backend, skip_nonfinite=True, **kwargs)
        oracle = getattr(fastlars, name)(groups(oracle_params), backend="reference", skip_nonfinite=True, **kwargs)
        for step in range(3):
            for p, q in zip(params, oracle_params):
                p.grad = torch.randn(p.shape, generator=g).to(p.device)
                q.grad = p.grad.clone()
            if step == 1:
                params[-1].grad[0] = oracle_params[-1].grad[0] = float("nan")  # skipped everywhere
            opt.step()
            oracle.step()
        assert opt.skipped_steps == oracle.skipped_steps == 1
        for p, q in zip(params, oracle_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# issue 17: faults found by reading the code against Triton 3.6 and torch 2.11

HYPER = {"LARS": dict(momentum=0.9, trust_coefficient=0.02, weight_decay=1e-3), "LAMB": dict(weight_decay=0.01)}
LR = {"LARS": 0.5, "LAMB": 1e-2}


def _lr_schedule_run(name, backend, lr, steps=4, sync_check=False, stream_of=None):
    """Three small parameters stepped with an lr halved after every step (in place for a
    tensor lr); ``sync_check``: the steps after the first under torch's sync debug mode
    "error" (any host synchronisation raises); ``stream_of(step)``: the stream of a step."""
    g = torch.Generator(device="cuda").manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in ((33, 17), (129,), (1,))]
    opt = getattr(fastlars, name)(params, lr=lr, backend=backend, skip_nonfinite=True, **HYPER[name])
    for step in range(steps):
        stream = stream_of(step) if stream_of else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=g)
            torch.cuda.set_sync_debug_mode("error" if sync_check and step > 0 else "default")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if isinstance(lr, torch.Tensor):
                lr.mul_(0.5)
            else:
                opt.param_groups[0]["lr"] *= 0.5
        torch.cuda.current_stream().wait_stream(stream)
    return params


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
@pytest.mark.parametrize("lr_device", ["cuda", "cpu"])
def test_a_tensor_lr_adds_no_host_sync(backend, name, lr_device):
    """A tensor lr on the device is copied into the group table on the device (the cuda
    backend read it with float(), one sync per launch); a CPU tensor lr with CUDA
    parameters is read on the host (it was copied from pageable memory, a sync per group).
    Either way the skipping-mode steps after the first synchronise nothing, and the
    trajectory is the float lr's."""
    got = _lr_schedule_run(name, backend, torch.tensor(LR[name], device=lr_device), sync_check=True)
    expected = _lr_schedule_run(name, "reference", LR[name])
    for p, q in zip(got, expected):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_capturable_refuses_a_cpu_tensor_lr_with_cuda_parameters():
    if "triton" not in GPU_BACKENDS:
        pytest.skip("needs triton")
    params = [torch.nn.Parameter(torch.randn(3, device="cuda"))]
    with pytest.raises(ValueError, match=r"lr in param_groups\[0\] is a tensor on cpu.*capturable=True"):
        fastlars.LARS(params, lr=torch.tensor(0.1), backend="triton", capturable=True, skip_nonfinite=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_launch_tables_reused_from_another_stream(backend, name, monkeypatch):
    """Steps alternate between the default stream and a side stream, with a launch cache of
    one entry (every other step evicts): tables are recorded on the streams that use them,
    and the trajectory is the reference's."""
    from fastlars.ops import multi_tensor as mt

    monkeypatch.setattr(mt.LaunchCache.__init__, "__defaults__", (1,))  # caches of one launch
    side = torch.cuda.Stream()
    streams = lambda step: side if step % 2 else torch.cuda.current_stream()
    got = _lr_schedule_run(name, backend, LR[name], steps=6, stream_of=streams)
    expected = _lr_schedule_run(name, "reference", LR[name], steps=6)
    for p, q in zip(got, expected):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_subnormal_sums_of_squares_are_not_flushed(backend, name):
    """Weights and gradients around 5e-20 have sums of squares below 2^-126 (subnormal in
    fp32). The compiler's default sqrt/division flush them to 0, which made the norms 0 and
    the trust ratio 1; IEEE-rounded ones keep them, as the reference does."""
    g = torch.Generator(device="cuda").manual_seed(2)
    runs = []
    for b in (backend, "reference"):
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g) * 5e-20) for s in ((4,), (3, 2))]
        opt = getattr(fastlars, name)(params, lr=LR[name], backend=b, **HYPER[name])
        g.manual_seed(3)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=g) * 5e-20
            opt.step()
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ghost_bn_on_a_second_gpu():
    """A Triton Ghost BN module on cuda:1 while cuda:0 is current: forward and backward
    launch on cuda:1 and match the reference backend."""
    assert torch.cuda.current_device() == 0
    x = torch.randn(8, 5, 6, 6, device="cuda:1")
    results = []
    for backend in ("triton", "reference"):
        module = fastlars.GhostBatchNorm2d(5, virtual_batch_size=4, backend=backend).to("cuda:1")
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.square().sum().backward()
        results.append((y, xi.grad, module.weight.grad, module.running_var))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
