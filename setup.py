"""Build script: the Python package, plus the C++/CUDA extension when csrc/ has sources.

Metadata lives in pyproject.toml. The extension's sources are the one list in
csrc/sources.txt (CMakeLists.txt reads the same file). With no sources listed, or
with FASTLARS_NO_EXTENSION=1, the package installs as pure Python and every
backend that needs the extension reports itself unavailable. FASTLARS_NO_CUDA=1
builds the CPU kernels only. CUDA_HOME must name the toolkit (the Makefile sets
/usr/local/cuda: torch guesses wrong when `nvcc` on PATH is a wrapper script), and
TORCH_CUDA_ARCH_LIST the GPUs to compile for.
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def extension_sources() -> list[str]:
    listing = ROOT / "csrc" / "sources.txt"
    lines = listing.read_text().splitlines() if listing.exists() else []
    return [f"csrc/{line.strip()}" for line in lines if line.strip() and not line.startswith("#")]


def extensions():
    sources = extension_sources()
    if not sources or os.environ.get("FASTLARS_NO_EXTENSION") == "1":
        return {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    import torch

    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                and os.environ.get("FASTLARS_NO_CUDA") != "1" and any(s.endswith(".cu") for s in sources))
    if not use_cuda:
        sources = [s for s in sources if not s.endswith(".cu")]
    make = CUDAExtension if use_cuda else CppExtension
    defines = ["-DFASTLARS_WITH_CUDA"] if use_cuda else []
    module = make("fastlars._C", sources, include_dirs=[str(ROOT / "csrc")],
                  extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-math-errno", *defines],
                                      "nvcc": ["-O3", *defines]},
                  extra_link_args=["-fopenmp"])
    return {"ext_modules": [module], "cmdclass": {"build_ext": BuildExtension}}


setup(**extensions())
