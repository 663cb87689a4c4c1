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
from fastlars.schedules import BatchSizeRamp, WarmupPolyDecay, scale_lr
from fastlars.train import accumulate_gradients

from .ensemble import EnsembleCNN, EnsembleMLP, ensemble_loss, member_accuracy

__all__ = ["Recipe", "RECIPES", "DATASETS", "MODELS", "load_data", "RunSpec", "train_run", "steps_grid"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    title: str
    optimizer: str = "sgd"  # sgd (momentum 0.9), lars, lamb
    scaling: str | None = None  # lr scaling rule from the reference batch: None, "linear", "sqrt"
    warmup: bool = True  # Goyal's gradual warmup from the small-batch lr over the first 1/8 of the budget
    ghost_bn: bool = False  # Ghost BN with ghosts of the reference batch (Hoffer et al.)
    longer: bool = False  # Hoffer et al.'s regime adaptation: epochs x B / B_ref (capped at LONGER_CAP)
    ramp: bool = False  # Smith et al.: start at B / 25, batch x5 instead of lr / 5 at 1/2 and 3/4 of the budget
    adaptive: bool = False  # Yao et al.'s ABS: batch x2 when the top Hessian eigenvalue halves
    adversarial: bool = False  # ABSA: ABS + FGSM adversarial training


RECIPES = {
    "sgd": Recipe("SGD+momentum, small-batch lr (naive)", warmup=False),
    "goyal": Recipe("linear scaling + warmup (Goyal)", scaling="linear"),
    "sqrt": Recipe("sqrt scaling + warmup", scaling="sqrt"),
    "lars": Recipe("LARS, sqrt scaling + warmup + poly (You)", optimizer="lars", scaling="sqrt"),
    "lamb": Recipe("LAMB, sqrt scaling + warmup + poly", optimizer="lamb", scaling="sqrt"),
    "lars_gbn": Recipe("LARS + Ghost BN", optimizer="lars", scaling="sqrt", ghost_bn=True),
    "gbn_longer": Recipe("Ghost BN + sqrt scaling + train longer (Hoffer)", scaling="sqrt", ghost_bn=True,
                         longer=True),
    "ramp": Recipe("batch ramp x5 instead of lr decay (Smith)", scaling="linear", warmup=False, ramp=True),
    "abs": Recipe("ABS: batch from the Hessian eigenvalue (Yao)", scaling="linear", adaptive=True),
    "absa": Recipe("ABSA: ABS + FGSM adversarial training (Yao)", scaling="linear", adaptive=True,
                   adversarial=True),
}

# Base lr grids at the reference batch, one per optimizer family (the recipe's rule scales them), x2 apart.
# LARS's step is relative (lr * trust_coefficient * ||w|| per layer): 0.2-1.6 % of ||w|| per step at the
# reference batch; LAMB's is lr * ||w||. LARS and LAMB use the sqrt rule (You et al. 2019): the linear rule
# would ask for relative steps above 100 % at the largest batches.
LR_GRIDS = {"sgd": (0.025, 0.05, 0.1, 0.2), "lars": (0.1, 0.2, 0.4, 0.8), "lamb": (0.0025, 0.005, 0.01, 0.02)}
MOMENTUM, WEIGHT_DECAY, LAMB_WEIGHT_DECAY, TRUST_COEFFICIENT = 0.9, 5e-4, 0.01, 0.02
LONGER_CAP = 2  # train longer by at most 2x the epochs (as many updates as the small batch would cost B/B_ref x)
RAMP_FACTOR, ABS_START_DIVISOR, FGSM_EPS = 5, 8, 0.1
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
    lrs: tuple[float, ...]  # the base lr grid at the reference batch (the recipe's rule scales it)
    seeds: tuple[int, ...]
    epochs: int
    ref_batch: int
    samples: int

    def key(self) -> str:
        """The cache key: a hash of what determines the run's result."""
        return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def steps_grid(last: int) -> list[int]:
    """Steps at which validation accuracy is measured: 4 per octave (steps-to-target to
    within 19 %), and the last step."""
    steps = sorted({max(1, round(2 ** (i / 4))) for i in range(int(4 * math.log2(max(last, 1))) + 1)} | {last})
    return [s for s in steps if s <= last]


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


def train_run(spec: RunSpec, data: dict, *, target: float, noise_scale: bool = False,
              sharpness_subset: int = 512, sharpness_iters: int = 20, progress=None) -> dict:
    """Train every (lr, seed) member of one recipe at one batch size; return the record
    (per member: lr, seed, validation curve, steps to ``target``, final validation
    accuracy, sharpness, updates; test accuracy of the lr chosen on validation only)."""
    recipe = RECIPES[spec.recipe]
    n = len(data["y"])
    if not 1 <= spec.batch <= n:
        raise ValueError(f"batch {spec.batch} must be in [1, {n}] (the training set)")
    start = time.perf_counter()
    # member k: lr spec.lrs[k // S], seed spec.seeds[k % S]
    lrs, seeds = [lr for lr in spec.lrs for _ in spec.seeds], [s for _ in spec.lrs for s in spec.seeds]
    batch, ref = spec.batch, spec.ref_batch
    # The batch the run starts at (ramp and ABS grow from there up to spec.batch).
    if recipe.ramp:
        start_batch = max(min(ref, batch), batch // RAMP_FACTOR ** 2)
    elif recipe.adaptive:
        start_batch = max(min(ref, batch), batch // ABS_START_DIVISOR)
    else:
        start_batch = batch
    peak = [scale_lr(lr, start_batch, ref, recipe.scaling) if recipe.scaling else lr for lr in lrs]
    epochs = spec.epochs * (min(LONGER_CAP, max(1.0, batch / ref)) if recipe.longer else 1)
    budget = int(round(epochs * n))  # samples
    planned_steps = max(2, math.ceil(budget / start_batch))  # in steps of start_batch

    torch.manual_seed(spec.seeds[0])
    model = MODELS[spec.model](seeds, data["x"].shape[1], virtual_batch_size=ref if recipe.ghost_bn else None)
    opt = _optimizer(model, recipe, peak)
    warmup = planned_steps // 8 if recipe.warmup else 0
    schedule = ramp = None
    if not recipe.ramp:
        schedule = WarmupPolyDecay(opt, planned_steps, warmup, WarmupPolyDecay.small_batch_factor(start_batch, ref))
    else:
        cap = start_batch
        while cap * RAMP_FACTOR <= batch:
            cap *= RAMP_FACTOR
        first = math.ceil(budget / 2 / start_batch)
        second = first + math.ceil(budget / 4 / min(cap, start_batch * RAMP_FACTOR))
        ramp = BatchSizeRamp(opt, start_batch, start_batch, [first, second], RAMP_FACTOR, cap)
    abs_ = AdaptiveBatchSize(start_batch, batch) if recipe.adaptive and batch > start_batch else None
    trackers = [GradientNoiseScale(beta=0.9, params=model.member_parameters(k)) for k in range(len(lrs))] \
        if noise_scale else None

    stream = _Stream(n, seeds)
    generator = torch.Generator().manual_seed(7)
    eval_steps = set(steps_grid(planned_steps * 4))  # more than any run takes
    curve: list[tuple[int, list[float]]] = []
    reached: list[int | None] = [None] * len(lrs)
    b_simple_at_target: list[float | None] = [None] * len(lrs)
    trajectory = [(0, start_batch)]
    seen, step, next_check = 0, 0, n
    current = start_batch
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
            factor = schedule.factor(seen / start_batch)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        if trackers is not None and step % max(1, n // (4 * b)) == 0:
            _noise_scale_pass(model, data, trackers, generator, big=min(512, n), small=min(64, n // 2))
        if abs_ is not None and seen >= next_check:
            next_check += n
            eig = _sharpness(model, data, 256, 8)
            # One batch for all members: the geometric mean of their eigenvalues (|.|) decides.
            new = abs_.update(math.exp(sum(math.log(abs(e) + 1e-12) for e in eig) / len(eig)))
            if new != current:
                current = new
                trajectory.append((step, current))
        if ramp is not None and current != trajectory[-1][1]:
            trajectory.append((step, current))
        if step in eval_steps or seen >= budget:
            acc = member_accuracy(model, data["x_val"], data["y_val"]).tolist()
            curve.append((step, acc))
            for k, a in enumerate(acc):
                if reached[k] is None and a >= target:
                    reached[k] = step
                    if trackers is not None:
                        b_simple_at_target[k] = trackers[k].b_simple
        if progress is not None:
            progress.set_postfix_str(f"{spec.recipe} B={batch} step {step}", refresh=False)

    final_val = curve[-1][1]
    sharp = _sharpness(model, data, sharpness_subset, sharpness_iters)
    # lr chosen on validation: the best mean final validation accuracy over seeds.
    per_seed = len(spec.seeds)
    chosen = max(range(len(spec.lrs)), key=lambda i: sum(final_val[i * per_seed:(i + 1) * per_seed]))
    test = member_accuracy(model, data["x_test"], data["y_test"])  # all members in one pass ...
    members = []
    for k in range(len(lrs)):
        members.append({
            "base_lr": lrs[k], "peak_lr": peak[k], "seed": seeds[k], "final_val": final_val[k],
            "steps_to_target": reached[k], "sharpness": sharp[k],
            # ... but only the lr chosen on validation has its test accuracy recorded
            "test": float(test[k]) if k // per_seed == chosen else None,
            "b_simple": trackers[k].b_simple if trackers is not None else None,
            "b_simple_at_target": b_simple_at_target[k],
        })
    return {"spec": dataclasses.asdict(spec), "key": spec.key(), "target": target, "updates": step,
            "samples_seen": seen, "epochs": epochs, "start_batch": start_batch, "chosen_base_lr": spec.lrs[chosen],
            "batch_trajectory": trajectory, "val_curve": curve, "members": members,
            "wall_s": time.perf_counter() - start}

