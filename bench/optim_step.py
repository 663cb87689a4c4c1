"""Optimizer step time of every available backend, side by side in one run.

    python bench/optim_step.py [--device cpu|cuda] [--workloads resnet50 tiny2000] [--min-run-time 1.0]

Workloads: ResNet-50's parameter shapes (torchvision, no weights: 25.6M parameters
in 161 tensors) and 2,000 tiny tensors (the launch-bound case). Each step is timed
with torch.utils.benchmark (median of repeated blocks). Reported per row:
ms/step, speed-up over the `reference` backend measured in the same run, and the
fraction of SPEC.md's floor: minimum bytes per step / measured copy bandwidth.
Writes bench/results/optim_step-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

import fastlars

# SPEC.md, "The performance model": fewest bytes per fp32 element a step must move
MIN_BYTES_PER_ELEMENT = {"LARS": 20, "LAMB": 28}
OPTIMIZER_ARGS = {"LARS": dict(lr=0.1, momentum=0.9, weight_decay=5e-5),
                  "LAMB": dict(lr=1e-3, weight_decay=0.01)}
RESULTS = Path(__file__).parent / "results"


def resnet50_shapes() -> list[torch.Size]:
    import torchvision

    with torch.device("meta"):  # shapes only: nothing allocated, no weights downloaded
        model = torchvision.models.resnet50(weights=None)
    return [p.shape for p in model.parameters()]


def tiny_shapes(count: int = 2000) -> list[torch.Size]:
    g = torch.Generator().manual_seed(0)
    return [torch.Size([int(n)]) for n in torch.randint(1, 256, (count,), generator=g)]


WORKLOADS = {"resnet50": resnet50_shapes, "tiny2000": tiny_shapes}


def make_params(shapes, device) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=g))
        p.grad = torch.randn(shape, device=device, generator=g) * 1e-2
        params.append(p)
    return params


def groups_of(params):
    """The usual two groups (SPEC.md): ndim <= 1 excluded from decay and trust ratio."""
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "trust_ratio": False}]


def copy_bandwidth(device, numel: int, min_run_time: float) -> float:
    """Bytes/s of a device-to-device copy of `numel` fp32 values (read + write)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = Timer("dst.copy_(src)", globals=dict(src=src, dst=dst)).blocked_autorange(min_run_time=min_run_time)
    return 2 * 4 * numel / t.median


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(device: torch.device, workloads: list[str], min_run_time: float) -> dict:
    rows = []
    bandwidth = {}
    for workload in workloads:
        shapes = WORKLOADS[workload]()
        numel = sum(s.numel() for s in shapes)
        bandwidth[workload] = copy_bandwidth(device, numel, min_run_time)
        for name, kwargs in OPTIMIZER_ARGS.items():
            floor_s = MIN_BYTES_PER_ELEMENT[name] * numel / bandwidth[workload]
            reference_ms = None
            for backend in sorted(fastlars.available_backends(), key=lambda b: b != "reference"):
                params = make_params(shapes, device)
                opt = getattr(fastlars, name)(groups_of(params), backend=backend, **kwargs)
                opt.step()  # create state outside the timed region
                t = Timer("opt.step()", globals=dict(opt=opt)).blocked_autorange(min_run_time=min_run_time)
                ms = t.median * 1e3
                reference_ms = reference_ms or ms
                rows.append(dict(workload=workload, tensors=len(shapes), numel=numel, optimizer=name,
                                 backend=backend, ms_per_step=ms, speedup_vs_reference=reference_ms / ms,
                                 fraction_of_floor=floor_s * 1e3 / ms, floor_ms=floor_s * 1e3))
                del opt, params
    return dict(
        benchmark="optim_step",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=device_name(device),
        torch=torch.__version__,
        triton=_version("triton"),
        fastlars=fastlars.__version__,
        copy_bandwidth_GBps={k: v / 1e9 for k, v in bandwidth.items()},
        rows=rows,
    )


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def print_table(result: dict) -> None:
    print(f"device: {result['device']}   torch {result['torch']}   {result['date']}")
    print("copy bandwidth (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["copy_bandwidth_GBps"].items()))
    header = f"{'workload':<10} {'tensors':>7} {'optimizer':<9} {'backend':<10} {'ms/step':>9} {'vs reference':>12} {'of floor':>9}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(f"{r['workload']:<10} {r['tensors']:>7} {r['optimizer']:<9} {r['backend']:<10} "
              f"{r['ms_per_step']:>9.2f} {r['speedup_vs_reference']:>11.2f}x {r['fraction_of_floor']:>8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timed row")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()
    result = run(torch.device(args.device), args.workloads, args.min_run_time)
    print_table(result)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = result["date"][:19].replace(":", "")
        path = RESULTS / f"optim_step-{torch.device(args.device).type}-{stamp}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
