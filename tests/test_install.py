"""pip install as a new user does it: an sdist and a wheel built with pip's default
build isolation (so torch is not importable in the build and no kernel is compiled),
each installed into a fresh venv that reuses this environment's torch; then the
pure-Python backends, the "cpu" backend compiled on first use and its cache reused,
the compiler hidden (cpu unavailable with the reason, "auto" falls back), and
`python -m fastlars`.

Slow: about 1-2 minutes on 2 cores, nearly all of it the one compile of the CPU
kernels (`pytest -m "not slow"` leaves it out). The isolated builds fetch setuptools
from PyPI (pip's cache makes it quick after the first time).
"""

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

import fastlars
from fastlars import _extension

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SOURCES = _extension.source_names(ROOT / "csrc")

# run inside a venv: a LARS and a LAMB step on `backend`, against the reference backend
STEP = """
import json, sys, torch, fastlars
from fastlars import _extension
backend = sys.argv[1]
assert "site-packages" in fastlars.__file__, fastlars.__file__  # the installed copy, not the checkout
out = {"file": fastlars.__file__, "status": _extension.status().kind}
for make in (fastlars.LARS, fastlars.LAMB):
    results = {}
    for b in (backend, "reference"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((7, 5), (13,), (1,))]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make(params, lr=0.1, weight_decay=0.01, backend=b)
        opt.step()
        results[b] = (opt.backend, params)
    chosen, got = results[backend]
    torch.testing.assert_close(got, results["reference"][1])
    out[make.__name__] = chosen
out["status_after"] = _extension.status().kind
if backend != "foreach":  # the probes compile the kernels if they can: not for the foreach-only check
    out["available"] = fastlars.available_backends()
print(json.dumps(out))
"""


def run(python: Path, *args: str, env: dict[str, str] | None = None, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """`python -m build`: the sdist, then the wheel built from the sdist (so the sdist
    must hold everything a build needs), both in isolated build environments."""
    out = tmp_path_factory.mktemp("dist")
    run(Path(sys.executable), "-m", "build", "--outdir", str(out), str(ROOT), cwd=out)
    [sdist], [wheel] = out.glob("*.tar.gz"), out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET") and not k.startswith(("FASTLARS_", "TORCH_EXTENSIONS"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def make_venv(where: Path, artifact: Path) -> Path:
    """A fresh venv that sees this environment's packages (torch, pip, ninja) through a
    .pth file, then `pip install <artifact>` into it with pip's default isolation.

    `venv --system-site-packages` would not do: run from a venv's Python it exposes the
    base interpreter's site-packages, not this venv's. `--ignore-installed`: the outer
    environment has fastlars installed (editable) and pip would see it through the .pth.
    """
    run(Path(sys.executable), "-m", "venv", "--without-pip", str(where), cwd=where.parent)
    python = where / "bin" / "python"
    inner = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=where).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(inner) / "outer_environment.pth").write_text("\n".join(sorted(outer)) + "\n")
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed", str(artifact),
        cwd=where, env=clean_env())
    return python


def test_sdist_holds_sources_docs_and_tests(dist):
    names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tarfile.open(dist["sdist"]).getnames()
             if len(Path(n).parts) > 1}
    expected = {"csrc/sources.txt", *(f"csrc/{s}" for s in SOURCES), "CMakeLists.txt", "README.md", "MANIFEST.in",
                "bench/NOTES.md", "docs/contract.md", "tests/test_install.py", "tests/conftest.py",
                "examples/common.py", "fastlars/_extension.py", "fastlars/_cuda_toolkit.py"}
    assert expected <= names, expected - names
    assert not any(n.endswith(".so") or "__pycache__" in n for n in names)


def test_isolated_wheel_is_pure_python_with_the_sources(dist):
    assert dist["wheel"].name == f"fastlars-{fastlars.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    assert {"fastlars/csrc/sources.txt", *(f"fastlars/csrc/{s}" for s in SOURCES), "fastlars/__main__.py"} <= names
    assert not any(n.endswith((".so", ".pyd")) for n in names)


