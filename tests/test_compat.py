"""fastlars.compat against the peers it reproduces: each constructor's updates equal the
peer's own rule to 1e-10 relative in float64 over 20 steps with a changing lr, on every
CPU-testable backend, and a peer's checkpoint resumes on the peer's trajectory.

The peers: timm's ``Lars``/``Lamb`` themselves (installed with the dev extras); the others
(apex LARC and FusedLAMB, Barlow Twins/VICReg, SimCLR, MLPerf, DeepSpeed) through the
transcriptions of their published rules in tests/peer_optimizers.py, each citing its
source. The model has a weight that starts at zero (the zero-norm branch), a parameter
whose gradient is exactly zero, 1-D parameters (excluded by the usual groups) and no
bias feeding a normalisation (whose gradient is rounding noise, see peer_optimizers).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastlars
from conftest import backend_params
from fastlars import compat

BACKENDS = ["reference", "foreach", "cpu", "triton"]
STEPS = 20
RTOL = 1e-10


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(7, 11)
        self.head = nn.Linear(11, 3)
        self.gate = nn.Parameter(torch.zeros(3, 11))   # starts with norm 0
        self.unused = nn.Parameter(torch.randn(5, 2))  # its gradient is exactly 0 (decayed: 2-D)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        h = torch.tanh(self.encoder(x))
        out = self.head(h) + h @ self.gate.t()
        return out * self.scale + 0.0 * self.unused.sum()


def _data(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(17, 7, generator=g, dtype=torch.float64), torch.randn(17, 3, generator=g, dtype=torch.float64)


def _lr(base: float, step: int) -> float:
    """A changing lr (warmup, then a wobble): lr-inside-momentum rules differ from lr-outside only then."""
    return base * min(1.0, (step + 1) / 5) * (1.0 + 0.3 * math.sin(step))


def _models():
    torch.manual_seed(0)
    peer_model = Net().double()
    return peer_model, copy.deepcopy(peer_model)


def _groups(model: nn.Module, weight_decay: float, named: bool = False):
    """timm's param_groups_weight_decay split: 1-D parameters get no decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append((name, p) if named else p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _param_groups_of(opt):
    return opt.optim.param_groups if hasattr(opt, "optim") else opt.param_groups


def _train(model, opt, steps, base_lr, start=0, step_fn=None):
    for k in range(start, start + steps):
        x, y = _data(k)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for group in _param_groups_of(opt):
            group["lr"] = _lr(base_lr, k)
        (step_fn or (lambda o: o.step()))(opt)


def _assert_equal_params(ours: nn.Module, peer: nn.Module, rtol: float = RTOL):
    for (name, a), b in zip(ours.named_parameters(), peer.parameters()):
        err = (a - b).norm().item()
        assert err <= rtol * max(b.norm().item(), 1e-12), f"{name}: |ours - peer| = {err:.3e}, |peer| = {b.norm():.3e}"


# -- the cases: (peer factory, compat factory, base lr), each taking a model ------------------

def _timm():
    timm_optim = pytest.importorskip("timm.optim")
    return timm_optim.Lars, timm_optim.Lamb


TIMM_LARS = {
    "default": dict(momentum=0.9, weight_decay=1e-3),
    "trust_clip": dict(momentum=0.9, weight_decay=1e-3, trust_clip=True),
    "nesterov_dampless": dict(momentum=0.8, weight_decay=1e-3, nesterov=True, trust_coeff=0.01),
    "always_adapt_dampening": dict(momentum=0.9, dampening=0.3, weight_decay=1e-3, always_adapt=True, eps=1e-6),
    "no_momentum": dict(weight_decay=5e-3),
}
TIMM_LAMB = {
    "default": dict(weight_decay=0.01),
    "always_adapt_clip": dict(weight_decay=0.01, always_adapt=True, trust_clip=True, max_grad_norm=0.05),
    "no_clipping": dict(weight_decay=0.02, max_grad_norm=None, grad_averaging=False),
    "no_bias_correction": dict(weight_decay=0.01, bias_correction=False, betas=(0.8, 0.99), eps=1e-8),
    "decoupled_decay": dict(weight_decay=0.05, decoupled_decay=True, always_adapt=True),
}


