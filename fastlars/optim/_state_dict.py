"""What an optimizer carries across a checkpoint, a pickle or a deepcopy: a
``load_state_dict`` that keeps the state fp32 (fp64 for fp64 parameters) and completes
groups saved by another optimizer, and the settings torch.optim's pickling leaves out."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _tensors
from . import _checks
from ..ops.launch import LaunchCache

# What torch.optim.Optimizer.__getstate__ leaves out (it carries defaults, state and
# param_groups only) but a deepcopied or unpickled optimizer needs to step: the
# optimizer-wide settings and the skip counter. Launch caches are rebuilt, not copied.
_SETTINGS = {"_backend_request": ("auto", None, None), "backend": None, "_backend_device": None,
             "master_weights": False, "skip_nonfinite": False, "capturable": False, "one_launch": False,
             "_skipped_steps": 0}


class StateDictMixin:
    """load_state_dict and pickling of TrustRatioOptimizer (a torch.optim.Optimizer)."""

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in _SETTINGS if key in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict with state and param_groups only
        for key, default in _SETTINGS.items():
            self.__dict__.setdefault(key, default)
        self.__dict__.setdefault("_launch_cache", LaunchCache())  # rebuilt, not copied

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch.optim does, then keep our state fp32 (fp64 for fp64 params).

        torch casts floating state to each parameter's dtype, which would turn the
        fp32 moments of a bf16 parameter into bf16, and keeps a ``step`` saved as a
        plain number (older torch checkpoints) as it is. Groups saved by another
        optimizer (SGD into LARS, AdamW into LAMB) get our missing
        hyper-parameters from the current groups. Hooks run as in torch.optim: this
        works on the state dict the load_state_dict pre-hooks return, and finishes
        before the post-hooks run.

        With ``capturable=True`` the loaded values are copied into the state tensors that
        exist where their shapes match, and into a tensor ``lr``: a captured CUDA graph
        points at those tensors (replacing them would free memory that every replay
        writes), and the launch tables keyed on their pointers stay valid. Once a graph
        has been captured, a state dict that lacks such a tensor or gives it another
        shape raises ``ValueError`` before anything changes.
        """
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        # the state tensors a captured graph may point at (capturable), by parameter
        held = {p: dict(st) for p, st in self.state.items()} if self.capturable else {}
        loaded: list[dict[str, Any]] = []

        def keep(optimizer, hooked_state_dict):  # registered last: sees what the user's pre-hooks made
            if held and self._launch_cache.pinned:  # a graph was captured (its tables are pinned)
                self._check_graph_state(hooked_state_dict, held)
            loaded.append(hooked_state_dict)

        def finish(optimizer):  # registered first: runs before the user's post-hooks
            self._finish_load(loaded[-1], current, held)

        handles = (self.register_load_state_dict_pre_hook(keep),
                   self.register_load_state_dict_post_hook(finish, prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for handle in handles:
                handle.remove()

    def _saved_ids(self, state_dict: dict[str, Any]):
        """(group index, position, parameter, the id the state dict saved it under), as
        torch.optim pairs them (in order)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(gi, pos, p) for gi, g in enumerate(self.param_groups) for pos, p in enumerate(g["params"])]
        return [(gi, pos, p, saved_id) for (gi, pos, p), saved_id in zip(params, saved_ids)]

    def _check_graph_state(self, state_dict: dict[str, Any], held: dict) -> None:
        """Refuse a state dict whose loading would free a state tensor a captured graph
        points at: one without that tensor, or with another shape (torch's own checks of
        the groups' sizes come after the pre-hooks, and are left to it)."""
        saved_groups = state_dict.get("param_groups", [])
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            return
        for gi, pos, p, saved_id in self._saved_ids(state_dict):
            saved_state = state_dict["state"].get(saved_id, {})
            for key, tensor in held.get(p, {}).items():
                value = saved_state.get(key)
                if not isinstance(tensor, Tensor) or (value is not None and torch.as_tensor(value).shape == tensor.shape):
                    continue
                found = "has none" if value is None else f"has shape {tuple(torch.as_tensor(value).shape)}"
                raise ValueError(f"{_checks.describe(gi, pos, p)}: a CUDA graph captured from this optimizer "
                                 f"points at its state {key!r} of shape {tuple(tensor.shape)}, and the state dict "
                                 f"{found}: loading it would free memory every replay writes. Load a state dict "
                                 "of the same parameters, or build a new optimizer and capture again")

    def _finish_load(self, state_dict: dict[str, Any], current: list[dict[str, Any]], held: dict) -> None:
        for gi, (group, defaults) in enumerate(zip(self.param_groups, current)):
            for key, value in defaults.items():
                group.setdefault(key, value)
            lr = defaults.get("lr")
            if self.capturable and isinstance(lr, Tensor) and group["lr"] is not lr:  # a graph reads this tensor
                loaded_lr = torch.as_tensor(group["lr"])
                _checks.check_number("lr", loaded_lr, where=f" in loaded param_groups[{gi}]", label="learning rate")
                lr.copy_(loaded_lr.reshape(lr.shape))
                group["lr"] = lr
            self._validate_group(group, f" in loaded param_groups[{gi}]")
        for _, _, p, saved_id in self._saved_ids(state_dict):
            saved_state = state_dict["state"].get(saved_id)
            if saved_state is None:
                continue
            for key, value in saved_state.items():
                if key == "step":  # a float32 tensor on the parameter's device, as our steps create it
                    value = torch.as_tensor(value).to(device=p.device, dtype=torch.float32, copy=True)
                elif isinstance(value, Tensor) and value.is_floating_point():
                    value = value.to(device=p.device, dtype=_tensors.state_dtype(p), copy=True)
                else:
                    continue
                kept = held.get(p, {}).get(key)
                if isinstance(kept, Tensor) and (kept.shape, kept.dtype, kept.device) == (
                        value.shape, value.dtype, value.device):
                    value = kept.copy_(value)
                self.state[p][key] = value
