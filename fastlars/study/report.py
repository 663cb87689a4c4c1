"""Summaries of the study's runs: every cell (its search and its report run), paired
intervals over the report seeds, the critical batch, McCandlish's fit, the verdict per
paper and the markdown tables (the figures: figures.py). Reads only the cached run
records (no dataset needed).

Every reported number comes from report runs, whose seeds never chose a point. Cells
share their report seeds (initialisation and data order), so every comparison is paired:
a percentile bootstrap over the seeds of the mean per-seed log-ratio (steps, sharpness)
or difference (accuracy)."""

from __future__ import annotations

import math
import statistics

from .core import RECIPES
from .search import StudyPlan, lr_at, paper_spec, replay
from .stats import CRITICAL_FACTOR, RULE, critical_batch, noise_fit
from .verdicts import cell_of, verdicts

__all__ = ["summarise", "markdown"]

# ---------------------------------------------------------------------------------------------
# Cells


def _report_fields(plan: StudyPlan, record: dict, epochs: float) -> dict:
    """What a report run measured, per seed (in report-seed order) and summarised."""
    ms = record["members"]
    cap = record["updates"]
    out = {"report_seeds": [m["seed"] for m in ms], "updates": record["updates"], "epochs": round(record["epochs"], 3),
           "budget_epochs": epochs, "batch_trajectory": record["batch_trajectory"],
           "hessian_vector_products_at_most": record.get("hessian_vector_products_at_most", 0),
           "test_values": [m["test"] for m in ms], "test_acc": statistics.fmean(m["test"] for m in ms),
           "final_val": statistics.fmean(m["final_val"] for m in ms), "train_loss": [m["train_loss"] for m in ms],
           "diverged": sum(m["diverged"] for m in ms), "targets": {}}
    for t in plan.targets:
        steps = [m["steps_to_target"][str(t)] for m in ms]
        out["targets"][str(t)] = {"seed_steps": steps, "reached": sum(s is not None for s in steps),
                                  "median": _none_inf(statistics.median(math.inf if s is None else s for s in steps)),
                                  "censored_at": cap}
    for key in ("fgsm_test", "sharpness_at_loss", "step_at_loss", "b_simple"):
        values = [m.get(key) for m in ms]
        if any(v is not None for v in values):
            out[key] = values
    if ms[0].get("b_simple_at_target"):  # per target, per seed
        out["b_simple_at_target"] = {t: [m["b_simple_at_target"][t] for m in ms] for t in ms[0]["b_simple_at_target"]}
    return out


def _none_inf(v: float) -> float | None:
    return None if math.isinf(v) else v


def _tuned_cell(workload: str, plan: StudyPlan, recipe: str, batch: int, cache: dict) -> dict:
    state = replay(plan, recipe, batch, cache)
    runs = state["rounds"] + ([state["report"]] if state.get("report") else [])
    cell = {"workload": workload, "recipe": recipe, "batch": batch, "tuned": True,
            "search_seeds": list(plan.search_seeds), "report_seeds": list(plan.report_seeds),
            "warmups_tried": sorted({w for _, w, _ in state["outcomes"]}),
            "momenta_tried": sorted({m for _, _, m in state["outcomes"] if m is not None}),
            "lrs_tried": [{"lr": lr_at(state["centre"], k), "warmup_epochs": w, "momentum": m,
                           "median_steps": _none_inf(o.median), "reached": sum(s is not None for s in o.steps),
                           "diverged": sum(o.diverged), "val_at_stop": statistics.fmean(o.final_val)}
                          for (k, w, m), o in sorted(state["outcomes"].items(), key=lambda kv: (kv[0][1:], kv[0][0]))],
            "rounds": len(state["rounds"]), "pending": state["pending"] is not None,
            "wall_s": sum(r["wall_s"] for r in runs), "run_keys": [r["key"] for r in runs]}
    if "point" in state:
        lr, w, m = state["point"]
        cell.update(lr=lr, warmup_epochs=w, momentum=m, lr_interior=state["interior"], edge_limit=state["edge_limit"],
                    diverged_above=state["diverged_above"])
    if state.get("report"):
        cell.update(_report_fields(plan, state["report"], plan.epochs))
    return cell


