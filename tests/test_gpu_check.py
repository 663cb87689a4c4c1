"""bench/gpu_check.sh, the device check, as CI can run it: its dry run (every stage on the CPU at
toy sizes) and its budget (stages skipped, saying so, once the time is spent). The results must
come back from a lent GPU machine whole: at most 8 plain files directly under OUTDIR."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
STAGES = ["facts", "build", "tests", "optim", "gbn", "e2e"]


def gpu_check(out: Path, budget_s: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": str(budget_s)}
    env.pop("TRITON_INTERPRET", None)  # the script chooses it
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)


def results(out: Path) -> dict[str, Path]:
    files = {p.name: p for p in out.iterdir()}
    assert len(files) <= 8 and all(p.is_file() for p in files.values()), sorted(files)
    return files


def test_dry_run_runs_every_stage(tmp_path):
    done = gpu_check(tmp_path, budget_s=600)  # generous: a slow CI machine must not skip stages
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = results(tmp_path)
    summary = json.loads(files["gpu_check.json"].read_text())
    assert summary["dry_run"] and [s["name"] for s in summary["stages"]] == STAGES
    for s in summary["stages"]:
        assert s["status"] == "ok" or (s["name"] == "build" and s["note"] == "already built"), s
    assert sorted(summary["files"]) == sorted(files)
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


def test_spent_budget_skips_stages_saying_so(tmp_path):
    done = gpu_check(tmp_path, budget_s=0)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = results(tmp_path)
    summary = json.loads(files["gpu_check.json"].read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    for s in summary["stages"]:
        assert s["status"] == "skipped" and s["note"] in ("budget spent", "already built"), s
        if s["note"] == "budget spent":
            assert f"== {s['name']}: skipped, budget spent" in done.stdout
    assert json.loads(files["tests.json"].read_text()) == {"ran": False}
