"""What examples/train_ddp.py, examples/train_fsdp.py and examples/train_imagenet.py share:
arguments, process group, synthetic data, the Ghost BN model, DDP/FSDP2 wrapping, LARS/LAMB
with the large-batch schedule, gradient accumulation with one gradient synchronisation per
optimizer step, and (for the synthetic-data examples) the training loop.

Nothing is downloaded: the data is generated on the device (a learnable task: each
class is a fixed random image, each sample that image plus noise).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

import fastlars
from fastlars.schedules import WarmupPolyDecay, scale_lr
from fastlars.train import accumulate_gradients

BASE_BATCH = 256  # the batch the base lr is tuned for (Goyal et al.)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except None (the help text says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def make_parser(description: str, base_lr_help: str = "LARS 0.1, LAMB 1e-3") -> argparse.ArgumentParser:
    """The flags every example has (each script adds its own); ``base_lr_help`` says what
    the script does without ``--base-lr``."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.add_argument("--global-batch", type=int, default=8192, help="samples per optimizer step, over all ranks")
    p.add_argument("--micro-batch", type=int, default=256 if gpu else 32, help="samples per forward/backward")
    p.add_argument("--image-size", type=int, default=224 if gpu else 32)
    p.add_argument("--model", default="resnet50" if gpu else "resnet18", help="a torchvision classification model")
    p.add_argument("--num-classes", type=int, default=1000 if gpu else 10)
    p.add_argument("--virtual-batch-size", type=int, default=32, help="Ghost BN's ghost batch")
    p.add_argument("--lamb", action="store_true", help="fastlars.LAMB instead of fastlars.LARS")
    p.add_argument("--base-lr", type=float, help=f"lr at batch {BASE_BATCH} (default: {base_lr_help})")
    p.add_argument("--backend", default="auto", help="the optimizer's backend (fastlars.available_backends())")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The synthetic-data examples' flags: the shared ones plus the schedule's length in steps."""
    p = make_parser(description)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (the schedule's length)")
    p.add_argument("--warmup-steps", type=int, help="default: steps // 5")
    return p.parse_args(argv)


def init_distributed(timeout: float | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device): NCCL and cuda:LOCAL_RANK on a GPU, gloo on the CPU.
    Without torchrun the script runs as one rank, its process group in memory (no port to pick).
    ``timeout`` (seconds): how long the group's set-up and each collective may wait for the
    other ranks before failing (None: torch's default, 10 min for NCCL, 30 min for gloo)."""
    torchrun = "RANK" in os.environ
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend, options = "nccl", dict(device_id=device)
    else:
        device, backend, options = torch.device("cpu"), "gloo", {}
    if timeout is not None:
        options["timeout"] = datetime.timedelta(seconds=timeout)
    if not torchrun:
        options.update(store=dist.HashStore(), rank=0, world_size=1)
    elif int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and \
            os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1" and os.environ.get("RANK") == "0":
        # torchrun's agent keeps one store for all the worker groups it starts, and the group's
        # keys carry no attempt number: a restarted group can read the dead workers' addresses
        # and fail (connection refused) or wait (issue 17). A fresh store per attempt avoids it.
        print("warning: torchrun --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a restarted "
              "group can read the dead workers' addresses and fail or time out (see the README)",
              file=sys.stderr, flush=True)
    dist.init_process_group(backend, **options)
    return dist.get_rank(), dist.get_world_size(), device


def finish() -> None:
    """Tear the process group down once every rank is done (no rank still talking to it)."""
    dist.barrier()
    dist.destroy_process_group()


def check_batches(args: argparse.Namespace, world: int) -> int:
    """Micro-batches per optimizer step on each rank."""
    if args.global_batch % (world * args.micro_batch):
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of {world} ranks x "
                         f"--micro-batch {args.micro_batch}")
    return args.global_batch // (world * args.micro_batch)


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The torchvision model, no weights, every BatchNorm replaced by Ghost BN. Seeded, so
    every rank starts from the same weights (FSDP2 shards each rank's copy as it is)."""
    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=args.num_classes)
    model = fastlars.convert_ghost_batchnorm(model, args.virtual_batch_size)
    return model.to(device=device, memory_format=memory_format(device))


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on a GPU (the layout cuDNN's fast convolutions want), the default elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def wrap_ddp(model: torch.nn.Module, device: torch.device, **options) -> torch.nn.parallel.DistributedDataParallel:
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **options)


