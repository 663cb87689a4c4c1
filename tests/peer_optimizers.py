"""Test oracles: the LARS/LAMB update rules of the projects users port from, in plain PyTorch.

Each class is our own transcription of one peer's published rule (the repository, file and
commit read are named in its docstring), kept to that peer's constructor arguments and
defaults, state names and ``state_dict`` layout, so that a test can check a
``fastlars.compat`` constructor against it step by step and move a checkpoint from one to
the other. They are written for float64 on the CPU and favour legibility over speed; every
step reads ``group["lr"]`` afresh, so a scheduler that changes it acts on the next step.

The peers compute in the precision of their own kernels (apex's LAMB kernel in float32
arithmetic; the TensorFlow ones in the variables' dtype, float32 in their training scripts;
DeepSpeed's kernel rounds its denominator and coefficient to float32 even for double
tensors). These classes compute the same formulas in the tensors' dtype; the rule, not its
rounding, is what they reproduce.

Import from a test as ``import peer_optimizers`` (pytest's default import mode puts tests/
on sys.path).
"""

import math
import re
import types

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


class ApexFusedLAMB(torch.optim.Optimizer):
    """NVIDIA apex's FusedLAMB, transcribed from its Python driver and CUDA kernel.

    Sources read: github.com/NVIDIA/apex at commit 6424da3b: ``apex/optimizers/fused_lamb.py``
    (constructor lines 63-104, ``step`` lines 114-244) and ``csrc/multi_tensor_lamb.cu``
    (stage 1 lines 38-192, stage 2 lines 196-267, host lines 269-319).

    Per step, G = the L2 norm of every gradient of every group together (lines 125-159),
    and clip = G / max_grad_norm if G > max_grad_norm else 1 (cu line 53-54), with
    ``max_grad_norm`` read from the optimizer's defaults only (line 160): a group's own
    value is ignored, and ``max_grad_norm=0`` divides every gradient by infinity (the step
    then only decays) unless G is 0. Each group's ``step`` counter (kept in the group, not
    the state: lines 169-172) advances, even if none of its parameters has a gradient. Then
    per parameter with a gradient (lr, betas, eps, weight_decay from its group; beta3 =
    1 - beta1 if grad_averaging else 1; bc_i = 1 - beta_i**step if bias_correction else 1;
    ``w`` reads as 0 in stage 1 when weight_decay == 0):

        s = g / clip  (+ weight_decay * w      when adam_w_mode=False: L2 on the moments)
        m = beta1 * m + beta3 * s;   v = beta2 * v + (1 - beta2) * s**2
        u = (m / bc1) / (sqrt(v / bc2) + eps)  (+ weight_decay * w  when adam_w_mode=True)
        p.grad <- u                                  (stage 1 writes the update into p.grad)
        ratio = ||w|| / ||u|| if (use_nvlamb or weight_decay != 0) and both norms != 0, else 1
        w = w - lr * ratio * u

    No trust coefficient and no ratio clipping. State: ``exp_avg``, ``exp_avg_sq``; the
    param_groups carry ``step`` and ``max_grad_norm``, while ``adam_w_mode``, ``use_nvlamb``
    and ``set_grad_none`` are attributes, not in the state_dict. ``amsgrad=True`` raises as
    apex does. apex takes float16/float32 only; this transcription also takes float64.
    ``zero_grad()`` is apex's (its ``set_grad_none=False`` branch calls torch's
    ``zero_grad()``, whose default now sets the gradients to None too).
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
                 weight_decay=0.01, amsgrad=False, adam_w_mode=True, grad_averaging=True,
                 set_grad_none=True, max_grad_norm=1.0, use_nvlamb=False):
        if amsgrad:
            raise RuntimeError("FusedLAMB does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none
        self.use_nvlamb = use_nvlamb

    def zero_grad(self):
        if self.set_grad_none:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
        else:
            super().zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        global_grad_norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                            if grads else torch.zeros((), dtype=torch.float64))
        max_grad_norm = self.defaults["max_grad_norm"]
        clip = global_grad_norm / max_grad_norm if global_grad_norm > max_grad_norm else 1.0

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
            group["step"] = group.get("step", 0) + 1
            step = group["step"]
            bc1, bc2 = (1 - beta1**step, 1 - beta2**step) if group["bias_correction"] else (1.0, 1.0)
            decay, eps = group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedLAMB does not support sparse gradients, please consider "
                                       "SparseAdam instead")
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                w_stage1 = p if decay != 0 else torch.zeros_like(p)
                s = p.grad / clip
                if self.adam_w_mode == 0:
                    s = s + decay * w_stage1
                m.mul_(beta1).add_(beta3 * s)
                v.mul_(beta2).add_((1 - beta2) * s * s)
                update = (m / bc1) / (torch.sqrt(v / bc2) + eps)
                if self.adam_w_mode == 1:
                    update = update + decay * w_stage1
                p.grad.copy_(update)
                ratio = group["lr"]
                if self.use_nvlamb or decay != 0.0:
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    if u_norm != 0 and w_norm != 0:
                        ratio = group["lr"] * (w_norm / u_norm)
                p.sub_(ratio * update)
        return loss


class DeepSpeedFusedLamb(torch.optim.Optimizer):
    """DeepSpeed's FusedLamb, transcribed from its Python driver and CUDA kernel.

    Sources read: github.com/deepspeedai/DeepSpeed at commit edaa7221 (v0.19.5-27):
    ``deepspeed/ops/lamb/fused_lamb.py`` (constructor lines 41-67, ``step`` lines 69-170) and
    ``csrc/lamb/fused_lamb_cuda_kernel.cu`` (part 1 lines 194-239, part 3 lines 260-319,
    step size lines 363-370); its caller ``deepspeed/runtime/fp16/fused_optimizer.py``
    lines 149-186 (one flat parameter per group, ``grad_norms`` = one norm per group).

    ``step(closure, grads, output_params, scale, grad_norms)`` as the peer: ``grads`` and
    ``output_params`` may replace p.grad and receive a half copy of the new weights (per
    group lists, or one flat list or generator = one group); ``grad_norms`` is one entry per
    group, each a list with one norm per parameter, or a bare number, which becomes a
    one-element list, so that (the peer zips it with the group's parameters) ONLY THE
    GROUP'S FIRST PARAMETER is stepped: a faithful quirk; see ``deepspeed_grad_norms_arg``.
    DeepSpeed's usual callers (the fp32 engine, FP16_Optimizer.step) clip outside the
    optimizer, with the global norm (``deepspeed_global_grad_norm``,
    ``deepspeed_combined_scale``), and call ``step()`` without norms; only the legacy-fusion
    FP16 path (fused_optimizer.py lines 149-186) passes ``grad_norms``, one per group.
    Per parameter (lr, betas, eps, weight_decay, max_grad_norm, max_coeff, min_coeff from its
    group; ``step`` counted per parameter, in its state):

        combined = scale * c  if max_grad_norm > 0 and c = ((n / scale) + 1e-6) / max_grad_norm > 1,
                   else scale                       (n: the norm the caller passed)
        s = g / combined
        m = beta1 * m + (1 - beta1) * s;   v = beta2 * v + (1 - beta2) * s**2   (no bias correction)
        u = m / (sqrt(v) + eps)   (eps_inside_sqrt: m / sqrt(v + eps))   + weight_decay * w
        coeff = clamp(||w|| / ||u||, min_coeff, max_coeff), exactly 1 if either norm is 0
                (the kernel caps at max_coeff first, then raises to min_coeff)
        step_size = lr * sqrt(1 - beta2**step) / (1 - beta1**step)   if bias_correction, else lr
        w = w - step_size * coeff * u

    so the bias correction, folded into the step size, scales the decay term too, and the
    ratio is taken from the uncorrected moments. No trust coefficient; the coefficient is
    bounded, not dropped, for parameters without decay. With max_grad_norm > 0 the caller must
    pass grad_norms (a None norm raises TypeError, as in the peer). ``lamb_coeffs`` holds the
    last step's coefficients (one-element tensors); ``get_lamb_coeffs()`` as floats. State:
    ``step`` (int), ``exp_avg``, ``exp_avg_sq``. ``amsgrad=True`` raises as DeepSpeed does.
    The peer's kernel rounds the denominator, the norms' square roots and the coefficient
    to float32 even for float64 tensors; this transcription keeps float64.
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 eps_inside_sqrt=False, weight_decay=0.0, max_grad_norm=0.0, max_coeff=10.0,
                 min_coeff=0.01, amsgrad=False):
        if amsgrad:
            raise RuntimeError("FusedLamb does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                        max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults)
        self.eps_mode = 0 if eps_inside_sqrt else 1
        self.lamb_coeffs = []

    @staticmethod
    def _per_group(value, n_groups):
        """The peer's reading of `grads` / `output_params`: None, one flat list or generator
        (a single group), or one list per group."""
        if value is None:
            return [None] * n_groups
        if isinstance(value, types.GeneratorType) or type(value[0]) != list:
            return [value]
        return value

    @torch.no_grad()
    def step(self, closure=None, grads=None, output_params=None, scale=1.0, grad_norms=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        n_groups = len(self.param_groups)
        grads_group = self._per_group(grads, n_groups)
        output_params_group = self._per_group(output_params, n_groups)
        if grad_norms is None:
            grad_norms = [None] * n_groups
        del self.lamb_coeffs[:]

        for group, group_grads, group_outputs, group_norms in zip(
                self.param_groups, grads_group, output_params_group, grad_norms):
            if group_grads is None:
                group_grads = [None] * len(group["params"])
            if group_outputs is None:
                group_outputs = [None] * len(group["params"])
            if group_norms is None:
                group_norms = [None] * len(group["params"])
            elif not isinstance(group_norms, list):
                group_norms = [group_norms]
            for p, grad, output_param, grad_norm in zip(group["params"], group_grads, group_outputs,
                                                        group_norms):
                combined_scale = scale
                if group["max_grad_norm"] > 0:
                    combined_scale = deepspeed_combined_scale(grad_norm, scale, group["max_grad_norm"])
                if p.grad is None and grad is None:
                    continue
                if grad is None:
                    grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("FusedLamb does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                self.lamb_coeffs.append(self._kernel(p, output_param, state, grad, group, combined_scale))
        return loss

    def _kernel(self, p, output_param, state, grad, group, grad_scale):
        """fused_lamb_cuda: parts 1 (moments, norms), 2 (reduction) and 3 (coefficient, update)."""
        beta1, beta2 = group["betas"]
        lr, eps, decay, step = group["lr"], group["eps"], group["weight_decay"], state["step"]
        if group["bias_correction"]:
            step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        else:
            step_size = lr
        m, v = state["exp_avg"], state["exp_avg_sq"]
        s = grad.to(p.dtype) / grad_scale
        m.mul_(beta1).add_((1 - beta1) * s)
        v.mul_(beta2).add_((1 - beta2) * s * s)
        denom = torch.sqrt(v + eps) if self.eps_mode == 0 else torch.sqrt(v) + eps
        update = m / denom + decay * p
        w_norm = torch.linalg.vector_norm(p)
        u_norm = torch.linalg.vector_norm(update)
        coeff = torch.ones((), dtype=p.dtype)
        if w_norm != 0 and u_norm != 0:
            coeff = w_norm / u_norm
            coeff = torch.where(coeff > group["max_coeff"], torch.full_like(coeff, group["max_coeff"]), coeff)
            coeff = torch.where(coeff < group["min_coeff"], torch.full_like(coeff, group["min_coeff"]), coeff)
        p.sub_(step_size * coeff * update)
        if output_param is not None and grad.dtype == torch.float16:
            output_param.copy_(p)  # the kernel writes p_copy for half gradients only
        return coeff.reshape(1)  # the kernel's one-element lamb_coeff_val

    def get_lamb_coeffs(self):
        return [lamb_coeff.item() for lamb_coeff in self.lamb_coeffs]


def deepspeed_group_grad_norms(param_groups):
    """The per-group gradient norms DeepSpeed's FP16_Optimizer passes as ``grad_norms``
    (fused_optimizer.py lines 154-162 with runtime/utils.py ``get_weight_norm``, lines
    537-590): the L2 norm of each group's gradients flattened together, a missing gradient
    counting as zeros, and -1 where the norm is not finite. (DeepSpeed takes it in float32.)"""
    norms = []
    for group in param_groups:
        flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                for p in group["params"]]
        norm = torch.linalg.vector_norm(torch.cat(flat)).item() if flat else 0.0
        norms.append(norm if math.isfinite(norm) else -1)
    return norms


def deepspeed_global_grad_norm(param_groups):
    """The global gradient norm as DeepSpeed's caller computes it: ``get_global_norm``
    (runtime/utils.py lines 349-356), sqrt of the sum of the squared per-group norms."""
    return math.sqrt(sum(norm**2.0 for norm in deepspeed_group_grad_norms(param_groups)))


def deepspeed_combined_scale(norm, scale, max_norm):
    """DeepSpeed's divisor of the (loss-scaled) gradients: ``scale * c`` where
    ``c = ((norm / scale) + 1e-6) / max_norm`` exceeds 1, else ``scale`` (FusedLamb.step
    lines 131-137 with its own max_grad_norm; FP16_Optimizer.unscale_and_clip_grads,
    fused_optimizer.py lines 367-380, with the config's gradient_clipping and the global
    norm). At scale 1 it equals the fp32 engine's clip_grad_norm_ (runtime/utils.py line
    423: multiply by min(1, max_norm / (norm + 1e-6)))."""
    clip = ((norm / scale) + 1e-6) / max_norm
    return clip * scale if clip > 1 else scale


def deepspeed_grad_norms_arg(param_groups, norm):
    """The ``grad_norms`` argument of ``DeepSpeedFusedLamb.step`` that hands every parameter
    the same norm (a bare number per group would reach only the group's first parameter)."""
    return [[norm] * len(group["params"]) for group in param_groups]
