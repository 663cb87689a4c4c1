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
class StepRecord:
    """What a step leaves for layer_stats: per bucket, its group and parameters, and either
    the eager backends' norms and ratios or the fused launch's per-tensor sums."""

    buckets: list[Any]         # (group, params, names, eager norms or None, eager ratio or None, FusedRecord or None)
    inv_scale: Tensor | None


@dataclass
class FusedRecord:
    """A fused bucket's per-tensor sums, with what its ratio read at the step."""

    sums: Tensor
    first: list[bool]          # the tensor's momentum buffer was created by the step (LARS)
    lr: float | Tensor         # the group's lr at the step (a scheduler may have changed it since)


def names_of(optimizer, bucket) -> list[str]:
    group = optimizer.param_groups[bucket.group_index]
    names = group.get("param_names")
    return [names[pos] if names is not None else f"param_groups[{bucket.group_index}][{pos}]"
            for pos in bucket.positions]


def fused_sums(buckets, plan, norms) -> list[Tensor]:
    """Per bucket, the rows of its launch's per-tensor sums (the launches merge buckets by
    (device, dtype) in the order the plan met them, see TrustRatioOptimizer._plan)."""
    contexts = norms[0] if isinstance(norms, tuple) else norms  # LAMB: (contexts, global norm)
    keys = {}
    offsets = [0] * len(plan.launches)
    out = []
    for b in buckets:
        launch = keys.setdefault((b.device, b.params[0].dtype), len(keys))
        start = offsets[launch]
        offsets[launch] += len(b.params)
        lr = b.group["lr"]
        out.append(FusedRecord(contexts[launch].partials[start:offsets[launch]],
                               plan.launches[launch].first[start:offsets[launch]],
                               lr.clone() if isinstance(lr, Tensor) else lr))
    return out


def collect(optimizer, record: StepRecord) -> LayerStats:
    names, params, w_norms, g_norms, ratios = [], [], [], [], []
    for group, bucket_params, bucket_names, norms, ratio, fused in record.buckets:
        if fused is not None:
            w_norm, g_norm, ratio = optimizer._ratio_from_sums(group, fused, record.inv_scale)
        else:
            g_norm = norms[0]
            w_norm = norms[1] if len(norms) > 1 else torch.stack(
                [torch.linalg.vector_norm(p, dtype=g_norm.dtype) for p in bucket_params])
        device = params[0].device if params else g_norm.device
        names.extend(bucket_names)
        params.extend(bucket_params)
        w_norms.append(w_norm.to(device))
        g_norms.append(g_norm.to(device))
        ratios.append((torch.ones_like(g_norm) if ratio is None else ratio).to(device=device, dtype=g_norm.dtype))
    return LayerStats(names, params, torch.cat(w_norms), torch.cat(g_norms), torch.cat(ratios))


def sum_norms(sums: Tensor, inv_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """‖w‖ and the unscaled ‖g‖ from a launch's per-tensor sums."""
    g_norm = sums[:, SumColumn.G2].sqrt()
    return sums[:, SumColumn.W2].sqrt(), g_norm if inv_scale is None else g_norm * inv_scale
