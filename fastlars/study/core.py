"""The study's data, recipes and training loop (one ensemble run = one recipe at one
batch size, every point of a search round, or the chosen point, times every seed trained
at once)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time

import numpy as np
import torch

import fastlars
from fastlars.adversarial import adversarial_loss, fgsm
from fastlars.hessian import AdaptiveBatchSize, top_eigenvalues
from fastlars.noise_scale import GradientNoiseScale
from fastlars.train import accumulate_gradients

from .ensemble import EnsembleCNN, EnsembleMLP, EnsembleResNet, ensemble_loss, member_accuracy, member_loss

__all__ = ["Recipe", "RECIPES", "DATASETS", "MODELS", "load_data", "RunSpec", "train_run", "steps_grid", "crossing",
           "median_steps"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    title: str
    optimizer: str = "sgd"  # sgd (Nesterov momentum), lars, lamb, adamw
    # Where the lr search starts at other batches ("linear" or "sqrt" from the reference batch); the search
    # moves on until the best lr is interior, so the rule only sets the start.
    scaling: str = "linear"
    momenta: tuple[float, ...] = ()  # the momenta searched (empty: Adam's betas, not searched)
    # True: lr x warm-up (x momentum) searched per batch on the search seeds. False: a paper's prescription,
    # run on the report seeds only, at a point derived from a tuned sgd cell (see search.paper_spec).
    tuned: bool = False
    ghost_bn: bool = False  # Ghost BN with ghosts of the reference batch (Hoffer et al.)
    # "wsd": warm-up, the peak lr, a cool-down over the last COOLDOWN of the budget; "step": lr / 5 at 1/2
    # and 3/4 of the budget (Smith et al.'s baseline); "ramp": the peak lr, the batch x 5 there instead
    schedule: str = "wsd"
    adaptive: bool = False  # Yao et al.'s ABS: batch x2 when the top Hessian eigenvalue halves
    adversarial: bool = False  # ABSA: ABS + FGSM adversarial training


RECIPES = {
    "sgd": Recipe("SGD + Nesterov momentum, tuned lr x warm-up x momentum (Shallue's / Nado's baseline)",
                  momenta=(0.9, 0.97), tuned=True),
    "lars": Recipe("LARS, tuned lr x warm-up x momentum (You et al. 2017)", "lars", "sqrt", (0.9, 0.97), tuned=True),
    "lamb": Recipe("LAMB, tuned lr x warm-up (You et al. 2019)", "lamb", "sqrt", tuned=True),
    "adamw": Recipe("AdamW, tuned lr x warm-up (Nado et al.'s baseline for LAMB)", "adamw", "sqrt", tuned=True),
    "goyal": Recipe("SGD at the linear-rule lr from the tuned reference batch, gradual warm-up (Goyal et al.)"),
    "goyal_nowarm": Recipe("SGD at the linear-rule lr, no warm-up (Goyal et al.'s failure case)"),
    "hoffer": Recipe("Ghost BN + regime adaptation: the tuned SGD point, HOFFER_FACTOR x the epochs (Hoffer et al.)",
                     ghost_bn=True),
    "step": Recipe("SGD with lr / 5 at 1/2 and 3/4 of the budget (Smith et al.'s baseline)", schedule="step"),
    "ramp": Recipe("SGD with the batch x 5 at 1/2 and 3/4 of the budget instead (Smith et al.)", schedule="ramp"),
    "abs": Recipe("ABS: batch x2 when the top Hessian eigenvalue halves (Yao et al.)", adaptive=True),
    "absa": Recipe("ABSA: ABS + FGSM adversarial training (Yao et al.)", adaptive=True, adversarial=True),
}

# Where the lr search starts at the reference batch, per optimizer. LARS's step is relative
# (lr * trust_coefficient * ||w|| per layer); LAMB's is lr * ||w||.
LR_CENTRES = {"sgd": 0.1, "lars": 0.25, "lamb": 0.02, "adamw": 0.003}
WEIGHT_DECAY, DECOUPLED_WEIGHT_DECAY, TRUST_COEFFICIENT = 5e-4, 0.01, 0.02
GOYAL_WARMUP_SHARE = 5 / 90  # Goyal et al.: 5 of 90 epochs
HOFFER_FACTOR = 4  # the low end of Hoffer et al.'s regime adaptation (4-16x the steps)
RAMP_FACTOR, FGSM_EPS = 5, 0.1
COOLDOWN = 1 / 3  # of the budget: the lr decays linearly to 0 over the last third
ABS_CHECKS_PER_EPOCH, ABS_POWER_ITERS = 4, 8
KESKAR_LOSS = 0.2  # the training loss at which Keskar's sharpness is compared (reached by every batch's seeds)
# A search run stops once STOP_MARGIN x the best point's median steps to the primary target have passed:
# every point not at the target by then is slower than the best. Report runs are never cut short.
STOP_MARGIN = 1.25
DATASETS = ("mnist1d", "digits")
MODELS = {"cnn": EnsembleCNN, "resnet": EnsembleResNet, "mlp": EnsembleMLP}


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
    """One ensemble run: one recipe at one batch, every point x every seed trained at once."""

    dataset: str
    model: str
    recipe: str
    batch: int  # the batch (ramp and ABS: the batch they start at)
    # (peak lr, warm-up in epochs, momentum or None) per point; member k: point k // S, seed k % S
    points: tuple[tuple[float, float, float | None], ...]
    seeds: tuple[int, ...]
    epochs: float  # the budget, in epochs of the training set
    ref_batch: int
    samples: int
    targets: tuple[float, ...]  # validation accuracies; the first is the primary
    # a search run stops once the ranking of its points is decided (see train_run); a report run
    # (False) trains every member to the end of the budget and reads the test set once
    early_stop: bool = False
    stop_after: float | None = None  # the search's best steps to the primary target so far x STOP_MARGIN
    max_batch: int | None = None  # ramp / ABS: the batch they may grow to
    measure: tuple[str, ...] = ()  # extra measurements: "noise_scale", "sharpness_at_loss", "fgsm"

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


def median_steps(steps: list[float | None]) -> float:
    """Median over seeds, a seed not (yet) at the target counting as infinitely many steps."""
    values = sorted(math.inf if s is None else s for s in steps)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _optimizer(model, recipe: Recipe, points: list[tuple[float, float, float | None]]) -> torch.optim.Optimizer:
    """One pair of param groups per member: weights (decayed, trust ratio) and the rest."""
    groups = []
    wd = DECOUPLED_WEIGHT_DECAY if recipe.optimizer in ("lamb", "adamw") else WEIGHT_DECAY
    for k, (lr, _, momentum) in enumerate(points):
        params = model.member_parameters(k)
        extra = {} if momentum is None else {"momentum": momentum}
        groups.append(dict(params=[p for p in params if p.ndim > 1], lr=lr, weight_decay=wd, **extra))
        groups.append(dict(params=[p for p in params if p.ndim <= 1], lr=lr, weight_decay=0.0, **extra))
        if recipe.optimizer in ("lars", "lamb"):
            groups[-1]["trust_ratio"] = False
    if recipe.optimizer == "lars":
        return fastlars.make_optimizer("lars", groups, weight_decay=wd, lr=points[0][0], nesterov=True,
                                       trust_coefficient=TRUST_COEFFICIENT)
    if recipe.optimizer == "lamb":
        return fastlars.make_optimizer("lamb", groups, weight_decay=wd, lr=points[0][0])
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=points[0][0])
    return torch.optim.SGD(groups, lr=points[0][0], momentum=0.9, nesterov=True)


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


@torch.no_grad()
def _fgsm_accuracy(model, x, y, eps: float) -> list[float]:
    """Each member's accuracy on FGSM examples of the test set (eval mode; each member
    attacked through its own gradient: the loss is a sum over members)."""
    was_training = model.training
    model.eval()
    adv = fgsm(model, ensemble_loss, x.unsqueeze(1).expand(-1, model.members, -1).contiguous(), y, eps)
    correct = (model(adv).argmax(-1) == y.unsqueeze(1)).float().mean(0)
    model.train(was_training)
    return correct.tolist()


@torch.no_grad()
def _freeze_diverged(model, opt, peaks: list[float], diverged: list[bool]) -> None:
    """Mark the members whose parameters or gradients overflowed as diverged and take them
    out of training (zero parameters, gradients and lr), so the others train on: one
    optimizer steps every member, and the layer-wise optimizers refuse a non-finite norm."""
    for k in range(model.members):
        params = model.member_parameters(k)
        total = sum(float(p.double().square().sum()) + (0.0 if p.grad is None else float(p.grad.double().square().sum()))
                    for p in params)
        if diverged[k] or not total < 1e30:
            diverged[k] = True
            for p in params:
                p.zero_()
                if p.grad is not None:
                    p.grad.zero_()
            for i in (2 * k, 2 * k + 1):  # the member's two param groups
                peaks[i] = opt.param_groups[i]["lr"] = 0.0


def _lr_factor(recipe: Recipe, seen: int, budget: int, warmup_samples: float) -> float:
    """The lr of a member as a fraction of its peak after ``seen`` of ``budget`` samples: a
    linear warm-up over ``warmup_samples``, the peak, then a linear cool-down to 0 over the
    last COOLDOWN of the budget (warmup-stable-decay). The schedule is set in epochs, the
    same at every batch: no step cap moves it. Smith's baseline instead divides the lr by
    RAMP_FACTOR at 1/2 and 3/4 of the budget; his ramp keeps the peak and grows the batch."""
    factor = min(1.0, seen / warmup_samples) if warmup_samples > 0 else 1.0
    if recipe.schedule == "step":
        return factor / RAMP_FACTOR ** ((seen >= budget / 2) + (seen >= 3 * budget / 4))
    if recipe.schedule == "wsd":
        factor *= min(1.0, (budget - seen) / (COOLDOWN * budget))
    return factor


def _ramp_batch(first: int, max_batch: int, seen: int, budget: int) -> int:
    """Smith's ramp: the batch x RAMP_FACTOR where the step schedule divides the lr (capped)."""
    batch = first * RAMP_FACTOR ** ((seen >= budget / 2) + (seen >= 3 * budget / 4))
    return min(batch, max_batch)


