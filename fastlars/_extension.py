"""Where the C++/CUDA kernels of the ``"cpu"`` and ``"cuda"`` backends come from.

In order:

1. ``fastlars._C``, built at install time when torch was importable in the build
   (``pip install --no-build-isolation``, as the Makefile does);
2. else a just-in-time build of the ``csrc/`` sources shipped inside the package
   (``torch.utils.cpp_extension.load``) on first use of a backend that needs it,
   cached in torch's extensions directory (``TORCH_EXTENSIONS_DIR``) under a name
   that carries the fastlars, Python, torch and CUDA versions, so that caches of
   different installations do not collide;
3. else nothing: the ``"cpu"``/``"cuda"`` backends report themselves unavailable
   with the reason and ``backend="auto"`` falls back.

``load()`` decides once per process (a build that failed is not retried on every call); ``status()``
says what ``load()`` did or would do without compiling anything (``python -m fastlars`` shows it).
``FASTLARS_NO_EXTENSION=1`` turns the extension off, ``FASTLARS_NO_CUDA=1`` leaves the CUDA kernels out.

This module imports only the standard library at module level: setup.py executes
it to read the source list and the compiler flags, so that the install-time and the
just-in-time build compile the same thing. The CUDA toolkit is fastlars/_cuda_toolkit.py's.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import re
import shlex
import shutil
import sysconfig
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._cuda_toolkit import CudaToolkit

logger = logging.getLogger("fastlars")

_PACKAGE = Path(__file__).resolve().parent
# csrc/ is installed inside the package (setup.py maps it to fastlars/csrc); a source
# checkout that was not built has it beside the package
_CSRC_CANDIDATES = (_PACKAGE / "csrc", _PACKAGE.parent / "csrc")
_LIB_SUFFIX = ".pyd" if os.name == "nt" else ".so"
_HOW_TO_GET_IT = ("install a build that carries the kernels (`pip install --no-build-isolation .` with torch "
                  "installed and a compiler present), or make compiling on first use possible (a C++ compiler "
                  "with OpenMP; nvcc and CUDA_HOME for 'cuda'); `python -m fastlars` shows the details")


def flag(name: str) -> bool:
    """An on/off environment setting (FASTLARS_NO_EXTENSION, FASTLARS_NO_CUDA)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------
# what to compile (shared with setup.py)

def source_names(csrc: Path) -> list[str]:
    """The sources listed in ``csrc/sources.txt`` (the one list: setup.py, CMakeLists.txt
    and the just-in-time build read it), relative to ``csrc``."""
    listing = csrc / "sources.txt"
    lines = listing.read_text().splitlines() if listing.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def compile_flags(with_cuda: bool) -> dict[str, list[str]]:
    """Compiler and linker flags of the extension, with or without its CUDA kernels."""
    defines = ["-DFASTLARS_WITH_CUDA"] if with_cuda else []
    return {"cxx": ["-O3", "-fopenmp", "-fno-math-errno", *defines], "nvcc": ["-O3", *defines], "ld": ["-fopenmp"]}


# ----------------------------------------------------------------------------
# compiling with the CUDA toolkit that fastlars/_cuda_toolkit.py finds

@contextlib.contextmanager
def building_with(toolkit: CudaToolkit, cpp_extension):
    """torch.utils.cpp_extension compiling with ``toolkit``: torch fixes its CUDA_HOME when it
    is first imported (from nvcc on PATH, wrong where that is a wrapper), so it is replaced
    here, and CUDA_HOME set for the compiler's processes, until the block ends."""
    saved = cpp_extension.CUDA_HOME
    cpp_extension.CUDA_HOME = toolkit.home
    try:
        with _environment({"CUDA_HOME": toolkit.home} if toolkit.home else {}):
            yield
    finally:
        cpp_extension.CUDA_HOME = saved


# ----------------------------------------------------------------------------
# the outcome

