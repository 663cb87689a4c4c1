"""The study's data, recipes and training loop (one ensemble run = one recipe at one
batch size, every lr of the grid times every seed trained at once)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time

import numpy as np
import torch

import fastlars
from fastlars.adversarial import adversarial_loss
from fastlars.hessian import AdaptiveBatchSize, top_eigenvalues
from fastlars.noise_scale import GradientNoiseScale
from fastlars.schedules import BatchSizeRamp, WarmupPolyDecay
from fastlars.train import accumulate_gradients

from .ensemble import EnsembleCNN, EnsembleMLP, ensemble_loss, member_accuracy

__all__ = ["Recipe", "RECIPES", "DATASETS", "MODELS", "load_data", "RunSpec", "train_run", "steps_grid", "crossing",
           "start_batch", "procedure"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    title: str
    optimizer: str = "sgd"  # sgd (momentum 0.9), lars, lamb
    # The lr rule from the reference batch ("linear" or "sqrt"). With the lr tuned per batch (Shallue et al.)
    # a rule only says where the search starts; the search moves on until the best lr is interior.
    scaling: str = "linear"
    warmup: bool = True  # Goyal's gradual warmup from the small-batch lr (only above the reference batch)
    ghost_bn: bool = False  # Ghost BN with ghosts of the reference batch (Hoffer et al.)
    longer: bool = False  # Hoffer et al.'s regime adaptation: epochs x B / B_ref (capped at LONGER_CAP)
    ramp: bool = False  # Smith et al.: start at B / 25, batch x5 instead of lr / 5 at 1/2 and 3/4 of the budget
    adaptive: bool = False  # Yao et al.'s ABS: batch x2 when the top Hessian eigenvalue halves
    adversarial: bool = False  # ABSA: ABS + FGSM adversarial training


RECIPES = {
    "sgd": Recipe("SGD+momentum, no warm-up (Shallue's / Nado's tuned baseline)", warmup=False),
    "goyal": Recipe("SGD+momentum, linear scaling + warm-up (Goyal)"),
    "sqrt": Recipe("SGD+momentum, sqrt scaling + warm-up", scaling="sqrt"),
    "lars": Recipe("LARS + warm-up + poly (You)", optimizer="lars", scaling="sqrt"),
    "lamb": Recipe("LAMB + warm-up + poly (You)", optimizer="lamb", scaling="sqrt"),
    "lars_gbn": Recipe("LARS + Ghost BN", optimizer="lars", scaling="sqrt", ghost_bn=True),
    "gbn_longer": Recipe("Ghost BN + warm-up + train longer (Hoffer)", scaling="sqrt", ghost_bn=True, longer=True),
    "ramp": Recipe("batch ramp x5 instead of lr decay (Smith)", warmup=False, ramp=True),
    "abs": Recipe("ABS: batch from the Hessian eigenvalue (Yao)", adaptive=True),
    "absa": Recipe("ABSA: ABS + FGSM adversarial training (Yao)", adaptive=True, adversarial=True),
}

# Where the lr search starts at the reference batch, per optimizer family (the recipe's rule moves it to
# other batches). LARS's step is relative (lr * trust_coefficient * ||w|| per layer); LAMB's is lr * ||w||.
LR_CENTRES = {"sgd": 0.1, "lars": 1.6, "lamb": 0.04}
MOMENTUM, WEIGHT_DECAY, LAMB_WEIGHT_DECAY, TRUST_COEFFICIENT = 0.9, 5e-4, 0.01, 0.02
WARMUP_FRACTION = 1 / 16  # of the planned steps (Goyal: 5 of 90 epochs)
LONGER_CAP = 2  # train longer by at most 2x the epochs (as many updates as the small batch would cost B/B_ref x)
RAMP_FACTOR, ABS_START_DIVISOR, FGSM_EPS = 5, 8, 0.1
# A steps-to-target run stops once STOP_MARGIN x the best lr's median steps have passed: every lr not at
# the target by then is slower than the best (the margin records the neighbours' steps too).
STOP_MARGIN = 1.25
DATASETS = ("mnist1d", "digits")
MODELS = {"cnn": EnsembleCNN, "mlp": EnsembleMLP}


def load_data(dataset: str, samples: int = 40_000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train / validation / test tensors (x float32 (N, L), standardised; y int64).

    mnist1d: generated procedurally by ``mnist1d.data.make_dataset`` (never downloaded)
    with ``num_samples=samples``, its 80/20 train/test split; digits: scikit-learn's
    8x8 digits flattened to 64 values, 80/20. Validation: the last 1/8 of the training
    split (the test split is only read for the lr chosen on validation)."""
    if dataset == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = samples, seed
        d = make_dataset(args)
        x, y, x_test, y_test = d["x"], d["y"], d["x_test"], d["y_test"]
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        order = np.random.default_rng(seed).permutation(len(d.target))
        split = int(0.8 * len(order))
        x, y = d.data[order[:split]] / 16.0, d.target[order[:split]]
        x_test, y_test = d.data[order[split:]] / 16.0, d.target[order[split:]]
        mean, std = x.mean(), x.std()
        x, x_test = (x - mean) / std, (x_test - mean) / std
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    val = len(y) // 8
    as_x = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return {"x": as_x(x[:-val]), "y": as_y(y[:-val]), "x_val": as_x(x[-val:]), "y_val": as_y(y[-val:]),
            "x_test": as_x(x_test), "y_test": as_y(y_test)}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    dataset: str
    model: str
    recipe: str
    batch: int
    lrs: tuple[float, ...]  # the peak lrs tried (one ensemble member per lr and seed)
    seeds: tuple[int, ...]
    steps: int  # the budget, in steps of ``batch`` (ramp/ABS: the same number of samples, in smaller steps)
    ref_batch: int
    samples: int
    target: float = 0.8  # validation accuracy for steps-to-target
    # Shallue et al.'s steps-to-target runs stop once the ranking of the lrs is decided (see train_run);
    # False: a fixed-budget run, trained to the end, whose test accuracy is read
    early_stop: bool = False
    stop_after: float | None = None  # the search's best steps-to-target so far x STOP_MARGIN

    def key(self) -> str:
        """The cache key: a hash of what determines the run's result."""
        return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def steps_grid(last: int) -> list[int]:
    """Steps at which validation accuracy is measured: 4 per octave (steps-to-target is
    interpolated between them), and the last step."""
    steps = sorted({max(1, round(2 ** (i / 4))) for i in range(int(4 * math.log2(max(last, 1))) + 1)} | {last})
    return [s for s in steps if s <= last]