def _paper_cell(workload: str, plan: StudyPlan, recipe: str, batch: int, cache: dict) -> dict:
    spec, why = paper_spec(plan, recipe, batch, cache)
    record = cache.get(spec.key()) if spec is not None else None
    cell = {"workload": workload, "recipe": recipe, "batch": batch, "tuned": False, "title": RECIPES[recipe].title,
            "report_seeds": list(plan.report_seeds), "pending": record is None, "waits": why,
            "wall_s": record["wall_s"] if record else 0.0, "run_keys": [record["key"]] if record else []}
    if spec is not None:
        lr, w, m = spec.points[0]
        cell.update(lr=lr, warmup_epochs=w, momentum=m, max_batch=spec.max_batch)
    if record is not None:
        cell.update(_report_fields(plan, record, spec.epochs))
    return cell


def summarise(plans: dict[str, StudyPlan], cells: list[tuple[str, str, int]], cache: dict) -> dict:
    out = []
    for workload, recipe, batch in cells:
        plan = plans[workload]
        out.append((_tuned_cell if RECIPES[recipe].tuned else _paper_cell)(workload, plan, recipe, batch, cache))
    summary = {"cells": out, "plans": plans, "run_keys": {k for c in out for k in c["run_keys"]}}
    summary["critical"] = _criticals(summary)
    summary["verdicts"] = verdicts(summary)
    summary["json"] = {"critical_batch": summary["critical"], "verdicts": summary["verdicts"],
                       "cells": out, "rule": RULE}
    return summary


def _criticals(summary: dict) -> dict:
    """Per workload, tuned recipe and target: the study's critical batch and McCandlish's fit."""
    out: dict = {}
    for workload, plan in summary["plans"].items():
        for recipe in dict.fromkeys(c["recipe"] for c in summary["cells"] if c["tuned"] and c["workload"] == workload):
            cs = [cell_of(summary, workload, recipe, b) for b in plan.batches]
            if any(c is None for c in cs):
                continue
            for t in plan.targets:
                steps = [c["targets"][str(t)]["seed_steps"] for c in cs]
                fit = noise_fit(list(plan.batches), steps)
                fit.pop("draws", None)
                out.setdefault(workload, {}).setdefault(recipe, {})[str(t)] = {
                    "study": critical_batch(list(plan.batches), steps), "mccandlish_fit": fit}
    return out


# ---------------------------------------------------------------------------------------------
# Tables


def _steps_text(c: dict, t: str) -> str:
    if "targets" not in c:
        return "unfinished"
    v = c["targets"][t]
    n = len(c["report_seeds"])
    if v["reached"] == 0:
        return f"not in {c['updates']}"
    text = f"{v['median']:.0f}" if v["median"] is not None else f">{c['updates']}"
    return text + ("" if v["reached"] == n else f" ({v['reached']}/{n})")


def _point_text(c: dict) -> str:
    if c.get("lr") is None:
        return "-"
    m = "" if c.get("momentum") is None else f", m {c['momentum']:g}"
    edge = "" if not c["tuned"] or c.get("lr_interior") else f" (edge: {c.get('edge_limit') or 'at the edge'})"
    return f"{c['lr']:.3g}, w {c['warmup_epochs']:g}{m}{edge}"


