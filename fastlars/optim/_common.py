"""What LARS and LAMB share: argument checks, backend choice, bucketing, the
non-finite gate, master weights and a state_dict that keeps fp32 state.

The maths of each optimizer lives in its own module (``lars.py``, ``lamb.py``);
this module holds no formula of either.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _extension
from . import _sharded
from ..ops._tables import _dense as _layout_is_dense  # no Triton, no extension: safe to import early

__all__ = ["available_backends", "param_groups"]

# Backends in the order "auto" prefers them. Later issues register "triton" and
# "cuda" here; a backend is available when its probe returns True.
def _extension_has(attribute: str) -> bool:
    """Whether the C++ extension has ``attribute``: prebuilt, cached, or compiled now
    (once per process; see fastlars/_extension.py)."""
    return bool(getattr(_extension.load(), attribute, False))


_BACKEND_PROBES: dict[str, Callable[[], bool]] = {
    "triton": lambda: importlib.util.find_spec("triton") is not None,
    "cuda": lambda: torch.cuda.is_available() and _extension_has("with_cuda"),
    "cpu": lambda: _extension_has("lars_update_cpu"),
    "foreach": lambda: True,
    "reference": lambda: True,
}
# what "auto" may pick for tensors of each device type, fastest first
_AUTO_ORDER = {"cuda": ("triton", "cuda", "foreach"), "cpu": ("cpu", "foreach")}
_KNOWN_BACKENDS = ("auto", "triton", "cuda", "cpu", "foreach", "reference")
FUSED_BACKENDS = ("triton", "cuda", "cpu")


def available_backends() -> list[str]:
    """The backends usable in this installation, fastest first.

    Where the C++ kernels were not built at install time, the first call compiles them
    (once per process, cached on disk; see fastlars/_extension.py)."""
    return [name for name, probe in _BACKEND_PROBES.items() if probe()]


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
        return next(b for b in _AUTO_ORDER.get(device_type, ("foreach",)) + ("foreach",) if _BACKEND_PROBES[b]())
    if not _BACKEND_PROBES[backend]():
        hint = f"; {_extension.why_unavailable(backend)}" if backend in ("cpu", "cuda") else ""
        raise ValueError(f"backend={backend!r} is not available in this installation; "
                         f"available backends: {available_backends()}{hint}")
    if backend == "cpu" and device_type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got parameters on {device_type}")
    if backend == "cuda" and device_type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got parameters on {device_type}")
    if backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got parameters on {device_type} "
                         "(CPU tensors run the kernels only under TRITON_INTERPRET=1, for tests)")
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
                (fused and backend not in FUSED_BACKENDS) or (fused is False and backend in FUSED_BACKENDS):
            raise ValueError(f"backend={backend!r} contradicts foreach={foreach}, fused={fused}; "
                             "pass either a backend or the torch.optim flags")
        return backend
    if foreach:
        return "foreach"
    if foreach is None and fused is None:
        return "auto"
    device_type = device.type if device is not None else "cpu"
    available = available_backends()
    candidates = [b for b in _AUTO_ORDER.get(device_type, ()) + ("foreach", "reference") if b in available]
    if fused:
        candidates = [b for b in candidates if b in FUSED_BACKENDS]
        if not candidates:
            # torch.optim raises this RuntimeError, at the step that meets such parameters
            supported = [t for t, order in _AUTO_ORDER.items() if any(b in available for b in order
                                                                      if b in FUSED_BACKENDS)]
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                               f"supported devices: {supported} but the params are on {device_type} "
                               f"(available backends: {available})")
    candidates = [b for b in candidates if not (fused is False and b in FUSED_BACKENDS)
                  and not (foreach is False and b == "foreach")]
    return candidates[0]


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    exclude: Callable[[str, Tensor], bool] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """The two usual parameter groups of large-batch training.

    Parameters with ``ndim <= 1`` (biases, norm-layer weights) and those for which
    ``exclude(name, param)`` returns True get ``weight_decay=0`` and
    ``trust_ratio=False``; every other trainable parameter gets ``weight_decay``
    and ``trust_ratio=True`` (MLPerf / Goyal et al. practice). Extra keyword
    arguments (e.g. ``lr``) are copied into both groups. Empty groups are dropped.
    """
    adapted: list[Tensor] = []
    excluded: list[Tensor] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or (exclude is not None and exclude(name, param)):
            excluded.append(param)
        else:
            adapted.append(param)
    groups = [
        {"params": adapted, "weight_decay": weight_decay, "trust_ratio": True, **group_options},
        {"params": excluded, "weight_decay": 0.0, "trust_ratio": False, **group_options},
    ]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------
# argument checks

def _describe(group_index: int, position: int, p: Tensor) -> str:
    return f"param_groups[{group_index}]['params'][{position}] (shape {tuple(p.shape)}, {p.dtype}, {p.device})"


def check_number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                 high_open: bool = False, where: str = "", label: str | None = None) -> None:
    """Raise unless ``value`` is a finite number with ``low <= value <= high`` (``< high`` if high_open).

    The message starts as torch.optim's (``Invalid <label>: <value>``; label defaults to
    ``"<name> value"``) so that code matching torch's errors matches ours.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element{where}, got shape {tuple(value.shape)}")
        value = value.item()  # argument check at construction / group validation, not per element
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}{where} must be a number, got {type(value).__name__}")
    upper_ok = value < high if high_open else value <= high
    if not math.isfinite(value) or not (value >= low and upper_ok):
        bracket = ")" if high_open else "]"
        raise ValueError(f"Invalid {label or name + ' value'}{where}: {value} "
                         f"(expected {name} in [{low}, {high}{bracket})")


