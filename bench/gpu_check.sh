#!/usr/bin/env bash
# The one command for a machine with a CUDA GPU (torch and Triton already installed there):
# the whole test suite on CUDA, then the benchmarks, all output under OUTDIR.
#   bash bench/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$PY - <<'PY' | tee "$out/device.txt"
import torch, importlib.metadata as md
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", md.version("triton"))
PY
$PY -m pytest -q tests 2>&1 | tee "$out/tests.txt"
tests_rc=${PIPESTATUS[0]}
$PY bench/optim_step.py --device cuda --results "$out" 2>&1 | tee "$out/optim_step.txt"
$PY bench/ghost_bn.py --device cuda --results "$out" 2>&1 | tee "$out/ghost_bn.txt"
$PY -m pytest bench/test_bench_optim.py bench/test_bench_ghost_bn.py --benchmark-only -q \
    --benchmark-json "$out/pytest-benchmark.json" 2>&1 | tail -n 60 > "$out/pytest-benchmark.txt"
exit "$tests_rc"
