"""examples/train_ddp.py and examples/train_fsdp.py run under torchrun on 2 gloo ranks
(tiny settings: resnet18 on 16px images, global batch 32 = 2 ranks x 2 micro-batches of 8,
so the no-sync path of the accumulation runs) and print a finite loss at every step."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS = 2
TINY = ["--global-batch", "32", "--micro-batch", "8", "--image-size", "16", "--steps", str(STEPS),
        "--model", "resnet18", "--num-classes", "10", "--virtual-batch-size", "4"]


@pytest.mark.parametrize("script, extra", [("train_ddp.py", []), ("train_fsdp.py", []),
                                           ("train_fsdp.py", ["--lamb"])], ids=["ddp", "fsdp", "fsdp-lamb"])
def test_example_runs_under_torchrun(script, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU, even on a GPU host
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / script), *TINY, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    losses = [float(x) for x in re.findall(r"^step \d+/\d+\s+loss (\S+)", proc.stdout, re.MULTILINE)]
    assert len(losses) == STEPS, proc.stdout
    assert all(math.isfinite(x) for x in losses), proc.stdout
    assert ("LAMB" if extra else "LARS") in proc.stdout