# (timm class index in _timm(), compat constructor, cases, lr given to the constructors, base lr of the schedule)
TIMM = {"lars": (0, compat.timm_lars, TIMM_LARS, 1.0, 0.5), "lamb": (1, compat.timm_lamb, TIMM_LAMB, 0.01, 0.02)}


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("kind, case", [(k, c) for k in TIMM for c in sorted(TIMM[k][2])])
def test_timm_equals_timm(kind, case, backend):
    index, make, cases, lr, base_lr = TIMM[kind]
    peer_cls = _timm()[index]
    args = cases[case]
    peer_model, model = _models()
    peer = peer_cls(_groups(peer_model, args["weight_decay"]), lr=lr, **args)
    ours = make(_groups(model, args["weight_decay"]), lr=lr, backend=backend, **args)
    _train(peer_model, peer, STEPS, base_lr)
    _train(model, ours, STEPS, base_lr)
    _assert_equal_params(model, peer_model)


@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
def test_timm_checkpoints_resume_on_the_peers_trajectory(backend):
    """Step timm's optimizer, save, load into the compat optimizer, continue: equal to timm
    continuing. Lamb keeps ``step`` per group, which becomes fastlars's per-tensor step."""
    Lars, Lamb = _timm()
    for peer_cls, make, args, lr in ((Lars, compat.timm_lars, TIMM_LARS["nesterov_dampless"], 0.5),
                                     (Lamb, compat.timm_lamb, TIMM_LAMB["default"], 0.02)):
        peer_model, _ = _models()
        peer = peer_cls(_groups(peer_model, args["weight_decay"]), lr=lr, **args)
        _train(peer_model, peer, 7, lr)
        saved = copy.deepcopy(peer.state_dict())
        model = copy.deepcopy(peer_model)
        ours = make(_groups(model, args["weight_decay"]), lr=lr, backend=backend, **args)
        compat.load_peer_state_dict(ours, saved)
        assert ours.param_groups[1]["lr"] == saved["param_groups"][1]["lr"]
        _train(peer_model, peer, 8, lr, start=7)
        _train(model, ours, 8, lr, start=7)
        _assert_equal_params(model, peer_model)


def test_register_timm_builds_fastlars_optimizers():
    timm_optim = pytest.importorskip("timm.optim")
    names = compat.register_timm()
    assert compat.register_timm() == names  # again: nothing changes
    model = Net().double()
    opt = timm_optim.create_optimizer_v2(model, "fastlars_lars", lr=0.1, weight_decay=1e-4, trust_coeff=0.01,
                                         backend="foreach")
    assert isinstance(opt, fastlars.LARS) and opt.backend == "foreach"
    decayed = [g for g in opt.param_groups if g["weight_decay"] != 0]
    assert decayed and decayed[0]["trust_coefficient"] == 0.01 and decayed[0]["momentum"] == 0.9
    assert all(g["adapt_only_decayed"] for g in opt.param_groups)  # timm's rule: adapt where decay != 0
    lamb = timm_optim.create_optimizer_v2(model, "fastlars_lambc", lr=1e-3, weight_decay=0.01)
    assert isinstance(lamb, fastlars.LAMB) and lamb.param_groups[0]["trust_clip"] is True
    # timm's own names still build timm's optimizers
    assert isinstance(timm_optim.create_optimizer_v2(model, "lars", lr=0.1), timm_optim.Lars)
    assert isinstance(timm_optim.create_optimizer_v2(model, "lookahead_fastlars_nlars", lr=0.1)._base_optimizer,
                      fastlars.LARS)


def test_timm_equal_on_a_create_optimizer_v2_run():
    """create_optimizer_v2(model, "fastlars_lamb") trains as create_optimizer_v2(model, "lamb")."""
    timm_optim = pytest.importorskip("timm.optim")
    compat.register_timm()
    peer_model, model = _models()
    peer = timm_optim.create_optimizer_v2(peer_model, "lamb", lr=0.01, weight_decay=0.01)
    ours = timm_optim.create_optimizer_v2(model, "fastlars_lamb", lr=0.01, weight_decay=0.01, backend="cpu")
    _train(peer_model, peer, STEPS, 0.02)
    _train(model, ours, STEPS, 0.02)
    _assert_equal_params(model, peer_model)


# -- arguments a peer accepts but fastlars does not reproduce ----------------------------

@pytest.mark.parametrize("make, kwargs, name", [
    (compat.timm_lamb, dict(max_grad_norm=0.0), "max_grad_norm"),
    (compat.timm_lamb, dict(caution=True), "caution"),
    (compat.timm_lamb, dict(corrected_weight_decay=True), "corrected_weight_decay"),
    (compat.apex_fused_lamb, dict(amsgrad=True), "amsgrad"),
    (compat.apex_fused_lamb, dict(max_grad_norm=0.0), "max_grad_norm"),
    (compat.deepspeed_lamb, dict(amsgrad=True), "amsgrad"),
])
def test_unreproduced_peer_arguments_are_refused(make, kwargs, name):
    model = Net()
    with pytest.raises(ValueError, match=name):
        make(model.parameters(), **kwargs)


