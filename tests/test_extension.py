"""The C++ extension: it was built (with CUDA where torch has CUDA and a toolkit is
installed, which is how CI proves the CUDA sources compile), the errors when a
backend cannot run, and how fastlars/_extension.py decides (no compiler, a failed
build, the cache name, info()) without compiling anything. tests/test_install.py
compiles for real in a fresh venv."""

import importlib
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import fastlars
from fastlars import _cuda_toolkit, _extension
from fastlars._info import render
from fastlars import backends


def test_extension_built():
    from fastlars import _C

    assert hasattr(_C, "lars_update_cpu") and "cpu" in fastlars.available_backends()
    if (torch.version.cuda is not None and _cuda_toolkit.cuda_toolkit().home is not None
            and os.environ.get("FASTLARS_NO_CUDA") != "1"):
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


# ----------------------------------------------------------------------------
# the CUDA toolkit: one rule (fastlars/_cuda_toolkit.py: find_cuda_toolkit), on fake toolkits

def fake_toolkit(root: Path, layout: str = "lib64", dryrun: str | None = None) -> Path:
    """A folder that looks like a CUDA toolkit: bin/nvcc, include/cuda_runtime.h and libcudart in
    ``layout`` (lib64, lib or targets/x86_64-linux/lib). Its nvcc prints ``dryrun`` (default: what
    a real nvcc's --dryrun prints about its own folder) on stderr, as nvcc does."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / layout).mkdir(parents=True)
    (root / layout / "libcudart.so.13").write_text("")
    if dryrun is None:
        target = root / "bin" / ".." / "targets" / "x86_64-linux"
        dryrun = (f'#$ _HERE_={root}/bin\n#$ TOP={root}/bin/..\n#$ INCLUDES="-I{target}/include"\n'
                  f'#$ LIBRARIES=  "-L{target}/lib/stubs" "-L{target}/lib"\n')
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\n# a fake nvcc: only --dryrun answers\nprintf '%s' '{dryrun}' >&2\n")
    nvcc.chmod(0o755)
    return root


def wrapper_nvcc(folder: Path, real_nvcc: Path) -> Path:
    """A PATH folder whose nvcc is a shell script that execs ``real_nvcc`` (as on the GPU image)."""
    folder.mkdir(parents=True)
    wrapper = folder / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real_nvcc} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture
def no_default_toolkit(monkeypatch, tmp_path):
    monkeypatch.setattr(_cuda_toolkit, "CUDA_DEFAULT_HOME", str(tmp_path / "no-usr-local-cuda"))


def test_explicit_cuda_home_is_used(tmp_path, no_default_toolkit):
    home = fake_toolkit(tmp_path / "cuda-12.8", layout="lib")
    toolkit = _cuda_toolkit.find_cuda_toolkit({"CUDA_HOME": str(home), "PATH": ""})
    assert toolkit.home == str(home) and toolkit.why == "CUDA_HOME is set"
    toolkit = _cuda_toolkit.find_cuda_toolkit({"CUDA_PATH": str(home), "PATH": ""})
    assert toolkit.home == str(home) and toolkit.why == "CUDA_PATH is set"


def test_invalid_cuda_home_is_rejected_with_the_reason(tmp_path, monkeypatch):
    default = fake_toolkit(tmp_path / "usr-local-cuda", layout="targets/x86_64-linux/lib")
    monkeypatch.setattr(_cuda_toolkit, "CUDA_DEFAULT_HOME", str(default))
    headers_only = tmp_path / "headers-only"
    (headers_only / "include").mkdir(parents=True)
    (headers_only / "include" / "cuda_runtime.h").write_text("")
    toolkit = _cuda_toolkit.find_cuda_toolkit({"CUDA_HOME": str(headers_only), "PATH": ""})
    assert toolkit.home == str(default)
    assert toolkit.why.startswith("the default location; CUDA_HOME ignored: ")
    assert f"{headers_only} has no bin/nvcc, no libcudart" in toolkit.why
    assert "cuda_runtime.h" not in toolkit.why  # it has that one
    missing = _cuda_toolkit.find_cuda_toolkit({"CUDA_HOME": str(tmp_path / "nowhere"), "PATH": ""})
    assert missing.home == str(default) and "is not a directory" in missing.why


def test_toolkit_behind_a_wrapper_nvcc_is_found(tmp_path, no_default_toolkit):
    """The nvcc on PATH is a script in a folder that holds no toolkit (torch's guess,
    dirname(dirname(nvcc)), would be that folder's parent): nvcc's own dry run names the toolkit."""
    real = fake_toolkit(tmp_path / "opt" / "cuda-13.0")
    wrapper = wrapper_nvcc(tmp_path / "usr" / "bin", real / "bin" / "nvcc")
    toolkit = _cuda_toolkit.find_cuda_toolkit({"PATH": str(wrapper.parent)})
    assert toolkit.home == str(real)
    assert toolkit.why.startswith(f"the toolkit behind {wrapper}, as `nvcc --dryrun` reports it")
    assert toolkit.why.endswith("not the default: " + _cuda_toolkit.toolkit_problem(_cuda_toolkit.CUDA_DEFAULT_HOME))
    assert _cuda_toolkit.toolkit_problem(str(wrapper.parent.parent))  # torch's guess is no toolkit


def test_toolkit_from_nvcc_include_folders(tmp_path, no_default_toolkit):
    """An nvcc that prints no TOP= line: the toolkit is the one above its include folder."""
    real = tmp_path / "cuda"
    fake_toolkit(real, layout="targets/x86_64-linux/lib",
                 dryrun=f'#$ INCLUDES="-I{real}/bin/../targets/x86_64-linux/include"\n')
    wrapper = wrapper_nvcc(tmp_path / "wrap", real / "bin" / "nvcc")
    assert _cuda_toolkit.find_cuda_toolkit({"PATH": str(wrapper.parent)}).home == str(real)


def test_no_toolkit_says_where_it_looked(tmp_path, no_default_toolkit):
    incomplete = tmp_path / "cuda-incomplete"
    fake_toolkit(incomplete)
    (incomplete / "lib64" / "libcudart.so.13").unlink()  # its nvcc answers, but no runtime library
    wrapper = wrapper_nvcc(tmp_path / "wrap", incomplete / "bin" / "nvcc")
    for environ, why in [({"PATH": str(tmp_path)}, "no nvcc on PATH"),
                         ({"PATH": str(wrapper.parent)}, f"behind {wrapper}: {incomplete} has no libcudart")]:
        toolkit = _cuda_toolkit.find_cuda_toolkit(environ)
        assert toolkit.home is None and why in toolkit.why, toolkit
        assert str(toolkit).startswith("no CUDA toolkit: not the default: ") and str(toolkit).endswith(
            "set CUDA_HOME to the toolkit")


def test_python_m_fastlars_names_the_toolkit(tmp_path):
    home = fake_toolkit(tmp_path / "cuda")
    env = {**os.environ, "CUDA_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "fastlars", "--cuda-home"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == f"{home}\n", done.stderr
    assert done.stderr.strip().endswith(f"CUDA toolkit {home}: CUDA_HOME is set")
    env["CUDA_HOME"] = str(tmp_path / "not-a-toolkit")
    done = subprocess.run([sys.executable, "-m", "fastlars"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"CUDA_HOME ignored: {tmp_path / 'not-a-toolkit'} is not a directory" in done.stdout


def test_jit_build_compiles_with_the_toolkit_found(fresh_extension, monkeypatch, tmp_path):
    """torch.utils.cpp_extension fixed its CUDA_HOME when it was imported; the just-in-time build
    replaces it with fastlars's choice while compiling, and puts it back."""
    toolkit = _cuda_toolkit.CudaToolkit(str(tmp_path / "cuda"), "a test")
    seen = []

    def load(name, *args, **kwargs):
        seen.append((fake.CUDA_HOME, os.environ.get("CUDA_HOME"), kwargs["with_cuda"]))
        raise RuntimeError("compiling nothing: a test")

    fake = types.SimpleNamespace(CUDA_HOME="/usr", get_default_build_root=lambda: str(tmp_path), load=load)
    monkeypatch.setattr(_extension, "_cpp_extension", lambda: fake)
    monkeypatch.setattr(_cuda_toolkit, "cuda_toolkit", lambda: toolkit)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setenv("CXX", sys.executable)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    assert _extension.load() is None
    assert seen == [(toolkit.home, toolkit.home, True)]
    assert fake.CUDA_HOME == "/usr" and "CUDA_HOME" not in os.environ

