"""Param groups of the compat constructors: the user's ``params`` as group dicts, split
where a peer treats parameters of one group differently, and the record that maps a
peer's checkpoint onto the split groups."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class PeerLayout:
    """How a compat optimizer's groups relate to the peer's (``optimizer.peer_layout``)."""

    peer: str             # the constructor's name: "timm_lars", "ssl_lars", ...
    params: list[Tensor]  # every parameter in the peer's order (the order the user gave)
    group_of: list[int]   # per fastlars param group: the index of the peer's group it came from


def as_groups(params) -> list[dict[str, Any]]:
    """``params`` as torch.optim takes them (tensors, ``(name, tensor)`` pairs or group
    dicts) as a list of new group dicts whose ``"params"`` are lists. A group's
    ``param_names`` (torch's record of named parameters) are joined back to its tensors."""
    if isinstance(params, Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                        f"but got {params.type()}")
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        entries = group["params"]
        entries = [entries] if isinstance(entries, Tensor) else list(entries)
        names = group.get("param_names")
        if names is not None and len(names) == len(entries) and not any(isinstance(e, tuple) for e in entries):
            entries = list(zip(names, entries))
        out.append({**{k: v for k, v in group.items() if k != "param_names"}, "params": entries})
    return out


def split_groups(groups: list[dict[str, Any]], treatment: Callable[[str | None, Tensor, dict], dict]):
    """Each group cut into groups of equal ``treatment(name, param, group)`` (a dict of
    group options, e.g. ``{"weight_decay": 0.0, "trust_ratio": False}``), in order of
    first appearance; returns the new groups and, per new group, its source group's index."""
    split, group_of = [], []
    for index, group in enumerate(groups):
        parts: dict[tuple, dict] = {}
        for entry in group["params"]:
            name, p = entry if isinstance(entry, tuple) else (None, entry)
            options = treatment(name, p, group)
            key = tuple(sorted(options.items()))
            if key not in parts:
                parts[key] = {**group, **options, "params": []}
            parts[key]["params"].append(entry)
        split.extend(parts.values())
        group_of.extend([index] * len(parts))
    return split, group_of
