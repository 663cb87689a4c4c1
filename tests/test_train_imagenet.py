"""examples/train_imagenet.py on a tiny generated ImageFolder (3 classes of 20x20 PNGs, 24
training and 12 validation images; resnet18 at 16px, global batch 8 so 3 steps per epoch,
micro-batches of 4 or 2 so that accumulation runs): one process with evaluation, DDP and
FSDP2 on 2 gloo ranks under torchrun, an interrupted run resumed equal to an uninterrupted
one, a worker killed under torchrun survived with the same result, an FSDP2 checkpoint of 2
ranks loaded on 1, synthetic data, the MLPerf preset's numbers, the published default lrs, and
each bad input rejected before training."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402  (torchvision's dependency)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import train_imagenet  # noqa: E402

TINY = ["--global-batch", "8", "--image-size", "16", "--model", "resnet18", "--virtual-batch-size", "2",
        "--epochs", "2", "--warmup-epochs", "0.5", "--base-lr", "2.0"]
STEPS = 6  # 2 epochs of 24 // 8


def make_folder(root: Path, classes=("ant", "bee", "cat"), train=8, val=4) -> Path:
    """Each class a colour plus noise: learnable, and different for every image."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            colour = np.roll(np.array([220, 30, 30]), c)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run(args, ranks=None, restarts=0):
    """The script in a subprocess (under torchrun when ``ranks``, which restarts the workers
    up to ``restarts`` times); its JSON lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",  # gloo on the CPU, even on a GPU host
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # the README's recipe: a fresh store per torchrun attempt
    launcher = [sys.executable] if ranks is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={ranks}", f"--max-restarts={restarts}"]
    proc = subprocess.run([*launcher, str(EXAMPLES / "train_imagenet.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def events(lines, kind):
    return [line for line in lines if line["event"] == kind]


def check_training(lines, steps):
    train = events(lines, "train")
    assert [line["step"] for line in train] == list(range(1, steps + 1))
    for line in train:
        assert math.isfinite(line["loss"]) and line["lr"] > 0 and line["images_per_s"] > 0
        assert 0 <= line["data_wait"] <= 1
    return train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("uninterrupted")
    lines = run(["--data", folder, *TINY, "--micro-batch", 4, "--workers", 1, "--checkpoint-dir", checkpoints,
                 "--keep-checkpoints", 1])
    return lines, checkpoints


def test_one_process_trains_and_evaluates(uninterrupted):
    lines, checkpoints = uninterrupted
    start = events(lines, "start")[0]
    assert (start["world"], start["accumulation"], start["steps_per_epoch"], start["train_images"]) == (1, 2, 3, 24)
    check_training(lines, STEPS)
    evals = events(lines, "eval")
    assert [e["epoch"] for e in evals] == [0, 1] and all(e["images"] == 12 for e in evals)
    assert all(0 <= e["top1"] <= e["top5"] <= 100 for e in evals)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000006"]  # --keep-checkpoints 1


def test_interrupted_run_resumes_exactly(uninterrupted, folder, tmp_path):
    """SIGTERM after step 4 (mid-epoch 1): the step finishes, a checkpoint is written, the run
    exits; --resume continues with the losses and final weights of the uninterrupted run
    (with another number of loader workers: augmentation is seeded per sample). The same
    command both times: --resume auto starts afresh in an empty --checkpoint-dir."""
    lines, checkpoints = uninterrupted
    command = ["--data", folder, *TINY, "--micro-batch", 4, "--workers", 0, "--checkpoint-dir", tmp_path,
               "--resume", "auto"]
    first = run([*command, "--stop-after-steps", 4, "--save-every-steps", 2])
    assert events(first, "start")[0]["resumed_from"] is None
    assert events(first, "stop")[0]["reason"] == "SIGTERM" and check_training(first, 4)
    assert [c["step"] for c in events(first, "checkpoint")] == [2, 3, 4]  # every 2 steps, epoch 0's end, the stop
    (tmp_path / "step-00000099").mkdir()  # what a crash while saving would leave: not a checkpoint
    (tmp_path / ".step-00000005.partial").mkdir()
    second = run(command)
    assert events(second, "start")[0]["resumed_from"].endswith("step-00000004")
    resumed = [(line["step"], line["loss"], line["lr"]) for line in events(first + second, "train")]
    assert resumed == [(line["step"], line["loss"], line["lr"]) for line in events(lines, "train")]
    assert [e["top1"] for e in events(first + second, "eval")] == [e["top1"] for e in events(lines, "eval")]
    assert_same_checkpoint(checkpoints / "step-00000006", tmp_path / "step-00000006")


DDP = ["--micro-batch", 2, "--workers", 0]


@pytest.fixture(scope="module")
def ddp_uninterrupted(folder, tmp_path_factory):
    """2 ranks under torchrun, never interrupted: the JSON lines and the checkpoint folder."""
    root = tmp_path_factory.mktemp("ddp")
    log = root / "log.jsonl"
    assert not run(["--data", folder, *TINY, *DDP, "--log-file", log, "--checkpoint-dir", root / "checkpoints",
                    "--keep-checkpoints", 1], ranks=2)
    return [json.loads(line) for line in log.read_text().splitlines()], root / "checkpoints"


def test_ddp_on_two_ranks(ddp_uninterrupted):
    lines = ddp_uninterrupted[0]  # --log-file: the JSON lines go there, none to stdout
    start = events(lines, "start")[0]
    assert (start["world"], start["sharding"], start["accumulation"]) == (2, "ddp", 2)
    check_training(lines, STEPS)
    assert [e["images"] for e in events(lines, "eval")] == [12, 12]  # each image once over both ranks


def assert_same_checkpoint(want: Path, got: Path) -> None:
    """model.pt of two checkpoints: the same parameters, Ghost BN statistics and optimizer state."""
    want, got = torch.load(want / "model.pt"), torch.load(got / "model.pt")
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    for name, state in want["optim"]["state"].items():
        for key, value in state.items():
            assert torch.equal(got["optim"]["state"][name][key], value), (name, key)


@pytest.mark.slow
def test_killed_worker_is_survived_under_torchrun(ddp_uninterrupted, folder, tmp_path):
    """The README's fault-tolerance recipe: torchrun --max-restarts, --save-every-steps,
    --resume auto. Rank 1 SIGKILLs itself after step 5 (mid-epoch 1) on torchrun's first attempt;
    rank 0's next collective fails, torchrun restarts both workers, they set up a new process
    group (keys of the dead group's set-up left in torchrun's store must not be read) and
    resume from the step-4 checkpoint: the losses, evaluations and final weights are those of
    the uninterrupted run."""
    want, want_checkpoints = ddp_uninterrupted
    log = tmp_path / "log.jsonl"
    run(["--data", folder, *TINY, *DDP, "--log-file", log, "--checkpoint-dir", tmp_path / "checkpoints",
         "--save-every-steps", 2, "--resume", "auto", "--kill-after-steps", 5, "--dist-timeout", 60], ranks=2,
        restarts=1)
    got = [json.loads(line) for line in log.read_text().splitlines()]  # both attempts append to it
    assert [start["resumed_from"] for start in events(got, "start")] == [None, str(tmp_path / "checkpoints" /
                                                                                 "step-00000004")]
    assert [c["step"] for c in events(got, "checkpoint")] == [2, 3, 4, 6, 6]  # the 2nd 6: epoch 1's end
    assert [(t["step"], t["loss"], t["lr"]) for t in events(got, "train")] == [
        (t["step"], t["loss"], t["lr"]) for t in events(want, "train")]  # step 5 logged once, by the 2nd attempt
    assert [e["top1"] for e in events(got, "eval")] == [e["top1"] for e in events(want, "eval")]
    assert_same_checkpoint(want_checkpoints / "step-00000006", tmp_path / "checkpoints" / "step-00000006")


def test_fsdp2_checkpoint_of_two_ranks_resumes_on_one(folder, tmp_path):
    """2 ranks stop after the last step of epoch 0 and save (DCP, sharded in 2); 1 rank loads
    it (resharded), evaluates, saves again at the same step, then trains on. The two
    checkpoints of step 3 hold the same model and optimizer state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    two, one = tmp_path / "two", tmp_path / "one"
    common = ["--data", folder, *TINY, "--micro-batch", 2, "--workers", 0, "--fsdp"]
    lines = run([*common, "--checkpoint-dir", two, "--stop-after-steps", 3], ranks=2)
    assert events(lines, "start")[0]["sharding"] == "fsdp2" and check_training(lines, 3)
    assert len(list((two / "step-00000003").glob("*.distcp"))) == 2
    lines = run([*common, "--checkpoint-dir", one, "--resume", two], ranks=1)
    assert [line["step"] for line in events(lines, "train")] == [4, 5, 6]
    assert all(math.isfinite(line["loss"]) for line in events(lines, "train"))
    assert [e["epoch"] for e in events(lines, "eval")] == [0, 1]
    saved = []
    for folder_ in (two, one):
        dcp_to_torch_save(folder_ / "step-00000003", tmp_path / f"{folder_.name}.pt")
        saved.append(torch.load(tmp_path / f"{folder_.name}.pt"))
    for key, value in saved[0]["model"].items():
        assert torch.equal(saved[1]["model"][key], value), key
    for name, state in saved[0]["optim"]["state"].items():
        for key, value in state.items():
            assert torch.equal(saved[1]["optim"]["state"][name][key], value), (name, key)


