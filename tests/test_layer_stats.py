"""opt.layer_stats(): the last step's ‖w‖ (before the update), unscaled ‖g‖ and applied
trust ratio per tensor, equal on every backend, and equal to what the update did."""

import copy

import pytest
import torch
from torch import nn

import fastlars
from conftest import backend_params

BACKENDS = ["reference", "foreach", "cpu", "triton"]

LARS_CASES = {
    "default": dict(weight_decay=1e-3),
    "trust_clip": dict(weight_decay=1e-3, trust_clip=True),
    "norm_of_sum_bounds": dict(weight_decay=1e-2, ratio_denominator="norm_of_sum", trust_bounds=(0.5, 2.0),
                               trust_coefficient=0.01),
    "momentum_update": dict(weight_decay=1e-2, ratio_denominator="momentum_update", momentum=0.8, nesterov=True),
    "momentum_update_dampening": dict(weight_decay=1e-2, ratio_denominator="momentum_update", dampening=0.3),
    "plain_sgd_lr_in_momentum": dict(weight_decay=1e-3, zero_norm="plain_sgd", lr_in_momentum=True),
}
LAMB_CASES = {
    "default": dict(weight_decay=0.01, max_grad_norm=1.0),
    "direct_bounds": dict(weight_decay=0.05, decay_mode="direct", trust_bounds=(0.9, 1.1)),
    "deepspeed": dict(weight_decay=0.01, eps_inside_sqrt=True, bias_correction_in_lr=True, trust_clip=True),
}


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    with torch.no_grad():
        model[2].weight.zero_()  # a zero norm at the first step
    return model


def _groups(model):
    return [{"params": [p for p in model.parameters() if p.ndim > 1]},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "trust_ratio": False}]


def _step(model, opt, k):
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _stats_after(cls, kwargs, backend, steps=3):
    model = _model()
    opt = cls(_groups(model), lr=0.1, backend=backend, **kwargs)
    for k in range(steps):
        _step(model, opt, k)
    return opt.layer_stats()


def assert_same_stats(ours, ref, rtol=1e-12, atol=1e-14):
    """Two LayerStats of the same parameters agree, field by field; the reference's adapted
    tensors got ratios other than 1 (so that the ratios are compared where they are computed)."""
    for field in ("weight_norm", "grad_norm", "trust_ratio"):
        # the eager backends take no ‖w‖ of a group that does not adapt (read after the step)
        n = 2 if field == "weight_norm" else None
        torch.testing.assert_close(getattr(ours, field)[:n], getattr(ref, field)[:n], rtol=rtol, atol=atol,
                                   msg=field)
    assert not torch.equal(ref.trust_ratio[:2].cpu(), torch.ones(2, dtype=ref.trust_ratio.dtype))


@pytest.mark.parametrize("backend", backend_params(BACKENDS[1:]))
@pytest.mark.parametrize("cls, case", [(fastlars.LARS, c) for c in LARS_CASES] + [(fastlars.LAMB, c) for c in LAMB_CASES])
def test_every_backend_reports_the_references_stats(cls, case, backend):
    kwargs = (LARS_CASES if cls is fastlars.LARS else LAMB_CASES)[case]
    assert_same_stats(_stats_after(cls, kwargs, backend), _stats_after(cls, kwargs, "reference"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in fastlars.available_backends()])
