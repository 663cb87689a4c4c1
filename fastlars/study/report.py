"""Summaries of the study's runs: per (recipe, batch) statistics, the measured critical
batch, B_simple, the markdown tables and the figures."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .core import RECIPES

__all__ = ["summarise", "critical_batch", "markdown", "figures"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _steps_to_target(record: dict, k: int, target: float) -> int | None:
    """First measured step at which member k's validation accuracy reaches ``target``."""
    return next((step for step, acc in record["val_curve"] if acc[k] >= target), None)


def _row(record: dict, target: float) -> dict:
    spec = record["spec"]
    # steps-to-target from the stored validation curve, so any --target works on cached runs
    members = [dict(m, steps_to_target=_steps_to_target(record, k, target)) for k, m in enumerate(record["members"])]
    per_lr: dict[float, list[dict]] = {}
    for m in members:
        per_lr.setdefault(m["base_lr"], []).append(m)
    chosen = per_lr[record["chosen_base_lr"]]
    test_mean, test_std = _mean_std([m["test"] for m in chosen])

    def median_steps(ms: list[dict]) -> float:
        # a seed that never reaches the target counts as infinitely many steps
        return statistics.median(m["steps_to_target"] if m["steps_to_target"] is not None else math.inf for m in ms)

    best_steps = min(median_steps(ms) for ms in per_lr.values())
    sharp_mean, sharp_std = _mean_std([m["sharpness"] for m in chosen])
    # B_simple when the member first reached the target (recorded for the run's own target), else at the end
    at_target = record["target"] == target
    b_simple = [m["b_simple_at_target"] if at_target and m["b_simple_at_target"] is not None else m["b_simple"]
                for m in chosen if m["b_simple"] is not None]
    b_simple_end = [m["b_simple"] for m in chosen if m["b_simple"] is not None]
    return {"recipe": spec["recipe"], "batch": spec["batch"], "chosen_base_lr": record["chosen_base_lr"],
            "test_mean": test_mean, "test_std": test_std, "seeds": len(chosen),
            "val_mean": statistics.mean(m["final_val"] for m in chosen),
            "steps_to_target": None if math.isinf(best_steps) else best_steps,
            "sharpness_mean": sharp_mean, "sharpness_std": sharp_std, "updates": record["updates"],
            "epochs": record["epochs"], "final_batch": record["batch_trajectory"][-1][1],
            "wall_s": record["wall_s"], "b_simple": statistics.median(b_simple) if b_simple else None,
            "b_simple_end": statistics.median(b_simple_end) if b_simple_end else None}


def critical_batch(rows: list[dict], factor: float = 2.0) -> dict:
    """Shallue et al.'s measurement on one recipe's rows: the largest batch before
    steps-to-target first exceeds ``factor`` x perfect scaling (steps ∝ 1/B) from the
    smallest batch, a run that misses the target counting as a departure."""
    rows = sorted(rows, key=lambda r: r["batch"])
    base = rows[0]
    if base["steps_to_target"] is None:
        return {"critical_batch": None, "note": f"the smallest batch ({base['batch']}) never reaches the target"}
    last = base["batch"]
    for r in rows[1:]:
        perfect = base["steps_to_target"] * base["batch"] / r["batch"]
        if r["steps_to_target"] is None or r["steps_to_target"] > factor * perfect:
            return {"critical_batch": last, "departs_at": r["batch"],
                    "note": f"departs from perfect scaling between {last} and {r['batch']}"}
        last = r["batch"]
    return {"critical_batch": last, "departs_at": None, "note": f"perfect scaling up to the largest batch {last}"}


def summarise(records: list[dict], ref_batch: int, target: float) -> dict:
    rows = sorted((_row(r, target) for r in records), key=lambda r: (list(RECIPES).index(r["recipe"]), r["batch"]))
    by_recipe: dict[str, list[dict]] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], []).append(r)
    b_simple = [r["b_simple"] for r in rows if r["b_simple"] is not None]
    b_simple_end = [r["b_simple_end"] for r in rows if r["b_simple_end"] is not None]
    return {"rows": rows, "critical": {k: critical_batch(v) for k, v in by_recipe.items()},
            "b_simple": statistics.median(b_simple) if b_simple else None,
            "b_simple_end": statistics.median(b_simple_end) if b_simple_end else None, "ref_batch": ref_batch, "target": target}


def _fmt_steps(steps: float | None) -> str:
    return "not reached" if steps is None else f"{steps:g}"


