#!/usr/bin/env bash
# The device check: one command for a lent GPU (an H200 with torch 2.11 and Triton 3.6
# preinstalled, no network), planned to finish in 8 minutes, most valuable results first:
#   1 facts   device name, SMs, L2, memory, versions, device-to-device copy bandwidth
#   2 build   the C++/CUDA extension for sm_90 only, all cores, no pip and no network, with the
#             CUDA toolkit that `python -m fastlars --cuda-home` names (CUDA_HOME, else /usr/local/cuda,
#             else the toolkit behind nvcc on PATH, even where that nvcc is a wrapper script)
#   3 tests   the GPU tests: fused backends, the issue-14 faults, capturable, CUDA graphs, Ghost BN, cast_rne;
#             every file to the end (no -x: one failure must not hide the others), 120 s a test
#   4 optim   bench/optim_step.py: every backend, torch's fused SGD/AdamW, bf16, CUDA graphs, interleaved,
#             ResNet-50 and BERT-Large shapes; not the variant rows, whose kernels would not compile in
#             its limit (python -m bench.optim_step --device cuda --workloads resnet50 times them)
#   5 gbn     bench/ghost_bn.py: ResNet-50 activation shapes, vs nn.BatchNorm2d and the chunk loop
#   6 e2e     reduced end-to-end: global batch 8192, SGD+BN (torch's fused step) vs LARS+GBN on triton,
#             2 rounds of 1 timed step
# Each stage has its own time limit, cut to what is left of the budget; a stage that would
# start with less than MIN_STAGE_S left is skipped with a line saying so. The limits add up
# to the GPU budget, so every stage gets its turn. A stage at its limit gets SIGINT (pytest
# then still writes its summary and JUnit XML), and SIGKILL 20 s later. Results are at
# most 8 files directly under OUTDIR (JSON, and the one log gpu_check.log), so they come back
# whole: device.json, tests.json, optim_step-*.json, ghost_bn-*.json, e2e-*.json,
# gpu_check.json (each stage's status, exit code and seconds), gpu_check.log.
#
#   bash bench/gpu_check.sh OUTDIR             on the GPU machine
#   bash bench/gpu_check.sh --dry-run OUTDIR   every stage on the CPU at toy sizes (tests under
#                                              Triton's interpreter); CI runs it (tests/test_gpu_check.py)
#   --build                                    with --dry-run: build even when the extension exists
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 480; dry run 100, 1200 with --build),
# GPU_CHECK_STAGES (the stages to run, e.g. "facts tests"; default all).
set -uo pipefail
dry=0 build=0
while [ $# -gt 1 ]; do
    case $1 in
        --dry-run) dry=1 ;;
        --build) build=1 ;;
        *) break ;;
    esac
    shift
