"""LAMB's variant options (docs/contract.md, "LAMB"): decay_mode, eps_inside_sqrt,
trust_bounds, bias_correction_in_lr, grad_norm_eps.

1. Every backend against the reference, on the options alone and on the combinations the
   peers use (apex FusedLAMB adam_w_mode=False, DeepSpeed FusedLamb, timm Lamb
   decoupled_decay=True), 20 steps with a changing lr, on parameters that exercise the
   edge rules: a zero-norm weight, an exactly-zero gradient, 1 and a prime number of
   elements, a parameter that joins late and one that loses its gradient, and a
   state_dict save and load mid-run.
2. The reference against the formulas, written out here in float64 numpy.
3. Bad values of the options.
"""

import copy
import math

import numpy as np
import pytest
import torch

import fastlars
from conftest import RESNET50_SHAPES, assert_within_ulps, backend_params
from test_optim_backends import use_chunks

FUSED = [b for b in ("cpu", "triton") if b in fastlars.available_backends()]
BACKENDS = ["foreach", *FUSED]

# one option at a time, then the peers' combinations
OPTIONS = {
    "l2": dict(decay_mode="l2"),
    "direct": dict(decay_mode="direct"),
    "eps_inside_sqrt": dict(eps_inside_sqrt=True, eps=1e-3),
    "trust_bounds": dict(trust_bounds=(0.2, 0.5), trust_clip=True),  # excludes 1: the zero-norm rule shows
    "bias_correction_in_lr": dict(bias_correction_in_lr=True),
    "grad_norm_eps": dict(max_grad_norm=2.0, grad_norm_eps=0.5),
    "apex-l2": dict(decay_mode="l2", adapt_only_decayed=True, max_grad_norm=1.0),
    "deepspeed": dict(eps_inside_sqrt=True, bias_correction_in_lr=True, trust_bounds=(0.01, 10.0),
                      grad_norm_eps=1e-6, max_grad_norm=1.0, eps=1e-8),
    "timm-direct": dict(decay_mode="direct", adapt_only_decayed=True, max_grad_norm=1.0),
}
PEERS = ["apex-l2", "deepspeed", "timm-direct"]
# (steps, state_dict reload after, "late" joins at, "leaves" loses its gradient at): the
# Triton interpreter runs ~0.5 s a step, so Triton runs a shorter schedule of the same events
SCHEDULES = {"full": (20, 9, 4, 14), "short": (8, 4, 2, 6)}

# name -> (shape, weight scale); weight scales far from 1 give ratios far from 1 (trust_bounds bind)
SHAPES = {"w": ((7, 13), 0.05), "zero_w": ((5,), 0.0), "zero_g": ((11,), 1.0), "one": ((1,), 3.0),
          "prime": ((31,), 4.0), "late": ((3, 3), 0.5), "leaves": ((6,), 0.5), "bias": ((13,), 0.1)}


def make_params(dtype, device="cpu", resnet50=False):
    """SHAPES, and with ``resnet50`` ResNet-50's largest tensors (drawn on the device, decayed)."""
    gen = torch.Generator().manual_seed(0)
    params = {name: torch.nn.Parameter((scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, dtype))
              for name, (shape, scale) in SHAPES.items()}
    if resnet50:
        big = torch.Generator(device).manual_seed(1)
        params.update({name: torch.nn.Parameter((0.05 * torch.randn(shape, generator=big, dtype=torch.float64,
                                                                    device=device)).to(dtype))
                       for name, shape in RESNET50_SHAPES.items()})
    return params


def groups_of(params, adapt_only_decayed):
    decayed = [params[n] for n in ("w", "zero_w", "zero_g", "one", "prime", "late", "leaves", *RESNET50_SHAPES)
               if n in params]
    # adapt_only_decayed: a group without decay that would adapt, so that the option shows
    no_decay = dict(weight_decay=0.0, trust_ratio=adapt_only_decayed)
    return [{"params": decayed, "weight_decay": 0.05}, {"params": [params["bias"]], **no_decay}]


