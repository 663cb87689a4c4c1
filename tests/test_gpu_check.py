"""bench/gpu_check.sh, the device check, as CI can run it: its dry run (every stage on the CPU at
toy sizes, the GPU test selection as it is), once with the build, in a copy of the tree (the
build writes fastlars/_C*.so in place, and this process has the tree's own loaded); the test
selection it lists, in order; a failed build (the later stages run without the extension, saying
so); its budget (stages skipped, saying so, once the time is spent); and a stage at its limit
(pytest interrupted, its report kept). The results must come back from a lent GPU machine whole:
at most 8 plain files directly under OUTDIR."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
# the GPU tests, strongest first: (part, -k expression, tests)
SELECTION = [
    ("tests:fused", None, ["tests/test_fused_gpu.py"]),
    ("tests:variants", None, ["tests/test_lars_variants.py::test_gpu_backend_matches_reference",
                              "tests/test_lars_variants.py::test_gpu_bf16_master_weights_match_reference",
                              "tests/test_lamb_variants.py::test_gpu_backends_match_reference",
                              "tests/test_lamb_variants.py::test_gpu_bf16_master_weights_match_reference"]),
    ("tests:layer_stats", "cuda or gpu", ["tests/test_layer_stats.py"]),
    ("tests:backends", "cuda", ["tests/test_optim_backends.py"]),
    ("tests:nonfinite", "cuda", ["tests/test_optim_nonfinite.py"]),
    ("tests:capturable", "cuda", ["tests/test_capturable.py", "tests/test_gpu_readiness.py"]),
    ("tests:cast_rne", "cuda", ["tests/test_cast_rne.py"]),
    ("tests:ghost_bn", "(cuda or gpu) and not grid_within_cuda_limits", ["tests/test_ghost_bn.py"]),
]
STAGES = ["facts", "build", *(part for part, _, _ in SELECTION), "optim", "gbn", "e2e"]
# what the stages import (device.json's preflight)
IMPORTS = {"torch", "numpy", "pytest", "pytest_timeout", "triton", "torchvision", "tqdm", "ninja", "setuptools",
           "timm", "hypothesis"}


def gpu_check(root: Path, out: Path, budget_s: int, *flags: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": str(budget_s), **env}
    env.pop("TRITON_INTERPRET", None)  # the script chooses it
    return subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--dry-run", *flags, str(out)], env=env,
                          capture_output=True, text=True, timeout=1800)


def results(out: Path) -> dict[str, Path]:
    files = {p.name: p for p in out.iterdir()}
    assert len(files) <= 8 and all(p.is_file() for p in files.values()), sorted(files)
    return files


def source_copy(dst: Path) -> Path:
    """The tree as a fresh clone has it: no build, no extension, no virtual environments."""
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.so", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "results"))
    return dst


@pytest.mark.slow  # the build: sm_90 only, 1-2 minutes on 2 cores
@pytest.mark.skipif(os.environ.get("FASTLARS_CI_DRY_RUN_BUILD") == "compat",
                    reason=".ci/run builds in the device check's dry run once, in the compatibility job")
def test_dry_run_builds_and_runs_every_stage(tmp_path):
    repo, out = source_copy(tmp_path / "repo"), tmp_path / "out"
    done = gpu_check(repo, out, 1500, "--build")  # generous: a slow CI machine must not skip stages
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = results(out)
    summary = json.loads(files["gpu_check.json"].read_text())
    assert summary["dry_run"] and [s["name"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    assert sorted(summary["files"]) == sorted(files)
    (built,) = (repo / "fastlars").glob("_C*.so")
    assert summary["extension"]["present"] and built.name in summary["extension"]["note"]
    device = json.loads(files["device.json"].read_text())
    assert device["copy_bandwidth_GBps"] > 0 and device["torch"]
    assert set(device["imports"]) >= IMPORTS and device["imports"]["torch"]["present"]
    assert device["missing"] == [m for m, r in device["imports"].items() if not r["present"]]
    # the GPU selection on the CPU: every file imports and every named test exists; its GPU cases
    # skip, and a part whose -k selects nothing here passes, saying so
    tests = json.loads(files["tests.json"].read_text())
    assert tests["ran"] and tests["failures"] == tests["errors"] == 0 and tests["total"] > 0
    parts = {p["part"]: p for p in tests["parts"]}
    for part, keyword, _ in SELECTION:
        note = next(s["note"] for s in summary["stages"] if s["name"] == part)
        assert parts[part]["total"] > 0 or (keyword and note == "nothing selected on the CPU"), (part, note)
    for stem in ("optim_step-cpu-", "ghost_bn-cpu-", "e2e-cpu-"):
        (name,) = [n for n in files if n.startswith(stem) and n.endswith(".json")]
        rows = json.loads(files[name].read_text())["rows"]
        assert rows and all(r.get("status", "ok") == "ok" for r in rows), name
    log = files["gpu_check.log"].read_text()
    assert all(f"== {stage}: " in log for stage in STAGES)
    # the toolkit: fastlars's one rule, said once, and the build used it (or built the CPU kernels alone)
    toolkit = subprocess.run([sys.executable, "-m", "fastlars", "--cuda-home"], capture_output=True, text=True,
                             cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert f"== toolkit: {toolkit.stderr.strip()}\n" in log
    if toolkit.stdout.strip():
        assert f"CUDA_HOME={toolkit.stdout.strip()} " in log and "-gencode=arch=compute_90,code=sm_90" in log
    else:
        assert "FASTLARS_NO_CUDA=1" in log


def test_dry_run_lists_the_selection_in_order(tmp_path):
    """The selection is listed (log and gpu_check.json) before any stage runs, in the order the
    parts run; each named test exists (a renamed one would fail its part on the GPU, exit 4)."""
    done = gpu_check(ROOT, tmp_path, 100, GPU_CHECK_STAGES="none")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["part"], s["keyword"], s["tests"]) for s in summary["test_selection"]] == SELECTION
    assert [s["name"] for s in summary["stages"]] == STAGES
    log = (tmp_path / "gpu_check.log").read_text()
    listed = log[log.index("== tests: the selection, in order"):].splitlines()[1:1 + len(SELECTION)]
    assert [line.split()[0] for line in listed] == [part for part, _, _ in SELECTION]
    for (part, keyword, tests), line in zip(SELECTION, listed):
        assert line.endswith(" ".join(tests)) and (f"-k '{keyword}'" in line) == bool(keyword), line
        for test in tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).is_file() and (not name or f"\ndef {name}(" in (ROOT / path).read_text()), test


def test_failed_build_runs_the_later_stages_without_the_extension(tmp_path):
    """A build that fails (here: a source file listed but missing) sets FASTLARS_NO_EXTENSION=1 for
    the stages after it (fastlars would otherwise compile on first use, inside their limits), and
    gpu_check.json and the log say so."""
    repo, out = source_copy(tmp_path / "repo"), tmp_path / "out"
    with open(repo / "csrc" / "sources.txt", "a") as listing:
        listing.write("no_such_source.cpp\n")
    (tmp_path / "show_env.py").write_text(
        "import os\n\n\ndef pytest_sessionstart(session):\n"
        "    print('FASTLARS_NO_EXTENSION=' + os.environ.get('FASTLARS_NO_EXTENSION', ''), flush=True)\n")
    done = gpu_check(repo, out, 300, "--build", GPU_CHECK_STAGES="build tests:cast_rne", PYTEST_ADDOPTS="-p show_env",
                     PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert done.returncode != 0  # the build failed
    summary = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert statuses["build"] == "failed" and statuses["tests:cast_rne"] == "ok", summary["stages"]
    assert summary["extension"] == dict(present=False, note="the build failed: exit 1",
                                        later_stages="ran without the extension (FASTLARS_NO_EXTENSION=1)")
    log = (out / "gpu_check.log").read_text()
    assert "== extension: absent (the build failed: exit 1); the later stages run with FASTLARS_NO_EXTENSION=1" in log
    assert "FASTLARS_NO_EXTENSION=1\n" in log[log.index("== tests:cast_rne: up to"):]
    assert not list((repo / "fastlars").glob("_C*.so"))


def test_spent_budget_skips_stages_saying_so(tmp_path):
    done = gpu_check(ROOT, tmp_path, 0, "--build")  # --build forces no stage past the budget
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = results(tmp_path)
    summary = json.loads(files["gpu_check.json"].read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    for s in summary["stages"]:
        assert s["status"] == "skipped" and s["note"] == "budget spent", s
        assert f"== {s['name']}: skipped, budget spent" in done.stdout
    assert json.loads(files["tests.json"].read_text()) == {"ran": False}


def test_stage_at_its_limit_is_interrupted_and_reports(tmp_path):
    """A stage past its limit gets SIGINT, so pytest still writes its summary and JUnit XML:
    tests.json says what ran. Here a plugin holds the first test (in its setup: on the CPU the GPU
    tests skip there) past the 60 s budget; the parts after it are skipped, the budget spent."""
    (tmp_path / "hold_first_test.py").write_text(
        "import time\n\nimport pytest\n\n\n@pytest.hookimpl(tryfirst=True)\n"
        "def pytest_runtest_setup(item):\n    time.sleep(600)\n")
    out = tmp_path / "out"
    done = gpu_check(ROOT, out, 60, GPU_CHECK_STAGES="tests", PYTEST_ADDOPTS="-p hold_first_test",
                     PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert done.returncode != 0
    summary = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["name"]: (s["status"], s["exit_code"], s["note"]) for s in summary["stages"]}
    assert statuses.pop("tests:fused") == ("timeout", 124, "")
    assert all(note == "budget spent" for name, (_, _, note) in statuses.items() if name.startswith("tests:"))
    assert all(note in ("not selected", "already built") for name, (_, _, note) in statuses.items()
               if not name.startswith("tests:"))
    assert summary["elapsed_s"] < 60 + 20  # ended by SIGINT, not by the SIGKILL 20 s later
    log = (out / "gpu_check.log").read_text()
    assert "KeyboardInterrupt" in log and " -x " not in log
    tests = json.loads((out / "tests.json").read_text())
    assert tests["ran"], tests  # the JUnit XML was written
