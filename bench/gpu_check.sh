#!/usr/bin/env bash
# The device check: one command for a lent GPU (an H100 or H200 with torch 2.11 and Triton 3.6
# preinstalled, no network), planned to finish in 9 minutes, most valuable results first:
#   1 facts   every import the stages need (present or missing, with versions), device name, SMs,
#             L2, memory, versions, device-to-device copy bandwidth
#   2 build   the C++/CUDA extension for sm_90 only, all cores, no pip and no network, with the
#             CUDA toolkit that `python -m fastlars --cuda-home` names (CUDA_HOME, else /usr/local/cuda,
#             else the toolkit behind nvcc on PATH, even where that nvcc is a wrapper script); a build
#             that fails (or no toolkit, or a build that does not load) sets FASTLARS_NO_EXTENSION=1
#             for every later stage, so that none compiles it again inside its own limit
#   3 tests   the GPU tests, one pytest per part, strongest first: tests:fused (large shapes, bf16
#             masters, CUDA graphs), tests:variants (the LARS/LAMB variants at ResNet-50 sizes, bf16
#             with masters), tests:layer_stats, tests:backends and tests:nonfinite (every CUDA case of
#             the optimizer tests), tests:capturable, tests:cast_rne, tests:ghost_bn; the CPU-only
#             cases left out; every part to the end (no -x), 60 s a test
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
# gpu_check.json (each stage's status, exit code and seconds, the extension's state, the test
# selection), gpu_check.log.
#
#   bash bench/gpu_check.sh OUTDIR             on the GPU machine
#   bash bench/gpu_check.sh --dry-run OUTDIR   every stage on the CPU: the same test selection (its GPU
#                                              cases skip or are not collected there; a part that selects
#                                              nothing on the CPU passes, saying so), the benchmarks at toy
#                                              sizes under Triton's interpreter; CI runs it (tests/test_gpu_check.py)
#   --build                                    with --dry-run: build even when the extension exists
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 540; dry run 300, 1500 with --build),
# GPU_CHECK_STAGES (the stages to run, e.g. "facts tests:fused"; "tests" names every tests:* part;
# default all).
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
budget=${GPU_CHECK_BUDGET_S:-$([ $dry = 0 ] && echo 540 || { [ $build = 1 ] && echo 1500 || echo 300; })}
MIN_STAGE_S=20
log="$out/gpu_check.log"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
: > "$log"
: > "$scratch/stages.tsv"
: > "$scratch/selection.txt"
say() { echo "$*" | tee -a "$log"; }

if [ $dry = 1 ]; then
    # the CPU, Triton's kernels interpreted, one thread (toy sizes; CI machines are shared)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    device=cpu
else
    device=cuda
fi

# each stage's limit, most valuable first; on the GPU they add up to the 540 s budget (expected:
# facts ~15 s, build ~60-90 s, the tests ~200 s (mostly Triton compiles, cached on disk from one part
# to the next), optim ~40 s, gbn ~25 s, e2e ~30 s). The dry run's build and tests run on 2 shared
# cores, interpreted: longer limits, within the caller's budget (the sm_90 build takes 1-2 minutes
# on 2 idle cores, over 5 on loaded ones).
if [ $dry = 1 ]; then
    limit_facts=60 limit_build=900 limit_optim=60 limit_gbn=60 limit_e2e=90
else
    limit_facts=30 limit_build=110 limit_optim=45 limit_gbn=30 limit_e2e=35
fi

# stage NAME LIMIT_S COMMAND...: run with min(LIMIT_S, budget left) seconds, output to the log.
# A tests:* part that selects nothing (pytest's exit 5) passes in the dry run only: the CPU has
# no CUDA cases to select, a GPU always has.
stage() {
    local name=$1 limit=$2 left began rc status note=""
    shift 2
    if [ -n "${GPU_CHECK_STAGES:-}" ] && [[ " $GPU_CHECK_STAGES " != *" $name "* ]] &&
        [[ " $GPU_CHECK_STAGES " != *" ${name%%:*} "* ]]; then
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
    if [ $rc = 5 ] && [ $dry = 1 ] && [[ $name == tests:* ]]; then
        status=ok note="nothing selected on the CPU"
    fi
    say "== $name: $status (exit $rc) in $((SECONDS - began)) s${note:+: $note}"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - began))" "$note" >> "$scratch/stages.tsv"
}

# 1. the imports the stages need, then the device facts
# the CUDA toolkit, by fastlars's one rule (fastlars/_cuda_toolkit.py: find_cuda_toolkit); the line says why
cuda_home=$("$PY" -m fastlars --cuda-home 2> "$scratch/toolkit")
say "== toolkit: $(cat "$scratch/toolkit")"

