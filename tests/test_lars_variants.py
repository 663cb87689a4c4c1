"""LARS variants (docs/contract.md, "LARS variants"): ratio_denominator, zero_norm,
trust_bounds, lr_in_momentum.

1. Every backend against the reference on a model with the awkward cases (an all-zero
   weight, a gradient that is exactly zero, 1 element, a prime size, a parameter joining
   late, one losing its gradient) and a state_dict save/load mid-run, with a changing lr.
2. The reference against an independent float64 NumPy computation of each option.
3. Validation errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

import fastlars
from conftest import RESNET50_SHAPES, assert_within_ulps, backend_marks, backend_params
from test_optim_backends import rel_err, use_chunks

BASE = dict(lr=0.6, momentum=0.9, weight_decay=0.05, trust_coefficient=0.02)
# the options alone and as the peers combine them
VARIANTS = {
    "norm_of_sum": dict(ratio_denominator="norm_of_sum"),
    "norm_of_sum-eps0": dict(ratio_denominator="norm_of_sum", eps=0.0),
    "momentum_update-nesterov": dict(ratio_denominator="momentum_update", nesterov=True),
    "momentum_update-dampening": dict(ratio_denominator="momentum_update", dampening=0.3, momentum=0.8),
    "plain_sgd": dict(zero_norm="plain_sgd"),
    "plain_sgd-trust_clip": dict(zero_norm="plain_sgd", trust_clip=True),
    "bounds": dict(trust_bounds=(0.004, 0.012)),
    "bounds-trust_clip": dict(trust_bounds=(0.0, 0.05), trust_clip=True),
    "lr_in_momentum-norm_of_sum": dict(lr_in_momentum=True, ratio_denominator="norm_of_sum"),
    "lr_in_momentum-nesterov": dict(lr_in_momentum=True, nesterov=True),
    "lr_in_momentum-no-momentum": dict(lr_in_momentum=True, momentum=0.0, zero_norm="plain_sgd"),
}
BACKENDS = [b for b in fastlars.available_backends() if b != "reference"]
STEPS = 20
# Triton's interpreter takes ~8 s a run: by default it runs the peers' combinations in fp64,
# the other variants and fp32 under -m slow
TRITON_DEFAULT = {"norm_of_sum-eps0", "momentum_update-nesterov", "plain_sgd-trust_clip", "bounds",
                  "lr_in_momentum-norm_of_sum", "lr_in_momentum-nesterov"}


def cases(variants, dtypes):
    """(backend, variant, dtype) parameters, the Triton ones outside TRITON_DEFAULT (and not fp64) slow."""
    out = []
    for backend in BACKENDS:
        for variant in variants:
            for dtype in dtypes:
                slow = backend == "triton" and (variant not in TRITON_DEFAULT or dtype != torch.float64)
                out.append(pytest.param(backend, variant, dtype,
                                        marks=[*backend_marks(backend), *([pytest.mark.slow] if slow else [])],
                                        id=f"{backend}-{variant}-{str(dtype)[6:]}"))
    return out


def make_params(dtype, device="cpu", resnet50=False):
    """A prime-sized matrix, 1 element, a prime vector, an all-zero weight, one whose
    gradient is always exactly zero, one that loses its gradient half way, ``resnet50``:
    ResNet-50's largest tensors (drawn on the device), and one that joins the optimizer
    late (the last)."""
    g = torch.Generator().manual_seed(7)
    shapes = [(13, 17), (1,), (31,), (6,), (5, 3), (11,), (7, 2)]
    values = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    values[3].zero_()
    if resnet50:
        big = torch.Generator(device).manual_seed(8)
        values[-1:-1] = [torch.randn(s, generator=big, dtype=torch.float64, device=device) * 0.05
                         for s in RESNET50_SHAPES.values()]
    return [torch.nn.Parameter(v.to(device=device, dtype=dtype)) for v in values]


def grads_for(step, params):
    """Seeded gradients for ``params`` (on their device, float64): index 4 exactly zero, index 5
    None from step 12 on."""
    g = torch.Generator(params[0].device).manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64, device=p.device) * (0.5 + i % 3)
             for i, p in enumerate(params)]
    grads[4].zero_()  # exactly zero
    if step >= 12:
        grads[5] = None  # lost its gradient
    return grads


def run(backend, options, dtype, device="cpu", master_weights=False, resnet50=False):
    """STEPS steps with a changing lr; the 1-element parameter in a group that does not
    adapt (trust_ratio=False: the variants' other parts still apply), the late parameter
    joins at step 5, and the optimizer is rebuilt from its state_dict at step 10."""
    params = make_params(dtype, device, resnet50)
    kwargs = {**BASE, **options}

    def groups():
        return [{"params": [p for i, p in enumerate(params[:-1]) if i != 1]},
                {"params": [params[1]], "trust_ratio": False}]

    opt = fastlars.LARS(groups(), backend=backend, master_weights=master_weights, **kwargs)
    for step in range(STEPS):
        if step == 5:
            opt.add_param_group({"params": [params[-1]], "weight_decay": 0.02})
        if step == 10:
            state = opt.state_dict()
            opt = fastlars.LARS([*groups(), {"params": [params[-1]]}], backend=backend,
                                master_weights=master_weights, **kwargs)
            opt.load_state_dict(state)
        lr = kwargs["lr"] * (1.0 + 0.5 * math.sin(step))
        for group in opt.param_groups:
            group["lr"] = lr
        live = params if step >= 5 else params[:-1]
        for p, grad in zip(live, grads_for(step, live)):
            p.grad = None if grad is None else grad.to(device=device, dtype=dtype)
        opt.step()
    return params, opt


TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


@pytest.mark.parametrize("backend, variant, dtype", cases(sorted(VARIANTS), [torch.float64, torch.float32]))
def test_backend_matches_reference(backend, variant, dtype, monkeypatch):
    use_chunks(monkeypatch, 64, 16, 2)  # Triton: several chunks per tensor, partial blocks
    options = VARIANTS[variant]
    params, opt = run(backend, options, dtype)
    oracle, oracle_opt = run("reference", options, dtype)
    for i, (p, q) in enumerate(zip(params, oracle)):
        assert rel_err(p, q) <= TOLERANCE[dtype], (i, rel_err(p, q))
        for key, value in oracle_opt.state[q].items():
            assert rel_err(opt.state[p][key], value) <= 10 * TOLERANCE[dtype], (i, key)


BF16_VARIANTS = ["norm_of_sum", "momentum_update-nesterov", "lr_in_momentum-nesterov", "plain_sgd-trust_clip"]


def assert_bf16_masters_match(run_of, options):
    """bf16 parameters with fp32 masters (``run_of(backend)``: run()'s result) against the
    reference's: the masters to 1e-5 of each tensor's largest value, the parameters within 2
    bf16 ulps element-wise (plus that 1e-5) and equal to their masters rounded. Every reference master moved
    far past that tolerance from its first value (but the zero-gradient tensor under
    plain_sgd, which stays), so a tensor the backend left unchanged fails."""
    (params, opt), (oracle, oracle_opt) = run_of(None), run_of("reference")
    start = make_params(torch.bfloat16, params[0].device, resnet50=len(params) > 7)
    for i, (p, q, first) in enumerate(zip(params, oracle, start)):
        master, oracle_master = opt.state[p]["master_param"], oracle_opt.state[q]["master_param"]
        assert rel_err(master, oracle_master) <= 1e-5, (i, rel_err(master, oracle_master))
        assert_within_ulps(p, q, 2, atol=1e-5 * oracle_master.abs().max().item(), msg=f"parameter {i}")
        assert torch.equal(master.to(torch.bfloat16), p), i
        moved = (oracle_master - first.float()).abs().max().item() / oracle_master.abs().max().item()
        stays = i == 4 and options.get("zero_norm") == "plain_sgd"
        assert moved == 0 if stays else moved > 1e-3, (i, moved)


@pytest.mark.parametrize("backend, variant, dtype", cases(BF16_VARIANTS, [torch.bfloat16]))
def test_bf16_master_weights_match_reference(backend, variant, dtype, monkeypatch):
    use_chunks(monkeypatch, 64, 16, 2)
    options = VARIANTS[variant]
    assert_bf16_masters_match(lambda b: run(b or backend, options, dtype, master_weights=True), options)


GPU_BACKENDS = [b for b in ("triton", "cuda") if b in BACKENDS]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backend_matches_reference(backend, variant, dtype):
    """The compiled kernels (IEEE sqrt and division, the device-side flags, full chunks of
    ResNet-50's largest tensors) on CUDA tensors, against the reference on the same device."""
    params, opt = run(backend, VARIANTS[variant], dtype, device="cuda", resnet50=True)
    oracle, oracle_opt = run("reference", VARIANTS[variant], dtype, device="cuda", resnet50=True)
    for i, (p, q) in enumerate(zip(params, oracle)):
        assert rel_err(p, q) <= TOLERANCE[dtype], (i, rel_err(p, q))
        for key, value in oracle_opt.state[q].items():
            assert rel_err(opt.state[p][key], value) <= 10 * TOLERANCE[dtype], (i, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("variant", BF16_VARIANTS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bf16_master_weights_match_reference(backend, variant):
    """bf16 parameters with fp32 masters at ResNet-50 sizes, compiled, against the reference on the GPU."""
    options = VARIANTS[variant]
    assert_bf16_masters_match(lambda b: run(b or backend, options, torch.bfloat16, device="cuda",
                                            master_weights=True, resnet50=True), options)


def test_variants_change_the_steps():
    """Guard against vacuous cases: each variant's run differs from the default's, and the
    zero-weight and zero-gradient tensors move (the zero-norm rules are exercised)."""
    default, _ = run("reference", {}, torch.float64)
    start = make_params(torch.float64)
    for name, options in VARIANTS.items():
        params, _ = run("reference", options, torch.float64)
        assert max(rel_err(p, q) for p, q in zip(params, default)) > 1e-6, name
        moved = [not torch.equal(p, q) for p, q in zip(params, start)]
        # plain_sgd: the zero-gradient tensor steps as SGD on g = 0 (no decay): it stays
        assert moved == [options.get("zero_norm") != "plain_sgd" if i == 4 else True for i in range(len(moved))], name


# ---------------------------------------------------------------------------
# The reference against float64 NumPy, written from docs/contract.md, "LARS variants"


def lars_variant_np(w, g, state, *, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8,
                    dampening=0.0, nesterov=False, trust_clip=False, ratio_denominator="sum_of_norms",
                    zero_norm="ratio_one", trust_bounds=None, lr_in_momentum=False):
    """One step on one tensor; returns (new w, r, whether the ratio was computed)."""
    def norm(x):
        return math.sqrt(float(np.sum(x * x)))

    def momentum_of(d):
        if momentum == 0:
            return d
        state["buf"] = d.copy() if "buf" not in state else momentum * state["buf"] + (1 - dampening) * d
        return d + momentum * state["buf"] if nesterov else state["buf"]

    w_norm = norm(w)
    if ratio_denominator == "momentum_update":
        saved = dict(state)
        x_norm = norm(momentum_of(g + weight_decay * w))
        state.clear()
        state.update(saved)
    else:
        x_norm = norm(g) if ratio_denominator == "sum_of_norms" else norm(g + weight_decay * w)
    computed = w_norm > 0 and x_norm > 0
    if computed:
        extra = weight_decay * w_norm if ratio_denominator == "sum_of_norms" else 0.0
        r = trust_coefficient * w_norm / (x_norm + extra + eps)
    else:
        r = 1.0
    if trust_clip:
        r = min(r / lr, 1.0)
    if computed and trust_bounds is not None:
        r = min(max(r, trust_bounds[0]), trust_bounds[1])
    decay = weight_decay
    if not computed and zero_norm == "plain_sgd":
        r, decay = 1.0, 0.0
    if ratio_denominator == "momentum_update":
        return w - lr * r * momentum_of(g + decay * w), r, computed
    if lr_in_momentum:
        return w - momentum_of(lr * r * (g + decay * w)), r, computed
    return w - lr * momentum_of(r * (g + decay * w)), r, computed


W = [[0.5, -1.2, 0.8], [2.0, 0.3], [0.0, 0.0]]
GRADS = [
    [[0.3, -0.1, 0.25], [-0.05, 0.4], [0.2, -0.1]],
    [[-0.2, 0.35, 0.1], [0.0, 0.0], [0.1, 0.3]],
    [[0.05, 0.05, -0.4], [-0.3, 0.2], [-0.2, 0.1]],
]
LRS = [0.5, 0.2, 0.35]
HAND_CASES = {
    "norm_of_sum": dict(ratio_denominator="norm_of_sum", weight_decay=0.3),
    "momentum_update": dict(ratio_denominator="momentum_update", weight_decay=0.1),
    "momentum_update-nesterov": dict(ratio_denominator="momentum_update", weight_decay=0.1, nesterov=True),
    "momentum_update-no-momentum": dict(ratio_denominator="momentum_update", weight_decay=0.1, momentum=0.0),
    "plain_sgd": dict(zero_norm="plain_sgd", weight_decay=0.1),
    "plain_sgd-trust_clip": dict(zero_norm="plain_sgd", weight_decay=0.1, trust_clip=True, trust_coefficient=0.5),
    "trust_bounds": dict(trust_bounds=(0.012, 0.02), weight_decay=0.1),
    "lr_in_momentum": dict(lr_in_momentum=True, weight_decay=0.1, dampening=0.2),
    "lr_in_momentum-nesterov": dict(lr_in_momentum=True, weight_decay=0.1, nesterov=True),
}


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_reference_hand_computed(case):
    cfg = {"momentum": 0.9, "trust_coefficient": 0.02, **HAND_CASES[case]}
    params = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in W]
    opt = fastlars.LARS(params, lr=LRS[0], backend="reference", **cfg)
    ws = [np.array(v) for v in W]
    states = [{} for _ in W]
    ratios = []
    for lr, grads in zip(LRS, GRADS):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out = [lars_variant_np(w, np.array(g), st, lr=lr, **cfg) for w, g, st in zip(ws, grads, states)]
        ratios.append([(r, computed) for _, r, computed in out])
        ws = [o[0] for o in out]
        for p, w in zip(params, ws):
            assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-15)
    # the cases exercise what they name: computed ratios that differ from 1, and the zero-norm tensors
    assert any(c and abs(r - 1) > 1e-3 for step in ratios for r, c in step)
    assert not ratios[0][2][1]  # the zero weight
    if cfg.get("ratio_denominator", "sum_of_norms") == "sum_of_norms":
        assert not ratios[1][1][1]  # the zero gradient
    if "trust_bounds" in cfg:
        low, high = cfg["trust_bounds"]
        computed = [r for step in ratios for r, c in step if c]
        assert low in computed and high in computed  # both bounds bind


def test_plain_sgd_steps_the_zero_norm_tensors_as_sgd():
    """zero_norm="plain_sgd": a zero weight takes d = g (no decay); "ratio_one" decays it
    (d = g + wd w = g at w = 0 too, so compare on the zero-gradient tensor: ratio_one decays w)."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    for zero_norm, expected in (("plain_sgd", [1.0, -2.0]), ("ratio_one", [1.0 - 0.5 * 0.1, -2.0 + 0.5 * 0.2])):
        p = torch.nn.Parameter(w.detach().clone())
        opt = fastlars.LARS([p], lr=0.5, momentum=0.0, weight_decay=0.1, zero_norm=zero_norm, backend="reference")
        p.grad = torch.zeros_like(p)
        opt.step()
        assert_allclose(p.detach().numpy(), expected, rtol=1e-15)


# ---------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("options, match", [
    (dict(ratio_denominator="norm-of-sum"), "ratio_denominator"),
    (dict(ratio_denominator=None), "ratio_denominator"),
    (dict(zero_norm="one"), "zero_norm"),
    (dict(trust_bounds=(0.5, 0.1)), "trust_bounds"),
    (dict(trust_bounds=(-1.0, 1.0)), r"trust_bounds\[0\]"),
    (dict(trust_bounds=(0.1, float("nan"))), r"trust_bounds\[1\]"),
    (dict(trust_bounds=0.5), "trust_bounds"),
    (dict(trust_bounds=(math.inf, math.inf)), "trust_bounds"),
    (dict(lr_in_momentum=1), "lr_in_momentum"),
    (dict(lr_in_momentum=True, ratio_denominator="momentum_update"), "lr_in_momentum"),
])
def test_bad_options_are_refused(options, match):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises((ValueError, TypeError), match=match):
        fastlars.LARS([p], lr=0.1, backend="reference", **options)
    opt = fastlars.LARS([p], lr=0.1, backend="reference")
    with pytest.raises((ValueError, TypeError), match=match + r".* in param_groups\[1\]|param_groups\[1\]"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **options})
    # a group edited in place is refused at the step, before anything changes
    opt.param_groups[0].update(options)
    p.grad = torch.ones(3)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state[p]


def test_defaults_are_today():
    opt = fastlars.LARS([torch.nn.Parameter(torch.ones(1))])
    group = opt.param_groups[0]
    assert (group["ratio_denominator"], group["zero_norm"], group["trust_bounds"], group["lr_in_momentum"]) == (
        "sum_of_norms", "ratio_one", None, False)


@pytest.mark.skipif("cpu" not in fastlars.available_backends(), reason="needs the C++ extension")
def test_cuda_driver_sums_the_variants_only_where_a_group_needs_them(monkeypatch):
    """backend="cuda" (its driver on the CPU, the entry points recorded): the norms pass gets
    the group table (the kernels then sum the squares of g s + wd w or u) only when a group
    divides by ||g s + wd w|| or ||u||; FIRST marks, in the norms tables too, the tensors whose
    buffer this step creates (the kernel must not read their S0, which is W)."""
    from test_cuda_tables import RecordingCuda

    from fastlars.ops import cpp_step
    from fastlars.ops.layouts import LarsColumn, TensorColumn

    fake = RecordingCuda()
    monkeypatch.setattr(cpp_step, "_C", fake)
    monkeypatch.setattr(cpp_step, "_on_cuda", lambda lp: True)
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    opt = fastlars.LARS([{"params": params[:1]}, {"params": params[1:], "ratio_denominator": "momentum_update"}],
                        lr=0.1, backend="cpu")
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        fake.calls.clear()
        opt.step()
        (_, table, groups), = [c for c in fake.calls if c[0] == "sumsq"]
        assert groups is not None and groups[:, LarsColumn.AFTER_MOMENTUM].tolist() == [0.0, 1.0]
        assert table[:, TensorColumn.FIRST].tolist() == ([1, 1] if step == 0 else [0, 0])
    opt.param_groups[1]["ratio_denominator"] = "sum_of_norms"
    fake.calls.clear()
    opt.step()
    assert [c[2] for c in fake.calls if c[0] == "sumsq"] == [None]


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("options", [dict(ratio_denominator="momentum_update", nesterov=True),
                                     dict(ratio_denominator="norm_of_sum", lr_in_momentum=True,
                                          trust_bounds=(0.0, 0.1), zero_norm="plain_sgd")],
                         ids=["momentum_update", "norm_of_sum-lr_in_momentum"])
def test_variants_keep_one_eager_step_then_a_capture(options, monkeypatch):
    """capturable=True with the variants (test_gpu_readiness's recipe checks on the CPU): the
    state-creating step launches every later kernel variant (lars_sums_kernel, its OPTIONS)
    and builds the next step's tables (whose norms tables read the buffers just made)."""
    import test_gpu_readiness as readiness

    monkeypatch.setitem(readiness.CAPTURABLE, "LARS", {**readiness.CAPTURABLE["LARS"], **options})
    readiness.test_state_creating_step_launches_every_later_variant("LARS", monkeypatch)
    monkeypatch.undo()
    monkeypatch.setitem(readiness.CAPTURABLE, "LARS", {**readiness.CAPTURABLE["LARS"], **options})
    readiness.test_one_eager_step_then_a_capture("LARS", monkeypatch)


def _cancelling_steps(backend, denominator, residual, dtype):
    """Two steps on gradients where the vector the ratio divides by nearly cancels: step 1,
    g = -wd w + noise (d = g + wd w is the noise); step 2 ("momentum_update"), d chosen so
    that u = mu buf + (1 - dampening) d is the noise again; ||noise|| = residual times the
    cancelling terms' norm. Returns the two steps' weight changes."""
    torch.manual_seed(7)
    wd, mu, damp = 0.05, 0.9, 0.1
    w0 = torch.randn(4099, dtype=torch.float64)
    p = torch.nn.Parameter(w0.to(dtype))
    opt = fastlars.LARS([p], lr=0.5, momentum=mu, dampening=damp, weight_decay=wd, trust_coefficient=0.02,
                        ratio_denominator=denominator, backend=backend)
    noise = [torch.randn(4099, dtype=torch.float64) for _ in range(2)]
    deltas = []
    for step in range(2 if denominator == "momentum_update" else 1):
        w = p.detach().double().clone()  # a copy, also in float64
        cancel = wd * w if step == 0 else -mu / (1 - damp) * opt.state[p]["momentum_buffer"].double() - wd * w
        # step 0: g = -wd w + e, so d = e; step 1: g = -(mu / (1 - damp)) buf - wd w + e, so u = (1 - damp) e
        target = -wd * w if step == 0 else cancel
        e = noise[step] * (residual * target.norm() / noise[step].norm())
        p.grad = (target + e).to(dtype)
        opt.step()
        deltas.append(p.detach().double() - w)
    return deltas


@pytest.mark.parametrize("residual", [1e-3, 1e-4])
@pytest.mark.parametrize("denominator", ["norm_of_sum", "momentum_update"])
@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_denominator_norm_survives_cancellation(backend, denominator, residual, monkeypatch):
    """A ratio dividing by ||g + wd w|| or ||u|| where that vector nearly cancels: formed from
    sums of g^2, w g, w^2 (and buf's products) in fp32 it was 4 % off at a residual of 1e-3
    and 79 % at 1e-4; summed element by element, each fused backend's fp32 step has the
    fp32 reference's norm (its ratio: lr r ||x||), and the reference's the float64 one's. The
    steps' elements agree to the rounding of d = g + wd w itself (its cancellation: about
    eps32 / residual relative)."""
    use_chunks(monkeypatch, 64, 16, 2)
    fused = _cancelling_steps(backend, denominator, residual, torch.float32)
    oracle = _cancelling_steps("reference", denominator, residual, torch.float32)
    exact = _cancelling_steps("reference", denominator, residual, torch.float64)
    for step, (a, b, c) in enumerate(zip(fused, oracle, exact)):
        assert abs(a.norm() / b.norm() - 1) <= 1e-4, (step, (a.norm() / b.norm()).item())
        assert abs(b.norm() / c.norm() - 1) <= 1e-3, (step, (b.norm() / c.norm()).item())
        assert rel_err(a, c) <= 100 * 2**-24 / residual, (step, rel_err(a, c))
        assert c.abs().max() > 0  # the step moved the weights
