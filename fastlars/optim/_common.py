"""What LARS and LAMB share: the step's phases (bucketing, the non-finite gate, state
and master weights, the plan handed to the fused drivers), parameter groups and their
validation.

The maths of each optimizer lives in its own module (``lars.py``, ``lamb.py``);
this module holds no formula of either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _sharded, _tensors, backends
from ..backends import backend_from_flags, resolve_backend
from ..ops import _tables  # no Triton, no extension: safe to import early
from ..ops.launch import LaunchCache
from ..ops.plan import LaunchPlan, StepPlan
from . import _layer_stats
from ._buckets import Bucket, launch_groups
from ._checks import check_backend_devices, check_flag, check_number, describe
from ._hyper import GroupRecords
from ._state_dict import StateDictMixin


class TrustRatioOptimizer(StateDictMixin, Optimizer):
    """Base of LARS and LAMB: everything but the maths.

    Subclasses define ``_validate_group(group, where, in_step)``, ``_hyper_of(group)`` (the
    group's record, fastlars/optim/_hyper.py), ``_eager()`` (their one dispatch point to the
    non-fused backends: an EagerPath), ``_update(buckets, norms, inv_scale, ok)`` (the step
    itself), ``_state_keys_for(hyper)`` and ``_new_state``.
    """

    _kernel_prefix = ""  # "lars" / "lamb": names the fused drivers' functions
    # GradScaler hands us `grad_scale` and `found_inf` tensors instead of syncing
    # on found_inf itself (the contract torch's fused Adam uses); see `step`.
    _step_supports_amp_scaling = True

    # Class-level defaults. Under torch.compile, a fused driver that runs after a graph break
    # would find no attribute that the traced part of step() had created: step() assigns
    # no attribute on a plain step, and these exist before any step does.
    _mesh = None  # the device mesh of sharded parameters (see _sharded.py); None: none

    def __init__(self, params, defaults: dict[str, Any], *, backend: str, master_weights: bool,
                 skip_nonfinite: bool, capturable: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, differentiable: bool = False, one_launch: bool = False) -> None:
        # every setting is checked before the parameters are walked, as torch.optim does
        check_flag("master_weights", master_weights)
        check_flag("skip_nonfinite", skip_nonfinite)
        check_flag("capturable", capturable)
        check_flag("differentiable", differentiable)
        check_flag("one_launch", one_launch)
        if differentiable:
            raise ValueError(f"differentiable=True is not supported: {type(self).__name__}'s step runs under "
                             "no_grad (its fused kernels have no autograd formula)")
        resolve_backend(backend, None)  # reject unknown names before touching params
        backend_from_flags(backend, foreach, fused, None)
        defaults.setdefault("maximize", False)
        self.capturable = capturable  # read by _validate_group
        self.one_launch = one_launch  # read by _use_device
        self._validate_group(defaults, "")
        self.master_weights = master_weights
        self.skip_nonfinite = skip_nonfinite
        self._skipped_steps: Tensor | int = 0
        self._backend_request = (backend, foreach, fused)
        self._launch_cache = LaunchCache()  # the fused kernels' tables, kept across steps
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
        check_backend_devices(self.backend, enumerate(self.param_groups))  # device None: meta tensors only
        if self.capturable and not backends.get(self.backend).capturable:
            names = " or ".join(repr(name) for name, b in backends.BACKENDS.items() if b.capturable)
            raise ValueError(f"capturable=True needs backend={names} (got {self.backend!r}): their steps "
                             "read nothing on the host once their tables are built")
        if self.one_launch and self.backend != "triton":
            raise ValueError(f"one_launch=True needs backend='triton' (got {self.backend!r}): only its kernels "
                             "run the step's norms and update in one launch")
        if self.capturable and not self.skip_nonfinite:
            raise ValueError("capturable=True needs skip_nonfinite=True: raising on a non-finite gradient "
                             "reads a flag on the host, which a captured graph cannot do")

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
                raise ValueError(f"{describe(index, position, p)} is not a leaf tensor; optimizers update leaves only")
            if not p.is_floating_point():
                raise TypeError(f"{describe(index, position, p)} must be a real floating-point tensor "
                                "(complex parameters are not supported)")
            _sharded.check_not_flattened(describe(index, position, p), p)
            devices.add(p.device)
            if self._mesh is None and _sharded.is_sharded(p):
                self._mesh = p.device_mesh  # known before the first step, which checks the placements
        if len(devices) > 1:
            raise ValueError(f"param_groups[{index}] mixes devices {sorted(map(str, devices))}; "
                             "put parameters of each device in their own group")
        self._validate_group({**self.defaults, **param_group, "params": tensors}, f" in param_groups[{index}]")
        if getattr(self, "_backend_device", None) is not None:  # else chosen with the first parameters' device
            check_backend_devices(self.backend, [(index, {"params": tensors})])
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
        for gi, (group, hyper) in enumerate(zip(self.param_groups, self._hypers())):
            by_dtype: dict[torch.dtype, Bucket] = {}
            device = None
            # parameters of a group that keeps no state (LARS without momentum) get no
            # entry in self.state, as torch.optim.SGD
            keeps_state = bool(self._state_keys_for(hyper))
            # per-parameter checks run at every step: kept to plain attribute reads (host time)
            for pos, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided:
                    raise ValueError(f"{describe(gi, pos, p)} has a sparse gradient; "
                                     f"{type(self).__name__} supports dense gradients only")
                p_device = p.device
                if g.shape != p.shape or g.device != p_device:
                    raise ValueError(f"{describe(gi, pos, p)} has a gradient of shape {tuple(g.shape)} "
                                     f"on {g.device}; expected shape {tuple(p.shape)} on {p_device}")
                if p_device != device:
                    if device is not None:
                        raise ValueError(f"{describe(gi, pos, p)} is on {p_device} but param_groups[{gi}] "
                                         f"already has parameters on {device}")
                    device = p_device
                b = by_dtype.get(p.dtype)
                if b is None:
                    b = by_dtype[p.dtype] = Bucket(gi, hyper, [], [], [], [], _tensors.state_dtype(p))
                if keeps_state or (low_precision_masters and p.dtype != b.compute_dtype):
                    state = self.state[p]
                else:
                    state = self.state.get(p) or {}
                if _sharded.is_sharded(p):  # FSDP2: work on the local shard, reduce norms across ranks
                    mesh = _sharded.check_placements(describe(gi, pos, p), p, mesh)
                    if not _sharded.is_sharded(g):
                        raise ValueError(f"{describe(gi, pos, p)} is a DTensor but its gradient is not")
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

    # run eagerly under torch.compile: it may assign the records' cache (see _count_skip)
    @torch._disable_dynamo
    def _hypers(self) -> list:
        """Each param group's record, checked and decoded again only where the group changed
        since the last step (a scheduler's new lr, an edited option; fastlars/optim/_hyper.py)."""
        records = self.__dict__.get("_group_records")
        if records is None:  # a new optimizer, or one unpickled or deep-copied (the cache is not carried)
            records = self._group_records = GroupRecords()
        return records.of(self.param_groups, self._hyper_of,
                          lambda gi, group: self._validate_group(group, f" in param_groups[{gi}]", in_step=True))

    def _dense_copies(self, buckets: list[Bucket]) -> list[tuple[Tensor, Tensor]]:
        """The fused kernels walk storage linearly. A parameter that is a strided view
        (legal in torch) is stepped as a dense copy, with a dense gradient, and
        written back after the update: returns the (parameter, copy) pairs."""
        copies = []
        for b in buckets:
            for i, p in enumerate(b.params):
                if not p.is_contiguous() and not _tensors.is_dense(p):
                    if self.capturable:
                        raise ValueError(f"{describe(b.group_index, b.positions[i], p)} is a strided view, "
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
        if any(b.device.type != self._backend_device for b in buckets):  # after a deferred init, or moved
            self._use_device(buckets[0].device)

        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()

        fused = backends.get(self.backend).fused  # fused kernels read and write p themselves
        dense_copies = self._dense_copies(buckets) if fused else []
        # a local, not an attribute: the step assigns no optimizer attribute, which
        # torch.compile of torch 2.11 refuses to trace ("Attempted setattr on a user-defined object")
        creating_state = self._creates_state(buckets)
        if fused:
            plan, norms, checks = self._fused_norms(buckets, creating_state, inv_scale, found_inf is not None)
        else:
            norms, checks = self._norms_phase(buckets, inv_scale)
        ok = self._gate(buckets, checks, found_inf, creating_state)
        if ok is False:
            return loss
        self._init_state(buckets)
        for b in buckets:
            b.weights = b.params if fused else self._compute_weights(b)
        if fused:
            self._fused_update(plan, norms, inv_scale, ok)
            self._keep_layer_stats(buckets, inv_scale, plan=plan, norms=norms)
        else:
            ratios = self._update(buckets, norms, inv_scale, ok)
            for b in buckets:
                self._write_back(b)
            self._keep_layer_stats(buckets, inv_scale, norms=norms, ratios=ratios)
        for p, dense in dense_copies:
            p.copy_(dense)
        return loss

    # torch.compile: the drivers build launch tables and call C++ or Triton kernels that
    # dynamo cannot trace, so they run eagerly; the rest of the step is traced.
    @torch._disable_dynamo  # as torch.optim does: imports dynamo on first call, not at import
    def _fused_norms(self, buckets: list[Bucket], creating_state: bool, inv_scale: Tensor | None,
                     gate_known: bool = False):
        """The fused backend's first phase (fastlars.backends.Driver.norms) on this step's plan
        (``gate_known``: GradScaler's found_inf decides the step)."""
        plan = self._plan(buckets, creating_state, gate_known)
        norms, checks = backends.driver(self.backend, self._kernel_prefix).norms(plan, inv_scale)
        return plan, norms, checks

    @torch._disable_dynamo
    def _fused_update(self, plan: StepPlan, norms, inv_scale: Tensor | None, ok: Tensor | None) -> None:
        """The fused backend's update (fastlars.backends.Driver.update); state exists by now."""
        backends.driver(self.backend, self._kernel_prefix).update(plan, norms, inv_scale, ok)

    def _plan(self, buckets: list[Bucket], creating_state: bool, gate_known: bool = False) -> StepPlan:
        """What the fused drivers get (fastlars/ops/plan.py): the buckets merged per (device,
        dtype) across groups, one launch each, with their hyper-parameter rows."""
        launches = []
        for group in launch_groups(buckets):
            launches.append(LaunchPlan(
                params=[p for b in group for p in b.params], grads=[g for b in group for g in b.grads],
                states=[st for b in group for st in b.states],
                norm_states=[st for b in group for st in self._states_before_gate(b)],
                group_of=[i for i, b in enumerate(group) for _ in b.params],
                rows=_tables.group_rows([b.hyper.row() for b in group], group[0].device),
                where=[(b.group_index, pos) for b in group for pos in b.positions],
                sharded=[s for b in group for s in b.sharded], compute_dtype=group[0].compute_dtype,
                master_weights=self.master_weights, first=[f for b in group for f in self._first_steps(b)]))
        return StepPlan(launches, self._mesh, creating_state, self.capturable, self._launch_cache,
                        one_launch=self.one_launch, gate_known=gate_known)

    def _norms_phase(self, buckets: list[Bucket], inv_scale: Tensor | None) -> tuple[Any, list[Tensor]]:
        """Read-only first phase of the reference and foreach backends: what the update
        needs, and the tensors whose finiteness decides the step (fused backends do
        this in a kernel, see ``_fused``)."""
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
        norms = self._eager().norms
        g_norm = norms(b.grads, b.compute_dtype)
        if inv_scale is not None:
            g_norm = g_norm * inv_scale
        if not b.hyper.adapt:
            return [g_norm]
        return [g_norm, norms(self._weights_for_norm(b), b.compute_dtype)]

    def _gate(self, buckets: list[Bucket], checks: list[Tensor], found_inf: Tensor | None,
              creating_state: bool) -> Tensor | bool | None:
        """Decide whether this step happens (``creating_state``: whether it creates state).

        Returns None (go ahead unconditionally), False (skipped), or a 0-d bool
        tensor on the first bucket's device that the update applies on the device.
        """
        device = buckets[0].device
        # no checks: a one-pass kernel reads nothing before a gate that found_inf decides
        ok = torch.stack([t.isfinite().all().to(device) for t in checks]).all() if checks else \
            torch.ones((), dtype=torch.bool, device=device)
        if found_inf is not None:
            ok = ok & (found_inf.to(device) == 0)
        elif not self.skip_nonfinite:
            if not bool(ok):  # the one documented host read of the raising mode
                self._raise_nonfinite(buckets)
            return None
        if creating_state and _tensors.is_capturing(device):
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

    @torch._disable_dynamo  # assigns an attribute (see _count_skip)
    def _keep_layer_stats(self, buckets: list[Bucket], inv_scale: Tensor | None, *, norms, plan=None,
                          ratios=None) -> None:
        """References for layer_stats(): no computation, no host read."""
        self._last_step = _layer_stats.record(buckets, inv_scale, norms, plan, ratios)

    def layer_stats(self) -> _layer_stats.LayerStats:
        """Per-layer telemetry of the last step (fastlars/optim/_layer_stats.py): ``‖w‖``,
        ``‖g‖`` and the trust ratio each updated tensor got, as 1-D tensors on the
        parameters' device, computed from the step's own norms without a host read."""
        record = getattr(self, "_last_step", None)
        if record is None:
            raise RuntimeError(f"{type(self).__name__}.layer_stats() is available after a step")
        return _layer_stats.collect(self, record)

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
                        f"non-finite gradient for {describe(b.group_index, pos, p)}; "
                        "pass skip_nonfinite=True to skip such steps, or use torch.amp.GradScaler")
        raise FloatingPointError(
            "a per-layer norm overflowed to a non-finite value although every gradient is finite; "
            "pass skip_nonfinite=True to skip such steps")

    # -- state and mixed precision --------------------------------------------

    def _init_state(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            for p, st in zip(b.params, b.states):
                self._new_state(p, st, b.hyper, b.compute_dtype)
                if self.master_weights and b.low_precision and not _tensors.has_state(st, "master_param"):
                    st["master_param"] = p.detach().to(b.compute_dtype, memory_format=torch.preserve_format)

    def _creates_state(self, buckets: list[Bucket]) -> bool:
        """True when this step would create state for some parameter (a key absent or None)."""
        for b in buckets:
            keys = self._state_keys_for(b.hyper)
            if self.master_weights and b.low_precision:
                keys = (*keys, "master_param")
            if any(not _tensors.has_state(state, key) for state in b.states for key in keys):
                return True
        return False

    def _state_keys_for(self, hyper) -> tuple[str, ...]:
        """The state a group with the record ``hyper`` keeps per parameter."""
        raise NotImplementedError

    def _new_state(self, p: Tensor, state: dict[str, Any], hyper, dtype: torch.dtype) -> None:
        """Create the state the step of a group with the record ``hyper`` needs and ``state`` lacks."""
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
        """Weights whose norm the trust ratio uses, before state exists (read-only; see
        fastlars._tensors.weights_for_norm, which the fused drivers use too)."""
        return _tensors.weights_for_norm(b.params, b.states, b.compute_dtype, self.master_weights)

    # -- what subclasses tell the fused drivers (see _plan) --------------------

    def _states_before_gate(self, b: Bucket) -> list:
        """The state the norms phase reads, before the gate (default: as stored)."""
        return b.states

    def _first_steps(self, b: Bucket) -> list[bool]:
        """Per parameter: whether this step creates state the kernels fill from scratch (LARS)."""
        return [False] * len(b.params)
