"""ResNet-50 on an ImageNet folder with the large-batch recipe, evaluation, checkpoints and resume.

LARS (or LAMB) + Ghost BN at a large global batch reached by gradient accumulation,
top-1/top-5 evaluation, checkpoints and exact resume; one process, DDP or FSDP2 under torchrun.

    python examples/train_imagenet.py --data /data/imagenet --preset mlperf --global-batch 3264 \\
        --micro-batch 204 --checkpoint-dir ckpt                                        # 1 GPU
    torchrun --nproc_per_node=8 examples/train_imagenet.py --data /data/imagenet --preset mlperf \\
        --global-batch 3264 --micro-batch 204 --checkpoint-dir ckpt --resume auto      # 8 GPUs
    python examples/train_imagenet.py --data synthetic --epochs 1                       # throughput, no files

``--data DIR`` holds ``train/`` and ``val/`` in torchvision ImageFolder layout (the standard
ImageNet preparation: one folder per class, the same class folders in both). Training
images get RandomResizedCrop + horizontal flip, evaluation images resize to 256/224 of the
image size then a centre crop (torchvision.transforms.v2). The randomness of each sample's
augmentation is drawn from (seed, epoch, sample index) alone, so it does not depend on the
loader workers or on where a run was interrupted.

One optimizer step = ``--global-batch`` images: each rank takes its share in micro-batches of
``--micro-batch`` and synchronises gradients once, in the last micro-batch's backward (DDP's
``no_sync``, FSDP2's ``set_requires_gradient_sync``). Ghost BN's running statistics are
averaged over ranks after every step (one small all-reduce), so every rank evaluates and
saves the same model.

Checkpoints (``--checkpoint-dir``): after every epoch, every ``--save-every-steps`` steps and
when SIGTERM/SIGINT arrives (the current step finishes, the checkpoint is written, the run
exits; a second signal kills at once). Each is a folder ``step-NNNNNNNN/`` renamed into place
once complete (a crash loses at most the work since the last one); the last
``--keep-checkpoints`` are kept. ``trainer.pt``: step, epoch and position in the epoch, the
schedule, every rank's RNG states (torch, CUDA, numpy, python, the loader's generator) and
what the run was (model, classes, optimizer, global batch, epochs, sharding), checked on
``--resume``. Model and optimizer: ``model.pt`` (one process, DDP: written by rank 0) or a
torch.distributed.checkpoint folder (``--fsdp``: every rank writes its shards; loads with
any number of ranks). ``--resume`` takes a checkpoint, the checkpoint folder (its latest) or
``auto`` (the latest in ``--checkpoint-dir`` if any, else a fresh start: the same command
restarts a preempted job) and continues exactly: the same losses as a run never interrupted
(same world size).

Logging: one JSON line per optimizer step and per evaluation (stdout, or ``--log-file FILE``)
on rank 0, a tqdm bar on stderr, TensorBoard scalars with ``--tensorboard DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import common  # examples/common.py: the script's folder is on sys.path

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's channel statistics


@dataclasses.dataclass(frozen=True)
class MLPerfRun:
    """One published MLPerf Training ResNet-50 configuration (LARS)."""
    global_batch: int
    lr: float  # peak lr
    warmup_epochs: float
    epochs: int
    weight_decay: float
    momentum: float
    source: str


# NVIDIA's MLPerf Training submissions (MXNet, github.com/mlcommons/training_results_vX.Y,
# NVIDIA/benchmarks/resnet/implementations/mxnet/config_*.sh): LARS with eta 0.001, label
# smoothing 0.1, linear warmup then polynomial decay of power 2 to an end lr of 1e-4
# (MLCommons training rules: lars_opt_end_learning_rate, lars_opt_learning_rate_decay_poly_power),
# no weight decay and no LARS adaptation on BN and bias parameters, evaluation every 4 epochs,
# target 75.9% top-1.
MLPERF_RUNS = (
    MLPerfRun(3264, 10.5, 2, 37, 5e-5, 0.9, "v2.0 config_DGXA100.sh (8 GPUs x 408)"),
    MLPerfRun(6528, 8.4, 6, 44, 2.5e-5, 0.94, "v1.0 config_DGXA100_2x8x408.sh (Supermicro, NVIDIA's code)"),
    MLPerfRun(35840, 21.9, 17, 60, 2.5e-5, 0.94, "v1.0 config_DGXA100_multi_128x8x35_sharp.sh"),
    MLPerfRun(44544, 23.5, 22, 70, 2.5e-5, 0.94, "v0.7 config_DGXA100_multi_192x8x29.sh"),
    MLPerfRun(64400, 24.699, 31, 90, 1e-4, 0.951807, "v0.7 config_DGXA100_multi_230x8x35.sh"),
)
MLPERF_END_LR, MLPERF_LABEL_SMOOTHING, MLPERF_EVAL_EVERY, MLPERF_TARGET = 1e-4, 0.1, 4, 75.9


# The default lrs (no --base-lr, no --preset), both from published ResNet-50 ImageNet runs and
# expressed per common.BASE_BATCH (256) images, scaled to the global batch as make_optimizer
# does (LARS linearly, LAMB by the square root):
# - LARS: the first MLPerf run above, 10.5 at batch 3,264, i.e. 10.5 * 256 / 3264 = 0.82 at 256.
#   (0.1 at 256 is Goyal et al.'s rule for plain SGD; LARS's trust ratio makes its lr another
#   quantity, and 0.1 barely trains: issue 17.)
# - LAMB: You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
#   Minutes" (ICLR), ResNet-50 on ImageNet for 90 epochs: lr 4 / (2^k * 100) at batch 32K / 4^k
#   (0.04 at 32,768, square-root scaled for smaller batches), i.e. 0.04 * sqrt(256 / 32768) = 0.0035 at 256.
LARS_PUBLISHED_BASE_LR = MLPERF_RUNS[0].lr * common.BASE_BATCH / MLPERF_RUNS[0].global_batch
LAMB_PUBLISHED_BASE_LR = 0.04 * math.sqrt(common.BASE_BATCH / 32768)
PUBLISHED_LR_SOURCES = (f"LARS {LARS_PUBLISHED_BASE_LR:.4g}: NVIDIA's MLPerf Training ResNet-50 run at batch 3264, "
                        f"lr 10.5 (mlcommons/training_results_v2.0, NVIDIA/benchmarks/resnet/implementations/mxnet/"
                        f"config_DGXA100.sh), linearly scaled; LAMB {LAMB_PUBLISHED_BASE_LR:.4g}: You et al. 2020, "
                        "'Large Batch Optimization for Deep Learning: Training BERT in 76 Minutes', ResNet-50 on "
                        "ImageNet, lr 0.04 at batch 32768, square-root scaled")


def mlperf_table() -> str:
    return "; ".join(f"{r.global_batch}: lr {r.lr}, warmup {r.warmup_epochs}, {r.epochs} epochs, "
                     f"wd {r.weight_decay}, momentum {r.momentum}" for r in MLPERF_RUNS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.make_parser(__doc__.splitlines()[0], base_lr_help=PUBLISHED_LR_SOURCES)
    p.set_defaults(model="resnet50")  # the ResNet-50 recipe (common's default is resnet18 on the CPU)
    p.add_argument("--data", required=True, help="a folder with train/ and val/ (ImageFolder layout), or 'synthetic'")
    p.add_argument("--epochs", type=int, help="default: the preset's, else 90")
    p.add_argument("--warmup-epochs", type=float, help="linear warmup; default: the preset's, else 5 (Goyal et al.)")
    p.add_argument("--label-smoothing", type=float, help="default: 0.1")
    p.add_argument("--preset", choices=["mlperf"],
                   help="MLPerf ResNet-50 LARS hyper-parameters of the published run nearest the global batch "
                        "(below 3264: its lr scaled linearly), from NVIDIA's MLPerf Training submissions "
                        f"(mlcommons/training_results v0.7-v2.0): {mlperf_table()}; all with LARS eta 0.001, "
                        "momentum as listed, label smoothing 0.1, warmup from 0 then poly decay power 2 to "
                        "lr 1e-4, no weight decay or adaptation on BN/bias, eval every 4 epochs, target 75.9")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--workers", type=int, help="loader processes per rank (default: the CPU cores per local rank, "
                                               "at most 8)")
    p.add_argument("--eval-batch", type=int, help="images per evaluation forward (default: --micro-batch)")
    p.add_argument("--eval-every", type=int, help="epochs between evaluations (default: the preset's, else 1)")
    p.add_argument("--target-top1", type=float, help="stop once top-1 (in %%) reaches this (default: the preset's)")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (none written without it)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="how many of the latest to keep")
    p.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N optimizer steps")
    p.add_argument("--resume", help="a checkpoint folder step-N/, or a --checkpoint-dir (its latest); 'auto': "
                                    "the latest in --checkpoint-dir if there is one, else a fresh start")
    p.add_argument("--log-file", help="append the JSON lines to this file instead of stdout (not --log: torchrun "
                                      "would take that abbreviation as one of its own options)")
    p.add_argument("--tensorboard", help="write TensorBoard scalars to this folder (needs tensorboard)")
    p.add_argument("--synthetic-steps", type=int, default=10, help="optimizer steps per epoch with --data synthetic")
    p.add_argument("--dist-timeout", type=float, default=120.0,
                   help="seconds the process group's set-up and each collective wait for the other ranks before "
                        "failing. A rank that died or hangs then fails the job, so torchrun (--max-restarts) restarts "
                        "it from the last checkpoint instead of waiting torch's default (30 min for gloo, 10 for "
                        "NCCL); a restarted gloo group can also hang in its first connection, which this turns into "
                        "one more restart. 120 s is far above a healthy run's wait (ranks meet every step; rank 0 "
                        "writes a ResNet-50 checkpoint in seconds): raise it if ranks can drift further apart, e.g. "
                        "checkpoints on a slow shared filesystem or a slow start on some nodes")
    p.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # tests: SIGTERM after N steps
    p.add_argument("--kill-after-steps", type=int, help=argparse.SUPPRESS)  # tests: the last rank SIGKILLs itself
    return p.parse_args(argv)


@dataclasses.dataclass
class Plan:
    """What check_inputs found: everything decided before the process group starts."""
    accumulation: int
    steps_per_epoch: int
    epochs: int
    warmup_steps: int
    label_smoothing: float
    eval_every: int
    target_top1: float | None
    optimizer_options: dict
    recipe: str
    train: object = None  # ImageFolder (no transform) or None for synthetic data
    val: object = None
    resume: Path | None = None
    resume_state: dict | None = None


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and value < (0 if allow_zero else 1):
        raise SystemExit(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def check_inputs(args: argparse.Namespace, world: int) -> Plan:
    """Every check that can fail, before any process group, model or data loader exists."""
    for name in ("global_batch", "micro_batch", "image_size", "epochs", "eval_every", "keep_checkpoints",
                 "synthetic_steps", "eval_batch"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if not args.dist_timeout > 0:
        raise SystemExit(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if args.workers is None:
        args.workers = min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    _positive("--workers", args.workers, allow_zero=True)
    _positive("--save-every-steps", args.save_every_steps, allow_zero=True)
    if args.preset and (args.lamb or args.base_lr):
        conflict = "--lamb" if args.lamb else "--base-lr"
        raise SystemExit(f"--preset mlperf sets the LARS recipe and its lr; drop {conflict}")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise SystemExit("--tensorboard needs the tensorboard package (pip install tensorboard)")
    accumulation = common.check_batches(args, world)
    train = val = None
    if args.data == "synthetic":
        steps_per_epoch = args.synthetic_steps
    else:
        train, val = _image_folders(Path(args.data))
        args.num_classes = len(train.classes)
        per_rank = len(train) // world
        steps_per_epoch = per_rank // (args.global_batch // world)
        if steps_per_epoch == 0:
            raise SystemExit(f"--data {args.data}: train/ has {len(train)} images, fewer than one global batch of "
                             f"{args.global_batch} over {world} ranks")

    run = _mlperf_run(args.global_batch) if args.preset else None
    epochs = args.epochs or (run.epochs if run else 90)
    warmup_epochs = args.warmup_epochs if args.warmup_epochs is not None else (run.warmup_epochs if run else 5)
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if not 0 <= warmup_steps < epochs * steps_per_epoch:
        raise SystemExit(f"--warmup-epochs {warmup_epochs} ({warmup_steps} steps) must be >= 0 and shorter than "
                         f"--epochs {epochs} ({epochs * steps_per_epoch} steps)")
    if run:
        smallest = MLPERF_RUNS[0].global_batch  # below it: that run's lr scaled linearly (Goyal et al.)
        lr = run.lr * min(1.0, args.global_batch / smallest)
        options = dict(lr=lr, weight_decay=run.weight_decay, momentum=run.momentum, end_lr=MLPERF_END_LR,
                       warmup_start_factor=0.0)
        recipe = f"MLPerf ({run.source}, global batch {run.global_batch})"
    else:
        if args.base_lr is None:
            args.base_lr = LAMB_PUBLISHED_BASE_LR if args.lamb else LARS_PUBLISHED_BASE_LR
        options, recipe = {}, f"default (--base-lr {args.base_lr:.4g} at batch 256, scaled to the global batch)"
    plan = Plan(accumulation, steps_per_epoch, epochs, warmup_steps,
                args.label_smoothing if args.label_smoothing is not None else MLPERF_LABEL_SMOOTHING,
                args.eval_every or (MLPERF_EVAL_EVERY if run else 1),
                args.target_top1 if args.target_top1 is not None else (MLPERF_TARGET if run else None),
                options, recipe, train, val)
    if args.resume == "auto" and not args.checkpoint_dir:
        raise SystemExit("--resume auto needs --checkpoint-dir")
    resume = args.resume if args.resume != "auto" else args.checkpoint_dir
    if resume:
        plan.resume = _find_checkpoint(Path(resume))
        if plan.resume is None and args.resume != "auto":
            raise SystemExit(f"--resume {resume}: no checkpoint there (expected a step-N/ folder with trainer.pt, "
                             "or a --checkpoint-dir holding some)")
    if plan.resume:
        plan.resume_state = torch.load(plan.resume / "trainer.pt", weights_only=True)
        _check_resume(args, plan)
    return plan


def _image_folders(root: Path):
    import torchvision

    folders = []
    for split in ("train", "val"):
        path = root / split
        if not path.is_dir():
            raise SystemExit(f"--data {root}: {path} is missing (expected ImageFolder layout: "
                             f"{root}/train/<class>/<image> and {root}/val/<class>/<image>)")
        try:
            folders.append(torchvision.datasets.ImageFolder(str(path)))
        except (FileNotFoundError, RuntimeError) as error:  # no class folder, or a class without images
            raise SystemExit(f"--data {root}: {path} is empty or unreadable: {error}") from None
    train, val = folders
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise SystemExit(f"--data {root}: train/ and val/ have different class folders "
                         f"(only in train/: {only_train[:10]}, only in val/: {only_val[:10]})")
    return train, val


def _mlperf_run(global_batch: int) -> MLPerfRun:
    """The published run whose global batch is nearest (by ratio)."""
    return min(MLPERF_RUNS, key=lambda r: abs(math.log(global_batch / r.global_batch)))


# ----------------------------------------------------------------------------
# data

class EpochSampler(DistributedSampler):
    """DistributedSampler (this rank's share of a per-epoch shuffle) cut to whole optimizer
    steps, able to start at a step of the epoch (resume), yielding (epoch, index) so that the
    dataset can seed each sample's augmentation."""

    def __init__(self, dataset: Dataset, world: int, rank: int, seed: int, per_step: int) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.per_step, self.first_step = per_step, 0
        self.steps = self.num_samples // per_step

    def __iter__(self):
        indices = itertools.islice(super().__iter__(), self.first_step * self.per_step, self.steps * self.per_step)
        return ((self.epoch, index) for index in indices)

    def __len__(self) -> int:
        return (self.steps - self.first_step) * self.per_step


class Augmented(Dataset):
    """An ImageFolder whose sample (epoch, index) is transformed under torch's RNG seeded from
    (seed, epoch, index): the same crop and flip whichever worker loads it, and whether the
    run was interrupted or not. The caller's RNG state is left as it was."""

    def __init__(self, folder, transform, seed: int) -> None:
        self.folder, self.transform, self.seed = folder, transform, seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, label = self.folder[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * len(self.folder) + index)
            return self.transform(image), label


class EvalShard(Dataset):
    """Rank r evaluates images r, r + world, ...; the shards are padded to the same length
    (label -1, not counted) so every rank runs the same number of forwards (FSDP2's
    all-gathers must match)."""

    def __init__(self, folder, transform, rank: int, world: int) -> None:
        self.folder, self.transform = folder, transform
        self.indices = list(range(rank, len(folder), world))
        self.indices += [-1] * (math.ceil(len(folder) / world) - len(self.indices))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image, label = self.folder[max(index, 0)]
        return self.transform(image), label if index >= 0 else -1


def transforms(size: int):
    from torchvision.transforms import v2

    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    train = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *tail])
    resize = round(size * 256 / 224)
    val = v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size), *tail])
    return train, val


