"""Smoke tests of the end-to-end harness and the digits demo with tiny settings."""

import json

import pytest

from fastlars.bench import __main__ as bench_main
from fastlars import demo


def test_e2e_harness_smoke(tmp_path):
    pytest.importorskip("torchvision")
    bench_main.main(["e2e", "--device", "cpu", "--model", "resnet18", "--image-size", "16", "--global-batch", "8",
                     "--micro-batch", "4", "--steps", "1", "--virtual-batch-size", "2", "--backends", "foreach",
                     "--configs", "sgd+bn", "lars+gbn", "lamb+gbn", "--results", str(tmp_path)])
    [report] = tmp_path.glob("e2e-cpu-*.json")
    result = json.loads(report.read_text())
    assert [(r["optimizer"], r["norm"], r["status"]) for r in result["rows"]] == [
        ("sgd", "bn", "ok"), ("lars", "gbn", "ok"), ("lamb", "gbn", "ok")]
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and 0 < row["optimizer_share"] < 1 and 0 < row["norm_share"] < 1
    assert list(tmp_path.glob("e2e-cpu-*.png"))


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
