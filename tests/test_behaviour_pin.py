"""Bitwise pin of the optimizers' behaviour across refactors.

A short fixed-seed training of LARS and LAMB, with and without master weights (bf16
parameters for those), on every backend a CPU can run (reference, foreach, the C++
"cpu" kernels, Triton under its interpreter), hashed: SHA-256 of the final weights, the
optimizer state and the skip counter. The hashes were recorded from the code before the
issue-18 redesign (one home per concern); a redesign must leave every one unchanged.
A change of values on purpose (a new formula, another rounding) records new hashes here,
in its own commit that says why.

The gradients are an elementwise function of the weights plus seeded noise, not a
backward pass, and every tensor is below the size at which torch's CPU reductions
split across threads, so the hashes do not depend on the number of OpenMP threads.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import fastlars
from conftest import backend_params

# shapes: a scalar, prime sizes, a 4-D weight, an empty tensor, and one of more than one
# 16384-element chunk of the fused kernels (two chunks, the second partial)
SHAPES = [(1,), (7,), (13, 29), (5, 7, 3, 3), (0,), (20011,)]
STEPS = 4

CONFIGS = {
    # fp32 parameters, raising mode (the host reads the gate's flag)
    "LARS-fp32": ("LARS", torch.float32, dict(momentum=0.9, trust_coefficient=0.02), dict(nesterov=True)),
    "LAMB-fp32": ("LAMB", torch.float32, dict(betas=(0.9, 0.99)), dict(grad_averaging=False)),
    # bf16 parameters with fp32 master weights, skip mode (the gate's flag stays on the device)
    "LARS-bf16-master": ("LARS", torch.bfloat16, dict(momentum=0.8, dampening=0.2, trust_coefficient=0.02,
                                                      trust_clip=True, master_weights=True, skip_nonfinite=True),
                         dict(momentum=0.0)),
    "LAMB-bf16-master": ("LAMB", torch.bfloat16, dict(max_grad_norm=0.5, trust_clip=True, master_weights=True,
                                                      skip_nonfinite=True), dict(bias_correction=False)),
}
LR = {"LARS": 0.6, "LAMB": 0.02}

# recorded from the code before the redesign (commit 2955abd), OMP_NUM_THREADS=1 and 2
PINNED = {
    "LARS-fp32/reference": "31ab377a4351cc19db917e0149e49679bdeedfe08c87ec2780eb97ab5a30dbd6",
    "LARS-fp32/foreach": "69efa782f505b5a0688adeb473ca7090238bc272d05b69cb9d756262a5c8e470",
    "LARS-fp32/cpu": "3f1279aaf4f798c38e376e576186bdb80d327091f068e203fc52c1266250d28a",
    "LARS-fp32/triton": "df696209e818d8398db3ed0a2451b68d57267ab8cb4662a7b06436cffb5a472b",
    "LAMB-fp32/reference": "e326753fc61677deda511d051f0f3f307435e9b3ec0e364541853677c8f8137b",
    "LAMB-fp32/foreach": "e326753fc61677deda511d051f0f3f307435e9b3ec0e364541853677c8f8137b",
    "LAMB-fp32/cpu": "3dd574a8f7a5a3f908f71b67c01ebe33fa04338472ddb702cb350e116aee5ec9",
    "LAMB-fp32/triton": "5295d58e8a241f8a668fcdd1ca1aae36d87e3d1cb3496bcdd8cf65381ee74816",
    "LARS-bf16-master/reference": "4458df27ce4b42e73495c834e023c620df3c08f1552c932bea97663c2c824897",
    "LARS-bf16-master/foreach": "ee28e4b97313fca471af7cb09cb786dd34f9ef646849a5b3495ebfd15994bd96",
    "LARS-bf16-master/cpu": "30abdd1f84dd0dafc03c7b91edc5be6c0d0b139e6ff0679e028ac75c834f64fd",
    "LARS-bf16-master/triton": "30abdd1f84dd0dafc03c7b91edc5be6c0d0b139e6ff0679e028ac75c834f64fd",
    "LAMB-bf16-master/reference": "54aa73383699d4f39ecad226b239ab850366d1373f8d906d2a878aceb025ae8e",
    "LAMB-bf16-master/foreach": "446ea60167bd4c08a616e9fdf41607611087898d33cd7fae4a74a392d93f8dd8",
    "LAMB-bf16-master/cpu": "fb3372825bb8b9a24f4a72b93c914b7e87120bd1ed6675c1d273940c4956a3c4",
    "LAMB-bf16-master/triton": "17a212936e99cb8eb87e82b29db3e0707dbe1f92394071d7efd9567ffc376d11",
}


def _train(config: str, backend: str) -> str:
    name, dtype, options, second_group = CONFIGS[config]
    g = torch.Generator().manual_seed(1234)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    targets = [torch.randn(s, generator=g) for s in SHAPES]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 1e-3},
              {"params": [p for p in params if p.ndim <= 1], "trust_ratio": False, "weight_decay": 0.0,
               **second_group}]
    opt = getattr(fastlars, name)(groups, lr=LR[name], backend=backend, **options)
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LR[name] * (1.0 - 0.2 * step)  # a float lr that changes every step
        noise = torch.Generator().manual_seed(99 + step)
        for p, target in zip(params, targets):
            grad = 0.5 * (p.detach().float() - target) + 0.1 * torch.randn(p.shape, generator=noise)
            p.grad = grad.to(dtype)
        opt.step()
    return _digest(params, opt)


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(params: list[torch.Tensor], opt) -> str:
    h = hashlib.sha256()
    for i, p in enumerate(params):
        h.update(f"param {i} {p.dtype} {tuple(p.shape)}".encode())
        h.update(_bytes(p))
        for key in sorted(opt.state.get(p, {})):
            value = opt.state[p][key]
            h.update(f"{key} {value.dtype} {tuple(value.shape)}".encode())
            h.update(_bytes(value))
    h.update(f"skipped {int(opt.skipped_steps)}".encode())
    return h.hexdigest()


BACKENDS = ["reference", "foreach", "cpu", "triton"]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_pinned_training(backend, config):
    if backend not in fastlars.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    # triton: CPU tensors run under the interpreter only (conftest skips otherwise)
    assert _train(config, backend) == PINNED[f"{config}/{backend}"]


if __name__ == "__main__":  # prints the table above, from the code as it is
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    for config in CONFIGS:
        for backend in BACKENDS:
            print(f'    "{config}/{backend}": "{_train(config, backend)}",')