@dataclass(frozen=True)
class Status:
    """What the extension is in this process, or would be after ``load()``.

    ``kind`` is one of ``"prebuilt"`` (fastlars._C, built at install time),
    ``"jit"`` (compiled in this process), ``"jit-cached"`` (an earlier compile,
    reused), ``"compilable"`` (not compiled yet: ``load()`` will),
    ``"unavailable"`` (no compiler, ninja, ..., or the compile failed) and
    ``"disabled"`` (FASTLARS_NO_EXTENSION=1). ``detail`` says why, in words.
    """

    kind: str
    detail: str
    with_cuda: bool = False
    # why the CUDA kernels are (or will be) left out; "" when they are in
    cuda_note: str = ""
    module_name: str = ""
    cache_dir: str = ""

    @property
    def usable(self) -> bool:
        return self.kind in ("prebuilt", "jit", "jit-cached", "compilable")


_lock = threading.Lock()
_loaded: tuple[ModuleType | None, Status] | None = None  # load()'s result, decided once per process


def load() -> ModuleType | None:
    """The extension module (prebuilt, cached or compiled now), or None if it cannot be had.

    Compiles at most once per process, holding a lock, and remembers a failure.
    """
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded[0]


def status() -> Status:
    """The extension's status; compiles nothing (a prebuilt module is imported to look at it)."""
    if _loaded is not None:
        return _loaded[1]
    if flag("FASTLARS_NO_EXTENSION"):
        return Status("disabled", "turned off by FASTLARS_NO_EXTENSION=1")
    module, error = _prebuilt()
    if module is not None:
        return _prebuilt_status(module)
    plan = _jit_plan()
    if plan.library.exists():
        return replace(plan.status, kind="jit-cached", detail=f"compiled earlier, cached in {plan.build_dir}")
    if plan.problem:
        return replace(plan.status, kind="unavailable", detail=_prefixed(error, plan.problem))
    return replace(plan.status, kind="compilable",
                   detail=f"compiles on first use (about a minute{'; longer with CUDA' if plan.with_cuda else ''}) "
                          f"into {plan.build_dir}")


def why_unavailable(backend: str) -> str:
    """Why the extension cannot serve ``backend`` ("cpu" or "cuda"), and what to do; "" if it can."""
    import torch

    module, st = load(), status()
    if module is None:
        return f"the C++ extension is {st.kind}: {st.detail}; {_HOW_TO_GET_IT}"
    if backend == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    if backend == "cuda" and not getattr(module, "with_cuda", False):
        note = st.cuda_note or "built without a CUDA toolkit or with FASTLARS_NO_CUDA=1"
        return f"the C++ extension ({st.kind}) has no CUDA kernels: {note}"
    return ""


def _prefixed(error: str, problem: str) -> str:
    return f"{error}; {problem}" if error else problem


def _prebuilt_status(module: ModuleType) -> Status:
    return Status("prebuilt", f"built at install time ({Path(module.__file__).name})",
                  with_cuda=bool(getattr(module, "with_cuda", False)), module_name="fastlars._C")


def _load() -> tuple[ModuleType | None, Status]:
    if flag("FASTLARS_NO_EXTENSION"):
        return None, status()
    module, error = _prebuilt()
    if module is not None:
        return module, _prebuilt_status(module)
    plan = _jit_plan()
    if plan.problem:
        # no compiler (ninja, headers, ...): an earlier build can still be used
        if plan.library.exists():
            return _import_cached(plan)
        return None, replace(plan.status, kind="unavailable", detail=_prefixed(error, plan.problem))
    return _compile(plan)


def _prebuilt() -> tuple[ModuleType | None, str]:
    """fastlars._C if it was built at install time and loads, else the reason it does not."""
    name = f"{__package__}._C"
    try:
        return importlib.import_module(name), ""
    except (ImportError, OSError) as e:  # e.g. built against another torch
        if isinstance(e, ModuleNotFoundError) and e.name == name:
            return None, ""  # a pure-Python install: not an error
        return None, f"the prebuilt {name} does not load ({e})"


