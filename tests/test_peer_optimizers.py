"""Sanity checks of the peer oracles in tests/peer_optimizers.py.

Each oracle is checked by one or two steps worked by hand here (the formulas written out
again, on two- or three-element tensors), by agreement with a second peer where the two
rules coincide (timm's Lars, installed; or another oracle), by a case where they must
differ, and by its state names, its checkpoint layout and the peer's own errors.
"""

import math

import pytest
import torch
from timm.optim import Lars as TimmLars

import peer_optimizers as peers

F64 = torch.float64


def _param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=F64))


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else torch.tensor(g, dtype=F64)


def _close(actual, expected, rel=1e-12):
    expected = torch.as_tensor(expected, dtype=F64)
    assert torch.allclose(actual.detach(), expected, rtol=rel, atol=1e-15), (actual, expected)


def _random_params(seed, shapes=((4, 3), (5,), (2, 2, 3))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=F64)) for s in shapes]


def _random_grads(seed, params):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=F64) for p in params]


def _lrs(n=20):
    """A changing lr: warm-up then decay, distinct at every step."""
    return [0.3 * (k + 1) / 5 if k < 5 else 0.3 * 0.9 ** (k - 4) for k in range(n)]


def _run(make_opt, params, steps=20, lrs=None, seed=100):
    """Steps an optimizer over the same gradient sequence; returns final params (cloned)."""
    opt = make_opt(params)
    lrs = lrs or _lrs(steps)
    for k in range(steps):
        for p, g in zip(params, _random_grads(seed + k, params)):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = lrs[k]
        opt.step()
    return [p.detach().clone() for p in params]


def _assert_params_equal(a, b, rel=1e-12):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=rel, atol=0), (x - y).abs().max()


def _assert_params_differ(a, b, rel=1e-6):
    assert any(not torch.allclose(x, y, rtol=rel, atol=0) for x, y in zip(a, b))


# --------------------------------------------------------------------------- apex LARC


def test_larc_two_steps_by_hand():
    w = _param([3.0, 4.0])  # ||w|| = 5
    opt = peers.ApexLARC(torch.optim.SGD([w], lr=0.5, momentum=0.9, weight_decay=0.1))
    _set_grads([w], [[0.6, 0.8]])  # ||g|| = 1
    opt.step()
    r1 = 0.02 * 5 / (1 + 0.1 * 5 + 1e-8)  # 0.0666..., below lr: clip keeps r1 / lr
    d1 = [(0.6 + 0.3) * r1 / 0.5, (0.8 + 0.4) * r1 / 0.5]
    w1 = [3 - 0.5 * d1[0], 4 - 0.5 * d1[1]]
    _close(w, w1)
    _close(w.grad, d1)  # apex edits p.grad in place
    assert opt.param_groups[0]["weight_decay"] == 0.1  # restored
    # second step, lr now below the ratio: clip gives min(r / lr, 1) = 1
    opt.param_groups[0]["lr"] = 0.01
    _set_grads([w], [[0.0, -2.0]])
    opt.step()
    n1 = math.hypot(*w1)
    r2 = 0.02 * n1 / (2 + 0.1 * n1 + 1e-8)
    assert r2 / 0.01 > 1
    d2 = [0.0 + 0.1 * w1[0], -2.0 + 0.1 * w1[1]]
    buf = [0.9 * d1[0] + d2[0], 0.9 * d1[1] + d2[1]]
    _close(w, [w1[0] - 0.01 * buf[0], w1[1] - 0.01 * buf[1]])


def test_larc_scale_mode_and_zero_norms():
    w, zero_w, zero_g = _param([3.0, 4.0]), _param([0.0, 0.0]), _param([1.0, 2.0])
    opt = peers.ApexLARC(torch.optim.SGD([w, zero_w, zero_g], lr=0.5, weight_decay=0.1), clip=False)
    _set_grads([w, zero_w, zero_g], [[0.6, 0.8], [1.0, -1.0], [0.0, 0.0]])
    opt.step()
    r = 0.02 * 5 / (1 + 0.5 + 1e-8)  # scale mode: lr * r
    _close(w, [3 - 0.5 * r * 0.9, 4 - 0.5 * r * 1.2])
    _close(zero_w, [-0.5, 0.5])  # zero weight: raw gradient, no adaptation
    _close(zero_g, [1.0, 2.0])  # zero gradient: no weight decay either


def test_larc_state_dict_is_the_inner_sgd():
    params = _random_params(0)
    opt = peers.ApexLARC(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4))
    for p, g in zip(params, _random_grads(1, params)):
        p.grad = g
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())
    assert sd["param_groups"][0]["weight_decay"] == 1e-4
    assert opt.state is opt.optim.state and opt.param_groups is opt.optim.param_groups