@pytest.mark.parametrize("cls, case", [(fastlars.LARS, c) for c in LARS_CASES] + [(fastlars.LAMB, c) for c in LAMB_CASES])
def test_gpu_stats_eagerly_and_after_a_graph_replay(cls, case, backend):
    """On CUDA tensors (capturable=True, a device lr): the stats of eager steps and of CUDA-graph
    replays with new gradients and a new lr are the reference's for the same steps, and
    layer_stats() reads nothing on the host (torch's sync debug mode "error" raises on any
    synchronisation; a tensor lr with trust_clip is the case that read it). Stale stats (the capture's, or the last eager step's) would differ: every
    replay has new gradients."""
    kwargs = (LARS_CASES if cls is fastlars.LARS else LAMB_CASES)[case]
    model, twin = _model().cuda(), _model().cuda()
    lr = torch.tensor(0.1, dtype=torch.float64, device="cuda")
    opt = cls(_groups(model), lr=lr, backend=backend, capturable=True, skip_nonfinite=True, **kwargs)
    ref = cls(_groups(twin), lr=0.1, backend="reference", skip_nonfinite=True, **kwargs)
    g = torch.Generator(device="cuda").manual_seed(0)
    for p, q in zip(model.parameters(), twin.parameters()):  # static gradients: the graph reads these
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)

    def new_grads():
        for p, q in zip(model.parameters(), twin.parameters()):
            value = torch.randn(p.shape, device="cuda", dtype=p.dtype, generator=g)
            p.grad.copy_(value)
            q.grad.copy_(value)

    def stats_without_host_reads():
        torch.cuda.set_sync_debug_mode("error")
        try:
            return opt.layer_stats()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager steps create the state
        for _ in range(2):  # the first with a zero weight (a zero norm: ratio 1)
            new_grads()
            opt.step()
            ref.step()
            stats = stats_without_host_reads()
            assert_same_stats(stats, ref.layer_stats(), rtol=1e-10, atol=1e-12)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step_lr in (0.05, 0.2, 0.1):
        new_grads()
        lr.fill_(step_lr)
        for group in ref.param_groups:
            group["lr"] = step_lr
        graph.replay()
        ref.step()
        stats = stats_without_host_reads()
        assert_same_stats(stats, ref.layer_stats(), rtol=1e-10, atol=1e-12)
        assert stats.trust_ratio.device.type == "cuda"
    torch.cuda.synchronize()
    assert opt.skipped_steps == 0
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_stats_are_what_the_step_did(backend):
    """SGD-form LARS without momentum: w_new = w - lr r (g + wd w), so the reported ratio
    is ‖Δw‖ / (lr ‖g + wd w‖), the reported norms those of w before and of g."""
    model = _model()
    opt = fastlars.LARS(_groups(model), lr=0.1, momentum=0.0, weight_decay=1e-3, trust_clip=True, backend=backend)
    _step(model, opt, 0)
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, 1)
    stats = opt.layer_stats()
    assert stats.names == ["param_groups[0][0]", "param_groups[0][1]", "param_groups[1][0]", "param_groups[1][1]"]
    by_param = {id(p): i for i, p in enumerate(stats.params)}
    for p, w in zip(model.parameters(), before):
        i = by_param[id(p)]
        wd = 1e-3  # the optimizer's default, in both groups
        direction = p.grad + wd * w
        ratio = (p.detach() - w).norm() / (0.1 * direction.norm())
        if p.ndim > 1 or backend not in ("reference", "foreach"):
            torch.testing.assert_close(stats.weight_norm[i], w.norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(stats.grad_norm[i], p.grad.norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(stats.trust_ratio[i], ratio, rtol=1e-9, atol=0)
    assert set(stats.as_dict()) == set(stats.names)


def test_layer_stats_before_a_step_is_an_error():
    with pytest.raises(RuntimeError, match="after a step"):
        fastlars.LARS(_model().parameters()).layer_stats()


def test_named_parameters_name_the_stats():
    model = _model()
    opt = fastlars.LAMB(model.named_parameters(), lr=0.01, backend="foreach")
    _step(model, opt, 0)
    assert opt.layer_stats().names == [n for n, _ in model.named_parameters()]


def test_the_example_logs_every_layer(tmp_path):
    """examples/layer_stats.py writes one JSON line per logged step with each layer's norms
    and ratio; a weight layer is listed as pinned exactly when its ratio is 1 (LARC clip)."""
    import importlib.util
    import json
    from pathlib import Path

    pytest.importorskip("sklearn")
    path = Path(__file__).resolve().parent.parent / "examples" / "layer_stats.py"
    spec = importlib.util.spec_from_file_location("layer_stats_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "stats.jsonl"
    example.main(["--steps", "21", "--log-every", "10", "--out", str(out), "--backend", "foreach"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 10, 20]
    for line in lines:
        assert set(line["layers"]) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
        ratios = {name: layer["trust_ratio"] for name, layer in line["layers"].items()}
        assert all(0 < r <= 1 for r in ratios.values())
        assert line["pinned_at_clip"] == [n for n in ("0.weight", "2.weight", "4.weight") if ratios[n] >= 1.0]