# ----------------------------------------------------------------------------
# just-in-time build

@dataclass(frozen=True)
class _Plan:
    name: str
    build_dir: Path
    csrc: Path | None
    sources: list[str]
    with_cuda: bool
    cuda_note: str
    toolkit: CudaToolkit | None  # the one the CUDA kernels compile with
    env: dict[str, str]  # set while compiling (CXX when `c++` is missing, PATH for pip's ninja)
    problem: str  # why it cannot be compiled here; "" if it can

    @property
    def library(self) -> Path:
        return self.build_dir / f"{self.name}{_LIB_SUFFIX}"

    @property
    def status(self) -> Status:
        return Status("", "", with_cuda=self.with_cuda, cuda_note=self.cuda_note, module_name=self.name,
                      cache_dir=str(self.build_dir))


def _jit_plan() -> _Plan:
    import torch

    from . import __version__

    csrc = next((c for c in _CSRC_CANDIDATES if (c / "sources.txt").exists()), None)
    cpp_extension_error = ""
    try:
        cpp_extension = _cpp_extension()
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    except ImportError as e:
        cpp_extension_error = f"torch.utils.cpp_extension cannot be imported ({e}): pip install setuptools"
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")

    cuda_note, toolkit = _cuda_note(torch)
    with_cuda = not cuda_note
    tag = f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu"
    major, minor = torch.__version__.split(".")[:2]
    # one build per fastlars/Python/torch/CUDA combination: TORCH_EXTENSIONS_DIR is shared by all of them
    name = re.sub(r"\W", "_", f"fastlars_C_{__version__}_py{sysconfig.get_python_version().replace('.', '')}"
                              f"_torch{major}_{minor}_{tag}")
    sources = [] if csrc is None else [str(csrc / s) for s in source_names(csrc)
                                       if with_cuda or not s.endswith(".cu")]
    env, problem = _toolchain_env()
    if csrc is None or not sources:
        problem = "the package carries no C++ sources (csrc/sources.txt)"
    problem = cpp_extension_error or problem
    if not problem and not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        problem = (f"the Python headers are missing (no Python.h in {sysconfig.get_paths()['include']}): "
                   "install your Python's development package (e.g. python3-dev)")
    return _Plan(name, Path(root) / name, csrc, sources, with_cuda, cuda_note, toolkit, env, problem)


def _cuda_note(torch) -> tuple[str, CudaToolkit | None]:
    """Why a build here leaves the CUDA kernels out ("" if it compiles them), and the toolkit."""
    if flag("FASTLARS_NO_CUDA"):
        return "FASTLARS_NO_CUDA=1", None
    if torch.version.cuda is None:
        return "torch was built without CUDA", None
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch", None
    from ._cuda_toolkit import cuda_toolkit

    toolkit = cuda_toolkit()
    return ("" if toolkit.home else str(toolkit)), toolkit


