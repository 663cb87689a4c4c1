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
micro-batch's backward; the other micro-batches run without collectives (``common.fsdp_no_sync``),
accumulating unsharded gradients and keeping the parameters unsharded. That costs one full
copy of the parameters and gradients per rank during accumulation (ZeRO-2's footprint, not
ZeRO-3's) and saves two all-gathers and a reduce-scatter per block and micro-batch (1.7x
the images/s on 2 CPU ranks, resnet18 at 32px). For a model whose full parameters do not
fit, pass ``contextlib.nullcontext`` instead: sharded throughout, collectives per micro-batch.
"""

import common  # examples/common.py: the script's folder is on sys.path


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    rank, world, device = common.init_distributed()
    model = common.shard_fsdp(common.build_model(args, device))  # each residual block, then the root
    # the optimizer is built after sharding; no_sync: see common.fsdp_no_sync
    common.train(args, model, lambda: common.fsdp_no_sync(model), rank, world, device)
    common.finish()


if __name__ == "__main__":
    main()