@pytest.mark.parametrize("clip", [True, False])
def test_larc_equals_timm_lars_with_always_adapt(clip):
    """timm's Lars is the LARC rule on torch SGD's momentum when it adapts every tensor."""
    def larc(ps):
        return peers.ApexLARC(torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4), clip=clip)

    def timm(ps):
        return TimmLars(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, trust_coeff=0.02, eps=1e-8,
                        trust_clip=clip, always_adapt=True)

    lrs = [lr * 0.1 for lr in _lrs()]  # lr around the ratio, so the clip switches
    _assert_params_equal(_run(larc, _random_params(3), lrs=lrs), _run(timm, _random_params(3), lrs=lrs))


# --------------------------------------------------------------------------- Barlow Twins / VICReg


def test_barlowtwins_two_steps_by_hand():
    w = _param([3.0, 4.0])
    opt = peers.BarlowTwinsLARS([w], lr=0.5, weight_decay=0.1)
    _set_grads([w], [[0.6, 0.8]])
    opt.step()
    d1 = [0.6 + 0.3, 0.8 + 0.4]  # ||d1|| = 1.5
    r1 = 0.001 * 5 / 1.5
    mu1 = [r1 * d1[0], r1 * d1[1]]  # mu from zeros: 0.9 * 0 + d
    w1 = [3 - 0.5 * mu1[0], 4 - 0.5 * mu1[1]]
    _close(w, w1)
    _close(opt.state[w]["mu"], mu1)
    _close(w.grad, [0.6, 0.8])  # p.grad untouched
    opt.param_groups[0]["lr"] = 0.2
    _set_grads([w], [[-1.0, 0.0]])
    opt.step()
    d2 = [-1.0 + 0.1 * w1[0], 0.1 * w1[1]]
    r2 = 0.001 * math.hypot(*w1) / math.hypot(*d2)
    mu2 = [0.9 * mu1[0] + r2 * d2[0], 0.9 * mu1[1] + r2 * d2[1]]
    _close(w, [w1[0] - 0.2 * mu2[0], w1[1] - 0.2 * mu2[1]])


def test_barlowtwins_zero_norm_still_decays():
    zero_g = _param([1.0, 2.0])
    opt = peers.BarlowTwinsLARS([zero_g], lr=0.5, weight_decay=0.1)
    _set_grads([zero_g], [[-0.1, -0.2]])  # g + wd * w = 0: ratio 1, nothing moves
    opt.step()
    _close(zero_g, [1.0, 2.0])
    _set_grads([zero_g], [[0.0, 0.0]])  # zero gradient: ||d|| = 0.1 * ||w|| > 0, adapts
    opt.step()
    _close(zero_g, [1.0 - 0.5 * 0.001 * 1.0, 2.0 - 0.5 * 0.001 * 2.0])


@pytest.mark.parametrize("filters", [True, peers._exclude_ndim_1, lambda p: p.ndim == 1])
def test_barlowtwins_filters_exclude_vectors(filters):
    """Barlow Twins' True and VICReg's callable both leave 1-D tensors as plain momentum SGD."""
    matrix, vector = _param([[3.0, 4.0]]), _param([3.0, 4.0])
    opt = peers.BarlowTwinsLARS([matrix, vector], lr=0.5, weight_decay=0.1,
                                weight_decay_filter=filters, lars_adaptation_filter=filters)
    _set_grads([matrix, vector], [[[0.6, 0.8]], [0.6, 0.8]])
    opt.step()
    _close(vector, [3 - 0.5 * 0.6, 4 - 0.5 * 0.8])
    r = 0.001 * 5 / 1.5
    _close(matrix, [[3 - 0.5 * r * 0.9, 4 - 0.5 * r * 1.2]])


def test_barlowtwins_vicreg_default_none_excludes_nothing():
    a = [_param([3.0, 4.0])]
    b = [_param([3.0, 4.0])]
    opt_none = peers.BarlowTwinsLARS(a, lr=0.5, weight_decay=0.1, weight_decay_filter=None,
                                     lars_adaptation_filter=None)
    opt_false = peers.BarlowTwinsLARS(b, lr=0.5, weight_decay=0.1)
    for ps, opt in ((a, opt_none), (b, opt_false)):
        _set_grads(ps, [[0.6, 0.8]])
        opt.step()
    _close(a[0], b[0].detach())
    _close(a[0], [3 - 0.5 * 0.001 * 5 / 1.5 * 0.9, 4 - 0.5 * 0.001 * 5 / 1.5 * 1.2])


