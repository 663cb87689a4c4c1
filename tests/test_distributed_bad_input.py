"""Sharded parameters the optimizer cannot reduce correctly are refused with an error
naming the parameter: a 2-D mesh, a Partial placement, parameters on two meshes, and a
process group that is gone. (A plain gradient on a DTensor parameter torch refuses itself.)"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastlars

pytest.importorskip("torch.distributed.tensor")


def _expect(make_opt, match):
    """Build the optimizer and step it; the error must come before any parameter changes."""
    opt, params = make_opt()
    before = [p.to_local().clone() if hasattr(p, "to_local") else p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.to_local() if hasattr(p, "to_local") else p.detach(), b)


def _worker(rank, world, store, failures):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))

        def param(placements, on=mesh):
            p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), on, placements))
            p.grad = distribute_tensor(torch.randn(4, 3), on, placements)
            return p

        def lars(*params):
            return fastlars.LARS(list(params), lr=0.1, backend="foreach"), list(params)

        mesh_2d = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
        _expect(lambda: lars(param([Shard(0), Replicate()], on=mesh_2d)), r"params'\]\[0\].*2-D device mesh")

        partial = torch.nn.Parameter(DTensor.from_local(torch.randn(4, 3), mesh, [Partial()]))
        partial.grad = DTensor.from_local(torch.randn(4, 3), mesh, [Partial()])
        _expect(lambda: lars(partial), r"params'\]\[0\].*has placement P\(sum\).*Shard and Replicate")

        other = init_device_mesh("cpu", (world,), mesh_dim_names=("other",))
        _expect(lambda: lars(param([Shard(0)]), param([Shard(1)], on=other)), r"params'\]\[1\].*device mesh")

        gone = param([Shard(0)])
        opt = fastlars.LARS([gone], lr=0.1, backend="foreach")
        dist.barrier()
        dist.destroy_process_group()
        with pytest.raises(ValueError, match="not initialised"):
            opt.step()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        failures.put(f"rank {rank}: {type(e).__name__}: {e}")
    else:
        failures.put("")
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it


def test_sharded_bad_input_is_refused(tmp_path):
    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(rank, 2, str(tmp_path / "store"), failures)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    reports = [failures.get() for _ in procs]
    assert reports == ["", ""], reports