def set_grads(params, step, dtype, joins_at, leaves_at):
    """Seeded gradients, a zero gradient, a late parameter and one that loses its gradient
    (ResNet-50's tensors: drawn on their device)."""
    gen = torch.Generator().manual_seed(1000 + step)
    for name, p in params.items():
        if name in RESNET50_SHAPES:
            big = torch.Generator(p.device).manual_seed(2000 + step)
            g = torch.randn(p.shape, generator=big, dtype=torch.float64, device=p.device)
        else:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (1.0 + 0.3 * math.cos(step))
        if name == "zero_g":
            g = torch.zeros_like(g)
        p.grad = g.to(p.device, dtype)
        if (name == "late" and step < joins_at) or (name == "leaves" and step >= leaves_at):
            p.grad = None


def run(backend, options, dtype, reload=True, master_weights=False, schedule="full", device="cpu", resnet50=False):
    steps, reload_at, joins_at, leaves_at = SCHEDULES[schedule]
    params = make_params(dtype, device, resnet50)
    kwargs = dict(lr=0.02, backend=backend, master_weights=master_weights, **options)
    opt = fastlars.LAMB(groups_of(params, options.get("adapt_only_decayed", False)), **kwargs)
    for step in range(steps):
        lr = 0.02 * (1.0 + 0.5 * math.sin(step))  # changes every step
        for group in opt.param_groups:
            group["lr"] = lr
        set_grads(params, step, dtype, joins_at, leaves_at)
        opt.step()
        if reload and step == reload_at:  # a new optimizer from the state dict continues the run
            state = copy.deepcopy(opt.state_dict())
            opt = fastlars.LAMB(groups_of(params, options.get("adapt_only_decayed", False)), **kwargs)
            opt.load_state_dict(state)
    return params, opt


def max_rel_err(params, oracle):
    scale = max(q.abs().max().item() for q in oracle.values())
    return max((p.double() - oracle[n].double()).abs().max().item() / scale for n, p in params.items())


@pytest.fixture
def small_triton_chunks(monkeypatch):
    """Triton chunks smaller than the larger tensors: several chunks per tensor."""
    use_chunks(monkeypatch, 32, 16, 2)


@pytest.fixture(scope="module")
def oracles():
    """The reference runs (float64 and float32) by option, computed once."""
    cache = {}

    def get(name, dtype, schedule="full"):
        if (name, dtype, schedule) not in cache:
            cache[name, dtype, schedule] = run("reference", OPTIONS[name], dtype, schedule=schedule)[0]
        return cache[name, dtype, schedule]

    return get


# fp64: every backend to rounding (foreach forms 1 - beta^t in the compute dtype)
FP64_TOL = {"foreach": 1e-12, "cpu": 1e-12, "triton": 1e-12}
FP32_TOL = 2e-5


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("name", list(OPTIONS))
def test_backends_match_reference(backend, name, oracles, small_triton_chunks):
    dtypes = [torch.float64, torch.float32]
    schedule = "short" if backend == "triton" else "full"
    if backend == "triton" and name != "deepspeed":
        dtypes = [torch.float32]  # the interpreter is slow: fp64 on the combination of the most options
    for dtype in dtypes:
        params, _ = run(backend, OPTIONS[name], dtype, schedule=schedule)
        tol = FP64_TOL[backend] if dtype == torch.float64 else FP32_TOL
        assert max_rel_err(params, oracles(name, dtype, schedule)) <= tol, (backend, name, dtype)