def test_barlowtwins_equals_timm_lars_without_decay():
    """Without weight decay the two denominators (||g + wd w|| and ||g|| + wd ||w|| + eps) agree
    once timm's eps is 0, and mu from zeros equals torch SGD's first buffer = g."""
    def barlow(ps):
        return peers.BarlowTwinsLARS(ps, lr=0.1, weight_decay=0.0)

    def timm(ps):
        return TimmLars(ps, lr=0.1, momentum=0.9, weight_decay=0.0, eps=0.0, always_adapt=True)

    _assert_params_equal(_run(barlow, _random_params(4)), _run(timm, _random_params(4)))
    # with decay the ratio denominators differ: the oracles must tell them apart
    _assert_params_differ(
        _run(lambda ps: peers.BarlowTwinsLARS(ps, lr=0.1, weight_decay=0.05), _random_params(4)),
        _run(lambda ps: TimmLars(ps, lr=0.1, momentum=0.9, weight_decay=0.05, eps=0.0), _random_params(4)))


def test_barlowtwins_state_dict_layout():
    params = _random_params(5)
    opt = peers.BarlowTwinsLARS(params, lr=0.1, weight_decay=1e-6, weight_decay_filter=True,
                                lars_adaptation_filter=True)
    for p, g in zip(params, _random_grads(6, params)):
        p.grad = g
    opt.step()
    sd = opt.state_dict()
    assert all(set(s) == {"mu"} for s in sd["state"].values())
    assert set(sd["param_groups"][0]) == {"params", "lr", "weight_decay", "momentum", "eta",
                                          "weight_decay_filter", "lars_adaptation_filter"}
    fresh = peers.BarlowTwinsLARS(_random_params(5), lr=0.1)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["mu"], opt.state[params[0]]["mu"])


# --------------------------------------------------------------------------- SimCLR


def _named(*pairs):
    return [(name, _param(values)) for name, values in pairs]


def test_simclr_classic_two_steps_by_hand():
    named = _named(("conv/kernel", [3.0, 4.0]), ("conv/bias", [1.0, -1.0]))
    (_, w), (_, b) = named
    opt = peers.SimCLRLARS(named, lr=0.5, weight_decay=0.1, exclude_from_weight_decay=["bias"])
    assert opt.param_groups[0]["exclude_from_layer_adaptation"] == ["bias"]  # the fallback
    _set_grads([w, b], [[0.6, 0.8], [0.5, 0.5]])
    opt.step()
    d1 = [0.9, 1.2]
    r1 = 0.001 * 5 / 1.5
    v1 = [0.5 * r1 * d1[0], 0.5 * r1 * d1[1]]  # lr inside the slot, from zeros
    w1 = [3 - v1[0], 4 - v1[1]]
    _close(w, w1)
    _close(opt.state[w]["Momentum"], v1)
    _close(b, [1 - 0.5 * 0.5, -1 - 0.5 * 0.5])  # excluded: no decay, no ratio
    opt.param_groups[0]["lr"] = 0.2
    _set_grads([w, b], [[-1.0, 0.0], [0.0, 0.0]])
    opt.step()
    d2 = [-1.0 + 0.1 * w1[0], 0.1 * w1[1]]
    r2 = 0.001 * math.hypot(*w1) / math.hypot(*d2)
    v2 = [0.9 * v1[0] + 0.2 * r2 * d2[0], 0.9 * v1[1] + 0.2 * r2 * d2[1]]
    _close(w, [w1[0] - v2[0], w1[1] - v2[1]])
    _close(b, [0.75 - 0.9 * 0.25, -1.25 - 0.9 * 0.25])


def test_simclr_popular_momentum_and_nesterov_by_hand():
    named = _named(("dense/kernel", [3.0, 4.0]))
    w = named[0][1]
    opt = peers.SimCLRLARS(named, lr=0.5, weight_decay=0.1, classic_momentum=False, use_nesterov=True)
    _set_grads([w], [[0.6, 0.8]])
    opt.step()
    d = [0.9, 1.2]
    u = [0.9 * d[0] + d[0], 0.9 * d[1] + d[1]]  # v = d; u = m v + d
    r = 0.001 * 5 / math.hypot(*u)  # the ratio of the momentum update, not of d
    _close(w, [3 - 0.5 * r * u[0], 4 - 0.5 * r * u[1]])
    _close(opt.state[w]["Momentum"], d)

    named = _named(("dense/kernel", [3.0, 4.0]))
    w = named[0][1]
    opt = peers.SimCLRLARS(named, lr=0.5, weight_decay=0.1, use_nesterov=True)
    _set_grads([w], [[0.6, 0.8]])
    opt.step()
    r = 0.001 * 5 / 1.5
    v = [0.5 * r * d[0], 0.5 * r * d[1]]
    _close(w, [3 - (0.9 * v[0] + 0.5 * r * d[0]), 4 - (0.9 * v[1] + 0.5 * r * d[1])])


