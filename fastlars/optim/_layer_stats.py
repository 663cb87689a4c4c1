"""``layer_stats()``: per-layer telemetry of the last step, as device tensors.

For each tensor the last step updated: ``‖w‖`` (before the update, the norm the ratio
used; for a group that does not adapt, the reference and foreach backends compute no
‖w‖ and it is read when ``layer_stats()`` is called), ``‖g‖`` (unscaled) and the trust ratio it got (1 where its group does not adapt;
LAMB: the ratio before DeepSpeed's step-size correction). Nothing is read on the host:
the norms come from the step's norms pass, which every backend runs anyway (the fused
kernels' per-tensor sums), and the ratio from the optimizer's one trust-ratio function
(``lars_trust_ratio``, ``lamb_trust_ratio``) on those norms. The step only keeps
references; the few element-wise ops run when ``layer_stats()`` is called. Under a CUDA
graph the kept sums are the graph's own tensors, so a call after a replay reads that
replay's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ops.layouts import SumColumn
from ._buckets import launch_groups


@dataclass
class LayerStats:
    """The last step's per-tensor norms and trust ratios (1-D device tensors, one entry per
    parameter of ``params``, in param-group order)."""

    names: list[str | None]  # from named parameters (``param_names``), else None
    params: list[Tensor]
    weight_norm: Tensor
    grad_norm: Tensor
    trust_ratio: Tensor

    def as_dict(self) -> dict[str, dict[str, Tensor]]:
        """``{name or "param_groups[g][i]": {"weight_norm", "grad_norm", "trust_ratio"}}`` (0-d tensors)."""
        return {name: {"weight_norm": w, "grad_norm": g, "trust_ratio": r}
                for name, w, g, r in zip(self.names, self.weight_norm.unbind(), self.grad_norm.unbind(),
                                         self.trust_ratio.unbind())}


@dataclass
class BucketRecord:
    """What a step keeps of one bucket (one group's tensors of one dtype) for layer_stats:
    references only; names, parameters and ratios are formed when layer_stats() is called."""

    group_index: int
    positions: list[int]             # the bucket's tensors in param_groups[group_index]["params"]
    hyper: Any                       # the group's record at the step (fastlars/optim/_hyper.py)
    norms: list[Tensor] | None = None  # eager backends: [‖g‖, ‖w‖ (adapted groups), ...]
    ratio: Any = None                # eager backends: the ratio tensor, its slices' list, or None (1)
    sums: Tensor | None = None       # fused backends: the launch's per-tensor sums ...
    rows: slice | None = None        # ... this bucket's rows in them
    lr: float | Tensor | None = None  # ... the group's lr at the step (a scheduler may have changed it since)


@dataclass
class StepRecord:
    buckets: list[BucketRecord]
    inv_scale: Tensor | None


@dataclass
class FusedRecord:
    """A fused bucket's per-tensor sums, with what its ratio read at the step
    (the argument of the optimizers' ``_ratio_from_sums``)."""

    sums: Tensor
    lr: float | Tensor


def record(buckets, inv_scale: Tensor | None, norms, plan=None, ratios=None) -> StepRecord:
    """What a step keeps: the eager backends' norms and ratios per bucket, or the fused
    launches' sums with each bucket's rows in them (the plan's merge, launch_groups)."""
    if plan is None:
        return StepRecord([BucketRecord(b.group_index, b.positions, b.hyper, norms=n, ratio=r)
                           for b, n, r in zip(buckets, norms, ratios)], inv_scale)
    contexts = norms[0] if isinstance(norms, tuple) else norms  # LAMB: (contexts, global norm)
    where = {}
    for launch, launch_buckets in enumerate(launch_groups(buckets)):
        start = 0
        for b in launch_buckets:
            where[id(b)] = (launch, slice(start, start + len(b.params)))
            start += len(b.params)
    records = []
    for b in buckets:
        launch, rows = where[id(b)]
        lr = b.hyper.lr
        records.append(BucketRecord(b.group_index, b.positions, b.hyper, sums=contexts[launch].sums, rows=rows,
                                    lr=lr.clone() if isinstance(lr, Tensor) else lr))
    return StepRecord(records, inv_scale)


def collect(optimizer, record: StepRecord) -> LayerStats:
    names, params, w_norms, g_norms, ratios = [], [], [], [], []
    for b in record.buckets:
        group = optimizer.param_groups[b.group_index]
        bucket_params = [group["params"][pos] for pos in b.positions]
        group_names = group.get("param_names")
        names.extend(group_names[pos] if group_names is not None else f"param_groups[{b.group_index}][{pos}]"
                      for pos in b.positions)
        ratio = b.ratio
        if b.sums is not None:
            fused = FusedRecord(b.sums[b.rows], b.lr)
            w_norm, g_norm, ratio = optimizer._ratio_from_sums(b.hyper, fused, record.inv_scale)
        else:
            g_norm = b.norms[0]
            w_norm = b.norms[1] if len(b.norms) > 1 else torch.stack(
                [torch.linalg.vector_norm(p, dtype=g_norm.dtype) for p in bucket_params])
            if isinstance(ratio, list):
                ratio = torch.cat(ratio)
        device = params[0].device if params else g_norm.device
        params.extend(bucket_params)
        w_norms.append(w_norm.to(device))
        g_norms.append(g_norm.to(device))
        ratios.append((torch.ones_like(g_norm) if ratio is None else ratio).to(device=device, dtype=g_norm.dtype))
    return LayerStats(names, params, torch.cat(w_norms), torch.cat(g_norms), torch.cat(ratios))


def sum_norms(sums: Tensor, inv_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """‖w‖ and the unscaled ‖g‖ from a launch's per-tensor sums."""
    g_norm = sums[:, SumColumn.G2].sqrt()
    return sums[:, SumColumn.W2].sqrt(), g_norm if inv_scale is None else g_norm * inv_scale