def test_fastlars_names_of_peer_options_are_refused():
    """A compat constructor takes the peer's names: fastlars's own name for the same
    option is an error, not a silent second value."""
    with pytest.raises(TypeError, match="trust_coefficient"):
        compat.timm_lars(Net().parameters(), trust_coefficient=0.01)


def test_name_rules_need_names():
    with pytest.raises(ValueError, match="named_parameters"):
        compat.simclr_lars(Net().parameters(), lr=0.1, weight_decay=1e-4, exclude_from_weight_decay=["bias"])
    with pytest.raises(ValueError, match="named_parameters"):
        compat.mlperf_lars(Net().parameters(), lr=0.1, skip_list=["bias"])


def test_load_peer_state_dict_needs_a_compat_optimizer():
    with pytest.raises(ValueError, match="compat constructor"):
        compat.load_peer_state_dict(fastlars.LARS(Net().parameters()), {"state": {}, "param_groups": []})


# -- the transcribed peers (tests/peer_optimizers.py) -----------------------------------

peers = pytest.importorskip("peer_optimizers")


def _exclude_1d(p):
    return p.ndim == 1


def _deepspeed_step(opt):
    """DeepSpeed's FusedLamb clips with the norm its caller passes: the global norm, as the
    engine computes it (fastlars.compat.deepspeed_lamb computes the same norm itself)."""
    if opt.defaults["max_grad_norm"] > 0:
        norm = peers.deepspeed_global_grad_norm(opt.param_groups)
        return opt.step(grad_norms=peers.deepspeed_grad_norms_arg(opt.param_groups, norm))
    return opt.step()


def _sgd_larc(groups, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, **larc):
    return peers.ApexLARC(torch.optim.SGD(groups, lr=lr, momentum=momentum, dampening=dampening,
                                          weight_decay=weight_decay, nesterov=nesterov), **larc)


