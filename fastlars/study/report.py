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

import numpy as np

from .core import HOFFER_FACTOR, KESKAR_LOSS, RECIPES
from .search import StudyPlan, lr_at, paper_spec, replay

__all__ = ["summarise", "paired", "critical_batch", "noise_fit", "markdown", "RULE", "PAPERS"]

CRITICAL_FACTOR = 2.0  # critical batch: samples to the target reach 2x the smallest batch's (Shallue et al.)
STEPS_MARGIN = 1.25  # "matches" in steps: the ratio below 1.25
POINTS_MARGIN = 1.0  # "keeps the accuracy": within 1 point of test accuracy
NOISE_FACTOR = 3.0  # "B_simple predicts B_crit": within a factor of 3 (fixed before any run)
RESAMPLES = 10_000
PAPERS = ("goyal", "lars", "lamb", "hoffer", "smith", "keskar", "yao", "mccandlish", "nado")

RULE = (f"**Rule.** Each paper's own claim is restated at this scale with a direction and, where it claims "
        f"'as good as', a margin ({STEPS_MARGIN}x in steps, {POINTS_MARGIN:g} point of test accuracy, a factor "
        f"{NOISE_FACTOR:g} for the noise scale), fixed before any run. Its effect is measured on the report seeds "
        "(never the seeds that chose the lr), paired: both arms share the seeds (initialisation and data order), "
        f"and the 95 % interval is a percentile bootstrap ({RESAMPLES:,} resamples of the seeds) of the mean "
        "per-seed log-ratio (steps, sharpness, batch sizes) or difference (accuracy). At each tested batch a claim "
        "is *supported* when the interval lies wholly on the claimed side of its threshold, *contradicted* when "
        "wholly on the other side, *open* otherwise. **Reproduced**: supported at every tested batch; **partly**: "
        "supported at some, not all; **not reproduced**: contradicted somewhere and supported nowhere; "
        "**inconclusive**: open everywhere (the interval allows both). A seed that does not reach a target within "
        "the budget counts at the budget's steps (a bound in its favour; marked 'censored'). The entry's "
        "`interval` is the one of its headline test (named in the entry).")


# ---------------------------------------------------------------------------------------------
# Statistics


def paired(a: list[float], b: list[float], kind: str = "ratio", resamples: int = RESAMPLES,
           seed: int = 0) -> tuple[float, float, float]:
    """The paired effect of ``a`` against ``b`` (per-seed values, the same seeds in the same
    order): the ratio of geometric means (``kind="ratio"``) or the mean difference
    (``"diff"``), with its 95 % percentile bootstrap interval over the seeds."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired needs two equal, non-empty lists of per-seed values, got {len(a)} and {len(b)}")
    if kind not in ("ratio", "diff"):
        raise ValueError(f"kind must be 'ratio' or 'diff', got {kind!r}")
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = np.log(a / b) if kind == "ratio" else a - b
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    out = (float(d.mean()), float(lo), float(hi))
    return tuple(math.exp(v) for v in out) if kind == "ratio" else out


def _judge(ci: tuple[float, float, float], threshold: float, claim_above: bool) -> str:
    lo, hi = ci[1], ci[2]
    if claim_above:
        return "supported" if lo > threshold else ("contradicted" if hi < threshold else "open")
    return "supported" if hi < threshold else ("contradicted" if lo > threshold else "open")


def verdict_word(tests: list[str]) -> str:
    if not tests:
        return "inconclusive"
    if all(t == "supported" for t in tests):
        return "reproduced"
    if "supported" in tests:
        return "partly"
    return "not reproduced" if "contradicted" in tests else "inconclusive"


def _crossing(batches: list[int], steps: list[float], factor: float) -> float:
    """Where samples to the target (B x steps) first reach ``factor`` x the smallest batch's,
    interpolated on log-log axes; inf if never within the batches, nan if the smallest batch
    never reaches the target; a cell that never reaches counts as the crossing's upper end."""
    if not math.isfinite(steps[0]):
        return math.nan
    base = batches[0] * steps[0]
    prev = (math.log(batches[0]), 0.0)
    for b, s in zip(batches[1:], steps[1:]):
        if not math.isfinite(s):
            return float(b)
        rel = math.log(b * s / base)
        if rel >= math.log(factor):
            x0, y0 = prev
            x1 = math.log(b)
            return math.exp(x0 + (math.log(factor) - y0) / (rel - y0) * (x1 - x0))
        prev = (math.log(b), rel)
    return math.inf


