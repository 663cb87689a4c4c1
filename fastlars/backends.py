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
           "triton_runs_on", "driver", "resolve_backend", "backend_from_flags"]


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
    capturable: bool = False          # its step reads nothing on the host once its tables are built

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
            summary="fused multi-tensor Triton kernels", drivers=_triton_drivers, capturable=True),
    Backend("cuda", ("cuda",), fused=True, auto=True,
            probe=lambda: torch.cuda.is_available() and _extension_has("with_cuda"),
            summary="fused multi-tensor CUDA C++ kernels", drivers=_cpp_drivers, capturable=True),
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
    made_for = [name for name, b in BACKENDS.items() if b.auto and b.devices is not None and device_type in b.devices]
    return (*made_for, *(name for name, b in BACKENDS.items() if b.auto and b.devices is None))


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


_KNOWN_BACKENDS = ("auto", *BACKENDS)


def resolve_backend(backend: str, device: torch.device | None) -> str:
    """The backend to use for parameters on ``device`` (None: no parameters yet).

    Probes only the backends in question: the "cpu" probe may compile the C++ kernels,
    which backend="foreach" (or "auto" on CUDA tensors with Triton) must not wait for."""
    if not isinstance(backend, str) or backend not in _KNOWN_BACKENDS:
        raise ValueError(
            f"backend={backend!r} is unknown; choose 'auto' or one of the available backends {available_backends()}"
        )
    device_type = device.type if device is not None else "cpu"
    if backend == "auto":
        return next(b for b in auto_order(device_type) if get(b).available())
    record = get(backend)
    if not record.available():
        why = record.why_unavailable()
        raise ValueError(f"backend={backend!r} is not available in this installation; "
                         f"available backends: {available_backends()}{'; ' + why if why else ''}")
    if not record.steps(device_type):
        needs = " or ".join(d.upper() for d in record.devices)
        hint = " (CPU tensors run the kernels only under TRITON_INTERPRET=1, for tests)" if backend == "triton" else ""
        raise ValueError(f"backend={backend!r} needs {needs} tensors, got parameters on {device_type}{hint}")
    return backend


def backend_from_flags(backend: str, foreach: bool | None, fused: bool | None,
                       device: torch.device | None) -> str:
    """torch's ``foreach=``/``fused=`` flags as the backend they ask for on ``device``.

    As torch.optim: ``foreach=True`` is the multi-tensor implementation, ``fused=True`` the
    fused kernels of the device (``"cpu"``; ``"triton"`` or ``"cuda"``), ``False`` rules
    that implementation out of ``"auto"`` (both False: the one-tensor-at-a-time
    ``"reference"``), None leaves the choice to ``"auto"``. An explicit ``backend`` must
    agree with the flags.
    """
    for name, flag in (("foreach", foreach), ("fused", fused)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name} must be None or a bool, got {type(flag).__name__}")
    if foreach and fused:
        raise ValueError("`fused` and `foreach` cannot be `True` together.")
    if backend != "auto":
        if (foreach and backend != "foreach") or (foreach is False and backend == "foreach") or \
                (fused and not get(backend).fused) or (fused is False and get(backend).fused):
            raise ValueError(f"backend={backend!r} contradicts foreach={foreach}, fused={fused}; "
                             "pass either a backend or the torch.optim flags")
        return backend
    if foreach:
        return "foreach"
    if foreach is None and fused is None:
        return "auto"
    device_type = device.type if device is not None else "cpu"
    available = available_backends()
    candidates = [b for b in (*auto_order(device_type), "reference") if b in available]
    if fused:
        candidates = [b for b in candidates if get(b).fused]
        if not candidates:
            # torch.optim raises this RuntimeError, at the step that meets such parameters
            supported = [t for t in ("cuda", "cpu") if any(get(b).fused for b in auto_order(t)
                                                           if b in available)]
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                               f"supported devices: {supported} but the params are on {device_type} "
                               f"(available backends: {available})")
    candidates = [b for b in candidates if not (fused is False and get(b).fused)
                  and not (foreach is False and b == "foreach")]
    return candidates[0]
