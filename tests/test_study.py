"""The large-batch study's pieces: the gradient noise scale, FGSM / ABSA, the study CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fastlars.adversarial import adversarial_loss, fgsm
from fastlars.noise_scale import GradientNoiseScale
from fastlars.train import accumulate_gradients

# ---------------------------------------------------------------------------------------------
# Gradient noise scale on least squares with Gaussian inputs and noise, where everything is known:
# loss_i = (w.x_i - y_i)^2 / 2, x ~ N(0, I_d), y = w*.x + N(0, s^2), D = w - w*:
#   G = D, |G|^2 = |D|^2;  tr(Sigma) = (d + 1)|D|^2 + d s^2  (fourth moment of a Gaussian).


def _least_squares(d=64, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + torch.randn(d, generator=g)).unsqueeze(0))
    delta2 = float(((model.weight.detach()[0] - w_star) ** 2).sum())
    trace = (d + 1) * delta2 + d * noise ** 2

    def batch(n):
        x = torch.randn(n, d, generator=g)
        return x, x @ w_star + noise * torch.randn(n, generator=g)

    return model, batch, delta2, trace


def _mse(out, y):
    return 0.5 * ((out.squeeze(1) - y) ** 2).mean()


@pytest.mark.parametrize("micro", [16, 32])
def test_noise_scale_matches_closed_form_whatever_the_split(micro):
    model, batch, delta2, trace = _least_squares()
    # gradient norms are heavy-tailed (Gaussian fourth moments): 1000 steps for a few % of spread, and
    # beta close to 1, which with the bias correction is close to a plain average over them
    tracker = GradientNoiseScale(beta=0.9995)
    for _ in range(1000):
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, _mse, *batch(64), micro, noise_scale=tracker)
    assert tracker.grad_sq_norm == pytest.approx(delta2, rel=0.1)
    assert tracker.trace_covariance == pytest.approx(trace, rel=0.1)
    assert tracker.b_simple == pytest.approx(trace / delta2, rel=0.1)


def test_accumulate_gradients_feeds_the_first_micro_batch_and_the_accumulated_gradient():
    model, batch, _, _ = _least_squares(seed=1)
    x, y = batch(24)
    grads = []
    for n in (8, 24):  # the batch-8 and batch-24 gradients, one backward each
        model.zero_grad(set_to_none=True)
        _mse(model(x[:n]), y[:n]).backward()
        grads.append(float((model.weight.grad ** 2).sum()))
    expected = GradientNoiseScale(beta=0.5)
    expected.update(grads[0], 8, grads[1], 24)
    tracker = GradientNoiseScale(beta=0.5, params=list(model.parameters()))
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, _mse, x, y, 8, noise_scale=[tracker])
    assert loss == pytest.approx(float(_mse(model(x), y).detach()), rel=1e-5)
    assert tracker.steps == 1
    assert tracker.grad_sq_norm == pytest.approx(expected.grad_sq_norm, rel=1e-4)
    assert tracker.trace_covariance == pytest.approx(expected.trace_covariance, rel=1e-4)
    # the accumulated gradient is the full batch's, untouched by the measurement
    assert float((model.weight.grad ** 2).sum()) == pytest.approx(grads[1], rel=1e-5)


def test_noise_scale_state_dict_and_bad_input():
    tracker = GradientNoiseScale(beta=0.9)
    assert math.isnan(tracker.b_simple)
    tracker.update(5.0, 4, 2.0, 16)
    tracker.update(torch.tensor(4.0), 4, torch.tensor(1.5), 16)
    copy = GradientNoiseScale()
    copy.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert (copy.b_simple, copy.steps, copy.beta) == (pytest.approx(tracker.b_simple), 2, 0.9)
    with pytest.raises(ValueError, match="big_batch"):
        tracker.update(1.0, 8, 1.0, 8)
    with pytest.raises(ValueError, match="small_batch"):
        tracker.update(1.0, 0, 1.0, 8)
    with pytest.raises(ValueError, match="beta"):
        GradientNoiseScale(beta=1.0)
    model, batch, _, _ = _least_squares()
    x, y = batch(16)
    with pytest.raises(ValueError, match="two micro-batches"):
        accumulate_gradients(model, _mse, x, y, 16, noise_scale=tracker)
    _mse(model(x), y).backward()  # stale gradient in .grad
    with pytest.raises(ValueError, match="zero gradients"):
        accumulate_gradients(model, _mse, x, y, 4, noise_scale=tracker)
    with pytest.raises(TypeError, match="noise_scale"):
        accumulate_gradients(model, _mse, x, y, 4, noise_scale=[object()])
    assert tracker.steps == 2


# ---------------------------------------------------------------------------------------------
# FGSM and ABSA


def _signed_linear_loss(out, y):
    return (out.squeeze(1) * y).sum()  # d/dx = y * w


def test_fgsm_hand_computed_on_a_linear_model():
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    x = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.2, -0.3]])
    y = torch.tensor([1.0, -1.0])
    adv = fgsm(model, _signed_linear_loss, x, y, eps=0.25)
    # sign(y * w): (+, -, +) for y = +1 and (-, +, -) for y = -1
    torch.testing.assert_close(adv, torch.tensor([[0.25, -0.25, 0.25], [0.65, 0.45, -0.55]]))
    clamped = fgsm(model, _signed_linear_loss, x, y, eps=0.25, clamp=(0.0, 0.5))
    torch.testing.assert_close(clamped, torch.tensor([[0.25, 0.0, 0.25], [0.5, 0.45, 0.0]]))
    assert model.weight.grad is None and not adv.requires_grad  # the attack left no parameter gradient
    weight = 0.25
    mixed = adversarial_loss(model, _signed_linear_loss, x, y, 0.25, weight=weight)
    expected = (1 - weight) * _signed_linear_loss(model(x), y) + weight * _signed_linear_loss(model(adv), y)
    torch.testing.assert_close(mixed, expected)
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, _signed_linear_loss, x, y, eps=-1.0)
    with pytest.raises(ValueError, match="clamp"):
        fgsm(model, _signed_linear_loss, x, y, eps=0.1, clamp=(1.0, 0.0))
    with pytest.raises(ValueError, match="weight"):
        adversarial_loss(model, _signed_linear_loss, x, y, 0.1, weight=2.0)


@pytest.mark.parametrize("training", [True, False])
def test_fgsm_keeps_the_model_mode_and_its_batch_norm_statistics(training):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    adv = fgsm(model, nn.functional.cross_entropy, x, y, eps=0.1)
    assert model.training is training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and (adv != x).any()


# ---------------------------------------------------------------------------------------------
# The study


def _toy_data(n=256, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(4, length, generator=g)

    def split(m):
        y = torch.randint(0, 4, (m,), generator=g)
        return centres[y] + torch.randn(m, length, generator=g), y

    (x, y), (xv, yv), (xt, yt) = split(n), split(64), split(64)
    return {"x": x, "y": y, "x_val": xv, "y_val": yv, "x_test": xt, "y_test": yt}


def test_absa_batch_trajectory_on_a_toy_problem(monkeypatch):
    from fastlars.study import core

    # The Hessian eigenvalue halves after every epoch: ABS doubles the batch each time, up to the sweep's batch.
    eigenvalues = iter([8.0, 3.9, 1.9, 0.9, 0.4, 0.2, 0.1])
    real = core._sharpness
    monkeypatch.setattr(core, "_sharpness", lambda model, data, subset, iters: (
        [next(eigenvalues)] * model.members if subset == 256 else real(model, data, subset, iters)))
    spec = core.RunSpec("toy", "mlp", "absa", 128, (0.05, 0.1), (0,), 6, 16, 0)
    record = core.train_run(spec, _toy_data(), target=0.5, sharpness_subset=32, sharpness_iters=2)
    batches = [b for _, b in record["batch_trajectory"]]
    assert batches == [16, 32, 64, 128]  # start at 128 // 8, x2 per halving, capped at 128
    steps = [s for s, _ in record["batch_trajectory"]]
    # the first eigenvalue (after one epoch at 16) is the reference; the batch grows after the second epoch
    assert steps == [0, 2 * 256 // 16, 2 * 256 // 16 + 256 // 32, 2 * 256 // 16 + 256 // 32 + 256 // 64]
    assert record["samples_seen"] == 6 * 256 and record["updates"] < 6 * 256 // 16
    assert sum(m["test"] is not None for m in record["members"]) == 1  # only the lr chosen on validation


def test_study_cli_end_to_end_resume_and_bad_input(tmp_path, capsys):
    from fastlars.study import main

    out = tmp_path / "study"
    args = ["--quick", "--recipes", "sgd,absa", "--epochs", "1", "--out", str(out), "--no-progress"]
    first = main(args)
    assert first["trained"] == 4
    for name in ("runs.json", "results.json", "results.md", "test_accuracy.png", "steps_to_target.png",
                 "sharpness.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert {(r["recipe"], r["batch"]) for r in results["summary"]["rows"]} == {
        (r, b) for r in ("sgd", "absa") for b in (64, 512)}
    assert results["summary"]["b_simple"] > 0
    second = main(args)  # resumes: every run comes from the cache
    assert second["trained"] == 0
    assert second["summary"]["rows"] == first["summary"]["rows"]
    # a target no run reaches: reported as such, from the cached runs
    unreachable = main(args + ["--target", "1.0"])
    assert unreachable["trained"] == 0
    assert all(r["steps_to_target"] is None for r in unreachable["summary"]["rows"])
    assert all(c["critical_batch"] is None for c in unreachable["summary"]["critical"].values())
    assert "not reached" in (out / "results.md").read_text()
    capsys.readouterr()
    for bad, message in ((["--recipes", "sgd,nope"], "unknown"), (["--dataset", "cifar"], "--dataset"),
                         (["--batches", "64,100000"], "larger than the training set"),
                         (["--batches", "64,big"], "--batches")):
        with pytest.raises(SystemExit):
            main(["--quick", "--out", str(tmp_path / "bad"), "--no-progress"] + bad)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
@pytest.mark.parametrize("virtual_batch_size", [None, 4])
def test_ensemble_members_are_independent_models(model_name, virtual_batch_size):
    from fastlars.study.core import MODELS
    from fastlars.study.ensemble import ensemble_loss

    cls = MODELS[model_name]
    pair = cls([3, 5], 12, virtual_batch_size=virtual_batch_size)
    alone = cls([5], 12, virtual_batch_size=virtual_batch_size)  # the same seed, the same initial weights
    # 12 samples: ghosts of 4. A 10-sample batch left a ghost of 2, whose normalised values
    # are +-1 whatever the input: gradients through it are rounding noise scaled by 1/sigma,
    # and member and model then differed by up to 4e-4 on some random draws (seen in CI).
    torch.manual_seed(0)
    x, y = torch.randn(12, 12), torch.randint(0, 10, (12,))
    inputs = torch.stack([torch.randn(12, 12), x], 1)  # member 0 sees other data than member 1
    for training in (True, False):
        pair.train(training), alone.train(training)
        torch.testing.assert_close(pair(inputs)[:, 1], alone(x)[:, 0])
    pair.train(), alone.train()
    ensemble_loss(pair(inputs), torch.stack([y, y], 1)).backward()
    ensemble_loss(alone(x), y).backward()
    for p, q in zip(pair.member_parameters(1), alone.member_parameters(0)):
        torch.testing.assert_close(p.grad, q.grad)


def test_top_eigenvalues_of_independent_blocks_match_each_block_alone():
    from fastlars.hessian import top_eigenvalue, top_eigenvalues

    torch.manual_seed(0)
    nets = nn.ModuleList(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(2))
    x, y = torch.randn(16, 3), torch.randn(16)

    def loss_of(i):
        return lambda out, target: ((out[i].squeeze(1) - target) ** 2).mean()

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.nets = nets

        def forward(self, inp):
            return [net(inp) for net in self.nets]

    both = Both()
    blocks = [list(net.parameters()) for net in nets]
    together = top_eigenvalues(both, lambda out, t: loss_of(0)(out, t) + loss_of(1)(out, t), [(x, y)], blocks,
                               iters=200, tol=1e-7)
    for i, net in enumerate(nets):
        alone = top_eigenvalue(net, lambda out, t: ((out.squeeze(1) - t) ** 2).mean(), [(x, y)], iters=200, tol=1e-7)
        assert together[i] == pytest.approx(alone, rel=1e-3)
    with pytest.raises(ValueError, match="blocks"):
        top_eigenvalues(both, loss_of(0), [(x, y)], [[]])