def scalar_lr(lr: float | Tensor) -> float | Tensor:
    """A one-element lr tensor of any shape ((1,), (1, 1)) as a 0-d view of it, which
    broadcasts like a number (a scheduler's in-place updates still reach it)."""
    return lr.reshape(()) if isinstance(lr, Tensor) and lr.dim() else lr


def check_flag(name: str, value: Any, where: str = "") -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}{where} must be a bool, got {type(value).__name__}")


@dataclass
class Bucket:
    """Parameters of one param group that share a dtype (a group has one device).

    ``positions`` index ``group['params']`` so that errors can name a parameter.
    ``compute_dtype`` is the dtype of the state and of the arithmetic: float32,
    or float64 for float64 parameters.
    """

    group_index: int
    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    positions: list[int]
    states: list[dict[str, Any]]
    compute_dtype: torch.dtype
    # fp32 tensors the update reads and writes: master weights, the parameters
    # themselves (fp32/fp64), or fp32 copies of low-precision parameters.
    weights: list[Tensor] = field(default_factory=list)
    # per parameter: its global norm is a sum over ranks (a Shard-placed DTensor)
    sharded: list[bool] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def low_precision(self) -> bool:
        return self.params[0].dtype != self.compute_dtype


# On the CPU a foreach op sweeps its whole tensor list before the next op starts,
# so a sequence of ops streams the bucket through memory once per op. Running the
# sequence on slices of about this many elements keeps the slice in cache.
CPU_SLICE_ELEMENTS = 1 << 18  # 1 MiB of fp32 per tensor list


def cache_sized_slices(b: Bucket, per_tensor: Tensor | None) -> Iterator[tuple[Bucket, Tensor | None]]:
    """Split a CPU bucket (and a per-tensor vector beside it) into cache-sized slices.

    Other devices get the whole bucket: there each foreach op is one launch.
    """
    if b.device.type != "cpu":
        yield b, per_tensor
        return
    start, elements = 0, 0
    for i, p in enumerate(b.params):
        elements += p.numel()
        if elements >= CPU_SLICE_ELEMENTS or i == len(b.params) - 1:
            s = slice(start, i + 1)
            yield (replace(b, params=b.params[s], grads=b.grads[s], positions=b.positions[s],
                           states=b.states[s], weights=b.weights[s]),
                   None if per_tensor is None else per_tensor[s])
            start, elements = i + 1, 0


