"""Summaries of the study's runs: every (recipe, batch) cell with its lr search, the
critical batch by interpolation, B_simple, the verdicts and the markdown tables (the
figures: figures.py). Reads only the cached run records (no dataset needed)."""

from __future__ import annotations

import math
import statistics

import numpy as np
from scipy import stats

from .core import RECIPES
from .search import StudyPlan, lr_at, replay

__all__ = ["summarise", "critical_batch", "steps_ratio", "mean_ci", "markdown", "figures", "IMAGENET_TRAIN"]

IMAGENET_TRAIN = 1_281_167  # ImageNet-1k training images: a batch here x IMAGENET_TRAIN / n_train is its share
CRITICAL_FACTOR = 2.0  # critical batch: samples to the target reach 2x the smallest batch's (McCandlish et al.)
EQUIVALENCE = 1.25  # "matches": the steps ratio's 95 % CI below 1.25


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95 % t interval over seeds."""
    m = statistics.mean(values)
    if len(values) < 2:
        return m, m, m
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Difference of means a - b with its 95 % Welch interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = a.mean() - b.mean()
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, dof) * se
    return diff, diff - half, diff + half


def steps_ratio(a: list[float | None], b: list[float | None]) -> tuple[float, float, float] | None:
    """Geometric-mean steps of ``a`` over ``b`` with a 95 % Welch interval over seeds (on log
    steps); None when a seed of either did not reach the target."""
    if len(a) < 2 or len(b) < 2 or any(s is None for s in a + b):
        return None
    return tuple(math.exp(v) for v in welch(np.log(a), np.log(b)))


def _median(values: list[float | None]) -> float:
    return statistics.median(math.inf if v is None else v for v in values)


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


def critical_batch(batches: list[int], seed_steps: list[list[float | None]], factor: float = CRITICAL_FACTOR,
                   resamples: int = 2000, seed: int = 0) -> dict:
    """Shallue et al.'s critical batch on one recipe: where steps-to-target leaves perfect
    scaling (steps x 1/B) by ``factor`` (samples to the target ``factor`` x the smallest
    batch's), by interpolation between the measured batches; the 95 % interval from
    resampling each cell's seeds (median steps per cell)."""
    order = np.argsort(batches)
    batches = [int(batches[i]) for i in order]
    seed_steps = [seed_steps[i] for i in order]
    point = _crossing(batches, [_median(s) for s in seed_steps], factor)
    rng = np.random.default_rng(seed)
    arrays = [np.array([math.inf if v is None else v for v in s]) for s in seed_steps]
    draws = sorted((_crossing(batches, [float(np.median(rng.choice(a, len(a)))) for a in arrays], factor)
                    for _ in range(resamples)), key=lambda v: -1.0 if math.isnan(v) else v)
    lo, hi = draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]
    undetermined = sum(math.isnan(d) for d in draws) / resamples
    if math.isnan(point):
        note = f"undetermined: the smallest batch ({batches[0]}) does not reach the target"
    elif math.isinf(point):
        note = f"beyond the largest batch ({batches[-1]})"
    else:
        note = f"{point:.0f} (95 % interval {_fmt_b(lo)}-{_fmt_b(hi)})"
    if undetermined and not math.isnan(point):
        note += (f"; in {undetermined:.0%} of the resamples the smallest batch's median seed misses the target "
                 "('?': the interval's end is undetermined)")
    return {"critical_batch": None if not math.isfinite(point) else point, "lo": _num(lo), "hi": _num(hi),
            "beyond_largest": math.isinf(point), "note": note}


def _num(v: float) -> float | str | None:
    return None if math.isnan(v) else (f"> {v}" if math.isinf(v) else v)


def _fmt_b(v: float) -> str:
    return "?" if math.isnan(v) else ("beyond" if math.isinf(v) else f"{v:.0f}")


