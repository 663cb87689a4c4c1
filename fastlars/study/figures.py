"""The study's figures, from the summary report.summarise makes (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def figures(summary: dict, out: Path) -> list[Path]:
    """Per workload: steps to each target vs batch (log-log, the report seeds' median and
    range, perfect scaling from the smallest batch) and test accuracy at the end of the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = summary["plans"]
    paths = []
    for workload, plan in plans.items():
        cells = [c for c in summary["cells"] if c["workload"] == workload and c["tuned"] and "targets" in c]
        if not cells:
            continue
        names = list(dict.fromkeys(c["recipe"] for c in cells))
        fig, axes = plt.subplots(1, len(plan.targets) + 1, figsize=(5 * (len(plan.targets) + 1), 4.5))
        for ax, t in zip(axes, plan.targets):
            for i, n in enumerate(names):
                cs = [c for c in cells if c["recipe"] == n]
                xs, ys, lo, hi, miss = [], [], [], [], []
                for c in cs:
                    v = c["targets"][str(t)]
                    reached = [s for s in v["seed_steps"] if s is not None]
                    if v["median"] is None:
                        miss.append((c["batch"], c["updates"]))
                        continue
                    xs.append(c["batch"])
                    ys.append(v["median"])
                    lo.append(v["median"] - min(reached))
                    hi.append((max(reached) if len(reached) == len(v["seed_steps"]) else c["updates"]) - v["median"])
                color = plt.cm.tab10(i)
                if xs:
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="osD^v"[i % 5], color=color, capsize=2, label=n)
                if miss:
                    ax.scatter(*zip(*miss), marker="osD^v"[i % 5], facecolors="none", edgecolors=[color], s=70)
            first = [c for c in cells if c["batch"] == plan.batches[0] and c["targets"][str(t)]["median"]]
            if first:
                s0 = first[0]["targets"][str(t)]["median"]
                b = np.array(plan.batches, dtype=float)
                ax.plot(b, s0 * plan.batches[0] / b, "k--", lw=1, label=f"perfect scaling from {first[0]['recipe']}")
            ax.set(xscale="log", yscale="log", xlabel="batch", title=f"steps to {t:.0%} validation accuracy")
            ax.set_xscale("log", base=2)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        ax = axes[-1]
        for i, n in enumerate(names):
            cs = [c for c in cells if c["recipe"] == n]
            ax.errorbar([c["batch"] for c in cs], [100 * c["test_acc"] for c in cs],
                        yerr=[[100 * (c["test_acc"] - min(c["test_values"])) for c in cs],
                              [100 * (max(c["test_values"]) - c["test_acc"]) for c in cs]],
                        marker="osD^v"[i % 5], color=plt.cm.tab10(i), capsize=2, label=n)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch", ylabel="test accuracy (%)", title=f"after {plan.epochs:g} epochs")
        ax.legend(fontsize=7)
        fig.suptitle(f"{workload}: report seeds' median (bars: range; hollow: not reached in the budget)")
        fig.tight_layout()
        path = out / f"{workload}_steps_and_accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
