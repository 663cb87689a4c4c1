"""Gradient accumulation equals one big batch; the Hessian's top eigenvalue equals the
explicit Hessian's; the adaptive batch size grows as the eigenvalue falls."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fastlars
from fastlars.hessian import AdaptiveBatchSize, top_eigenvalue
from fastlars.train import accumulate_gradients


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def test_accumulation_equals_one_big_batch():
    model = mlp()
    big = copy.deepcopy(model)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loss = accumulate_gradients(model, F.cross_entropy, x, y, micro_batch_size=8)
    reference = F.cross_entropy(big(x), y)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), big.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_accumulation_with_ghost_bn_matches_ghosts_over_the_batch():
    """Ghosts that divide the micro-batch: accumulation equals one pass over the batch."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), fastlars.GhostBatchNorm2d(4, 4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 2))
    big = copy.deepcopy(model)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 2, (16,))
    accumulate_gradients(model, F.cross_entropy, x, y, micro_batch_size=8, memory_format=torch.channels_last)
    F.cross_entropy(big(x), y).backward()
    for p, q in zip(model.parameters(), big.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_accumulation_bad_input():
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        accumulate_gradients(mlp(), F.cross_entropy, torch.randn(10, 6), torch.zeros(10, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="micro_batch_size must be"):
        accumulate_gradients(mlp(), F.cross_entropy, torch.randn(8, 6), torch.zeros(8, dtype=torch.long), 0)


def test_top_eigenvalue_matches_explicit_hessian():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().flatten() for p in params])

    def loss_of(flat_params):
        chunks, i = [], 0
        for s in shapes:
            n = torch.Size(s).numel()
            chunks.append(flat_params[i:i + n].view(s))
            i += n
        h = torch.tanh(x @ chunks[0].T + chunks[1])
        return F.mse_loss(h @ chunks[2].T + chunks[3], y)

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    expected = eigenvalues[eigenvalues.abs().argmax()].item()
    got = top_eigenvalue(model, F.mse_loss, [(x[:10], y[:10]), (x[10:], y[10:])], iters=500, tol=1e-10)
    assert got == pytest.approx(expected, rel=1e-4)


def test_adaptive_batch_size():
    abs_ = AdaptiveBatchSize(256, 2048, factor=2, threshold=0.5)
    # grows when the eigenvalue falls below half of the value at the last change (strictly)
    assert [abs_.update(v) for v in (10.0, 8.0, 4.9, 4.0, 2.0, 1.0, 0.1)] == [256, 256, 512, 512, 1024, 1024, 2048]
    again = AdaptiveBatchSize(256, 2048)
    again.load_state_dict(abs_.state_dict())
    assert again.batch_size == 2048
    with pytest.raises(ValueError):
        AdaptiveBatchSize(512, 256)
