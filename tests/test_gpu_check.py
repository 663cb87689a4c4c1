"""bench/gpu_check.sh, the device check, as CI can run it: its dry run (every stage on the CPU at
toy sizes), once with the build, in a copy of the tree (the build writes fastlars/_C*.so in
place, and this process has the tree's own loaded); its budget (stages skipped, saying so, once
the time is spent); and a stage at its limit (pytest interrupted, its report kept). The results
must come back from a lent GPU machine whole: at most 8 plain files directly under OUTDIR."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
STAGES = ["facts", "build", "tests", "optim", "gbn", "e2e"]


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
    device = json.loads(files["device.json"].read_text())
    assert device["copy_bandwidth_GBps"] > 0 and device["torch"]
    tests = json.loads(files["tests.json"].read_text())
    assert tests["ran"] and tests["failures"] == tests["errors"] == 0 and tests["total"] > tests["skipped"]
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
    tests.json says what ran. Here a plugin holds the first test past the 30 s budget."""
    (tmp_path / "hold_first_test.py").write_text(
        "import time\n\n\ndef pytest_runtest_call(item):\n    time.sleep(600)\n")
    out = tmp_path / "out"
    done = gpu_check(ROOT, out, 30, GPU_CHECK_STAGES="tests", PYTEST_ADDOPTS="-p hold_first_test",
                     PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert done.returncode != 0
    summary = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["name"]: (s["status"], s["exit_code"], s["note"]) for s in summary["stages"]}
    assert statuses["tests"] == ("timeout", 124, "")
    assert all(note in ("not selected", "already built") for name, (_, _, note) in statuses.items() if name != "tests")
    assert summary["elapsed_s"] < 30 + 20  # ended by SIGINT, not by the SIGKILL 20 s later
    log = (out / "gpu_check.log").read_text()
    assert "KeyboardInterrupt" in log and " -x " not in log
    tests = json.loads((out / "tests.json").read_text())
    assert tests["ran"], tests  # the JUnit XML was written
