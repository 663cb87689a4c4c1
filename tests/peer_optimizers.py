"""Test oracles: the LARS/LAMB update rules of the projects users port from, in plain PyTorch.

Each class is our own transcription of one peer's published rule (the repository, file and
commit read are named in its docstring), kept to that peer's constructor arguments and
defaults, state names and ``state_dict`` layout, so that a test can check a
``fastlars.compat`` constructor against it step by step and move a checkpoint from one to
the other. They are written for float64 on the CPU and favour legibility over speed; every
step reads ``group["lr"]`` afresh, so a scheduler that changes it acts on the next step.

The peers compute in the precision of their own kernels (apex and the TensorFlow ones in
float32, DeepSpeed's kernel rounds its denominator and coefficient to float32 even for
double tensors). These classes compute the same formulas in the tensors' dtype; the rule,
not its rounding, is what they reproduce.

Import from a test as ``import peer_optimizers`` (pytest's default import mode puts tests/
on sys.path).
"""

import math
import re

import torch

# The Keras backend's default epsilon (tf.keras.backend.epsilon()), which the MLPerf TF2
# LARS substitutes for a falsy `epsilon`.
KERAS_DEFAULT_EPSILON = 1e-7


def _ratio_unless_zero(w_norm, d_norm, ratio):
    """`ratio` where both norms are positive, else 1: the nested tf.where / torch.where of
    Barlow Twins, VICReg, SimCLR and MLPerf (a zero-norm tensor keeps the plain step)."""
    one = torch.ones_like(w_norm)
    return torch.where(w_norm > 0, torch.where(d_norm > 0, ratio, one), one)


class ApexLARC:
    """NVIDIA apex's LARC wrapper (``apex.parallel.LARC``), transcribed.

    Source read: github.com/NVIDIA/apex ``apex/parallel/LARC.py`` at commit e13873de
    (the parent of cb65b8ed, which removed the file in May 2025; the rule last changed in
    2ec84ebd, April 2020): constructor lines 39-43, ``step`` lines 78-107.

    Wraps any torch optimizer (typically ``torch.optim.SGD``). At each ``step``, for every
    parameter with a gradient, in every group, whatever its weight decay (lr is the group's):

        r = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
        r = min(r / lr, 1)                        if clip (so lr * r = min(r_raw, lr))
        p.grad <- (g + weight_decay * w) * r      (edited in place)

    but only when ``||w|| != 0 and ||g|| != 0``; otherwise the gradient is left as it is, with
    neither adaptation nor weight decay. The group's ``weight_decay`` is set to 0 while the
    wrapped optimizer steps (so it is not applied twice) and restored afterwards; a group
    without the key gets ``weight_decay = 0`` added. ``state``, ``param_groups``,
    ``state_dict`` and ``load_state_dict`` are the wrapped optimizer's (a checkpoint is the
    inner SGD's: ``momentum_buffer``). As in apex, ``step`` takes no closure and the wrapper is
    not a ``torch.optim.Optimizer`` (schedule the wrapped optimizer).
    """

    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.eps = eps
        self.clip = clip

    def __getstate__(self):
        return self.optim.__getstate__()

    def __setstate__(self, state):
        self.optim.__setstate__(state)

    @property
    def state(self):
        return self.optim.state

    def __repr__(self):
        return self.optim.__repr__()

    @property
    def param_groups(self):
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optim.param_groups = value

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state_dict):
        self.optim.load_state_dict(state_dict)

    def zero_grad(self):
        self.optim.zero_grad()

    def add_param_group(self, param_group):
        self.optim.add_param_group(param_group)

    def step(self):
        with torch.no_grad():
            weight_decays = []
            for group in self.optim.param_groups:
                weight_decay = group.get("weight_decay", 0)
                weight_decays.append(weight_decay)
                group["weight_decay"] = 0  # the wrapper applies it, below
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(p.grad)
                    if w_norm != 0 and g_norm != 0:
                        ratio = self.trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + self.eps)
                        if self.clip:
                            # lr * ratio becomes min(ratio, lr); Python's min(x, 1) as apex
                            ratio = min(ratio / group["lr"], 1)
                        p.grad.add_(p, alpha=weight_decay)
                        p.grad.mul_(ratio)
        self.optim.step()
        for group, weight_decay in zip(self.optim.param_groups, weight_decays):
            group["weight_decay"] = weight_decay


def _exclude_ndim_1(p):
    return p.ndim == 1


