"""Convergence demo on real data: scikit-learn's digits (shipped with the package, no
download), a small CNN, small-batch SGD against large-batch training (>= 30 % of the
training set per step) at the same lr, with linear scaling and warmup only (Goyal et al.),
and with the recipe (linear lr scaling + warmup from the small-batch lr + polynomial decay
+ LARS + Ghost BN). Same epochs for every
configuration; test accuracy over several seeds, and a plot of the curves.

    python -m fastlars.demo [--epochs 40] [--seeds 0 1 2] [--large-batch 512] [--plot demo.png]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastlars
from fastlars.schedules import WarmupPolyDecay, scale_lr

SMALL_BATCH, SMALL_LR = 32, 0.05


def load_digits(seed: int = 0):
    """(train_x, train_y, test_x, test_y): 8x8 images scaled to [0, 1], 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def configurations(large_batch: int) -> dict[str, dict]:
    return {
        f"small batch {SMALL_BATCH}, SGD": dict(batch=SMALL_BATCH, recipe=False),
        f"large batch {large_batch}, SGD, same lr": dict(batch=large_batch, recipe=False),
        f"large batch {large_batch}, SGD + scaled lr + warmup (Goyal)": dict(batch=large_batch, recipe="goyal"),
        f"large batch {large_batch}, recipe (LARS + GBN + scaled lr + warmup)": dict(batch=large_batch, recipe=True),
    }


def train(config: dict, data, epochs: int, seed: int) -> list[float]:
    """Test accuracy after each epoch."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    model = small_cnn()
    batch = config["batch"]
    steps_per_epoch = -(-len(train_y) // batch)
    if config["recipe"]:
        if config["recipe"] == "goyal":  # linear scaling + warmup, plain SGD and BatchNorm
            opt = torch.optim.SGD(model.parameters(), lr=scale_lr(SMALL_LR, batch, SMALL_BATCH), momentum=0.9,
                                  weight_decay=5e-4)
        else:
            model = fastlars.convert_ghost_batchnorm(model, virtual_batch_size=SMALL_BATCH)
            opt = fastlars.LARS(fastlars.param_groups(model, weight_decay=5e-4),
                                lr=scale_lr(SMALL_LR, batch, SMALL_BATCH), momentum=0.9, trust_coefficient=0.02)
        scheduler = WarmupPolyDecay(opt, total_steps=epochs * steps_per_epoch,
                                    warmup_steps=max(1, epochs * steps_per_epoch // 8),
                                    warmup_start_factor=WarmupPolyDecay.small_batch_factor(batch, SMALL_BATCH))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=SMALL_LR, momentum=0.9, weight_decay=5e-4)
        scheduler = WarmupPolyDecay(opt, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    accuracies = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            if len(idx) < 2:
                continue
            F.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            accuracies.append((model(test_x).argmax(1) == test_y).float().mean().item())
    return accuracies


def run(epochs: int = 40, seeds: tuple[int, ...] = (0, 1, 2), large_batch: int = 512,
        plot_path: Path | None = None) -> dict[str, list[list[float]]]:
    data = load_digits()
    share = large_batch / len(data[1])
    print(f"digits: {len(data[1])} training / {len(data[3])} test images; large batch {large_batch} = "
          f"{share:.0%} of the training set; {epochs} epochs; seeds {list(seeds)}")
    curves = {name: [train(cfg, data, epochs, seed) for seed in seeds]
              for name, cfg in configurations(large_batch).items()}
    width = max(len(n) for n in curves)
    print(f"{'configuration':<{width}}  final test accuracy (mean ± std over seeds)")
    for name, runs in curves.items():
        finals = [r[-1] for r in runs]
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        print(f"{name:<{width}}  {statistics.mean(finals):.2%} ± {spread:.2%}   "
              f"({', '.join(f'{a:.1%}' for a in finals)})")
    if plot_path is not None:
        plot(curves, plot_path)
    return curves


def plot(curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in curves.items():
        mean = [statistics.mean(v) for v in zip(*runs)]
        ax.plot(range(1, len(mean) + 1), mean, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title("digits: small vs large batch, with and without the recipe")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastlars.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--large-batch", type=int, default=512)
    parser.add_argument("--plot", type=Path, default=Path("bench/results/demo-digits.png"))
    args = parser.parse_args(argv)
    run(args.epochs, tuple(args.seeds), args.large_batch, args.plot)


if __name__ == "__main__":
    main()