class Clock:
    """Seconds spent waiting for the next micro-batch."""
    wait = 0.0


def timed(micro_batches, device: torch.device, clock: Clock):
    """Micro-batches moved to the device, the wait for each added to ``clock``."""
    iterator = iter(micro_batches)
    while True:
        start = time.perf_counter()
        try:
            images, labels = next(iterator)
        except StopIteration:
            return
        clock.wait += time.perf_counter() - start
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# ----------------------------------------------------------------------------
# evaluation, buffers

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, images) over the whole val/ set, summed over ranks."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    cuda = device.type == "cuda"
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(images.contiguous(memory_format=common.memory_format(device)))
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        valid = labels >= 0
        counts += torch.stack([(hits[:, 0] & valid).sum(), (hits.any(dim=1) & valid).sum(), valid.sum()]).double()
    dist.all_reduce(counts)
    model.train()
    top1, top5, n = counts.tolist()
    return 100 * top1 / n, 100 * top5 / n, int(n)


def sync_buffers(model: torch.nn.Module, world: int) -> None:
    """Average the floating-point buffers (Ghost BN's running statistics) over ranks."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if world == 1 or not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    flat /= world
    for b, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(value.view_as(b))


# ----------------------------------------------------------------------------
# checkpoints

def _rng_state(generator: torch.Generator) -> dict:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(), "loader": generator.get_state()}


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    generator.set_state(state["loader"])


def _checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    return sorted(p for p in root.glob("step-*") if (p / "trainer.pt").is_file()) if root.is_dir() else []


def _find_checkpoint(path: Path) -> Path | None:
    """``path`` itself if it is a checkpoint, else the latest one in it (None: none there)."""
    if (path / "trainer.pt").is_file():
        return path
    found = _checkpoints(path)
    return found[-1] if found else None


def _meta(args: argparse.Namespace, plan: Plan) -> dict:
    return {"model": args.model, "num_classes": args.num_classes, "optimizer": "LAMB" if args.lamb else "LARS",
            "global_batch": args.global_batch, "epochs": plan.epochs, "sharded (--fsdp)": args.fsdp}


def _check_resume(args: argparse.Namespace, plan: Plan) -> None:
    saved, now = plan.resume_state["meta"], _meta(args, plan)
    differ = [f"{key} {saved.get(key)!r} there, {value!r} here"
              for key, value in now.items() if saved.get(key) != value]
    if differ:
        raise SystemExit(f"--resume {plan.resume}: the checkpoint is from another run: " + "; ".join(differ))


def save_checkpoint(root: Path, keep: int, trainer: dict, model, opt, schedule, generator: torch.Generator,
                    sharded: bool, rank: int, world: int) -> Path:
    """Write step-N/ under a temporary name, then rename it (a crash leaves the last one intact)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = root / f"step-{trainer['step']:08d}"
    partial = root / f".{final.name}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.partial"):  # left by a crash while saving
            shutil.rmtree(stale)
        partial.mkdir()
    dist.barrier()
    model_state, optim_state = get_state_dict(model, opt)
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
    elif rank == 0:
        torch.save({"model": model_state, "optim": optim_state}, partial / "model.pt")
    rng = [None] * world
    dist.all_gather_object(rng, _rng_state(generator))
    if rank == 0:
        torch.save({**trainer, "world": world, "scheduler": schedule.state_dict(), "rng": rng}, partial / "trainer.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in _checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(path: Path, state: dict, model, opt, schedule, generator: torch.Generator, sharded: bool,
                    rank: int, device: torch.device) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if sharded:  # loads into this run's shards, whatever the world size that wrote it
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = get_state_dict(model, opt)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=str(path))
    else:
        loaded = torch.load(path / "model.pt", map_location=device, weights_only=True)
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    schedule.load_state_dict(state["scheduler"])
    if rank < len(state["rng"]):  # a rank the writing run did not have keeps its seeded state
        _set_rng_state(state["rng"][rank], generator)