def test_synthetic_data():
    lines = run(["--data", "synthetic", *TINY[:-6], "--epochs", 1, "--synthetic-steps", 2, "--warmup-epochs", 0,
                 "--micro-batch", 4, "--num-classes", 5])
    check_training(lines, 2)
    assert not events(lines, "eval")


@pytest.mark.parametrize("batch, run_batch, lr, epochs", [(3264, 3264, 10.5, 37), (1632, 3264, 5.25, 37),
                                                          (32768, 35840, 21.9, 60), (65536, 64400, 24.699, 90)])
def test_mlperf_preset(batch, run_batch, lr, epochs):
    args = train_imagenet.parse_args(["--data", "synthetic", "--preset", "mlperf", "--global-batch", str(batch),
                                      "--micro-batch", "32"])
    plan = train_imagenet.check_inputs(args, world=1)
    run_ = train_imagenet._mlperf_run(batch)
    assert run_.global_batch == run_batch and plan.epochs == epochs
    assert plan.optimizer_options == dict(lr=pytest.approx(lr), weight_decay=run_.weight_decay,
                                          momentum=run_.momentum, end_lr=1e-4, warmup_start_factor=0.0)
    assert plan.warmup_steps == round(run_.warmup_epochs * 10)  # 10 synthetic steps per epoch
    assert (plan.label_smoothing, plan.eval_every, plan.target_top1) == (0.1, 4, 75.9)