def test_simclr_separate_adaptation_list_and_zero_decay_flag():
    named = _named(("bn/gamma", [3.0, 4.0]), ("fc/bias", [3.0, 4.0]))
    (_, gamma), (_, bias) = named
    opt = peers.SimCLRLARS(named, lr=0.5, weight_decay=0.1, exclude_from_weight_decay=["bias"],
                           exclude_from_layer_adaptation=["^bn/"])
    _set_grads([gamma, bias], [[0.6, 0.8], [0.6, 0.8]])
    opt.step()
    _close(gamma, [3 - 0.5 * 0.9, 4 - 0.5 * 1.2])  # decayed, not adapted
    r = 0.001 * 5 / 1.0
    _close(bias, [3 - 0.5 * r * 0.6, 4 - 0.5 * r * 0.8])  # adapted, not decayed


def test_simclr_classic_equals_lr_outside_form_only_at_constant_lr():
    """At a constant lr, v = lr * mu: SimCLR's classic momentum is Barlow Twins' rule."""
    def named(ps):
        return [(f"layer{i}/kernel", p) for i, p in enumerate(ps)]

    def simclr(ps):
        return peers.SimCLRLARS(named(ps), lr=0.1, weight_decay=1e-3)

    def barlow(ps):
        return peers.BarlowTwinsLARS(ps, lr=0.1, weight_decay=1e-3)

    constant = [0.25] * 20
    _assert_params_equal(_run(simclr, _random_params(7), lrs=constant),
                         _run(barlow, _random_params(7), lrs=constant))
    _assert_params_differ(_run(simclr, _random_params(7)), _run(barlow, _random_params(7)))


def _named_state_dict_after_a_step(peer_cls, seed):
    """The state_dict of a name-taking peer (parameters named "0", "1", ...) after one step."""
    params = _random_params(seed)
    opt = peer_cls([(str(i), p) for i, p in enumerate(params)], lr=0.1)
    for p, g in zip(params, _random_grads(seed + 1, params)):
        p.grad = g
    opt.step()
    return opt.state_dict()


def test_simclr_needs_names_and_keeps_the_slot_name():
    with pytest.raises(ValueError, match="named_params"):
        peers.SimCLRLARS(_random_params(8), lr=0.1)
    sd = _named_state_dict_after_a_step(peers.SimCLRLARS, 8)
    assert all(set(s) == {"Momentum"} for s in sd["state"].values())
    assert sd["param_groups"][0]["param_names"] == ["0", "1", "2"]


# --------------------------------------------------------------------------- MLPerf TF2


def test_mlperf_two_steps_by_hand_with_the_keras_epsilon():
    named = _named(("conv2d/kernel:0", [3.0, 4.0]), ("batch_normalization/gamma:0", [1.0, 2.0]))
    (_, w), (_, gamma) = named
    opt = peers.MLPerfLARS(named, lr=0.5, weight_decay=0.1, skip_list=["batch_normalization", "bias"])
    assert opt.param_groups[0]["epsilon"] == 1e-7  # epsilon=0.0 becomes the Keras default
    _set_grads([w, gamma], [[0.6, 0.8], [0.5, 0.5]])
    opt.step()
    r1 = 0.001 * 5 / (1 + 0.1 * 5 + 1e-7)  # raw-gradient norms, eps
    d1 = [0.9, 1.2]
    m1 = [-0.5 * r1 * d1[0], -0.5 * r1 * d1[1]]  # negative velocity
    w1 = [3 + m1[0], 4 + m1[1]]
    _close(w, w1)
    _close(opt.state[w]["momentum"], m1)
    _close(gamma, [1 - 0.25, 2 - 0.25])  # skipped: plain momentum SGD, no decay
    opt.param_groups[0]["lr"] = 0.2
    _set_grads([w, gamma], [[-1.0, 0.0], [0.0, 0.0]])
    opt.step()
    n1 = math.hypot(*w1)
    r2 = 0.001 * n1 / (1 + 0.1 * n1 + 1e-7)
    d2 = [-1.0 + 0.1 * w1[0], 0.1 * w1[1]]
    m2 = [0.9 * m1[0] - 0.2 * r2 * d2[0], 0.9 * m1[1] - 0.2 * r2 * d2[1]]
    _close(w, [w1[0] + m2[0], w1[1] + m2[1]])
    _close(gamma, [0.75 - 0.9 * 0.25, 1.75 - 0.9 * 0.25])


def test_mlperf_nesterov_epsilon_and_zero_gradient_by_hand():
    named = _named(("kernel", [3.0, 4.0]), ("zero_grad", [1.0, 2.0]))
    (_, w), (_, z) = named
    opt = peers.MLPerfLARS(named, lr=0.5, weight_decay=0.1, epsilon=0.25, use_nesterov=True)
    _set_grads([w, z], [[0.6, 0.8], [0.0, 0.0]])
    opt.step()
    r = 0.001 * 5 / (1 + 0.5 + 0.25)
    d = [0.9, 1.2]
    m = [-0.5 * r * d[0], -0.5 * r * d[1]]
    _close(w, [3 + 0.9 * m[0] - 0.5 * r * d[0], 4 + 0.9 * m[1] - 0.5 * r * d[1]])
    # zero gradient: ratio 1, weight decay still applied at the full lr
    _close(z, [1 - 1.9 * 0.5 * 0.1 * 1, 2 - 1.9 * 0.5 * 0.1 * 2])


