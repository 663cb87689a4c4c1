"""Sharded parameters (FSDP2 ``fully_shard``: ``DTensor`` with ``Shard`` placements).

A trust ratio needs the norm of the *whole* layer; each rank holds a slice. The step
works on the local shards (``to_local()`` views, so in-place updates land in the
DTensor), and the per-layer squared norms of every layer are summed across the mesh
in **one** all-reduce of a flat vector, between the norms phase and the update (LAMB
with ``max_grad_norm > 0``: two, see ``LAMB._norms_phase``). Every backend does this:
the fused kernels' partial sums are reduced by ``fastlars.ops._tables.reduce_tensor_sums``.
Replicated tensors (and plain tensors, identical on every rank) are counted once:
their sums are divided by the world size before the all-reduce adds them up again.

State stays DTensor (created from local tensors with the parameter's placements), so
``state_dict`` and ``torch.distributed.checkpoint`` see sharded state as with
torch.optim.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch without distributed support
    DTensor = None


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


class LocalState(MutableMapping):
    """A parameter's state seen through local shards: DTensor values read as their local
    tensor; local tensors written become DTensors placed like the parameter (the
    0-d ``step`` counter stays a plain tensor)."""

    def __init__(self, state: dict, param: Tensor) -> None:
        self.state, self.param = state, param

    def __getitem__(self, key: str) -> Any:
        value = self.state[key]
        return value.to_local() if is_sharded(value) else value

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, Tensor) and key != "step" and not is_sharded(value):
            p = self.param
            value = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                       stride=p.stride())
        self.state[key] = value

    def __delitem__(self, key: str) -> None:
        del self.state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def check_placements(name: str, p: Tensor, mesh) -> Any:
    """The one 1-D mesh every sharded parameter must share; Shard or Replicate only."""
    if p.device_mesh.ndim != 1:
        raise ValueError(f"{name} lives on a {p.device_mesh.ndim}-D device mesh; only 1-D meshes (FSDP2's "
                         "fully_shard) are supported")
    for placement in p.placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise ValueError(f"{name} has placement {placement}; the optimizer can reduce norms over Shard "
                             "and Replicate placements only")
    if mesh is not None and p.device_mesh != mesh:
        raise ValueError(f"{name} is on device mesh {p.device_mesh}, but another parameter is on {mesh}; "
                         "one optimizer reduces its norms over one process group")
    if not dist.is_initialized():
        raise ValueError(f"{name} is a DTensor but torch.distributed is not initialised")
    return p.device_mesh


def reduce_sums(sums: Tensor, sharded: Tensor, mesh) -> Tensor:
    """Global per-tensor sums of squares from local ones, in one all-reduce.

    ``sums`` has one row per tensor (any number of columns: ||w||^2, ||g||^2, ...);
    ``sharded`` (bool, one per row) is True where the tensor is sharded (partial sums
    add up) and False where every rank holds it whole (counted once). Returns float64.
    """
    weights = torch.where(sharded.to(sums.device), 1.0, 1.0 / mesh.size()).to(torch.float64)
    total = sums.double() * (weights if sums.dim() == 1 else weights[:, None])
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return total


def reduce_norms(norms: list[Tensor], sharded: list[Tensor], mesh) -> list[Tensor]:
    """Global per-tensor norms from lists of local ones (1-D tensors; ``sharded`` of the
    same shapes, see reduce_sums), in one all-reduce."""
    sizes = [n.numel() for n in norms]
    squares = reduce_sums(torch.cat([n.double().square() for n in norms]), torch.cat(sharded).bool(), mesh)
    return [part.sqrt().to(n.dtype) for part, n in zip(squares.split(sizes), norms)]


def is_shard_placed(p: Tensor) -> bool:
    return is_sharded(p) and any(isinstance(pl, Shard) for pl in p.placements)


# FSDP1 (FullyShardedDataParallel) marks what it flattens with these attributes: its
# FlatParameter (``isinstance(t, FlatParameter)`` tests exactly ``_is_flat_param``) and,
# with ``use_orig_params=True``, every original parameter, which FULL_SHARD and SHARD_GRAD_OP
# turn into a 1-D view of this rank's fragment of the FlatParameter (possibly empty).
FSDP1_FLAT_PARAM, FSDP1_FLATTENED = "_is_flat_param", "_fsdp_flattened"


def check_not_flattened(name: str, p: Tensor) -> None:
    """Refuse the parameters of FSDP1, whose norms are not any layer's: a trust ratio per
    layer would silently become one per flat buffer (several layers) or per rank's fragment.
    DeepSpeed ZeRO swaps flat fp32 partitions into ``param_groups`` directly, unmarked and not
    through add_param_group: that cannot be seen here (README, "Sharded training: what works")."""
    if getattr(p, FSDP1_FLAT_PARAM, False):
        what = "an FSDP1 FlatParameter (FullyShardedDataParallel with use_orig_params=False): several layers " \
               "flattened into one buffer"
    elif getattr(p, FSDP1_FLATTENED, False):
        what = "a parameter of an FSDP1 FullyShardedDataParallel module (use_orig_params=True): when sharded, " \
               "each rank holds a flat 1-D fragment of it"
    else:
        return
    raise ValueError(f"{name} is {what}, so a per-layer trust ratio would be computed per buffer or fragment. "
                     "Shard with FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor parameters get "
                     "per-layer norms (one all-reduce per step), or replicate with DistributedDataParallel")
