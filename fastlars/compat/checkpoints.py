"""``load_peer_state_dict``: resume from a peer's optimizer checkpoint.

The peers keep the same quantities under other names or layouts: timm ``Lamb`` and apex
``FusedLAMB`` count ``step`` per param group, Barlow Twins / VICReg name the momentum
buffer ``mu``, SimCLR ``Momentum``, the MLPerf TF2 reference stores the negative velocity
as ``momentum``, DeepSpeed keeps an integer ``step`` per parameter. Each is mapped onto
fastlars's state (docs/contract.md, "LARS" and "LAMB": ``momentum_buffer``; ``step``,
``exp_avg``, ``exp_avg_sq``), then loaded by the optimizer's own ``load_state_dict``,
which places and casts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _momentum(key: str, sign: float = 1.0) -> Callable[[dict, dict], dict]:
    def translate(state: dict, group: dict) -> dict:
        buf = state.get(key)
        return {} if buf is None else {"momentum_buffer": buf if sign == 1.0 else buf * sign}
    return translate


def _lamb(step_in_group: bool) -> Callable[[dict, dict], dict]:
    def translate(state: dict, group: dict) -> dict:
        out = {key: state[key] for key in ("exp_avg", "exp_avg_sq") if key in state}
        step = group.get("step") if step_in_group else state.get("step")
        if out and step is not None:
            out["step"] = torch.as_tensor(float(step) if not isinstance(step, Tensor) else step.item())
        return out
    return translate


# per compat constructor: (peer state of one parameter, its peer group) -> fastlars state
_TRANSLATE: dict[str, Callable[[dict, dict], dict]] = {
    "timm_lars": _momentum("momentum_buffer"),
    "larc": _momentum("momentum_buffer"),  # LARC's checkpoint is its inner SGD's
    "ssl_lars": _momentum("mu"),
    "simclr_lars": _momentum("Momentum"),
    "mlperf_lars": _momentum("momentum", sign=-1.0),  # the peer stores -v
    "timm_lamb": _lamb(step_in_group=True),
    "apex_fused_lamb": _lamb(step_in_group=True),
    "deepspeed_lamb": _lamb(step_in_group=False),
}

# group entries carried over: where a schedule left the lr (and its starting value)
_GROUP_KEYS = ("lr", "initial_lr")


def load_peer_state_dict(optimizer, state_dict: dict[str, Any]) -> None:
    """Load ``state_dict``, saved by the peer a ``fastlars.compat`` constructor reproduces
    (``peer.state_dict()`` after some steps), into ``optimizer``, made by that constructor
    with the same parameters in the same order, so that training continues on the
    peer's trajectory. The groups' ``lr`` (and ``initial_lr``) are taken from the
    checkpoint; every other hyper-parameter is the one the optimizer was made with."""
    layout = getattr(optimizer, "peer_layout", None)
    if layout is None:
        raise ValueError("load_peer_state_dict needs an optimizer made by a fastlars.compat constructor "
                         "(it records which peer's layout to read); a fastlars checkpoint loads with "
                         "optimizer.load_state_dict")
    peer_groups = state_dict["param_groups"]
    peer_ids = [i for g in peer_groups for i in g["params"]]
    if len(peer_ids) != len(layout.params):
        raise ValueError(f"the {layout.peer} checkpoint has {len(peer_ids)} parameters but the optimizer "
                         f"was made with {len(layout.params)}")
    peer_group_of = [gi for gi, g in enumerate(peer_groups) for _ in g["params"]]
    ours = optimizer.state_dict()
    index = {id(p): k for k, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    translate = _TRANSLATE[layout.peer]
    state = {}
    for peer_id, p, gi in zip(peer_ids, layout.params, peer_group_of):
        saved = state_dict["state"].get(peer_id)
        if saved:
            mapped = translate(saved, peer_groups[gi])
            if mapped:
                state[index[id(p)]] = mapped
    if len(set(layout.group_of)) != len(peer_groups):
        raise ValueError(f"the {layout.peer} checkpoint has {len(peer_groups)} param groups but the optimizer "
                         f"was made from {len(set(layout.group_of))}")
    for group, source in zip(ours["param_groups"], layout.group_of):
        for key in _GROUP_KEYS:
            if key in peer_groups[source]:
                group[key] = peer_groups[source][key]
    ours["state"] = state
    optimizer.load_state_dict(ours)