@pytest.mark.parametrize("lamb, batch, peak", [(False, 3264, 10.5), (False, 256, 10.5 * 256 / 3264),
                                               (True, 32768, 0.04), (True, 256, 0.04 * math.sqrt(256 / 32768))])
def test_default_lrs_are_the_published_ones(lamb, batch, peak):
    """No lr flag, no preset: LARS peaks at NVIDIA's MLPerf lr (10.5 at batch 3264, linearly
    scaled), LAMB at You et al.'s (0.04 at batch 32768, square-root scaled); resnet50."""
    args = train_imagenet.parse_args(["--data", "synthetic", "--global-batch", str(batch), "--micro-batch", "32",
                                      *(["--lamb"] if lamb else [])])
    plan = train_imagenet.check_inputs(args, world=1)
    assert args.model == "resnet50" and "default" in plan.recipe
    _, schedule = train_imagenet.common.make_optimizer(args, torch.nn.Linear(2, 2), plan.epochs * plan.steps_per_epoch,
                                                       plan.warmup_steps, **plan.optimizer_options)
    assert schedule.base_lrs[0] == pytest.approx(peak)


def bad_input(tmp_path, uninterrupted):
    """(name, setup(root) -> extra args, message) for each bad input."""
    folder = lambda root: make_folder(root, train=2, val=1)  # noqa: E731
    checkpoint = str(uninterrupted[1])

    def missing_val(root):
        shutil.rmtree(folder(root) / "val")
        return ["--data", root]

    def empty_train(root):
        shutil.rmtree(folder(root) / "train")
        (root / "train").mkdir()
        return ["--data", root]

    def class_without_images(root):
        folder(root)
        (root / "train" / "dog").mkdir()
        (root / "val" / "dog").mkdir()
        return ["--data", root]

    def classes_differ(root):
        folder(root)
        (root / "val" / "bee").rename(root / "val" / "bug")
        return ["--data", root]

    tensorboard = [] if importlib.util.find_spec("tensorboard") else [
        ("--tensorboard without the package", lambda root: ["--data", "synthetic", "--tensorboard", root],
         "needs the tensorboard package")]
    return tensorboard + [
        ("missing val/", missing_val, "val is missing"),
        ("empty train/", empty_train, "train is empty"),
        ("class without images", class_without_images, "empty or unreadable"),
        ("classes differ", classes_differ,
         r"different class folders \(only in train/: \['bee'\], only in val/: \['bug'\]"),
        ("too few images", lambda root: ["--data", folder(root), "--global-batch", 16], "fewer than one global batch"),
        ("batch not divisible", lambda root: ["--data", "synthetic", "--micro-batch", 3, "--world", 2],
         "--global-batch 8 must be a multiple of 2 ranks x --micro-batch 3"),
        ("resume: another model", lambda root: ["--data", "synthetic", "--model", "resnet34", "--resume", checkpoint],
         "another run: model 'resnet18' there, 'resnet34' here"),
        ("resume: another optimizer", lambda root: ["--data", "synthetic", "--lamb", "--resume", checkpoint],
         "optimizer 'LARS' there, 'LAMB' here"),
        ("resume: no checkpoint", lambda root: ["--data", "synthetic", "--resume", root], "no checkpoint there"),
        ("resume auto without a folder", lambda root: ["--data", "synthetic", "--resume", "auto"],
         "--resume auto needs --checkpoint-dir"),
        ("preset with LAMB", lambda root: ["--data", "synthetic", "--preset", "mlperf", "--lamb"], "drop --lamb"),
        ("no dist timeout", lambda root: ["--data", "synthetic", "--dist-timeout", 0],
         "--dist-timeout must be > 0 seconds, got 0.0"),
        ("warmup as long as training", lambda root: ["--data", "synthetic", "--warmup-epochs", 2],
         r"--warmup-epochs 2.0 \(20 steps\) must be >= 0 and shorter than --epochs 2 \(20 steps\)"),
    ]