def markdown(summary: dict, target: float) -> str:
    rows = summary["rows"]
    batches = sorted({r["batch"] for r in rows})
    lines = [f"Test accuracy (mean ± std over seeds, lr chosen on validation) by global batch size:", "",
             "| recipe | " + " | ".join(str(b) for b in batches) + " |",
             "| --- |" + " --- |" * len(batches)]
    for name in dict.fromkeys(r["recipe"] for r in rows):
        cells = {r["batch"]: f"{r['test_mean']:.1%} ± {r['test_std']:.1%}" for r in rows if r["recipe"] == name}
        lines.append(f"| {name} | " + " | ".join(cells.get(b, "") for b in batches) + " |")
    lines += ["", f"Every run (steps to {target:.0%} validation accuracy: median over seeds at the best lr; "
              "sharpness: top Hessian eigenvalue at the end, BN in eval mode; wall: the whole ensemble of "
              "lrs x seeds):", "",
              "| recipe | batch | base lr | test acc | steps to target | updates | epochs | final batch | sharpness "
              "| wall s |", "| --- |" + " ---: |" * 9]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['batch']} | {r['chosen_base_lr']:g} | {r['test_mean']:.1%} ± "
                     f"{r['test_std']:.1%} | {_fmt_steps(r['steps_to_target'])} | {r['updates']} | "
                     f"{r['epochs']:g} | {r['final_batch']} | {r['sharpness_mean']:.1f} | {r['wall_s']:.0f} |")
    lines += ["", "Critical batch (steps-to-target leaves 2x perfect scaling), per recipe:", ""]
    for name, c in summary["critical"].items():
        lines.append(f"- {name}: {c['critical_batch'] if c['critical_batch'] is not None else 'undetermined'} "
                     f"({c['note']})")
    b, end = summary["b_simple"], summary["b_simple_end"]
    lines += ["", "B_simple (McCandlish et al.; EMA along the small-batch sgd run, median over the seeds of the "
              "lr chosen on validation): " + ("not measured" if b is None else
                                             f"{b:.0f} when the run first reaches the target, {end:.0f} at the end")]
    return "\n".join(lines) + "\n"


def figures(summary: dict, out: Path, title: str, target: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    names = list(dict.fromkeys(r["recipe"] for r in rows))
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    markers = dict(zip(names, "osD^v<>pX*"))
    paths = []

    def series(name: str, key: str) -> tuple[list, list]:
        rs = [r for r in rows if r["recipe"] == name and r[key] is not None]
        return [r["batch"] for r in rs], rs

    # 1. test accuracy vs batch
    fig, ax = plt.subplots(figsize=(8, 5))
    for n in names:
        xs, rs = series(n, "test_mean")
        ax.errorbar(xs, [r["test_mean"] * 100 for r in rs], yerr=[r["test_std"] * 100 for r in rs], label=n,
                    color=colors[n], marker=markers[n], capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size (ramp/ABS/ABSA: the largest batch)")
    ax.set_ylabel("test accuracy % (lr chosen on validation)")
    ax.set_title(f"{title}: test accuracy at a fixed epoch budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    paths.append(_save(fig, out / "test_accuracy.png"))

    # 2. steps to target vs batch, log-log, with perfect scaling and B_simple
    fig, ax = plt.subplots(figsize=(8, 5))
    for n in names:
        xs, rs = series(n, "steps_to_target")
        if xs:
            ax.plot(xs, [r["steps_to_target"] for r in rs], label=n, color=colors[n], marker=markers[n])
    reached = [r for r in rows if r["steps_to_target"] is not None]
    if reached:
        b0 = min(r["batch"] for r in reached)
        s0 = min(r["steps_to_target"] for r in reached if r["batch"] == b0)
        bs = sorted({r["batch"] for r in rows})
        ax.plot(bs, [s0 * b0 / b for b in bs], "k--", lw=1, label="perfect scaling (steps ∝ 1/B)")
    if summary["b_simple"] is not None:
        ax.axvline(summary["b_simple"], color="gray", ls=":", lw=2,
                   label=f"B_simple at the target ≈ {summary['b_simple']:.0f}")
        ax.axvline(summary["b_simple_end"], color="gray", ls="-.", lw=1.5,
                   label=f"B_simple at the end ≈ {summary['b_simple_end']:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"steps to {target:.0%} validation accuracy (best lr)")
    ax.set_title(f"{title}: steps to target (missing points: target not reached)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    paths.append(_save(fig, out / "steps_to_target.png"))

    # 3. sharpness vs batch
    fig, ax = plt.subplots(figsize=(8, 5))
    for n in names:
        xs, rs = series(n, "sharpness_mean")
        ax.errorbar(xs, [r["sharpness_mean"] for r in rs], yerr=[r["sharpness_std"] for r in rs], label=n,
                    color=colors[n], marker=markers[n], capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog")  # the largest-magnitude eigenvalue can be negative
    ax.set_ylim(bottom=min([0.0] + [r["sharpness_mean"] - r["sharpness_std"] for r in rows]))
    ax.set_xlabel("global batch size")
    ax.set_ylabel("top Hessian eigenvalue at the end (BN eval)")
    ax.set_title(f"{title}: sharpness (Keskar et al.)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    paths.append(_save(fig, out / "sharpness.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    batches = sorted({int(x) for ax in fig.axes for line in ax.get_lines() for x in line.get_xdata()
                      if float(x).is_integer()})
    for ax in fig.axes:  # the swept batch sizes as plain numbers on the x axis
        ax.set_xticks(batches, [str(b) for b in batches])
        if ax.get_yscale() == "linear":
            ax.minorticks_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
