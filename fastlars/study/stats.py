"""The study's statistics: paired bootstrap intervals over the report seeds, the verdict
rule, Shallue et al.'s critical batch and McCandlish et al.'s fit of steps against batch."""

from __future__ import annotations

import math
import statistics

import numpy as np

__all__ = ["paired", "judge", "verdict_word", "critical_batch", "noise_fit", "fit_noise", "geomean", "RULE",
           "CRITICAL_FACTOR", "STEPS_MARGIN", "POINTS_MARGIN", "NOISE_FACTOR", "RESAMPLES"]

CRITICAL_FACTOR = 2.0  # critical batch: samples to the target reach 2x the smallest batch's (Shallue et al.)
STEPS_MARGIN = 1.25  # "matches" in steps: the ratio below 1.25
POINTS_MARGIN = 1.0  # "keeps the accuracy": within 1 point of test accuracy
NOISE_FACTOR = 3.0  # "B_simple predicts B_crit": within a factor of 3 (fixed before any run)
RESAMPLES = 10_000

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


def judge(ci: tuple[float, float, float], threshold: float, claim_above: bool) -> str:
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


def geomean(values) -> float:
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
    means = [geomean(s) for s in seed_steps]
    point = _crossing(batches, means, factor)
    rng = np.random.default_rng(seed)
    n = len(seed_steps[0])
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        draws.append(_crossing(batches, [geomean([s[i] for i in idx]) for s in seed_steps], factor))
    lo, hi = _interval(draws)
    if math.isnan(point):
        note = f"undetermined: the smallest batch ({batches[0]}) does not reach the target on every seed"
    elif math.isinf(point):
        note = f"beyond the largest batch ({batches[-1]})"
    elif point in batches and not math.isfinite(means[batches.index(int(point))]):
        # the crossing is where a seed stops reaching the target: an upper bound, not an interpolation
        note = f"<= {point:.0f} (a seed misses the target at {point:.0f}) [{_fmt_b(lo)}, {_fmt_b(hi)}]"
    else:
        note = f"{point:.0f} [{_fmt_b(lo)}, {_fmt_b(hi)}]"
    return {"critical_batch": None if not math.isfinite(point) else point, "lo": _num(lo), "hi": _num(hi),
            "beyond_largest": math.isinf(point), "note": note}


def fit_noise(batches: list[int], steps: list[float]) -> float:
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
    point = fit_noise(bs, [geomean(s) for s in ss])
    rng = np.random.default_rng(seed)
    draws = [fit_noise(bs, [geomean([s[i] for i in idx]) for s in ss])
             for idx in (rng.integers(0, n, n) for _ in range(resamples))]
    lo, hi = _interval(draws)
    return {"b_crit": point, "lo": lo, "hi": hi, "batches": bs, "draws": draws}


def _num(v: float) -> float | str | None:
    return None if math.isnan(v) else (f"> {v}" if math.isinf(v) else v)


def _fmt_b(v: float) -> str:
    return "?" if math.isnan(v) else ("beyond" if math.isinf(v) else f"{v:.0f}")