def _geomean(values) -> float:
    values = [math.inf if v is None else v for v in values]
    return math.inf if any(not math.isfinite(v) for v in values) else math.exp(statistics.fmean(map(math.log, values)))


def _interval(draws: list[float]) -> tuple[float, float]:
    ordered = sorted(draws, key=lambda v: -1.0 if math.isnan(v) else v)
    return ordered[int(0.025 * len(ordered))], ordered[int(0.975 * len(ordered)) - 1]


def critical_batch(batches: list[int], seed_steps: list[list[float | None]], factor: float = CRITICAL_FACTOR,
                   resamples: int = 2000, seed: int = 0) -> dict:
    """Shallue et al.'s critical batch: where steps-to-target leaves perfect scaling (samples to
    the target ``factor`` x the smallest batch's), interpolated between the measured batches on
    the geometric means over seeds; 95 % interval from resampling the seeds jointly across
    batches (they are the same seeds: paired)."""
    order = np.argsort(batches)
    batches = [int(batches[i]) for i in order]
    seed_steps = [seed_steps[i] for i in order]
    point = _crossing(batches, [_geomean(s) for s in seed_steps], factor)
    rng = np.random.default_rng(seed)
    n = len(seed_steps[0])
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        draws.append(_crossing(batches, [_geomean([s[i] for i in idx]) for s in seed_steps], factor))
    lo, hi = _interval(draws)
    if math.isnan(point):
        note = f"undetermined: the smallest batch ({batches[0]}) does not reach the target on every seed"
    elif math.isinf(point):
        note = f"beyond the largest batch ({batches[-1]})"
    else:
        note = f"{point:.0f} [{_fmt_b(lo)}, {_fmt_b(hi)}]"
    return {"critical_batch": None if not math.isfinite(point) else point, "lo": _num(lo), "hi": _num(hi),
            "beyond_largest": math.isinf(point), "note": note}


def _fit_noise(batches: list[int], steps: list[float]) -> float:
    """McCandlish et al.'s S = S_min (1 + B_noise / B), least squares of S on 1/B: B_noise."""
    x, y = 1.0 / np.asarray(batches, dtype=float), np.asarray(steps, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope / intercept) if intercept > 0 else math.inf


def noise_fit(batches: list[int], seed_steps: list[list[float | None]], resamples: int = 2000, seed: int = 0) -> dict:
    """B_crit from McCandlish's fit over the batches every seed reached, with its 95 % interval
    (seeds resampled jointly across batches)."""
    keep = [i for i, s in enumerate(seed_steps) if all(v is not None for v in s)]
    if len(keep) < 2:
        return {"b_crit": None, "lo": None, "hi": None, "batches": [batches[i] for i in keep]}
    bs, ss = [batches[i] for i in keep], [seed_steps[i] for i in keep]
    n = len(ss[0])
    point = _fit_noise(bs, [_geomean(s) for s in ss])
    rng = np.random.default_rng(seed)
    draws = [_fit_noise(bs, [_geomean([s[i] for i in idx]) for s in ss])
             for idx in (rng.integers(0, n, n) for _ in range(resamples))]
    lo, hi = _interval(draws)
    return {"b_crit": point, "lo": lo, "hi": hi, "batches": bs, "draws": draws}


def _num(v: float) -> float | str | None:
    return None if math.isnan(v) else (f"> {v}" if math.isinf(v) else v)


def _fmt_b(v: float) -> str:
    return "?" if math.isnan(v) else ("beyond" if math.isinf(v) else f"{v:.0f}")


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
    for key in ("fgsm_test", "sharpness_at_loss", "step_at_loss", "b_simple", "b_simple_at_target"):
        values = [m.get(key) for m in ms]
        if any(v is not None for v in values):
            out[key] = values
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
    summary["verdicts"] = _verdicts(summary)
    summary["json"] = {"critical_batch": summary["critical"], "verdicts": summary["verdicts"],
                       "cells": out, "rule": RULE}
    return summary