@pytest.mark.parametrize("nesterov", [False, True])
def test_mlperf_equals_timm_lars_only_at_constant_lr(nesterov):
    """At a constant lr the negative velocity is -lr times torch SGD's buffer."""
    def named(ps):
        return [(f"layer{i}/kernel:0", p) for i, p in enumerate(ps)]

    def mlperf(ps):
        return peers.MLPerfLARS(named(ps), lr=0.1, weight_decay=5e-4, use_nesterov=nesterov)

    def timm(ps):
        return TimmLars(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, eps=1e-7, nesterov=nesterov)

    constant = [0.25] * 20
    _assert_params_equal(_run(mlperf, _random_params(10), lrs=constant),
                         _run(timm, _random_params(10), lrs=constant))
    _assert_params_differ(_run(mlperf, _random_params(10)), _run(timm, _random_params(10)))


def test_mlperf_errors_and_state_layout():
    with pytest.raises(ValueError, match="momentum should be positive"):
        peers.MLPerfLARS([("w", _param([1.0]))], lr=0.1, momentum=-0.1)
    with pytest.raises(ValueError, match="weight_decay should be positive"):
        peers.MLPerfLARS([("w", _param([1.0]))], lr=0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="named_params"):
        peers.MLPerfLARS(_random_params(11), lr=0.1)
    sd = _named_state_dict_after_a_step(peers.MLPerfLARS, 11)
    assert all(set(s) == {"momentum"} for s in sd["state"].values())
    assert {"param_names", "epsilon", "skip_list", "eeta"} <= set(sd["param_groups"][0])


# --------------------------------------------------------------------------- apex FusedLAMB


def test_apex_lamb_two_steps_by_hand():
    w = _param([3.0, 4.0])
    opt = peers.ApexFusedLAMB([w], lr=0.1)  # wd 0.01, eps 1e-6, max_grad_norm 1.0
    _set_grads([w], [[0.6, 0.8]])  # G = 1: not above 1, no clipping
    opt.step()
    u1 = [0.6 / (0.6 + 1e-6) + 0.03, 0.8 / (0.8 + 1e-6) + 0.04]  # m_hat = g, sqrt(v_hat) = |g|
    r1 = 5 / math.hypot(*u1)
    w1 = [3 - 0.1 * r1 * u1[0], 4 - 0.1 * r1 * u1[1]]
    _close(w, w1)
    _close(w.grad, u1)  # stage 1 writes the update into p.grad
    assert opt.param_groups[0]["step"] == 1
    opt.param_groups[0]["lr"] = 0.05
    _set_grads([w], [[-3.0, 0.0]])  # G = 3 > 1: divided by 3
    opt.step()
    s = [-1.0, 0.0]
    m = [0.9 * 0.06 + 0.1 * s[0], 0.9 * 0.08]
    v = [0.999 * 0.001 * 0.36 + 0.001 * 1.0, 0.999 * 0.001 * 0.64]
    bc1, bc2 = 1 - 0.9**2, 1 - 0.999**2
    u2 = [(m[i] / bc1) / (math.sqrt(v[i] / bc2) + 1e-6) + 0.01 * w1[i] for i in range(2)]
    r2 = math.hypot(*w1) / math.hypot(*u2)
    _close(w, [w1[i] - 0.05 * r2 * u2[i] for i in range(2)])
    _close(opt.state[w]["exp_avg"], m)
    _close(opt.state[w]["exp_avg_sq"], v)


def test_apex_lamb_global_clipping_reads_the_defaults_only():
    """Two groups share one G; a group's own max_grad_norm is ignored. A large eps makes the
    first step depend on the gradient's scale."""
    a, b = _param([3.0, 0.0]), _param([0.0, 4.0])
    opt = peers.ApexFusedLAMB([{"params": [a]}, {"params": [b], "max_grad_norm": 100.0}],
                              lr=0.1, eps=0.5, weight_decay=0.0, max_grad_norm=2.5)
    _set_grads([a, b], [[3.0, 0.0], [0.0, 4.0]])  # G = 5: divided by 2
    opt.step()
    _close(a, [3 - 0.1 * 1.5 / (1.5 + 0.5), 0.0])  # no decay: ratio 1, lr * u
    _close(b, [0.0, 4 - 0.1 * 2.0 / (2.0 + 0.5)])