def test_bad_inputs_fail_before_training(uninterrupted, tmp_path, monkeypatch):
    """main() itself: each error is raised before the process group, the model or a loader."""
    for i, (name, setup, message) in enumerate(bad_input(tmp_path, uninterrupted)):
        root = tmp_path / str(i)
        root.mkdir()
        args = [str(a) for a in setup(root)]
        monkeypatch.setenv("WORLD_SIZE", "1")
        if "--world" in args:  # as torchrun would set it
            monkeypatch.setenv("WORLD_SIZE", args.pop(args.index("--world") + 1))
            args.remove("--world")
        with pytest.raises(SystemExit, match=message):
            train_imagenet.main([*TINY, "--micro-batch", "4", "--num-classes", "3", *args])
        assert not torch.distributed.is_initialized(), name


def test_evaluate_counts_top1_top5_and_skips_padding():
    """Known logits: sample 0 and 3 right at top-1, sample 1 right within the top 5 only,
    sample 2 wrong (its class ranked 6th of 6), sample 4 padding (label -1, not counted)."""
    logits = torch.tensor([[9., 1, 2, 3, 4, 5], [1., 2, 9, 8, 7, 6], [9., 8, 1, 7, 6, 5], [0., 1, 2, 9, 3, 4],
                           [9., 0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 1, 2, 3, -1])

    class Lookup(torch.nn.Module):
        def forward(self, x):
            return logits[x.view(-1).long()]

    batches = [(torch.arange(0, 2.).view(2, 1, 1, 1), labels[:2]), (torch.arange(2, 5.).view(3, 1, 1, 1), labels[2:])]
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        assert train_imagenet.evaluate(Lookup(), batches, torch.device("cpu")) == (50.0, 75.0, 4)
    finally:
        torch.distributed.destroy_process_group()