def test_sdist_installs_and_steps_on_foreach(dist, tmp_path):
    python = make_venv(tmp_path / "venv", dist["sdist"])  # pip builds it, isolated
    env = clean_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    out = json.loads(run(python, "-c", STEP, "foreach", cwd=tmp_path, env=env).stdout)
    assert str(tmp_path / "venv") in out["file"] and out["LARS"] == out["LAMB"] == "foreach"
    assert out["status"] == out["status_after"] == "compilable"  # nothing compiled for foreach

    text = run(python, "-m", "fastlars", cwd=tmp_path, env=env).stdout
    assert text.startswith(f"fastlars   {fastlars.__version__} (") and "torch      " in text
    assert "extension  compilable: compiles on first use" in text
    assert "  cpu        on first use  " in text and "  foreach    available     " in text
    report = json.loads(run(python, "-m", "fastlars", "--json", cwd=tmp_path, env=env).stdout)
    assert report["fastlars"] == fastlars.__version__ and report["torch"] == torch.__version__
    assert {name: b["status"] for name, b in report["backends"].items()} == {
        "triton": "available", "cuda": "on first use" if torch.cuda.is_available() else "unavailable",
        "cpu": "on first use", "foreach": "available", "reference": "available"}
    assert not (tmp_path / "extensions").exists()  # python -m fastlars compiled nothing


def test_wheel_compiles_cpu_kernels_on_first_use_and_caches_them(dist, tmp_path):
    python = make_venv(tmp_path / "venv", dist["wheel"])
    cache = tmp_path / "extensions"
    env = clean_env(TORCH_EXTENSIONS_DIR=str(cache), FASTLARS_NO_CUDA="1")  # CPU kernels only: a GPU would add minutes

    start = time.perf_counter()
    first = run(python, "-c", STEP, "cpu", cwd=tmp_path, env=env)
    compiled_in = time.perf_counter() - start
    out = json.loads(first.stdout)
    assert out["LARS"] == out["LAMB"] == "cpu" and out["status"] == "compilable" and out["status_after"] == "jit"
    [line] = [line for line in first.stderr.splitlines() if "fastlars:" in line]  # one log line
    assert "compiled the C++ extension" in line and str(cache) in line
    [build] = cache.iterdir()
    assert build.name.startswith("fastlars_C_") and build.name.endswith("_cpu")

    start = time.perf_counter()
    second = run(python, "-c", STEP, "cpu", cwd=tmp_path, env=env)
    reused_in = time.perf_counter() - start
    out = json.loads(second.stdout)
    assert out["status"] == out["status_after"] == "jit-cached" and out["LARS"] == "cpu"
    assert "fastlars:" not in second.stderr  # nothing compiled, nothing said
    print(f"first use, compiling: {compiled_in:.1f} s; second use, cached: {reused_in:.1f} s")

    # no compiler: the cached build still loads; a fresh cache cannot be built
    hidden = clean_env(TORCH_EXTENSIONS_DIR=str(cache), FASTLARS_NO_CUDA="1", CXX=str(tmp_path / "no-such-c++"))
    assert json.loads(run(python, "-c", STEP, "cpu", cwd=tmp_path, env=hidden).stdout)["LAMB"] == "cpu"
    hidden["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "empty")
    out = json.loads(run(python, "-c", STEP, "auto", cwd=tmp_path, env=hidden).stdout)
    assert out["LARS"] == out["LAMB"] == "foreach" and "cpu" not in out["available"]
    assert out["status"] == "unavailable"
    refused = subprocess.run([str(python), "-c", "import torch, fastlars; "
                              "fastlars.LARS([torch.nn.Parameter(torch.ones(2))], lr=0.1, backend='cpu')"],
                             cwd=tmp_path, env=hidden, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "backend='cpu' is not available" in refused.stderr and "no C++ compiler: CXX=" in refused.stderr
    text = run(python, "-m", "fastlars", cwd=tmp_path, env=hidden).stdout
    assert "extension  unavailable: no C++ compiler" in text