GPU_BACKENDS = [b for b in ("cuda", "triton") if b in fastlars.available_backends()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_match_reference(backend, name, dtype):
    """The compiled kernels (IEEE sqrt and division, fma contraction, full chunks of ResNet-50's
    largest tensors) against the reference on the same GPU."""
    params, _ = run(backend, OPTIONS[name], dtype, device="cuda", resnet50=True)
    oracle, _ = run("reference", OPTIONS[name], dtype, device="cuda", resnet50=True)
    assert max_rel_err(params, oracle) <= (1e-12 if dtype == torch.float64 else FP32_TOL)


def assert_bf16_masters_match(run_of):
    """bf16 parameters with fp32 masters (``run_of(backend)``: run()'s result; None: the backend
    under test) against the reference's: the masters to 1e-5 of each tensor's largest value (and
    at least 1), the parameters within 2 bf16 ulps element-wise (plus that 1e-5) and equal to
    their masters rounded. Every reference master moved far past that tolerance, so a tensor the backend left
    unchanged fails."""
    (params, opt), (oracle, oracle_opt) = run_of(None), run_of("reference")
    start = make_params(torch.bfloat16, next(iter(params.values())).device, resnet50="conv3x3" in params)
    for n, p in params.items():
        master, oracle_master = opt.state[p]["master_param"], oracle_opt.state[oracle[n]]["master_param"]
        scale = oracle_master.abs().max().clamp_min(1.0)
        assert (master - oracle_master).abs().max() <= 1e-5 * scale, n
        assert_within_ulps(p, oracle[n], 2, atol=1e-5 * scale.item(), msg=n)
        assert torch.equal(master.to(torch.bfloat16), p), n
        assert (oracle_master - start[n].float()).abs().max() > 1e-3 * scale, f"{n} did not move"


@pytest.mark.parametrize("backend", backend_params(["foreach", *[b for b in FUSED if b != "triton"]]))
@pytest.mark.parametrize("name", PEERS)
def test_bf16_master_weights_match_reference(backend, name):
    assert_bf16_masters_match(lambda b: run(b or backend, OPTIONS[name], torch.bfloat16, reload=False,
                                            master_weights=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bf16_master_weights_match_reference(backend, name):
    """bf16 parameters with fp32 masters at ResNet-50 sizes, compiled, against the reference on the GPU."""
    assert_bf16_masters_match(lambda b: run(b or backend, OPTIONS[name], torch.bfloat16, reload=False,
                                            master_weights=True, device="cuda", resnet50=True))


def test_reload_mid_run_continues_bitwise():
    """The reference with the optimizer rebuilt from its state dict mid-run equals the run without."""
    for name in PEERS:
        reloaded, _ = run("reference", OPTIONS[name], torch.float64, reload=True)
        straight, _ = run("reference", OPTIONS[name], torch.float64, reload=False)
        for n in reloaded:
            assert torch.equal(reloaded[n], straight[n]), (name, n)


def test_defaults_are_the_plain_lamb(oracles):
    """Each option at its default value gives today's LAMB, bit for bit."""
    plain, _ = run("reference", {}, torch.float64)
    explicit, _ = run("reference", dict(decay_mode="update", eps_inside_sqrt=False, trust_bounds=None,
                                        bias_correction_in_lr=False, grad_norm_eps=0.0), torch.float64)
    assert all(torch.equal(plain[n], explicit[n]) for n in plain)
    for name in ("l2", "direct", "eps_inside_sqrt", "trust_bounds", "bias_correction_in_lr", "grad_norm_eps"):
        assert max_rel_err(oracles(name, torch.float64), plain) > 1e-6, f"{name} changed nothing"


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_options_changed_between_steps(backend):
    """Options changed in a group mid-run reach the kernels: the cached launch tables get the
    new group rows (launch.set_group_rows), as the reference reads the group."""
    runs = {}
    for b in ("reference", backend):
        params = make_params(torch.float32)
        opt = fastlars.LAMB(groups_of(params, False), lr=0.02, backend=b, max_grad_norm=1.0)
        for step, change in enumerate([{}, {}, OPTIONS["deepspeed"], {}, OPTIONS["timm-direct"], {}]):
            for group in opt.param_groups:
                group.update(change)
            set_grads(params, step, torch.float32, 0, 99)
            opt.step()
        runs[b] = params
    assert max_rel_err(runs[backend], runs["reference"]) <= FP32_TOL


# ---------------------------------------------------------------------------
# the reference against the formulas of docs/contract.md, "LAMB", in float64 numpy

def lamb_np(ws, gs, states, *, lr, betas=(0.9, 0.999), eps=1e-6, wd=0.0, max_grad_norm=0.0, decay_mode="update",
            eps_inside_sqrt=False, trust_bounds=None, bias_correction_in_lr=False, grad_norm_eps=0.0):
    """One step of one adapted group (bias correction, grad averaging, no trust_clip)."""
    b1, b2 = betas
    G = math.sqrt(sum(float(np.sum(g * g)) for g in gs))
    out = []
    for w, g, st in zip(ws, gs, states):
        if max_grad_norm > 0:
            g = g / max(1.0, (G + grad_norm_eps) / max_grad_norm)
        if decay_mode == "l2":
            g = g + wd * w
        t = st["t"] = st.get("t", 0) + 1
        m = st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * g
        v = st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * g * g
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        scale = 1.0
        if bias_correction_in_lr:
            m_hat, v_hat, scale = m, v, math.sqrt(bc2) / bc1
        else:
            m_hat, v_hat = m / bc1, v / bc2
        u = m_hat / (np.sqrt(v_hat + eps) if eps_inside_sqrt else np.sqrt(v_hat) + eps)
        if decay_mode == "update":
            u = u + wd * w
        if decay_mode == "direct":
            w = w * (1 - lr * wd)
        w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(u)
        r = 1.0
        if w_norm > 0 and u_norm > 0:
            r = w_norm / u_norm
            if trust_bounds is not None:
                r = min(max(r, trust_bounds[0]), trust_bounds[1])
        out.append((w - lr * scale * r * u, r))
    return out


HAND_W = [np.array([0.5, -1.2, 0.8]), np.array([0.02, -0.03]), np.array([0.0, 0.0])]
HAND_G = [[np.array([0.3, 0.1, -0.2]), np.array([1.0, -2.0]), np.array([0.5, 0.5])],
          [np.array([-0.1, 0.4, 0.2]), np.array([0.5, 1.5]), np.array([-0.5, 0.25])],
          [np.array([0.2, -0.3, 0.1]), np.array([-1.0, 0.5]), np.array([0.1, 0.2])]]
HAND_CASES = {
    "l2": dict(decay_mode="l2", wd=0.3, max_grad_norm=1.0),  # clipped at every step: decay after the clip
    "direct": dict(decay_mode="direct", wd=0.5),  # lr wd = 0.05: ||w|| before and after differ by 5%
    "eps_inside_sqrt": dict(eps_inside_sqrt=True, eps=0.01, wd=0.1),
    # W1's ratio ~0.6-1 and W2's ~0.02 are clamped; the zero weight's 1 (step 1) is kept
    "trust_bounds": dict(trust_bounds=(0.05, 0.5), wd=0.1),
    "bias_correction_in_lr": dict(bias_correction_in_lr=True, wd=0.1),
    "grad_norm_eps": dict(max_grad_norm=2.5, grad_norm_eps=0.75, wd=0.1),  # G = 2.37 at step 1: clipped by eps
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_reference_hand_computed(case):
    cfg = HAND_CASES[case]
    lr = 0.1
    params = [torch.nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in HAND_W]
    options = {k: v for k, v in cfg.items() if k != "wd"}
    if "trust_bounds" in options:
        options["trust_bounds"] = tuple(options["trust_bounds"])
    opt = fastlars.LAMB(params, lr=lr, weight_decay=cfg["wd"], backend="reference", **options)
    ws, states = [w.copy() for w in HAND_W], [{}, {}, {}]
    ratios = []
    for grads in HAND_G:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        expected = lamb_np(ws, grads, states, lr=lr, **cfg)
        ws = [w for w, _ in expected]
        ratios.append([r for _, r in expected])
        for p, w in zip(params, ws):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-15)
    assert ratios[0][2] == 1.0, "the zero-norm weight keeps ratio 1"
    if case == "trust_bounds":
        assert any(r[0] == 0.5 for r in ratios) and any(r[1] == 0.05 for r in ratios), "a bound never bound"
    if case == "grad_norm_eps":
        G = [math.sqrt(sum(float(np.sum(g * g)) for g in grads)) for grads in HAND_G]
        assert any(g < cfg["max_grad_norm"] < g + cfg["grad_norm_eps"] for g in G), "grad_norm_eps decided nothing"


def test_direct_takes_the_norm_after_the_decay():
    """timm decoupled_decay: r = ||w (1 - lr wd)|| / ||u||, not ||w|| / ||u|| (a 5% difference here)."""
    w0, g = np.array([3.0, 4.0]), np.array([1.0, -1.0])
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = fastlars.LAMB([p], lr=0.1, weight_decay=0.5, decay_mode="direct", backend="reference")
    p.grad = torch.tensor(g)
    opt.step()
    u = np.array([1.0, -1.0]) / (1.0 + 1e-6)  # first step: m_hat = g, sqrt(v_hat) = |g|
    decayed = w0 * (1 - 0.05)
    expected = decayed - 0.1 * (np.linalg.norm(decayed) / np.linalg.norm(u)) * u
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("decoupled_decay", [False, True])
def test_reference_equals_timm_lamb(decoupled_decay):
    """timm.optim.Lamb (max_grad_norm=1, no always_adapt) and LAMB(adapt_only_decayed=True,
    decay_mode "update" / "direct") agree to fp64 rounding: the same maths, another order."""
    timm_lamb = pytest.importorskip("timm.optim.lamb")
    runs = []
    for make in (lambda groups: timm_lamb.Lamb(groups, lr=0.02, max_grad_norm=1.0, decoupled_decay=decoupled_decay),
                 lambda groups: fastlars.LAMB(groups, lr=0.02, max_grad_norm=1.0, adapt_only_decayed=True,
                                              decay_mode="direct" if decoupled_decay else "update",
                                              backend="reference")):
        params = make_params(torch.float64)
        groups = groups_of(params, adapt_only_decayed=True)
        groups[1]["params"] += [groups[0]["params"].pop(1)]  # the zero-norm weight, undecayed
        opt = make(groups)
        for step in range(15):
            set_grads(params, step, torch.float64, 0, 99)
            opt.step()
        runs.append(params)
    assert max_rel_err(runs[1], runs[0]) <= 1e-14


# ---------------------------------------------------------------------------
# bad values: a clear error naming the option, before anything changes

@pytest.mark.parametrize("options, error, words", [
    (dict(decay_mode="adamw"), ValueError, "decay_mode"),
    (dict(decay_mode=None), ValueError, "decay_mode"),
    (dict(eps_inside_sqrt=1), TypeError, "eps_inside_sqrt"),
    (dict(bias_correction_in_lr="yes"), TypeError, "bias_correction_in_lr"),
    (dict(bias_correction_in_lr=True, bias_correction=False), ValueError, "bias_correction_in_lr"),
    (dict(trust_bounds=(2.0, 1.0)), ValueError, "trust_bounds"),
    (dict(trust_bounds=(-0.1, 1.0)), ValueError, "trust_bounds"),
    (dict(trust_bounds=(0.1,)), ValueError, "trust_bounds"),
    (dict(trust_bounds=(0.1, math.nan)), ValueError, "trust_bounds"),
    (dict(grad_norm_eps=-1e-6), ValueError, "grad_norm_eps"),
    (dict(grad_norm_eps=math.inf), ValueError, "grad_norm_eps"),
])
def test_bad_options(options, error, words):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(error, match=words):
        fastlars.LAMB([p], **options)
    opt = fastlars.LAMB([p])
    with pytest.raises(error, match=rf"{words}.*param_groups\[1\]|param_groups\[1\].*{words}"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **options})
    # changed in a group after construction: refused at the step, before anything changes
    opt.param_groups[0].update(options)
    p.grad = torch.ones(3)
    with pytest.raises(error, match=words):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state[p]


def test_bounds_accept_inf_high():
    p = torch.nn.Parameter(torch.ones(3))
    fastlars.LAMB([p], trust_bounds=(0.0, math.inf))


# ---------------------------------------------------------------------------
# sharded parameters (FSDP2): ||u|| follows the options (lamb.py _norms_phase, the fused
# norms passes), ||w|| of "direct" is the decayed weights' global norm

# every option that changes u or the ratio at once (l2 changes u through g, as the
# single-process tests check); two all-reduces a step with clipping
SHARDED = {"LAMB-variants": dict(lr=0.02, weight_decay=0.5, decay_mode="direct", eps_inside_sqrt=True,
                                 bias_correction_in_lr=True, trust_bounds=(0.5, 0.9), grad_norm_eps=0.1,
                                 max_grad_norm=0.5)}


def _sharded_worker(rank, world, name, backend, init_file, out_file):
    import test_distributed_fsdp as fsdp

    per_step = 2 if SHARDED[name].get("max_grad_norm", 0) > 0 else 1  # all-reduces (see test_distributed_fsdp)
    fsdp.OPTIMIZERS[name] = (fastlars.LAMB, SHARDED[name], per_step)
    fsdp.worker(rank, world, name, backend, init_file, out_file)


@pytest.mark.parametrize("backend", backend_params([b for b in ("foreach", "cpu") if b in fastlars.available_backends()]))
@pytest.mark.parametrize("name", list(SHARDED))
def test_sharded_equals_single_process(name, backend, tmp_path):
    fsdp = pytest.importorskip("test_distributed_fsdp")
    import torch.multiprocessing as mp

    out = tmp_path / "params.pt"
    mp.spawn(_sharded_worker, args=(3, name, backend, str(tmp_path / "store"), str(out)), nprocs=3, join=True)
    m, _ = fsdp.single_process(fastlars.LAMB, SHARDED[name], backend)
    full, _ = torch.load(out)
    for p, q in zip(full, m.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-6)