def _cell(plan: StudyPlan, recipe: str, batch: int, cache: dict) -> dict:
    state = replay(plan, recipe, batch, cache)
    runs = state["rounds"] + [state[k] for k in ("confirm_record", "epoch_record") if state.get(k)]
    cell = {"recipe": recipe, "batch": batch, "same_as": None, "imagenet_equivalent_batch":
            round(batch * IMAGENET_TRAIN / plan.n_train), "step_cap": plan.cap(batch),
            "pending": state["pending"] is not None, "rounds": len(state["rounds"]),
            "lrs_tried": [{"lr": lr_at(state["centre"], k), "median_steps": _none_inf(o.median),
                           "reached": sum(s is not None for s in o.steps), "diverged": sum(o.diverged),
                           "val_at_stop": statistics.mean(o.final_val)}
                          for k, o in sorted(state["outcomes"].items())],
            "updates_trained": sum(r["updates"] for r in runs), "wall_s": sum(r["wall_s"] for r in runs),
            "run_keys": [r["key"] for r in runs]}
    if state["pending"] is not None and state["pending"].early_stop:  # the search or its last seeds unfinished
        cell.update(lr=None, edge_limit=None, diverged_above=False, steps_to_target=None, seed_steps=None)
        return cell
    seed_steps = state["seed_steps"]
    cell.update(lr=state["lr"], edge_limit=state["edge_limit"], diverged_above=state["diverged_above"],
                steps_to_target=_none_inf(_median(seed_steps)), seed_steps=seed_steps,
                search_steps=_none_inf(state["outcomes"][state["best_k"]].median))
    epoch = state.get("epoch_record")
    if epoch is None:  # test accuracy comes from the fixed-epoch view only (one read of the test set)
        cell.update(test_acc=None, test_acc_ci=None, test_acc_note="no fixed-epoch run at this batch"
                    if batch not in plan.epoch_batches else "fixed-epoch run unfinished")
    else:
        ms = epoch["members"]
        test = mean_ci([m["test"] for m in ms])
        sharp = [m["sharpness"] for m in ms if m["sharpness"] is not None and math.isfinite(m["sharpness"])]
        b_simple = [m["b_simple_at_target"] or m["b_simple"] for m in ms if m["b_simple"] is not None]
        cell.update(epochs=round(epoch["epochs"], 2), epoch_steps=epoch["updates"], test_acc=test[0],
                    test_acc_ci=list(test[1:]), test_values=[m["test"] for m in ms],
                    val_acc=statistics.mean(m["final_val"] for m in ms),
                    epoch_steps_to_target=_none_inf(_median([m["steps_to_target"] for m in ms])),
                    sharpness=mean_ci(sharp) if sharp else None, sharpness_values=sharp,
                    b_simple=statistics.median(b_simple) if b_simple else None,
                    b_simple_end=statistics.median(m["b_simple"] for m in ms) if b_simple else None)
    return cell


def _none_inf(v: float) -> float | None:
    return None if math.isinf(v) else v


def summarise(plan: StudyPlan, same_as: dict, cache: dict, recipes: list[str]) -> dict:
    own = {c: _cell(plan, *c, cache) for c, ref in same_as.items() if ref is None}
    cells = []
    for recipe in recipes:
        for batch in sorted({b for _, b in same_as}):
            ref = same_as[(recipe, batch)]
            if ref is None:
                cells.append(own[(recipe, batch)])
            else:  # the other cell's run, by reference
                cells.append(dict(own[ref], recipe=recipe, same_as=f"{ref[0]}@{ref[1]}", wall_s=0.0))
    by_recipe: dict[str, list[dict]] = {}
    for c in cells:
        by_recipe.setdefault(c["recipe"], []).append(c)
    critical = {}
    for name, cs in by_recipe.items():
        done = [c for c in cs if c["seed_steps"] is not None]
        critical[name] = critical_batch([c["batch"] for c in done], [c["seed_steps"] for c in done]) \
            if len(done) >= 2 and done[0]["batch"] == cs[0]["batch"] else \
            {"critical_batch": None, "lo": None, "hi": None, "beyond_largest": False, "note": "undetermined"}
    b_simple = next((c for c in cells if c["recipe"] == "sgd" and c["batch"] == plan.ref_batch
                     and c.get("b_simple") is not None), None)
    summary = {"cells": cells, "critical": critical, "plan": plan,
               "b_simple": b_simple and b_simple["b_simple"], "b_simple_end": b_simple and b_simple["b_simple_end"],
               "run_keys": {k for c in own.values() for k in c["run_keys"]}}
    summary["verdicts"] = _verdicts(summary)
    summary["json"] = {"critical_batch": critical, "b_simple_at_target": summary["b_simple"],
                       "b_simple_end": summary["b_simple_end"], "verdicts": summary["verdicts"]}
    return summary


