"""End-to-end ResNet-50 training throughput at large global batch, per optimizer and norm layer.

Configurations: SGD + BatchNorm (the baseline), LARS + BatchNorm, LARS + Ghost BN and
LAMB + Ghost BN, each fastlars optimizer on every backend usable on the device. The
global batch (8K-32K on a GPU) is reached by gradient accumulation over micro-batches
of synthetic ImageNet-shaped data generated on the device; bf16 autocast and
channels_last on a GPU. Reported per configuration: images/s, the optimizer's and the
norm layers' share of step time (the latter from one profiled step), peak memory.
Writes JSON and a PNG plot. On the CPU a reduced configuration runs by default (32x32
images, global batch 64, 5 timed steps): a smoke run of the same code, minutes not hours.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastlars
from fastlars import backends as registry
from fastlars.schedules import WarmupPolyDecay, scale_lr
from fastlars.train import accumulate_gradients

CONFIGS = [("sgd", "bn"), ("lars", "bn"), ("lars", "gbn"), ("lamb", "gbn")]
NORM_OPS = re.compile(r"batch_norm|ghost_bn|GhostBN", re.IGNORECASE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--global-batch", type=int, nargs="+", default=[8192, 16384, 32768] if gpu else [64])
    parser.add_argument("--micro-batch", type=int, default=256 if gpu else 16)
    parser.add_argument("--image-size", type=int, default=224 if gpu else 32)
    parser.add_argument("--steps", type=int, default=3 if gpu else 5, help="timed optimizer steps per configuration")
    parser.add_argument("--virtual-batch-size", type=int, default=32 if gpu else 8)
    parser.add_argument("--backends", nargs="+", help="fastlars backends (default: every usable one but reference)")
    parser.add_argument("--configs", nargs="+", default=[f"{o}+{n}" for o, n in CONFIGS],
                        choices=[f"{o}+{n}" for o, n in CONFIGS])
    parser.add_argument("--model", default="resnet50", help="a torchvision classification model name")
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--no-plot", action="store_true")


def usable_backends(device: torch.device, requested: list[str] | None) -> list[str]:
    if not requested:
        return [b for b in registry.usable_on(device.type) if b != "reference"]
    return [b for b in requested if registry.get(b).devices is None or device.type in registry.get(b).devices]


def build(model_name: str, norm: str, vbs: int, device, memory_format):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None)
    if norm == "gbn":
        model = fastlars.convert_ghost_batchnorm(model, vbs)
    return model.to(device=device, memory_format=memory_format)


def make_optimizer(kind: str, backend: str, model, global_batch: int):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=scale_lr(0.1, global_batch), momentum=0.9,
                               weight_decay=5e-5, foreach=True)
    if kind == "lars":
        return fastlars.make_optimizer("lars", model, weight_decay=5e-5, lr=scale_lr(0.1, global_batch), momentum=0.9,
                                       backend=backend)
    return fastlars.make_optimizer("lamb", model, weight_decay=0.01, lr=scale_lr(1e-3, global_batch, rule="sqrt"),
                                   backend=backend)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, scheduler, data, micro_batch, autocast_dtype, memory_format, device) -> float:
    """One optimizer step at the global batch; returns the optimizer's seconds."""
    inputs, targets = data
    accumulate_gradients(model, F.cross_entropy, inputs, targets, micro_batch, autocast_dtype=autocast_dtype,
                         memory_format=memory_format)
    sync(device)
    start = time.perf_counter()
    opt.step()
    sync(device)
    optimizer_s = time.perf_counter() - start
    scheduler.step()
    opt.zero_grad(set_to_none=True)
    return optimizer_s


