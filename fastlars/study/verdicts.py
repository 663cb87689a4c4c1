"""Each seed paper's own claim at this scale, tested on the report runs with a paired
interval, and its verdict by the rule in :mod:`fastlars.study.stats`."""

from __future__ import annotations

import math
import statistics

import numpy as np

from .core import HOFFER_FACTOR, KESKAR_LOSS
from .search import StudyPlan
from .stats import NOISE_FACTOR, POINTS_MARGIN, STEPS_MARGIN, fit_noise, geomean, judge, noise_fit, paired, \
    verdict_word

__all__ = ["verdicts", "cell_of", "PAPERS"]

PAPERS = ("goyal", "lars", "lamb", "hoffer", "smith", "keskar", "yao", "mccandlish", "nado")


def cell_of(summary: dict, workload: str, recipe: str, batch: int) -> dict | None:
    """The complete report cell of (workload, recipe, batch), or None."""
    c = next((c for c in summary["cells"] if (c["workload"], c["recipe"], c["batch"]) == (workload, recipe, batch)),
             None)
    return c if c is not None and "test_values" in c else None


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
        word = judge(ci, threshold, claim_above)
        self.tests.append({"label": label, "point": ci[0], "interval": [ci[1], ci[2]], "kind": kind, "unit": unit,
                           "threshold": threshold, "claimed_side": "above" if claim_above else "below",
                           "result": word, "censored_seeds": censored})
        return word

    def entry(self, headline: int | str | None = None) -> dict:
        """The verdict; ``headline``: the index of the test whose interval heads the entry, or a
        part of its label (the last such test); the last test by default."""
        words = [t["result"] for t in self.tests]
        if isinstance(headline, str):
            headline = max((i for i, t in enumerate(self.tests) if headline in t["label"]), default=None)
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


