"""Schedules against hand-computed values at their boundaries, and resume from state_dict."""

import math

import pytest
import torch

from fastlars.schedules import BatchSizeRamp, WarmupCosine, WarmupPolyDecay, scale_lr, train_longer


def optimizer(lr=2.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_scaling_rules():
    assert scale_lr(0.1, 8192, 256) == pytest.approx(3.2)
    assert scale_lr(0.1, 8192, 256, rule="sqrt") == pytest.approx(0.1 * math.sqrt(32))
    with pytest.raises(ValueError, match="rule"):
        scale_lr(0.1, 8192, rule="cubic")
    with pytest.raises(ValueError, match="batch_size"):
        scale_lr(0.1, -1)
    assert train_longer(90, 8192, 256, milestones=[30, 60]) == (2880, [960, 1920])


def test_warmup_poly_decay_boundaries():
    # peak 2.0, warmup over 4 steps from 0.25 * peak, then (1 - p)^2 over the last 6 steps
    s = WarmupPolyDecay(optimizer(2.0), total_steps=10, warmup_steps=4, warmup_start_factor=0.25)
    got = lrs(s, 11)
    expected = [2.0 * (0.25 + 0.75 * t / 4) for t in range(4)] + [2.0 * (1 - (t - 4) / 6) ** 2 for t in range(4, 11)]
    assert got == pytest.approx(expected)
    assert got[0] == pytest.approx(0.5) and got[4] == pytest.approx(2.0) and got[10] == 0.0


def test_warmup_poly_decay_end_lr():
    # MLPerf: (1 - p)^2 from the peak down to an end lr of 1e-4, not 0
    s = WarmupPolyDecay(optimizer(10.0), total_steps=10, warmup_steps=2, min_factor=1e-5)
    got = lrs(s, 11)
    assert got[:3] == pytest.approx([0.0, 5.0, 10.0])
    assert got[6] == pytest.approx(1e-4 + (10.0 - 1e-4) * 0.25)
    assert got[10] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="min_factor"):
        WarmupPolyDecay(optimizer(1.0), total_steps=10, min_factor=1.5)


def test_small_batch_warmup_start():
    factor = WarmupPolyDecay.small_batch_factor(batch_size=8192, base_batch_size=256)
    s = WarmupPolyDecay(optimizer(3.2), total_steps=100, warmup_steps=10, warmup_start_factor=factor)
    assert lrs(s, 1)[0] == pytest.approx(0.1)  # Goyal et al.: start at the small-batch lr


def test_warmup_cosine_boundaries():
    s = WarmupCosine(optimizer(1.0), total_steps=12, warmup_steps=2, min_factor=0.1)
    got = lrs(s, 13)
    assert got[0] == 0.0 and got[1] == pytest.approx(0.5) and got[2] == pytest.approx(1.0)
    assert got[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert got[12] == pytest.approx(0.1)


def test_batch_size_ramp():
    # batch 512 -> x4 at step 3 -> x4 at step 6 capped at 4096: lr / 4 instead
    s = BatchSizeRamp(optimizer(1.0), base_batch_size=512, micro_batch_size=256, milestones=[3, 6], factor=4,
                      max_batch_size=4096)
    seen = []
    for _ in range(8):
        seen.append((s.batch_size, s.accumulation_steps, s.optimizer.param_groups[0]["lr"]))
        s.optimizer.step()
        s.step()
    assert seen[:3] == [(512, 2, 1.0)] * 3
    assert seen[3:6] == [(2048, 8, 1.0)] * 3
    assert seen[6:] == [(2048, 8, 0.25)] * 2


@pytest.mark.parametrize("make", [
    lambda o: WarmupPolyDecay(o, total_steps=20, warmup_steps=5, warmup_start_factor=0.1),
    lambda o: WarmupCosine(o, total_steps=20, warmup_steps=5),
    lambda o: BatchSizeRamp(o, 256, 128, milestones=[4, 8, 12], factor=2, max_batch_size=1024),
])
def test_resume_mid_schedule(make):
    full = make(optimizer())
    expected = lrs(full, 20)
    first = make(optimizer())
    lrs(first, 7)
    state = first.state_dict()
    opt = optimizer()
    resumed = make(opt)
    resumed.load_state_dict(state)
    opt.param_groups[0]["lr"] = first.optimizer.param_groups[0]["lr"]  # the optimizer's own state_dict does this
    assert lrs(resumed, 13) == pytest.approx(expected[7:])


@pytest.mark.parametrize("make, match", [
    (lambda o: WarmupPolyDecay(o, total_steps=10, warmup_steps=10), "warmup_steps .* shorter than total_steps"),
    (lambda o: WarmupPolyDecay(o, total_steps=-5), "total_steps must be an integer"),
    (lambda o: WarmupPolyDecay(o, total_steps=10, power=0), "power must be > 0"),
    (lambda o: WarmupCosine(o, total_steps=10, warmup_start_factor=2.0), "warmup_start_factor"),
    (lambda o: BatchSizeRamp(o, 300, 128, milestones=[5]), "not a multiple of micro_batch_size"),
    (lambda o: BatchSizeRamp(o, 256, -2, milestones=[5]), "micro_batch_size must be an integer"),
    (lambda o: BatchSizeRamp(o, 512, 128, milestones=[5], max_batch_size=256), "below base_batch_size"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(optimizer())
