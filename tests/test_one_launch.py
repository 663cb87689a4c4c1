"""one_launch=True (docs/contract.md, "one_launch"): the Triton LARS/LAMB step in one
launch, norm and update items ordered by tickets.

On the CPU, through Triton's interpreter (which runs the programs one after another, in
ticket order: the waits end at once, so these check the maths, the item order, the gate
and the refusals, not the concurrency): against the reference, and bit for bit against
the two-launch step, whose sums it forms in the same order. On a GPU (skipped without
CUDA): many programs at once on ResNet-50's shapes and on tensors of thousands of
chunks, against the two-launch step, run to run, and in a captured CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

import fastlars
from test_optim_backends import use_chunks

pytest.importorskip("triton")

SHAPES = [(37, 3), (1,), (0,), (65,), (5, 7), (129,)]  # odd sizes, an empty tensor, several chunks each
OPTIONS = {
    "LARS": [dict(lr=0.5, weight_decay=0.05, trust_coefficient=0.02),
             dict(lr=0.5, trust_coefficient=0.02, nesterov=True, ratio_denominator="momentum_update"),
             dict(lr=0.5, momentum=0.0, zero_norm="plain_sgd", trust_bounds=(0.0, 0.05))],
    "LAMB": [dict(lr=0.02, weight_decay=0.05), dict(lr=0.02, eps_inside_sqrt=True, decay_mode="l2"),
             dict(lr=0.02, decay_mode="direct", bias_correction_in_lr=True)],
}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def make_params(dtype, device="cpu"):
    g = torch.Generator().manual_seed(5)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype)) for s in SHAPES]


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype)


def run(name, backend, options, dtype, steps=3, device="cpu", **kwargs):
    """Two groups (the second without trust ratio), ``steps`` steps."""
    params = make_params(dtype, device)
    groups = [{"params": params[:4]}, {"params": params[4:], "trust_ratio": False}]
    opt = getattr(fastlars, name)(groups, backend=backend, **options, **kwargs)
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    return params, opt


def same_chunks(monkeypatch, chunk):
    """one_launch's chunk (its own, smaller by default) as ``chunk``."""
    from fastlars.ops import multi_tensor

    monkeypatch.setattr(multi_tensor, "ONE_LAUNCH_CHUNK", chunk)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 32 elements, blocks of 16, in both designs (so that their sums are formed
    in the same order): every tensor but the smallest has several of each."""
    use_chunks(monkeypatch, 32, 16, 2)
    same_chunks(monkeypatch, 32)


@pytest.mark.usefixtures("triton_interpreter", "small_chunks")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", range(3))
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_matches_reference_and_two_launches(name, variant, dtype):
    options = OPTIONS[name][variant]
    params, opt = run(name, "triton", options, dtype, one_launch=True)
    two_launches, _ = run(name, "triton", options, dtype)
    reference, _ = run(name, "reference", options, dtype)
    scale = max(q.abs().max().item() for q in reference if q.numel())
    for p, q, r in zip(params, two_launches, reference):
        assert torch.equal(p, q)  # the same sums in the same order: the same bits
        assert not p.numel() or (p - r).abs().max().item() <= TOLERANCE[dtype] * scale
    stats = opt.layer_stats()  # the kernel's totals, as the two-launch step's
    assert torch.isfinite(stats.trust_ratio).all() and stats.weight_norm[2] == 0


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_its_own_chunk_size(name, monkeypatch):
    """one_launch cuts tensors into ONE_LAUNCH_CHUNK-element chunks (here twice the
    two-launch chunk): the sums are grouped otherwise, the step is the reference's to rounding."""
    use_chunks(monkeypatch, 32, 16, 2)
    same_chunks(monkeypatch, 64)
    params, _ = run(name, "triton", OPTIONS[name][1], torch.float64, one_launch=True)
    reference, _ = run(name, "reference", OPTIONS[name][1], torch.float64)
    scale = max(q.abs().max().item() for q in reference if q.numel())
    for p, r in zip(params, reference):
        assert not p.numel() or (p - r).abs().max().item() <= TOLERANCE[torch.float64] * scale