# ----------------------------------------------------------------------------
# logging, signals

class Log:
    """JSON lines (rank 0) to stdout or --log-file, mirrored to TensorBoard when asked."""

    def __init__(self, args: argparse.Namespace, rank: int) -> None:
        self.enabled = rank == 0
        self.file = open(args.log_file, "a") if args.log_file and self.enabled else sys.stdout
        self.tensorboard = None
        if args.tensorboard and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(args.tensorboard)

    def __call__(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        tqdm.write(json.dumps({"event": event, **fields}), file=self.file)
        self.file.flush()
        if self.tensorboard is not None and "step" in fields:
            for key, value in fields.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(f"{event}/{key}", value, fields["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.file is not sys.stdout:
            self.file.close()


class StopRequest:
    """SIGTERM/SIGINT ask to stop after the current step; another one, GRACE seconds later or
    more, acts at once. (Ctrl-C under torchrun reaches a worker twice: from the terminal, then
    forwarded by torchrun; that is still one request.)"""

    GRACE = 2.0

    def __init__(self) -> None:
        self.signal: int | None = None
        self.time = 0.0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is None:
            self.signal, self.time = signum, time.monotonic()
        elif time.monotonic() - self.time >= self.GRACE:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            signal.raise_signal(signum)


# ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = check_inputs(args, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world, device = common.init_distributed(timeout=args.dist_timeout)
    stop = StopRequest()
    log = Log(args, rank)
    try:
        train(args, plan, rank, world, device, stop, log)
    finally:
        log.close()
    common.finish()


def train(args: argparse.Namespace, plan: Plan, rank: int, world: int, device: torch.device, stop: StopRequest,
          log: Log) -> None:
    model = common.build_model(args, device)
    if args.fsdp:
        model = common.shard_fsdp(model)
        no_sync = lambda: common.fsdp_no_sync(model)  # noqa: E731
    elif world > 1:  # buffers: averaged by sync_buffers, not broadcast from rank 0 at each forward
        ddp_options = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
        model = common.wrap_ddp(model, device, **({"forward_sync_buffers": False} if "forward_sync_buffers"
                                                  in ddp_options else {"broadcast_buffers": False}))
        no_sync = model.no_sync
    else:
        no_sync = contextlib.nullcontext
    opt, schedule = common.make_optimizer(args, model, plan.epochs * plan.steps_per_epoch, plan.warmup_steps,
                                          **plan.optimizer_options)
    generator = torch.Generator().manual_seed(args.seed)
    step, epoch, first_step = 0, 0, 0
    if plan.resume:
        load_checkpoint(plan.resume, plan.resume_state, model, opt, schedule, generator, args.fsdp, rank, device)
        step, epoch, first_step = (plan.resume_state[k] for k in ("step", "epoch", "step_in_epoch"))

    clock = Clock()
    loader = val_loader = synthetic = None
    if plan.train is not None:
        train_transform, val_transform = transforms(args.image_size)
        sampler = EpochSampler(plan.train, world, rank, args.seed, args.global_batch // world)
        loader = DataLoader(Augmented(plan.train, train_transform, args.seed), batch_size=args.micro_batch,
                            sampler=sampler, num_workers=args.workers, pin_memory=device.type == "cuda",
                            drop_last=True, persistent_workers=args.workers > 0, generator=generator)
        val_loader = DataLoader(EvalShard(plan.val, val_transform, rank, world),
                                batch_size=args.eval_batch or args.micro_batch, num_workers=args.workers,
                                pin_memory=device.type == "cuda")
    else:
        synthetic = common.SyntheticData(args, rank, world, device)

    log("start", model=args.model, parameters=sum(p.numel() for p in model.parameters()),
        optimizer=type(opt).__name__, backend=opt.backend, recipe=plan.recipe, peak_lr=schedule.base_lrs[0],
        world=world, global_batch=args.global_batch, micro_batch=args.micro_batch, accumulation=plan.accumulation,
        steps_per_epoch=plan.steps_per_epoch, epochs=plan.epochs, warmup_steps=plan.warmup_steps,
        label_smoothing=plan.label_smoothing, sharding="fsdp2" if args.fsdp else "ddp" if world > 1 else "none",
        train_images=len(plan.train) if plan.train else None, val_images=len(plan.val) if plan.val else None,
        workers=args.workers, resumed_from=str(plan.resume) if plan.resume else None,
        resumed_world=plan.resume_state["world"] if plan.resume else None, step=step)

    def save(epoch: int, step_in_epoch: int) -> str | None:
        if not args.checkpoint_dir:
            return None
        trainer = {"meta": _meta(args, plan), "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch}
        path = save_checkpoint(Path(args.checkpoint_dir), args.keep_checkpoints, trainer, model, opt, schedule,
                               generator, args.fsdp, rank, world)
        log("checkpoint", step=step, epoch=epoch, path=str(path))
        return str(path)

    def stop_requested() -> bool:
        flag = torch.tensor([float(stop.signal is not None)], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0

    bar = tqdm(total=plan.epochs * plan.steps_per_epoch, initial=step, disable=rank != 0, unit="step",
               dynamic_ncols=True)
    model.train()
    for epoch in range(epoch, plan.epochs):
        if loader is not None:
            loader.sampler.set_epoch(epoch)
            loader.sampler.first_step = first_step
            stream = timed(loader, device, clock)
        for step_in_epoch in range(first_step, plan.steps_per_epoch):
            if synthetic is not None:
                stream = timed(synthetic.micro_batches(step, args.micro_batch), device, clock)
            clock.wait, start, lr = 0.0, time.perf_counter(), schedule.get_last_lr()[0]
            loss = common.optimizer_step(model, stream, plan.accumulation, no_sync, opt, schedule, plan.label_smoothing)
            sync_buffers(model, world)
            step += 1
            if args.stop_after_steps == step and rank == 0:
                signal.raise_signal(signal.SIGTERM)  # as a scheduler's preemption would
            if (args.kill_after_steps == step and rank == world - 1
                    and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
                os.kill(os.getpid(), signal.SIGKILL)  # a crashed worker, on torchrun's first attempt only
            # one collective for the log's loss (mean over ranks) and for agreeing to stop
            stats = torch.stack([loss.float(), torch.tensor(float(stop.signal is not None), device=device)])
            dist.all_reduce(stats)
            loss_value, stopping = stats[0].item() / world, stats[1].item() > 0
            seconds = time.perf_counter() - start
            log("train", epoch=epoch, step=step, loss=loss_value, lr=lr, images_per_s=args.global_batch / seconds,
                data_wait=clock.wait / seconds)
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}")
            if stopping:
                path = save(epoch, step_in_epoch + 1)
                log("stop", step=step, reason=signal.Signals(stop.signal).name if stop.signal else "another rank",
                    checkpoint=path)
                bar.close()
                return
            if args.save_every_steps and step % args.save_every_steps == 0:
                save(epoch, step_in_epoch + 1)
        first_step = 0
        top1 = None
        if val_loader is not None and ((epoch + 1) % plan.eval_every == 0 or epoch + 1 == plan.epochs):
            start = time.perf_counter()
            top1, top5, images = evaluate(model, val_loader, device)
            log("eval", epoch=epoch, step=step, top1=top1, top5=top5, images=images,
                images_per_s=images / (time.perf_counter() - start))
        path = save(epoch + 1, 0)
        if plan.target_top1 is not None and top1 is not None and top1 >= plan.target_top1:
            log("target", epoch=epoch, step=step, top1=top1, target=plan.target_top1, checkpoint=path)
            break
        if stop_requested():
            log("stop", step=step, reason=signal.Signals(stop.signal).name if stop.signal else "another rank",
                checkpoint=path)
            break
    bar.close()


if __name__ == "__main__":
    main()
