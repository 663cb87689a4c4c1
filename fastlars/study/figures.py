"""The study's figures, from the summary report.summarise makes (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from .report import CRITICAL_FACTOR
from .search import StudyPlan


def figures(summary: dict, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan: StudyPlan = summary["plan"]
    cells = summary["cells"]
    names = list(dict.fromkeys(c["recipe"] for c in cells))
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    markers = dict(zip(names, "osD^v<>pX*"))
    batches = sorted({c["batch"] for c in cells})
    paths = []

    # 1. steps to target vs batch, log-log: perfect scaling, critical batches, B_simple, unreached cells at the cap
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for n in names:
        cs = [c for c in cells if c["recipe"] == n]
        done = [c for c in cs if c["steps_to_target"] is not None]
        spread = [sorted(v for v in c["seed_steps"] if v is not None) for c in done]
        if done:
            ax.errorbar([c["batch"] for c in done], [c["steps_to_target"] for c in done], color=colors[n],
                        marker=markers[n], capsize=2, elinewidth=0.8, label=f"{n} (bars: seeds' min-max)",
                        yerr=[[c["steps_to_target"] - v[0] for c, v in zip(done, spread)],
                              [v[-1] - c["steps_to_target"] for c, v in zip(done, spread)]])
        missed = [c for c in cs if c["steps_to_target"] is None and c["lr"] is not None]
        if missed:
            ax.scatter([c["batch"] for c in missed], [c["step_cap"] for c in missed], marker=markers[n],
                       facecolors="none", edgecolors=[colors[n]], s=80, zorder=3,
                       label=f"{n}: not reached by the cap (drawn at the cap)")
        crit = summary["critical"].get(n, {})
        if crit.get("critical_batch"):
            ax.axvline(crit["critical_batch"], color=colors[n], ls=":", lw=1.5,
                       label=f"{n} critical batch ≈ {crit['critical_batch']:.0f} (band: 95 % interval)")
            if isinstance(crit["lo"], float) and isinstance(crit["hi"], float):
                ax.axvspan(crit["lo"], crit["hi"], color=colors[n], alpha=0.08)
    first = next((c for c in cells if c["batch"] == batches[0] and c["steps_to_target"] is not None), None)
    if first:
        s0, b0 = first["steps_to_target"], first["batch"]
        ax.plot(batches, [s0 * b0 / b for b in batches], "k--", lw=1,
                label=f"perfect scaling from {first['recipe']} at {b0} (steps ∝ 1/B)")
        ax.plot(batches, [CRITICAL_FACTOR * s0 * b0 / b for b in batches], color="k", ls=(0, (1, 3)), lw=1,
                label=f"{CRITICAL_FACTOR:g}x perfect scaling (the critical batch's threshold)")
    if summary["b_simple"] is not None:
        ax.axvline(summary["b_simple"], color="gray", ls="-.", lw=2,
                   label=f"B_simple at the target ≈ {summary['b_simple']:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"steps to {plan.target:.0%} validation accuracy (best lr)")
    ax.set_title(f"{title}: steps to target, lr tuned per batch (Shallue et al.)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(_save(fig, out / "steps_to_target.png", batches))

    # 2. the tuned lr vs batch
    fig, ax = plt.subplots(figsize=(9, 5))
    for n in names:
        cs = [c for c in cells if c["recipe"] == n and c["lr"] is not None]
        if cs:
            ax.plot([c["batch"] for c in cs], [c["lr"] for c in cs], color=colors[n], marker=markers[n], label=n)
        edge = [c for c in cs if c["edge_limit"]]
        if edge:
            ax.scatter([c["batch"] for c in edge], [c["lr"] for c in edge], marker="x", color="k", s=60, zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel("lr with the fewest steps to the target")
    ax.set_title(f"{title}: tuned peak lr (x: at a hard edge)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(_save(fig, out / "tuned_lr.png", batches))

    epoch_cells = [c for c in cells if c.get("test_acc") is not None]
    if epoch_cells:
        eb = sorted({c["batch"] for c in epoch_cells})
        for key, ylabel, name in (("test_acc", "test accuracy %", "test_accuracy.png"),
                                  ("sharpness", "top Hessian eigenvalue at the end (BN eval)", "sharpness.png")):
            fig, ax = plt.subplots(figsize=(9, 5))
            for n in names:
                cs = [c for c in epoch_cells if c["recipe"] == n and c.get(key) is not None]
                if key == "test_acc":
                    mid = [100 * c["test_acc"] for c in cs]
                    err = [[100 * (c["test_acc"] - c["test_acc_ci"][0]) for c in cs],
                           [100 * (c["test_acc_ci"][1] - c["test_acc"]) for c in cs]]
                else:
                    mid = [c["sharpness"][0] for c in cs]
                    err = [[c["sharpness"][0] - c["sharpness"][1] for c in cs],
                           [c["sharpness"][2] - c["sharpness"][0] for c in cs]]
                if cs:
                    ax.errorbar([c["batch"] for c in cs], mid, yerr=err, label=n, color=colors[n],
                                marker=markers[n], capsize=3)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("global batch size")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}: {plan.epochs} epochs at the tuned lr (95 % intervals over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            paths.append(_save(fig, out / name, eb))
    return paths


def _save(fig, path: Path, batches: list[int]) -> Path:
    import matplotlib.pyplot as plt

    for ax in fig.axes:  # the swept batch sizes as plain numbers on the x axis
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off() if ax.get_yscale() == "linear" else None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
