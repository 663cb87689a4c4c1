"""Log per-layer LARS telemetry with ``opt.layer_stats()``: which layers sit at the clip?

Trains a small MLP on scikit-learn's digits (shipped with the package, no download) with
LARS in LARC's clip mode (``trust_clip=True``: r = min(η‖w‖/(‖g‖+λ‖w‖) / lr, 1)), and
writes one JSON line per logged step: for every layer ‖w‖, ‖g‖ and the ratio it got.
A layer whose ratio is 1 is pinned at the clip: its step is plain SGD at the full lr.
``layer_stats()`` returns device tensors and reads nothing on the host; only writing the
log (``.tolist()``) synchronises, so log every few steps on a GPU.

    python examples/layer_stats.py --steps 200 --log-every 20 --out layer_stats.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

import fastlars


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", default="-", help="JSON lines file ('-': stdout)")
    args = parser.parse_args(argv)

    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = fastlars.LARS(fastlars.param_groups(model, weight_decay=5e-4), lr=args.lr, momentum=0.9,
                        trust_coefficient=0.02, trust_clip=True, backend=args.backend)
    names = [name for name, _ in model.named_parameters()]
    by_param = {id(p): name for name, p in model.named_parameters()}
    out = sys.stdout if args.out == "-" else open(args.out, "w")
    pinned_share = {}
    try:
        for step in range(args.steps):
            index = torch.randint(len(x), (args.batch,))
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % args.log_every == 0 or step == args.steps - 1:
                stats = opt.layer_stats()
                layers = {by_param[id(p)]: {"weight_norm": w, "grad_norm": g, "trust_ratio": r}
                          for p, w, g, r in zip(stats.params, stats.weight_norm.tolist(), stats.grad_norm.tolist(),
                                                stats.trust_ratio.tolist())}
                adapted = [n for n in names if n.endswith("weight")]
                pinned = [n for n in adapted if layers[n]["trust_ratio"] >= 1.0]
                pinned_share[step] = len(pinned) / len(adapted)
                out.write(json.dumps({"step": step, "loss": loss.item(), "pinned_at_clip": pinned,
                                      "layers": layers}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"share of weight layers pinned at the clip, by logged step: {pinned_share}", file=sys.stderr)
    return pinned_share


if __name__ == "__main__":
    main()