# ---------------------------------------------------------------------------------------------
# Verdicts

RULE = ("Rule: each claim is tested at the batches its paper's range maps to here. At each batch the 95 % "
        "interval over seeds of the measured effect is on the claimed side of 'no effect' (yes), on the other "
        "side (no), or straddles it (unclear). **Reproduced**: yes at every tested batch; **partly**: yes at "
        "some; **not reproduced**: yes at none; **not testable here**: a needed cell is missing, or a seed did "
        "not reach the target (no interval). 'Matches' claims use an equivalence margin: the steps ratio's "
        f"interval below {EQUIVALENCE} is yes, above it no; 'closes the gap' claims: the test accuracy "
        "difference's interval above -1 point is yes, below it no. Two claims have no interval over seeds: the lr "
        "exponent, read on the search's x√2 lattice (reproduced within two lattice steps), and B_simple against "
        "the critical batch (reproduced inside its interval, partly within 3x of it).")


def _word(tests: list[str | None]) -> str:
    known = [t for t in tests if t is not None]
    if not known:
        return "not testable here"
    if all(t == "yes" for t in known) and len(known) == len(tests):
        return "reproduced"
    return "partly" if "yes" in known else "not reproduced"


def _side(ci: tuple[float, float, float] | None, above: float) -> str | None:
    """yes: the interval lies above ``above``; no: below it; unclear: straddles."""
    if ci is None:
        return None
    return "yes" if ci[1] > above else ("no" if ci[2] < above else "unclear")


def _fmt_ratio(ci) -> str:
    return "n/a" if ci is None else f"{ci[0]:.2f} [{ci[1]:.2f}, {ci[2]:.2f}]"


