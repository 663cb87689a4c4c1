"""Flattened parameters are refused: FSDP1 (FullyShardedDataParallel) hands the optimizer
a FlatParameter holding several layers, or, with use_orig_params=True, each rank's flat
1-D fragment of every layer, so a per-layer trust ratio would silently become one per
buffer or fragment. The error names the parameter and points to FSDP2 / DDP, and comes
before anything is stored (docs/contract.md, README "Sharded training")."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastlars

pytest.importorskip("torch.distributed.fsdp")
OPTIMIZERS = [fastlars.LARS, fastlars.LAMB]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def fsdp1(module, use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel

    with warnings.catch_warnings():  # FSDP1's deprecation; one rank: FULL_SHARD becomes NO_SHARD
        warnings.simplefilter("ignore")
        return FullyShardedDataParallel(module, use_orig_params=use_orig_params, device_id=torch.device("cpu"))


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_fsdp1_flat_parameter_refused(one_rank, cls):
    from torch.distributed.fsdp._flat_param import FlatParameter

    wrapped = fsdp1(model(), use_orig_params=False)
    (flat,) = wrapped.parameters()
    assert isinstance(flat, FlatParameter) and flat.shape == (4 * 3 + 4 + 2 * 4 + 2,)  # both layers in one
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] .* is an FSDP1 FlatParameter.*"
                                         r"fully_shard.*DistributedDataParallel"):
        cls(wrapped.parameters(), lr=0.1)
    # added to a working optimizer: refused, and the optimizer is left as it was
    plain = torch.nn.Linear(2, 2)
    opt = cls(plain.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] .* FlatParameter"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3)), flat]})
    assert len(opt.param_groups) == 1 and list(opt.param_groups[0]["params"]) == list(plain.parameters())


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_fsdp1_use_orig_params_refused(one_rank, cls):
    wrapped = fsdp1(model(), use_orig_params=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] .* FSDP1 .*use_orig_params=True"):
        cls(fastlars.param_groups(wrapped, weight_decay=1e-4), lr=0.1)


def test_unwrapped_and_fsdp2_parameters_accepted(one_rank):
    """The check keys on FSDP1's marks only: plain and FSDP2 (DTensor) parameters pass."""
    from torch.distributed.fsdp import fully_shard

    fastlars.LARS(model().parameters(), lr=0.1)
    sharded = model()
    fully_shard(sharded)
    fastlars.LAMB(sharded.parameters(), lr=0.1)


def _two_ranks(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        wrapped = fsdp1(model(), use_orig_params=True)
        shapes = [tuple(p.shape) for p in wrapped.parameters()]
        try:
            fastlars.LARS(wrapped.parameters(), lr=0.1)
            refused = ""
        except ValueError as e:
            refused = str(e)
        torch.save((shapes, refused), f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it


def test_fsdp1_use_orig_params_shards_are_flat_fragments(tmp_path):
    """Why use_orig_params=True is refused too: sharded on 2 ranks, the optimizer gets 1-D
    fragments (the 4 x 3 weight on rank 0 only, the 4-bias split 1 + 3 across ranks)."""
    mp.spawn(_two_ranks, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    (shapes0, refused0), (shapes1, refused1) = (torch.load(tmp_path / f"out.{r}") for r in range(2))
    assert shapes0 == [(12,), (1,), (0,), (0,)] and shapes1 == [(0,), (3,), (8,), (2,)]
    assert "use_orig_params=True" in refused0 and "use_orig_params=True" in refused1
