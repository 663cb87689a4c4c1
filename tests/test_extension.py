"""The C++ extension: it was built (with CUDA where torch has CUDA and a toolkit is
installed, which is how CI proves the CUDA sources compile), and the errors when a
backend cannot run."""

import os
import shutil

import pytest
import torch

import fastlars
from fastlars.optim import _common


def cuda_toolkit() -> bool:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc"))


def test_extension_built():
    from fastlars import _C

    assert hasattr(_C, "lars_update_cpu") and "cpu" in fastlars.available_backends()
    if torch.version.cuda is not None and cuda_toolkit() and os.environ.get("FASTLARS_NO_CUDA") != "1":
        assert _C.with_cuda, "torch has CUDA and a toolkit is installed, but the CUDA kernels were not built"
        for name in ("sumsq_cuda", "lars_update_cuda", "lamb_norms_cuda", "lamb_update_cuda"):
            assert hasattr(_C, name)


def test_backend_device_mismatch():
    p = torch.nn.Parameter(torch.ones(3))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda' is not available"):
            fastlars.LARS([p], lr=0.1, backend="cuda")
    else:
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            fastlars.LARS([p], lr=0.1, backend="cuda")
        with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
            fastlars.LARS([torch.nn.Parameter(torch.ones(3, device="cuda"))], lr=0.1, backend="cpu")


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_common, "_extension_has", lambda attribute: False)
    with pytest.raises(ValueError, match="pip install --no-build-isolation"):
        fastlars.LAMB([torch.nn.Parameter(torch.ones(3))], backend="cpu")
    assert fastlars.LAMB([torch.nn.Parameter(torch.ones(3))]).backend == "foreach"  # auto falls back