def _cell(summary: dict, workload: str, recipe: str, batch: int) -> dict | None:
    c = next((c for c in summary["cells"] if (c["workload"], c["recipe"], c["batch"]) == (workload, recipe, batch)),
             None)
    return c if c is not None and "test_values" in c else None


def _criticals(summary: dict) -> dict:
    """Per workload, tuned recipe and target: the study's critical batch and McCandlish's fit."""
    out: dict = {}
    for workload, plan in summary["plans"].items():
        for recipe in dict.fromkeys(c["recipe"] for c in summary["cells"] if c["tuned"] and c["workload"] == workload):
            cs = [_cell(summary, workload, recipe, b) for b in plan.batches]
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
# Verdicts: each paper's own claim at this scale


def _steps(c: dict, plan: StudyPlan, target: float | None = None) -> tuple[list[float], int]:
    """Per-seed steps to the target, censored seeds at the run's budget; and how many were censored."""
    t = c["targets"][str(plan.targets[0] if target is None else target)]
    return [s if s is not None else float(c["updates"]) for s in t["seed_steps"]], t["reached"]


def _fmt(ci, kind: str) -> str:
    if kind == "diff":
        return f"{ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}]"
    return f"{ci[0]:.2f} [{ci[1]:.2f}, {ci[2]:.2f}]"


class _Claim:
    """Collects one paper's tests (each: a batch, a paired interval, supported/contradicted/open)."""

    def __init__(self, paper: str, claim: str) -> None:
        self.paper, self.claim, self.tests, self.notes = paper, claim, [], []

    def test(self, label: str, ci, kind: str, threshold: float, claim_above: bool, unit: str = "",
             censored: int = 0) -> str | None:
        if ci is None:  # no seed reached the target in either arm: nothing to compare
            self.notes.append(f"{label}: neither arm reaches the target on any seed (no test)")
            return None
        word = _judge(ci, threshold, claim_above)
        self.tests.append({"label": label, "point": ci[0], "interval": [ci[1], ci[2]], "kind": kind, "unit": unit,
                           "threshold": threshold, "claimed_side": "above" if claim_above else "below",
                           "result": word, "censored_seeds": censored})
        return word

    def entry(self, headline: int | None = None) -> dict:
        words = [t["result"] for t in self.tests]
        head = self.tests[-1 if headline is None else headline] if self.tests else None
        parts = [f"{t['label']}: {_fmt((t['point'], *t['interval']), t['kind'])}{t['unit']} ({t['result']}"
                 + (f"; {t['censored_seeds']} censored" if t["censored_seeds"] else "") + ")" for t in self.tests]
        return {"paper": self.paper, "claim": self.claim, "verdict": verdict_word(words),
                "interval": head and head["interval"], "point": head and head["point"],
                "headline": head and head["label"], "paired": True, "tests": self.tests,
                "effect": "; ".join(parts + self.notes) or "no complete cell"}


def _steps_ratio(a: dict, b: dict, plan: StudyPlan):
    """The paired steps ratio a/b to the primary target, or None when no seed of either reached it."""
    (sa, ra), (sb, rb) = _steps(a, plan), _steps(b, plan)
    return None if ra == 0 and rb == 0 else paired(sa, sb)


def _pts(c: dict) -> list[float]:
    return [100 * v for v in c["test_values"]]


def _censored(*cells_and_plan) -> int:
    *cs, plan = cells_and_plan
    return sum(len(c["report_seeds"]) - c["targets"][str(plan.targets[0])]["reached"] for c in cs)


