"""multi_tensor.cast_rne (the kernels' fp32 -> bf16/fp16 store) against torch's .to(), bit for bit,
on the bit patterns that break a rounding done on the bits: NaNs whose payload carries into the
sign or exponent (0x7FFFFFFF is the NaN a GPU computes), infinities, the largest finite values
(which round to Inf), exact halfway cases (ties to even) and signed zeros. Under the interpreter
on the CPU and compiled on a GPU."""

import os

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastlars.ops.multi_tensor import TL_DTYPES, cast_rne  # noqa: E402

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                        reason="Triton on CPU tensors needs the interpreter")),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]

BITS = [
    0x7FFFFFFF, 0xFFFFFFFF,  # NaN with every payload bit set (a GPU's canonical NaN), either sign
    0x7FC00000, 0xFFC00000,  # quiet NaN (the CPU's)
    0x7F800001, 0x7FBFFFFF, 0x7F808000,  # signalling NaNs whose payload lives in the bits rounded off
    0x7F800000, 0xFF800000,  # +-Inf
    0x7F7FFFFF, 0xFF7FFFFF,  # largest finite: rounds to +-Inf in bf16
    0x7F7F7FFF, 0x7F7F8000, 0x7F7EFFFF,  # just below, exactly at (ties to even: up) and below a halfway point
    0x3F808000, 0x3F818000, 0xBF808000,  # 1 + half an ulp (ties down to even), 1 + 1.5 ulp (ties up), negative
    0x3F80FFFF, 0x3F7FFFFF, 0x477FE000,  # carries into the exponent; 65504 (fp16 max) + rounding
    0x00000000, 0x80000000, 0x3F800000, 0x00800000,  # +-0, 1, the smallest normal
]


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, cast_rne(tl.load(x_ptr + offs, mask=mask), DTYPE), mask=mask)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy's fp16 cast of 3e38
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_rne_matches_torch_bit_for_bit(device, dtype):
    bits = torch.tensor(BITS, dtype=torch.int64).to(torch.int32)  # wraps the sign bit into int32
    g = torch.Generator().manual_seed(0)
    x = torch.cat([bits.view(torch.float32), torch.randn(1000, generator=g) * 1e3]).to(device)
    y = torch.empty(x.shape, dtype=dtype, device=device)
    _cast_kernel[(1,)](x, y, x.numel(), DTYPE=TL_DTYPES[dtype], BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(dtype)
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan), f"NaN lost or made at {x[y.isnan() != nan].view(torch.int32).tolist()}"
    wrong = (y.view(torch.int16) != expected.view(torch.int16)) & ~nan  # NaN payloads differ by implementation
    assert not wrong.any(), (f"inputs {[hex(b & 0xFFFFFFFF) for b in x[wrong].view(torch.int32).tolist()]} "
                             f"gave {y[wrong].tolist()}, torch {expected[wrong].tolist()}")