def train_run(spec: RunSpec, data: dict, *, sharpness_subset: int = 256, sharpness_iters: int = 10,
              progress=None) -> dict:
    """Train every (point, seed) member of one recipe at one batch; return the record (per
    member: its point and seed, the steps to each target, validation accuracy at the end
    and divergence; for a report run also test accuracy and training loss at the end, and
    what ``spec.measure`` asks for).

    A search run (``spec.early_stop``) stops at the first validation measurement after
    ``spec.stop_after`` steps or after STOP_MARGIN x the best median steps to the primary
    target of its own points, or once every member has reached it or diverged."""
    recipe = RECIPES[spec.recipe]
    n = len(data["y"])
    if not 2 <= spec.batch <= n:
        raise ValueError(f"batch {spec.batch} must be in [2, {n}] (the training set)")
    start, cpu_start = time.perf_counter(), time.process_time()
    per_seed = len(spec.seeds)
    points = [p for p in spec.points for _ in spec.seeds]
    seeds = [s for _ in spec.points for s in spec.seeds]
    members = len(points)
    budget = int(round(spec.epochs * n))  # samples
    torch.manual_seed(spec.seeds[0])
    model = MODELS[spec.model](seeds, data["x"].shape[1], virtual_batch_size=spec.ref_batch if recipe.ghost_bn else None)
    opt = _optimizer(model, recipe, points)
    peaks = [g["lr"] for g in opt.param_groups]
    warmups = [p[1] * n for p in points for _ in range(2)]  # per param group, in samples
    first, max_batch = spec.batch, spec.max_batch or spec.batch
    abs_ = AdaptiveBatchSize(first, max_batch) if recipe.adaptive and max_batch > first else None
    trackers = [GradientNoiseScale(beta=0.9, params=model.member_parameters(k)) for k in range(members)] \
        if "noise_scale" in spec.measure else None
    stream = _Stream(n, seeds)
    generator = torch.Generator().manual_seed(7)
    # validation 4x per octave of steps, from 1/32 of the budget on (no target is near before; each
    # measurement costs a pass over the validation set for every member)
    planned = math.ceil(budget / first)
    eval_steps = {s for s in steps_grid(planned) if s >= planned / 32}
    targets = spec.targets
    curve: list[tuple[int, list[float]]] = []
    reached = {t: [None] * members for t in targets}
    diverged = [False] * members
    b_simple_at_target = {t: [None] * members for t in spec.targets}
    sharp_at_loss: list[float | None] = [None] * members
    step_at_loss: list[int | None] = [None] * members
    trajectory = [(0, first)]
    seen, step, next_check, hessian_checks = 0, 0, n / ABS_CHECKS_PER_EPOCH, 0
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
        try:
            opt.step()
        except FloatingPointError:  # LARS/LAMB refuse a step whose norms overflow: a member diverged
            _freeze_diverged(model, opt, peaks, diverged)
            opt.step()
        opt.zero_grad(set_to_none=True)
        seen += b
        step += 1
        for group, peak, warm in zip(opt.param_groups, peaks, warmups):
            group["lr"] = peak * _lr_factor(recipe, seen, budget, warm)
        if recipe.schedule == "ramp":
            current = _ramp_batch(first, max_batch, seen, budget)
        if trackers is not None and step % max(1, n // (4 * b)) == 0:
            _noise_scale_pass(model, data, trackers, generator, big=min(512, n), small=min(64, n // 2))
        if abs_ is not None and seen >= next_check:
            interval = n / ABS_CHECKS_PER_EPOCH
            next_check = (math.floor(seen / interval) + 1) * interval  # a step longer than the interval: one check
            hessian_checks += 1
            eig = _sharpness(model, data, 256, ABS_POWER_ITERS)
            # One batch for all members: the geometric mean of their eigenvalues (|.|) decides.
            finite = [abs(e) for e in eig if math.isfinite(e)] or [1.0]
            current = abs_.update(math.exp(sum(math.log(e + 1e-12) for e in finite) / len(finite)))
        if current != trajectory[-1][1]:
            trajectory.append((step, current))
        if step in eval_steps or seen >= budget:
            acc = member_accuracy(model, data["x_val"], data["y_val"]).tolist()
            curve.append((step, acc))
            for k, a in enumerate(acc):
                if not diverged[k] and not all(bool(torch.isfinite(p).all()) for p in model.member_parameters(k)):
                    diverged[k] = True
                for t in targets:
                    if reached[t][k] is None and not diverged[k] and a >= t:
                        reached[t][k] = crossing([(s, c[k]) for s, c in curve], t)
                        if trackers is not None:
                            b_simple_at_target[t][k] = trackers[k].b_simple
            if "sharpness_at_loss" in spec.measure:
                loss = member_loss(model, data["x"][:sharpness_subset], data["y"][:sharpness_subset]).tolist()
                new = [k for k in range(members) if step_at_loss[k] is None and not diverged[k]
                       and loss[k] <= KESKAR_LOSS]
                if new:
                    values = _sharpness(model, data, sharpness_subset, sharpness_iters)
                    for k in new:
                        sharp_at_loss[k], step_at_loss[k] = values[k], step
            if spec.early_stop:
                primary = reached[targets[0]]
                medians = [median_steps(primary[i * per_seed:(i + 1) * per_seed]) for i in range(len(spec.points))]
                limit = min([spec.stop_after or math.inf] + [STOP_MARGIN * m for m in medians])
                if step >= limit:
                    stop_reason = "ranking decided"
                    break
                if all(r is not None or d for r, d in zip(primary, diverged)):
                    stop_reason = "every member reached the primary target or diverged"
                    break
        if progress is not None:
            progress.set_postfix_str(f"{spec.model} {spec.recipe} B={spec.batch} step {step}", refresh=False)

    final_val = curve[-1][1]
    out = [{"lr": points[k][0], "warmup_epochs": points[k][1], "momentum": points[k][2], "seed": seeds[k],
            "final_val": final_val[k], "steps_to_target": {str(t): reached[t][k] for t in targets},
            "diverged": diverged[k]} for k in range(members)]
    if not spec.early_stop:
        # a report run: one read of the test set at the end of the budget
        test = member_accuracy(model, data["x_test"], data["y_test"]).tolist()
        loss = member_loss(model, data["x"], data["y"]).tolist()
        fgsm_acc = _fgsm_accuracy(model, data["x_test"], data["y_test"], FGSM_EPS) if "fgsm" in spec.measure \
            else [None] * members
        for k, m in enumerate(out):
            m.update(test=test[k], train_loss=loss[k], fgsm_test=fgsm_acc[k],
                     sharpness_at_loss=sharp_at_loss[k], step_at_loss=step_at_loss[k],
                     b_simple=trackers[k].b_simple if trackers is not None else None,
                     b_simple_at_target={str(t): v[k] for t, v in b_simple_at_target.items()} if trackers else None)
    return {"spec": dataclasses.asdict(spec), "key": spec.key(), "n_train": n, "updates": step, "samples_seen": seen,
            "epochs": seen / n, "stop": stop_reason, "batch_trajectory": trajectory, "hessian_checks": hessian_checks,
            "hessian_vector_products_at_most": hessian_checks * ABS_POWER_ITERS, "val_curve": curve,
            "members": out, "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start}