def verdicts(summary: dict) -> list[dict]:
    plans: dict[str, StudyPlan] = summary["plans"]
    get = lambda w, r, b: cell_of(summary, w, r, b)  # noqa: E731
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
    out.append(cl.entry("test goyal-sgd"))

    # You et al.: at a fixed epoch budget, LARS (LAMB) keeps the accuracy that SGD (AdamW) loses at large batch.
    for name, base, paper in (("lars", "sgd", "You et al. 2017 (LARS)"), ("lamb", "adamw", "You et al. 2019 (LAMB)")):
        cl = _Claim(name, f"{paper}: at the fixed epoch budget, at the batches where tuned {base} loses accuracy "
                          f"(its mean test accuracy {POINTS_MARGIN:g}+ point below its reference batch's; the "
                          f"largest batch if none), tuned {name} is more accurate than tuned {base} (paired "
                          f"difference above 0). Second view, not in the verdict: steps {base}/{name}")
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
                    ratio = _steps_ratio(s, o, plan)
                    cl.notes.append(f"{w}@{b} steps {base}/{name} "
                                    + ("-: neither reaches the target" if ratio is None else _fmt(ratio, "ratio"))
                                    + (f" ({_censored(o, s, plan)} censored)" if _censored(o, s, plan) else ""))
            if not losing:
                cl.notes.append(f"{w}: {base} loses no point of accuracy up to {max(plan.batches)}; tested there")
        out.append(cl.entry(f"{deep}@"))

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
    cl = _Claim("mccandlish", "McCandlish et al. 2018: B_simple (measured along sgd at the reference batch, when it "
                              "reaches the target and at the end) predicts the critical batch of his own fit "
                              "S = S_min (1 + B_noise / B) to sgd's steps to that target, within a factor "
                              f"{NOISE_FACTOR:g} (ratio in [1/{NOISE_FACTOR:g}, {NOISE_FACTOR:g}])")
    for w, plan in plans.items():
        ref = get(w, "sgd", plan.ref_batch)
        cs = [get(w, "sgd", b) for b in plan.batches]
        if ref is None or any(c is None for c in cs) or not ref.get("b_simple"):
            continue
        for t in (str(t) for t in plan.targets):
            steps = [c["targets"][t]["seed_steps"] for c in cs]
            fit = noise_fit(list(plan.batches), steps)
            crit = summary["critical"].get(w, {}).get("sgd", {}).get(t, {}).get("study", {})
            if fit["b_crit"] is None or not math.isfinite(fit["b_crit"]) or fit["b_crit"] <= 0:
                cl.notes.append(f"{w}, {float(t):.0%}: the fit is undetermined (batches every seed reached: "
                                f"{fit['batches']})")
                continue
            at_target = (ref.get("b_simple_at_target") or {}).get(t)
            for label, values in ((f"at {float(t):.0%}", at_target), ("at the end", ref["b_simple"])):
                values = [v for v in values or [] if v is not None and math.isfinite(v)]
                if len(values) < 2:
                    cl.notes.append(f"{w}: B_simple {label} on {len(values)} seeds only")
                    continue
                # paired through the seeds: one resample of seed indices serves B_simple and the fit
                rng = np.random.default_rng(0)
                n, kept = len(values), [s for s, b in zip(steps, plan.batches) if b in fit["batches"]]
                draws = []
                for _ in range(2000):
                    idx = rng.integers(0, n, n)
                    b_crit = fit_noise(fit["batches"], [geomean([s[i] for i in idx]) for s in kept])
                    b_simple = statistics.median(values[i] for i in idx)
                    if 0 < b_crit < math.inf and b_simple > 0:  # the estimator can go negative early in training
                        draws.append(math.log(b_simple / b_crit))
                point = statistics.median(values) / fit["b_crit"]
                if point <= 0 or len(draws) < 100:
                    cl.notes.append(f"{w}: B_simple {label} {statistics.median(values):.0f} (not positive: no test)")
                    continue
                lo, hi = np.percentile(draws, [2.5, 97.5])
                inside = math.exp(lo) >= 1 / NOISE_FACTOR and math.exp(hi) <= NOISE_FACTOR
                outside = math.exp(hi) < 1 / NOISE_FACTOR or math.exp(lo) > NOISE_FACTOR
                cl.tests.append({"label": f"{w} B_simple {label} / B_crit(fit, {float(t):.0%})", "point": point,
                                 "interval": [math.exp(lo), math.exp(hi)], "kind": "ratio", "unit": "",
                                 "threshold": NOISE_FACTOR, "claimed_side": "within",
                                 "result": "supported" if inside else ("contradicted" if outside else "open"),
                                 "censored_seeds": 0})
                cl.notes.append(f"{w}: B_simple {label} {statistics.median(values):.0f}")
            cl.notes.append(f"{w}, {float(t):.0%}: B_crit of the fit {fit['b_crit']:.0f} [{fit['lo']:.0f}, "
                            f"{fit['hi']:.0f}] over batches {fit['batches']}; the study's critical batch "
                            f"{crit.get('note', '-')}")
    out.append(cl.entry(headline=0 if cl.tests else None))

    # Nado et al.: tuned SGD/Nesterov matches LARS, tuned AdamW matches LAMB.
    cl = _Claim("nado", "Nado et al. 2021: the baselines tuned as carefully match the layer-wise optimizers: steps to "
                        f"the primary target of tuned sgd (Nesterov) over LARS, and of AdamW over LAMB, below "
                        f"{STEPS_MARGIN} at every batch")
    for w, plan in plans.items():
        for b in plan.batches:
            for base, other in (("sgd", "lars"), ("adamw", "lamb")):
                s, o = get(w, base, b), get(w, other, b)
                if s and o:
                    cl.test(f"{w}@{b} steps {base}/{other}", _steps_ratio(s, o, plan), "ratio", STEPS_MARGIN, False,
                            censored=_censored(s, o, plan))
    out.append(cl.entry(f"{deep}@{max(plans[deep].batches)} steps sgd/lars"))
    return out