def crossing(curve: list[tuple[int, float]], target: float) -> float | None:
    """The step at which a validation curve [(step, accuracy)] first reaches ``target``,
    linearly interpolated between the two measurements around the crossing."""
    prev = (0, 0.0)
    for step, acc in curve:
        if acc >= target:
            s0, a0 = prev
            return float(step) if acc == a0 else s0 + (target - a0) / (acc - a0) * (step - s0)
        prev = (step, acc)
    return None


def _optimizer(model, recipe: Recipe, lrs: list[float]) -> torch.optim.Optimizer:
    """One pair of param groups per member: weights (decayed, trust ratio) and the rest."""
    groups = []
    wd = LAMB_WEIGHT_DECAY if recipe.optimizer == "lamb" else WEIGHT_DECAY
    for k, lr in enumerate(lrs):
        params = model.member_parameters(k)
        groups.append(dict(params=[p for p in params if p.ndim > 1], lr=lr, weight_decay=wd))
        groups.append(dict(params=[p for p in params if p.ndim <= 1], lr=lr, weight_decay=0.0))
        if recipe.optimizer != "sgd":
            groups[-1]["trust_ratio"] = False
    if recipe.optimizer in ("lars", "lamb"):
        lars = dict(momentum=MOMENTUM, trust_coefficient=TRUST_COEFFICIENT) if recipe.optimizer == "lars" else {}
        return fastlars.make_optimizer(recipe.optimizer, groups, weight_decay=wd, lr=lrs[0], **lars)
    return torch.optim.SGD(groups, lr=lrs[0], momentum=MOMENTUM)


class _Stream:
    """Each member's own shuffled pass over the training set (its seed's order), cut into
    batches of any size: ``next(b)`` gives (b, K) sample indices."""

    def __init__(self, n: int, seeds: list[int]) -> None:
        self.n, self.seeds = n, seeds
        self.generators = {s: torch.Generator().manual_seed(1000 + s) for s in set(seeds)}
        self.buffer = torch.empty(len(seeds), 0, dtype=torch.long)

    def next(self, b: int) -> torch.Tensor:
        while self.buffer.shape[1] < b:
            perms = {s: torch.randperm(self.n, generator=g) for s, g in self.generators.items()}
            self.buffer = torch.cat([self.buffer, torch.stack([perms[s] for s in self.seeds])], 1)
        idx, self.buffer = self.buffer[:, :b], self.buffer[:, b:]
        return idx.T


def _sharpness(model, data, subset: int, iters: int) -> list[float]:
    """Each member's top Hessian eigenvalue of the training loss, BN in eval mode, on a
    fixed subset of the training set (Keskar et al.)."""
    was_training = model.training
    model.eval()
    batches = [(data["x"][:subset], data["y"][:subset])]
    blocks = [model.member_parameters(k) for k in range(model.members)]
    values = top_eigenvalues(model, ensemble_loss, batches, blocks, iters=iters, tol=1e-3)
    model.train(was_training)
    return values


