"""Optimizer step under FSDP2 (fully_shard) on gloo ranks on the CPU, and its collectives.

    python -m bench.distributed_step [--world 2] [--steps 10] [--warmup 2] [--results DIR] [--no-save]

Parameters: torchvision's ResNet-50 (no weights; 25.6M parameters in 161 tensors), each
Bottleneck and then the root sharded with ``fully_shard`` over ``--world`` gloo ranks
spawned here (one thread each); gradients are random DTensors set directly, no forward.
Rows: fastlars.LARS, fastlars.LAMB with max_grad_norm=1.0 and without clipping, on the
"foreach", "reference" and "cpu" backends (a backend that refuses sharded parameters with
a ValueError is reported as unsupported). Per row, the median over the timed steps
(each started after a barrier) of: the whole ``opt.step()``, the time inside
``torch.distributed.all_reduce`` during it (a timing wrapper), the all-reduce calls per
step and the collective's share of the step; ranks are averaged. The same optimizer on the
unsharded model in one process, one thread, is measured for reference (ideal speed-up:
the world size). Writes <results>/distributed_step-cpu-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastlars
from bench.optim_step import RESULTS, write_results

OPTIMIZERS = {  # row name: (class, keyword arguments, weight decay of the adapted group)
    "LARS": ("LARS", dict(lr=0.1, momentum=0.9), 5e-5),
    "LAMB clip=1.0": ("LAMB", dict(lr=1e-3, max_grad_norm=1.0), 0.01),
    "LAMB": ("LAMB", dict(lr=1e-3), 0.01),
}
BACKENDS = ["foreach", "reference", "cpu"]


def resnet50() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)  # every rank builds the same weights; fully_shard keeps its own slice
    return torchvision.models.resnet50(weights=None)


def fill_grads(model: torch.nn.Module, seed: int) -> None:
    """Random gradients (1e-2 scale) set directly: local shards wrapped as the parameter's DTensor."""
    from torch.distributed.tensor import DTensor

    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if isinstance(p, DTensor):
            local = torch.randn(p.to_local().shape, generator=g) * 1e-2
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())
        else:
            p.grad = torch.randn(p.shape, generator=g) * 1e-2


def make_optimizer(row: str, backend: str, model: torch.nn.Module):
    cls, kwargs, weight_decay = OPTIMIZERS[row]
    return fastlars.make_optimizer(cls, model, weight_decay=weight_decay, backend=backend, **kwargs)


