"""End-to-end ResNet-50 training throughput at large global batch, per optimizer and norm layer.

Configurations: SGD + BatchNorm (the baseline: torch's fused SGD step, and its foreach step
as a labelled extra row), LARS + BatchNorm, LARS + Ghost BN and LAMB + Ghost BN, each
fastlars optimizer on every backend usable on the device. The global batch (8K-32K on a
GPU) is reached by gradient accumulation over micro-batches of synthetic ImageNet-shaped
data generated on the device; bf16 autocast and channels_last on a GPU.

Every configuration of a global batch is built and warmed up first, then timed in
``--repeats`` rounds, round-robin (each round times ``--steps`` steps of each configuration,
starting one configuration later than the round before), so that a slow minute of the
machine falls on every configuration alike. Reported per configuration: images/s (median of
the rounds), its ratio to SGD+BN's fused step timed in the same round (median and the
rounds' min-max), the optimizer step's share of step time (median, min-max), the norm
layers' share (from one profiled step) and, on a GPU, peak memory. Every round is in the
JSON; a PNG plot. On the CPU a reduced configuration runs by default (32x32 images, global
batch 64): a smoke run of the same code, about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fastlars
from fastlars import backends as registry
from fastlars.schedules import WarmupPolyDecay, scale_lr
from fastlars.train import accumulate_gradients

CONFIGS = [("sgd", "bn"), ("lars", "bn"), ("lars", "gbn"), ("lamb", "gbn")]
# torch's own SGD steps; the first is the baseline every ratio divides by
SGD_STEPS = ["torch-fused", "torch-foreach"]
NORM_OPS = re.compile(r"batch_norm|ghost_bn|GhostBN", re.IGNORECASE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--global-batch", type=int, nargs="+", default=[8192, 16384, 32768] if gpu else [64])
    parser.add_argument("--micro-batch", type=int, default=256 if gpu else 16)
    parser.add_argument("--image-size", type=int, default=224 if gpu else 32)
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per configuration per round")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds over the configurations; each ratio's interval is the rounds' min-max")
    parser.add_argument("--virtual-batch-size", type=int, default=32 if gpu else 8)
    parser.add_argument("--backends", nargs="+", help="fastlars backends (default: every usable one but reference)")
    parser.add_argument("--sgd", nargs="+", default=SGD_STEPS, choices=SGD_STEPS,
                        help="torch SGD steps for sgd+bn; ratios divide by the first one listed")
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
        return torch.optim.SGD(model.parameters(), lr=scale_lr(0.1, global_batch), momentum=0.9, weight_decay=5e-5,
                               **({"fused": True} if backend == "torch-fused" else {"foreach": True}))
    if kind == "lars":
        return fastlars.make_optimizer("lars", model, weight_decay=5e-5, lr=scale_lr(0.1, global_batch), momentum=0.9,
                                       backend=backend)
    return fastlars.make_optimizer("lamb", model, weight_decay=0.01, lr=scale_lr(1e-3, global_batch, rule="sqrt"),
                                   backend=backend)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, scheduler, data, micro_batch, autocast_dtype, memory_format, device) -> tuple[float, float]:
    """One optimizer step at the global batch; returns (the step's seconds, the optimizer's seconds)."""
    inputs, targets = data
    start = time.perf_counter()
    accumulate_gradients(model, F.cross_entropy, inputs, targets, micro_batch, autocast_dtype=autocast_dtype,
                         memory_format=memory_format)
    sync(device)
    opt_start = time.perf_counter()
    opt.step()
    sync(device)
    optimizer_s = time.perf_counter() - opt_start
    scheduler.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start, optimizer_s


# Lines Kineto (torch.profiler's backend) writes to the process's stderr that report nothing
# wrong: trace markers on every profile, and, on a CUDA build of torch where no GPU can be
# used, the failed device count it tries for the trace's metadata.
KINETO_MARKER = re.compile(r"^USDT:.*\] profiler_(start|stop)$")
KINETO_NO_GPU = re.compile(r"^ERROR:.*\] gpuGetDeviceCount failed with code \d+$")


@contextlib.contextmanager
def kineto_noise_dropped():
    """Capture the C-level stderr (Kineto logs past Python's ``sys.stderr``) and write back
    every line but the markers and, where no GPU is usable, the device-count failure; a
    real error keeps its line. Kineto's log level cannot do this: the markers sit above
    ERROR, so a level that hides them hides every error."""
    drop = [KINETO_MARKER] + ([] if torch.cuda.is_available() else [KINETO_NO_GPU])
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(p.match(line.rstrip("\n")) for p in drop)))
            sys.stderr.flush()


def norm_share(step, device) -> float:
    """Share of one step's time spent in batch-norm / ghost-BN operators (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with kineto_noise_dropped():
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


@dataclass
class Config:
    """One configuration, built and warmed up, alive for all the rounds of its global batch."""

    row: dict
    step: Callable[[], tuple[float, float]] | None = None
    resident_bytes: int = 0  # on a GPU: its model and optimizer state between steps
    rounds: list[dict] = field(default_factory=list)


def prepare(args, device, opt_kind, norm, backend, data, progress) -> Config:
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    global_batch = data[0].shape[0]
    config = Config(dict(optimizer=opt_kind, norm=norm, backend=backend, global_batch=global_batch,
                         micro_batch=args.micro_batch, image_size=args.image_size))
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = build(args.model, norm, args.virtual_batch_size, device, memory_format)
    ok, why = fits(device, model, opt_kind)
    if not ok:
        config.row["status"] = f"does not fit: {why}"
        return config
    opt = make_optimizer(opt_kind, backend, model, global_batch)
    scheduler = WarmupPolyDecay(opt, total_steps=steps_per_config(args) + 10, warmup_steps=2)
    step = lambda: train_step(model, opt, scheduler, data, args.micro_batch, autocast_dtype, memory_format, device)
    try:
        step()  # warm-up: state, compilation; an out-of-memory stops here, not mid-measurement
    except torch.OutOfMemoryError:
        config.row["status"] = f"does not fit: out of memory at micro-batch {args.micro_batch}"
    if config.row.get("status"):
        del model, opt, scheduler, step  # outside the except clause, whose traceback holds the step's tensors
        torch.cuda.empty_cache()
        return config
    progress.update(1)
    config.row["status"] = "ok"
    config.step = step
    if device.type == "cuda":
        config.resident_bytes = torch.cuda.memory_allocated(device) - allocated
    return config


def time_round(config: Config, args, device, position: int, progress) -> None:
    """``--steps`` timed steps of one configuration; on a GPU also its peak memory: its
    resident tensors plus the most the steps allocated on top of everything resident."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    steps = []
    for _ in range(args.steps):
        step_s, optimizer_s = config.step()
        steps.append(dict(step_s=step_s, optimizer_s=optimizer_s))
        progress.update(1)
    elapsed = sum(s["step_s"] for s in steps)
    record = dict(position=position, steps=steps, images_per_s=config.row["global_batch"] * args.steps / elapsed,
                  optimizer_share=sum(s["optimizer_s"] for s in steps) / elapsed)
    if device.type == "cuda":
        record["peak_memory_GiB"] = (config.resident_bytes + torch.cuda.max_memory_allocated(device) - before) / 2**30
    config.rounds.append(record)


def spread(values: list[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def summarise(configs: list[Config], baseline: Config | None) -> None:
    """Per configuration: the rounds' images/s, ratio to the baseline of the same round and
    optimizer share, each as median and min-max."""
    for config in configs:
        if config.row["status"] != "ok":
            continue
        rounds = config.rounds
        if baseline is not None:
            for mine, base in zip(rounds, baseline.rounds):
                mine["vs_baseline"] = mine["images_per_s"] / base["images_per_s"]
            config.row["vs_baseline"] = spread([r["vs_baseline"] for r in rounds])
        config.row["images_per_s"] = statistics.median(r["images_per_s"] for r in rounds)
        config.row["optimizer_share"] = spread([r["optimizer_share"] for r in rounds])
        if "peak_memory_GiB" in rounds[0]:
            config.row["peak_memory_GiB"] = max(r["peak_memory_GiB"] for r in rounds)
        config.row["rounds"] = rounds


def steps_per_config(args) -> int:
    return 1 + args.repeats * args.steps + 1  # warm-up, timed, profiled


def measure(args, device, plan, global_batch, progress) -> list[dict]:
    """Build every configuration of one global batch, time them round-robin, profile each once."""
    g = torch.Generator(device=device).manual_seed(0)
    data = (torch.randn(global_batch, 3, args.image_size, args.image_size, device=device, generator=g),
            torch.randint(0, 1000, (global_batch,), device=device, generator=g))
    configs = []
    for opt_kind, norm, backend in plan:
        progress.set_postfix_str(f"warm-up {opt_kind}+{norm} {backend} B={global_batch}")
        configs.append(prepare(args, device, opt_kind, norm, backend, data, progress))
        if configs[-1].row["status"] != "ok":
            progress.update(steps_per_config(args))
    live = [c for c in configs if c.row["status"] == "ok"]
    for repeat in range(args.repeats):
        start = repeat % len(live) if live else 0
        for position, config in enumerate(live[start:] + live[:start]):
            progress.set_postfix_str(f"round {repeat + 1}/{args.repeats} {config.row['optimizer']}+"
                                     f"{config.row['norm']} {config.row['backend']} B={global_batch}")
            time_round(config, args, device, position, progress)
    for config in live:
        progress.set_postfix_str(f"profile {config.row['optimizer']}+{config.row['norm']} {config.row['backend']} "
                                 f"B={global_batch}")
        config.row["norm_share"] = norm_share(config.step, device)
        config.step = None  # frees the model and optimizer before the next global batch
        progress.update(1)
    baseline = next((c for c in live if c.row["optimizer"] == "sgd" and c.row["backend"] == args.sgd[0]), None)
    if baseline is not None:
        baseline.row["baseline"] = True
    summarise(configs, baseline)
    return [c.row for c in configs]


def run(args) -> dict:
    from tqdm import tqdm

    if args.steps < 1 or args.repeats < 1:
        raise ValueError(f"--steps and --repeats must be >= 1, got {args.steps} and {args.repeats}")
    for global_batch in args.global_batch:
        if global_batch % args.micro_batch:
            raise ValueError(f"global batch {global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    device = torch.device(args.device)
    backends = usable_backends(device, args.backends)
    plan = []
    for name in args.configs:
        opt_kind, norm = name.split("+")
        plan += [(opt_kind, norm, backend) for backend in (args.sgd if opt_kind == "sgd" else backends)]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    with tqdm(total=len(args.global_batch) * len(plan) * steps_per_config(args), desc="e2e", unit="step") as progress:
        for global_batch in args.global_batch:
            rows += measure(args, device, plan, global_batch, progress)
    result = dict(benchmark="e2e", date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                  torch=torch.__version__, fastlars=fastlars.__version__, model=args.model,
                  repeats=args.repeats, steps_per_round=args.steps,
                  baseline=f"sgd+bn {args.sgd[0]}" if "sgd+bn" in args.configs else None,
                  interval=interval_meaning(args.repeats), cpu_cores=os.cpu_count(),
                  load_average=[load_before, os.getloadavg()[0] if load_before is not None else None], rows=rows)
    if device.type == "cpu":
        result["process_max_rss_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    print_table(result)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"e2e-{device.type}-{result['date'][:19].replace(':', '')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {stem.with_suffix('.json')}")
    if not args.no_plot:
        plot(result, stem.with_suffix(".png"))
    return result


def interval_meaning(repeats: int) -> str:
    # the median of a distribution lies outside the min-max of n independent draws with
    # probability 2 * 2**-n (all draws on one side of it)
    return (f"min-max of the {repeats} rounds: a distribution-free {1 - 2 * 0.5 ** repeats:.0%} interval for the "
            f"median ratio if the rounds are independent")


def print_table(result: dict) -> None:
    print(f"device: {result['device']}   torch {result['torch']}   model {result['model']}   {result['date']}")
    if result["load_average"][0] is not None:
        # other processes on the cores stretch some rounds more than others: the intervals widen
        print("machine: 1-minute load average {:.1f} before, {:.1f} after, {} cores".format(
            *result["load_average"], result["cpu_cores"]))
    gpu = any("peak_memory_GiB" in r for r in result["rows"])
    header = (f"{'config':<9} {'optimizer step':<17} {'batch':>6} {'images/s':>9} {'vs SGD+BN [min-max]':>22} "
              f"{'optimizer [min-max]':>21} {'norms':>6}" + (f" {'peak GiB':>8}" if gpu else ""))
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        name = f"{r['optimizer']}+{r['norm']}"
        step = r["backend"] if r["optimizer"] == "sgd" else f"fastlars {r['backend']}"
        if r["status"] != "ok":
            print(f"{name:<9} {step:<17} {r['global_batch']:>6} {r['status']}")
            continue
        vs = r.get("vs_baseline")
        rel = ("baseline" if r.get("baseline") else f"{vs['median']:.1%} [{vs['min']:.0%}-{vs['max']:.0%}]" if vs
               else "n/a")
        share = r["optimizer_share"]
        opt = f"{share['median']:.1%} [{share['min']:.1%}-{share['max']:.1%}]"
        print(f"{name:<9} {step:<17} {r['global_batch']:>6} {r['images_per_s']:>9.1f} {rel:>22} {opt:>21} "
              f"{r['norm_share']:>6.1%}" + (f" {r['peak_memory_GiB']:>8.2f}" if gpu else ""))
    print(f"images/s: median of {result['repeats']} rounds, round-robin over the configurations, "
          f"{result['steps_per_round']} timed step(s) each.")
    if result["baseline"]:
        print(f"vs SGD+BN: each round's images/s over {result['baseline']}'s in the same round; median "
              f"[{result['interval']}].")
    print("optimizer: opt.step()'s share of step time, median [min-max over the rounds]. "
          "norms: batch-norm/Ghost BN operators' share of operator time in one profiled step.")
    if "process_max_rss_GiB" in result:
        print(f"memory: process max RSS {result['process_max_rss_GiB']:.2f} GiB, every configuration alive at once.")


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
    for x, r in enumerate(rows):
        rates = [round_["images_per_s"] for round_ in r["rounds"]]
        ax.scatter([x] * len(rates), rates, color="tab:blue", s=10, alpha=0.6)
        ax.hlines(r["images_per_s"], x - 0.3, x + 0.3, color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("images/s (each round; line: median)")
    ax.set_title(f"{result['model']} training throughput, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
