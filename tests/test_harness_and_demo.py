"""Smoke tests of the end-to-end harness and the digits demo with tiny settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlars.bench import __main__ as bench_main
from fastlars.bench import e2e
from fastlars import demo

ROOT = Path(__file__).resolve().parent.parent


def test_e2e_harness_cli(tmp_path):
    """The CLI as a newcomer runs it, at the smallest size: the terminal shows the progress
    bar and the table, not the profiler's log lines; the JSON keeps every round."""
    pytest.importorskip("torchvision")
    command = [sys.executable, "-m", "fastlars.bench", "e2e", "--device", "cpu", "--model", "resnet18",
               "--image-size", "16", "--global-batch", "8", "--micro-batch", "4", "--steps", "1", "--repeats", "2",
               "--virtual-batch-size", "2", "--backends", "foreach", "--configs", "sgd+bn", "lamb+gbn", "--results", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    terminal = done.stdout + done.stderr
    for noise in ("USDT:", "profiler_start", "gpuGetDeviceCount"):
        assert noise not in terminal
    assert "e2e: 100%" in done.stderr and "vs SGD+BN [min-max]" in done.stdout
    [report] = tmp_path.glob("e2e-cpu-*.json")
    result = json.loads(report.read_text())
    assert [(r["optimizer"], r["norm"], r["backend"], r["status"]) for r in result["rows"]] == [
        ("sgd", "bn", "torch-fused", "ok"), ("sgd", "bn", "torch-foreach", "ok"), ("lamb", "gbn", "foreach", "ok")]
    assert result["baseline"] == "sgd+bn torch-fused" and result["repeats"] == 2
    baseline = result["rows"][0]
    assert baseline["baseline"] and [r["vs_baseline"] for r in baseline["rounds"]] == [1.0, 1.0]
    for index, row in enumerate(result["rows"]):
        assert len(row["rounds"]) == 2 and 0 < row["norm_share"] < 1
        # the rounds are round-robin: the second starts one configuration later
        assert [r["position"] for r in row["rounds"]] == [index, (index - 1) % 3]
        for round_ in row["rounds"]:
            [step] = round_["steps"]
            assert step["step_s"] > step["optimizer_s"] > 0
            assert round_["images_per_s"] == pytest.approx(8 / step["step_s"])
        ratios = sorted(r["vs_baseline"] for r in row["rounds"])
        assert row["vs_baseline"] == pytest.approx(dict(median=sum(ratios) / 2, min=ratios[0], max=ratios[1]))
        assert row["optimizer_share"]["min"] <= row["optimizer_share"]["median"] <= row["optimizer_share"]["max"] < 1
    assert list(tmp_path.glob("e2e-cpu-*.png"))


def test_kineto_noise_dropped_keeps_real_errors(capfd):
    marker = "USDT:2026-12-06 17:04:44 4381:4381 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
    no_gpu = "ERROR:2026-12-06 17:04:44 4381:4381 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n"
    real = "ERROR:2026-12-06 17:04:44 4381:4381 CuptiActivityProfiler.cpp:1] something went wrong\n"
    with e2e.kineto_noise_dropped():
        os.write(2, (marker + no_gpu + real).encode())
    err = capfd.readouterr().err
    expected_no_gpu = no_gpu if torch.cuda.is_available() else ""
    assert err == expected_no_gpu + real


@pytest.mark.parametrize("flag", ["--steps", "--repeats"])
def test_e2e_rejects_no_rounds(tmp_path, flag):
    with pytest.raises(ValueError, match="--steps and --repeats must be >= 1"):
        bench_main.main(["e2e", "--device", "cpu", "--global-batch", "8", "--micro-batch", "4", flag, "0",
                         "--results", str(tmp_path)])


def test_e2e_rejects_batch_not_multiple_of_micro_batch(tmp_path):
    with pytest.raises(ValueError, match="not a multiple of --micro-batch"):
        bench_main.main(["e2e", "--device", "cpu", "--model", "resnet18", "--image-size", "16", "--global-batch",
                         "10", "--micro-batch", "4", "--steps", "1", "--configs", "sgd+bn", "--no-plot",
                         "--results", str(tmp_path)])


def test_demo_smoke(tmp_path):
    pytest.importorskip("sklearn")
    curves = demo.run(epochs=2, seeds=(0,), large_batch=512, plot_path=tmp_path / "demo.png")
    assert len(curves) == 4
    for runs in curves.values():
        assert len(runs) == 1 and len(runs[0]) == 2 and all(0 <= a <= 1 for a in runs[0])
    assert (tmp_path / "demo.png").exists()
    train_x, train_y, test_x, test_y = demo.load_digits()
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8) and float(train_x.max()) <= 1.0