def _verdicts(summary: dict) -> list[dict]:
    plan: StudyPlan = summary["plan"]
    cells = {(c["recipe"], c["batch"]): c for c in summary["cells"]}
    batches = sorted({b for _, b in cells})
    recipes = list(dict.fromkeys(r for r, _ in cells))
    share = IMAGENET_TRAIN / plan.n_train
    here = lambda b: round(b / share)  # noqa: E731 (an ImageNet batch mapped here by data share)
    out = []

    def ratio_claim(paper, claim, a, b, tested, slower_is_claim=True, margin=None):
        tests, parts = [], []
        for batch in tested:
            ca, cb = cells.get((a, batch)), cells.get((b, batch))
            ci = steps_ratio(ca["seed_steps"] or [], cb["seed_steps"] or []) if ca and cb else None
            if margin is not None:  # "a matches b": ratio below the margin
                t = None if ci is None else ("yes" if ci[2] < margin else ("no" if ci[1] > margin else "unclear"))
            else:
                t = _side(ci, 1.0) if slower_is_claim else _side(None if ci is None else (1 / ci[0], 1 / ci[2],
                                                                                         1 / ci[1]), 1.0)
            tests.append(t)
            parts.append(f"{batch}: {_fmt_ratio(ci)} ({t or 'no interval'})")
        out.append({"paper": paper, "claim": claim, "effect": f"steps {a} / {b} at batch " + "; ".join(parts),
                    "verdict": _word(tests) if tested else "not testable here"})

    large = [b for b in batches if b > plan.ref_batch]
    past_32k = [b for b in batches if b >= here(32768) * 0.85]
    if {"sgd", "goyal"} <= set(recipes):
        c = summary["critical"]["goyal"]
        limit = here(8192)
        t = None if c["lo"] is None else ("yes" if (c["beyond_largest"] or (isinstance(c["lo"], float)
                                                                             and c["lo"] >= limit))
                                          else ("no" if isinstance(c["hi"], float) and c["hi"] < limit else "unclear"))
        lrs = {b: cells[("goyal", b)]["lr"] for b in batches if cells[("goyal", b)]["lr"]}
        small = [b for b in batches if b <= here(8192) and b in lrs]
        slope = (math.log(lrs[small[-1]] / lrs[small[0]]) / math.log(small[-1] / small[0])
                 if len(small) >= 2 else None)
        every = sorted(lrs)
        fit = np.polyfit(np.log(every), np.log([lrs[b] for b in every]), 1)[0] if len(every) >= 2 else None
        out.append({"paper": "Goyal et al. 2017",
                    "claim": f"with the lr scaled with the batch, steps to the target fall as 1/B up to 8K on "
                             f"ImageNet, batch {limit} here: the critical batch is at least {limit}",
                    "effect": f"critical batch of goyal {c['note']}" + (
                        f"; the tuned lr grows as B^{slope:.2f} from {small[0]} to {small[-1]} and as B^{fit:.2f} "
                        f"over {every[0]}-{every[-1]} (least squares on log-log; the linear rule says B^1; lrs on a "
                        "x√2 lattice)" if slope is not None else ""),
                    "verdict": _word([t])})
        if slope is not None:
            # lrs are chosen on a x√2 lattice from noisy steps: an exponent within two lattice steps of 1 counts
            resolution = 2 * math.log(math.sqrt(2)) / math.log(small[-1] / small[0])
            out.append({"paper": "Goyal et al. 2017",
                        "claim": f"the best lr grows as B (linear scaling rule) up to 8K on ImageNet, batch {limit} "
                                 "here",
                        "effect": f"goyal's tuned lr: " + ", ".join(f"{lrs[b]:.3g} at {b}" for b in small)
                                  + f"; exponent {slope:.2f} (two lattice steps: ±{resolution:.2f})",
                        "verdict": "reproduced" if abs(slope - 1) <= resolution else "not reproduced"})
        ratio_claim("Goyal et al. 2017", "warm-up makes the large batches trainable: SGD without warm-up needs "
                    f"more steps above the reference batch ({plan.ref_batch})", "sgd", "goyal", large)
    for opt, paper in (("lars", "You et al. 2017 (LARS)"), ("lamb", "You et al. 2019 (LAMB)")):
        if {"goyal", opt} <= set(recipes):
            ratio_claim(paper, f"{opt.upper()} keeps large batches fast where SGD + warm-up slows: fewer steps "
                        f"than goyal from 32K on ImageNet, batch {here(32768)} here", "goyal", opt, past_32k)
    for opt in ("lars", "lamb"):
        if {"goyal", opt} <= set(recipes):
            ratio_claim("Nado et al. 2021", f"SGD+momentum with warm-up, tuned, matches {opt.upper()}: steps ratio "
                        f"goyal / {opt} below {EQUIVALENCE} at every batch from 32K ({here(32768)} here)",
                        "goyal", opt, past_32k, margin=EQUIVALENCE)
    if "sgd" in recipes:
        c, b = summary["critical"]["sgd"], summary["b_simple"]
        if b is None or c["lo"] is None:
            word = "not testable here"
        else:
            lo = c["lo"] if isinstance(c["lo"], float) else batches[-1]
            hi = c["hi"] if isinstance(c["hi"], float) else math.inf
            word = "reproduced" if lo <= b <= hi else ("partly" if lo / 3 <= b <= 3 * hi else "not reproduced")
        out.append({"paper": "McCandlish et al. 2018",
                    "claim": "B_simple (the simple noise scale) predicts the critical batch",
                    "effect": f"B_simple {b and round(b)} at the target (sgd at {plan.ref_batch}), end "
                              f"{summary['b_simple_end'] and round(summary['b_simple_end'])}; critical batch of sgd "
                              f"{c['note']}",
                    "verdict": word + (" (rule: B_simple inside the interval; partly: within 3x of it)"
                                       if word != "not testable here" else "")})
    if "goyal" in recipes:
        ends = [b for b in plan.epoch_batches]
        a, z = (cells.get(("goyal", ends[0])), cells.get(("goyal", ends[-1]))) if ends else (None, None)
        if a and z and len(a.get("sharpness_values") or []) > 1 and len(z.get("sharpness_values") or []) > 1:
            d = welch(z["sharpness_values"], a["sharpness_values"])
            ma, mz = a["sharpness"], z["sharpness"]
            out.append({"paper": "Keskar et al. 2017",
                        "claim": "large batches end at sharper minima (fixed-epoch runs, top Hessian eigenvalue)",
                        "effect": f"goyal, {plan.epochs} epochs: {ma[0]:.1f} at {ends[0]}, {mz[0]:.1f} at {ends[-1]}; "
                                  f"difference {d[0]:.1f} [{d[1]:.1f}, {d[2]:.1f}]",
                        "verdict": _word([_side(d, 0.0)])})
    if {"goyal", "gbn_longer"} <= set(recipes):
        ratio_claim("Hoffer et al. 2017", f"Ghost BN (ghosts of {plan.ref_batch}) helps large batches: fewer steps "
                    f"to the target than goyal (the same without Ghost BN) above batch {plan.ref_batch}", "goyal",
                    "gbn_longer", large)
        base = cells.get(("sgd", plan.epoch_batches[0])) if plan.epoch_batches else None
        tests, parts = [], []
        for batch in [b for b in plan.epoch_batches if b > plan.ref_batch]:
            c = cells.get(("gbn_longer", batch))
            if not (base and c and len(c.get("test_values") or []) > 1 and len(base.get("test_values") or []) > 1):
                tests.append(None)
                continue
            d = welch([100 * v for v in c["test_values"]], [100 * v for v in base["test_values"]])
            tests.append(_side(d, -1.0))  # "within 1 point": the interval above -1
            parts.append(f"{batch} ({c['epochs']:g} epochs, {c['epoch_steps']} steps): {d[0]:+.1f} "
                         f"[{d[1]:+.1f}, {d[2]:+.1f}] points ({tests[-1]})")
        out.append({"paper": "Hoffer et al. 2017",
                    "claim": "training longer (more epochs at large batch; capped at 2x here) closes the "
                             "generalization gap: test accuracy within 1 point of the small batch's",
                    "effect": f"gbn_longer minus sgd at {plan.epoch_batches[0] if plan.epoch_batches else '-'} "
                              f"({plan.epochs} epochs), test accuracy: " + "; ".join(parts),
                    "verdict": _word(tests)})
    for paper, recipe in (("Hoffer et al. 2017", "gbn_longer"), ("Smith et al. 2018", "ramp"),
                          ("Yao et al. 2018", "abs")):
        if recipe not in recipes:
            out.append({"paper": paper, "claim": RECIPES[recipe].title, "effect": "recipe not in this run",
                        "verdict": "not testable here"})
    return out


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt_steps(c: dict) -> str:
    if c["lr"] is None:
        return "unfinished"
    return f"not reached by the cap of {c['step_cap']}" if c["steps_to_target"] is None else \
        f"{c['steps_to_target']:.0f}"


