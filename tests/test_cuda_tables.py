"""backend="cuda" reads the launch tables the Triton kernels read, built once per layout
and cached (fastlars/ops/launch.py), with changed hyper-parameters uploaded into the
cached group table. The driver's side is checked on the CPU: the C++ CUDA entry points
are replaced by recorders (the kernels themselves run in test_fused_gpu.py, on a GPU)."""

import pytest
import torch

import fastlars
from fastlars.ops import cpp_step
from fastlars.ops.layouts import LambColumn, LarsColumn, SumColumn, TensorColumn

pytestmark = pytest.mark.skipif("cpu" not in fastlars.available_backends(), reason="needs the C++ extension")


class RecordingCuda:
    """Stands in for fastlars._C's CUDA entry points: records the tables each call gets."""

    chunk_elements = 16384

    def __init__(self):
        self.calls = []

    def _sums(self, table):
        return torch.zeros(table.shape[0], len(SumColumn), dtype=torch.float32)

    def sumsq_cuda(self, table, chunks, weight, param, lars_groups, inv_scale):
        self.calls.append(("sumsq", table, None if lars_groups is None else lars_groups.clone()))
        return self._sums(table)

    def lars_update_cuda(self, table, chunks, groups, sums, weight, param, inv_scale, ok):
        self.calls.append(("lars_update", table, groups.clone()))

    def lamb_norms_cuda(self, table, chunks, groups, weight, param, inv_scale, global_norm):
        self.calls.append(("lamb_norms", table, groups.clone()))
        return self._sums(table)

    def lamb_update_cuda(self, table, chunks, groups, norms, weight, param, inv_scale, global_norm, ok):
        self.calls.append(("lamb_update", table, groups.clone()))


@pytest.mark.parametrize("name, options, row", [("LARS", dict(momentum=0.9), LarsColumn),
                                                ("LAMB", dict(max_grad_norm=1.0), LambColumn)])
def test_cuda_driver_reuses_cached_tables_and_uploads_a_new_lr(name, options, row, monkeypatch):
    fake = RecordingCuda()
    monkeypatch.setattr(cpp_step, "_C", fake)
    monkeypatch.setattr(cpp_step, "_on_cuda", lambda lp: True)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((7, 5), (13,), (20000,))]
    opt = getattr(fastlars, name)(params, lr=0.1, backend="cpu", **options)
    builds = []
    for step in range(5):
        for group in opt.param_groups:
            group["lr"] = 0.1 / (step + 1)
        for p in params:  # new values in the same gradient tensors: the same layout
            value = torch.randn(p.shape, generator=g)
            if p.grad is None:
                p.grad = value
            else:
                p.grad.copy_(value)
        fake.calls.clear()
        opt.step()
        builds.append(opt._launch_cache.builds)
        for kind, table, groups in fake.calls:
            assert table.shape == (len(params), len(TensorColumn)), kind
            if groups is not None:
                assert groups.shape == (1, len(row))
                assert groups[0, row.LR].item() == pytest.approx(0.1 / (step + 1))  # the new lr, uploaded
        update = [t for kind, t, _ in fake.calls if kind.endswith("update")]
        norms = [t for kind, t, _ in fake.calls if not kind.endswith("update")]
        if step >= 2:  # no state created: the update reads the norms pass's tables
            assert all(t is norms[-1] for t in update)
    assert builds[2] == builds[3] == builds[4], builds  # built once per layout, then reused


def test_capturable_is_accepted_for_the_cuda_backend_only_on_fused_gpu_backends():
    params = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="capturable=True needs backend='triton' or 'cuda'"):
        fastlars.LARS(params, lr=0.1, backend="cpu", capturable=True, skip_nonfinite=True)
