"""Optimizer step time of every available backend, side by side in one run.

    python -m bench.optim_step [--device cpu|cuda] [--workloads resnet50 bert_large tiny2000]
                               [--min-run-time 1.0] [--results DIR]

Workloads: ResNet-50's parameter shapes (torchvision, no weights: 25.6M parameters
in 161 tensors), BERT-Large's (335M in ~390 tensors; on the GPU by default), and
2,000 tiny tensors (the launch-bound case). Rows: every fastlars backend usable on
the device, plus timm's Lars/Lamb when timm is installed, and on CUDA "triton+graph":
the triton step captured once in a CUDA graph (capturable=True) and replayed. Each step is timed with
torch.utils.benchmark (median of repeated blocks; it synchronizes CUDA). Reported
per row: ms/step, speed-up over the `reference` backend measured in the same run,
effective GB/s (minimum bytes / time) and the fraction of the floor (docs/contract.md, "The floors")
(minimum bytes / measured device-to-device copy bandwidth, measured in the same run).
Writes <results>/optim_step-<device>-<date>.json.
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
from fastlars import backends

# docs/contract.md, "The floors": fewest bytes per fp32 element a step must move
MIN_BYTES_PER_ELEMENT = {"LARS": 20, "LAMB": 28}
OPTIMIZER_ARGS = {"LARS": dict(lr=0.1, momentum=0.9, weight_decay=5e-5),
                  "LAMB": dict(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)}  # timm's default clipping
RESULTS = Path(__file__).parent / "results"


def write_results(result: dict, stem: str, folder: Path) -> None:
    """<folder>/<stem>-<date>.json, the date taken from the result."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{result['date'][:19].replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def resnet50_shapes() -> list[torch.Size]:
    import torchvision

    with torch.device("meta"):  # shapes only: nothing allocated, no weights downloaded
        model = torchvision.models.resnet50(weights=None)
    return [p.shape for p in model.parameters()]


def tiny_shapes(count: int = 2000) -> list[torch.Size]:
    g = torch.Generator().manual_seed(0)
    return [torch.Size([int(n)]) for n in torch.randint(1, 256, (count,), generator=g)]


def bert_large_shapes(layers: int = 24, hidden: int = 1024, ffn: int = 4096, vocab: int = 30522) -> list[torch.Size]:
    """BERT-Large (uncased) parameter shapes, written out: ~335M parameters."""
    S = torch.Size
    shapes = [S([vocab, hidden]), S([512, hidden]), S([2, hidden]), S([hidden]), S([hidden])]  # embeddings + LN
    for _ in range(layers):
        shapes += [S([hidden, hidden]), S([hidden])] * 4  # Q, K, V, attention output
        shapes += [S([hidden]), S([hidden])]  # LayerNorm
        shapes += [S([ffn, hidden]), S([ffn]), S([hidden, ffn]), S([hidden])]  # feed-forward
        shapes += [S([hidden]), S([hidden])]  # LayerNorm
    shapes += [S([hidden, hidden]), S([hidden])]  # pooler
    return shapes


WORKLOADS = {"resnet50": resnet50_shapes, "bert_large": bert_large_shapes, "tiny2000": tiny_shapes,
             "toy": lambda: tiny_shapes(20)}  # the device check's dry run
DEFAULT_WORKLOADS = {"cpu": ["resnet50", "tiny2000"], "cuda": ["resnet50", "bert_large", "tiny2000"]}


def make_params(shapes, device) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=g))
        p.grad = torch.randn(shape, device=device, generator=g) * 1e-2
        params.append(p)
    return params


def groups_of(params):
    """The usual two groups (docs/contract.md, "Which parameters adapt"): ndim <= 1
    excluded from decay and trust ratio."""
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


def backends_for(device: torch.device) -> list[str]:
    """fastlars backends usable on the device, reference first; then timm's, if installed."""
    rows = sorted(backends.usable_on(device.type), key=lambda b: b != "reference")
    try:
        import timm.optim  # noqa: F401

        rows.append("timm")
    except ImportError:
        pass
    return rows


def make_optimizer(name: str, backend: str, params, kwargs):
    if backend == "timm":
        import timm.optim

        timm_cls = {"LARS": timm.optim.Lars, "LAMB": timm.optim.Lamb}[name]
        return timm_cls(groups_of(params), **kwargs)
    return fastlars.make_optimizer(name, groups_of(params), backend=backend, **kwargs)


def captured_step(name: str, params, kwargs) -> torch.cuda.CUDAGraph:
    """The triton step captured in a CUDA graph (capturable=True, a tensor lr): what a
    step costs without Python, the launch-bound case's real floor."""
    lr = torch.tensor(kwargs["lr"], device=params[0].device)
    opt = fastlars.make_optimizer(name, groups_of(params), backend="triton", capturable=True, skip_nonfinite=True,
                                  **{**kwargs, "lr": lr})
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # state, compiled kernels, cached tables
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    graph.keep = (opt, lr)  # the graph reads their memory at every replay
    return graph


def run(device: torch.device, workloads: list[str], min_run_time: float) -> dict:
    rows, errors = [], []
    bandwidth = {}
    for workload in workloads:
        shapes = WORKLOADS[workload]()
        numel = sum(s.numel() for s in shapes)
        bandwidth[workload] = copy_bandwidth(device, numel, min_run_time)
        for name, kwargs in OPTIMIZER_ARGS.items():
            min_bytes = MIN_BYTES_PER_ELEMENT[name] * numel
            floor_s = min_bytes / bandwidth[workload]
            reference_ms = None
            graph_rows = ["triton+graph"] if device.type == "cuda" and "triton" in backends_for(device) else []
            for backend in backends_for(device) + graph_rows:
                params = make_params(shapes, device)
                if backend == "triton+graph":
                    try:
                        opt = captured_step(name, params, kwargs)
                    except Exception as e:  # report, keep the other rows
                        errors.append(f"{workload} {name} {backend}: {type(e).__name__}: {e}")
                        print(f"skipped {backend} for {workload} {name}: {errors[-1]}")
                        continue
                    stmt = "opt.replay()"
                else:
                    opt = make_optimizer(name, backend, params, kwargs)
                    opt.step()  # create state and compile kernels outside the timed region
                    stmt = "opt.step()"
                t = Timer(stmt, globals=dict(opt=opt)).blocked_autorange(min_run_time=min_run_time)
                ms = t.median * 1e3
                reference_ms = reference_ms or ms
                rows.append(dict(workload=workload, tensors=len(shapes), numel=numel, optimizer=name,
                                 backend=backend, ms_per_step=ms, speedup_vs_reference=reference_ms / ms,
                                 effective_GBps=min_bytes / t.median / 1e9,
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
        errors=errors,
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
    header = (f"{'workload':<10} {'tensors':>7} {'optimizer':<9} {'backend':<12} {'ms/step':>9} "
              f"{'vs reference':>12} {'GB/s':>7} {'of floor':>9}")
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(f"{r['workload']:<10} {r['tensors']:>7} {r['optimizer']:<9} {r['backend']:<12} "
              f"{r['ms_per_step']:>9.2f} {r['speedup_vs_reference']:>11.2f}x {r['effective_GBps']:>7.1f} "
              f"{r['fraction_of_floor']:>8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        help="default: resnet50 tiny2000 on the CPU, all on the GPU")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timed row")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = run(device, args.workloads or DEFAULT_WORKLOADS.get(device.type, ["resnet50"]), args.min_run_time)
    print_table(result)
    if not args.no_save:
        write_results(result, f"optim_step-{device.type}", args.results)


if __name__ == "__main__":
    main()
