"""Ghost Batch Normalization: every backend against the F.batch_norm-per-ghost reference,
nn.BatchNorm equivalences, running statistics, the converter and bad input."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import fastlars
from conftest import backend_params
from fastlars.nn.ghost_bn import ghost_batch_norm, ghost_sizes

TRITON = "triton" in fastlars.available_backends() and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
FAST_BACKENDS = ["native", "vectorized"] + (["triton"] if TRITON else [])
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_ghost_sizes():
    assert ghost_sizes(8, 4) == [4, 4]
    assert ghost_sizes(10, 4) == [4, 4, 2]
    assert ghost_sizes(9, 4) == [4, 5]  # a one-sample remainder joins the previous ghost
    assert ghost_sizes(5, 4) == [5]
    assert ghost_sizes(3, 4) == [3]
    assert ghost_sizes(4, 4) == [4]
    assert ghost_sizes(7, 1) == [1] * 7


@pytest.fixture(params=["one-pass", "two-pass"])
def triton_passes(request, monkeypatch):
    """Run the Triton kernels both ways: groups on chip, and tiled with a fallback."""
    if TRITON and request.param == "two-pass":
        from fastlars.ops import ghost_bn as kernels

        monkeypatch.setattr(kernels, "ONE_PASS_MAX", 16)
        monkeypatch.setattr(kernels, "TILE", 8)
    return request.param


SHAPES = [  # (shape, channels_last, virtual_batch_size)
    ((8, 3), False, 4),
    ((10, 4, 7), False, 4),
    ((9, 3, 5, 3), False, 4),
    ((11, 3, 4, 5), True, 4),
    ((6, 5, 3, 3), True, 8),  # batch below one ghost: plain batch norm
    ((9, 3, 2, 3, 2), False, 4),  # 5-D: the (N, C, L) path on a view
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def run(backend, x, weight, bias, vbs, dy):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    y, mean, var, sizes = ghost_batch_norm(x, weight, bias, vbs, 1e-5, backend)
    dx, dw, db = torch.autograd.grad(y, (x, weight, bias), dy)
    return y, mean, var, dx, dw, db


@pytest.mark.parametrize("backend", backend_params(FAST_BACKENDS))
@pytest.mark.parametrize("shape, channels_last, vbs", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(backend, shape, channels_last, vbs, dtype, device, triton_passes):
    if backend != "triton" and triton_passes == "two-pass":
        pytest.skip("the pass plan is Triton's")
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter")
    g = torch.Generator().manual_seed(hash((shape, vbs)) % 2**31)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], generator=g).to(device)
    bias = torch.randn(shape[1], generator=g).to(device)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    expected = run("reference", x, weight, bias, vbs, dy)
    got = run(backend, x, weight, bias, vbs, dy)
    tol = TOLERANCE[dtype]
    for name, a, b in zip(["y", "mean", "var", "dx", "dweight", "dbias"], got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item(), msg=name)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last or x.ndim != 4
    assert got[1].dtype == torch.float32  # fp32 statistics whatever the input dtype


STRIDED = {  # (a base tensor's shape, the view of it that is the input): neither contiguous nor channels_last
    "(N, C, L) transposed from (N, L, C)": ((9, 5, 4), lambda t: t.transpose(1, 2)),
    "(N, C) transposed": ((4, 9), lambda t: t.t()),
    "(N, C, L) sliced": ((9, 4, 10), lambda t: t[:, :, ::2]),
    "(N, C, H, W) sliced": ((9, 4, 3, 6), lambda t: t[..., ::2]),
    "(N, C, D, H, W) permuted": ((9, 2, 3, 2, 4), lambda t: t.permute(0, 4, 1, 2, 3)),
}


@pytest.mark.parametrize("backend", backend_params(FAST_BACKENDS))
@pytest.mark.parametrize("layout", STRIDED)
@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_matches_reference(backend, layout, device):
    """Regression: the native backend gave wrong output and statistics for a transposed
    (N, C, L) input (a BatchNorm1d after a (N, L, C) layer), torch's out= kernels
    misreading the strides."""
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter")
    g = torch.Generator().manual_seed(0)
    shape, view = STRIDED[layout]
    base = (torch.randn(shape, generator=g) * 3 + 1).to(device)
    weight, bias = (torch.rand(4, generator=g) + 0.5).to(device), torch.randn(4, generator=g).to(device)
    dy = torch.randn(view(base).shape, generator=g).to(device)

    def run_on_view(backend):  # run() clones its input, which would make the sliced views contiguous
        x = view(base.clone().requires_grad_())
        assert not x.is_contiguous()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        y, mean, var, _ = ghost_batch_norm(x, w, b, 4, 1e-5, backend)
        return (y, mean, var, *torch.autograd.grad(y, (x, w, b), dy))

    for name, a, b in zip(["y", "mean", "var", "dx", "dweight", "dbias"], run_on_view(backend),
                          run_on_view("reference")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", backend_params(FAST_BACKENDS))
@pytest.mark.parametrize("shape, vbs", [((7, 2, 3), 3), ((6, 2, 2, 2), 2)])
def test_gradcheck_float64(backend, shape, vbs, triton_passes):
    if backend != "triton" and triton_passes == "two-pass":
        pytest.skip("the pass plan is Triton's")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ghost_batch_norm(*a, vbs, 1e-5, backend)[0], (x, weight, bias))


def modules(vbs, **kwargs):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, **kwargs)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    gbn = fastlars.GhostBatchNorm2d(3, vbs, **kwargs)
    gbn.load_state_dict(bn.state_dict())
    return bn, gbn


@pytest.mark.parametrize("backend", backend_params(FAST_BACKENDS + ["reference"]))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_equals_batchnorm_when_one_ghost(backend, momentum):
    bn, gbn = modules(vbs=16, momentum=momentum)
    gbn.backend = backend
    for step in range(3):
        x = torch.randn(12, 3, 5, 5) * (step + 1)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(xa), gbn(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gbn.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gbn.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-5)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(gbn, name), getattr(bn, name), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_follow_spec(momentum):
    """running <- (1 - m) running + m * mean over ghosts of (ghost mean, unbiased ghost var)."""
    _, gbn = modules(vbs=4, momentum=momentum)
    mean, var = gbn.running_mean.clone(), gbn.running_var.clone()
    for step in range(1, 4):
        x = torch.randn(10, 3, 2, 3) + step  # ghosts of 4, 4, 2 samples
        gbn(x)
        ghosts = x.split([4, 4, 2])
        m = torch.stack([c.mean(dim=(0, 2, 3)) for c in ghosts]).mean(0)
        v = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in ghosts]).mean(0)
        factor = momentum if momentum is not None else 1.0 / step
        mean = (1 - factor) * mean + factor * m
        var = (1 - factor) * var + factor * v
        torch.testing.assert_close(gbn.running_mean, mean)
        torch.testing.assert_close(gbn.running_var, var)
        assert gbn.num_batches_tracked.item() == step


def test_ghosts_differ_from_batchnorm_in_training():
    bn, gbn = modules(vbs=4)
    x = torch.randn(12, 3, 4, 4) + torch.arange(12.0).view(12, 1, 1, 1)  # ghosts with different means
    assert not torch.allclose(bn(x), gbn(x), atol=1e-3)


def test_eval_and_state_dict_both_ways():
    bn, gbn = modules(vbs=4)
    for _ in range(2):
        gbn(torch.randn(16, 3, 4, 4))
    bn.load_state_dict(gbn.state_dict())  # ghost -> plain
    bn.eval()
    gbn.eval()
    x = torch.randn(5, 3, 4, 4)  # any batch size in eval
    torch.testing.assert_close(gbn(x), bn(x), rtol=0, atol=0)
    plain = torch.nn.BatchNorm2d(3)
    plain.load_state_dict(gbn.state_dict())
    assert set(plain.state_dict()) == set(gbn.state_dict())


def test_no_running_stats():
    bn, gbn = modules(vbs=4, track_running_stats=False)
    x = torch.randn(8, 3, 4, 4)
    assert gbn.running_mean is None
    expected = torch.cat([F.batch_norm(c, None, None, gbn.weight, gbn.bias, True, 0.0, 1e-5) for c in x.split(4)])
    torch.testing.assert_close(gbn(x), expected)
    gbn.eval()
    bn.eval()
    torch.testing.assert_close(gbn(x), bn(x))  # whole-batch statistics, as nn.BatchNorm


def test_gbn1d_inputs():
    gbn = fastlars.GhostBatchNorm1d(4, virtual_batch_size=3)
    for shape in [(7, 4), (7, 4, 5)]:
        x = torch.randn(shape)
        expected = torch.cat([F.batch_norm(c, None, None, gbn.weight, gbn.bias, True, 0.0, 1e-5)
                              for c in x.split([3, 4])])
        torch.testing.assert_close(gbn(x), expected)


def test_convert_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    for _ in range(2):  # non-trivial running statistics
        model(torch.randn(4, 3, 32, 32))
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    before = model(x)
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    converted = fastlars.convert_ghost_batchnorm(model, virtual_batch_size=2)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
    assert sum(isinstance(m, fastlars.GhostBatchNorm2d) for m in converted.modules()) == 20
    for name, p in converted.named_parameters():
        assert p is params[name], name  # the same Parameter objects: optimizers keep working
    for name, b in converted.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert not converted.training
    torch.testing.assert_close(converted(x), before, rtol=0, atol=0)
    assert fastlars.convert_ghost_batchnorm(torch.nn.BatchNorm1d(3), 2).virtual_batch_size == 2


def ghost_loop(x, module, sizes):
    """The contract's oracle on a module's own weight and bias: F.batch_norm per ghost."""
    return torch.cat([F.batch_norm(c, None, None, module.weight, module.bias, True, 0.0, module.eps)
                      for c in x.split(sizes)])


SYNC_INPUTS = [  # (shape, memory format): every dimensionality nn.SyncBatchNorm accepts
    ((10, 4), torch.contiguous_format),  # a projector head's BatchNorm1d under DDP (SimCLR, BYOL)
    ((10, 4, 5), torch.contiguous_format),
    ((10, 4, 3, 2), torch.channels_last),
    ((10, 4, 2, 3, 2), torch.contiguous_format),
    ((10, 4, 2, 3, 2), torch.channels_last_3d),
]


@pytest.mark.parametrize("backend", backend_params(FAST_BACKENDS + ["reference"]))
@pytest.mark.parametrize("shape, memory_format", SYNC_INPUTS)
def test_convert_sync_batchnorm(backend, shape, memory_format):
    """convert_ghost_batchnorm(include_sync=True) of an nn.SyncBatchNorm (here from
    convert_sync_batchnorm of a BatchNorm1d/2d/3d) runs on whatever input the SyncBatchNorm
    took: training equals F.batch_norm per ghost (forward, backward, running statistics),
    eval equals nn.BatchNorm, and the Parameters and buffers are the SyncBatchNorm's."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter")
    plain = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    torch.manual_seed(len(shape))
    bn = plain[len(shape)](4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    reference = copy.deepcopy(bn)
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(bn))
    weight, bias = sync[0].weight, sync[0].bias
    model = fastlars.convert_ghost_batchnorm(sync, 3, include_sync=True, backend=backend)
    gbn = model[0]
    assert type(gbn) is fastlars.GhostBatchNorm and gbn.virtual_batch_size == 3
    assert gbn.weight is weight and gbn.bias is bias
    torch.testing.assert_close(gbn.running_mean, reference.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(gbn.running_var, reference.running_var, rtol=0, atol=0)

    sizes = ghost_sizes(shape[0], 3)  # 3, 3, 4: the one-sample remainder joins the last ghost
    x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(shape)
    y = model(x)
    assert y.shape == x.shape and y.is_contiguous(memory_format=memory_format)
    dx, dw, db = torch.autograd.grad(y, (x, weight, bias), dy)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = ghost_loop(x_ref, reference, sizes)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x_ref, reference.weight, reference.bias), dy)
    for name, a, b in [("y", y, y_ref), ("dx", dx, dx_ref), ("dweight", dw, dw_ref), ("dbias", db, db_ref)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)

    dims = (0,) + tuple(range(2, len(shape)))
    ghosts = x.detach().split(sizes)
    mean = torch.stack([c.mean(dims) for c in ghosts]).mean(0)
    var = torch.stack([c.var(dims, unbiased=True) for c in ghosts]).mean(0)
    torch.testing.assert_close(gbn.running_mean, reference.running_mean.lerp(mean, 0.1))
    torch.testing.assert_close(gbn.running_var, reference.running_var.lerp(var, 0.1))
    assert gbn.num_batches_tracked.item() == 1

    model.eval()
    reference.load_state_dict(gbn.state_dict())  # the ghost module's state loads into the plain one
    reference.eval()
    x_eval = torch.randn((5,) + shape[1:])
    torch.testing.assert_close(model(x_eval), reference(x_eval), rtol=0, atol=0)