def _verdicts(summary: dict) -> list[dict]:
    plans: dict[str, StudyPlan] = summary["plans"]
    get = lambda w, r, b: _cell(summary, w, r, b)  # noqa: E731
    out = []
    deep = list(plans)[-1]  # the headline workload of multi-workload claims: the last (the deeper) one

    # Goyal et al.: the linear rule with gradual warm-up keeps the tuned lr's steps and accuracy; without warm-up
    # it fails at the largest batches.
    cl = _Claim("goyal", "Goyal et al. 2017: the lr scaled linearly from the tuned reference batch, with gradual "
                         f"warm-up, matches the lr tuned at each batch: steps to the primary target within "
                         f"{STEPS_MARGIN}x and test accuracy within {POINTS_MARGIN:g} point; without warm-up it "
                         "loses one of them at the largest batch")
    for w, plan in plans.items():
        for b in plan.batches:
            g, s, nw = get(w, "goyal", b), get(w, "sgd", b), get(w, "goyal_nowarm", b)
            if g and s:
                cl.test(f"{w}@{b} steps goyal/sgd", _steps_ratio(g, s, plan), "ratio", STEPS_MARGIN, False,
                        censored=_censored(g, s, plan))
                cl.test(f"{w}@{b} test goyal-sgd", paired(_pts(g), _pts(s), "diff"), "diff", -POINTS_MARGIN, True,
                        " points")
            if nw and g and b == max(plan.batches):
                ci = paired(_pts(nw), _pts(g), "diff")
                cl.test(f"{w}@{b} test no-warm-up-goyal (claim: a loss)", ci, "diff", -POINTS_MARGIN, False, " points")
    out.append(cl.entry(headline=1 if len(cl.tests) > 1 else None))

    # You et al.: at a fixed epoch budget, LARS (LAMB) keeps the accuracy that SGD (AdamW) loses at large batch.
    for name, base, paper in (("lars", "sgd", "You et al. 2017 (LARS)"), ("lamb", "adamw", "You et al. 2019 (LAMB)")):
        cl = _Claim(name, f"{paper}: at the fixed epoch budget, at the batches where tuned {base} loses accuracy "
                          f"(its mean test accuracy {POINTS_MARGIN:g}+ point below its reference batch's; the "
                          f"largest batch if none), tuned {name} is more accurate than tuned {base} (paired "
                          f"difference above 0). Second view, not in the verdict: steps {base}/{name}")
        head = None
        for w, plan in plans.items():
            ref = get(w, base, plan.ref_batch)
            if ref is None:
                continue
            losing = [b for b in plan.batches if b > plan.ref_batch and get(w, base, b)
                      and get(w, base, b)["test_acc"] <= ref["test_acc"] - POINTS_MARGIN / 100]
            for b in losing or [max(plan.batches)]:
                o, s = get(w, name, b), get(w, base, b)
                if o and s:
                    cl.test(f"{w}@{b} test {name}-{base}", paired(_pts(o), _pts(s), "diff"), "diff", 0.0, True,
                            " points")
                    if w == deep:
                        head = len(cl.tests) - 1
                    ratio = _steps_ratio(s, o, plan)
                    cl.notes.append(f"{w}@{b} steps {base}/{name} "
                                    + ("-: neither reaches the target" if ratio is None else _fmt(ratio, "ratio"))
                                    + (f" ({_censored(o, s, plan)} censored)" if _censored(o, s, plan) else ""))
            if not losing:
                cl.notes.append(f"{w}: {base} loses no point of accuracy up to {max(plan.batches)}; tested there")
        out.append(cl.entry(head))

    # Hoffer et al.: Ghost BN + the regime adaptation closes the generalization gap.
    cl = _Claim("hoffer", f"Hoffer et al. 2017: with Ghost BN (ghosts of the reference batch) and {HOFFER_FACTOR}x "
                          "the epochs (the low end of his 4-16x regime adaptation), the large batch's test accuracy "
                          f"is within {POINTS_MARGIN:g} point of the reference batch's (sgd, tuned, the standard "
                          "budget)")
    for w, plan in plans.items():
        for b in plan.batches:
            h, ref, s = get(w, "hoffer", b), get(w, "sgd", plan.ref_batch), get(w, "sgd", b)
            if h and ref:
                cl.test(f"{w}@{b} test hoffer-sgd@{plan.ref_batch}", paired(_pts(h), _pts(ref), "diff"), "diff",
                        -POINTS_MARGIN, True, " points")
                if s:
                    cl.notes.append(f"the gap without it, sgd@{b} - sgd@{plan.ref_batch}: "
                                    f"{_fmt(paired(_pts(s), _pts(ref), 'diff'), 'diff')} points")
    out.append(cl.entry())

    # Smith et al.: increasing the batch instead of decaying the lr: the same accuracy, fewer updates.
    cl = _Claim("smith", "Smith et al. 2018: at the same epoch budget, growing the batch x5 where the lr would be "
                         f"divided by 5 keeps the test accuracy (within {POINTS_MARGIN:g} point) with fewer "
                         "parameter updates")
    for w, plan in plans.items():
        r, s = get(w, "ramp", plan.ref_batch), get(w, "step", plan.ref_batch)
        if r and s:
            cl.test(f"{w}@{plan.ref_batch} test ramp-step", paired(_pts(r), _pts(s), "diff"), "diff",
                    -POINTS_MARGIN, True, " points")
            cl.notes.append(f"updates: ramp {r['updates']}, step decay {s['updates']} ({r['updates'] / s['updates']:.2f}x"
                            "; the same on every seed)")
            if r["updates"] >= s["updates"]:
                cl.tests.append({"label": "fewer updates", "point": r["updates"] / s["updates"],
                                 "interval": [r["updates"] / s["updates"]] * 2, "kind": "ratio", "unit": "",
                                 "threshold": 1.0, "claimed_side": "below", "result": "contradicted",
                                 "censored_seeds": 0})
    out.append(cl.entry(headline=0 if cl.tests else None))

    # Yao et al.: ABS / ABSA reach the small batch's accuracy in fewer updates; ABSA is more robust.
    cl = _Claim("yao", "Yao et al. 2018: ABS (batch x2 when the top Hessian eigenvalue halves, checked "
                       "4x per epoch) keeps the fixed small batch's test accuracy (within "
                       f"{POINTS_MARGIN:g} point) in fewer updates; ABSA (ABS + FGSM training) also raises FGSM "
                       "accuracy over ABS")
    for w, plan in plans.items():
        small, large = get(w, "sgd", plan.ref_batch), get(w, "sgd", max(plan.batches))
        a, aa = get(w, "abs", plan.ref_batch), get(w, "absa", plan.ref_batch)
        for name, c in (("abs", a), ("absa", aa)):
            if c and small:
                cl.test(f"{w} test {name}-small({plan.ref_batch})", paired(_pts(c), _pts(small), "diff"), "diff",
                        -POINTS_MARGIN, True, " points")
                ratio = _steps_ratio(c, small, plan)
                cl.notes.append(f"{name}: {c['updates']} updates vs {small['updates']} (fixed {plan.ref_batch})"
                                + (f" and {large['updates']} (fixed {max(plan.batches)}, test "
                                   f"{_fmt(paired(_pts(c), _pts(large), 'diff'), 'diff')} points vs it)" if large else "")
                                + f", {c['epochs']:g} epochs, steps to {plan.targets[0]:.0%} {name}/small "
                                  f"{'-' if ratio is None else _fmt(ratio, 'ratio')}, at most {c['hessian_vector_products_at_most']} "
                                  f"Hessian-vector products, final batch {c['batch_trajectory'][-1][1]}")
        if a and aa and a.get("fgsm_test") and aa.get("fgsm_test"):
            cl.test(f"{w} FGSM test absa-abs", paired([100 * v for v in aa["fgsm_test"]],
                                                      [100 * v for v in a["fgsm_test"]], "diff"), "diff", 0.0, True,
                    " points")
    out.append(cl.entry(headline=0 if cl.tests else None))

    # Keskar et al.: large batches converge to sharper minima (compared at the same training loss).
    cl = _Claim("keskar", f"Keskar et al. 2017: at a matched training loss ({KESKAR_LOSS}, the top Hessian eigenvalue "
                          "measured when each seed first reaches it), the largest batch that reaches it on every seed "
                          "sits in a sharper region than the reference batch (ratio above 1)")
    for w, plan in plans.items():
        small = get(w, "sgd", plan.ref_batch)
        ok = [b for b in plan.batches if b > plan.ref_batch and get(w, "sgd", b)
              and all(v is not None for v in get(w, "sgd", b).get("sharpness_at_loss") or [None])]
        if small and ok and all(v is not None for v in small.get("sharpness_at_loss") or [None]):
            big = get(w, "sgd", max(ok))
            cl.test(f"{w} sharpness sgd@{max(ok)}/sgd@{plan.ref_batch}",
                    paired([abs(v) for v in big["sharpness_at_loss"]], [abs(v) for v in small["sharpness_at_loss"]]),
                    "ratio", 1.0, True)
        elif small:
            cl.notes.append(f"{w}: no batch above {plan.ref_batch} reaches training loss {KESKAR_LOSS} on every seed")
    out.append(cl.entry())

    # McCandlish et al.: the simple noise scale predicts the critical batch.
    cl = _Claim("mccandlish", "McCandlish et al. 2018: B_simple (measured along sgd at the reference batch) predicts "
                              "the critical batch of his own fit S = S_min (1 + B_noise / B) to the steps to the "
                              f"primary target, within a factor {NOISE_FACTOR:g} (ratio in [1/{NOISE_FACTOR:g}, "
                              f"{NOISE_FACTOR:g}])")
    for w, plan in plans.items():
        ref = get(w, "sgd", plan.ref_batch)
        cs = [get(w, "sgd", b) for b in plan.batches]
        if ref is None or any(c is None for c in cs) or not ref.get("b_simple"):
            continue
        t = str(plan.targets[0])
        steps = [c["targets"][t]["seed_steps"] for c in cs]
        fit = noise_fit(list(plan.batches), steps)
        crit = summary["critical"].get(w, {}).get("sgd", {}).get(t, {}).get("study", {})
        if fit["b_crit"] is None or not math.isfinite(fit["b_crit"]):
            cl.notes.append(f"{w}: the fit is undetermined (batches reached on every seed: {fit['batches']})")
            continue
        for label, key in (("at the target", "b_simple_at_target"), ("at the end", "b_simple")):
            values = [v for v in ref.get(key) or [] if v is not None and math.isfinite(v)]
            if len(values) < 2:
                cl.notes.append(f"{w}: B_simple {label} on {len(values)} seeds only")
                continue
            # paired through the seeds: resample seed indices once for B_simple and the fit
            rng = np.random.default_rng(0)
            n = len(values)
            draws = []
            for _ in range(2000):
                idx = rng.integers(0, n, n)
                b_crit = _fit_noise(fit["batches"], [_geomean([s[i] for i in idx]) for s, b in zip(steps, plan.batches)
                                                     if b in fit["batches"]])
                draws.append(math.log(statistics.median(values[i] for i in idx) / b_crit) if b_crit > 0 else math.nan)
            draws = [d for d in draws if math.isfinite(d)]
            point = statistics.median(values) / fit["b_crit"]
            lo, hi = np.percentile(draws, [2.5, 97.5])
            ci = (point, math.exp(lo), math.exp(hi))
            inside = ci[1] >= 1 / NOISE_FACTOR and ci[2] <= NOISE_FACTOR
            outside = ci[2] < 1 / NOISE_FACTOR or ci[1] > NOISE_FACTOR
            word = "supported" if inside else ("contradicted" if outside else "open")
            cl.tests.append({"label": f"{w} B_simple {label} / B_crit(fit)", "point": ci[0], "interval": [ci[1], ci[2]],
                             "kind": "ratio", "unit": "", "threshold": NOISE_FACTOR, "claimed_side": "within",
                             "result": word, "censored_seeds": 0})
            cl.notes.append(f"{w}: B_simple {label} {statistics.median(values):.0f}")
        cl.notes.append(f"{w}: B_crit of the fit {fit['b_crit']:.0f} [{fit['lo']:.0f}, {fit['hi']:.0f}] over batches "
                        f"{fit['batches']}; the study's critical batch {crit.get('note', '-')}")
    out.append(cl.entry(headline=0 if cl.tests else None))

    # Nado et al.: tuned SGD/Nesterov matches LARS, tuned AdamW matches LAMB.
    cl = _Claim("nado", "Nado et al. 2021: the baselines tuned as carefully match the layer-wise optimizers: steps to "
                        f"the primary target of tuned sgd (Nesterov) over LARS, and of AdamW over LAMB, below "
                        f"{STEPS_MARGIN} at every batch")
    head = None
    for w, plan in plans.items():
        for b in plan.batches:
            for base, other in (("sgd", "lars"), ("adamw", "lamb")):
                s, o = get(w, base, b), get(w, other, b)
                if s and o:
                    cl.test(f"{w}@{b} steps {base}/{other}", _steps_ratio(s, o, plan), "ratio", STEPS_MARGIN, False,
                            censored=_censored(s, o, plan))
                    if w == deep and b == max(plan.batches) and base == "sgd":
                        head = len(cl.tests) - 1
    out.append(cl.entry(head))
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