def markdown(summary: dict) -> str:
    lines = []
    for workload, plan in summary["plans"].items():
        cells = [c for c in summary["cells"] if c["workload"] == workload]
        tuned = [c for c in cells if c["tuned"]]
        names = list(dict.fromkeys(c["recipe"] for c in tuned))
        t0, t1 = (str(t) for t in (plan.targets + plan.targets)[:2])
        lines += [f"### {workload}: {plan.epochs:g} epochs of {plan.n_train} samples", "",
                  f"Median over the {len(plan.report_seeds)} report seeds of the steps to {float(t0):.0%} / "
                  f"{float(t1):.0%} validation accuracy ('(k/n)': seeds that reached it; 'not in N': none within the "
                  "budget's N steps), test accuracy at the end of the budget (mean), and the point chosen on the "
                  f"search seeds {list(plan.search_seeds)} (lr, warm-up epochs, momentum):", "",
                  "| recipe | " + " | ".join(str(b) for b in plan.batches) + " |",
                  "| --- |" + " --- |" * len(plan.batches)]
        for name in names:
            row = {c["batch"]: c for c in tuned if c["recipe"] == name}
            lines.append(f"| {name} | " + " | ".join(
                f"{_steps_text(row[b], t0)} / {_steps_text(row[b], t1)}; "
                + (f"{row[b]['test_acc']:.1%}; " if "test_acc" in row[b] else "")
                + _point_text(row[b]) for b in plan.batches if b in row) + " |")
        papers = [c for c in cells if not c["tuned"]]
        if papers:
            lines += ["", "The papers' prescriptions (report seeds only, at a point derived from the tuned sgd cell):",
                      "", "| run | batch | point | epochs | updates | steps to primary / second | test | FGSM test |",
                      "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
            for c in papers:
                fg = f"{statistics.fmean(c['fgsm_test']):.1%}" if c.get("fgsm_test") else "-"
                lines.append(f"| {c['recipe']} | {c['batch']}" + (f"->{c['max_batch']}" if c.get("max_batch") else "")
                             + f" | {_point_text(c)} | {c.get('epochs', '-')} | {c.get('updates', '-')} | "
                             f"{_steps_text(c, t0)} / {_steps_text(c, t1)} | "
                             + (f"{c['test_acc']:.1%}" if "test_acc" in c else "unfinished") + f" | {fg} |")
        crit = summary["critical"].get(workload, {})
        if crit:
            lines += ["", f"Critical batch (samples to the target reach {CRITICAL_FACTOR:g}x the smallest batch's; "
                      "geometric mean over the report seeds, 95 % interval from resampling them) and McCandlish's "
                      "fit B_noise of S = S_min (1 + B_noise / B):", ""]
            for name, by_t in crit.items():
                lines.append(f"- {name}: " + "; ".join(
                    f"{float(t):.0%}: {v['study']['note']}, fit "
                    + ("undetermined" if v["mccandlish_fit"]["b_crit"] is None else
                       f"{v['mccandlish_fit']['b_crit']:.0f} [{v['mccandlish_fit']['lo']:.0f}, "
                       f"{v['mccandlish_fit']['hi']:.0f}]") for t, v in by_t.items()))
        lines += ["", "Every search (each point tried, its median steps over the search seeds):", "",
                  "| recipe | batch | points tried: lr/warm-up/momentum (median steps; '-': not reached) |",
                  "| --- | ---: | --- |"]
        for c in tuned:
            tried = ", ".join(f"{t['lr']:.3g}/{t['warmup_epochs']:g}" + ("" if t["momentum"] is None else
                                                                         f"/{t['momentum']:g}")
                              + (f" ({t['median_steps']:.0f})" if t["median_steps"] is not None else " (-)")
                              for t in c["lrs_tried"])
            lines.append(f"| {c['recipe']} | {c['batch']} | {tried} |")
        lines.append("")
    lines += [RULE, "", "| paper | claim at this scale | measured (paired, 95 % interval) | verdict |",
              "| --- | --- | --- | --- |"]
    for v in summary["verdicts"]:
        lines.append(f"| {v['paper']} | {v['claim']} | {v['effect']} | **{v['verdict']}** |")
    return "\n".join(lines) + "\n"
