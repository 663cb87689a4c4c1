"""Large-batch training with DistributedDataParallel: LARS (or LAMB) + Ghost BN at a global
batch of 8192 reached by gradient accumulation, on synthetic data.

    torchrun --nproc_per_node=2 examples/train_ddp.py                    # CPU: resnet18, 32px, gloo
    torchrun --nproc_per_node=8 examples/train_ddp.py --model resnet50   # GPUs: 224px, NCCL, bf16
    torchrun --nproc_per_node=2 examples/train_ddp.py --lamb --global-batch 1024 --steps 5

DDP averages gradients over ranks in backward, so the optimizer needs nothing distributed:
every rank runs the same LARS/LAMB step on the same averaged gradients. The gradient
all-reduce runs once per optimizer step, in the last micro-batch's backward
(``model.no_sync()`` for the others).
"""

import common  # examples/common.py: the script's folder is on sys.path


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    rank, world, device = common.init_distributed()
    model = common.wrap_ddp(common.build_model(args, device), device)
    common.train(args, model, model.no_sync, rank, world, device)
    common.finish()


if __name__ == "__main__":
    main()
