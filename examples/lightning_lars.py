"""LARS in PyTorch Lightning: ``configure_optimizers`` returns ``fastlars.LARS`` over
``fastlars.param_groups`` (no weight decay and no trust ratio for biases and norm
weights) with the large-batch schedule, ``WarmupPolyDecay`` stepped every optimizer step.

    python examples/lightning_lars.py            # a small MLP with Ghost BN, on synthetic data, on the CPU

Nothing is downloaded: the data is a fixed random linear labelling of Gaussian inputs.
tests/test_integrations.py checks that Trainer.fit ends with the weights of a plain loop.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastlars
from fastlars.schedules import WarmupPolyDecay, scale_lr


class LarsClassifier(L.LightningModule):
    def __init__(self, features: int = 16, classes: int = 4, batch_size: int = 64, total_steps: int = 100,
                 warmup_steps: int = 10, virtual_batch_size: int = 16, base_lr: float = 32.0,
                 weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = torch.nn.Sequential(
            torch.nn.Linear(features, 32, bias=False), fastlars.GhostBatchNorm1d(32, virtual_batch_size),
            torch.nn.ReLU(), torch.nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        optimizer = fastlars.LARS(fastlars.param_groups(self.model, weight_decay=h.weight_decay),
                                  lr=scale_lr(h.base_lr, h.batch_size), momentum=0.9)
        schedule = WarmupPolyDecay(optimizer, total_steps=h.total_steps, warmup_steps=h.warmup_steps)
        # "interval": "step": the schedule counts optimizer steps (Lightning's default is epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def synthetic_data(samples: int, features: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--base-lr", type=float, default=32.0, help="at batch 256, scaled linearly")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    module = LarsClassifier(batch_size=args.batch_size, total_steps=args.steps, base_lr=args.base_lr)
    loader = DataLoader(synthetic_data(4096), batch_size=args.batch_size, shuffle=True, drop_last=True)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    print(f"final loss {trainer.callback_metrics['loss']:.4f}")


if __name__ == "__main__":
    main()
