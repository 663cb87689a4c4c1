"""pytest-benchmark: Ghost BN forward+backward per path at one ResNet-50 shape.

    .venv/bin/python -m pytest bench/test_bench_ghost_bn.py --benchmark-only
"""

import pytest
import torch

from bench.ghost_bn import fwd_bwd, paths_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("vbs", [32, 128])
@pytest.mark.parametrize("path", paths_for(DEVICE))
def test_fwd_bwd(benchmark, path, vbs):
    x = torch.randn(256, 256, 14, 14, device=DEVICE, requires_grad=True)
    dy = torch.randn_like(x)
    weight = torch.ones(256, device=DEVICE, requires_grad=True)
    bias = torch.zeros(256, device=DEVICE, requires_grad=True)

    def step():
        fwd_bwd(path, x, weight, bias, vbs, dy)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"ghost_bn-vbs{vbs}"
    benchmark(step)
