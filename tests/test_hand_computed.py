"""Independent hand computations of LARS and LAMB (``backend="reference"``).

Every expected number below is worked out inside this file with float64 NumPy,
line by line from the formulas of docs/contract.md ("LARS", "LAMB"); torch is used only to drive the
optimizer under test, never for the arithmetic of the expectation. Tensors are
tiny (2-3 elements), each case runs 2-3 steps with a different gradient per
step, and the numbers are chosen so that every branch exercised actually
changes the result (and the tests assert that it does).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

import fastlars

RTOL, ATOL = 1e-12, 1e-15
MIN_MOVE = 1e-6  # every parameter must move at least this much per step

# ---------------------------------------------------------------------------
# NumPy reference: one function per optimizer, state kept in a plain dict.


def lars_np(w, g, state, *, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8,
            dampening=0.0, nesterov=False, trust_clip=False, trust_ratio=True):
    """One LARS step on one tensor. Returns (new w, ratio used, clip active or None)."""
    w_norm, g_norm = np.sqrt(np.sum(w * w)), np.sqrt(np.sum(g * g))
    clip_active = None
    if trust_ratio:
        if w_norm > 0 and g_norm > 0:
            r = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
        else:
            r = 1.0
        if trust_clip:
            clip_active = r / lr > 1.0
            r = min(r / lr, 1.0)
    else:
        r = 1.0
    d = r * (g + weight_decay * w)
    if momentum != 0:
        if "buf" not in state:
            state["buf"] = d.copy()
        else:
            state["buf"] = momentum * state["buf"] + (1.0 - dampening) * d
        d = d + momentum * state["buf"] if nesterov else state["buf"]
    return w - lr * d, r, clip_active


def lamb_np(w, g, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
            grad_averaging=True, trust_clip=False, trust_ratio=True, grad_divisor=1.0):
    """One LAMB step on one tensor; ``grad_divisor`` is max(1, global_norm / max_grad_norm).

    Returns (new w, ratio used, clip active or None).
    """
    b1, b2 = betas
    g = g / grad_divisor
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = b1 * state.get("m", 0.0) + ((1.0 - b1) if grad_averaging else 1.0) * g
    v = state["v"] = b2 * state.get("v", 0.0) + (1.0 - b2) * g * g
    if bias_correction:
        m_hat, v_hat = m / (1.0 - b1**t), v / (1.0 - b2**t)
    else:
        m_hat, v_hat = m, v
    u = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * w
    w_norm, u_norm = np.sqrt(np.sum(w * w)), np.sqrt(np.sum(u * u))
    r = w_norm / u_norm if (trust_ratio and w_norm > 0 and u_norm > 0) else 1.0
    clip_active = None
    if trust_clip:
        clip_active = r > 1.0
        r = min(r, 1.0)
    return w - lr * r * u, r, clip_active


def lamb_grad_divisor(grads, max_grad_norm):
    """(max(1, global_norm / max_grad_norm), global_norm) over every gradient of the step."""
    global_norm = np.sqrt(sum(np.sum(g * g) for g in grads))
    if max_grad_norm <= 0:
        return 1.0, global_norm
    return max(1.0, global_norm / max_grad_norm), global_norm


# ---------------------------------------------------------------------------
# Driving the optimizer under test


def _params(*values):
    return [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in values]


def _torch_step(opt, params, grads):
    """Set p.grad by hand, step, and check that p.grad was left untouched."""
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=torch.float64)
    before = [p.grad.clone() for p in params]
    opt.step()
    for p, b in zip(params, before):
        assert p.grad is not None
        assert torch.equal(p.grad, b), "the optimizer modified p.grad"


def _check_weights(params, expected, previous):
    for p, w, w_prev in zip(params, expected, previous):
        assert np.max(np.abs(w - w_prev)) > MIN_MOVE, "test numbers too weak: a parameter barely moved"
        assert_allclose(p.detach().numpy(), w, rtol=RTOL, atol=ATOL)


W1 = [0.5, -1.2, 0.8]
W2 = [2.0, 0.3]
GRADS = [  # per step: (grad of W1, grad of W2)
    ([0.3, -0.1, 0.25], [-0.05, 0.4]),
    ([-0.2, 0.35, 0.1], [0.15, 0.1]),
    ([0.05, 0.05, -0.4], [-0.3, 0.2]),
]


def _run_lars_one_group(grad_steps, values, **cfg):
    """Every parameter in one group; numpy and torch stepped side by side. Returns the ratios per step."""
    params = _params(*values)
    opt = fastlars.LARS(params, backend="reference", **cfg)
    ws = [np.array(v, dtype=np.float64) for v in values]
    states = [{} for _ in ws]
    ratios, clips = [], []
    for grads in grad_steps:
        _torch_step(opt, params, grads)
        out = [lars_np(w, np.array(g, dtype=np.float64), st, **cfg) for w, g, st in zip(ws, grads, states)]
        new_ws = [o[0] for o in out]
        ratios.append([o[1] for o in out])
        clips.append([o[2] for o in out])
        _check_weights(params, new_ws, ws)
        ws = new_ws
    return ratios, clips


# ---------------------------------------------------------------------------
# LARS

LARS_CASES = {
    "plain_momentum": dict(lr=0.5, momentum=0.9, trust_coefficient=0.02),
    "weight_decay": dict(lr=0.5, momentum=0.9, weight_decay=0.2, trust_coefficient=0.02),
    "nesterov": dict(lr=0.5, momentum=0.9, weight_decay=0.05, trust_coefficient=0.02, nesterov=True),
    "dampening": dict(lr=0.5, momentum=0.9, weight_decay=0.05, trust_coefficient=0.02, dampening=0.5),
    "momentum_zero": dict(lr=0.5, momentum=0.0, weight_decay=0.05, trust_coefficient=0.02),
}


@pytest.mark.parametrize("case", sorted(LARS_CASES))
def test_lars_hand_computed(case):
    ratios, _ = _run_lars_one_group(GRADS, [W1, W2], **LARS_CASES[case])
    # the trust ratio is genuinely adaptive here: neither 1 nor the same for both tensors
    for r1, r2 in ratios:
        assert 0 < r1 < 0.5 and 0 < r2 < 0.5 and abs(r1 - r2) > 1e-3


def test_lars_weight_decay_changes_result():
    """Guard against a vacuous weight-decay case: the numbers differ without it."""
    cfg = LARS_CASES["weight_decay"]
    st_a, st_b = {}, {}
    w_a = w_b = np.array(W1)
    for grads in GRADS:
        g = np.array(grads[0])
        w_a = lars_np(w_a, g, st_a, **cfg)[0]
        w_b = lars_np(w_b, g, st_b, **{**cfg, "weight_decay": 0.0})[0]
    assert np.max(np.abs(w_a - w_b)) > 1e-3


def test_lars_trust_clip_active_then_inactive():
    # r / lr = 0.2 * ||w|| / (||g|| + 0.01 ||w||): about 4.7 at step 1 (clipped to 1), < 1 afterwards
    cfg = dict(lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, trust_clip=True)
    grad_steps = [
        ([0.03, -0.02, 0.035],),   # ||g|| ~ 0.05: clip active
        ([-0.6, 0.7, 0.3],),       # ||g|| ~ 0.97: clip inactive
        ([0.1, 0.4, -0.2],),       # ||g|| ~ 0.46: clip inactive
    ]
    ratios, clips = _run_lars_one_group(grad_steps, [W1], **cfg)
    assert [c[0] for c in clips] == [True, False, False]
    assert ratios[0][0] == 1.0
    assert 0 < ratios[1][0] < 1 and 0 < ratios[2][0] < 1


def test_lars_zero_norm_weight():
    cfg = dict(lr=0.5, momentum=0.9, weight_decay=0.05, trust_coefficient=0.02)
    ratios, _ = _run_lars_one_group(GRADS, [[0.0, 0.0, 0.0], W2], **cfg)
    assert ratios[0][0] == 1.0                       # ||w|| = 0 -> r = 1
    assert ratios[1][0] != 1.0 and ratios[2][0] != 1.0  # afterwards w != 0 and r is adaptive


def test_lars_zero_norm_grad():
    cfg = dict(lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02)
    # with ||g|| = 0 the formula would give eta / wd = 0.2, so r = 1 is a visible choice
    assert abs(cfg["trust_coefficient"] / cfg["weight_decay"] - 1.0) > 0.5
    grad_steps = [([0.0, 0.0, 0.0], [0.0, 0.0])] + GRADS[1:]
    ratios, _ = _run_lars_one_group(grad_steps, [W1, W2], **cfg)
    assert ratios[0] == [1.0, 1.0]
    assert all(r != 1.0 for step in ratios[1:] for r in step)


def test_lars_excluded_group_next_to_adapted_group():
    p_adapt, p_excl = _params(W1, W2)
    opt = fastlars.LARS(
        [
            {"params": [p_adapt]},
            {"params": [p_excl], "trust_ratio": False, "weight_decay": 0.02, "lr": 0.3},
        ],
        lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02, backend="reference",
    )
    cfg_adapt = dict(lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02)
    cfg_excl = dict(lr=0.3, momentum=0.9, weight_decay=0.02, trust_coefficient=0.02, trust_ratio=False)
    ws, states = [np.array(W1), np.array(W2)], [{}, {}]
    for g1, g2 in GRADS:
        _torch_step(opt, [p_adapt, p_excl], [g1, g2])
        w1, r1, _ = lars_np(ws[0], np.array(g1), states[0], **cfg_adapt)
        w2, r2, _ = lars_np(ws[1], np.array(g2), states[1], **cfg_excl)
        assert r1 < 0.5 and r2 == 1.0
        _check_weights([p_adapt, p_excl], [w1, w2], ws)
        ws = [w1, w2]


# ---------------------------------------------------------------------------
# LAMB


def _run_lamb(groups, grad_steps, max_grad_norm=0.0, **defaults):
    """groups: list of (values, group options); one parameter per group.

    Returns (ratios, clips, global norms) per step.
    """
    params = _params(*[values for values, _ in groups])
    opt = fastlars.LAMB(
        [{"params": [p], **opts} for p, (_, opts) in zip(params, groups)],
        max_grad_norm=max_grad_norm, backend="reference", **defaults,
    )
    ws = [np.array(values, dtype=np.float64) for values, _ in groups]
    states = [{} for _ in ws]
    ratios, clips, norms = [], [], []
    for grads in grad_steps:
        _torch_step(opt, params, grads)
        gs = [np.array(g, dtype=np.float64) for g in grads]
        divisor, global_norm = lamb_grad_divisor(gs, max_grad_norm)
        out = [lamb_np(w, g, st, grad_divisor=divisor, **{**defaults, **opts})
               for w, g, st, (_, opts) in zip(ws, gs, states, groups)]
        new_ws = [o[0] for o in out]
        ratios.append([o[1] for o in out])
        clips.append([o[2] for o in out])
        norms.append(global_norm)
        _check_weights(params, new_ws, ws)
        ws = new_ws
    return ratios, clips, norms


LAMB_CASES = {
    # all constructor defaults (lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    "default": dict(),
    "non_default_numbers": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
    "no_bias_correction": dict(lr=0.05, weight_decay=0.1, bias_correction=False),
    "no_grad_averaging": dict(lr=0.05, weight_decay=0.1, grad_averaging=False),
}


@pytest.mark.parametrize("case", sorted(LAMB_CASES))
def test_lamb_hand_computed(case):
    ratios, _, _ = _run_lamb([(W1, {}), (W2, {})], GRADS, **LAMB_CASES[case])
    for r1, r2 in ratios:  # genuinely adaptive: not 1, different per tensor
        assert abs(r1 - 1.0) > 1e-3 and abs(r2 - 1.0) > 1e-3 and abs(r1 - r2) > 1e-3


@pytest.mark.parametrize("flag", ["bias_correction", "grad_averaging"])
def test_lamb_flags_change_result(flag):
    """Guard against vacuous flag cases: the hand computation differs with the flag off."""
    cfg = dict(lr=0.05, weight_decay=0.1)
    st_a, st_b = {}, {}
    w_a = w_b = np.array(W1)
    for grads in GRADS:
        g = np.array(grads[0])
        w_a = lamb_np(w_a, g, st_a, **cfg)[0]
        w_b = lamb_np(w_b, g, st_b, **cfg, **{flag: False})[0]
    assert np.max(np.abs(w_a - w_b)) > 1e-4


MAX_GRAD_GRADS = [  # global norms about 3.7, 0.6, 1.6
    ([2.0, -1.5, 1.0], [2.5, 0.5]),
    ([-0.2, 0.35, 0.1], [0.15, 0.4]),
    ([0.5, 0.5, -1.2], [-0.9, 0.6]),
]


@pytest.mark.parametrize("active", [True, False], ids=["clipping", "not_clipping"])
def test_lamb_max_grad_norm_across_groups(active):
    max_grad_norm = 0.4 if active else 10.0
    groups = [(W1, {}), (W2, {"lr": 0.03, "weight_decay": 0.05})]
    cfg = dict(lr=0.05, weight_decay=0.1, eps=1e-2)
    _, _, norms = _run_lamb(groups, MAX_GRAD_GRADS, max_grad_norm=max_grad_norm, **cfg)
    if active:
        assert all(n > max_grad_norm for n in norms)
        # the clipping changes the hand-computed result (it does not cancel in m / sqrt(v))
        unclipped = [{}, {}]
        clipped = [{}, {}]
        w_u = w_c = np.array(W1)
        for grads in MAX_GRAD_GRADS:
            gs = [np.array(g) for g in grads]
            div, _ = lamb_grad_divisor(gs, max_grad_norm)
            w_u = lamb_np(w_u, gs[0], unclipped[0], **cfg)[0]
            w_c = lamb_np(w_c, gs[0], clipped[0], grad_divisor=div, **cfg)[0]
        assert np.max(np.abs(w_u - w_c)) > 1e-4
    else:
        assert all(0 < n < max_grad_norm for n in norms)


def test_lamb_trust_clip():
    # ||W_big|| ~ 5.4 > ||u|| (~ sqrt(3)): r clipped to 1; ||W_small|| ~ 0.22 < ||u||: not clipped
    w_big, w_small = [3.0, -4.0, 2.0], [0.1, -0.2]
    ratios, clips, _ = _run_lamb([(w_big, {}), (w_small, {})], GRADS, lr=0.05, weight_decay=0.1, trust_clip=True)
    assert [c for c, _ in clips] == [True, True, True]
    assert [c for _, c in clips] == [False, False, False]
    assert all(r1 == 1.0 and 0 < r2 < 1 for r1, r2 in ratios)


def test_lamb_zero_norm_weight():
    ratios, _, _ = _run_lamb([([0.0, 0.0, 0.0], {}), (W2, {})], GRADS, lr=0.05, weight_decay=0.1)
    assert ratios[0][0] == 1.0
    assert all(abs(r - 1.0) > 1e-3 for step in ratios[1:] for r in step)


def test_lamb_excluded_group_next_to_adapted_group():
    groups = [(W1, {}), (W2, {"trust_ratio": False, "weight_decay": 0.05, "lr": 0.02})]
    ratios, _, _ = _run_lamb(groups, GRADS, lr=0.05, weight_decay=0.1)
    for r_adapt, r_excl in ratios:
        assert abs(r_adapt - 1.0) > 1e-3 and r_excl == 1.0