def _noise_scale_pass(model, data, trackers, generator, big: int, small: int) -> None:
    """One McCandlish measurement with accumulate_gradients (BN in eval mode so that the
    per-sample gradients are independent, as the estimator assumes)."""
    idx = torch.randint(0, len(data["y"]), (big,), generator=generator)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, ensemble_loss, data["x"][idx], data["y"][idx], small, noise_scale=trackers)
    model.zero_grad(set_to_none=True)
    model.train(was_training)


def start_batch(recipe: Recipe, batch: int, ref: int) -> int:
    """The batch a run starts at: ``batch``, or for the ramp and ABS the batch they grow from."""
    if recipe.ramp:
        return max(min(ref, batch), batch // RAMP_FACTOR ** 2)
    if recipe.adaptive:
        return max(min(ref, batch), batch // ABS_START_DIVISOR)
    return batch


def _ramp_cap(first: int, batch: int) -> int:
    cap = first
    while cap * RAMP_FACTOR <= batch:
        cap *= RAMP_FACTOR
    return cap


def procedure(name: str, batch: int, ref: int, budget_samples: int) -> tuple:
    """What a run of recipe ``name`` at ``batch`` actually does, apart from its lr (which is tuned):
    two cells with the same procedure are one run. Goyal's warm-up starts at the small-batch lr, so
    it does nothing at or below the reference batch; Ghost BN with ghosts of the reference batch is
    plain BN there; the ramp and ABS are fixed-batch runs when they have no room to grow."""
    r = RECIPES[name]
    first = start_batch(r, batch, ref)
    ramp = r.ramp and _ramp_cap(first, batch) > first  # the batch grows
    grows = r.adaptive and batch > first
    longer = min(LONGER_CAP, max(1.0, batch / ref)) if r.longer else 1.0
    # the ramp's schedule is step decay (the lr is divided where the batch can no longer grow), never poly
    return (r.optimizer, r.warmup and first > ref, r.ghost_bn and first > ref,
            r.ramp and (first, _ramp_cap(first, batch)),
            grows and (first, batch), grows and r.adversarial, longer, round(budget_samples * longer),
            batch if not (ramp or grows) else None)


def train_run(spec: RunSpec, data: dict, *, noise_scale: bool = False, sharpness_subset: int = 512,
              sharpness_iters: int = 20, progress=None) -> dict:
    """Train every (lr, seed) member of one recipe at one batch size; return the record
    (per member: lr, seed, validation curve, steps to ``spec.target``, final validation
    accuracy, divergence; for a fixed-budget run also sharpness and test accuracy).

    A steps-to-target run (``spec.early_stop``) stops at the first validation measurement
    after ``spec.stop_after`` steps or after STOP_MARGIN x the best median steps-to-target
    of its own lrs, or once every member has reached the target or diverged."""
    recipe = RECIPES[spec.recipe]
    n = len(data["y"])
    if not 1 <= spec.batch <= n:
        raise ValueError(f"batch {spec.batch} must be in [1, {n}] (the training set)")
    start = time.perf_counter()
    # member k: lr spec.lrs[k // S], seed spec.seeds[k % S]
    lrs, seeds = [lr for lr in spec.lrs for _ in spec.seeds], [s for _ in spec.lrs for s in spec.seeds]
    per_seed = len(spec.seeds)
    batch, ref = spec.batch, spec.ref_batch
    first = start_batch(recipe, batch, ref)  # ramp and ABS grow from there up to spec.batch
    longer = min(LONGER_CAP, max(1.0, batch / ref)) if recipe.longer and not spec.early_stop else 1.0
    budget = int(round(spec.steps * batch * longer))  # samples
    planned_steps = max(2, math.ceil(budget / first))  # in steps of the start batch

    torch.manual_seed(spec.seeds[0])
    model = MODELS[spec.model](seeds, data["x"].shape[1], virtual_batch_size=ref if recipe.ghost_bn else None)
    opt = _optimizer(model, recipe, lrs)
    warmup = max(1, round(planned_steps * WARMUP_FRACTION)) if recipe.warmup and first > ref else 0
    schedule = ramp = None
    if not recipe.ramp:
        schedule = WarmupPolyDecay(opt, planned_steps, warmup, WarmupPolyDecay.small_batch_factor(first, ref))
    else:
        cap = _ramp_cap(first, batch)
        milestone1 = math.ceil(budget / 2 / first)
        milestone2 = milestone1 + math.ceil(budget / 4 / min(cap, first * RAMP_FACTOR))
        ramp = BatchSizeRamp(opt, first, first, [milestone1, milestone2], RAMP_FACTOR, cap)
    abs_ = AdaptiveBatchSize(first, batch) if recipe.adaptive and batch > first else None
    trackers = [GradientNoiseScale(beta=0.9, params=model.member_parameters(k)) for k in range(len(lrs))] \
        if noise_scale else None

    stream = _Stream(n, seeds)
    generator = torch.Generator().manual_seed(7)
    eval_steps = set(steps_grid(planned_steps * 4))  # more than any run takes
    curve: list[tuple[int, list[float]]] = []
    reached: list[float | None] = [None] * len(lrs)
    diverged = [False] * len(lrs)
    b_simple_at_target: list[float | None] = [None] * len(lrs)
    trajectory = [(0, first)]
    seen, step, next_check = 0, 0, n
    current = first
    stop_reason = "budget"
    model.train()
    while seen < budget:
        b = min(current, budget - seen)
        if b < 2:  # a one-sample batch has no batch-norm statistics
            break
        idx = stream.next(b)
        x, y = data["x"][idx], data["y"][idx]  # (b, K, L), (b, K)
        if recipe.adversarial:
            adversarial_loss(model, ensemble_loss, x, y, FGSM_EPS).backward()
        else:
            ensemble_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += b
        step += 1
        if ramp is not None:
            ramp.step()
            current = ramp.batch_size
        else:
            # progress in steps of the start batch (equals the step count at a fixed batch)
            factor = schedule.factor(seen / first)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        if trackers is not None and step % max(1, n // (4 * b)) == 0:
            _noise_scale_pass(model, data, trackers, generator, big=min(512, n), small=min(64, n // 2))
        if abs_ is not None and seen >= next_check:
            next_check += n
            eig = _sharpness(model, data, 256, 8)
            # One batch for all members: the geometric mean of their eigenvalues (|.|) decides.
            finite = [abs(e) for e in eig if math.isfinite(e)] or [1.0]
            new = abs_.update(math.exp(sum(math.log(e + 1e-12) for e in finite) / len(finite)))
            if new != current:
                current = new
                trajectory.append((step, current))
        if ramp is not None and current != trajectory[-1][1]:
            trajectory.append((step, current))
        if step in eval_steps or seen >= budget:
            acc = member_accuracy(model, data["x_val"], data["y_val"]).tolist()
            curve.append((step, acc))
            for k, a in enumerate(acc):
                if not diverged[k] and not all(bool(torch.isfinite(p).all()) for p in model.member_parameters(k)):
                    diverged[k] = True
                if reached[k] is None and not diverged[k] and a >= spec.target:
                    reached[k] = crossing([(s, c[k]) for s, c in curve], spec.target)
                    if trackers is not None:
                        b_simple_at_target[k] = trackers[k].b_simple
            if spec.early_stop:
                medians = [_median_steps(reached[i * per_seed:(i + 1) * per_seed]) for i in range(len(spec.lrs))]
                limit = min([spec.stop_after or math.inf] + [STOP_MARGIN * m for m in medians])
                if step >= limit:
                    stop_reason = "ranking decided"
                    break
                if all(r is not None or d for r, d in zip(reached, diverged)):
                    stop_reason = "every member reached the target or diverged"
                    break
        if progress is not None:
            progress.set_postfix_str(f"{spec.recipe} B={batch} step {step}", refresh=False)

    final_val = curve[-1][1]
    members = [{"lr": lrs[k], "seed": seeds[k], "final_val": final_val[k], "steps_to_target": reached[k],
                "diverged": diverged[k]} for k in range(len(lrs))]
    if not spec.early_stop:
        # a fixed-budget run: one read of the test set, the sharpness and the noise scale at the end
        test = member_accuracy(model, data["x_test"], data["y_test"]).tolist()
        sharp = _sharpness(model, data, sharpness_subset, sharpness_iters) if sharpness_iters else [None] * len(lrs)
        for k, m in enumerate(members):
            m.update(test=test[k], sharpness=sharp[k],
                     b_simple=trackers[k].b_simple if trackers is not None else None,
                     b_simple_at_target=b_simple_at_target[k])
    return {"spec": dataclasses.asdict(spec), "key": spec.key(), "n_train": n, "updates": step, "samples_seen": seen,
            "epochs": seen / n, "start_batch": first, "stop": stop_reason, "batch_trajectory": trajectory,
            "val_curve": curve, "members": members, "wall_s": time.perf_counter() - start}


def _median_steps(steps: list[float | None]) -> float:
    """Median over seeds, a seed not (yet) at the target counting as infinitely many steps."""
    values = sorted(math.inf if s is None else s for s in steps)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
