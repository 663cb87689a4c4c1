"""Host (Python) time of one triton-backend step, with every kernel launch stubbed out.

    python -m bench.host_overhead [--steps 50] [--results DIR] [--no-save]

On a GPU an eager step costs at least this much CPU time whatever the kernels take
(ResNet-50's LARS floor on an H100 is ~0.17 ms), so this is what bounds the eager
speed of small and many-tensor workloads; a step captured in a CUDA graph
(``capturable=True``) does not pay it. Runs on any machine: the Triton kernels are
replaced by no-ops, the bookkeeping (validation, operands, launch-table keys, gate,
step counters) runs as in a real step. Workloads as bench/optim_step.py; each also with
a float lr changed before every step (what an lr scheduler does: ``schedule`` rows).
Writes <results>/host_overhead-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # import the kernels without a GPU; none is launched

import torch  # noqa: E402

import fastlars  # noqa: E402
from fastlars.ops import lamb_step, lars_step, multi_tensor  # noqa: E402
from bench.optim_step import RESULTS, WORKLOADS, _version, groups_of, make_params, write_results  # noqa: E402

OPTIMIZERS = {"LARS": dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
              "LAMB": dict(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)}


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> None:
    for module, name in ((lars_step, "lars_update_kernel"), (lamb_step, "lamb_norms_kernel"),
                         (lamb_step, "lamb_update_kernel"), (multi_tensor, "sumsq_kernel"),
                         (multi_tensor, "tensor_totals_kernel")):
        setattr(module, name, _NoLaunch())


def run(steps: int) -> dict:
    stub_kernels()
    rows = []
    for workload in ("resnet50", "tiny2000"):
        shapes = WORKLOADS[workload]()
        for name, kwargs in OPTIMIZERS.items():
            for schedule in (False, True):
                params = make_params(shapes, "cpu")
                opt = fastlars.make_optimizer(name, groups_of(params), backend="triton", skip_nonfinite=True, **kwargs)
                for _ in range(3):  # state, cached tables
                    opt.step()
                start = time.perf_counter()
                for _ in range(steps):
                    if schedule:  # a float lr that changes at every step, as a scheduler sets it
                        for group in opt.param_groups:
                            group["lr"] *= 0.999
                    opt.step()
                ms = (time.perf_counter() - start) / steps * 1e3
                rows.append(dict(workload=workload, tensors=len(shapes), optimizer=name, schedule=schedule,
                                 host_ms_per_step=ms, us_per_tensor=ms * 1e3 / len(shapes)))
    return dict(benchmark="host_overhead", date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                device="host CPU (kernels stubbed)", torch=torch.__version__, triton=_version("triton"),
                fastlars=fastlars.__version__, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    result = run(args.steps)
    print(f"{'workload':<10} {'tensors':>7} {'optimizer':<9} {'schedule':<8} {'host ms/step':>12} {'us/tensor':>9}")
    for r in result["rows"]:
        print(f"{r['workload']:<10} {r['tensors']:>7} {r['optimizer']:<9} {str(r['schedule']):<8} "
              f"{r['host_ms_per_step']:>12.2f} "
              f"{r['us_per_tensor']:>9.2f}")
    if not args.no_save:
        write_results(result, "host_overhead", args.results)


if __name__ == "__main__":
    main()
