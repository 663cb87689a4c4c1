"""Which CUDA toolkit a build compiles with, by one rule (``find_cuda_toolkit``): setup.py,
the just-in-time build (fastlars/_extension.py), ``python -m fastlars --cuda-home`` and
bench/gpu_check.sh ask here.

This module imports only the standard library: setup.py executes it on its own, before
torch or the package can be imported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CUDA_DEFAULT_HOME = "/usr/local/cuda"
# where a toolkit keeps libcudart: Linux (lib64/, lib/, targets/<arch>/lib/, as in conda's), Windows
_CUDART_PATTERNS = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*", "lib/x64/cudart.lib")


@dataclass(frozen=True)
class CudaToolkit:
    """The CUDA toolkit a build compiles with: ``home`` (None if none was found) and ``why``
    it is that one, with each place looked at first and why it was passed over."""

    home: str | None
    why: str

    def __str__(self) -> str:
        return f"CUDA toolkit {self.home}: {self.why}" if self.home else f"no CUDA toolkit: {self.why}"


def toolkit_problem(home: str) -> str:
    """Why ``home`` is not a CUDA toolkit a build can use ("" if it is): it needs nvcc, the
    runtime's headers and libcudart (torch compiles with ``home/bin/nvcc`` and links ``-lcudart``)."""
    root = Path(home)
    if not root.is_dir():
        return f"{home} is not a directory"
    nvcc = "bin/nvcc.exe" if os.name == "nt" else "bin/nvcc"
    missing = [f for f in (nvcc, "include/cuda_runtime.h") if not (root / f).is_file()]
    if not any(next(root.glob(pattern), None) for pattern in _CUDART_PATTERNS):
        missing.append("libcudart (in lib64/, lib/ or targets/*/lib/)")
    return f"{home} has no {', no '.join(missing)}" if missing else ""


def _toolkit_behind_nvcc(nvcc: str) -> tuple[list[str], str]:
    """The toolkit folders that ``nvcc`` itself names, most direct first, or why none.

    The `nvcc` on PATH may be a wrapper script that execs the real one elsewhere, so its
    own path says nothing: its dry run prints the toolkit's root (``TOP=``) and include
    folders. Its resolved path's grandparent comes last, for an nvcc that prints neither.
    """
    try:
        with tempfile.TemporaryDirectory() as scratch:  # a dry run compiles nothing; the file need not exist
            run = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu", "-o", "probe.o"], cwd=scratch,
                                 capture_output=True, text=True, timeout=60)
        text = run.stdout + run.stderr
    except (OSError, subprocess.SubprocessError) as e:
        text = ""
        failure = f"`{nvcc} --dryrun` failed ({e})"
    else:
        failure = "" if "#$ " in text else f"`{nvcc} --dryrun` printed no settings (exit {run.returncode})"
    found = []
    for top in re.findall(r"^#\$ TOP=(.+?)\s*$", text, re.M):
        found.append(top.strip("\"'"))
    for include in re.findall(r"-I\"?([^\"\s]+/include)\b", text):
        include = Path(os.path.normpath(include))
        # <home>/include, or <home>/targets/<arch>/include
        found.append(str(include.parent.parent.parent if include.parent.parent.name == "targets" else include.parent))
    found.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    homes = list(dict.fromkeys(os.path.realpath(h) for h in found))  # in order, once each
    return homes, failure


def find_cuda_toolkit(environ: dict[str, str] | None = None) -> CudaToolkit:
    """The CUDA toolkit to build with, by one rule:

    1. ``CUDA_HOME`` (else ``CUDA_PATH``) if set and a toolkit (``toolkit_problem``);
    2. else ``/usr/local/cuda`` if a toolkit;
    3. else the toolkit behind the ``nvcc`` on PATH, as nvcc itself reports it (a wrapper
       script's own folder is not the toolkit: torch's guess, ``dirname(dirname(nvcc))``,
       fails there), checked the same way.

    A place passed over is named with the reason in ``why``. ``environ`` defaults to
    ``os.environ`` (CUDA_HOME, CUDA_PATH, PATH are read).
    """
    environ = os.environ if environ is None else environ
    passed_over = []

    def chosen(home: str, why: str) -> CudaToolkit:
        return CudaToolkit(home, "; ".join([why, *passed_over]))

    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = environ.get(variable, "").strip()
        if home:
            problem = toolkit_problem(home)
            if not problem:
                return chosen(home, f"{variable} is set")
            passed_over.append(f"{variable} ignored: {problem}")
    problem = toolkit_problem(CUDA_DEFAULT_HOME)
    if not problem:
        return chosen(CUDA_DEFAULT_HOME, "the default location")
    passed_over.append(f"not the default: {problem}")
    nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
    if nvcc is None:
        passed_over.append("no nvcc on PATH")
        return CudaToolkit(None, "; ".join(passed_over) + ": set CUDA_HOME to the toolkit")
    homes, failure = _toolkit_behind_nvcc(nvcc)
    if failure:
        passed_over.append(failure)
    for home in homes:
        problem = toolkit_problem(home)
        if not problem:
            return chosen(home, f"the toolkit behind {nvcc}, as `nvcc --dryrun` reports it")
        passed_over.append(f"behind {nvcc}: {problem}")
    return CudaToolkit(None, "; ".join(passed_over) + ": set CUDA_HOME to the toolkit")


_toolkits: dict[tuple[str, ...], CudaToolkit] = {}


def cuda_toolkit() -> CudaToolkit:
    """``find_cuda_toolkit()`` for this process's environment, looked up once per environment."""
    key = tuple(os.environ.get(k, "") for k in ("CUDA_HOME", "CUDA_PATH", "PATH"))
    if key not in _toolkits:
        _toolkits[key] = find_cuda_toolkit()
    return _toolkits[key]
