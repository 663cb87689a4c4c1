"""FSDP2 (fully_shard) parameters: LARS and LAMB compute each layer's trust ratio from
the *global* norms and equal single-process training, on every backend. Collectives per
step: LARS one all-reduce (every layer's ||w||, ||g||); LAMB one without clipping
(||w||, ||g||, ||u||) and two with it (the clipping norm first, since u depends on it)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastlars
from conftest import backend_params

pytest.importorskip("torch.distributed.fsdp")
GLOBAL_BATCH, STEPS = 12, 6
KWARGS = dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, trust_clip=True, nesterov=True)
LAMB_KWARGS = dict(lr=0.02, weight_decay=0.01, trust_clip=True)
OPTIMIZERS = {"LARS": (fastlars.LARS, KWARGS, 1),  # (class, kwargs, all-reduces per step)
              "LAMB": (fastlars.LAMB, LAMB_KWARGS, 1),
              "LAMB-clip": (fastlars.LAMB, dict(LAMB_KWARGS, max_grad_norm=0.5), 2),
              # the LARS variant that needs every extra sum (w g, buf^2, buf g, buf w: docs/contract.md, "LARS variants")
              "LARS-momentum_update": (fastlars.LARS, dict(KWARGS, trust_clip=False, ratio_denominator="momentum_update",
                                                           zero_norm="plain_sgd", trust_bounds=(0.0, 0.5)), 1)}
BACKENDS = [b for b in ("reference", "foreach", "cpu", "triton") if b in fastlars.available_backends()]


def model():
    torch.manual_seed(0)  # 7 and 2 output rows: uneven shards, and an empty one on 3 ranks
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)


def groups(m):
    return fastlars.param_groups(m, weight_decay=1e-3)


def worker(rank, world, name, backend, init_file, out_file):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if backend == "triton":  # small chunks: a shard spans several, so their partials are summed
        from fastlars.ops import multi_tensor

        multi_tensor.CHUNK, multi_tensor.BLOCK, multi_tensor.PARTIAL_BLOCK = 8, 4, 2
    m = model()
    for layer in (m[0], m[2]):
        fully_shard(layer)
    fully_shard(m)
    cls, kwargs, per_step = OPTIMIZERS[name]
    opt = cls(groups(m), backend=backend, **kwargs)
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        F.cross_entropy(m(x[rank * share:(rank + 1) * share]), y[rank * share:(rank + 1) * share]).backward()
        dist.all_reduce = counting
        try:
            opt.step()
        finally:
            dist.all_reduce = original
        opt.zero_grad()
    assert len(calls) == per_step * STEPS, f"{len(calls)} all-reduces in {STEPS} steps"
    full = [p.full_tensor() for p in m.parameters()]
    state = {k: (v.full_tensor() if k != "step" else v) for k, v in opt.state[next(iter(m.parameters()))].items()}
    if rank == 0:
        torch.save((full, state), out_file)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it


def single_process(cls, kwargs, backend):
    """The run the ranks must equal: the same model, groups and batches, STEPS steps on one process."""
    m = model()
    opt = cls(groups(m), backend=backend, **kwargs)
    for step in range(STEPS):
        x, y = batch(step)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()
    return m, opt


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp2_equals_single_process(name, world, backend, tmp_path):
    if world == 2 and backend != "foreach":
        pytest.skip("3 ranks (uneven shards, an empty one) cover this backend")
    out = tmp_path / "params.pt"
    mp.spawn(worker, args=(world, name, backend, str(tmp_path / "store"), str(out)), nprocs=world, join=True)
    cls, kwargs, _ = OPTIMIZERS[name]
    m, opt = single_process(cls, kwargs, backend)
    full, state = torch.load(out)
    for p, q in zip(full, m.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-6)
    expected = opt.state[next(iter(m.parameters()))]
    for key, value in state.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


def _dcp_worker(rank, world, store, checkpoint, phase, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    m = model()
    for layer in (m[0], m[2]):
        fully_shard(layer)
    fully_shard(m)
    opt = fastlars.LARS(groups(m), **KWARGS)  # backend "auto" (the C++ kernels, when built)
    share = GLOBAL_BATCH // world

    def train(steps):
        for step in steps:
            x, y = batch(step)
            F.cross_entropy(m(x[rank * share:(rank + 1) * share]), y[rank * share:(rank + 1) * share]).backward()
            opt.step()
            opt.zero_grad()

    if phase == "uninterrupted":
        train(range(STEPS))
    elif phase == "save":
        train(range(STEPS // 2))
        model_state, optim_state = get_state_dict(m, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
    else:
        model_state, optim_state = get_state_dict(m, opt)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train(range(STEPS // 2, STEPS))
    full = [p.full_tensor() for p in m.parameters()]
    if rank == 0 and out:
        torch.save(full, out)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it


def test_dcp_checkpoint_resumes_identically(tmp_path):
    """Sharded (DTensor) optimizer state through torch.distributed.checkpoint, same world size."""
    checkpoint = str(tmp_path / "checkpoint")
    for phase, out in [("uninterrupted", tmp_path / "full.pt"), ("save", None), ("load", tmp_path / "resumed.pt")]:
        mp.spawn(_dcp_worker, args=(2, str(tmp_path / f"store-{phase}"), checkpoint, phase, out and str(out)),
                 nprocs=2, join=True)
    for a, b in zip(torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")):
        assert torch.equal(a, b)


def _placements_worker(rank, world, store, backend, out_file):
    """A Shard(0) DTensor, a Replicate DTensor and a plain tensor in one optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    full, grads = _placement_tensors()
    for name, (cls, kwargs, per_step) in OPTIMIZERS.items():
        # clones: a Replicate DTensor may share the storage it was made from
        ps = [torch.nn.Parameter(distribute_tensor(full[0].clone(), mesh, [Shard(0)])),
              torch.nn.Parameter(distribute_tensor(full[1].clone(), mesh, [Replicate()])),
              torch.nn.Parameter(full[2].clone())]
        opt = cls(ps, backend=backend, **kwargs)
        for step in range(3):
            for p, g in zip(ps, grads[step]):
                p.grad = distribute_tensor(g, mesh, p.placements) if hasattr(p, "placements") else g.clone()
            opt.step()
        result = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in ps]
        if rank == 0:
            torch.save(result, f"{out_file}.{name}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it


def _placement_tensors():
    g = torch.Generator().manual_seed(3)
    full = [torch.randn(5, 3, generator=g), torch.randn(4, 2, generator=g), torch.randn(6, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in full] for _ in range(3)]
    return full, grads


@pytest.mark.parametrize("backend", backend_params([b for b in ("foreach", "cpu") if b in BACKENDS]))
def test_replicated_and_plain_tensors_are_counted_once(backend, tmp_path):
    """Norms of Replicate-placed and plain tensors must not be multiplied by the world size."""
    out = tmp_path / "params"
    mp.spawn(_placements_worker, args=(2, str(tmp_path / "store"), backend, str(out)), nprocs=2, join=True)
    full, grads = _placement_tensors()
    for name, (cls, kwargs, _) in OPTIMIZERS.items():
        ps = [torch.nn.Parameter(t.clone()) for t in full]
        opt = cls(ps, backend=backend, **kwargs)
        for step in range(3):
            for p, g in zip(ps, grads[step]):
                p.grad = g.clone()
            opt.step()
        for got, want in zip(torch.load(f"{out}.{name}"), ps):
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