def norm_share(step, device) -> float:
    """Share of one step's time spent in batch-norm / ghost-BN operators (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    norms = sum(getattr(e, attr) for e in events if NORM_OPS.search(e.key))
    return norms / total if total else 0.0


def fits(device, model, opt_kind: str) -> tuple[bool, str]:
    """A GPU pre-check: parameters, gradients and optimizer state against free memory."""
    if device.type != "cuda":
        return True, ""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    need = params * (2 + (2 if opt_kind == "lamb" else 1))
    free, _ = torch.cuda.mem_get_info(device)
    return need < free, f"needs at least {need / 2**30:.2f} GiB for weights, gradients and state; {free / 2**30:.2f} GiB free"


def run_config(args, device, opt_kind, norm, backend, global_batch, progress) -> dict:
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    row = dict(optimizer=opt_kind, norm=norm, backend=backend if opt_kind != "sgd" else "torch-foreach",
               global_batch=global_batch, micro_batch=args.micro_batch, image_size=args.image_size)
    if global_batch % args.micro_batch:
        raise ValueError(f"global batch {global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    model = build(args.model, norm, args.virtual_batch_size, device, memory_format)
    ok, why = fits(device, model, opt_kind)
    if not ok:
        return {**row, "status": f"does not fit: {why}"}
    opt = make_optimizer(opt_kind, backend, model, global_batch)
    scheduler = WarmupPolyDecay(opt, total_steps=args.steps + 10, warmup_steps=2)
    g = torch.Generator(device=device).manual_seed(0)
    data = (torch.randn(global_batch, 3, args.image_size, args.image_size, device=device, generator=g),
            torch.randint(0, 1000, (global_batch,), device=device, generator=g))
    step = lambda: train_step(model, opt, scheduler, data, args.micro_batch, autocast_dtype, memory_format, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step()  # warm-up: state, compilation; an out-of-memory stops here, not mid-measurement
    except torch.OutOfMemoryError:
        return {**row, "status": f"does not fit: out of memory at micro-batch {args.micro_batch}"}
    sync(device)
    start, optimizer_s = time.perf_counter(), 0.0
    for _ in range(args.steps):
        optimizer_s += step()
        progress.update(1)
    sync(device)
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**row, "status": "ok", "images_per_s": global_batch * args.steps / elapsed,
            "step_s": elapsed / args.steps, "optimizer_share": optimizer_s / elapsed,
            "norm_share": norm_share(step, device), "peak_memory_GiB": peak / 2**30,
            "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS"}


def run(args) -> dict:
    from tqdm import tqdm

    device = torch.device(args.device)
    backends = usable_backends(device, args.backends)
    plan = []
    for global_batch in args.global_batch:
        for name in args.configs:
            opt_kind, norm = name.split("+")
            for backend in (["-"] if opt_kind == "sgd" else backends):
                plan.append((opt_kind, norm, backend, global_batch))
    rows = []
    with tqdm(total=len(plan) * args.steps, desc="e2e", unit="step") as progress:
        for opt_kind, norm, backend, global_batch in plan:
            progress.set_postfix_str(f"{opt_kind}+{norm} {backend} B={global_batch}")
            rows.append(run_config(args, device, opt_kind, norm, backend, global_batch, progress))
    result = dict(benchmark="e2e", date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                  torch=torch.__version__, fastlars=fastlars.__version__, model=args.model, rows=rows)
    print_table(result)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"e2e-{device.type}-{result['date'][:19].replace(':', '')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {stem.with_suffix('.json')}")
    if not args.no_plot:
        plot(result, stem.with_suffix(".png"))
    return result


def print_table(result: dict) -> None:
    print(f"device: {result['device']}   torch {result['torch']}   model {result['model']}   {result['date']}")
    header = f"{'config':<10} {'backend':<14} {'batch':>6} {'images/s':>9} {'vs SGD+BN':>9} {'optimizer':>9} {'norms':>6} {'peak GiB':>8}"
    print(header)
    print("-" * len(header))
    baseline = {r["global_batch"]: r.get("images_per_s") for r in result["rows"] if r["optimizer"] == "sgd"}
    for r in result["rows"]:
        name = f"{r['optimizer']}+{r['norm']}"
        if r["status"] != "ok":
            print(f"{name:<10} {r['backend']:<14} {r['global_batch']:>6} {r['status']}")
            continue
        base = baseline.get(r["global_batch"])
        rel = f"{r['images_per_s'] / base:>8.1%}" if base else "     n/a"
        print(f"{name:<10} {r['backend']:<14} {r['global_batch']:>6} {r['images_per_s']:>9.1f} {rel:>9} "
              f"{r['optimizer_share']:>9.1%} {r['norm_share']:>6.1%} {r['peak_memory_GiB']:>8.2f}")


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    labels = [f"{r['optimizer']}+{r['norm']}\n{r['backend']}\nB={r['global_batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["images_per_s"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("images/s")
    ax.set_title(f"{result['model']} training throughput, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