@pytest.mark.usefixtures("triton_interpreter", "small_chunks")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_bf16_master_weights(name):
    options = OPTIONS[name][0]
    params, opt = run(name, "triton", options, torch.bfloat16, one_launch=True, master_weights=True)
    two_launches, two_opt = run(name, "triton", options, torch.bfloat16, master_weights=True)
    for p, q in zip(params, two_launches):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], two_opt.state[q]["master_param"])


@pytest.mark.usefixtures("triton_interpreter", "small_chunks")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_the_gate_decides_before_the_launch(name):
    """A NaN gradient: the pre-read refuses the step before anything changes (raising),
    or skips it on the device (skip_nonfinite=True), as the two-launch step does."""
    options = OPTIONS[name][0]
    params, opt = run(name, "triton", options, torch.float32, steps=1, one_launch=True)
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    set_grads(params, 1)
    params[3].grad[7] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(v, state[k]) for k, v in opt.state[params[0]].items())

    params, opt = run(name, "triton", options, torch.float32, steps=1, one_launch=True, skip_nonfinite=True)
    before = [p.detach().clone() for p in params]
    set_grads(params, 1)
    params[3].grad[7] = float("nan")
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and opt.skipped_steps == 1


@pytest.mark.usefixtures("triton_interpreter", "small_chunks")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_grad_scaler_decides_without_a_pre_read(name, monkeypatch):
    """GradScaler's found_inf (and grad_scale) as torch.amp sets them: no gradient pre-read,
    the step matches the two-launch step on the same scaled gradients; found_inf = 1 skips."""
    pre_reads = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda *a, **k: pre_reads.append(1) or real(*a, **k))
    results = []
    for one_launch in (True, False):
        params = make_params(torch.float32)
        opt = getattr(fastlars, name)(params, backend="triton", one_launch=one_launch, **OPTIONS[name][0])
        for step, found in enumerate((0.0, 1.0, 0.0)):
            set_grads(params, step)
            for p in params:
                p.grad.mul_(1024.0)
            opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(found)
            opt.step()
        results.append((params, opt.skipped_steps))
        if one_launch:
            assert not pre_reads
    (params, skipped), (two_launches, two_skipped) = results
    assert skipped == two_skipped == 1
    assert all(torch.equal(p, q) for p, q in zip(params, two_launches))


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_overflowing_sums_leave_that_tensor_unchanged(name):
    """fp32 weights near 1e20 (finite) whose sum of squares overflows: the gate, which only
    pre-reads the gradients, cannot see it; that tensor is left as it is, the others step.
    (The two-launch step refuses the whole step.)"""
    params = make_params(torch.float32)
    with torch.no_grad():
        params[0].fill_(1e20)
    big, rest = params[0].detach().clone(), [p.detach().clone() for p in params[1:]]
    opt = getattr(fastlars, name)(params, backend="triton", one_launch=True, **OPTIONS[name][0])
    set_grads(params, 0)
    opt.step()
    assert torch.equal(params[0], big)
    assert all(not torch.equal(p, r) for p, r in zip(params[1:], rest) if p.numel())


def test_refused_where_one_launch_cannot_step():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="one_launch=True needs backend='triton'"):
        fastlars.LARS([p], backend="foreach", one_launch=True)
    with pytest.raises(TypeError, match="one_launch must be a bool"):
        fastlars.LAMB([p], backend="triton", one_launch=1)