def shard_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each residual block (other models: each top-level layer with parameters), then
    the root (stem, classifier, and what is left). Build the optimizer afterwards."""
    from torch.distributed.fsdp import fully_shard
    from torchvision.models.resnet import BasicBlock, Bottleneck

    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for layer in blocks or [c for c in model.children() if list(c.parameters())]:
        fully_shard(layer)
    fully_shard(model)
    return model


@contextlib.contextmanager
def fsdp_no_sync(model: torch.nn.Module):
    """FSDP2's counterpart of DDP's no_sync(): backward adds into local unsharded gradients,
    and parameters stay unsharded between micro-batches (no all-gather per micro-batch)."""
    model.set_requires_gradient_sync(False)
    model.set_reshard_after_forward(False)
    model.set_reshard_after_backward(False)
    try:
        yield
    finally:  # FSDP2's defaults for the last micro-batch: reduce-scatter, then reshard
        model.set_requires_gradient_sync(True)
        model.set_reshard_after_backward(True)
        model.set_reshard_after_forward(True)  # the blocks
        model.set_reshard_after_forward(False, recurse=False)  # the root: its backward follows at once


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module, total_steps: int, warmup_steps: int, *,
                   lr: float | None = None, weight_decay: float | None = None, momentum: float = 0.9,
                   end_lr: float = 0.0, warmup_start_factor: float | None = None):
    """LARS (linear lr scaling) or LAMB (square-root scaling), no decay and no trust ratio
    for biases and norm weights, warmup from the small-batch lr then polynomial decay
    (power 2) to ``end_lr``. The keywords replace the defaults (``--preset mlperf``)."""
    if args.lamb:
        lr = lr or scale_lr(args.base_lr or 1e-3, args.global_batch, BASE_BATCH, rule="sqrt")
        opt = fastlars.make_optimizer("lamb", model, weight_decay=0.01 if weight_decay is None else weight_decay,
                                      lr=lr, backend=args.backend)
    else:
        lr = lr or scale_lr(args.base_lr or 0.1, args.global_batch, BASE_BATCH)
        opt = fastlars.make_optimizer("lars", model, weight_decay=5e-5 if weight_decay is None else weight_decay,
                                      lr=lr, momentum=momentum, backend=args.backend)
    if warmup_start_factor is None:
        warmup_start_factor = WarmupPolyDecay.small_batch_factor(args.global_batch, BASE_BATCH)
    schedule = WarmupPolyDecay(opt, total_steps=total_steps, warmup_steps=warmup_steps, power=2.0,
                               warmup_start_factor=warmup_start_factor, min_factor=min(1.0, end_lr / lr))
    return opt, schedule


class SyntheticData:
    """This rank's share of each global batch: class c is a fixed random 8x8 image, scaled
    to the image size, plus noise. Each (step, rank) has its own samples."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
        self.args, self.rank, self.device = args, rank, device
        self.per_rank = args.global_batch // world
        g = torch.Generator(device=device).manual_seed(args.seed)  # the same templates on every rank
        self.templates = torch.randn(args.num_classes, 3, 8, 8, device=device, generator=g)

    def micro_batches(self, step: int, micro_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the step, one micro-batch at a time (never the whole share
        in memory at once). Each (step, micro-batch, rank) has its own samples."""
        size = self.args.image_size
        for part in range(self.per_rank // micro_batch):
            g = torch.Generator(device=self.device).manual_seed(
                (self.args.seed + 1) * 2**40 + step * 2**24 + part * 2**12 + self.rank)
            labels = torch.randint(0, self.args.num_classes, (micro_batch,), device=self.device, generator=g)
            images = torch.randn(micro_batch, 3, size, size, device=self.device, generator=g)
            images += F.interpolate(self.templates[labels], size=(size, size), mode="nearest")
            yield images, labels


def accumulate(model: torch.nn.Module, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int,
               no_sync: Callable[[], contextlib.AbstractContextManager], label_smoothing: float = 0.0) -> torch.Tensor:
    """fastlars.train.accumulate_gradients over ``count`` equal micro-batches taken from
    ``micro_batches`` (this rank's share of the global batch), synchronising gradients
    across ranks only in the backward of the last one: the others run under ``no_sync()``
    and just add into the local gradients. Each micro loss is weighted by 1 / count, so
    the gradients are those of the mean loss over the share. Returns that mean loss (local).
    bf16 autocast and channels_last on a GPU."""
    stream = iter(micro_batches)
    loss = None
    for index in range(count):
        inputs, targets = next(stream)
        cuda = inputs.device.type == "cuda"
        with no_sync() if index < count - 1 else contextlib.nullcontext():
            part = accumulate_gradients(model, _weighted_cross_entropy(1 / count, label_smoothing), inputs, targets,
                                        inputs.shape[0], autocast_dtype=torch.bfloat16 if cuda else None,
                                        memory_format=memory_format(inputs.device))
        loss = part if loss is None else loss + part
    return loss


def optimizer_step(model: torch.nn.Module, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int,
                   no_sync: Callable[[], contextlib.AbstractContextManager], opt: torch.optim.Optimizer,
                   schedule, label_smoothing: float = 0.0) -> torch.Tensor:
    """One optimizer step of the training loops (train here, train_imagenet.py's): accumulate
    this rank's share of the global batch (``accumulate``), step the optimizer and the
    schedule, drop the gradients. Returns the local mean loss."""
    loss = accumulate(model, micro_batches, count, no_sync, label_smoothing)
    opt.step()
    schedule.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _weighted_cross_entropy(weight: float, label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                      torch.Tensor]:
    return lambda output, target: F.cross_entropy(output, target, label_smoothing=label_smoothing) * weight


def train(args: argparse.Namespace, model: torch.nn.Module, no_sync: Callable[[], contextlib.AbstractContextManager],
          rank: int, world: int, device: torch.device) -> None:
    """The loop: per optimizer step, accumulate this rank's share of the global batch, step
    the optimizer and the schedule; rank 0 prints the loss (mean over ranks), lr, images/s."""
    micro_batches = check_batches(args, world)
    opt, schedule = make_optimizer(args, model, args.steps,
                                   args.steps // 5 if args.warmup_steps is None else args.warmup_steps)
    data = SyntheticData(args, rank, world, device)
    if rank == 0:
        print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
              f"{type(opt).__name__} backend {opt.backend}, global batch {args.global_batch} = "
              f"{world} ranks x {micro_batches} x {args.micro_batch}, "
              f"ghost batch {args.virtual_batch_size}, peak lr {schedule.base_lrs[0]:.4g}", flush=True)
    model.train()
    for step in range(args.steps):
        lr = schedule.get_last_lr()[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = optimizer_step(model, data.micro_batches(step, args.micro_batch), micro_batches, no_sync, opt, schedule)
        dist.all_reduce(loss)  # for the log: the mean loss over the global batch
        loss = loss.item() / world
        seconds = time.perf_counter() - start
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {loss:.4f}  lr {lr:.4g}  "
                  f"images/s {args.global_batch / seconds:.1f}", flush=True)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step + 1}")