def _fmt_cell(c: dict) -> str:
    text = _fmt_steps(c) + ("" if c["lr"] is None else f" @ {c['lr']:.3g}")
    if c["edge_limit"]:
        text += f" (edge: {c['edge_limit']})"
    return text + (f" (= {c['same_as']})" if c["same_as"] else "")


def markdown(summary: dict) -> str:
    plan: StudyPlan = summary["plan"]
    cells = summary["cells"]
    batches = sorted({c["batch"] for c in cells})
    names = list(dict.fromkeys(c["recipe"] for c in cells))
    lines = [f"Steps to {plan.target:.0%} validation accuracy, median over {len(plan.seeds)} seeds, at the peak "
             "lr that minimises it (after '@'; every chosen lr is interior to the lrs tried unless marked "
             "'edge: why'); '= x@b': the same run as that cell. Header: batch (ImageNet batch with the same "
             "share of the training set per step) and step cap:", "",
             "| recipe | " + " | ".join(f"{b} (~{round(b * IMAGENET_TRAIN / plan.n_train / 1024)}K), cap "
                                       f"{plan.cap(b)}" for b in batches) + " |",
             "| --- |" + " ---: |" * len(batches)]
    for name in names:
        row = {c["batch"]: c for c in cells if c["recipe"] == name}
        lines.append(f"| {name} | " + " | ".join(_fmt_cell(row[b]) if b in row else "" for b in batches) + " |")
    lines += ["", "Every cell's search (lrs tried, x2 then x√2 apart; the chosen one in bold; edge: why an edge "
              "choice is a hard limit; 'diverged above': the next lr up diverged on every seed):", "",
              "| recipe | batch | same as | lrs tried (median steps; '-': not reached) | lr | edge | steps | "
              "seeds reached | wall s |", "| --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for c in cells:
        tried = ", ".join(("**" if t["lr"] == c["lr"] else "") + f"{t['lr']:.3g}" + ("**" if t["lr"] == c["lr"] else "")
                          + f" ({t['median_steps']:.0f})" if t["median_steps"] is not None else
                          f"{t['lr']:.3g} (-{', diverged' if t['diverged'] else ''})" for t in c["lrs_tried"])
        reached = "" if c["seed_steps"] is None else f"{sum(s is not None for s in c['seed_steps'])}/{len(c['seed_steps'])}"
        edge = "-" if c["lr"] is None else (c["edge_limit"] or ("interior, diverged above" if c["diverged_above"]
                                                                  else "interior"))
        lines.append(f"| {c['recipe']} | {c['batch']} | {c['same_as'] or ''} | {tried if not c['same_as'] else ''} "
                     f"| {'-' if c['lr'] is None else format(c['lr'], '.3g')} | {edge} | {_fmt_steps(c)} | {reached} "
                     f"| {c['wall_s']:.0f} |")
    if "sgd" in names and len(names) > 1:
        lines += ["", "Steps relative to sgd at the same batch (ratio of geometric means [95 % Welch interval over "
                  "seeds]; 'n/a': a seed missed the target; '=': the same run):", "",
                  "| recipe | " + " | ".join(str(b) for b in batches) + " |", "| --- |" + " ---: |" * len(batches)]
        base = {c["batch"]: c for c in cells if c["recipe"] == "sgd"}
        for name in names[names.index("sgd") + 1:] if names[0] == "sgd" else [n for n in names if n != "sgd"]:
            row = {c["batch"]: c for c in cells if c["recipe"] == name}
            lines.append(f"| {name} | " + " | ".join(
                "" if b not in row or b not in base else "=" if row[b]["same_as"] == f"sgd@{b}" else
                _fmt_ratio(steps_ratio(row[b]["seed_steps"] or [], base[b]["seed_steps"] or [])) for b in batches)
                + " |")
    lines += ["", f"Critical batch (samples to the target reach {CRITICAL_FACTOR:g}x the smallest batch's, "
              "interpolated on log-log axes; 95 % interval from resampling seeds):", ""]
    for name, c in summary["critical"].items():
        lines.append(f"- {name}: {c['note']}")
    b, end = summary["b_simple"], summary["b_simple_end"]
    lines += ["", "B_simple (McCandlish et al.; EMA along the fixed-epoch sgd run at the reference batch, median "
              "over seeds): " + ("not measured" if b is None else f"{b:.0f} when it first reaches the target, "
                                                                   f"{end:.0f} at the end")]
    epoch_cells = [c for c in cells if c.get("test_acc") is not None]
    if epoch_cells:
        eb = sorted({c["batch"] for c in epoch_cells})
        lines += ["", f"Second view, fixed epochs ({plan.epochs} epochs, warm-up and decay over them, at the lr "
                  "chosen above; test accuracy mean [95 % interval over seeds], steps):", "",
                  "| recipe | " + " | ".join(str(b) for b in eb) + " |", "| --- |" + " ---: |" * len(eb)]
        for name in names:
            row = {c["batch"]: c for c in epoch_cells if c["recipe"] == name}
            lines.append(f"| {name} | " + " | ".join(
                f"{row[b]['test_acc']:.1%} [{row[b]['test_acc_ci'][0]:.1%}, {row[b]['test_acc_ci'][1]:.1%}], "
                f"{row[b]['epoch_steps']} steps" + (f" ({row[b]['epochs']:.0f} epochs)" if row[b]["epochs"] > 1.1 * plan.epochs
                                                    else "") + (f" (= {row[b]['same_as']})" if row[b]["same_as"] else "")
                if b in row else "" for b in eb) + " |")
    lines += ["", RULE, "", "| paper | claim at this scale | measured effect, 95 % interval over seeds | verdict |",
              "| --- | --- | --- | --- |"]
    for v in summary["verdicts"]:
        lines.append(f"| {v['paper']} | {v['claim']} | {v['effect']} | {v['verdict']} |")
    return "\n".join(lines) + "\n"