class BarlowTwinsLARS(torch.optim.Optimizer):
    """The LARS of Barlow Twins (and VICReg), transcribed.

    Sources read: github.com/facebookresearch/barlowtwins ``main.py`` at commit 8e8d284c,
    lines 224-263 (class ``LARS``; built at lines 90-101 with two groups, ndim > 1 and
    ndim == 1, and both filters True); github.com/facebookresearch/vicreg ``main_vicreg.py``
    at commit 4e12602f, lines 245-299 (class ``LARS``; built at lines 109-115 with one group
    and both filters = ``exclude_bias_and_norm``, lines 235-236: ``p.ndim == 1``).

    Per parameter with a gradient (lr, weight_decay, momentum, eta are the group's):

        d = g + weight_decay * w                  unless the decay filter excludes p
        d = d * eta * ||w|| / ||d||               unless the adaptation filter excludes p;
                                                  the factor is 1 if ||w|| == 0 or ||d|| == 0
        mu = momentum * mu + d                    (mu starts at zeros: first mu = d)
        w = w - lr * mu

    No eps, no dampening, no nesterov, no ratio clipping; the zero-norm test is on
    ``||g + weight_decay * w||``, and a zero-norm tensor still decays. State: ``mu``.

    Filters: ``weight_decay_filter`` and ``lars_adaptation_filter`` take Barlow Twins' bools
    (False: no exclusion; True: exclude ``p.ndim == 1``) or VICReg's callables (``p`` is
    excluded where ``filter(p)`` is true) or VICReg's default None (no exclusion). Where
    the two peers differ: VICReg's defaults are None, and it calls the filter, so a bool
    raises TypeError there; Barlow Twins tests only the filter's truth, so a callable acts
    as True (ndim == 1) there. A VICReg checkpoint's param_groups hold the callable itself.
    As in both peers, ``step`` takes no closure.
    """

    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=False, lars_adaptation_filter=False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter,
                        lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    def exclude_bias_and_norm(self, p):
        return _exclude_ndim_1(p)

    @staticmethod
    def _excludes(rule, p):
        if rule is None or rule is False:
            return False
        if rule is True:
            return _exclude_ndim_1(p)
        return bool(rule(p))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not self._excludes(group["weight_decay_filter"], p):
                    d = d.add(p, alpha=group["weight_decay"])
                if not self._excludes(group["lars_adaptation_filter"], p):
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    d = d.mul(_ratio_unless_zero(w_norm, d_norm, group["eta"] * w_norm / d_norm))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])


def _named_groups_checked(optimizer, argument):
    for group in optimizer.param_groups:
        names = group.get("param_names")
        if names is None or len(names) != len(group["params"]):
            raise ValueError(f"{argument} must give (name, tensor) pairs: the peer selects "
                             "parameters by name")


class SimCLRLARS(torch.optim.Optimizer):
    """SimCLR's LARS (TensorFlow), transcribed.

    Sources read: github.com/google-research/simclr at commit 383d4143: ``lars_optimizer.py``
    (TF1, ``tf.train.Optimizer``) lines 36-161, and ``tf2/lars_optimizer.py`` (Keras legacy
    optimizer) lines 32-157. The rule is the same in both; they differ only in what the
    regexes see (TF1 ``param.op.name``, e.g. ``conv/kernel``; TF2 ``param.name``, with the
    ``:0`` suffix), in the slot dtype (TF1 float32 always; TF2 the variable's) and in TF2
    taking a learning-rate schedule. SimCLR builds it with
    ``exclude_from_weight_decay=['batch_normalization', 'bias', 'head_supervised']``
    (model_util.py lines 94-100, tf2/model.py lines 35-42).

    ``named_params``: (name, tensor) pairs or groups with named ``params``; the names are
    matched with ``re.search`` against each regex. Weight decay applies when
    ``weight_decay`` is truthy and no ``exclude_from_weight_decay`` regex matches;
    adaptation unless an ``exclude_from_layer_adaptation`` regex matches, that list falling
    back to ``exclude_from_weight_decay`` when None or empty (resolved here, as the peer
    does, at construction). With ``g' = g + weight_decay * w`` where decay applies:

    classic_momentum=True (lr inside the buffer):
        r = eeta * ||w|| / ||g'||   (1 if either norm is 0, or p excluded from adaptation)
        v = momentum * v + lr * r * g'
        w = w - (momentum * v + lr * r * g')   if use_nesterov, else  w = w - v
    classic_momentum=False (lr outside, ratio from the momentum update):
        v = momentum * v + g';  u = momentum * v + g' if use_nesterov else v
        r = eeta * ||w|| / ||u||   (same zero rule)
        w = w - lr * r * u

    No eps, no dampening. The slot starts at zeros. State: ``Momentum`` (the peer's slot).
    """

    def __init__(self, named_params, lr, momentum=0.9, use_nesterov=False, weight_decay=0.0,
                 exclude_from_weight_decay=None, exclude_from_layer_adaptation=None,
                 classic_momentum=True, eeta=0.001):
        if not exclude_from_layer_adaptation:
            exclude_from_layer_adaptation = exclude_from_weight_decay
        defaults = dict(lr=lr, momentum=momentum, use_nesterov=use_nesterov,
                        weight_decay=weight_decay,
                        exclude_from_weight_decay=exclude_from_weight_decay,
                        exclude_from_layer_adaptation=exclude_from_layer_adaptation,
                        classic_momentum=classic_momentum, eeta=eeta)
        super().__init__(named_params, defaults)
        _named_groups_checked(self, "named_params")

    @staticmethod
    def _matches(patterns, name):
        return bool(patterns) and any(re.search(r, name) is not None for r in patterns)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum, eeta = group["lr"], group["momentum"], group["eeta"]
            for name, p in zip(group["param_names"], group["params"]):
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] and not self._matches(group["exclude_from_weight_decay"], name):
                    grad = grad + group["weight_decay"] * p
                adapts = not self._matches(group["exclude_from_layer_adaptation"], name)
                state = self.state[p]
                if "Momentum" not in state:
                    state["Momentum"] = torch.zeros_like(p)
                v = state["Momentum"]
                w_norm = torch.linalg.vector_norm(p)
                if group["classic_momentum"]:
                    ratio = 1.0
                    if adapts:
                        g_norm = torch.linalg.vector_norm(grad)
                        ratio = _ratio_unless_zero(w_norm, g_norm, eeta * w_norm / g_norm)
                    scaled_lr = lr * ratio
                    next_v = momentum * v + scaled_lr * grad
                    update = momentum * next_v + scaled_lr * grad if group["use_nesterov"] else next_v
                    next_p = p - update
                else:
                    next_v = momentum * v + grad
                    update = momentum * next_v + grad if group["use_nesterov"] else next_v
                    ratio = 1.0
                    if adapts:
                        u_norm = torch.linalg.vector_norm(update)
                        ratio = _ratio_unless_zero(w_norm, u_norm, eeta * w_norm / u_norm)
                    next_p = p - (ratio * lr) * update
                p.copy_(next_p)
                v.copy_(next_v)


