"""DDP needs nothing from the optimizer: gradients arrive averaged over ranks, so LARS/LAMB
on 2 gloo ranks equal single-process training on the same global batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastlars
from conftest import backend_params

WORLD, GLOBAL_BATCH, STEPS = 2, 16, 5


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def make_opt(name, params, backend):
    if name == "LARS":
        return fastlars.LARS(params, lr=0.5, weight_decay=1e-3, backend=backend)
    return fastlars.LAMB(params, lr=0.01, max_grad_norm=1.0, backend=backend)


def worker(rank, name, backend, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    opt = make_opt(name, model.parameters(), backend)
    share = GLOBAL_BATCH // WORLD
    for step in range(STEPS):
        x, y = batch(step)
        F.cross_entropy(model(x[rank * share:(rank + 1) * share]), y[rank * share:(rank + 1) * share]).backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        torch.save([p.detach() for p in model.module.parameters()], out_file)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
@pytest.mark.parametrize("backend", backend_params([b for b in ("foreach", "cpu") if b in fastlars.available_backends()]))
def test_ddp_equals_single_process(name, backend, tmp_path):
    out = tmp_path / "params.pt"
    mp.spawn(worker, args=(name, backend, str(tmp_path / "store"), str(out)), nprocs=WORLD, join=True)
    model = mlp()
    opt = make_opt(name, model.parameters(), backend)
    for step in range(STEPS):
        x, y = batch(step)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(torch.load(out), model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