done
out=${1:?usage: bash bench/gpu_check.sh [--dry-run [--build]] OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget=${GPU_CHECK_BUDGET_S:-$([ $dry = 0 ] && echo 480 || { [ $build = 1 ] && echo 1200 || echo 100; })}
MIN_STAGE_S=20
log="$out/gpu_check.log"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
: > "$log"
: > "$scratch/stages.tsv"
say() { echo "$*" | tee -a "$log"; }

if [ $dry = 1 ]; then
    # the CPU, Triton's kernels interpreted, one thread (toy sizes; CI machines are shared)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    device=cpu
else
    device=cuda
fi

# each stage's limit, most valuable first; on the GPU they add up to the 480 s budget (expected:
# facts ~15 s, build ~60-90 s, tests ~90 s, optim ~60 s, gbn ~40 s, e2e ~60 s). The dry run's
# build and tests run on 2 shared cores, interpreted: longer limits, within the caller's budget
# (the sm_90 build takes 1-2 minutes on 2 idle cores, over 5 on loaded ones).
if [ $dry = 1 ]; then
    limit_facts=60 limit_build=900 limit_tests=240 limit_optim=60 limit_gbn=60 limit_e2e=90
else
    limit_facts=30 limit_build=110 limit_tests=150 limit_optim=70 limit_gbn=50 limit_e2e=70
fi

# stage NAME LIMIT_S COMMAND...: run with min(LIMIT_S, budget left) seconds, output to the log
stage() {
    local name=$1 limit=$2 left began rc status
    shift 2
    if [ -n "${GPU_CHECK_STAGES:-}" ] && [[ " $GPU_CHECK_STAGES " != *" $name "* ]]; then
        say "== $name: skipped, not in GPU_CHECK_STAGES"
        printf '%s\tskipped\t\t0\tnot selected\n' "$name" >> "$scratch/stages.tsv"
        return
    fi
    left=$((budget - SECONDS))
    if [ "$left" -lt "$MIN_STAGE_S" ]; then
        say "== $name: skipped, budget spent (${SECONDS} s of ${budget} s used)"
        printf '%s\tskipped\t\t0\tbudget spent\n' "$name" >> "$scratch/stages.tsv"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "== $name: up to ${limit} s: $*"
    began=$SECONDS
    timeout -s INT --kill-after=20 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    say "== $name: $status (exit $rc) in $((SECONDS - began)) s"
    printf '%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$((SECONDS - began))" >> "$scratch/stages.tsv"
}

# 1. device facts
# the CUDA toolkit, by fastlars's one rule (fastlars/_extension.py: find_cuda_toolkit); the line says why
cuda_home=$("$PY" -m fastlars --cuda-home 2> "$scratch/toolkit")
say "== toolkit: $(cat "$scratch/toolkit")"

stage facts $limit_facts "$PY" - "$out/device.json" "$device" "$cuda_home" <<'PY'
import json, platform, subprocess, sys
from pathlib import Path
import torch
from bench.optim_step import _version, copy_bandwidth, device_name

path, device, cuda_home = Path(sys.argv[1]), torch.device(sys.argv[2]), sys.argv[3]
facts = dict(device=device_name(device), torch=torch.__version__, torch_cuda=torch.version.cuda,
             triton=_version("triton"), python=platform.python_version(), cpus=torch.get_num_threads())
if device.type == "cuda":
    props = torch.cuda.get_device_properties(device)
    facts.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                 l2_MB=props.L2_cache_size / 2**20, memory_GiB=props.total_memory / 2**30,
                 free_GiB=torch.cuda.mem_get_info(device)[0] / 2**30)
facts["cuda_home"] = cuda_home or None
try:
    nvcc = [str(Path(cuda_home, "bin", "nvcc")), "--version"]
    facts["nvcc"] = subprocess.run(nvcc, capture_output=True, text=True).stdout.strip().splitlines()[-1]
except (OSError, IndexError):
    facts["nvcc"] = None
numel = 2**28 if device.type == "cuda" else 2**22  # 1 GiB of fp32 on the GPU, far past the L2
facts["copy_bandwidth_GBps"] = copy_bandwidth(device, numel, 0.5 if device.type == "cuda" else 0.05) / 1e9
path.write_text(json.dumps(facts, indent=2) + "\n")
print(json.dumps(facts, indent=2))
PY

# 2. the extension, built in place for sm_90 only (no pip, so no network and no build isolation);
# this Python's own build (another Python's .so beside it does not count)
so=fastlars/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
if [ $dry = 1 ] && [ $build = 0 ] && [ -e "$so" ]; then
    say "== build: skipped in the dry run, the extension is already built ($so; --build builds anyway)"
    printf 'build\tskipped\t\t0\talready built\n' >> "$scratch/stages.tsv"
elif [ -z "$cuda_home" ] && [ $dry = 0 ]; then
    say "== build: failed, no CUDA toolkit (backend='cuda' goes untested)"
    printf 'build\tfailed\t\t0\tno CUDA toolkit\n' >> "$scratch/stages.tsv"
else
    # no toolkit in the dry run: the CPU kernels alone, as a machine without one builds them
    toolkit_env=(CUDA_HOME="$cuda_home")
    [ -z "$cuda_home" ] && toolkit_env=(FASTLARS_NO_CUDA=1)
    stage build $limit_build env MAX_JOBS="$(env -u OMP_NUM_THREADS nproc)" TORCH_CUDA_ARCH_LIST=9.0 "${toolkit_env[@]}" \
        "$PY" setup.py build_ext --inplace
fi

