"""Ghost BN forward+backward time at ResNet-50 activation shapes, every path side by side.

    python -m bench.ghost_bn [--device cpu|cuda] [--batch 256] [--vbs 32 128] [--min-run-time 0.5]
                             [--shapes CxHW ...] [--results DIR]

Paths: `nn.BatchNorm2d` (plain BN over the whole batch: cuDNN on a GPU; the speed
to match), the chunk loop (F.batch_norm per `x.split(vbs)` chunk, then cat: the
common implementation, keeping no ghost statistics), and fastlars's `native`,
`vectorized` and `triton` (GPU only) backends. Configurations: fp32 NCHW and bf16 channels_last, vbs 32 and
128. Reported: ms per forward+backward, speed-up over the chunk loop, and the
fraction of the floor (docs/contract.md, "The floors") (read x and write y forward, read x and dy and write dx
backward: 5 x activation bytes, over the copy bandwidth measured in the same run).
On the CPU a reduced set of shapes runs by default (the largest ones take seconds
per step on two cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import fastlars
from fastlars.nn.ghost_bn import ghost_batch_norm
from bench.optim_step import RESULTS, _version, copy_bandwidth, device_name, write_results

# (channels, height/width) of ResNet-50's BatchNorm inputs
RESNET50_BN = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]
CPU_SHAPES = [(64, 28), (256, 14), (2048, 7)]
CONFIGS = [(torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)]


def paths_for(device: torch.device) -> list[str]:
    paths = ["batchnorm", "chunk_loop", "native", "vectorized"]
    if device.type == "cuda" and "triton" in fastlars.available_backends():
        paths.append("triton")
    return paths


def fwd_bwd(path: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, vbs: int, dy: torch.Tensor):
    if path == "batchnorm":
        y = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)
    elif path == "chunk_loop":  # the common implementation (no ghost statistics kept)
        y = torch.cat([F.batch_norm(c, None, None, weight, bias, True, 0.0, 1e-5) for c in x.split(vbs)])
    else:
        y = ghost_batch_norm(x, weight, bias, vbs, 1e-5, path)[0]
    y.backward(dy)


def run(device: torch.device, batch: int, vbs_list: list[int], shapes, min_run_time: float) -> dict:
    rows = []
    largest = max(c * hw * hw for c, hw in shapes) * batch
    bandwidth = copy_bandwidth(device, largest, min_run_time)
    for dtype, memory_format in CONFIGS:
        for channels, hw in shapes:
            x = torch.randn(batch, channels, hw, hw, device=device, dtype=dtype)
            x = x.contiguous(memory_format=memory_format).requires_grad_()
            dy = torch.randn_like(x)
            weight = torch.ones(channels, device=device, requires_grad=True)
            bias = torch.zeros(channels, device=device, requires_grad=True)
            floor_ms = 5 * x.numel() * x.element_size() / bandwidth * 1e3
            for vbs in vbs_list:
                loop_ms = None
                for path in paths_for(device):
                    fwd_bwd(path, x, weight, bias, vbs, dy)  # warm-up, compilation
                    # on the threads torch uses, as copy_bandwidth (Timer's default is one thread)
                    t = Timer("fwd_bwd(path, x, weight, bias, vbs, dy)",
                              globals=dict(fwd_bwd=fwd_bwd, path=path, x=x, weight=weight, bias=bias, vbs=vbs, dy=dy),
                              num_threads=torch.get_num_threads())
                    ms = t.blocked_autorange(min_run_time=min_run_time).median * 1e3
                    loop_ms = ms if path == "chunk_loop" else loop_ms
                    rows.append(dict(dtype=str(dtype).replace("torch.", ""),
                                     layout="channels_last" if memory_format == torch.channels_last else "NCHW",
                                     shape=[batch, channels, hw, hw], vbs=vbs, path=path, ms=ms,
                                     fraction_of_floor=floor_ms / ms, floor_ms=floor_ms))
                for r in rows[-len(paths_for(device)):]:
                    r["speedup_vs_loop"] = loop_ms / r["ms"]
            del x, dy
    return dict(benchmark="ghost_bn", date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                device=device_name(device), torch=torch.__version__, triton=_version("triton"),
                fastlars=fastlars.__version__, copy_bandwidth_GBps=bandwidth / 1e9, rows=rows,
                triton_kernels=triton_kernel_resources() if "triton" in paths_for(device) else [])


def triton_kernel_resources() -> list[dict]:
    """Registers and spills of the Triton kernels as this device's Triton compiled and loaded
    them (bench/NOTES.md has the ahead-of-time ptxas figures to compare with)."""
    from fastlars.ops import ghost_bn as kernels

    found = []
    try:
        for fn in (kernels.ghost_bn_forward_kernel, kernels.ghost_bn_backward_kernel):
            for caches in fn.device_caches.values():
                for kernel in caches[0].values():  # the compiled kernels of this device
                    constants = {(fn.arg_names[k[0]] if isinstance(k, tuple) else k): getattr(v, "value", v)
                                 for k, v in getattr(kernel.src, "constants", {}).items()}
                    found.append(dict(kernel=fn.__name__, num_warps=kernel.metadata.num_warps,
                                      BLOCK=int(constants.get("BLOCK", 0)), ONE_PASS=bool(constants.get("ONE_PASS")),
                                      registers=getattr(kernel, "n_regs", None), spills=getattr(kernel, "n_spills", None)))
    except Exception as e:  # Triton's internals move between versions: report, keep the timings
        found.append(dict(error=f"{type(e).__name__}: {e}"))
    return found


def print_table(result: dict) -> None:
    print(f"device: {result['device']}   torch {result['torch']}   {result['date']}")
    print(f"copy bandwidth: {result['copy_bandwidth_GBps']:.1f} GB/s")
    header = f"{'dtype':<9} {'layout':<13} {'shape':<20} {'vbs':>4} {'path':<11} {'ms fwd+bwd':>10} {'vs loop':>8} {'of floor':>9}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['dtype']:<9} {r['layout']:<13} {shape:<20} {r['vbs']:>4} {r['path']:<11} {r['ms']:>10.2f} "
              f"{r['speedup_vs_loop']:>7.2f}x {r['fraction_of_floor']:>8.1%}")
    for k in result.get("triton_kernels", []):
        print(k.get("error") or f"{k['kernel']} BLOCK={k['BLOCK']} one_pass={k['ONE_PASS']} num_warps={k['num_warps']}: "
                                f"{k['registers']} registers, {k['spills']} spills")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vbs", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--shapes", nargs="+", metavar="CxHW", help="channels x height (default: ResNet-50's)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = RESNET50_BN if device.type == "cuda" else CPU_SHAPES
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    result = run(device, args.batch, args.vbs, shapes, args.min_run_time)
    print_table(result)
    if not args.no_save:
        write_results(result, f"ghost_bn-{device.type}", args.results)


if __name__ == "__main__":
    main()
