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


@pytest.fixture(autouse=True)
def _triton_needs_cuda_or_interpreter(request):
    """On a GPU machine Triton runs compiled, so its CPU-tensor cases are skipped (the
    interpreter cannot be mixed in: it is chosen once, when fastlars.ops is imported)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    backends = {v for k, v in params.items() if k in ("backend", "source", "target")}
    device = params.get("device", "cpu")
    if "triton" in backends and str(device) == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors runs only under TRITON_INTERPRET=1")
    if "triton" in backends and str(device) == "cpu" and not _interpreter_runs_our_kernels():
        pytest.skip("Triton < 3.7's interpreter cannot run loops bounded by loaded values (see conftest)")


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
