"""The C++ extension: it was built (with CUDA where torch has CUDA and a toolkit is
installed, which is how CI proves the CUDA sources compile), the errors when a
backend cannot run, and how fastlars/_extension.py decides (no compiler, a failed
build, the cache name, info()) without compiling anything. tests/test_install.py
compiles for real in a fresh venv."""

import importlib
import logging
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import fastlars
from fastlars import _extension
from fastlars._info import render
from fastlars import backends


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


@pytest.fixture
def fresh_extension(monkeypatch, tmp_path):
    """fastlars._extension as if nothing were decided yet in this process and no
    prebuilt fastlars._C existed; builds would go to an empty TORCH_EXTENSIONS_DIR."""
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_prebuilt", lambda: (None, ""))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def fake_cpp_extension(monkeypatch, tmp_path, load):
    """torch.utils.cpp_extension with ``load`` in place of the real compile."""
    fake = types.SimpleNamespace(CUDA_HOME=None, get_default_build_root=lambda: str(tmp_path), load=load)
    monkeypatch.setattr(_extension, "_cpp_extension", lambda: fake)


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setenv("FASTLARS_NO_EXTENSION", "1")
    with pytest.raises(ValueError, match="FASTLARS_NO_EXTENSION=1.*pip install --no-build-isolation"):
        fastlars.LAMB([torch.nn.Parameter(torch.ones(3))], backend="cpu")
    assert fastlars.LAMB([torch.nn.Parameter(torch.ones(3))]).backend == "foreach"  # auto falls back
    assert fastlars.info()["backends"]["cpu"]["status"] == "unavailable"


@pytest.mark.parametrize("hide", ["CXX", "PATH"])
def test_no_compiler_makes_cpu_unavailable_with_the_reason(fresh_extension, monkeypatch, hide):
    if hide == "CXX":
        monkeypatch.setenv("CXX", str(fresh_extension / "missing-c++"))
    else:  # no CXX and a PATH without c++, g++ or clang++
        monkeypatch.delenv("CXX", raising=False)
        monkeypatch.setenv("PATH", str(fresh_extension))
    assert _extension.status().kind == "unavailable"
    with pytest.raises(ValueError, match="backend='cpu' is not available.*no C\\+\\+ compiler"):
        fastlars.LARS([torch.nn.Parameter(torch.ones(3))], lr=0.1, backend="cpu")
    assert "cpu" not in fastlars.available_backends()
    assert fastlars.LARS([torch.nn.Parameter(torch.ones(3))], lr=0.1).backend == "foreach"


def test_failed_build_is_reported_once_and_not_retried(fresh_extension, monkeypatch, caplog):
    calls = []

    def failing_load(name, *args, **kwargs):
        calls.append(name)
        raise RuntimeError(f"Error building extension '{name}': [1/3] c++ -c cpu_kernels.cpp\n"
                           "cpu_kernels.cpp:1:10: fatal error: omp.h: No such file or directory")

    fake_cpp_extension(monkeypatch, fresh_extension, failing_load)
    monkeypatch.setenv("CXX", sys.executable)  # any executable: the fake compiles nothing
    with caplog.at_level(logging.WARNING, logger="fastlars"):
        for _ in range(3):
            assert fastlars.LARS([torch.nn.Parameter(torch.ones(3))], lr=0.1).backend == "foreach"
            assert "cpu" not in fastlars.available_backends()
    assert len(calls) == 1
    [record] = [r for r in caplog.records if r.name == "fastlars"]  # one line, once
    assert "compiling the C++ kernels failed" in record.getMessage()
    status = _extension.status()
    assert status.kind == "unavailable" and "omp.h" in status.detail
    log = fresh_extension / calls[0] / "fastlars_build_error.log"
    assert "fatal error: omp.h" in log.read_text()
    with pytest.raises(ValueError, match="omp.h"):
        fastlars.LARS([torch.nn.Parameter(torch.ones(3))], lr=0.1, backend="cpu")


def test_prebuilt_that_does_not_load_is_reported(monkeypatch, tmp_path):
    """A fastlars._C built against another torch: its error is part of the reason."""
    import_module = importlib.import_module

    def broken(name, *args):
        if name == "fastlars._C":
            raise ImportError("_C.so: undefined symbol: _ZN3c104cuda9SetDevice", name=name)
        return import_module(name, *args)

    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(importlib, "import_module", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "missing-c++"))
    status = _extension.status()
    assert status.kind == "unavailable"
    assert "the prebuilt fastlars._C does not load (_C.so: undefined symbol" in status.detail
    assert "CXX=" in status.detail and _extension.load() is None


def test_jit_module_name_carries_the_versions(fresh_extension):
    plan = _extension._jit_plan()
    major, minor = torch.__version__.split(".")[:2]
    assert plan.name.startswith(f"fastlars_C_{fastlars.__version__.replace('.', '_')}_py")
    assert f"_torch{major}_{minor}_" in plan.name and plan.build_dir == fresh_extension / plan.name
    assert plan.name.endswith("_cpu") != plan.with_cuda
    assert {Path(s).name for s in plan.sources} <= set((Path(fastlars.__file__).parent.parent / "csrc"
                                                         / "sources.txt").read_text().split())


def test_info_compiles_nothing(fresh_extension, monkeypatch):
    def must_not_compile(*args, **kwargs):
        raise AssertionError("info() compiled the extension")

    fake_cpp_extension(monkeypatch, fresh_extension, must_not_compile)
    monkeypatch.setenv("CXX", sys.executable)
    report = fastlars.info()
    assert report["fastlars"] == fastlars.__version__ and report["torch"] == torch.__version__
    assert list(report["backends"]) == list(backends.BACKENDS)
    assert report["extension"]["kind"] == "compilable"
    assert report["backends"]["cpu"]["status"] == "on first use"
    assert report["backends"]["foreach"]["status"] == "available"
    text = render(report)
    assert "compiles on first use" in text and f"torch      {torch.__version__}" in text
