"""Shallue et al.'s protocol for one (recipe, batch) cell: the lr that reaches the
validation target in the fewest steps, searched until it is interior.

The lrs live on a half-octave lattice around a centre (the recipe's rule applied to the
reference batch's centre): ``lr_k = centre * 2 ** (k / 2)``. The search tries k = -2, 0, 2
(x2 apart); while the best sits at an edge of what was tried it adds the next two x2 steps
beyond that edge; once the best is interior it tries the two half-octave neighbours. Each
round is one ensemble run (its lrs x the seeds), cached under its spec's key, so the
search replays from the cache and resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from fastlars.schedules import scale_lr

from .core import LR_CENTRES, RECIPES, STOP_MARGIN, RunSpec, _median_steps, procedure

__all__ = ["StudyPlan", "Outcome", "next_points", "lr_at", "replay", "canonical_cells"]

INITIAL = (-2, 0, 2)
MAX_EXTENSIONS = 3  # x4 each: a best lr up to 2 ** 6 beyond the first grid


def lr_at(centre: float, k: int) -> float:
    return float(f"{centre * 2 ** (k / 2):.6g}")


@dataclasses.dataclass
class Outcome:
    """One lr's seeds: steps to the target (None: not by the run's stop), validation
    accuracy when the run stopped, divergence (non-finite parameters)."""

    steps: list[float | None]
    final_val: list[float]
    diverged: list[bool]

    @property
    def median(self) -> float:
        return _median_steps(self.steps)

    def rank(self) -> tuple[float, float]:
        # fewest median steps; among lrs that did not reach the target, the best validation accuracy
        return self.median, -statistics.mean(self.final_val)


def next_points(outcomes: dict[int, Outcome], extensions: int) -> tuple[list[int], str | None]:
    """The lattice points to try next (empty: the search is over) and, when it is over with
    the best at an edge, why that edge is a hard limit."""
    if not outcomes:
        return list(INITIAL), None
    ks = sorted(outcomes)
    best = min(ks, key=lambda k: outcomes[k].rank())
    if best in (ks[0], ks[-1]):
        direction = -1 if best == ks[0] else 1
        if extensions >= MAX_EXTENSIONS:
            return [], f"{'lowest' if direction < 0 else 'highest'} lr tried after {extensions} grid extensions"
        return [best + 2 * direction, best + 4 * direction], None
    fine = [k for k in (best - 1, best + 1) if k not in outcomes]
    if fine and math.isfinite(outcomes[best].median):
        return fine, None
    return [], None


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """What every run of one study shares."""

    dataset: str
    model: str
    samples: int
    n_train: int
    ref_batch: int
    seeds: tuple[int, ...]  # every cell's chosen lr is measured on all of them
    search_seeds: int  # the search's rounds use the first search_seeds; one more run adds the rest at the best lr
    target: float
    cap_epochs: float  # the step cap: cap_epochs of data, at least min_cap steps
    min_cap: int
    epochs: int  # the fixed-epoch view's budget
    epoch_batches: tuple[int, ...]

    def cap(self, batch: int) -> int:
        return max(self.min_cap, math.ceil(self.cap_epochs * self.n_train / batch))

    def centre(self, recipe: str, batch: int) -> float:
        r = RECIPES[recipe]
        return scale_lr(LR_CENTRES[r.optimizer], batch, self.ref_batch, r.scaling)

    def target_spec(self, recipe: str, batch: int, lrs: tuple[float, ...], stop_after: float | None,
                    seeds: tuple[int, ...] | None = None) -> RunSpec:
        return RunSpec(self.dataset, self.model, recipe, batch, lrs, seeds or self.seeds[:self.search_seeds],
                       self.cap(batch), self.ref_batch, self.samples, self.target, True, stop_after)

    def epoch_steps(self, batch: int) -> int:
        return math.ceil(self.epochs * self.n_train / batch)

    def epoch_spec(self, recipe: str, batch: int, lr: float) -> RunSpec:
        return RunSpec(self.dataset, self.model, recipe, batch, (lr,), self.seeds, self.epoch_steps(batch),
                       self.ref_batch, self.samples, self.target, False, None)


def canonical_cells(recipes: list[str], batches: list[int], plan: StudyPlan) -> dict[tuple[str, int], tuple | None]:
    """(recipe, batch) -> None for a cell that is its own run, or the earlier cell (in recipe
    order, then batch) whose procedure it repeats. The budget is part of the procedure: a
    ramp cell at another batch is the same run only with the same step cap."""
    seen: dict[tuple, tuple[str, int]] = {}
    out: dict[tuple[str, int], tuple | None] = {}
    for batch in sorted(batches):
        for recipe in recipes:
            key = procedure(recipe, batch, plan.ref_batch, plan.cap(batch) * batch)
            out[(recipe, batch)] = seen.get(key)
            seen.setdefault(key, (recipe, batch))
    return out


def replay(plan: StudyPlan, recipe: str, batch: int, cache: dict) -> dict:
    """The search of one cell as far as the cache holds it: its rounds, the outcome per lr,
    the chosen lr and its edge status, the fixed-epoch record, and ``pending``: the next
    spec to train (None when the cell is complete)."""
    centre = plan.centre(recipe, batch)
    outcomes: dict[int, Outcome] = {}
    rounds: list[dict] = []
    extensions = 0
    edge_limit = None
    while True:
        ks, edge_limit = next_points(outcomes, extensions)
        if not ks:
            break
        best = min((o.median for o in outcomes.values()), default=math.inf)
        spec = plan.target_spec(recipe, batch, tuple(lr_at(centre, k) for k in ks),
                                STOP_MARGIN * best if math.isfinite(best) else None)
        record = cache.get(spec.key())
        if record is None:
            return {"pending": spec, "rounds": rounds, "outcomes": outcomes, "centre": centre}
        if outcomes and (min(ks) < min(outcomes) or max(ks) > max(outcomes)):
            extensions += 1
        rounds.append(record)
        per_seed = len(spec.seeds)
        for i, k in enumerate(ks):
            ms = record["members"][i * per_seed:(i + 1) * per_seed]
            outcomes[k] = Outcome([m["steps_to_target"] for m in ms], [m["final_val"] for m in ms],
                                  [m["diverged"] for m in ms])
    best = min(outcomes, key=lambda k: outcomes[k].rank())
    if not math.isfinite(outcomes[best].median):
        edge_limit = f"no lr reached the target by the cap of {plan.cap(batch)} steps"
    result = {"pending": None, "rounds": rounds, "outcomes": outcomes, "centre": centre, "best_k": best,
              "lr": lr_at(centre, best), "edge_limit": edge_limit, "seed_steps": list(outcomes[best].steps),
              "diverged_above": best + 1 in outcomes and all(outcomes[best + 1].diverged)
              or (best + 1 not in outcomes and best + 2 in outcomes and all(outcomes[best + 2].diverged)),
              "epoch_record": None}
    rest = plan.seeds[plan.search_seeds:]
    if rest and math.isfinite(outcomes[best].median):
        # the chosen lr on the remaining seeds, run until each reaches the target (or the cap)
        spec = plan.target_spec(recipe, batch, (result["lr"],), None, rest)
        record = cache.get(spec.key())
        if record is None:
            result["pending"] = spec
            return result
        result["confirm_record"] = record
        result["seed_steps"] += [m["steps_to_target"] for m in record["members"]]
    if batch in plan.epoch_batches:
        spec = plan.epoch_spec(recipe, batch, result["lr"])
        result["epoch_record"] = cache.get(spec.key())
        if result["epoch_record"] is None:
            result["pending"] = spec
    return result
