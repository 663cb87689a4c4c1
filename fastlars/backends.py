"""The optimizer backends, one record each: what the optimizers (``resolve_backend``),
``python -m fastlars``, Ghost BN's Triton path and the benchmarks ask about a backend.

A record says which device types it steps, whether it is fused (kernels that read and
write the parameters themselves), whether it is available here and why (not), and how to
reach its drivers: the ``norms``/``update`` functions of fastlars/ops that run its kernels
(imported on first use: Triton's interpreter, if any, must be chosen before
fastlars.ops is imported). Records are listed fastest first, the order ``"auto"`` tries.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import _extension

__all__ = ["Backend", "Driver", "BACKENDS", "get", "available_backends", "auto_order", "usable_on",
           "triton_runs_on", "driver"]


@dataclass(frozen=True)
class Driver:
    """The two phases of a fused step (see TrustRatioOptimizer.step): ``norms(plan, inv_scale)``
    -> (context, tensors the gate checks), then ``update(plan, context, inv_scale, ok)``."""

    norms: Callable[..., Any]
    update: Callable[..., Any]


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...] | None  # device types of the tensors it steps; None: any
    fused: bool
    auto: bool                        # whether "auto" may choose it
    probe: Callable[[], bool]         # available in this installation (may compile the C++ extension)
    summary: str                      # what it is, one line
    drivers: Callable[[], dict[str, Driver]] | None = None  # "lars"/"lamb" -> Driver; fused backends

    def available(self) -> bool:
        return self.probe()

    def why_unavailable(self) -> str:
        """Why ``available()`` is False (an empty string when it is True)."""
        if self.available():
            return ""
        if self.name in ("cpu", "cuda"):
            return _extension.why_unavailable(self.name)
        if self.name == "triton":
            return "Triton is not installed"
        return ""

    def steps(self, device_type: str) -> bool:
        """Whether it steps tensors of ``device_type`` (Triton: CPU tensors too under
        TRITON_INTERPRET=1, which runs its kernels in Python, for tests)."""
        if self.devices is None or device_type in self.devices:
            return True
        return self.name == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _extension_has(attribute: str) -> bool:
    """Whether the C++ extension has ``attribute``: prebuilt, cached, or compiled now
    (once per process; see fastlars/_extension.py)."""
    return bool(getattr(_extension.load(), attribute, False))


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_drivers() -> dict[str, Driver]:
    from .ops import lamb_step, lars_step

    return {"lars": Driver(lars_step.lars_norms, lars_step.lars_update),
            "lamb": Driver(lamb_step.lamb_norms, lamb_step.lamb_update)}


def _cpp_drivers() -> dict[str, Driver]:
    from .ops import cpp_step

    return {"lars": Driver(cpp_step.lars_norms, cpp_step.lars_update),
            "lamb": Driver(cpp_step.lamb_norms, cpp_step.lamb_update)}


# fastest first: the order "auto" tries them for a device type
BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("triton", ("cuda",), fused=True, auto=True, probe=has_triton,
            summary="fused multi-tensor Triton kernels", drivers=_triton_drivers),
    Backend("cuda", ("cuda",), fused=True, auto=True,
            probe=lambda: torch.cuda.is_available() and _extension_has("with_cuda"),
            summary="fused multi-tensor CUDA C++ kernels", drivers=_cpp_drivers),
    Backend("cpu", ("cpu",), fused=True, auto=True, probe=lambda: _extension_has("lars_update_cpu"),
            summary="fused C++ kernels (OpenMP)", drivers=_cpp_drivers),
    Backend("foreach", None, fused=False, auto=True, probe=lambda: True,
            summary="pure PyTorch, torch._foreach_* ops"),
    Backend("reference", None, fused=False, auto=False, probe=lambda: True,
            summary="pure PyTorch, one tensor at a time (the readable definition)"),
)}


def get(name: str) -> Backend:
    return BACKENDS[name]


def available_backends() -> list[str]:
    """The backends usable in this installation, fastest first.

    Where the C++ kernels were not built at install time, the first call compiles them
    (once per process, cached on disk; see fastlars/_extension.py)."""
    return [name for name, b in BACKENDS.items() if b.available()]


def auto_order(device_type: str) -> tuple[str, ...]:
    """What "auto" may pick for tensors of ``device_type``, fastest first (not probed)."""
    return tuple(name for name, b in BACKENDS.items() if b.auto and b.devices is not None and device_type in b.devices) \
        + tuple(name for name, b in BACKENDS.items() if b.auto and b.devices is None)


def usable_on(device_type: str) -> list[str]:
    """Available backends made for tensors of ``device_type`` (the benchmarks' rows)."""
    return [name for name, b in BACKENDS.items()
            if (b.devices is None or device_type in b.devices) and b.available()]


def triton_runs_on(device_type: str) -> bool:
    """Whether Triton kernels can run on tensors of ``device_type`` here (also Ghost BN's rule)."""
    return has_triton() and BACKENDS["triton"].steps(device_type)


@functools.cache
def driver(backend: str, optimizer: str) -> Driver:
    """The fused ``backend``'s driver of ``optimizer`` ("lars" or "lamb")."""
    return BACKENDS[backend].drivers()[optimizer]
