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
                 high_open: bool = False, where: str = "") -> None:
    """Raise unless ``value`` is a finite number with ``low <= value <= high`` (``< high`` if high_open)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}{where} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()  # argument check at construction / group validation, not per element
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}{where} must be a number, got {type(value).__name__}")
    upper_ok = value < high if high_open else value <= high
    if not math.isfinite(value) or not (value >= low and upper_ok):
        bracket = ")" if high_open else "]"
        raise ValueError(f"invalid {name}{where}: {value} (expected a value in [{low}, {high}{bracket})")


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


def state_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class TrustRatioOptimizer(Optimizer):
    """Base of LARS and LAMB: everything but the maths.

    Subclasses define ``_validate_group(group, where)`` and
    ``_update(buckets, norms, inv_scale, ok)`` (the step itself), ``_state_keys_for(group)``
    and ``_new_state``.
    """

    _kernel_prefix = ""  # "lars" / "lamb": names the fused drivers' functions
    # GradScaler hands us `grad_scale` and `found_inf` tensors instead of syncing
    # on found_inf itself (the contract torch's fused Adam uses); see `step`.
    _step_supports_amp_scaling = True

    _in_step = False  # set while step() validates the groups: device values are not read then
    _creating_state = True  # set by the gate: whether this step creates state (fused drivers rebuild tables)

    def __init__(self, params, defaults: dict[str, Any], *, backend: str,
                 master_weights: bool, skip_nonfinite: bool, capturable: bool = False) -> None:
        check_flag("master_weights", master_weights)
        check_flag("skip_nonfinite", skip_nonfinite)
        check_flag("capturable", capturable)
        resolve_backend(backend, None)  # reject unknown names before touching params
        self.master_weights = master_weights
        self.skip_nonfinite = skip_nonfinite
        self.capturable = capturable
        self._skipped_steps: Tensor | int = 0
        super().__init__(params, defaults)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self.backend = resolve_backend(backend, None if first is None else first.device)
        if capturable and self.backend != "triton":
            raise ValueError(f"capturable=True needs backend='triton' (got {self.backend!r}): its step reads "
                             "nothing on the host once its tables are built")
        if capturable and not skip_nonfinite:
            raise ValueError("capturable=True needs skip_nonfinite=True: raising on a non-finite gradient "
                             "reads a flag on the host, which a captured graph cannot do")

    # -- groups ---------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        devices = set()
        for position, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"param_groups[{index}]['params'][{position}] is a {type(p).__name__}, not a Tensor")
            if not p.is_leaf:
                raise ValueError(f"{_describe(index, position, p)} is not a leaf tensor; optimizers update leaves only")
            if not p.is_floating_point():
                raise TypeError(f"{_describe(index, position, p)} must be a real floating-point tensor")
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(f"param_groups[{index}] mixes devices {sorted(map(str, devices))}; "
                             "put parameters of each device in their own group")
        full = {**self.defaults, **param_group, "params": params}
        full.setdefault("trust_ratio", True)
        self._validate_group(full, f" in param_groups[{index}]")
        super().add_param_group(full)

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def _check_lr(self, group: dict[str, Any], where: str) -> None:
        """lr: a number, or a one-element tensor (which a scheduler may update in place)."""
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device.type != "cpu" and self._in_step:
            # range-checked when the group was added; reading it at every step would synchronise
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"lr{where} must be a one-element floating-point tensor, got {lr.dtype} "
                                 f"of shape {tuple(lr.shape)}")
            return
        check_number("lr", lr, where=where)

    # -- step -----------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on the device: non-finite gradients or norms with
        ``skip_nonfinite=True``, or an Inf/NaN found by ``torch.amp.GradScaler``."""
        return int(self._skipped_steps)  # reading it syncs; step() itself does not

    def _buckets(self) -> list[Bucket]:
        """Check every group and gradient, then split groups by dtype. Reads no tensor data."""
        buckets: list[Bucket] = []
        self._mesh = None  # the device mesh of sharded parameters, if any (see _sharded.py)
        for gi, group in enumerate(self.param_groups):
            self._in_step = True
            try:
                self._validate_group(group, f" in param_groups[{gi}]")
            finally:
                self._in_step = False
            by_dtype: dict[torch.dtype, Bucket] = {}
            device = None
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
                state = self.state[p]
                if _sharded.is_sharded(p):  # FSDP2: work on the local shard, reduce norms across ranks
                    self._mesh = _sharded.check_placements(_describe(gi, pos, p), p, self._mesh)
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
            buckets.extend(by_dtype.values())
        return buckets

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

        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()

        fused = self.backend in FUSED_BACKENDS  # fused kernels read and write p themselves
        kernels = self._kernels() if fused else None
        if fused:
            norms, checks = getattr(kernels, f"{self._kernel_prefix}_norms")(self, buckets, inv_scale)
        else:
            norms, checks = self._norms_phase(buckets, inv_scale)
        ok = self._gate(buckets, checks, found_inf)
        if ok is False:
            return loss
        self._init_state(buckets)
        for b in buckets:
            b.weights = b.params if fused else self._compute_weights(b)
        if fused:
            getattr(kernels, f"{self._kernel_prefix}_update")(self, norms, inv_scale, ok)
        else:
            self._update(buckets, norms, inv_scale, ok)
            for b in buckets:
                self._write_back(b)
        return loss

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

    def _gate(self, buckets: list[Bucket], checks: list[Tensor],
              found_inf: Tensor | None) -> Tensor | bool | None:
        """Decide whether this step happens.

        Returns None (go ahead unconditionally), False (skipped), or a 0-d bool
        tensor on the first bucket's device that the update applies on the device.
        """
        device = buckets[0].device
        self._creating_state = self._creates_state(buckets)
        ok = torch.stack([t.isfinite().all().to(device) for t in checks]).all()
        if found_inf is not None:
            ok = ok & (found_inf.to(device) == 0)
        elif not self.skip_nonfinite:
            if not bool(ok):  # the one documented host read of the raising mode
                self._raise_nonfinite(buckets)
            return None
        if self._creating_state:
            # Creating state (a momentum buffer, master weights) depends on whether
            # the step happens, so the first step of a parameter reads the flag.
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{type(self).__name__}.step() is being captured in a CUDA graph but some "
                                   "parameters have no state yet: take one eager step before capturing "
                                   "(the first step creates the state)")
            if not bool(ok):
                self._count_skip(torch.ones((), dtype=torch.int64, device=device))
                return False
            return None
        self._count_skip((~ok).to(torch.int64))
        return ok

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
        """Weights whose norm the trust ratio uses, before state exists (read-only)."""
        if b.low_precision and self.master_weights:
            return [st.get("master_param", p) for p, st in zip(b.params, b.states)]
        return b.params

    # -- state_dict -------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch.optim does, then keep our state fp32 (fp64 for fp64 params).

        torch casts floating state to each parameter's dtype, which would turn the
        fp32 moments of a bf16 parameter into bf16. Groups saved by another
        optimizer (SGD into LARS, AdamW into LAMB) get our missing
        hyper-parameters from the current groups.
        """
        for gi, saved in enumerate(state_dict["param_groups"]):
            if saved.get("maximize", False):
                raise ValueError(f"param_groups[{gi}] was saved with maximize=True, which "
                                 f"{type(self).__name__} does not support")
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, defaults in zip(self.param_groups, current):
            for key, value in defaults.items():
                group.setdefault(key, value)
            self._validate_group(group, " in a loaded param group")
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved_state = state_dict["state"].get(saved_id)
            if saved_state is None:
                continue
            dtype = state_dtype(p)
            for key, value in saved_state.items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    if key == "step":
                        dtype_k = torch.float32
                    else:
                        dtype_k = dtype
                    self.state[p][key] = value.to(device=p.device, dtype=dtype_k, copy=True)


def where_(ok: Tensor, new: list[Tensor], dst: list[Tensor]) -> None:
    """dst = new if ok else dst, for each pair, without reading ok on the host.

    torch has no foreach select; arithmetic masking (dst + ok * (new - dst)) would
    turn the NaNs of a skipped step into NaN state, so this is one where per tensor.
    """
    for n, t in zip(new, dst):
        torch.where(ok, n, t, out=t)