class MLPerfLARS(torch.optim.Optimizer):
    """The MLPerf ResNet-50 TF2 reference LARS, transcribed.

    Source read: github.com/mlcommons/training
    ``image_classification/tensorflow2/lars_optimizer.py`` at commit e8210745 (added there in
    May 2021; moved unchanged to retired_benchmarks/resnet-tf2/ in 3c81f6f9): constructor
    lines 52-111, ``compute_lr`` lines 128-144, ``_resource_apply_dense`` lines 162-185.
    The reference builds it with ``skip_list=['batch_normalization', 'bias', 'bn']``
    (common.py lines 224-229).

    ``named_params``: (name, tensor) pairs or named groups. A parameter whose name contains
    any ``skip_list`` string as a substring is skipped: plain momentum SGD at lr, no
    adaptation and no weight decay. Any other parameter, with g the raw gradient:

        r = eeta * ||w|| / (||g|| + weight_decay * ||w|| + epsilon)   (1 if ||w|| or ||g|| is 0)
        g' = g + weight_decay * w                                     (also when r = 1)
        m = momentum * m - lr * r * g'          (the slot holds the NEGATIVE velocity)
        w = w + momentum * m - lr * r * g'      if use_nesterov, else  w = w + m

    ``epsilon`` is ``epsilon or 1e-7`` (line 109: a falsy epsilon becomes the Keras backend
    epsilon, 1e-7; the stored group value is the resolved one, as the peer's get_config).
    lr sits inside the buffer (equal to the torch SGD form only at a constant lr). The slot
    starts at zeros. State: ``momentum``. Errors as the peer's (lines 93-96) for a negative
    momentum or weight_decay. (The peer's non-resource ``_apply_dense`` path, lines 146-160,
    keeps a positive velocity instead; TF2 variables are resource variables.)
    """

    def __init__(self, named_params, lr, momentum=0.9, weight_decay=0.0001, eeta=0.001,
                 epsilon=0.0, skip_list=None, use_nesterov=False):
        if momentum < 0.0:
            raise ValueError("momentum should be positive: %s" % momentum)
        if weight_decay < 0.0:
            raise ValueError("weight_decay should be positive: %s" % weight_decay)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eeta=eeta,
                        epsilon=epsilon or KERAS_DEFAULT_EPSILON, skip_list=skip_list,
                        use_nesterov=use_nesterov)
        super().__init__(named_params, defaults)
        _named_groups_checked(self, "named_params")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            skip_list = group["skip_list"]
            for name, p in zip(group["param_names"], group["params"]):
                if p.grad is None:
                    continue
                grad = p.grad
                scaled_lr = lr
                if skip_list is None or not any(s in name for s in skip_list):
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    ratio = group["eeta"] * w_norm / (g_norm + weight_decay * w_norm + group["epsilon"])
                    scaled_lr = lr * _ratio_unless_zero(w_norm, g_norm, ratio)
                    grad = grad + weight_decay * p
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                m = state["momentum"]
                m.copy_(m * momentum - grad * scaled_lr)
                if group["use_nesterov"]:
                    p.copy_(p + m * momentum - grad * scaled_lr)
                else:
                    p.add_(m)