def test_apex_lamb_max_grad_norm_zero_throws_the_gradient_away():
    w, still = _param([3.0, 4.0]), _param([1.0, 1.0])
    opt = peers.ApexFusedLAMB([w, still], lr=0.1, max_grad_norm=0.0)
    _set_grads([w, still], [[0.6, 0.8], [0.0, 0.0]])
    opt.step()
    # g / inf = 0: m = v = 0, u = wd * w, ratio = 1 / wd: w <- (1 - lr) w
    _close(w, [2.7, 3.6])
    _close(opt.state[w]["exp_avg"], [0.0, 0.0])
    _close(still, [0.9, 0.9])
    # G = 0 is not above 0: no division, and a zero gradient decays as before
    _set_grads([w, still], [[0.0, 0.0], [0.0, 0.0]])
    opt.step()
    _close(still, [0.81, 0.81])


def test_apex_lamb_l2_mode_nvlamb_and_no_grad_averaging():
    w = _param([3.0, 4.0])
    opt = peers.ApexFusedLAMB([w], lr=0.1, weight_decay=0.1, adam_w_mode=False, grad_averaging=False,
                              eps=0.5, max_grad_norm=10.0)
    _set_grads([w], [[0.6, 0.8]])
    opt.step()
    s = [0.6 + 0.3, 0.8 + 0.4]  # L2: decay enters the moments
    u = [(s[i] / 0.1) / (abs(s[i]) + 0.5) for i in range(2)]  # beta3 = 1: m = s, m_hat = s / 0.1
    r = 5 / math.hypot(*u)
    _close(w, [3 - 0.1 * r * u[0], 4 - 0.1 * r * u[1]])
    _close(opt.state[w]["exp_avg"], s)

    a, b = _param([3.0, 4.0]), _param([3.0, 4.0])
    plain = peers.ApexFusedLAMB([a], lr=0.1, weight_decay=0.0)
    nvlamb = peers.ApexFusedLAMB([b], lr=0.1, weight_decay=0.0, use_nvlamb=True)
    for p, opt in ((a, plain), (b, nvlamb)):
        _set_grads([p], [[0.6, 0.8]])
        opt.step()
    u = [0.6 / (0.6 + 1e-6), 0.8 / (0.8 + 1e-6)]
    _close(a, [3 - 0.1 * u[0], 4 - 0.1 * u[1]])  # no decay, no nvlamb: no ratio
    r = 5 / math.hypot(*u)
    _close(b, [3 - 0.1 * r * u[0], 4 - 0.1 * r * u[1]])


def test_apex_lamb_step_per_group_layout_and_amsgrad():
    with pytest.raises(RuntimeError, match="AMSGrad"):
        peers.ApexFusedLAMB(_random_params(13), amsgrad=True)
    params = _random_params(13)
    opt = peers.ApexFusedLAMB([{"params": params[:2]}, {"params": params[2:]}], adam_w_mode=False)
    for p, g in zip(params[:2], _random_grads(14, params)):
        p.grad = g
    opt.step()  # the second group has no gradient, and still counts a step
    sd = opt.state_dict()
    assert [g["step"] for g in sd["param_groups"]] == [1, 1]
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} for s in sd["state"].values())
    assert set(sd["param_groups"][0]) == {"params", "lr", "bias_correction", "betas", "eps",
                                          "weight_decay", "grad_averaging", "max_grad_norm", "step"}
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("wd, nvlamb", [(0.01, False), (0.0, True), (0.0, False)])
def test_apex_lamb_equals_timm_lamb(wd, nvlamb):
    """timm's Lamb (decoupled_decay=False) is apex's adam_w_mode rule; use_nvlamb is always_adapt."""
    def apex(ps):
        return peers.ApexFusedLAMB(ps, lr=0.01, weight_decay=wd, max_grad_norm=5.3, use_nvlamb=nvlamb)

    def timm(ps):
        from timm.optim import Lamb
        return Lamb(ps, lr=0.01, weight_decay=wd, max_grad_norm=5.3, always_adapt=nvlamb)

    _assert_params_equal(_run(apex, _random_params(15)), _run(timm, _random_params(15)), rel=1e-11)


# --------------------------------------------------------------------------- DeepSpeed FusedLamb


