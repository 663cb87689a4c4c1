"""Shared fixtures: the devices to test on and small models with well-conditioned gradients."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter; it must be chosen
    # before fastlars.ops is imported (fastlars imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _interpreter_runs_our_kernels() -> bool:
    """Triton 3.6's interpreter loads a scalar as a 1-element array, which a loop bound
    (`range(0, n_chunks, ...)` with a loaded n_chunks) cannot take; 3.7+ runs them.
    Compiled kernels are unaffected: test_triton_compile.py compiles them with any version."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return True
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7)


def pytest_configure(config):
    config.addinivalue_line("markers", "backend(name): the test case runs backend `name` (an optimizer or Ghost BN "
                                       "backend) on its tensors; conftest skips it where that backend cannot step them")


def backend_marks(*names: str) -> list:
    """The marks of a test case that runs the backends ``names``: the case is skipped where one
    cannot step the test's tensors (see _skip_backends_that_cannot_step). A case without them
    runs as it is (a GPU test's plain ["triton", "cuda"] on CUDA tensors)."""
    return [pytest.mark.backend(name) for name in names]


def backend_params(names) -> list:
    """``names`` as test parameters (ids: the names), each with its backend_marks."""
    return [pytest.param(name, marks=backend_marks(name), id=name) for name in names]


def why_backend_cannot_step(name: str, device_type: str) -> str:
    """Why backend ``name`` cannot run on tensors of ``device_type`` here ("" if it can): one that
    is not made for them ("cpu" on CUDA tensors, "cuda" on CPU tensors), Triton on CPU tensors
    without its interpreter (on a GPU machine it runs compiled: the interpreter is chosen once,
    when fastlars.ops is imported), or an interpreter that cannot run our kernels."""
    from fastlars import backends

    record = backends.BACKENDS.get(name)  # Ghost BN's own backends ("native", "vectorized") step any tensors
    if record is None or record.steps(device_type):
        if name == "triton" and device_type == "cpu" and not _interpreter_runs_our_kernels():
            return "Triton < 3.7's interpreter cannot run loops bounded by loaded values (see conftest)"
        return ""
    if name == "triton" and device_type == "cpu":
        return "Triton on CPU tensors runs only under TRITON_INTERPRET=1"
    return f"backend {name!r} does not step {device_type} tensors"


@pytest.fixture(autouse=True)
def _skip_backends_that_cannot_step(request):
    """A case whose parameters are marked ``backend(name)`` (backend_params) runs on the tensors
    of its ``device`` argument (the fixture below, or a parameter of that name), else on CPU
    tensors; it is skipped where a marked backend cannot step them."""
    names = [mark.args[0] for mark in request.node.iter_markers("backend")]
    if not names:
        return
    device = request.getfixturevalue("device") if "device" in request.fixturenames else "cpu"
    for name in names:
        why = why_backend_cannot_step(name, torch.device(device).type)
        if why:
            pytest.skip(why)


@pytest.fixture
def triton_interpreter():
    """For tests that run Triton kernels on CPU tensors without a backend parameter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors runs only under TRITON_INTERPRET=1")
    if not _interpreter_runs_our_kernels():
        pytest.skip("Triton < 3.7's interpreter cannot run loops bounded by loaded values (see conftest)")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


# ResNet-50's largest weight (layer4's 3x3 conv, 2.4M elements), a 1x1 expansion, the stem and the
# classifier's bias: on the GPU the variant tests step these beside their awkward small tensors,
# so that the kernels run hundreds of full chunks per tensor (the small ones fit in one)
RESNET50_SHAPES = {"conv3x3": (512, 512, 3, 3), "conv1x1": (2048, 512, 1, 1), "stem": (64, 3, 7, 7),
                   "fc_bias": (1000,)}


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s floating-point type at each element's magnitude, in float64
    (subnormals and 0: the smallest normal number's spacing)."""
    info = torch.finfo(x.dtype)
    return info.eps * torch.exp2(torch.floor(torch.log2(x.double().abs().clamp_min(info.tiny))))


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 2, atol: float = 0.0, msg=""):
    """Element-wise: ``|actual - expected| <= ulps`` spacings of ``expected``'s dtype at ``expected``,
    plus ``atol`` (what the values they are rounded from may differ by: near 0 a spacing is far
    smaller than the rounding error of the tensor's large values)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
    error = (actual.detach().double() - expected.detach().double()).abs()
    bound = ulps * ulp(expected.detach()) + atol
    bad = ~(error <= bound)  # NaN fails
    assert not bad.any(), (f"{msg}: {int(bad.sum())} of {bad.numel()} elements off by more than {ulps} ulps "
                           f"+ {atol:.3g}, worst {float((error / bound)[bad].max()):.3g} x the bound")


def small_cnn(seed: int, device="cpu", dtype=torch.float32) -> torch.nn.Module:
    """A small CNN with odd shapes: 1-element, prime-sized and BN parameters.

    Convolutions before a BatchNorm have no bias: BN cancels it, so its gradient is
    rounding noise and Adam-style updates of it are ill-conditioned for comparison.
    """
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 7, 3, bias=False),
        torch.nn.BatchNorm2d(7),
        torch.nn.ReLU(),
        torch.nn.Conv2d(7, 5, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(5 * 6 * 6, 13),
        torch.nn.ReLU(),
        torch.nn.Linear(13, 1),
    )
    return model.to(device=device, dtype=dtype)


def model_inputs(seed: int, step: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(6, 3, 8, 8, generator=g).to(device=device, dtype=dtype)
