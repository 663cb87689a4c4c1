"""The protocol of one (workload, recipe, batch) cell, after Shallue et al.: a search over
lr x warm-up (x momentum) on the search seeds, then the chosen point on the held-out
report seeds, trained to the end of the budget.

The lrs live on an octave lattice around a centre (the recipe's rule applied to the
reference batch's centre): ``lr_k = centre * 2 ** (k / 2)``. The first round tries k = -2,
0, 2 (x2 apart) at every warm-up and momentum. The best point is the one with the fewest
median steps to the primary target (among points that miss it: the best validation
accuracy); while its lr is the smallest or largest tried at its warm-up and momentum, the
next round adds the next two x2 steps beyond that edge, at every warm-up and momentum. Each round is one ensemble
run (its points x the search seeds), cached under its spec's key, so a search replays
from the cache and resumes where it stopped. The report run (the chosen point x the report
seeds, disjoint from the search seeds) is never cut short: every reported number, steps to
every target, final and test accuracy, comes from it.

The papers' prescriptions that are not searched (Goyal's linear rule, Hoffer's regime,
Smith's ramp, Yao's ABS) are run on the report seeds at a point taken from the tuned sgd
cell they modify (:func:`paper_spec`), so that they and the tuned cells are paired.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from fastlars.schedules import scale_lr

from .core import GOYAL_WARMUP_SHARE, HOFFER_FACTOR, LR_CENTRES, RAMP_FACTOR, RECIPES, STOP_MARGIN, RunSpec, \
    median_steps

__all__ = ["StudyPlan", "Outcome", "best_point", "next_points", "lr_at", "replay", "paper_spec", "PAPER_RUNS"]

INITIAL = (-2, 0, 2)
MAX_EXTENSIONS = 3  # x4 each: a best lr up to 2 ** 6 beyond the first grid


def lr_at(centre: float, k: int) -> float:
    return float(f"{centre * 2 ** (k / 2):.6g}")


@dataclasses.dataclass
class Outcome:
    """One point's search seeds: steps to the primary target (None: not by the run's stop),
    validation accuracy when the run stopped, divergence (non-finite parameters)."""

    steps: list[float | None]
    final_val: list[float]
    diverged: list[bool]

    @property
    def median(self) -> float:
        return median_steps(self.steps)

    def rank(self, learns: float = 0.0) -> tuple[float, float]:
        """Fewest median steps; among points that did not reach the target, the best validation
        accuracy; a point whose mean validation accuracy is below ``learns`` did not learn
        (diverged or stalled near chance) and ranks last, whatever its noise, so that a grid
        that failed everywhere extends instead of calling a chance-level point interior."""
        val = statistics.mean(self.final_val)
        return self.median, -(val if val >= learns else 0.0)


Point = tuple[int, float, float | None]  # (lattice index k, warm-up epochs, momentum)


def best_point(outcomes: dict[Point, Outcome], learns: float = 0.0) -> Point:
    """The best point by :meth:`Outcome.rank`; among equals (e.g. none learned) the smallest lr."""
    return min(outcomes, key=lambda p: (outcomes[p].rank(learns), p[0]))


def next_points(outcomes: dict[Point, Outcome], extensions: int, warmups: tuple[float, ...],
                momenta: tuple[float | None, ...], learns: float = 0.0) -> tuple[list[Point], str | None]:
    """The points to try next (empty: the search is over) and, when it is over with the
    best lr at an edge of its line (its warm-up and momentum), why that edge is a hard limit."""
    if not outcomes:
        return [(k, w, m) for w in warmups for m in momenta for k in INITIAL], None
    best = best_point(outcomes, learns)
    _, w, m = best
    line = sorted(k for k, w2, m2 in outcomes if (w2, m2) == (w, m))
    if best[0] in (line[0], line[-1]):
        direction = -1 if best[0] == line[0] else 1
        if extensions >= MAX_EXTENSIONS:
            return [], f"{'lowest' if direction < 0 else 'highest'} lr tried after {extensions} grid extensions"
        # the next two x2 steps past that edge, at every warm-up and momentum: the grid stays a full cross
        lines = dict.fromkeys((w2, m2) for _, w2, m2 in outcomes)
        return [(best[0] + s * direction, w2, m2) for w2, m2 in lines for s in (2, 4)
                if (best[0] + s * direction, w2, m2) not in outcomes], None
    return [], None


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """What every run of one workload shares."""

    dataset: str
    model: str
    samples: int
    n_train: int
    ref_batch: int
    search_seeds: tuple[int, ...]
    report_seeds: tuple[int, ...]  # disjoint from search_seeds: the seeds that choose a point never report it
    targets: tuple[float, ...]  # validation accuracy; the first is the primary (the search's criterion)
    epochs: float  # every run's budget (Hoffer's: HOFFER_FACTOR x)
    warmups: tuple[float, ...]  # warm-up lengths searched, in epochs
    batches: tuple[int, ...]
    search_momentum: bool = False  # search the momentum recipes' momenta too (--full); else their first

    def __post_init__(self) -> None:
        if set(self.search_seeds) & set(self.report_seeds):
            raise ValueError(f"search_seeds {self.search_seeds} and report_seeds {self.report_seeds} must be disjoint")

    @property
    def learns(self) -> float:
        """The validation accuracy below which a point did not learn: half the lowest target."""
        return min(self.targets) / 2

    def centre(self, recipe: str, batch: int) -> float:
        r = RECIPES[recipe]
        return scale_lr(LR_CENTRES[r.optimizer], batch, self.ref_batch, r.scaling)

    def spec(self, recipe: str, batch: int, points, seeds, *, early_stop=False, stop_after=None, epochs=None,
             max_batch=None, measure=()) -> RunSpec:
        return RunSpec(self.dataset, self.model, recipe, batch, tuple(points), tuple(seeds),
                       self.epochs if epochs is None else epochs, self.ref_batch, self.samples, self.targets,
                       early_stop, stop_after, max_batch, tuple(measure))

    def steps(self, batch: int, epochs: float | None = None) -> int:
        return math.ceil((self.epochs if epochs is None else epochs) * self.n_train / batch)

    def measure(self, recipe: str, batch: int) -> tuple[str, ...]:
        """The extra measurements of a tuned cell's report run: the noise scale on sgd at the
        reference batch (McCandlish), the sharpness at a matched loss on every sgd batch
        (Keskar), FGSM accuracy at the ends of the batch range (Yao's fixed baselines)."""
        if recipe != "sgd":
            return ()
        out = ["sharpness_at_loss"]
        if batch == self.ref_batch:
            out.append("noise_scale")
        if batch in (self.ref_batch, max(self.batches)):
            out.append("fgsm")
        return tuple(out)


def replay(plan: StudyPlan, recipe: str, batch: int, cache: dict) -> dict:
    """The search of one tuned cell as far as the cache holds it: its rounds, the outcome
    per point, the chosen point and its edge status, the report record, and ``pending``:
    the next spec to train (None when the cell is complete)."""
    r = RECIPES[recipe]
    centre = plan.centre(recipe, batch)
    momenta = (r.momenta if plan.search_momentum else r.momenta[:1]) or (None,)
    outcomes: dict[Point, Outcome] = {}
    rounds: list[dict] = []
    extensions = 0
    edge_limit = None
    while True:
        points, edge_limit = next_points(outcomes, extensions, plan.warmups, momenta, plan.learns)
        if not points:
            break
        best = min((o.median for o in outcomes.values()), default=math.inf)
        spec = plan.spec(recipe, batch, [(lr_at(centre, k), w, m) for k, w, m in points], plan.search_seeds,
                         early_stop=True, stop_after=STOP_MARGIN * best if math.isfinite(best) else None)
        record = cache.get(spec.key())
        if record is None:
            return {"pending": spec, "rounds": rounds, "outcomes": outcomes, "centre": centre}
        if outcomes:
            extensions += 1
        rounds.append(record)
        per_seed = len(spec.seeds)
        primary = str(plan.targets[0])
        for i, p in enumerate(points):
            ms = record["members"][i * per_seed:(i + 1) * per_seed]
            outcomes[p] = Outcome([m["steps_to_target"][primary] for m in ms], [m["final_val"] for m in ms],
                                  [m["diverged"] for m in ms])
    best = best_point(outcomes, plan.learns)
    k, w, m = best
    line = sorted(k2 for k2, w2, m2 in outcomes if (w2, m2) == (w, m))
    result = {"pending": None, "rounds": rounds, "outcomes": outcomes, "centre": centre, "best": best,
              "point": (lr_at(centre, k), w, m), "edge_limit": edge_limit,
              "interior": line[0] < k < line[-1],
              "diverged_above": (k + 2, w, m) in outcomes and all(outcomes[(k + 2, w, m)].diverged)}
    spec = plan.spec(recipe, batch, [result["point"]], plan.report_seeds, measure=plan.measure(recipe, batch))
    result["report"] = cache.get(spec.key())
    if result["report"] is None:
        result["pending"] = spec
    return result


# The papers' prescriptions, each at the batches its claim needs: name -> batches(plan)
PAPER_RUNS = {
    "goyal": lambda plan: [b for b in plan.batches if b > plan.ref_batch],
    "goyal_nowarm": lambda plan: sorted(plan.batches)[-2:],
    "hoffer": lambda plan: [_hoffer_batch(plan)],
    "step": lambda plan: [plan.ref_batch],
    "ramp": lambda plan: [plan.ref_batch],
    "abs": lambda plan: [plan.ref_batch],
    "absa": lambda plan: [plan.ref_batch],
}


def _hoffer_batch(plan: StudyPlan) -> int:
    """The largest batch at most 16x the reference (Hoffer et al.'s regime adapts up to 16x)."""
    return max(b for b in plan.batches if b <= 16 * plan.ref_batch)


def paper_spec(plan: StudyPlan, recipe: str, batch: int, cache: dict) -> tuple[RunSpec | None, str | None]:
    """The report run of a paper's prescription at ``batch``: (spec, None), or (None, why)
    while the tuned sgd cell it derives from is unfinished."""
    base_batch = {"goyal": plan.ref_batch, "goyal_nowarm": plan.ref_batch, "hoffer": batch}.get(recipe, batch)
    base = replay(plan, "sgd", base_batch, cache)
    if base["pending"] is not None:
        return None, f"waits for sgd@{base_batch}"
    lr, w, m = base["point"]
    epochs, max_batch, measure = plan.epochs, None, ()
    if recipe in ("goyal", "goyal_nowarm"):
        # the linear rule from the tuned reference batch; Goyal's warm-up share of the budget, or none
        lr = float(f"{lr * batch / plan.ref_batch:.6g}")
        w = GOYAL_WARMUP_SHARE * plan.epochs if recipe == "goyal" else 0.0
    elif recipe == "hoffer":
        epochs = HOFFER_FACTOR * plan.epochs
    elif recipe == "ramp":
        max_batch = batch * RAMP_FACTOR ** 2
    elif recipe in ("abs", "absa"):
        max_batch, measure = max(plan.batches), ("fgsm",)
    return plan.spec(recipe, batch, [(lr, w, m)], plan.report_seeds, epochs=epochs, max_batch=max_batch,
                     measure=measure), None