stage facts $limit_facts "$PY" - "$out/device.json" "$device" "$cuda_home" <<'PY'
import importlib, importlib.metadata, json, platform, shutil, subprocess, sys
from pathlib import Path

path, device_arg, cuda_home = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
# module -> (distribution, what needs it); imported, not only looked up: a package that is
# there but does not import (a missing library, another torch's build) is as missing
NEEDED = {
    "torch": ("torch", "everything"), "numpy": ("numpy", "the tests, bench"),
    "pytest": ("pytest", "the tests"), "pytest_timeout": ("pytest-timeout", "the tests' 60 s per test"),
    "triton": ("triton", "backend='triton', Ghost BN's Triton path"),
    "torchvision": ("torchvision", "tests:fused (ResNet-50 shapes), e2e"),
    "tqdm": ("tqdm", "e2e"), "ninja": ("ninja", "the build"), "setuptools": ("setuptools", "the build"),
    "timm": ("timm", "tests:variants' module (timm Lamb), e2e models"),
    "hypothesis": ("hypothesis", "the property-based optimizer tests"),
}
imports = {}
for module, (dist, needed_by) in NEEDED.items():
    try:
        importlib.import_module(module)
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(sys.modules[module], "__version__", "unknown")
        imports[module] = dict(present=True, version=version, needed_by=needed_by)
    except Exception as e:  # ImportError, or a broken install
        imports[module] = dict(present=False, error=f"{type(e).__name__}: {e}"[:300], needed_by=needed_by)
facts = dict(imports=imports, missing=[m for m, r in imports.items() if not r["present"]],
             executables={tool: shutil.which(tool) for tool in ("ninja", "nvcc", "c++", "nvidia-smi")})
path.write_text(json.dumps(facts, indent=2) + "\n")  # the preflight lands even if what follows fails
print("imports:", ", ".join(f"{m} {r['version']}" if r["present"] else f"{m} MISSING" for m, r in imports.items()))

import torch
from bench.optim_step import _version, copy_bandwidth, device_name