@pytest.mark.usefixtures("triton_interpreter")
def test_refuses_clipping_and_sharded_parameters_before_any_change():
    from fastlars.ops import _tables

    params = make_params(torch.float32)
    before = [p.detach().clone() for p in params]
    opt = fastlars.LAMB(params, backend="triton", one_launch=True, max_grad_norm=1.0)
    set_grads(params, 0)
    with pytest.raises(ValueError, match="one_launch=True cannot be combined with max_grad_norm > 0"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not any(opt.state[p] for p in params)

    class ShardedPlan:  # what a step over DTensor parameters hands the driver
        mesh, gate_known, launches = object(), False, []

    with pytest.raises(ValueError, match="one_launch=True cannot step sharded"):
        _tables.one_launch_checks(ShardedPlan())


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_capturable_first_step_launches_every_later_variant(name, monkeypatch):
    """capturable=True with one_launch: the state-creating eager step launches the one
    kernel variant of every later step, and a "captured" step builds nothing
    (test_gpu_readiness's recipe)."""
    import test_gpu_readiness as readiness

    options = {**readiness.CAPTURABLE[name], "one_launch": True, "max_grad_norm": 0.0} if name == "LAMB" else \
        {**readiness.CAPTURABLE[name], "one_launch": True}
    monkeypatch.setitem(readiness.CAPTURABLE, name, options)
    readiness.test_state_creating_step_launches_every_later_variant(name, monkeypatch)
    monkeypatch.undo()
    monkeypatch.setitem(readiness.CAPTURABLE, name, options)
    readiness.test_one_eager_step_then_a_capture(name, monkeypatch)


# ----------------------------------------------------------------------------
# on a GPU: programs run concurrently, the waits are real

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _gpu_pair(name, shapes, monkeypatch, steps=3, **kwargs):
    """The same steps with one_launch and without, on the GPU, in chunks of the same size
    (the same sums in the same order): (params, two-launch params, opt)."""
    from fastlars.ops import multi_tensor

    same_chunks(monkeypatch, multi_tensor.CHUNK)
    runs = []
    for one_launch in (True, False):
        g = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in shapes]
        opt = getattr(fastlars, name)(params, backend="triton", one_launch=one_launch, **kwargs)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-2
            opt.step()
        runs.append((params, opt))
    return runs[0][0], runs[1][0], runs[0][1]


def _resnet50_shapes():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        return [p.shape for p in torchvision.models.resnet50().parameters()]


@gpu
@pytest.mark.parametrize("name, kwargs", [("LARS", dict(lr=1.0, nesterov=True, weight_decay=1e-4)),
                                          ("LAMB", dict(lr=1e-2))])
def test_gpu_resnet50_shapes_bitwise_as_two_launches(name, kwargs, monkeypatch):
    params, two_launches, _ = _gpu_pair(name, _resnet50_shapes(), monkeypatch, **kwargs)
    for p, q in zip(params, two_launches):
        assert torch.equal(p, q)


@gpu
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_gpu_thousands_of_chunks_waiting_at_once(name, monkeypatch):
    """Tensors of 4,000+ chunks (more programs than an H100 holds at once) between small
    ones: update items wait while norm items of later tensors run."""
    shapes = [(3,), (64 * 1024 * 1024 + 5,), (17,), (4096, 4099), (1,)]
    params, two_launches, _ = _gpu_pair(name, shapes, monkeypatch, steps=2, lr=0.1)
    for p, q in zip(params, two_launches):
        assert torch.equal(p, q)


@gpu
@pytest.mark.parametrize("name, lr", [("LARS", 1.0), ("LAMB", 1e-2)])
def test_gpu_own_chunk_size_matches_reference_and_repeats(name, lr):
    """ONE_LAUNCH_CHUNK as shipped, ResNet-50's shapes: the reference's step to fp32
    rounding, and the same bits run to run (the sums' order does not depend on timing)."""
    runs = []
    for backend in ("triton", "triton", "reference"):
        g = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in _resnet50_shapes()]
        opt = getattr(fastlars, name)(params, backend=backend, lr=lr, one_launch=backend == "triton")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-2
            opt.step()
        runs.append(params)
    first, second, reference = runs
    scale = max(q.abs().max().item() for q in reference)
    for p, q, r in zip(first, second, reference):
        assert torch.equal(p, q)
        assert (p - r).abs().max().item() <= 1e-6 * scale


@gpu
@pytest.mark.parametrize("name, kwargs, lr0", [("LARS", dict(nesterov=True, trust_clip=True), 0.5),
                                               ("LAMB", dict(), 1 / 64)])
def test_gpu_captured_graph_replays_as_eager_steps(name, kwargs, lr0):
    """capturable=True: test_fused_gpu's capture, replay and no-host-sync checks with
    one_launch (the counters' memset is captured too)."""
    import test_fused_gpu

    test_fused_gpu.test_cuda_graph_capture_and_replay("triton", name, {**kwargs, "one_launch": True}, lr0)
