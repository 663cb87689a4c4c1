"""Build script: the Python package with the kernel sources (csrc/, installed as
fastlars/csrc), plus the compiled C++/CUDA extension when torch is importable here.

Metadata lives in pyproject.toml. With pip's default build isolation torch is not
importable (pyproject.toml does not list it: an isolated build would download
several GB), so the package installs as pure Python and fastlars compiles the
kernels on first use of backend="cpu"/"cuda" (fastlars/_extension.py). Built with
`--no-build-isolation` against the installed torch (as the Makefile does), the
extension is compiled now and the wheel carries it.

The sources are the one list in csrc/sources.txt and the flags are those of the
just-in-time build (both read through fastlars/_extension.py; CMakeLists.txt reads
the same list). FASTLARS_NO_EXTENSION=1 skips the extension, FASTLARS_NO_CUDA=1
builds the CPU kernels only. The CUDA toolkit is the one fastlars/_cuda_toolkit.py's
cuda_toolkit() chooses (CUDA_HOME if it is a toolkit, else /usr/local/cuda, else the
one behind `nvcc` on PATH, asked of nvcc itself: torch's own guess is wrong where that
nvcc is a wrapper script); the build prints which and why. TORCH_CUDA_ARCH_LIST names
the GPUs to compile for.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def standalone(name):
    """fastlars/<name>.py, executed on its own (the package imports torch)."""
    spec = importlib.util.spec_from_file_location(f"_fastlars_build{name}", ROOT / "fastlars" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def extensions():
    config = standalone("_extension")
    sources = [f"csrc/{name}" for name in config.source_names(ROOT / "csrc")]
    if not sources or config.flag("FASTLARS_NO_EXTENSION"):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastlars: torch is not importable in this build environment, so the C++/CUDA kernels are not "
              "compiled now; fastlars compiles them on first use (or build with --no-build-isolation)",
              file=sys.stderr)
        return {}

    use_cuda = (torch.version.cuda is not None and not config.flag("FASTLARS_NO_CUDA")
                and any(s.endswith(".cu") for s in sources))
    if use_cuda:
        toolkit = standalone("_cuda_toolkit").cuda_toolkit()
        print(f"fastlars: {toolkit}", file=sys.stderr)
        use_cuda = toolkit.home is not None
        # torch fixed its CUDA_HOME when cpp_extension was imported; BuildExtension reads it later
        # (the build runs after setup() returns from here), so it is set for the whole process
        cpp_extension.CUDA_HOME = toolkit.home
        if toolkit.home:
            os.environ["CUDA_HOME"] = toolkit.home
    if not use_cuda:
        sources = [s for s in sources if not s.endswith(".cu")]
    flags = config.compile_flags(use_cuda)
    make = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    module = make("fastlars._C", sources, include_dirs=[str(ROOT / "csrc")],
                  extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]}, extra_link_args=flags["ld"])
    return {"ext_modules": [module], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    # csrc/ travels inside the package, for the just-in-time build
    packages=[*find_packages(include=["fastlars*"]), "fastlars.csrc"],
    package_dir={"fastlars.csrc": "csrc"},
    package_data={"fastlars.csrc": ["sources.txt", "*.h", "*.cpp", "*.cu", "README.md"]},
    **extensions(),
)
