"""Compile every Triton kernel ahead of time for real GPUs (sm_80, sm_90), without a GPU.

Run as a script in a process *without* TRITON_INTERPRET (the interpreter is chosen when
the kernels are decorated); test_triton_compile.py does that. Catches what the
interpreter tolerates but the compiler rejects (types, constexpr branches, casts).
"""

import itertools
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastlars.ops import ghost_bn, lamb_step, lars_step, multi_tensor

F32, BF16, F64 = tl.float32, tl.bfloat16, tl.float64
# (weights dtype, param dtype, acc dtype, write_param): fp32, bf16 without and with master weights, fp64
DTYPES = [(F32, F32, F32, False), (BF16, BF16, F32, False), (F32, BF16, F32, True), (F64, F64, F64, False)]
NAMES = {F32: "fp32", BF16: "bf16", F64: "fp64"}


def pointer(dtype) -> str:
    return "*" + NAMES[dtype]


def variants():
    chunk = dict(CHUNK=16384, BLOCK=1024)
    for w, p, acc, write_p in DTYPES:
        common = {"table": "*i64", "chunks": "*i64", "partials": pointer(acc), "totals": pointer(acc),
                  "groups": "*fp64"}
        for aligned in (False, True):
            yield multi_tensor.sumsq_kernel, {**common}, dict(W_DTYPE=w, G_DTYPE=p, ACC=acc, ALIGNED=aligned, **chunk)
        if (w, p) == (acc, acc):  # one finalize per accumulator dtype and column count
            for columns in (2, 3):
                yield (multi_tensor.tensor_totals_kernel, {"table": "*i64", "partials": pointer(acc),
                                                           "totals": pointer(acc)},
                       dict(COLUMNS=columns, ACC=acc, PARTIAL_BLOCK=128))
        for has_ok, has_scale, has_clip in itertools.product([False, True], repeat=3):
            flags = dict(W_DTYPE=w, P_DTYPE=p, ACC=acc, WRITE_P=write_p, HAS_SCALE=has_scale, **chunk)
            yield (lars_step.lars_update_kernel, {**common, "ok_ptr": "*i32", "inv_scale_ptr": "*fp32"},
                   dict(flags, HAS_OK=has_ok, ALIGNED=has_clip))  # LARS has no HAS_CLIP: both ALIGNED values
            yield (lamb_step.lamb_norms_kernel, {**common, "global_norm_ptr": "*fp64", "inv_scale_ptr": "*fp32"},
                   dict(W_DTYPE=w, P_DTYPE=p, ACC=acc, HAS_CLIP=has_clip, HAS_SCALE=has_scale, ALIGNED=has_ok,
                        **chunk))
            yield (lamb_step.lamb_update_kernel, {**common, "global_norm_ptr": "*fp64", "inv_scale_ptr": "*fp32",
                                                  "ok_ptr": "*i32"},
                   dict(flags, HAS_CLIP=has_clip, HAS_OK=has_ok, ALIGNED=has_ok != has_scale))
    ints = {name: "i32" for name in ("N", "C", "S", "vbs", "n_ghosts")}
    strides = lambda *names: {f"s{n}_{d}": "i64" for n in names for d in "ncs"}
    for x, acc, one_pass, affine in itertools.product([F32, BF16], [F32], [True, False], [True, False]):
        block = 8192 if one_pass else 2048
        yield (ghost_bn.ghost_bn_forward_kernel,
               {"x_ptr": pointer(x), "y_ptr": pointer(x), "w_ptr": "*fp32", "b_ptr": "*fp32", "mean_ptr": "*fp32",
                "var_ptr": "*fp32", **ints, "eps": "fp32", **strides("x", "y")},
               dict(HAS_WEIGHT=affine, HAS_BIAS=affine, ACC=acc, ONE_PASS=one_pass, BLOCK=block))
        yield (ghost_bn.ghost_bn_backward_kernel,
               {"x_ptr": pointer(x), "dy_ptr": pointer(x), "dx_ptr": pointer(x), "w_ptr": "*fp32", "mean_ptr": "*fp32",
                "var_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", **ints, "eps": "fp32",
                **strides("x", "dy", "dx")},
               dict(HAS_WEIGHT=affine, ACC=acc, ONE_PASS=one_pass, BLOCK=block))


def main(archs) -> int:
    compiled = 0
    for fn, signature, constexprs in variants():
        full = {**signature, **{k: "constexpr" for k in constexprs}}
        missing = set(fn.arg_names) - set(full)
        assert not missing, f"{fn.__name__}: no type for {missing}"
        source = ASTSource(fn=fn, signature={name: full[name] for name in fn.arg_names}, constexprs=constexprs)
        for arch in archs:
            triton.compile(source, target=GPUTarget("cuda", arch, 32))
            compiled += 1
    print(f"compiled {compiled} kernel variants for sm_{', sm_'.join(map(str, archs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [80, 90]))
