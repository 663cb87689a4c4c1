"""pytest-benchmark microbenchmarks of one optimizer step per backend.

    .venv/bin/python -m pytest bench/test_bench_optim.py --benchmark-only [--benchmark-json out.json]

Not part of the test suite (tests/ only). python -m bench.optim_step prints the same
comparison as a table with the floor of docs/contract.md, "The floors".
"""

import pytest
import torch

from bench.optim_step import DEFAULT_WORKLOADS, OPTIMIZER_ARGS, WORKLOADS, backends_for, make_optimizer, make_params

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("workload", DEFAULT_WORKLOADS[DEVICE.type])
@pytest.mark.parametrize("optimizer", list(OPTIMIZER_ARGS))
@pytest.mark.parametrize("backend", backends_for(DEVICE))
def test_step(benchmark, workload, optimizer, backend):
    params = make_params(WORKLOADS[workload](), DEVICE)
    opt = make_optimizer(optimizer, backend, params, OPTIMIZER_ARGS[optimizer])
    opt.step()  # state exists before timing

    def step():
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{optimizer}-{workload}"
    benchmark(step)