def test_convert_sync_batchnorm_keeps_mode_and_refuses_1d_input():
    sync = torch.nn.SyncBatchNorm(4, momentum=None, affine=False, track_running_stats=False).eval()
    gbn = fastlars.convert_ghost_batchnorm(sync, 2, include_sync=True)
    assert type(gbn) is fastlars.GhostBatchNorm and not gbn.training and gbn.momentum is None and not gbn.affine
    assert type(fastlars.convert_ghost_batchnorm(sync, 2)) is torch.nn.SyncBatchNorm  # include_sync=False
    with pytest.raises(ValueError, match="expected at least 2D input"):
        gbn(torch.randn(4))


@pytest.mark.parametrize("make, x, match", [
    (lambda: fastlars.GhostBatchNorm2d(3, 0), None, "virtual_batch_size must be an integer >= 1"),
    (lambda: fastlars.GhostBatchNorm2d(3, 2.5), None, "virtual_batch_size must be an integer >= 1"),
    (lambda: fastlars.GhostBatchNorm2d(3, 4, backend="cudnn"), None, "backend='cudnn' is unknown"),
    (lambda: fastlars.GhostBatchNorm2d(3, 4), torch.randn(8, 3, 4), "expected 4D input"),
    (lambda: fastlars.GhostBatchNorm1d(3, 4), torch.randn(8, 3, 4, 4), "expected 2D or 3D input"),
    (lambda: fastlars.GhostBatchNorm2d(3, 4), torch.randn(8, 5, 4, 4), r"got an input with 5 channels"),
    (lambda: fastlars.GhostBatchNorm2d(3, 4), torch.randn(1, 3, 4, 4), "at least 2 samples"),
    (lambda: fastlars.GhostBatchNorm1d(3, 1), torch.randn(4, 3), "one value per channel in each ghost"),
])
def test_bad_input(make, x, match):
    with pytest.raises(ValueError, match=match):
        module = make()
        module(x)