def _cpp_extension():
    """torch.utils.cpp_extension (it imports setuptools), without its warning that a CUDA
    toolkit is found but no GPU: that matters only to a CUDA build, which _cuda_note rules out."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    return cpp_extension


def toolchain() -> dict[str, str | None]:
    """The C++ compiler, ninja and CUDA toolkit a build would use (None: missing), and why that toolkit."""
    env, _ = _toolchain_env()
    from ._cuda_toolkit import cuda_toolkit

    cxx = env.get("CXX") or os.environ.get("CXX") or "c++"
    toolkit = cuda_toolkit()
    return {"compiler": shutil.which(shlex.split(cxx)[0]) if cxx.strip() else None,
            "ninja": shutil.which("ninja", path=env.get("PATH", os.environ.get("PATH", ""))),
            "cuda_home": toolkit.home, "cuda_home_why": toolkit.why}


def _toolchain_env() -> tuple[dict[str, str], str]:
    """The environment a build needs beyond the current one, and what is missing ("" if nothing).

    torch compiles with $CXX, else `c++`, and drives ninja from PATH.
    """
    env: dict[str, str] = {}
    cxx = os.environ.get("CXX")
    if cxx is not None:
        if not cxx.strip() or shutil.which(shlex.split(cxx)[0]) is None:
            return env, f"no C++ compiler: CXX={cxx!r} is not an executable"
    else:
        found = next((name for name in ("c++", "g++", "clang++") if shutil.which(name)), None)
        if found is None:
            return env, "no C++ compiler (CXX is unset and there is no c++, g++ or clang++ on PATH)"
        if found != "c++":
            env["CXX"] = found
    if shutil.which("ninja") is None:
        try:  # pip's ninja package, in a venv that is not activated
            import ninja

            if shutil.which("ninja", path=ninja.BIN_DIR) is None:
                raise ImportError
            env["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
        except (ImportError, AttributeError):
            return env, "ninja is missing: pip install ninja"
    return env, ""


@contextlib.contextmanager
def _environment(changes: dict[str, str]):
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _compile(plan: _Plan) -> tuple[ModuleType | None, Status]:
    cpp_extension = _cpp_extension()
    flags = compile_flags(plan.with_cuda)
    before = plan.library.stat().st_mtime_ns if plan.library.exists() else None
    start = time.perf_counter()
    plan.build_dir.mkdir(parents=True, exist_ok=True)
    try:
        toolkit = building_with(plan.toolkit, cpp_extension) if plan.with_cuda else contextlib.nullcontext()
        with _environment(plan.env), toolkit:
            # ninja rebuilds only what changed (sources, torch headers), so a cached build loads in a second
            module = cpp_extension.load(plan.name, plan.sources, extra_cflags=flags["cxx"],
                                        extra_cuda_cflags=flags["nvcc"], extra_ldflags=flags["ld"],
                                        extra_include_paths=[str(plan.csrc)], build_directory=str(plan.build_dir),
                                        with_cuda=plan.with_cuda)
    except Exception as e:  # a compiler error, a missing OpenMP, ...: remember it, fall back
        seconds = time.perf_counter() - start
        log = plan.build_dir / "fastlars_build_error.log"
        log.write_text(str(e))
        lines = str(e).splitlines() or [type(e).__name__]
        first = next((line for line in lines if "error:" in line), lines[0]).strip()
        detail = f"compiling the kernels failed ({first[:300]}; full output in {log})"
        logger.warning("fastlars: compiling the C++ kernels failed after %.1f s; backends 'cpu'/'cuda' are "
                       "unavailable: %s", seconds, detail)
        return None, replace(plan.status, kind="unavailable", detail=detail)
    seconds = time.perf_counter() - start
    if before is not None and plan.library.stat().st_mtime_ns == before:
        logger.debug("fastlars: reused the C++ kernels cached in %s (%.1f s)", plan.build_dir, seconds)
        return module, replace(plan.status, kind="jit-cached", detail=f"compiled earlier, cached in {plan.build_dir}")
    what = f"CPU and CUDA kernels, {plan.toolkit}" if plan.with_cuda else f"CPU kernels; no CUDA kernels: {plan.cuda_note}"
    logger.warning("fastlars: compiled the C++ extension (%s) in %.1f s on first use, cached in %s",
                   what, seconds, plan.build_dir)
    return module, replace(plan.status, kind="jit", detail=f"compiled in this process in {seconds:.1f} s, "
                                                           f"cached in {plan.build_dir}")


def _import_cached(plan: _Plan) -> tuple[ModuleType | None, Status]:
    """An earlier build, loaded without a compiler (which torch's load() would want)."""
    try:
        spec = importlib.util.spec_from_file_location(plan.name, plan.library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as e:
        return None, replace(plan.status, kind="unavailable",
                             detail=f"the cached build {plan.library} does not load ({e}) and {plan.problem}")
    return module, replace(plan.status, kind="jit-cached",
                           detail=f"compiled earlier, cached in {plan.build_dir} (no compiler now: {plan.problem})")