def is_capturing(device: torch.device) -> bool:
    """Whether work for ``device`` is being captured into a CUDA graph now (one home for
    the check, so that CPU tests can stand in a capture by replacing it)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def state_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


# What torch.optim.Optimizer.__getstate__ leaves out (it carries defaults, state and
# param_groups only) but a deepcopied or unpickled optimizer needs to step: the
# optimizer-wide settings and the skip counter. Launch caches are rebuilt, not copied.
_SETTINGS = {"_backend_request": ("auto", None, None), "backend": None, "_backend_device": None,
             "master_weights": False, "skip_nonfinite": False, "capturable": False, "_skipped_steps": 0}


class TrustRatioOptimizer(Optimizer):
    """Base of LARS and LAMB: everything but the maths.

    Subclasses define ``_validate_group(group, where, in_step)`` and
    ``_update(buckets, norms, inv_scale, ok)`` (the step itself), ``_state_keys_for(group)``
    and ``_new_state``.
    """

    _kernel_prefix = ""  # "lars" / "lamb": names the fused drivers' functions
    # GradScaler hands us `grad_scale` and `found_inf` tensors instead of syncing
    # on found_inf itself (the contract torch's fused Adam uses); see `step`.
    _step_supports_amp_scaling = True

    # Class-level defaults. Under torch.compile, a fused driver that ran after a graph break
    # found no `_mesh` when step() had created it (issue 14, fault 7); step() now assigns
    # no attribute on a plain step, and these exist before any step does.
    _mesh = None  # the device mesh of sharded parameters (see _sharded.py); None: none

    def __init__(self, params, defaults: dict[str, Any], *, backend: str, master_weights: bool,
                 skip_nonfinite: bool, capturable: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, differentiable: bool = False) -> None:
        # every setting is checked before the parameters are walked, as torch.optim does
        check_flag("master_weights", master_weights)
        check_flag("skip_nonfinite", skip_nonfinite)
        check_flag("capturable", capturable)
        check_flag("differentiable", differentiable)
        if differentiable:
            raise ValueError(f"differentiable=True is not supported: {type(self).__name__}'s step runs under "
                             "no_grad (its fused kernels have no autograd formula)")
        resolve_backend(backend, None)  # reject unknown names before touching params
        backend_from_flags(backend, foreach, fused, None)
        defaults.setdefault("maximize", False)
        self.capturable = capturable  # read by _validate_group
        self._validate_group(defaults, "")
        self.master_weights = master_weights
        self.skip_nonfinite = skip_nonfinite
        self._skipped_steps: Tensor | int = 0
        self._backend_request = (backend, foreach, fused)
        super().__init__(params, defaults)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        # deferred init: parameters on the meta device get their backend at the first step
        self._use_device(None if first is None or first.device.type == "meta" else first.device)

    def _use_device(self, device: torch.device | None) -> None:
        """Choose the backend for parameters on ``device`` (None: not known yet). step()
        chooses again when the parameters are on another device type than last time
        (materialised after a deferred init, or moved)."""
        backend, foreach, fused = self._backend_request
        self.backend = resolve_backend(backend_from_flags(backend, foreach, fused, device), device)
        self._backend_device = None if device is None else device.type
        if self.capturable and self.backend != "triton":
            raise ValueError(f"capturable=True needs backend='triton' (got {self.backend!r}): its step reads "
                             "nothing on the host once its tables are built")
        if self.capturable and not self.skip_nonfinite:
            raise ValueError("capturable=True needs skip_nonfinite=True: raising on a non-finite gradient "
                             "reads a flag on the host, which a captured graph cannot do")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in _SETTINGS if key in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict with state and param_groups only
        for key, default in _SETTINGS.items():
            self.__dict__.setdefault(key, default)

    # -- groups ---------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch.optim: named parameters (``(name, tensor)`` pairs) are accepted and
        their names kept in ``param_group["param_names"]``; the caller's dict is the
        group stored (and completed with the defaults). Checked before it is stored."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        index = len(self.param_groups)
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but "
                            "the ordering of tensors in sets will change between runs. Please use a list instead.")
        params = [params] if isinstance(params, Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        devices = set()
        for position, p in enumerate(tensors):
            if not isinstance(p, Tensor):
                raise TypeError(f"param_groups[{index}]['params'][{position}] is a {type(p).__name__}, not a Tensor")
            if not p.is_leaf:
                raise ValueError(f"{_describe(index, position, p)} is not a leaf tensor; optimizers update leaves only")
            if not p.is_floating_point():
                raise TypeError(f"{_describe(index, position, p)} must be a real floating-point tensor "
                                "(complex parameters are not supported)")
            devices.add(p.device)
            if self._mesh is None and _sharded.is_sharded(p):
                self._mesh = p.device_mesh  # known before the first step, which checks the placements
        if len(devices) > 1:
            raise ValueError(f"param_groups[{index}] mixes devices {sorted(map(str, devices))}; "
                             "put parameters of each device in their own group")
        self._validate_group({**self.defaults, **param_group, "params": tensors}, f" in param_groups[{index}]")
        param_group["params"] = params  # torch's add_param_group splits off the names and fills in the defaults
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any], where: str, in_step: bool = False) -> None:
        """Check a group's hyper-parameters (``in_step``: at step(), where a device lr is
        not read). Subclasses check theirs and call ``_validate_common``."""
        raise NotImplementedError

    def _validate_common(self, group: dict[str, Any], where: str, in_step: bool) -> None:
        """What every group of both optimizers has: lr and torch.optim's flags."""
        self._check_lr(group, where, in_step)
        check_flag("maximize", group["maximize"], where=where)
        if group.get("differentiable", False):
            raise ValueError(f"differentiable=True{where} is not supported")
        if group["maximize"] and self.capturable:
            raise ValueError(f"maximize=True{where} cannot be combined with capturable=True: the negated "
                             "gradients are new tensors at every step, which a captured graph's tables cannot follow")

    def _check_lr(self, group: dict[str, Any], where: str, in_step: bool) -> None:
        """lr: a number, or a one-element tensor (which a scheduler may update in place)."""
        lr = group["lr"]
        if self.capturable and isinstance(lr, Tensor):
            params = group.get("params") or ()
            device = params[0].device if params else None
            if device is not None and device.type != "meta" and lr.device != device:
                raise ValueError(f"lr{where} is a tensor on {lr.device} but the parameters are on {device}: "
                                 "capturable=True needs a tensor lr on the parameters' device (a captured graph "
                                 "cannot copy from host memory); a float lr, or a tensor lr without capturable, "
                                 "is read on the host")
        if isinstance(lr, Tensor) and lr.device.type != "cpu" and in_step:
            # range-checked when the group was added; reading it at every step would synchronise
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"lr{where} must be a one-element floating-point tensor, got {lr.dtype} "
                                 f"of shape {tuple(lr.shape)}")
            return
        check_number("lr", lr, where=where, label="learning rate")

    # -- step -----------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on the device: non-finite gradients or norms with
        ``skip_nonfinite=True``, or an Inf/NaN found by ``torch.amp.GradScaler``."""
        return int(self._skipped_steps)  # reading it syncs; step() itself does not

    def _buckets(self) -> list[Bucket]:
        """Check every group and gradient, then split groups by dtype. Reads no tensor data.

        Gradients of ``maximize=True`` groups are negated here (copies, as torch's foreach
        path does), so every backend's maths sees the direction to descend.
        """
        buckets: list[Bucket] = []
        mesh = None  # the device mesh of sharded parameters, if any (see _sharded.py)
        low_precision_masters = self.master_weights
        for gi, group in enumerate(self.param_groups):
            self._validate_group(group, f" in param_groups[{gi}]", in_step=True)
            by_dtype: dict[torch.dtype, Bucket] = {}
            device = None
            # parameters of a group that keeps no state (LARS without momentum) get no
            # entry in self.state, as torch.optim.SGD
            keeps_state = bool(self._state_keys_for(group))
            # per-parameter checks run at every step: kept to plain attribute reads (host time)
            for pos, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided:
                    raise ValueError(f"{_describe(gi, pos, p)} has a sparse gradient; "
                                     f"{type(self).__name__} supports dense gradients only")
                p_device = p.device
                if g.shape != p.shape or g.device != p_device:
                    raise ValueError(f"{_describe(gi, pos, p)} has a gradient of shape {tuple(g.shape)} "
                                     f"on {g.device}; expected shape {tuple(p.shape)} on {p_device}")
                if p_device != device:
                    if device is not None:
                        raise ValueError(f"{_describe(gi, pos, p)} is on {p_device} but param_groups[{gi}] "
                                         f"already has parameters on {device}")
                    device = p_device
                b = by_dtype.get(p.dtype)
                if b is None:
                    b = by_dtype[p.dtype] = Bucket(gi, group, [], [], [], [], state_dtype(p))
                if keeps_state or (low_precision_masters and p.dtype != b.compute_dtype):
                    state = self.state[p]
                else:
                    state = self.state.get(p) or {}
                if _sharded.is_sharded(p):  # FSDP2: work on the local shard, reduce norms across ranks
                    mesh = _sharded.check_placements(_describe(gi, pos, p), p, mesh)
                    if not _sharded.is_sharded(g):
                        raise ValueError(f"{_describe(gi, pos, p)} is a DTensor but its gradient is not")
                    b.sharded.append(_sharded.is_shard_placed(p))
                    p, g, state = p.to_local(), g.to_local(), _sharded.LocalState(state, p)
                else:
                    b.sharded.append(False)
                b.params.append(p)
                b.grads.append(g)
                b.positions.append(pos)
                b.states.append(state)
            if group["maximize"]:
                for b in by_dtype.values():
                    b.grads = list(torch._foreach_neg(b.grads))  # a tuple: _dense_copies assigns into it
            buckets.extend(by_dtype.values())
        if mesh is not self._mesh:  # set when the groups were added; changes only if they were edited since
            self._mesh = mesh
        return buckets

    def _dense_copies(self, buckets: list[Bucket]) -> list[tuple[Tensor, Tensor]]:
        """The fused kernels walk storage linearly. A parameter that is a strided view
        (legal in torch) is stepped as a dense copy, with a dense gradient, and
        written back after the update: returns the (parameter, copy) pairs."""
        copies = []
        for b in buckets:
            for i, p in enumerate(b.params):
                if not p.is_contiguous() and not _layout_is_dense(p):
                    if self.capturable:
                        raise ValueError(f"{_describe(b.group_index, b.positions[i], p)} is a strided view, "
                                         "which the fused kernels step as a new dense copy at every step; "
                                         "capturable=True needs dense parameters (e.g. .contiguous() before "
                                         "making it a Parameter)")
                    b.params[i] = p.contiguous()
                    b.grads[i] = b.grads[i].contiguous()
                    copies.append((p, b.params[i]))
        return copies

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step.

        Non-finite gradients or norms: with ``skip_nonfinite=False`` (default)
        ``FloatingPointError`` is raised before anything changes, which costs one
        host read of a single flag per step. With ``skip_nonfinite=True``, or when
        stepped by ``torch.amp.GradScaler``, the decision stays on the device: no
        host synchronisation except on a step that must create state.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._buckets()
        if not buckets:
            return loss
        if buckets[0].device.type != self._backend_device:  # first step after a deferred init, or moved
            self._use_device(buckets[0].device)

        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()

        fused = self.backend in FUSED_BACKENDS  # fused kernels read and write p themselves
        dense_copies = self._dense_copies(buckets) if fused else []
        if fused:
            norms, checks = self._fused("norms", buckets, inv_scale)
        else:
            norms, checks = self._norms_phase(buckets, inv_scale)
        # a local, not an attribute: the step assigns no optimizer attribute, which
        # torch.compile of torch 2.11 refuses to trace ("Attempted setattr on a user-defined object")
        creating_state = self._creates_state(buckets)
        ok = self._gate(buckets, checks, found_inf, creating_state)
        if ok is False:
            return loss
        self._init_state(buckets)
        for b in buckets:
            b.weights = b.params if fused else self._compute_weights(b)
        if fused:
            self._fused("update", norms, inv_scale, ok, creating_state)
        else:
            self._update(buckets, norms, inv_scale, ok)
            for b in buckets:
                self._write_back(b)
        for p, dense in dense_copies:
            p.copy_(dense)
        return loss

    # torch.compile: the drivers build launch tables and call C++ or Triton kernels that
    # dynamo cannot trace, so they run eagerly; the rest of the step is traced.
    @torch._disable_dynamo  # as torch.optim does: imports dynamo on first call, not at import
    def _fused(self, phase: str, *args):
        """The fused backend's ``<prefix>_norms``/``<prefix>_update`` driver, called with ``args``."""
        return getattr(self._kernels(), f"{self._kernel_prefix}_{phase}")(self, *args)

    def _kernels(self):
        """The module whose ``<prefix>_norms``/``<prefix>_update`` drive this fused
        backend's kernels (imported on first use: Triton's interpreter, if any, must be
        chosen before fastlars.ops is imported)."""
        if self.backend == "triton":
            return importlib.import_module(f"fastlars.ops.{self._kernel_prefix}_step")
        return importlib.import_module("fastlars.ops.cpp_step")

    def _norms_phase(self, buckets: list[Bucket], inv_scale: Tensor | None) -> tuple[Any, list[Tensor]]:
        """Read-only first phase of the reference and foreach backends: what the update
        needs, and the tensors whose finiteness decides the step (fused backends do
        this in a kernel, see ``_kernels``)."""
        norms = [self._norms(b, inv_scale) for b in buckets]
        if self._mesh is not None:  # sharded parameters: one all-reduce of every layer's squared norms
            norms = self._global_norms(buckets, norms)
        return norms, [n for bucket_norms in norms for n in bucket_norms]

    def _global_norms(self, buckets: list[Bucket], norms: list[list[Tensor]], start: int = 0) -> list[list[Tensor]]:
        """Each bucket's per-tensor norm vectors from index ``start`` on, made global across
        ranks in one all-reduce (sharded parameters); the others are returned as they are."""
        parts = [(b, n) for b, bucket_norms in zip(buckets, norms) for n in bucket_norms[start:]]
        if not parts:
            return norms
        reduced = iter(_sharded.reduce_norms([n for _, n in parts], [torch.tensor(b.sharded) for b, _ in parts],
                                             self._mesh))
        return [bucket_norms[:start] + [next(reduced) for _ in bucket_norms[start:]] for bucket_norms in norms]

    def _norms(self, b: Bucket, inv_scale: Tensor | None) -> list[Tensor]:
        """Read-only first phase: [||g||] per parameter of the bucket, plus [||w||] where
        the group is adapted, in the state dtype. The gate checks these for finiteness."""
        if self.backend == "reference":
            def norms(tensors):
                return torch.stack([torch.linalg.vector_norm(t, dtype=b.compute_dtype) for t in tensors])
        else:
            def norms(tensors):
                return torch.stack(torch._foreach_norm(tensors, 2, dtype=b.compute_dtype))
        g_norm = norms(b.grads)
        if inv_scale is not None:
            g_norm = g_norm * inv_scale
        if not b.group["trust_ratio"]:
            return [g_norm]
        return [g_norm, norms(self._weights_for_norm(b))]

    def _gate(self, buckets: list[Bucket], checks: list[Tensor], found_inf: Tensor | None,
              creating_state: bool) -> Tensor | bool | None:
        """Decide whether this step happens (``creating_state``: whether it creates state).

        Returns None (go ahead unconditionally), False (skipped), or a 0-d bool
        tensor on the first bucket's device that the update applies on the device.
        """
        device = buckets[0].device
        ok = torch.stack([t.isfinite().all().to(device) for t in checks]).all()
        if found_inf is not None:
            ok = ok & (found_inf.to(device) == 0)
        elif not self.skip_nonfinite:
            if not bool(ok):  # the one documented host read of the raising mode
                self._raise_nonfinite(buckets)
            return None
        if creating_state and is_capturing(device):
            raise RuntimeError(f"{type(self).__name__}.step() is being captured in a CUDA graph but some "
                               "parameters have no state yet: take one eager step before capturing "
                               "(the first step creates the state)")
        # counted on the device from the first step on: the counter is then a device
        # tensor that a captured graph adds to in place at every replay
        self._count_skip((~ok).to(torch.int64))
        if creating_state:
            # Creating state (a momentum buffer, master weights) depends on whether
            # the step happens, so the first step of a parameter reads the flag.
            if not bool(ok):
                return False
            # capturable: the update gets the device flag as on every later step, so the
            # same kernel variants run (none is first compiled during a capture)
            return ok if self.capturable else None
        return ok

    # the one attribute a step may assign (the counter's first value, or a move to another
    # device): run eagerly under torch.compile, whose torch 2.11 refuses to trace a setattr
    # on the optimizer; later steps add to the device counter in place
    @torch._disable_dynamo
    def _count_skip(self, skipped: Tensor) -> None:
        counter = self._skipped_steps
        if isinstance(counter, Tensor) and counter.device == skipped.device:
            counter.add_(skipped)  # in place: a captured CUDA graph keeps counting at every replay
        else:
            self._skipped_steps = skipped + counter

    def _raise_nonfinite(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            for pos, p, g in zip(b.positions, b.params, b.grads):
                if not bool(g.isfinite().all()):
                    raise FloatingPointError(
                        f"non-finite gradient for {_describe(b.group_index, pos, p)}; "
                        "pass skip_nonfinite=True to skip such steps, or use torch.amp.GradScaler")
        raise FloatingPointError(
            "a per-layer norm overflowed to a non-finite value although every gradient is finite; "
            "pass skip_nonfinite=True to skip such steps")

    # -- state and mixed precision --------------------------------------------

    def _init_state(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            for p, st in zip(b.params, b.states):
                self._new_state(p, st, b.group, b.compute_dtype)
                if self.master_weights and b.low_precision and "master_param" not in st:
                    st["master_param"] = p.detach().to(b.compute_dtype, memory_format=torch.preserve_format)

    def _creates_state(self, buckets: list[Bucket]) -> bool:
        """True when this step would create state for some parameter."""
        for b in buckets:
            keys = self._state_keys_for(b.group)
            if self.master_weights and b.low_precision:
                keys = (*keys, "master_param")
            if any(key not in state for state in b.states for key in keys):
                return True
        return False

    def _state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def _new_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], dtype: torch.dtype) -> None:
        """Create the state this group's step needs and ``state`` lacks."""
        raise NotImplementedError

    def _compute_weights(self, b: Bucket) -> list[Tensor]:
        """The full-precision weights the update works on (see Bucket.weights)."""
        if not b.low_precision:
            return b.params
        if self.master_weights:
            return [st["master_param"] for st in b.states]
        return [p.to(b.compute_dtype) for p in b.params]

    def _write_back(self, b: Bucket) -> None:
        if b.low_precision:
            torch._foreach_copy_(b.params, b.weights)

    def _weights_for_norm(self, b: Bucket) -> list[Tensor]:
        """Weights whose norm the trust ratio uses, before state exists (read-only).

        With master weights, a parameter without its master yet (its first step) reads as
        an fp32 copy, not as itself: a fused launch reads one weight dtype, and a
        late-joining bf16 parameter shares it with parameters that have fp32 masters.
        """
        if b.low_precision and self.master_weights:
            masters = (st.get("master_param") for st in b.states)
            return [p.to(b.compute_dtype) if m is None else m for p, m in zip(b.params, masters)]
        return b.params

    # -- state_dict -------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch.optim does, then keep our state fp32 (fp64 for fp64 params).

        torch casts floating state to each parameter's dtype, which would turn the
        fp32 moments of a bf16 parameter into bf16, and keeps a ``step`` saved as a
        plain number (older torch checkpoints) as it is. Groups saved by another
        optimizer (SGD into LARS, AdamW into LAMB) get our missing
        hyper-parameters from the current groups. Hooks run as in torch.optim: this
        works on the state dict the load_state_dict pre-hooks return, and finishes
        before the post-hooks run.
        """
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        loaded: list[dict[str, Any]] = []

        def keep(optimizer, hooked_state_dict):  # registered last: sees what the user's pre-hooks made
            loaded.append(hooked_state_dict)

        def finish(optimizer):  # registered first: runs before the user's post-hooks
            self._finish_load(loaded[-1], current)

        handles = (self.register_load_state_dict_pre_hook(keep),
                   self.register_load_state_dict_post_hook(finish, prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for handle in handles:
                handle.remove()

    def _finish_load(self, state_dict: dict[str, Any], current: list[dict[str, Any]]) -> None:
        for gi, (group, defaults) in enumerate(zip(self.param_groups, current)):
            for key, value in defaults.items():
                group.setdefault(key, value)
            self._validate_group(group, f" in loaded param_groups[{gi}]")
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved_state = state_dict["state"].get(saved_id)
            if saved_state is None:
                continue
            for key, value in saved_state.items():
                if key == "step":  # a float32 tensor on the parameter's device, as our steps create it
                    self.state[p][key] = torch.as_tensor(value).to(device=p.device, dtype=torch.float32, copy=True)
                elif isinstance(value, Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=state_dtype(p), copy=True)


def where_(ok: Tensor, new: list[Tensor], dst: list[Tensor]) -> None:
    """dst = new if ok else dst, for each pair, without reading ok on the host.

    torch has no foreach select; arithmetic masking (dst + ok * (new - dst)) would
    turn the NaNs of a skipped step into NaN state, so this is one where per tensor.
    """
    for n, t in zip(new, dst):
        torch.where(ok, n, t, out=t)