def time_steps(opt, warmup: int, steps: int, barrier=None) -> dict:
    """Median step seconds, all-reduce seconds and calls per step; the first step's
    ValueError (a backend refusing the parameters) becomes {"status": "unsupported: ..."}."""
    original = dist.all_reduce
    calls: list[float] = []

    def timed_all_reduce(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            calls.append(time.perf_counter() - start)

    step_s, reduce_s, counts = [], [], []
    for i in range(warmup + steps):
        if barrier is not None:
            barrier()  # every rank starts the step together: all-reduce time is waiting + transfer
        calls.clear()
        dist.all_reduce = timed_all_reduce
        start = time.perf_counter()
        try:
            opt.step()
        except ValueError as error:
            if i == 0:
                return {"status": f"unsupported: {error}"}
            raise
        finally:
            elapsed = time.perf_counter() - start
            dist.all_reduce = original
        if i >= warmup:
            step_s.append(elapsed)
            reduce_s.append(sum(calls))
            counts.append(len(calls))
    return {"status": "ok", "step_s": statistics.median(step_s), "all_reduce_s": statistics.median(reduce_s),
            "all_reduce_calls": max(counts), "all_reduce_calls_min": min(counts)}


def measure(row: str, backend: str, model: torch.nn.Module, warmup: int, steps: int, barrier=None) -> dict:
    """time_steps of a fresh optimizer; a ValueError building it (a backend refusing the
    parameters or the device) is reported as unsupported, as one at its first step."""
    try:
        opt = make_optimizer(row, backend, model)
    except ValueError as error:
        return {"status": f"unsupported: {error}"}
    return time_steps(opt, warmup, steps, barrier)


def rows_to_run(backends: list[str]) -> list[tuple[str, str]]:
    return [(row, backend) for row in OPTIMIZERS for backend in backends]


def worker(rank: int, world: int, init_file: str, out_file: str, warmup: int, steps: int, backends: list[str]) -> None:
    from torch.distributed.fsdp import fully_shard
    from torchvision.models.resnet import Bottleneck

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = resnet50()
    for block in [m for m in model.modules() if isinstance(m, Bottleneck)]:
        fully_shard(block)
    fully_shard(model)
    fill_grads(model, seed=rank)
    results = {}
    for row, backend in rows_to_run(backends):
        results[(row, backend)] = measure(row, backend, model, warmup, steps, barrier=dist.barrier)
    auto = make_optimizer("LARS", "auto", model).backend
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save({"ranks": gathered, "auto": auto}, out_file)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it


def unsharded(warmup: int, steps: int, backends: list[str]) -> dict:
    """The same optimizers on the whole model in this process, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = resnet50()
        fill_grads(model, seed=0)
        results = {}
        for row, backend in rows_to_run(backends):
            if backend not in fastlars.available_backends():
                results[(row, backend)] = {"status": "unsupported: not built"}
                continue
            results[(row, backend)] = measure(row, backend, model, warmup, steps)
        return results
    finally:
        torch.set_num_threads(threads)


def run(world: int, warmup: int, steps: int, backends: list[str]) -> dict:
    single = unsharded(warmup, steps, backends)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(worker, args=(world, os.path.join(tmp, "store"), out, warmup, steps, backends), nprocs=world,
                 join=True)
        sharded = torch.load(out)
    rows = []
    for key in rows_to_run(backends):
        per_rank = [r[key] for r in sharded["ranks"]]
        alone = single[key]
        entry = dict(optimizer=key[0], backend=key[1], world=world,
                     unsharded_ms=alone["step_s"] * 1e3 if alone["status"] == "ok" else None,
                     unsharded_status=alone["status"])
        refused = [r["status"] for r in per_rank if r["status"] != "ok"]
        if refused:
            rows.append({**entry, "status": refused[0]})
            continue
        step_ms = statistics.fmean(r["step_s"] for r in per_rank) * 1e3
        reduce_ms = statistics.fmean(r["all_reduce_s"] for r in per_rank) * 1e3
        rows.append({**entry, "status": "ok", "step_ms": step_ms, "all_reduce_ms": reduce_ms,
                     "all_reduce_calls_per_step": per_rank[0]["all_reduce_calls"],
                     "all_reduce_share": reduce_ms / step_ms,
                     "speedup_vs_unsharded": entry["unsharded_ms"] / step_ms if entry["unsharded_ms"] else None,
                     "per_rank": [{k: v for k, v in r.items() if k != "status"} for r in per_rank]})
    with torch.device("meta"):  # shapes only
        model = resnet50()
    return dict(
        benchmark="distributed_step",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores), "
               f"{world} gloo ranks x 1 thread; unsharded: 1 process x 1 thread",
        torch=torch.__version__,
        fastlars=fastlars.__version__,
        world_size=world,
        workload=dict(model="resnet50", tensors=sum(1 for _ in model.parameters()),
                      numel=sum(p.numel() for p in model.parameters()), sharding="fully_shard per Bottleneck + root"),
        warmup_steps=warmup, timed_steps=steps,
        auto_backend_sharded=sharded["auto"],
        rows=rows,
    )


def print_table(result: dict) -> None:
    print(f"device: {result['device']}   torch {result['torch']}   {result['date']}")
    w = result["workload"]
    print(f"workload: {w['model']}, {w['tensors']} tensors, {w['numel'] / 1e6:.1f}M parameters, {w['sharding']}; "
          f"median of {result['timed_steps']} steps; 'auto' picks {result['auto_backend_sharded']!r} under FSDP2")
    header = (f"{'optimizer':<14} {'backend':<10} {'step ms':>8} {'all_reduce ms':>13} {'calls':>5} {'share':>6} "
              f"{'unsharded ms':>12} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        unsharded_ms = f"{r['unsharded_ms']:>12.1f}" if r["unsharded_ms"] is not None else f"{'-':>12}"
        if r["status"] != "ok":
            alone = f"{r['unsharded_ms']:.1f} ms" if r["unsharded_ms"] is not None else r["unsharded_status"][:20]
            print(f"{r['optimizer']:<14} {r['backend']:<10} {r['status'][:70]}... (unsharded: {alone})")
            continue
        speedup = f"{r['speedup_vs_unsharded']:>7.2f}x" if r["speedup_vs_unsharded"] else f"{'-':>8}"
        print(f"{r['optimizer']:<14} {r['backend']:<10} {r['step_ms']:>8.1f} {r['all_reduce_ms']:>13.2f} "
              f"{r['all_reduce_calls_per_step']:>5g} {r['all_reduce_share']:>6.1%} {unsharded_ms} {speedup}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="gloo ranks")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (state creation)")
    parser.add_argument("--backends", nargs="+", default=BACKENDS, help="fastlars backends to try")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()
    result = run(args.world, args.warmup, args.steps, args.backends)
    print_table(result)
    if not args.no_save:
        write_results(result, "distributed_step-cpu", args.results)


if __name__ == "__main__":
    main()