def test_deepspeed_lamb_two_steps_by_hand():
    w = _param([3.0, 4.0])
    opt = peers.DeepSpeedFusedLamb([w], lr=0.1, weight_decay=0.01)
    _set_grads([w], [[0.6, 0.8]])
    opt.step()
    m = [0.06, 0.08]
    v = [0.001 * 0.36, 0.001 * 0.64]
    u1 = [m[i] / (math.sqrt(v[i]) + 1e-8) + 0.01 * [3.0, 4.0][i] for i in range(2)]  # uncorrected
    c1 = min(max(5 / math.hypot(*u1), 0.01), 10.0)
    step_size = 0.1 * math.sqrt(1 - 0.999) / (1 - 0.9)
    w1 = [[3.0, 4.0][i] - step_size * c1 * u1[i] for i in range(2)]
    _close(w, w1)
    assert opt.state[w]["step"] == 1
    assert opt.get_lamb_coeffs() == pytest.approx([c1], rel=1e-12)
    _close(w.grad, [0.6, 0.8])  # p.grad untouched
    opt.param_groups[0]["lr"] = 0.05
    _set_grads([w], [[-1.0, 0.0]])
    opt.step()
    m = [0.9 * m[0] - 0.1, 0.9 * m[1]]
    v = [0.999 * v[0] + 0.001, 0.999 * v[1]]
    u2 = [m[i] / (math.sqrt(v[i]) + 1e-8) + 0.01 * w1[i] for i in range(2)]
    c2 = min(max(math.hypot(*w1) / math.hypot(*u2), 0.01), 10.0)
    step_size = 0.05 * math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    _close(w, [w1[i] - step_size * c2 * u2[i] for i in range(2)])


def test_deepspeed_lamb_coefficient_bounds_and_zero_norm():
    tiny, huge, zero = _param([3e-4, 4e-4]), _param([3e4, 4e4]), _param([0.0, 0.0])
    opt = peers.DeepSpeedFusedLamb([tiny, huge, zero], lr=0.1, bias_correction=False, eps=1e-8)
    _set_grads([tiny, huge, zero], [[0.6, 0.8], [0.6, 0.8], [0.6, 0.8]])
    opt.step()
    u = [0.06 / (math.sqrt(0.001 * 0.36) + 1e-8), 0.08 / (math.sqrt(0.001 * 0.64) + 1e-8)]
    _close(tiny, [3e-4 - 0.1 * 0.01 * u[0], 4e-4 - 0.1 * 0.01 * u[1]])  # min_coeff
    _close(huge, [3e4 - 0.1 * 10.0 * u[0], 4e4 - 0.1 * 10.0 * u[1]])  # max_coeff
    _close(zero, [-0.1 * u[0], -0.1 * u[1]])  # zero weight: coefficient exactly 1, unclamped
    assert opt.get_lamb_coeffs() == pytest.approx([0.01, 10.0, 1.0], rel=1e-12)


def test_deepspeed_lamb_clipping_from_the_callers_norms_and_eps_inside_sqrt():
    w, x = _param([3.0, 4.0]), _param([1.0, 1.0])
    opt = peers.DeepSpeedFusedLamb([w, x], lr=0.1, max_grad_norm=1.0, eps=0.25, eps_inside_sqrt=True)
    _set_grads([w, x], [[0.6, 0.8], [2.0, 0.0]])
    norms = peers.deepspeed_grad_norms_arg(opt.param_groups, 4.0)
    assert norms == [[4.0, 4.0]]
    opt.step(scale=2.0, grad_norms=norms)
    combined = 2.0 * ((4.0 / 2.0) + 1e-6) / 1.0
    _close(opt.state[w]["exp_avg"], [0.1 * 0.6 / combined, 0.1 * 0.8 / combined])
    s = [2.0 / combined, 0.0]
    u = [0.1 * s[i] / math.sqrt(0.001 * s[i] ** 2 + 0.25) for i in range(2)]  # eps inside
    c = min(max(math.sqrt(2) / math.hypot(*u), 0.01), 10.0)
    _close(x, [1 - 0.1 * math.sqrt(0.001) / 0.1 * c * u[0], 1.0])
    # a norm below max_grad_norm: clip = (n / scale + 1e-6) / max <= 1, only the loss scale divides
    opt2 = peers.DeepSpeedFusedLamb([_param([1.0])], max_grad_norm=1.0)
    opt2.param_groups[0]["params"][0].grad = torch.tensor([3.0], dtype=F64)
    opt2.step(scale=3.0, grad_norms=[[1.5]])
    _close(opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"], [0.1])


def test_deepspeed_lamb_bare_group_norm_steps_only_the_first_parameter():
    a, b = _param([3.0, 4.0]), _param([3.0, 4.0])
    opt = peers.DeepSpeedFusedLamb([a, b], max_grad_norm=1.0)
    _set_grads([a, b], [[0.6, 0.8], [0.6, 0.8]])
    opt.step(grad_norms=[1.0])  # the peer zips [1.0] with the group's parameters
    assert not torch.equal(a.detach(), torch.tensor([3.0, 4.0], dtype=F64))
    assert torch.equal(b.detach(), torch.tensor([3.0, 4.0], dtype=F64)) and b not in opt.state
    with pytest.raises(TypeError):  # clipping on, no norms passed: None / scale, as the peer
        opt.step()


def test_deepspeed_lamb_explicit_grads_per_param_step_layout_and_amsgrad():
    with pytest.raises(RuntimeError, match="AMSGrad"):
        peers.DeepSpeedFusedLamb(_random_params(16), amsgrad=True)
    params = _random_params(16)
    opt = peers.DeepSpeedFusedLamb(params)
    grads = _random_grads(17, params)
    opt.step(grads=[g for g in grads[:2]] + [None])  # one flat list = one group; p.grad unused
    assert [opt.state[p]["step"] for p in params[:2]] == [1, 1] and params[2] not in opt.state
    sd = opt.state_dict()
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in sd["state"].values())
    assert "step" not in sd["param_groups"][0]
    assert set(sd["param_groups"][0]) == {"params", "lr", "bias_correction", "betas", "eps",
                                          "weight_decay", "max_grad_norm", "max_coeff", "min_coeff"}