# 3. the GPU tests (in the dry run: the same files, their GPU tests skipped, a few interpreter tests run)
timeout_flag=()
"$PY" -c "import pytest_timeout" 2> /dev/null && timeout_flag=(--timeout 120)  # else the stage's own limit
if [ $dry = 1 ]; then
    selection=(tests/test_fused_gpu.py tests/test_cast_rne.py tests/test_ghost_bn.py -k "fused or rne or int64 or grid")
else
    selection=(tests/test_fused_gpu.py tests/test_gpu_readiness.py tests/test_capturable.py tests/test_ghost_bn.py
               tests/test_cast_rne.py tests/test_extension.py
               # last, so that the stage's limit cuts these first: issue 19's variants on cuda and compiled Triton
               tests/test_lars_variants.py::test_gpu_backend_matches_reference
               tests/test_lamb_variants.py::test_gpu_backends_match_reference)
fi
stage tests $limit_tests "$PY" -m pytest -q -p no:cacheprovider "${timeout_flag[@]}" --junitxml "$scratch/tests.xml" \
    "${selection[@]}"

# 4-6. the benchmarks
if [ $dry = 1 ]; then
    stage optim $limit_optim "$PY" -m bench.optim_step --device cpu --workloads toy --rounds 3 --min-run-time 0.01 --results "$out"
    stage gbn $limit_gbn "$PY" -m bench.ghost_bn --device cpu --batch 8 --vbs 4 --shapes 8x4 16x2 --min-run-time 0.01 \
        --results "$out"
    stage e2e $limit_e2e "$PY" -m fastlars.bench e2e --device cpu --global-batch 8 --micro-batch 4 --image-size 16 \
        --model resnet18 --configs sgd+bn lars+gbn --sgd torch-fused --backends foreach --steps 1 --repeats 2 \
        --results "$out" --no-plot
else
    stage optim $limit_optim "$PY" -m bench.optim_step --device cuda --workloads resnet50 bert_large --min-run-time 0.2 --no-variants \
        --results "$out"
    stage gbn $limit_gbn "$PY" -m bench.ghost_bn --device cuda --min-run-time 0.1 --results "$out"
    stage e2e $limit_e2e "$PY" -m fastlars.bench e2e --device cuda --global-batch 8192 --configs sgd+bn lars+gbn \
        --sgd torch-fused --backends triton --steps 1 --repeats 2 --results "$out" --no-plot
fi

# the summary: every stage, and the tests' counts and failures
"$PY" - "$scratch/stages.tsv" "$scratch/tests.xml" "$out" "$budget" "$SECONDS" "$dry" <<'PY' | tee -a "$log"
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

stages_tsv, tests_xml, out, budget, elapsed, dry = sys.argv[1:]
stages = []
for line in Path(stages_tsv).read_text().splitlines():
    name, status, rc, seconds, note = line.split("\t")
    stages.append(dict(name=name, status=status, exit_code=int(rc) if rc else None, seconds=int(seconds), note=note))
tests = dict(ran=False)
if Path(tests_xml).exists():
    suites = ET.parse(tests_xml).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    count = lambda key: sum(int(s.get(key, 0)) for s in suites)
    failures = [dict(test=f"{case.get('classname')}::{case.get('name')}", message=(bad.get("message") or "")[:500])
                for s in suites for case in s.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    tests = dict(ran=True, total=count("tests"), failures=count("failures"), errors=count("errors"),
                 skipped=count("skipped"), failed=failures)
Path(out, "tests.json").write_text(json.dumps(tests, indent=2) + "\n")
summary = dict(dry_run=dry == "1", budget_s=int(budget), elapsed_s=int(elapsed), stages=stages,
               files=sorted(p.name for p in Path(out).iterdir()) + ["gpu_check.json"])
Path(out, "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'stage':<7} {'status':<8} {'exit':>4} {'s':>5}  note")
for s in stages:
    print(f"{s['name']:<7} {s['status']:<8} {s['exit_code'] if s['exit_code'] is not None else '':>4} {s['seconds']:>5}  {s['note']}")
if tests["ran"]:
    print(f"tests: {tests['total']} run, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped")
print(f"{int(elapsed)} s of a {budget} s budget; files: {', '.join(summary['files'])}")
PY
[ -z "$(cut -f2 "$scratch/stages.tsv" | grep -v -x -e ok -e skipped)" ]