@pytest.mark.skipif(not (torch.cuda.is_available() and TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("channels, hw", [(64, 56), (256, 14), (2048, 7)])
@pytest.mark.parametrize("dtype, memory_format", [(torch.float32, torch.contiguous_format),
                                                  (torch.bfloat16, torch.channels_last)])
@pytest.mark.parametrize("vbs", [32, 128])
def test_triton_resnet50_shapes_gpu(channels, hw, dtype, memory_format, vbs):
    """ResNet-50 activation shapes at 256 images: both one-pass (small groups) and
    two-pass (64 x 56 x 56 groups) kernels on the GPU against the reference."""
    g = torch.Generator(device="cuda").manual_seed(channels)
    x = torch.randn(256, channels, hw, hw, device="cuda", generator=g).to(dtype).contiguous(memory_format=memory_format)
    weight = torch.rand(channels, device="cuda", generator=g) + 0.5
    bias = torch.randn(channels, device="cuda", generator=g)
    dy = torch.randn(x.shape, device="cuda", generator=g).to(dtype)
    expected = run("reference", x, weight, bias, vbs, dy)
    got = run("triton", x, weight, bias, vbs, dy)
    tol = TOLERANCE[dtype]
    for name, a, b in zip(["y", "mean", "var", "dx", "dweight", "dbias"], got, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item(), msg=name)


def test_torch_compile():
    """The autograd.Function paths run under torch.compile (graph breaks allowed)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), fastlars.GhostBatchNorm2d(4, 4), torch.nn.ReLU())
    eager = copy.deepcopy(model)
    x = torch.randn(10, 3, 6, 6)
    y = torch.compile(model)(x)
    y.sum().backward()
    y_eager = eager(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, eager[1].running_var)


@pytest.mark.skipif(not TRITON, reason="needs Triton on CUDA or the interpreter")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("device", DEVICES)
def test_triton_keeps_nan_and_inf_in_bf16(device, triton_passes, request):
    """A NaN or Inf in a (ghost, channel) group makes that group's output NaN, as in the
    reference, and leaves the others finite. On a GPU the NaN computed from a NaN is
    0x7FFFFFFF, which the bf16 store once rounded to -0.0 (tests/test_cast_rne.py checks
    the store bit for bit; the interpreter computes 0x7FC00000-like NaNs that never hit it)."""
    if device == "cpu":  # the interpreter, where it can run the two-pass loops (conftest); CUDA runs compiled
        request.getfixturevalue("triton_interpreter")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 2, 3, generator=g)
    x[1, 0, 1, 2] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    x[6, 2, 0, 0] = float("inf")
    x[5, 1, 1, 1] = float("-inf")
    x = x.to(device, torch.bfloat16)
    weight, bias = torch.ones(3, device=device), torch.zeros(3, device=device)
    expected = ghost_batch_norm(x, weight, bias, 4, 1e-5, "reference")[0]
    got = ghost_batch_norm(x, weight, bias, 4, 1e-5, "triton")[0]
    groups = lambda t: t.isnan().unflatten(0, (2, 4)).transpose(1, 2).flatten(2)  # (ghost, channel, values)
    assert groups(expected).all(-1).tolist() == [[True, False, False], [False, True, True]]
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got[~got.isnan()].float(), expected[~expected.isnan()].float(), rtol=2e-2, atol=2e-2)


# CUDA's grid limits: axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65,535
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@pytest.mark.skipif(not TRITON, reason="needs Triton on CUDA or the interpreter")
@pytest.mark.parametrize("shape, vbs", [((3, 70000), 4),  # GhostBatchNorm1d with 70,000 channels
                                        ((140000, 2), 2)])  # 70,000 ghosts
def test_triton_grid_within_cuda_limits(shape, vbs, monkeypatch):
    """One program per (ghost, channel), none on an axis past CUDA's limit (the interpreter has
    none, so the launches are recorded, not run: 70,000 programs take minutes there)."""
    from fastlars.ops import ghost_bn as kernels

    grids = []

    class Record:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append((self.kernel.fn.__name__, tuple(grid)))
            return lambda *args, **kwargs: None

    for name in ("ghost_bn_forward_kernel", "ghost_bn_backward_kernel"):
        monkeypatch.setattr(kernels, name, Record(getattr(kernels, name)))
    x = torch.randn(shape, requires_grad=True)
    y = kernels.ghost_bn_triton(x, None, None, ghost_sizes(shape[0], vbs), 1e-5)[0]
    y.backward(torch.ones_like(y))
    assert [name for name, _ in grids] == ["ghost_bn_forward_kernel", "ghost_bn_backward_kernel"]
    groups = len(ghost_sizes(shape[0], vbs)) * shape[1]
    for _, grid in grids:
        assert all(n <= limit for n, limit in zip(grid, GRID_LIMITS)), grid
        assert torch.Size(grid).numel() == groups


@pytest.mark.parametrize("vbs", [2, 3])  # a ghost starting at sample 2; one ghost of 4 samples
def test_triton_offsets_are_int64(vbs, tmp_path, triton_interpreter):
    """Offsets past 2^31 elements without 8 GB of memory: views with a sample stride of 2^30
    into a sparse file mapped shared (only the pages touched are read). Sample 2 sits 2^31
    elements past a view's start, an offset that int32 arithmetic wraps to -2^31 (in a ghost's
    base offset for vbs=2, inside a group for vbs=3); the views start 2^31 elements into the
    file, so a wrapped offset reads wrong values instead of crashing. x is passed as the view
    itself (a clone would be compact), dy too; y and dx are new, compact tensors."""
    n, channels, length, gap = 4, 2, 3, 32
    size = 2**31 + (n - 1) * 2**30 + 2 * gap
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(size * 2)
    storage = torch.from_file(str(path), shared=True, size=size, dtype=torch.bfloat16)
    view = lambda offset: storage.as_strided((n, channels, length), (2**30, length, 1), 2**31 + offset)
    x, dy = view(0), view(gap)  # interleaved, both read through int64 offsets
    g = torch.Generator().manual_seed(vbs)
    x.copy_(torch.randn(x.shape, generator=g) * 2 + 1)
    dy.copy_(torch.randn(x.shape, generator=g))
    weight = (torch.rand(channels, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(channels, generator=g).requires_grad_()
    results = {}
    for backend in ("reference", "triton"):
        leaf = x.detach().requires_grad_()
        y, mean, var, _ = ghost_batch_norm(leaf, weight, bias, vbs, 1e-5, backend)
        results[backend] = (y, mean, var, *torch.autograd.grad(y, (leaf, weight, bias), dy))
    for name, a, b in zip(["y", "mean", "var", "dx", "dweight", "dbias"], results["triton"], results["reference"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def _check_ghosts(x, vbs, ghosts):
    """Triton over the whole batch against the reference run on chosen ghosts alone (ghosts are
    independent, so a slice's reference is exact): y, statistics and dx of those ghosts; dbias whole."""
    g = torch.Generator(device=x.device).manual_seed(x.shape[1])
    weight = torch.rand(x.shape[1], device=x.device, generator=g) + 0.5
    bias = torch.randn(x.shape[1], device=x.device, generator=g)
    dy = torch.randn(x.shape, device=x.device, generator=g, dtype=x.dtype)
    y, mean, var, dx, _, db = run("triton", x, weight, bias, vbs, dy)
    sizes = ghost_sizes(x.shape[0], vbs)
    tol = TOLERANCE[x.dtype]
    for ghost in ghosts:
        start = sum(sizes[:ghost])
        part = slice(start, start + sizes[ghost])
        expected = run("reference", x[part], weight, bias, sizes[ghost], dy[part])
        for name, a, b in zip(["y", "mean", "var", "dx"], (y[part], mean[ghost], var[ghost], dx[part]), expected):
            torch.testing.assert_close(a.float(), b.float().squeeze(0), rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                       msg=lambda m: f"ghost {ghost} {name}: {m}")
    torch.testing.assert_close(db, dy.sum(dim=(0,) + tuple(range(2, x.ndim)), dtype=torch.float32), rtol=1e-3, atol=1e-2)


@pytest.mark.skipif(not (torch.cuda.is_available() and TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("shape, vbs", [((3, 70000), 4), ((210000, 3), 3)])
def test_triton_70000_channels_or_ghosts_gpu(shape, vbs):
    """Past the 65,535 programs of a CUDA grid's axes 1 and 2, in channels and in ghosts."""
    x = torch.randn(shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    groups = len(ghost_sizes(shape[0], vbs))
    _check_ghosts(x, vbs, sorted({0, groups // 2, min(65536, groups - 1), groups - 1}))


@pytest.mark.skipif(not (torch.cuda.is_available() and TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("shape, vbs", [((65536, 32769), 32),  # one pass: 32 values per group
                                        ((520, 64, 256, 256), 32)])  # two passes: 2M values per group
def test_triton_activation_over_2_31_elements_gpu(shape, vbs):
    """A bf16 activation of more than 2^31 elements (int32 offsets wrap there), first, middle
    and last ghosts against the reference. Needs 8 copies of it in free memory (~35 GB)."""
    numel = torch.Size(shape).numel()
    assert numel > 2**31
    if torch.cuda.mem_get_info()[0] < 8 * 2 * numel:
        pytest.skip(f"needs {8 * 2 * numel / 2**30:.0f} GiB of free GPU memory")
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=torch.Generator(device="cuda").manual_seed(0))
    groups = len(ghost_sizes(shape[0], vbs))
    _check_ghosts(x, vbs, [0, groups // 2, groups - 1])


@pytest.mark.parametrize("backend", backend_params(FAST_BACKENDS + ["reference"]))
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("device", DEVICES)
def test_training_forward_has_no_host_device_traffic(backend, momentum, device):
    """A training forward (ghosts of unequal size, running statistics) builds no tensor from
    Python data (on a GPU: a pageable host-to-device copy that synchronises) and reads no
    tensor back to the host (.item(), float(): a device synchronisation), per layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    gbn = fastlars.GhostBatchNorm2d(3, 4, momentum=momentum, backend=backend, device=device)
    x = torch.randn(10, 3, 2, 2, device=device)  # ghosts of 4, 4, 2
    gbn(x)  # first call: anything cached per shape (none today) is built here
    with Record():
        gbn(x)
    syncing = {"lift_fresh", "lift_fresh_copy", "_local_scalar_dense", "item"}
    assert not syncing & set(Record.ops), Record.ops
    assert "lerp_" in Record.ops  # the recorder saw the forward through the running statistics


@pytest.mark.skipif(not TRITON, reason="needs Triton on CUDA or the interpreter")
def test_triton_group_too_large_for_int32_count():
    """A ghost with 2^31 or more values per channel: a clear error before anything is allocated
    (the input is an expanded view: no memory behind it)."""
    from fastlars.ops.ghost_bn import ghost_bn_triton

    x = torch.zeros(1).expand(4, 1, 2**30)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        ghost_bn_triton(x, None, None, [4], 1e-5)