device = torch.device(device_arg)
facts.update(device=device_name(device), torch=torch.__version__, torch_cuda=torch.version.cuda,
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
# this Python's own build (another Python's .so beside it does not count). Without a build that
# loads, the later stages run with FASTLARS_NO_EXTENSION=1: fastlars would otherwise compile it on
# first use, once in every stage and inside that stage's limit. The outcome goes to gpu_check.json.
so=fastlars/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
extension_check() {  # prints "with_cuda=True|False", or fails
    "$PY" -c 'import fastlars._C as C; print("with_cuda=%s" % bool(getattr(C, "with_cuda", False)))' 2>> "$log"
}
no_extension() {  # WHY: the later stages run without the extension
    export FASTLARS_NO_EXTENSION=1
    printf 'absent\t%s\n' "$1" > "$scratch/extension.tsv"
    say "== extension: absent ($1); the later stages run with FASTLARS_NO_EXTENSION=1 (backends 'cpu' and 'cuda' untested)"
}
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
build_status=$(awk -F'\t' '$1 == "build" {print $2 ": " ($5 != "" ? $5 : "exit " $3)}' "$scratch/stages.tsv")
if [[ $build_status == failed:* ]] || [[ $build_status == timeout:* ]]; then
    no_extension "the build ${build_status}"
elif [ ! -e "$so" ]; then
    no_extension "$so was not built (build ${build_status:-not run})"
elif [[ $build_status == "skipped: already built" ]]; then  # the dry run's own build, not loaded here (a second)
    printf 'present\t%s\n' "$so, built before this run" > "$scratch/extension.tsv"
elif ! loaded=$(extension_check); then
    no_extension "$so does not load (the log says why)"
else
    printf 'present\t%s\n' "$so, $loaded" > "$scratch/extension.tsv"
    say "== extension: $so loads, $loaded"
fi

# 3. the GPU tests, one pytest per part with its own limit, strongest first. The same selection
# in the dry run: there the GPU cases skip (or `-k cuda` selects nothing), which checks that
# every file imports and every named test exists (a missing one fails the part, exit 4).
timeout_flag=()
"$PY" -c "import pytest_timeout" 2> /dev/null && timeout_flag=(--timeout 60)  # else the part's own limit
# part | GPU limit (s) | -k expression ("" for none) | test paths and node ids
TEST_PARTS=(
    "fused|50||tests/test_fused_gpu.py"
    "variants|70||tests/test_lars_variants.py::test_gpu_backend_matches_reference
        tests/test_lars_variants.py::test_gpu_bf16_master_weights_match_reference
        tests/test_lamb_variants.py::test_gpu_backends_match_reference
        tests/test_lamb_variants.py::test_gpu_bf16_master_weights_match_reference"
    "layer_stats|25|cuda or gpu|tests/test_layer_stats.py"
    "backends|35|cuda|tests/test_optim_backends.py"
    "nonfinite|25|cuda|tests/test_optim_nonfinite.py"
    "capturable|30|cuda|tests/test_capturable.py tests/test_gpu_readiness.py"
    "cast_rne|20|cuda|tests/test_cast_rne.py"
    "ghost_bn|35|(cuda or gpu) and not grid_within_cuda_limits|tests/test_ghost_bn.py"  # that one: CPU tensors
)
say "== tests: the selection, in order (part, -k, tests):"
for part in "${TEST_PARTS[@]}"; do
    IFS='|' read -r name limit keyword paths <<< "$(tr -s ' \n' ' ' <<< "$part")"
    [ $dry = 1 ] && limit=90  # interpreted imports on shared cores
    printf 'tests:%s|%s|%s|%s\n' "$name" "$limit" "$keyword" "${paths% }" >> "$scratch/selection.txt"
    say "   tests:$name${keyword:+ -k '$keyword'} ${paths% }"
done
while IFS='|' read -r name limit keyword paths; do
    keyword_flag=()
    [ -n "$keyword" ] && keyword_flag=(-k "$keyword")
    read -r -a selected <<< "$paths"
    stage "$name" "$limit" "$PY" -m pytest -q -p no:cacheprovider "${timeout_flag[@]}" \
        --junitxml "$scratch/$name.xml" "${keyword_flag[@]}" "${selected[@]}" < /dev/null
done < "$scratch/selection.txt"

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

# the summary: every stage, the extension, the test selection, and the tests' counts and failures
"$PY" - "$scratch" "$out" "$budget" "$SECONDS" "$dry" <<'PY' | tee -a "$log"
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

scratch, out, budget, elapsed, dry = sys.argv[1:]
scratch = Path(scratch)
rows = lambda name, sep="\t": [line.split(sep) for line in (scratch / name).read_text().splitlines()] \
    if (scratch / name).exists() else []
stages = [dict(name=name, status=status, exit_code=int(rc) if rc else None, seconds=int(seconds), note=note)
          for name, status, rc, seconds, note in rows("stages.tsv")]
selection = [dict(part=name, keyword=keyword or None, tests=paths.split())
             for name, _, keyword, paths in rows("selection.txt", "|")]
(extension,) = [dict(present=state == "present", note=note) for state, note in rows("extension.tsv")] or [None]
if extension and not extension["present"]:
    extension["later_stages"] = "ran without the extension (FASTLARS_NO_EXTENSION=1)"
parts = []
for part in selection:
    xml = scratch / f"{part['part']}.xml"
    if not xml.exists():
        continue
    suites = ET.parse(xml).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    count = lambda key: sum(int(s.get(key, 0)) for s in suites)
    failed = [dict(test=f"{case.get('classname')}::{case.get('name')}", message=(bad.get("message") or "")[:500])
              for s in suites for case in s.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    parts.append(dict(part=part["part"], total=count("tests"), failures=count("failures"), errors=count("errors"),
                      skipped=count("skipped"), failed=failed))
tests = dict(ran=bool(parts))
if parts:
    tests.update({key: sum(p[key] for p in parts) for key in ("total", "failures", "errors", "skipped")},
                 failed=[f for p in parts for f in p["failed"]],
                 parts=[{k: v for k, v in p.items() if k != "failed"} for p in parts])
Path(out, "tests.json").write_text(json.dumps(tests, indent=2) + "\n")
device = Path(out, "device.json")
missing = json.loads(device.read_text()).get("missing") if device.exists() else None
summary = dict(dry_run=dry == "1", budget_s=int(budget), elapsed_s=int(elapsed), stages=stages,
               extension=extension, missing_imports=missing, test_selection=selection,
               files=sorted(p.name for p in Path(out).iterdir()) + ["gpu_check.json"])
Path(out, "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
width = max(len(s["name"]) for s in stages)
print(f"{'stage':<{width}} {'status':<8} {'exit':>4} {'s':>5}  note")
for s in stages:
    print(f"{s['name']:<{width}} {s['status']:<8} {s['exit_code'] if s['exit_code'] is not None else '':>4} "
          f"{s['seconds']:>5}  {s['note']}")
if extension:
    print(f"extension: {'present' if extension['present'] else 'absent'}, {extension['note']}"
          f"{'; ' + extension['later_stages'] if 'later_stages' in extension else ''}")
if missing:
    print(f"missing imports: {', '.join(missing)} (device.json says what needs each)")
if tests["ran"]:
    print(f"tests: {tests['total']} run, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped")
print(f"{int(elapsed)} s of a {budget} s budget; files: {', '.join(summary['files'])}")
PY
[ -z "$(cut -f2 "$scratch/stages.tsv" | grep -v -x -e ok -e skipped)" ]
