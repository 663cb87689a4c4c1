"""Large-batch training with FSDP2 (``fully_shard``): LARS (or LAMB) + Ghost BN at a global
batch of 8192 reached by gradient accumulation, on synthetic data.

    torchrun --nproc_per_node=2 examples/train_fsdp.py                    # CPU: resnet18, 32px, gloo
    torchrun --nproc_per_node=8 examples/train_fsdp.py --model resnet50   # GPUs: 224px, NCCL, bf16
    torchrun --nproc_per_node=2 examples/train_fsdp.py --lamb --global-batch 1024 --steps 5

Each residual block, then the root, is sharded: parameters and optimizer state become
DTensors holding 1/N of each tensor per rank. LARS/LAMB compute every layer's trust ratio
from global norms (one all-reduce per step for all layers' norms; LAMB one more);
``--backend auto`` picks a backend that takes sharded parameters (the first line printed
names it). Gradients are reduce-scattered once per optimizer step, in the last
micro-batch's backward; the other micro-batches run without collectives (``no_sync`` below),
accumulating unsharded gradients and keeping the parameters unsharded. That costs one full
copy of the parameters and gradients per rank during accumulation (ZeRO-2's footprint, not
ZeRO-3's) and saves two all-gathers and a reduce-scatter per block and micro-batch (1.7x
the images/s on 2 CPU ranks, resnet18 at 32px). For a model whose full parameters do not
fit, pass ``contextlib.nullcontext`` instead: sharded throughout, collectives per micro-batch.
"""

import contextlib

from torch.distributed.fsdp import FSDPModule, fully_shard
from torchvision.models.resnet import BasicBlock, Bottleneck

import common  # examples/common.py: the script's folder is on sys.path


@contextlib.contextmanager
def no_sync(model: FSDPModule):
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


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    rank, world, device = common.init_distributed()
    model = common.build_model(args, device)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for layer in blocks or [c for c in model.children() if list(c.parameters())]:
        fully_shard(layer)  # residual blocks (other models: each top-level layer with parameters)
    fully_shard(model)  # the root: stem, classifier, and what is left
    common.train(args, model, lambda: no_sync(model), rank, world, device)  # optimizer built after sharding
    common.finish()


if __name__ == "__main__":
    main()