# name -> (peer(model, **args), compat(model, **args), args, base lr, named groups, peer step)
PEERS = {
    "larc-clip": (lambda m, **a: _sgd_larc(_groups(m, a["weight_decay"]), **a),
                  lambda m, **a: compat.larc(_groups(m, a["weight_decay"]), **a),
                  dict(lr=0.5, momentum=0.9, weight_decay=1e-3), 0.5),
    "larc-noclip-nesterov": (lambda m, **a: _sgd_larc(_groups(m, a["weight_decay"]), **a),
                             lambda m, **a: compat.larc(_groups(m, a["weight_decay"]), **a),
                             dict(lr=0.5, momentum=0.9, weight_decay=1e-3, nesterov=True, clip=False,
                                  trust_coefficient=0.01), 0.5),
    "barlowtwins": (lambda m, **a: peers.BarlowTwinsLARS(_groups(m, a["weight_decay"]), **a),
                    lambda m, **a: compat.ssl_lars(_groups(m, a["weight_decay"]), **a),
                    dict(lr=0.5, weight_decay=1e-3, weight_decay_filter=True, lars_adaptation_filter=True), 0.5),
    "vicreg": (lambda m, **a: peers.BarlowTwinsLARS(m.parameters(), **a),
               lambda m, **a: compat.ssl_lars(m.parameters(), **a),
               dict(lr=0.5, weight_decay=1e-3, eta=0.01, weight_decay_filter=_exclude_1d,
                    lars_adaptation_filter=_exclude_1d), 0.5),
    "simclr-classic": (lambda m, **a: peers.SimCLRLARS(list(m.named_parameters()), **a),
                       lambda m, **a: compat.simclr_lars(list(m.named_parameters()), **a),
                       dict(lr=0.5, weight_decay=1e-3, exclude_from_weight_decay=["bias", "scale"]), 0.5),
    "simclr-classic-nesterov": (lambda m, **a: peers.SimCLRLARS(list(m.named_parameters()), **a),
                                lambda m, **a: compat.simclr_lars(list(m.named_parameters()), **a),
                                dict(lr=0.5, weight_decay=1e-3, use_nesterov=True, exclude_from_weight_decay=["bias"],
                                     exclude_from_layer_adaptation=["scale"]), 0.5),
    "simclr-momentum-update": (lambda m, **a: peers.SimCLRLARS(list(m.named_parameters()), **a),
                               lambda m, **a: compat.simclr_lars(list(m.named_parameters()), **a),
                               dict(lr=0.5, weight_decay=1e-3, classic_momentum=False,
                                    exclude_from_weight_decay=["bias"]), 0.5),
    "mlperf": (lambda m, **a: peers.MLPerfLARS(list(m.named_parameters()), **a),
               lambda m, **a: compat.mlperf_lars(list(m.named_parameters()), **a),
               dict(lr=0.5, weight_decay=1e-3, skip_list=["bias", "scale"]), 0.5),
    "mlperf-nesterov-eps": (lambda m, **a: peers.MLPerfLARS(list(m.named_parameters()), **a),
                            lambda m, **a: compat.mlperf_lars(list(m.named_parameters()), **a),
                            dict(lr=0.5, weight_decay=1e-3, use_nesterov=True, epsilon=1e-3, skip_list=["bias"]), 0.5),
    "apex-lamb": (lambda m, **a: peers.ApexFusedLAMB(_groups(m, a["weight_decay"]), **a),
                  lambda m, **a: compat.apex_fused_lamb(_groups(m, a["weight_decay"]), **a),
                  dict(lr=0.01, weight_decay=0.01, max_grad_norm=0.1), 0.02),
    "apex-lamb-l2-nvlamb": (lambda m, **a: peers.ApexFusedLAMB(_groups(m, a["weight_decay"]), **a),
                            lambda m, **a: compat.apex_fused_lamb(_groups(m, a["weight_decay"]), **a),
                            dict(lr=0.01, weight_decay=0.01, adam_w_mode=False, use_nvlamb=True), 0.02),
    "apex-lamb-plain": (lambda m, **a: peers.ApexFusedLAMB(_groups(m, a["weight_decay"]), **a),
                        lambda m, **a: compat.apex_fused_lamb(_groups(m, a["weight_decay"]), **a),
                        dict(lr=0.01, weight_decay=0.02, grad_averaging=False, bias_correction=False,
                             max_grad_norm=10.0), 0.02),
    "deepspeed-lamb": (lambda m, **a: peers.DeepSpeedFusedLamb(m.parameters(), **a),
                       lambda m, **a: compat.deepspeed_lamb(m.parameters(), **a),
                       dict(lr=0.01), 0.02),
    "deepspeed-lamb-clip-bounds": (lambda m, **a: peers.DeepSpeedFusedLamb(_groups(m, a["weight_decay"]), **a),
                                   lambda m, **a: compat.deepspeed_lamb(_groups(m, a["weight_decay"]), **a),
                                   dict(lr=0.01, weight_decay=0.01, max_grad_norm=0.1, eps_inside_sqrt=True,
                                        min_coeff=0.9, max_coeff=1.1), 0.02),
    "deepspeed-lamb-no-bias-correction": (lambda m, **a: peers.DeepSpeedFusedLamb(m.parameters(), **a),
                                          lambda m, **a: compat.deepspeed_lamb(m.parameters(), **a),
                                          dict(lr=0.01, weight_decay=0.01, bias_correction=False), 0.02),
}


def _peer_step(name):
    return _deepspeed_step if name.startswith("deepspeed") else None


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("name", sorted(PEERS))
def test_compat_equals_the_peer(name, backend):
    make_peer, make_ours, args, base_lr = PEERS[name]
    peer_model, model = _models()
    peer = make_peer(peer_model, **args)
    ours = make_ours(model, backend=backend, **args)
    _train(peer_model, peer, STEPS, base_lr, step_fn=_peer_step(name))
    _train(model, ours, STEPS, base_lr)
    _assert_equal_params(model, peer_model)


@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
@pytest.mark.parametrize("name", ["larc-clip", "barlowtwins", "simclr-classic-nesterov", "mlperf", "apex-lamb",
                                  "deepspeed-lamb-clip-bounds"])
def test_peer_checkpoints_resume_on_the_peers_trajectory(name, backend):
    """Step the peer, save its state_dict, load it into the compat optimizer with
    load_peer_state_dict, and continue: equal to the peer continuing (mu, Momentum, the
    negated MLPerf velocity, group-level and per-parameter LAMB steps)."""
    make_peer, make_ours, args, base_lr = PEERS[name]
    peer_model, _ = _models()
    peer = make_peer(peer_model, **args)
    _train(peer_model, peer, 7, base_lr, step_fn=_peer_step(name))
    saved = copy.deepcopy(peer.state_dict())
    model = copy.deepcopy(peer_model)
    ours = make_ours(model, backend=backend, **args)
    compat.load_peer_state_dict(ours, saved)
    _train(peer_model, peer, 8, base_lr, start=7, step_fn=_peer_step(name))
    _train(model, ours, 8, base_lr, start=7)
    _assert_equal_params(model, peer_model)
