"""What an optimizer carries across a checkpoint, a pickle or a deepcopy: a
``load_state_dict`` that keeps the state fp32 (fp64 for fp64 parameters) and completes
groups saved by another optimizer, and the settings torch.optim's pickling leaves out."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _tensors
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
                    self.state[p][key] = value.to(device=p.device, dtype=_tensors.state_dtype(p), copy=True)
