"""What examples/train_ddp.py and examples/train_fsdp.py share: arguments, process group,
synthetic data, the Ghost BN model, LARS/LAMB with the large-batch schedule, gradient
accumulation with one gradient synchronisation per optimizer step, and the training loop.

Nothing is downloaded: the data is generated on the device (a learnable task: each
class is a fixed random image, each sample that image plus noise).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

import fastlars
from fastlars.schedules import WarmupPolyDecay, scale_lr
from fastlars.train import accumulate_gradients

BASE_BATCH = 256  # the batch the base lr is tuned for (Goyal et al.)


def parse_args(description: str) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--global-batch", type=int, default=8192, help="samples per optimizer step, over all ranks")
    p.add_argument("--micro-batch", type=int, default=256 if gpu else 32, help="samples per forward/backward")
    p.add_argument("--image-size", type=int, default=224 if gpu else 32)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (the schedule's length)")
    p.add_argument("--warmup-steps", type=int, help="default: steps // 5")
    p.add_argument("--model", default="resnet50" if gpu else "resnet18", help="a torchvision classification model")
    p.add_argument("--num-classes", type=int, default=1000 if gpu else 10)
    p.add_argument("--virtual-batch-size", type=int, default=32, help="Ghost BN's ghost batch")
    p.add_argument("--lamb", action="store_true", help="fastlars.LAMB instead of fastlars.LARS")
    p.add_argument("--base-lr", type=float, help=f"lr at batch {BASE_BATCH} (default: LARS 0.1, LAMB 1e-3)")
    p.add_argument("--backend", default="auto", help="the optimizer's backend (fastlars.available_backends())")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device): NCCL and cuda:LOCAL_RANK on a GPU, gloo on the CPU.
    Without torchrun the script runs as one rank."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29500").items():
        os.environ.setdefault(key, value)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
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
    return model.to(device=device, memory_format=torch.channels_last if device.type == "cuda"
                    else torch.contiguous_format)


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module):
    """LARS (linear lr scaling) or LAMB (square-root scaling), no decay and no trust ratio
    for biases and norm weights, warmup from the small-batch lr then polynomial decay."""
    if args.lamb:
        lr = scale_lr(args.base_lr or 1e-3, args.global_batch, BASE_BATCH, rule="sqrt")
        opt = fastlars.LAMB(fastlars.param_groups(model, weight_decay=0.01), lr=lr, backend=args.backend)
    else:
        lr = scale_lr(args.base_lr or 0.1, args.global_batch, BASE_BATCH)
        opt = fastlars.LARS(fastlars.param_groups(model, weight_decay=5e-5), lr=lr, momentum=0.9,
                            backend=args.backend)
    warmup = args.steps // 5 if args.warmup_steps is None else args.warmup_steps
    schedule = WarmupPolyDecay(opt, total_steps=args.steps, warmup_steps=warmup, power=2.0,
                               warmup_start_factor=WarmupPolyDecay.small_batch_factor(args.global_batch, BASE_BATCH))
    return opt, schedule


class SyntheticData:
    """This rank's share of each global batch: class c is a fixed random 8x8 image, scaled
    to the image size, plus noise. Each (step, rank) has its own samples."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
        self.args, self.rank, self.device = args, rank, device
        self.per_rank = args.global_batch // world
        g = torch.Generator(device=device).manual_seed(args.seed)  # the same templates on every rank
        self.templates = torch.randn(args.num_classes, 3, 8, 8, device=device, generator=g)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.args.image_size
        g = torch.Generator(device=self.device).manual_seed((self.args.seed + 1) * 2**40 + step * 2**20 + self.rank)
        labels = torch.randint(0, self.args.num_classes, (self.per_rank,), device=self.device, generator=g)
        images = torch.randn(self.per_rank, 3, size, size, device=self.device, generator=g)
        images += F.interpolate(self.templates[labels], size=(size, size), mode="nearest")
        return images, labels


def accumulate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int,
               no_sync: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """fastlars.train.accumulate_gradients over this rank's batch, synchronising gradients
    across ranks only in the backward of the last micro-batch: the others run under
    ``no_sync()`` and just add into the local gradients. Returns the local mean loss.

    accumulate_gradients weights each micro loss by its share of the batch it is given;
    the extra factor here makes that the share of the whole rank batch."""
    cuda = inputs.device.type == "cuda"
    options = dict(autocast_dtype=torch.bfloat16 if cuda else None,
                   memory_format=torch.channels_last if cuda else torch.contiguous_format)
    head = inputs.shape[0] - micro_batch
    loss = torch.zeros((), device=inputs.device)
    for part, sync in ((slice(0, head), no_sync), (slice(head, None), contextlib.nullcontext)):
        n = inputs[part].shape[0]
        if n == 0:
            continue
        with sync():
            loss += accumulate_gradients(model, _weighted_cross_entropy(n / inputs.shape[0]), inputs[part],
                                         targets[part], micro_batch, **options)
    return loss


def _weighted_cross_entropy(weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda output, target: F.cross_entropy(output, target) * weight


def train(args: argparse.Namespace, model: torch.nn.Module, no_sync: Callable[[], contextlib.AbstractContextManager],
          rank: int, world: int, device: torch.device) -> None:
    """The loop: per optimizer step, accumulate this rank's share of the global batch, step
    the optimizer and the schedule; rank 0 prints the loss (mean over ranks), lr, images/s."""
    micro_batches = check_batches(args, world)
    opt, schedule = make_optimizer(args, model)
    data = SyntheticData(args, rank, world, device)
    if rank == 0:
        print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
              f"{type(opt).__name__} backend {opt.backend}, global batch {args.global_batch} = "
              f"{world} ranks x {micro_batches} x {args.micro_batch}, "
              f"ghost batch {args.virtual_batch_size}, peak lr {schedule.base_lrs[0]:.4g}", flush=True)
    model.train()
    for step in range(args.steps):
        inputs, targets = data.batch(step)
        lr = schedule.get_last_lr()[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = accumulate(model, inputs, targets, args.micro_batch, no_sync)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(loss)  # for the log: the mean loss over the global batch
        loss = loss.item() / world
        seconds = time.perf_counter() - start
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {loss:.4f}  lr {lr:.4g}  "
                  f"images/s {args.global_batch / seconds:.1f}", flush=True)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step + 1}")
