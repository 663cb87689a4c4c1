"""pytest-benchmark microbenchmarks of one optimizer step per backend.

    .venv/bin/python -m pytest bench/test_bench_optim.py --benchmark-only [--benchmark-json out.json]

Not part of the test suite (tests/ only). bench/optim_step.py prints the same
comparison as a table with the SPEC.md floor.
"""

import pytest
import torch

import fastlars
from optim_step import OPTIMIZER_ARGS, WORKLOADS, groups_of, make_params

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZER_ARGS))
@pytest.mark.parametrize("backend", fastlars.available_backends())
def test_step(benchmark, workload, optimizer, backend):
    params = make_params(WORKLOADS[workload](), DEVICE)
    opt = getattr(fastlars, optimizer)(groups_of(params), backend=backend, **OPTIMIZER_ARGS[optimizer])
    opt.step()  # state exists before timing

    def step():
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{optimizer}-{workload}"
    benchmark(step)
