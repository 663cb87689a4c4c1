"""``fastlars.info()`` and ``python -m fastlars``: what a bug report needs to know about
this installation: versions, the device, and each backend with why it is or is not
available. Compiles nothing (``_extension.status()`` only looks)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["info", "render"]


def info() -> dict[str, Any]:
    """This installation as a dict of plain values (``python -m fastlars --json`` prints it)."""
    import torch

    from . import __version__, _extension, backends

    ext = _extension.status()
    return {
        "fastlars": __version__,
        "location": str(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "device": _device(torch),
        **_extension.toolchain(),
        "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),
        "extension": {"kind": ext.kind, "detail": ext.detail, "with_cuda": ext.with_cuda,
                      "module": ext.module_name, "cache_dir": ext.cache_dir},
        # in the order "auto" prefers them
        "backends": {name: _backend(record, torch, ext) for name, record in backends.BACKENDS.items()},
    }


def render(report: dict[str, Any]) -> str:
    """``info()`` as the text ``python -m fastlars`` prints."""
    ext = report["extension"]
    lines = [
        f"fastlars   {report['fastlars']} ({report['location']})",
        f"python     {report['python']} ({report['platform']})",
        f"torch      {report['torch']} (CUDA {report['torch_cuda'] or 'none'})",
        f"triton     {report['triton'] or 'not installed'}",
        f"device     {report['device']}",
        f"compiler   {report['compiler'] or 'none found'}",
        f"ninja      {report['ninja'] or 'none found'}",
        f"CUDA_HOME  {report['cuda_home'] or 'none found'} ({report['cuda_home_why']})",
        f"extension  {ext['kind']}: {ext['detail']}",
        "backends (fastest first):",
        *(f"  {name:<10} {b['status']:<13} {b['why']}" for name, b in report["backends"].items()),
    ]
    return "\n".join(lines)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device(torch) -> str:
    if not torch.cuda.is_available():
        return f"CPU, {torch.get_num_threads()} threads; no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    return (f"{torch.cuda.get_device_name()} (sm_{major}{minor}), {torch.cuda.device_count()} CUDA device(s); "
            f"CPU {torch.get_num_threads()} threads")


def _backend(record, torch, ext) -> dict[str, str]:
    """{"status": "available" | "on first use" | "unavailable", "why": ...} of one backend
    (a fastlars.backends record), without compiling the C++ extension."""
    name = record.name
    if not record.fused:  # pure PyTorch
        return {"status": "available", "why": record.summary}
    if name == "triton":
        version = _version("triton")
        if version is None:
            return {"status": "unavailable", "why": "Triton is not installed"}
        where = "" if torch.cuda.is_available() else (
            "; CUDA tensors only, and there is no CUDA device (TRITON_INTERPRET=1 runs it on the CPU, for tests)")
        return {"status": "available", "why": f"Triton {version}{where}"}
    # "cpu" and "cuda": the C++ extension
    if name == "cuda" and not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible to torch"
        return {"status": "unavailable", "why": why}
    if name == "cuda" and ext.usable and not ext.with_cuda:
        note = ext.cuda_note or "built without a CUDA toolkit or with FASTLARS_NO_CUDA=1"
        return {"status": "unavailable", "why": f"the C++ extension has no CUDA kernels: {note}"}
    status = {"compilable": "on first use"}.get(ext.kind, "available" if ext.usable else "unavailable")
    return {"status": status, "why": f"C++ extension {ext.kind}: {ext.detail}"}
