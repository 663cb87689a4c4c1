"""Faults a GPU would hit in the optimizer drivers (issue 14), tested where the CPU allows:
mixed weight dtypes in one launch (master weights and a late-joining parameter), the
CUDA-graph recipe's kernel variants, skip counter and pinned launch tables, the device
guard of every launch, and launch tables keyed on layout only. The capture itself, and
parameters on a second GPU, are in test_fused_gpu.py."""

import pytest
import torch

import fastlars

AVAILABLE = fastlars.available_backends()
# (backend, device): triton runs on CPU tensors under the interpreter (see conftest)
FUSED = [pytest.param(b, d, marks=pytest.mark.skipif(
             b not in AVAILABLE or (d == "cuda" and not torch.cuda.is_available()), reason=f"needs {b} on {d}"))
         for b, d in (("triton", "cpu"), ("cpu", "cpu"), ("triton", "cuda"), ("cuda", "cuda"))]
HYPER = {"LARS": dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02),
         "LAMB": dict(lr=0.02, weight_decay=0.01)}


def _late_joiner_run(name, backend, device, late, skip_nonfinite, steps=3):
    """A bf16 model with master weights in which one parameter gets its first gradient at
    step 1 (``late``: first or last of its group, or in a param group added at step 1)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (4, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, torch.bfloat16)) for s in shapes]
    late_param = {"first": params[0], "last": params[-1], "group": params[-1]}[late]
    first_group = params[:-1] if late == "group" else params
    opt = getattr(fastlars, name)([{"params": first_group}], backend=backend, master_weights=True,
                                  skip_nonfinite=skip_nonfinite, **HYPER[name])
    for step in range(steps):
        if late == "group" and step == 1:
            opt.add_param_group({"params": [late_param]})
        for p in params:
            grad = torch.randn(p.shape, generator=g).to(device, torch.bfloat16)
            p.grad = None if p is late_param and step == 0 else grad
        opt.step()
    return params, opt


@pytest.mark.parametrize("skip_nonfinite", [False, True])
@pytest.mark.parametrize("late", ["first", "last", "group"])
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
@pytest.mark.parametrize("backend, device", FUSED)
def test_master_weights_with_a_late_parameter(backend, device, name, late, skip_nonfinite):
    """One launch must read one weight dtype: the late parameter has no fp32 master yet
    while the others do (was FloatingPointError / every step skipped on triton, a dtype
    error on cpu)."""
    params, opt = _late_joiner_run(name, backend, device, late, skip_nonfinite)
    oracle_params, oracle = _late_joiner_run(name, "reference", device, late, skip_nonfinite)
    assert opt.skipped_steps == 0
    for p, q in zip(params, oracle_params):
        torch.testing.assert_close(opt.state[p]["master_param"], oracle.state[q]["master_param"],
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(p, q.to(p.dtype)) or torch.equal(p, opt.state[p]["master_param"].to(p.dtype))