def test_deepspeed_norm_helpers():
    a, b, c = _param([1.0, 1.0]), _param([0.0]), _param([2.0])
    _set_grads([a, b, c], [[3.0, 4.0], None, [12.0]])
    groups = [{"params": [a, b]}, {"params": [c]}]
    assert peers.deepspeed_group_grad_norms(groups) == pytest.approx([5.0, 12.0])
    assert peers.deepspeed_global_grad_norm(groups) == pytest.approx(13.0)
    c.grad = torch.tensor([math.inf], dtype=F64)
    assert peers.deepspeed_group_grad_norms(groups)[1] == -1


def test_deepspeed_lamb_equals_apex_without_bias_correction_or_bounds():
    """With no bias correction, no clipping and unbounded coefficients, DeepSpeed's rule is
    apex's adam_w_mode rule with use_nvlamb; the bias correction is where they part."""
    def deepspeed(bias_correction):
        return lambda ps: peers.DeepSpeedFusedLamb(ps, lr=0.01, bias_correction=bias_correction, eps=1e-6,
                                                   weight_decay=0.01, max_coeff=1e30, min_coeff=0.0)

    def apex(bias_correction):
        return lambda ps: peers.ApexFusedLAMB(ps, lr=0.01, bias_correction=bias_correction,
                                              max_grad_norm=1e30, use_nvlamb=True)

    _assert_params_equal(_run(deepspeed(False), _random_params(18)), _run(apex(False), _random_params(18)))
    _assert_params_differ(_run(deepspeed(True), _random_params(18)), _run(apex(True), _random_params(18)))


# --------------------------------------------------------------------------- checkpoints


def _named_list(ps):
    return [(f"layer{i}/kernel", p) for i, p in enumerate(ps)]


CONSTRUCTORS = {
    "ApexLARC": lambda ps: peers.ApexLARC(torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "BarlowTwinsLARS": lambda ps: peers.BarlowTwinsLARS(ps, lr=0.1, weight_decay=5e-4),
    "SimCLRLARS": lambda ps: peers.SimCLRLARS(_named_list(ps), lr=0.1, weight_decay=5e-4,
                                              classic_momentum=False),
    "MLPerfLARS": lambda ps: peers.MLPerfLARS(_named_list(ps), lr=0.1, use_nesterov=True),
    "ApexFusedLAMB": lambda ps: peers.ApexFusedLAMB(ps, lr=0.01, max_grad_norm=5.3),
    "DeepSpeedFusedLamb": lambda ps: peers.DeepSpeedFusedLamb(ps, lr=0.01, weight_decay=0.01),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_state_dict_round_trip_resumes_exactly(name):
    """Ten steps, a state_dict into a fresh optimizer, ten more: bit-equal to twenty in one go."""
    make = CONSTRUCTORS[name]
    straight = _run(make, _random_params(19), steps=20)
    params = _random_params(19)
    first = make(params)
    lrs = _lrs(20)
    for k in range(10):
        for p, g in zip(params, _random_grads(100 + k, params)):
            p.grad = g
        for group in first.param_groups:
            group["lr"] = lrs[k]
        first.step()
    saved = first.state_dict()
    second = make(params)
    second.load_state_dict(saved)
    for k in range(10, 20):
        for p, g in zip(params, _random_grads(100 + k, params)):
            p.grad = g
        for group in second.param_groups:
            group["lr"] = lrs[k]
        second.step()
    for x, y in zip(params, straight):
        assert torch.equal(x.detach(), y)


def test_deepspeed_combined_scale():
    assert peers.deepspeed_combined_scale(4.0, 2.0, 1.0) == pytest.approx(2.0 * (2.0 + 1e-6))
    assert peers.deepspeed_combined_scale(1.5, 3.0, 1.0) == 3.0  # (0.5 + 1e-6) / 1 <= 1
    # at scale 1, the fp32 engine's clip_grad_norm_: multiply by min(1, max / (norm + 1e-6))
    assert 1 / peers.deepspeed_combined_scale(7.0, 1.0, 2.0) == pytest.approx(2.0 / (7.0 + 1e-6), rel=1e-15)
